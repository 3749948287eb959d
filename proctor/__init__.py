"""Proctor: evaluate AI models for dangerous capabilities, safely.

The public face. Names load on first use, so that the in-sandbox harness (which lives in
this package) starts without importing pydantic.
"""

from __future__ import annotations

from typing import Any

__all__ = ["EvaluationSpec", "SpecError", "load_spec", "parse_spec", "Client", "AsyncClient", "ProctorError",
           "__version__"]
__version__ = "0.1.0"

_LAZY = {"EvaluationSpec": "proctor.spec", "SpecError": "proctor.spec", "load_spec": "proctor.spec",
         "parse_spec": "proctor.spec", "Client": "proctor.client", "AsyncClient": "proctor.client",
         "ProctorError": "proctor.client"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'proctor' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
