"""Proctor: evaluate AI models for dangerous capabilities, safely.

The public face. Names load on first use, so that the in-sandbox harness (which lives in
this package) starts without importing pydantic.
"""

# neither `typing` nor `__future__` (nor anything else) is imported here: the sandboxed
# harness's start would pay for them (and for the search of site-packages for `__future__`)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_CLIENT = ("Client", "AsyncClient", "Evaluation", "ProctorError", "AuthenticationError", "PermissionDeniedError",
           "NotFoundError", "ConflictError", "InvalidRequestError", "RateLimitError", "ServerError", "UnavailableError")
_LAZY = {**{name: "proctor.spec" for name in ("EvaluationSpec", "SpecError", "load_spec", "parse_spec")},
         **{name: "proctor.client" for name in _CLIENT}}
__all__ = [*_LAZY, "__version__"]
__version__ = "0.1.0"


def __getattr__(name: str) -> "Any":  # whatever the module it comes from defines under that name
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'proctor' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
