"""The evaluation spec: what a researcher submits.

`EvaluationSpec` and its parts are pydantic models that forbid unknown fields, so a
typo is an error, never a silently ignored setting. `load_spec` reads YAML or JSON and
raises `SpecError`, whose message names every bad field and says why.

The spec is versioned (`version`); `EvaluationSpec._migrate` upgrades older documents.
Its parts live in `spec_task` (model, dataset, scorers), `spec_sandbox` (sandbox, setup,
transcripts) and `spec_base` (`StrictModel`, `SpecError`, sizes); import them from here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from .jsontypes import JsonObject
from .inspect_spec import InspectModel, InspectTask, pack_task
from .policy import SafetyPolicy
from .spec_base import SpecError, StrictModel, parse_size
from .spec_sandbox import KNOWN_GPU_TYPES, GpuRequest, SandboxSpec, SetupStep, TranscriptSpec, parse_egress
from .spec_task import (
    ChatMessage,
    ChoiceScorer,
    CommandScorer,
    Dataset,
    ExactScorer,
    IncludesScorer,
    ModelSpec,
    NumericScorer,
    OpenAIModel,
    PythonModel,
    ReferenceModel,
    RegexScorer,
    Sample,
    ScorerSpec,
)

__all__ = ["KNOWN_GPU_TYPES", "SPEC_VERSION", "ChatMessage", "ChoiceScorer", "CommandScorer", "Dataset",
           "EvaluationSpec", "ExactScorer", "GpuRequest", "IncludesScorer", "InspectModel", "InspectTask", "ModelSpec",
           "NumericScorer", "OpenAIModel", "PythonModel", "ReferenceModel", "RegexScorer", "SafetyPolicy", "Sample",
           "SandboxSpec", "ScorerSpec", "SetupStep", "SpecError", "StrictModel", "TranscriptSpec", "load_spec",
           "parse_egress", "parse_size", "parse_spec", "spec_json_schema"]

SPEC_VERSION = 1


class EvaluationSpec(StrictModel):
    """An evaluation: a model, a dataset, scorers, a sandbox and a safety policy."""

    version: int = Field(SPEC_VERSION, description="spec format version")
    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._-]*$")
    labels: dict[str, str] = Field(default_factory=dict)
    model: ModelSpec
    dataset: Dataset | None = Field(None, description="the samples; or name an Inspect task in `inspect`")
    inspect: InspectTask | None = Field(None, description="an Inspect AI task run instead of a dataset: its "
                                        "samples, solver and scorers")
    scorers: list[ScorerSpec] = Field(default_factory=list, description="at least one for a dataset; none "
                                      "for an Inspect task (its own scorers score)")
    epochs: int = Field(1, ge=1, le=1000)
    shard_size: int = Field(50, ge=1, le=100_000, description="samples per shard (one sandbox each)")
    agentic: bool = Field(False, description="let the model run shell commands in its workspace (tool loop)")
    setup: list[SetupStep] = Field(default_factory=list, max_length=64,
                                   description="the setup stage: commands run in each sample's sandbox before the agent")
    sandbox: SandboxSpec = Field(default_factory=SandboxSpec)
    safety: SafetyPolicy = Field(default_factory=SafetyPolicy, description="what is watched and what a "
                                 "violation does (strict by default)")
    priority: int = Field(0, ge=-100, le=100, description="higher runs first")
    transcripts: TranscriptSpec = Field(default_factory=TranscriptSpec, description="each sample's "
                                        "conversation, kept as an Inspect AI log beside the results")

    @model_validator(mode="before")
    @classmethod
    def _migrate(cls, data: object) -> object:
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
        _check_source(self)
        names = [s.name or s.type for s in self.scorers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"scorers: names must be unique; give 'name' to tell apart: {', '.join(dupes)}")
        if self.dataset is not None and self.dataset.samples is not None:
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
        if self.inspect is not None:
            return list(self.inspect.resolved.scorers) if self.inspect.resolved else []
        return [s.name or s.type for s in self.scorers]


def _check_source(spec: EvaluationSpec) -> None:
    """A dataset with Proctor's scorers, or an Inspect task with an Inspect model; not both."""
    if (spec.dataset is None) == (spec.inspect is None):
        raise ValueError("give exactly one of 'dataset' (Proctor samples) or 'inspect' (an Inspect task)")
    if spec.inspect is None:
        if not spec.scorers:
            raise ValueError("scorers: a dataset needs at least one scorer")
        if isinstance(spec.model, InspectModel):
            raise ValueError("model: the 'inspect' adapter runs Inspect tasks; name one in 'inspect'")
        return
    if not isinstance(spec.model, InspectModel):
        raise ValueError(f"model: an Inspect task needs adapter 'inspect' with an Inspect model string, "
                         f"not {spec.model.adapter!r}")
    if spec.sandbox.runtime == "kubernetes":
        raise ValueError("sandbox.runtime: an Inspect task's tools run in local sandboxes (gvisor, bubblewrap) "
                         "for now; use 'auto', 'gvisor' or 'bubblewrap'")
    for name, given in (("scorers", spec.scorers), ("agentic", spec.agentic), ("setup", spec.setup)):
        if given:
            raise ValueError(f"{name}: an Inspect task brings its own solver and scorers; remove {name!r}")
    if spec.epochs != 1:
        raise ValueError("epochs: give an Inspect task's epochs as inspect.epochs")


def parse_spec(data: object, source: str | None = None) -> EvaluationSpec:
    """Validate a decoded document. Raises `SpecError`."""
    if not isinstance(data, dict):
        raise SpecError([("(spec)", f"must be a mapping of fields, not {type(data).__name__}")], source)
    try:
        return EvaluationSpec.model_validate(data)
    except ValidationError as exc:
        err = SpecError.from_validation(exc, source)
        raise SpecError(err.errors + _dataset_gaps(data, err.errors), source) from None


def _dataset_gaps(data: JsonObject, found: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """What a spec without an Inspect task lacks of a dataset's fields, named by field even
    when other fields failed first (the model's checks run only over valid fields)."""
    if "inspect" in data:
        return []
    said = {field for field, _ in found} | {reason.split(":")[0] for _, reason in found}
    gaps = []
    if "dataset" not in data and "dataset" not in said:
        gaps.append(("dataset", "required field is missing"))
    if "scorers" not in said and not data.get("scorers"):
        gaps.append(("scorers", "required field is missing" if "scorers" not in data else
                     "a dataset needs at least one scorer"))
    return gaps


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
    if isinstance(data, dict) and isinstance(data.get("inspect"), dict):
        data = _pack_inspect(data, path)
    spec = parse_spec(data, str(path))
    ds = spec.dataset.path if spec.dataset is not None else None
    if ds is not None and "://" not in ds and not Path(ds).is_absolute():
        # a relative dataset path means relative to the spec file, wherever it is run from
        assert spec.dataset is not None
        dataset = spec.dataset.model_copy(update={"path": str((path.parent / ds).resolve())})
        spec = spec.model_copy(update={"dataset": dataset})
    return spec


def _pack_inspect(data: JsonObject, path: Path) -> JsonObject:
    """A spec file's Inspect task file travels with it: 'file.py@name', relative to the
    spec file, is packed with its folder (unless the spec gives the files itself)."""
    block = data["inspect"]
    task = block.get("task")
    if not isinstance(task, str) or "@" not in task or block.get("files"):
        return data
    try:
        packed = pack_task(str(path.parent / task) if not Path(task).is_absolute() else task)
    except ValueError as exc:
        raise SpecError([("inspect.task", str(exc))], str(path)) from None
    return {**data, "inspect": {**block, **packed}}


def spec_json_schema() -> JsonObject:
    return EvaluationSpec.model_json_schema()
