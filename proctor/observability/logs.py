"""The log lines of every Proctor process: JSON lines for a collector, or text for a person.

`configure_logging(settings, process)` gives the root logger one handler on stderr (in a
Ray worker, its log file), in `settings.log_format`: `json` writes one object per line
with `time`, `level`, `logger`, `message`, `process`, `eval_id`, `shard_id`, `trace_id`,
`span_id` (and `exception`); `text` writes `time level logger [eval/shard]: message`.
Every line is scrubbed of secrets first (`redact.py`).

Which evaluation and shard a line is about comes from `log_context` (a context variable,
so an asyncio task keeps its own), or from `extra={"eval_id": ..., "shard_id": ...}`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import TYPE_CHECKING, TextIO

from . import tracing
from .redact import Redactor, settings_secrets

if TYPE_CHECKING:
    from proctor.settings import Settings

REDACT = Redactor()  # this process's secrets by value; `configure_logging` and the gateway add to it
_context: ContextVar[tuple[str | None, str | None]] = ContextVar("proctor_log_context", default=(None, None))
_configured: dict[str, int] = {}  # "pid": the process that `observe_process` configured


@contextmanager
def log_context(eval_id: str | None = None, shard_id: str | None = None) -> Iterator[None]:
    """Lines logged inside are about this evaluation (and shard)."""
    token = _context.set((eval_id, shard_id))
    try:
        yield
    finally:
        _context.reset(token)


def bind(eval_id: str | None, shard_id: str | None = None) -> None:
    """Like `log_context`, for the rest of the current task (or thread)."""
    _context.set((eval_id, shard_id))


def _ids(record: logging.LogRecord) -> tuple[str | None, str | None, str | None, str | None]:
    eval_id, shard_id = _context.get()
    eval_id = getattr(record, "eval_id", None) or eval_id
    shard_id = getattr(record, "shard_id", None) or shard_id
    current = tracing.current()
    if current is None:
        return eval_id, shard_id, None, None
    return eval_id, shard_id, f"{current.trace_id:032x}", f"{current.span_id:016x}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line; secrets scrubbed."""

    def __init__(self, process: str) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        eval_id, shard_id, trace_id, span_id = _ids(record)
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(), "logger": record.name, "message": REDACT(record.getMessage()),
            "process": self.process, "pid": record.process, "eval_id": eval_id, "shard_id": shard_id,
            "trace_id": trace_id, "span_id": span_id,
        }
        if record.exc_info:
            line["exception"] = REDACT(self.formatException(record.exc_info))
        elif record.exc_text:
            line["exception"] = REDACT(record.exc_text)
        return json.dumps(line, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """`time level logger [eval/shard trace]: message`, for a person; secrets scrubbed."""

    def format(self, record: logging.LogRecord) -> str:
        eval_id, shard_id, trace_id, _ = _ids(record)
        where = "/".join(x for x in (eval_id, shard_id) if x)
        if trace_id:
            where = f"{where} trace={trace_id}".strip()
        stamp = datetime.fromtimestamp(record.created, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        text = f"{stamp} {record.levelname} {record.name}{f' [{where}]' if where else ''}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return REDACT(text)


def configure_logging(settings: Settings, process: str, default_level: str = "info",
                      stream: TextIO | None = None) -> None:
    """Make this process's root logger write `settings.log_format` lines to `stream`
    (stderr), at `settings.log_level` or else `default_level`. Replaces the handlers that
    were there (another's `basicConfig`, a previous call), so that no line is written twice."""
    for secret in settings_secrets(settings):
        REDACT.add(secret)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(process) if settings.log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel((settings.log_level or default_level).upper())


def observe_process(settings: Settings, process: str, default_level: str = "info") -> None:
    """Logs and traces of one of the platform's processes (an actor, an API replica, a task):
    configured once per process; later calls do nothing."""
    if _configured.get("pid") == os.getpid():
        return
    configure_logging(settings, process, default_level)
    tracing.setup(settings, process)
    _configured["pid"] = os.getpid()
