"""Inspect AI's entry point (``[project.entry-points.inspect_ai]``): importing this module
registers Proctor's extensions with Inspect: the ``proctor`` sandbox environment."""

from eval_actors.inspect_sandbox.provider import ProctorSandboxEnvironment

__all__ = ["ProctorSandboxEnvironment"]
