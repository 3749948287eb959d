"""The evaluation spec: what a researcher submits.

`EvaluationSpec` and its parts are pydantic models that forbid unknown fields, so a
typo is an error, never a silently ignored setting. `load_spec` reads YAML or JSON and
raises `SpecError`, whose message names every bad field and says why.

The spec is versioned (`version`); `EvaluationSpec._migrate` upgrades older documents.
"""

from __future__ import annotations

import ipaddress
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .policy import SafetyPolicy

SPEC_VERSION = 1

KNOWN_GPU_TYPES = ("A10G", "A100", "A100-80G", "H100", "H200", "L4", "L40S", "T4", "V100")

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

    @classmethod
    def from_validation(cls, exc: ValidationError, source: str | None = None) -> "SpecError":
        errors = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"] if not _is_union_tag(p)) or "(spec)"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown field (check its spelling; unknown fields are refused)"
            elif err["type"] == "missing":
                msg = "required field is missing"
            errors.append((loc, msg))
        return cls(errors, source)


def _is_union_tag(part: Any) -> bool:
    # pydantic puts the chosen member of a tagged union in the location; users never wrote it
    return isinstance(part, str) and (part.startswith("function-") or part in _UNION_TAGS)


_UNION_TAGS = {
    "reference", "python", "openai",
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


# ---------------------------------------------------------------- model


class ReferenceModel(StrictModel):
    """The reference model: a deterministic built-in oracle, not a real model.

    It answers each sample with its target, except for a seeded, reproducible fraction
    `error_rate` of (sample, epoch) pairs where it answers wrongly. It exists for examples
    and tests, and is labelled `reference` in every record.
    """

    adapter: Literal["reference"]
    error_rate: float = Field(0.0, ge=0.0, le=1.0, description="fraction of answers made wrong on purpose")
    seed: int = Field(0, description="seed of the choice of wrong answers")


class PythonModel(StrictModel):
    """A Python callable `module:function` run inside the sandbox: a scripted policy or a
    model loaded in-process. It receives the chat so far and returns text or tool calls."""

    adapter: Literal["python"]
    callable: str = Field(description="'module:function', importable inside the sandbox")
    params: dict[str, Any] = Field(default_factory=dict, description="keyword arguments passed to the callable")

    @field_validator("callable")
    @classmethod
    def _module_function(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", v):
            raise ValueError(f"{v!r} is not 'module:function' (e.g. proctor.policies.file_agent:solve)")
        return v


class OpenAIModel(StrictModel):
    """An OpenAI-compatible chat endpoint, reached only through the model gateway outside
    the sandbox. The key is read from `api_key_env` outside the sandbox; it never enters."""

    adapter: Literal["openai"]
    model: str = Field(min_length=1, description="model name sent to the endpoint")
    base_url: str = Field(description="e.g. https://api.openai.com/v1")
    api_key_env: str | None = Field(None, description="environment variable holding the key, read by the gateway")
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    max_tokens: int = Field(1024, ge=1, le=1_000_000)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s]+", v):
            raise ValueError(f"{v!r} is not an http(s) URL")
        return v.rstrip("/")


ModelSpec = Annotated[Union[ReferenceModel, PythonModel, OpenAIModel], Field(discriminator="adapter")]


# ---------------------------------------------------------------- dataset


class ChatMessage(StrictModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class Sample(StrictModel):
    """One task: an input for the model and what a correct answer looks like."""

    id: str | int | None = Field(None, description="unique within the dataset; the position if absent")
    input: str | list[ChatMessage]
    target: str | list[str] = ""
    choices: list[str] | None = Field(None, description="options for multiple-choice samples (A, B, ...)")
    metadata: dict[str, Any] = Field(default_factory=dict)
    files: dict[str, str] = Field(default_factory=dict, description="workspace files for this sample: path → content")

    @field_validator("files")
    @classmethod
    def _relative_paths(cls, v: dict[str, str]) -> dict[str, str]:
        for path in v:
            _check_workspace_path(path)
        return v


class Dataset(StrictModel):
    """Samples given inline, or a JSONL or Parquet file (local path or s3:// URI)."""

    samples: list[Sample] | None = None
    path: str | None = Field(None, description="a .jsonl or .parquet file, local or s3://bucket/key")
    limit: int | None = Field(None, ge=1, description="use only the first N samples")
    group_by: str | None = Field(None, max_length=100,
                                 description="a metadata key; the summary then breaks metrics down by its values")

    @model_validator(mode="after")
    def _one_source(self) -> "Dataset":
        if (self.samples is None) == (self.path is None):
            raise ValueError("give exactly one of 'samples' (inline) or 'path' (a .jsonl or .parquet file)")
        if self.samples is not None and not self.samples:
            raise ValueError("'samples' is empty; an evaluation needs at least one sample")
        if self.path is not None and not re.search(r"\.(jsonl|parquet)$", self.path):
            raise ValueError(f"path {self.path!r} must end in .jsonl or .parquet")
        return self


# ---------------------------------------------------------------- scorers


class _Scorer(StrictModel):
    name: str | None = Field(None, description="column name of this score; the type if absent")


class ExactScorer(_Scorer):
    type: Literal["exact"]
    ignore_case: bool = True
    strip: bool = True


class IncludesScorer(_Scorer):
    type: Literal["includes"]
    ignore_case: bool = True


class RegexScorer(_Scorer):
    type: Literal["regex"]
    pattern: str = Field(description="searched in the output; '{target}' is replaced by the escaped target")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            re.compile(v.replace("{target}", "x"))
        except re.error as exc:
            raise ValueError(f"pattern does not compile: {exc}") from None
        return v


class NumericScorer(_Scorer):
    type: Literal["numeric"]
    tolerance: float = Field(1e-6, ge=0.0, description="absolute tolerance")
    relative: bool = Field(False, description="treat tolerance as relative to the target")


class ChoiceScorer(_Scorer):
    type: Literal["choice"]


class CommandScorer(_Scorer):
    """A shell command run in the sample's workspace after the model answers."""

    type: Literal["command"]
    command: str = Field(min_length=1)
    parse: Literal["exit_code", "stdout_float"] = Field(
        "exit_code", description="exit_code: 1.0 when the command exits 0; stdout_float: the number it prints"
    )
    timeout_s: float = Field(30.0, gt=0, le=3600)


ScorerSpec = Annotated[
    Union[ExactScorer, IncludesScorer, RegexScorer, NumericScorer, ChoiceScorer, CommandScorer],
    Field(discriminator="type"),
]


# ---------------------------------------------------------------- sandbox


class GpuRequest(StrictModel):
    count: int = Field(0, ge=0, le=16)
    type: str | None = Field(None, description=f"one of {', '.join(KNOWN_GPU_TYPES)}")

    @field_validator("type")
    @classmethod
    def _known(cls, v: str | None) -> str | None:
        if v is not None and v not in KNOWN_GPU_TYPES:
            raise ValueError(f"{v!r} is not a known GPU type; known: {', '.join(KNOWN_GPU_TYPES)}")
        return v

    @model_validator(mode="after")
    def _type_needs_count(self) -> "GpuRequest":
        if self.type is not None and self.count == 0:
            raise ValueError("a GPU type is given but count is 0; set count to at least 1")
        return self


class SandboxSpec(StrictModel):
    """Where and with what limits each shard runs."""

    runtime: Literal["auto", "gvisor", "bubblewrap", "kubernetes"] = "auto"
    cpus: float = Field(1.0, gt=0, le=256)
    memory: int = Field(parse_size("1Gi"), description="bytes, or a size such as 512Mi")
    gpu: GpuRequest = Field(default_factory=GpuRequest)
    timeout_s: float = Field(600.0, gt=0, le=7 * 24 * 3600, description="wall-clock deadline of one shard")
    pids: int = Field(128, ge=8, le=65536, description="most processes and threads at once")
    output_cap: int = Field(parse_size("16Mi"), description="most bytes a shard may write to its channel")
    disk: int = Field(parse_size("1Gi"), description="most bytes in the workspace")
    files: dict[str, str] = Field(default_factory=dict, description="files placed in every workspace: path → content")
    tool_timeout_s: float = Field(60.0, gt=0, le=3600, description="deadline of one shell command the model runs")
    artifacts: list[str] = Field(default_factory=list, max_length=32,
                                 description="glob patterns, relative to each sample's folder, of files kept as artifacts")
    egress: list[str] = Field(default_factory=list, max_length=64,
                              description="network destinations the sandbox may reach, as 'CIDR:port' (TCP), e.g. "
                              "'10.0.0.0/8:443'; only the kubernetes runtime has a network (none by default)")

    @field_validator("memory", "output_cap", "disk", mode="before")
    @classmethod
    def _size(cls, v: Any, info: Any) -> int:
        return parse_size(v, info.field_name)

    @field_validator("memory")
    @classmethod
    def _memory_floor(cls, v: int) -> int:
        if v < 64 * 1024**2:
            raise ValueError(f"{v} bytes is too little memory for the harness; give at least 64Mi")
        return v

    @field_validator("output_cap")
    @classmethod
    def _cap_floor(cls, v: int) -> int:
        if v < 64 * 1024:
            raise ValueError("output_cap must be at least 64Ki")
        return v

    @field_validator("files")
    @classmethod
    def _relative_paths(cls, v: dict[str, str]) -> dict[str, str]:
        for path in v:
            _check_workspace_path(path)
        return v

    @field_validator("artifacts")
    @classmethod
    def _relative_globs(cls, v: list[str]) -> list[str]:
        for pattern in v:
            _check_workspace_path(pattern)
        return v

    @field_validator("egress")
    @classmethod
    def _egress(cls, v: list[str], info: Any) -> list[str]:
        if v and info.data.get("runtime") != "kubernetes":
            raise ValueError(
                f"runtime {info.data.get('runtime', 'auto')!r} cannot allow egress: local sandboxes (gvisor, "
                "bubblewrap) have no network; use runtime 'kubernetes' or remove egress"
            )
        return [parse_egress(entry) for entry in v]


def parse_egress(entry: str) -> str:
    """'10.0.0.0/8:443' → the same, normalised; '[2001:db8::/32]:443' and '2001:db8::/32:443'
    for IPv6. Raises `ValueError` naming the entry."""
    example = "write 'CIDR:port', e.g. '10.0.0.0/8:443' or '203.0.113.7/32:8080'"
    host, sep, port = entry.strip().rpartition(":")
    if not sep or not host:
        raise ValueError(f"egress entry {entry!r} has no port; {example}")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"egress entry {entry!r}: port {port!r} is not a number from 1 to 65535; {example}")
    try:
        network = ipaddress.ip_network(host.removeprefix("[").removesuffix("]"), strict=True)
    except ValueError as exc:
        raise ValueError(f"egress entry {entry!r}: {exc}; {example}") from None
    return f"{network}:{int(port)}"


def _check_workspace_path(path: str) -> None:
    parts = Path(path).parts
    if not path or Path(path).is_absolute() or ".." in parts or path.startswith("~"):
        raise ValueError(f"{path!r} must be a relative path inside the workspace, without '..'")


# ---------------------------------------------------------------- safety


# ---------------------------------------------------------------- the evaluation


class EvaluationSpec(StrictModel):
    """An evaluation: a model, a dataset, scorers, a sandbox and a safety policy."""

    version: int = Field(SPEC_VERSION, description="spec format version")
    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._-]*$")
    labels: dict[str, str] = Field(default_factory=dict)
    model: ModelSpec
    dataset: Dataset
    scorers: list[ScorerSpec] = Field(min_length=1)
    epochs: int = Field(1, ge=1, le=1000)
    shard_size: int = Field(50, ge=1, le=100_000, description="samples per shard (one sandbox each)")
    agentic: bool = Field(False, description="let the model run shell commands in its workspace (tool loop)")
    sandbox: SandboxSpec = Field(default_factory=SandboxSpec)
    safety: SafetyPolicy = Field(default_factory=SafetyPolicy, description="what is watched and what a "
                                 "violation does (strict by default)")
    priority: int = Field(0, ge=-100, le=100, description="higher runs first")

    @model_validator(mode="before")
    @classmethod
    def _migrate(cls, data: Any) -> Any:
        if isinstance(data, dict):
            version = data.get("version", SPEC_VERSION)
            if not isinstance(version, int) or version < 1 or version > SPEC_VERSION:
                raise ValueError(f"version {version!r} is not supported; this Proctor reads versions 1..{SPEC_VERSION}")
        return data

    @field_validator("labels")
    @classmethod
    def _label_keys(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v:
            if not re.fullmatch(r"[a-z0-9]([a-z0-9._/-]{0,62}[a-z0-9])?", key):
                raise ValueError(f"label key {key!r} must be lower-case letters, digits, '.', '_', '-' or '/'")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "EvaluationSpec":
        names = [s.name or s.type for s in self.scorers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"scorers: names must be unique; give 'name' to tell apart: {', '.join(dupes)}")
        if self.dataset.samples is not None:
            ids = [s.id for s in self.dataset.samples if s.id is not None]
            if len(ids) != len(set(map(str, ids))):
                raise ValueError("dataset.samples: sample ids must be unique")
        if self.sandbox.gpu.count and self.sandbox.runtime in ("gvisor", "bubblewrap"):
            raise ValueError(
                f"sandbox.gpu: the {self.sandbox.runtime} runtime cannot give GPUs to a sandbox; "
                "use runtime 'kubernetes' or 'auto'"
            )
        return self

    def scorer_names(self) -> list[str]:
        return [s.name or s.type for s in self.scorers]


def parse_spec(data: Any, source: str | None = None) -> EvaluationSpec:
    """Validate a decoded document. Raises `SpecError`."""
    if not isinstance(data, dict):
        raise SpecError([("(spec)", f"must be a mapping of fields, not {type(data).__name__}")], source)
    try:
        return EvaluationSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError.from_validation(exc, source) from None


def load_spec(path: str | Path) -> EvaluationSpec:
    """Read a spec from a YAML or JSON file. Raises `SpecError` (also for unreadable files).
    A relative `dataset.path` is taken relative to the spec file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError([("(file)", f"cannot read {path}: {exc.strerror}")], str(path)) from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise SpecError([("(file)", f"not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}")], str(path)) from None
    spec = parse_spec(data, str(path))
    ds = spec.dataset.path
    if ds is not None and "://" not in ds and not Path(ds).is_absolute():
        # a relative dataset path means relative to the spec file, wherever it is run from
        dataset = spec.dataset.model_copy(update={"path": str((path.parent / ds).resolve())})
        spec = spec.model_copy(update={"dataset": dataset})
    return spec


def spec_json_schema() -> dict[str, Any]:
    return EvaluationSpec.model_json_schema()
