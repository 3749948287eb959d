"""What an evaluation evaluates: the model (`ModelSpec`), its samples (`Dataset`) and how
they are scored (`ScorerSpec`). Part of the spec; import them from `proctor.spec`."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import Field, field_validator, model_validator

from .jsontypes import JsonObject
from .inspect_spec import InspectModel
from .spec_base import StrictModel, _check_workspace_path

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
    params: JsonObject = Field(default_factory=dict, description="keyword arguments passed to the callable")

    @field_validator("callable")
    @classmethod
    def _module_function(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", v):
            raise ValueError(f"{v!r} is not 'module:function' (e.g. proctor.scripted.file_agent:solve)")
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


ModelSpec = Annotated[Union[ReferenceModel, PythonModel, OpenAIModel, InspectModel], Field(discriminator="adapter")]


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
    metadata: JsonObject = Field(default_factory=dict)
    files: dict[str, str] = Field(default_factory=dict, description="workspace files for this sample: path → content")
    setup: str | None = Field(None, max_length=100_000, description="a shell script run as the sandbox's root in "
                              "the sample's folder before the agent starts (after the spec's setup steps)")

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

