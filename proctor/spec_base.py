"""What every part of the evaluation spec builds on: `StrictModel` (unknown fields are
refused), `SpecError` (every bad field, named), and the parsers of sizes and paths."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "ki": 1024, "kib": 1024, "mi": 1024**2, "mib": 1024**2, "gi": 1024**3, "gib": 1024**3,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


class SpecError(ValueError):
    """An evaluation spec is invalid. Caught by the CLI (exit code 2) and the API (422).

    `errors` holds one `(field, reason)` pair per problem; `str()` lists them all.
    """

    def __init__(self, errors: list[tuple[str, str]], source: str | None = None):
        self.errors = errors
        self.source = source
        head = f"invalid evaluation spec{f' in {source}' if source else ''}"
        super().__init__(head + ":\n" + "\n".join(f"  {f}: {r}" for f, r in errors))

    def __reduce__(self) -> tuple[type[SpecError], tuple[list[tuple[str, str]], str | None]]:  # whole across Ray (the scheduler raises it to the API)
        return (type(self), (self.errors, self.source))

    @classmethod
    def from_validation(cls, exc: ValidationError, source: str | None = None) -> "SpecError":
        errors = []
        for err in exc.errors():
            # the spec's top-level `inspect` is a field, though also a model adapter's tag
            loc = ".".join(str(p) for i, p in enumerate(err["loc"])
                           if (i == 0 and p == "inspect") or not _is_union_tag(p)) or "(spec)"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown field (check its spelling; unknown fields are refused)"
            elif err["type"] == "missing":
                msg = "required field is missing"
            errors.append((loc, msg))
        return cls(errors, source)


def _is_union_tag(part: object) -> bool:
    # pydantic puts the chosen member of a tagged union in the location; users never wrote it
    return isinstance(part, str) and (part.startswith("function-") or part in _UNION_TAGS)


_UNION_TAGS = {
    "reference", "python", "openai", "inspect",
    "exact", "includes", "regex", "numeric", "choice", "command",
    "str", "list[str]", "list[ChatMessage]", "int", "float",
}


def parse_size(value: int | float | str, field: str = "size") -> int:
    """'512Mi', '2G', '1.5GiB' or a number of bytes → bytes."""
    if isinstance(value, bool):
        raise ValueError(f"{field} must be a size such as '512Mi', not a boolean")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"{field} must not be negative")
        return int(value)
    m = _SIZE_RE.match(str(value))
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"{value!r} is not a size; write e.g. 512Mi, 2Gi, 100M or a number of bytes")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


class StrictModel(BaseModel):
    # strict: a JSON boolean is not an integer, a number is not a string (the schema says the same)
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, strict=True)



def _check_workspace_path(path: str) -> None:
    parts = Path(path).parts
    if not path or Path(path).is_absolute() or ".." in parts or path.startswith("~"):
        raise ValueError(f"{path!r} must be a relative path inside the workspace, without '..'")

