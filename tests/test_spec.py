"""The evaluation spec: valid documents load; every invalid one names its field and why."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from proctor.spec import EvaluationSpec, SpecError, load_spec, parse_spec, parse_size

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def minimal(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": "t",
        "model": {"adapter": "reference"},
        "dataset": {"samples": [{"input": "1+1?", "target": "2"}]},
        "scorers": [{"type": "exact"}],
    }
    doc.update(changes)
    return doc


def errors_of(doc: Any) -> dict[str, str]:
    with pytest.raises(SpecError) as info:
        parse_spec(doc)
    return dict(info.value.errors)


def test_minimal_spec_gets_strict_defaults() -> None:
    spec = parse_spec(minimal())
    assert spec.version == 1
    assert spec.sandbox.runtime == "auto"
    assert spec.sandbox.memory == 1024**3
    assert spec.sandbox.pids == 128
    assert spec.safety.max_turns == 20


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_examples_are_valid(path: Path) -> None:
    assert isinstance(load_spec(path), EvaluationSpec)


def test_unknown_field_is_refused_with_its_path() -> None:
    errs = errors_of(minimal(sandbox={"memroy": "1Gi"}))
    assert "sandbox.memroy" in errs
    assert "unknown field" in errs["sandbox.memroy"]


def test_unknown_gpu_type_lists_the_known_ones() -> None:
    errs = errors_of(minimal(sandbox={"runtime": "kubernetes", "gpu": {"count": 1, "type": "H1OO"}}))
    assert errs["sandbox.gpu.type"].startswith("'H1OO' is not a known GPU type; known: ")
    assert "H100" in errs["sandbox.gpu.type"]


def test_gpu_on_a_local_runtime_is_refused() -> None:
    errs = errors_of(minimal(sandbox={"runtime": "gvisor", "gpu": {"count": 1, "type": "H100"}}))
    assert any("cannot give GPUs" in r for r in errs.values())


def test_bad_sizes_and_ranges_name_the_field() -> None:
    errs = errors_of(minimal(sandbox={"memory": "12 potatoes", "pids": 0}, epochs=0,
                             model={"adapter": "reference", "error_rate": 1.5}))
    assert "is not a size" in errs["sandbox.memory"]
    assert "greater than or equal to 8" in errs["sandbox.pids"]
    assert "greater than or equal to 1" in errs["epochs"]
    assert "less than or equal to 1" in errs["model.error_rate"]


def test_values_of_the_wrong_json_type_are_refused_not_converted() -> None:
    # what the published schema refuses, the API refuses too: a boolean is not an integer,
    # a string is not a number or a boolean
    errs = errors_of(minimal(dataset={"samples": [{"id": False, "input": "1+1?", "target": "2"}]},
                             epochs=True, agentic="yes", shard_size="5"))
    assert set(errs) >= {"epochs", "agentic", "shard_size"}
    assert any(path.startswith("dataset.samples.0.id") for path in errs)
    assert "valid integer" in errs["epochs"] and "valid boolean" in errs["agentic"]
    assert parse_spec(minimal(epochs=2, sandbox={"timeout_s": 30})).sandbox.timeout_s == 30.0  # int → float stays


def test_unknown_adapter_and_scorer_are_named() -> None:
    errs = errors_of(minimal(model={"adapter": "gpt"}, scorers=[{"type": "bleu"}]))
    assert "model" in errs and "adapter" in errs["model"]
    assert "scorers.0" in errs and "type" in errs["scorers.0"]


def test_missing_fields_are_named() -> None:
    errs = errors_of({"name": "t"})
    assert errs["model"] == "required field is missing"
    assert errs["dataset"] == "required field is missing"
    assert errs["scorers"] == "required field is missing"


def test_dataset_needs_exactly_one_source() -> None:
    errs = errors_of(minimal(dataset={"samples": [{"input": "x"}], "path": "a.jsonl"}))
    assert "exactly one of" in errs["dataset"]
    errs = errors_of(minimal(dataset={"path": "a.csv"}))
    assert ".jsonl or .parquet" in errs["dataset"]


def test_workspace_paths_cannot_escape() -> None:
    errs = errors_of(minimal(sandbox={"files": {"../etc/passwd": "x"}}))
    assert "inside the workspace" in errs["sandbox.files"]
    errs = errors_of(minimal(dataset={"samples": [{"input": "x", "files": {"/abs": "x"}}]}))
    assert "inside the workspace" in errs["dataset.samples.0.files"]


def test_sandbox_image_takes_a_reference_in_one_of_four_forms() -> None:
    digest = "sha256:" + "a" * 64
    for ref in ("ctf-task", "ctf-task:1", "ghcr.io/lab/ctf-task:1.0", "localhost:5000/ctf", digest, f"ctf@{digest}",
                f"ghcr.io/lab/ctf:1@{digest}"):
        assert parse_spec(minimal(sandbox={"image": ref})).sandbox.image == ref
    assert parse_spec(minimal()).sandbox.image is None
    for ref, reason in [("CTF Task", "'CTF Task' is not an image reference: name part 'CTF Task' must be lower-case"),
                        ("sha256:abc", "'sha256:abc' is not a digest: write sha256: and 64 lower-case hex digits"),
                        ("ctf@sha256:xyz", "'ctf@sha256:xyz': 'sha256:xyz' after '@' is not a digest"),
                        ("ctf:bad tag", "'ctf:bad tag': tag 'bad tag' must be letters, digits"),
                        ("", "an image reference is needed; write name, name:tag, sha256:<64 hex digits> or "
                             "name@sha256:<64 hex digits>")]:
        assert errors_of(minimal(sandbox={"image": ref}))["sandbox.image"].startswith(reason), ref
    assert "valid string" in errors_of(minimal(sandbox={"image": 5}))["sandbox.image"]


def test_image_references_are_normalised_as_docker_shows_them() -> None:
    from proctor.imageref import parse_image_ref

    assert parse_image_ref("docker.io/library/debian:12").named == "debian:12"
    assert parse_image_ref("index.docker.io/lab/task").named == "lab/task:latest"
    ref = parse_image_ref("localhost:5000/task@sha256:" + "0" * 64)
    assert (ref.name, ref.tag, ref.pinned, ref.named) == ("localhost:5000/task", None, True, "localhost:5000/task:latest")
    assert str(ref) == "localhost:5000/task@sha256:" + "0" * 64
    assert not parse_image_ref("sha256:" + "0" * 64).pinned


def test_bad_regex_and_callable_are_explained() -> None:
    errs = errors_of(minimal(scorers=[{"type": "regex", "pattern": "(unclosed"}],
                             model={"adapter": "python", "callable": "not a callable"}))
    assert "does not compile" in errs["scorers.0.pattern"]
    assert "'module:function'" in errs["model.callable"]


def test_duplicate_scorer_names_and_sample_ids() -> None:
    errs = errors_of(minimal(scorers=[{"type": "exact"}, {"type": "exact"}]))
    assert any("unique" in r for r in errs.values())
    errs = errors_of(minimal(dataset={"samples": [{"id": 1, "input": "a"}, {"id": 1, "input": "b"}]}))
    assert any("unique" in r for r in errs.values())


def test_future_version_is_refused() -> None:
    errs = errors_of(minimal(version=7))
    assert any("version 7 is not supported" in r for r in errs.values())


def test_not_a_mapping() -> None:
    assert "mapping" in errors_of(["a", "list"])["(spec)"]


def test_sizes() -> None:
    assert parse_size("512Mi") == 512 * 1024**2
    assert parse_size("2G") == 2 * 1000**3
    assert parse_size(1024) == 1024
    with pytest.raises(ValueError):
        parse_size("-1")


def test_yaml_and_json_files_load_and_relative_dataset_paths_follow_the_file(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text('{"input": "x", "target": "y"}\n')
    doc = minimal(dataset={"path": "d.jsonl"})
    (tmp_path / "s.json").write_text(json.dumps(doc))
    spec = load_spec(tmp_path / "s.json")
    assert spec.dataset.path == str(tmp_path / "d.jsonl")
    (tmp_path / "bad.yaml").write_text("name: [unclosed")
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path / "bad.yaml")
    assert "not valid YAML" in str(info.value)
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path / "missing.yaml")
    assert "cannot read" in str(info.value)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proctor.cli", *args], capture_output=True, text=True)


def test_cli_schema_prints_the_json_schema() -> None:
    result = _cli("schema")
    assert result.returncode == 0
    schema = json.loads(result.stdout)
    assert schema["title"] == "EvaluationSpec"
    assert {"model", "dataset", "scorers", "sandbox"} <= set(schema["properties"])


def test_cli_validate_exit_codes(tmp_path: Path) -> None:
    good = _cli("validate", str(EXAMPLES / "arithmetic.yaml"), "--json")
    assert good.returncode == 0 and json.loads(good.stdout)["valid"] is True
    (tmp_path / "bad.yaml").write_text("name: t\nmodel: {adapter: reference}\nscorers: []\nbogus: 1\n")
    bad = _cli("validate", str(tmp_path / "bad.yaml"), "--json")
    assert bad.returncode == 2
    fields = {e["field"] for e in json.loads(bad.stdout)["errors"]}
    assert {"bogus", "dataset", "scorers"} <= fields
