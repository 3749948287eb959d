"""Observability of every Proctor process: structured logs (`logs`), OpenTelemetry traces
(`tracing`), and the scrubbing of secrets from both (`redact`). Light: the OpenTelemetry
SDK is imported only when tracing is turned on."""

from .logs import REDACT, bind, configure_logging, log_context, observe_process

__all__ = ["REDACT", "bind", "configure_logging", "log_context", "observe_process"]
