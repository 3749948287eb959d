"""An Inspect AI task as a Proctor evaluation: the spec's `inspect` block and its model.

    inspect: {task: "task.py@name" | "package/registry_name", args: {...}, epochs: 2,
              sample_ids: [...], limit: 10, files: {"task.py": "...", ...}}
    model: {adapter: inspect, model: "openai/gpt-4o"}   # any Inspect model string

Task files travel with the submission: `pack_task` (used by the client and the CLI) reads
the task file and the files of its folder (bounded by `MAX_FILES` and `MAX_BYTES`) into
`files`, and the reference becomes relative to them. The platform loads the task from
those files, never from the researcher's machine.

Every model call of an Inspect evaluation goes through Proctor's model gateway, which
speaks the providers' own APIs; a provider it does not serve is refused here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from .jsontypes import JsonObject

# providers whose API the gateway speaks (mockllm makes no call at all)
GATEWAY_PROVIDERS = {"openai": "https://api.openai.com/v1", "anthropic": "https://api.anthropic.com"}
OFFLINE_PROVIDERS = ("mockllm",)
DEFAULT_KEY_ENV = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}

MAX_FILES = 64
MAX_BYTES = 2 * 1024**2
PACKED_SUFFIXES = (".py", ".json", ".jsonl", ".yaml", ".yml", ".txt", ".csv", ".md", ".sh")
_SKIPPED_DIRS = {"__pycache__", ".git", ".venv", "node_modules", "logs"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, strict=True)


class InspectModel(_Strict):
    """A model as Inspect names it (`provider/model`). Its calls go to Proctor's model
    gateway, which holds the key (read from `api_key_env` outside every sandbox and worker)
    and forwards to `base_url`."""

    adapter: Literal["inspect"]
    model: str = Field(min_length=3, max_length=300, description="an Inspect model string: openai/..., "
                       "anthropic/... or mockllm/...")
    base_url: str | None = Field(None, description="the provider's endpoint the gateway forwards to; "
                                 "the provider's public API if unset")
    api_key_env: str | None = Field(None, description="environment variable holding the key, read by the "
                                    "gateway; OPENAI_API_KEY / ANTHROPIC_API_KEY if unset")
    args: JsonObject = Field(default_factory=dict, description="Inspect model arguments (-M)")

    @field_validator("model")
    @classmethod
    def _served(cls, v: str) -> str:
        provider, sep, name = v.partition("/")
        if not sep or not name:
            raise ValueError(f"{v!r} is not an Inspect model string 'provider/model' (e.g. openai/gpt-4o)")
        if provider not in GATEWAY_PROVIDERS and provider not in OFFLINE_PROVIDERS:
            served = ", ".join([*GATEWAY_PROVIDERS, *OFFLINE_PROVIDERS])
            raise ValueError(f"provider {provider!r} of {v!r} is not served by Proctor's model gateway; "
                             f"served: {served}")
        return v

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^/\s]+", v):
            raise ValueError(f"{v!r} is not an http(s) URL")
        return v.rstrip("/") if v else v

    @property
    def provider(self) -> str:
        return self.model.partition("/")[0]

    @property
    def upstream(self) -> str | None:
        return self.base_url or GATEWAY_PROVIDERS.get(self.provider)

    @property
    def key_env(self) -> str | None:
        return self.api_key_env or DEFAULT_KEY_ENV.get(self.provider)


class InspectResolved(_Strict):
    """What the platform learned by loading the task at submission (filled in by it;
    whatever a submission gives here is replaced)."""

    task_name: str = ""
    sample_ids: list[str] = Field(default_factory=list)
    scorers: list[str] = Field(default_factory=list)
    epochs: int = 1
    sandboxed: bool = Field(False, description="the task declares a sandbox (its tools run in Proctor's)")
    sandbox_config: str | None = Field(None, description="its sandbox's compose file, among the task's files")


class InspectTask(_Strict):
    """An Inspect task run by Proctor: sharded over its samples × epochs, its tools run in
    Proctor sandboxes, its model calls through the gateway."""

    task: str = Field(min_length=1, max_length=500, description="'file.py@name' (a file in `files`) or "
                      "'package/registry_name' of an installed package")
    args: JsonObject = Field(default_factory=dict, description="task arguments (-T)")
    epochs: int | None = Field(None, ge=1, le=1000, description="epochs; the task's own if unset")
    sample_ids: list[str | int] | None = Field(None, min_length=1, max_length=100_000,
                                               description="run only these samples")
    limit: int | None = Field(None, ge=1, description="run only the first N samples")
    files: dict[str, str] = Field(default_factory=dict, description="the task's files (its folder, packed by "
                                  "the client): relative path → content")
    resolved: InspectResolved | None = Field(None, description="filled in by the platform at submission")

    @field_validator("task")
    @classmethod
    def _reference(cls, v: str) -> str:
        if "@" in v:
            path, _, name = v.rpartition("@")
            if not path.endswith(".py") or not re.fullmatch(r"[A-Za-z_]\w*", name):
                raise ValueError(f"{v!r} is not 'file.py@task_name'")
            if Path(path).is_absolute() or ".." in Path(path).parts:
                raise ValueError(f"{v!r}: the task file must be a relative path inside the task's folder "
                                 "(its files travel with the spec), without '..'")
        elif not re.fullmatch(r"[A-Za-z_][\w.-]*/[A-Za-z_][\w.-]*", v):
            raise ValueError(f"{v!r} is neither 'file.py@task_name' nor 'package/registry_name'")
        return v

    @field_validator("files")
    @classmethod
    def _bounded(cls, v: dict[str, str]) -> dict[str, str]:
        for path in v:
            _relative(path)
        if len(v) > MAX_FILES:
            raise ValueError(f"{len(v)} files; a task may bring at most {MAX_FILES}")
        size = sum(len(c.encode()) for c in v.values())
        if size > MAX_BYTES:
            raise ValueError(f"{size} bytes of files; a task may bring at most {MAX_BYTES}")
        return v

    @property
    def task_file(self) -> str | None:
        return self.task.rpartition("@")[0] if "@" in self.task else None


def _relative(path: str) -> None:
    p = Path(path)
    if not path or p.is_absolute() or ".." in p.parts or path.startswith("~"):
        raise ValueError(f"{path!r} must be a relative path inside the task's folder, without '..'")


def split_task_ref(ref: str) -> tuple[Path, str]:
    """'some/dir/task.py@name' → (the file, name). Raises `ValueError`."""
    path, sep, name = ref.rpartition("@")
    if not sep or not path.endswith(".py"):
        raise ValueError(f"{ref!r} is not 'file.py@task_name'")
    return Path(path), name


def pack_task(ref: str) -> JsonObject:
    """The `inspect` block's `task` and `files` for a task file on this machine: the file
    and the files of its folder (sub-folders included; at most `MAX_FILES` files of
    `PACKED_SUFFIXES`, `MAX_BYTES` in all). A registry name is returned as it is.
    Raises `ValueError` naming the file or the bound."""
    if "@" not in ref:
        return {"task": ref}
    path, name = split_task_ref(ref)
    if not path.is_file():
        raise ValueError(f"task file {str(path)!r} does not exist")
    folder = path.resolve().parent
    files: dict[str, str] = {}
    size = 0
    for found in sorted(folder.rglob("*")):
        rel = found.relative_to(folder)
        if not found.is_file() or found.suffix not in PACKED_SUFFIXES or _SKIPPED_DIRS & set(rel.parts[:-1]):
            continue
        if len(files) >= MAX_FILES:
            raise ValueError(f"the task's folder {str(folder)!r} holds more than {MAX_FILES} files to send; "
                             "move the task into a folder of its own")
        try:
            text = found.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read {str(found)!r} of the task's folder: {exc}") from None
        size += len(text.encode())
        if size > MAX_BYTES:
            raise ValueError(f"the task's folder {str(folder)!r} holds more than {MAX_BYTES} bytes to send; "
                             "move the task into a folder of its own")
        files[rel.as_posix()] = text
    return {"task": f"{path.name}@{name}", "files": files}


def task_spec(ref: str, model: str, *, args: JsonObject | None = None, epochs: int | None = None,
              limit: int | None = None, sample_ids: list[str] | None = None, name: str | None = None,
              base: Path | None = None) -> JsonObject:
    """An evaluation spec (a document, for `parse_spec`) that runs the Inspect task `ref`
    ('file.py@name', packed with its folder; relative to `base` if given) with `model`.
    Raises `ValueError` naming the file or the bound."""
    local = str(base / ref) if base is not None and "@" in ref and not Path(ref).is_absolute() else ref
    packed = pack_task(local)
    block: JsonObject = {**packed, "args": dict(args or {})}
    for key, value in (("epochs", epochs), ("limit", limit), ("sample_ids", sample_ids)):
        if value is not None:
            block[key] = value
    task_name = ref.rpartition("@")[2] if "@" in ref else ref.rpartition("/")[2]
    return {"name": name or re.sub(r"[^A-Za-z0-9 ._-]", "-", task_name)[:200] or "inspect-task",
            "model": {"adapter": "inspect", "model": model}, "inspect": block}
