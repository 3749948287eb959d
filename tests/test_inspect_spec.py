"""The spec's Inspect block: validation, task files packed with the submission, the CLI's
`proctor submit task.py@name --model ...`, and loading a task at submission (a real Inspect
load in the worker process)."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import pytest

from cluster.inspect_tasks import describe_task
from proctor.inspect_cli import inspect_spec_of, is_task_ref
from proctor.inspect_spec import MAX_FILES, pack_task, task_spec
from proctor.spec import SpecError, load_spec, parse_spec

TASKS = Path(__file__).resolve().parent / "inspect_tasks"
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "inspect" / "bash_task.py"


def doc(**inspect: object) -> dict[str, object]:
    return {"name": "t", "model": {"adapter": "inspect", "model": "mockllm/model"},
            "inspect": {"task": "qa.py@qa", "files": {"qa.py": (TASKS / "qa.py").read_text()}, **inspect}}


def errors(data: dict[str, object]) -> dict[str, str]:
    with pytest.raises(SpecError) as caught:
        parse_spec(data)
    return dict(caught.value.errors)


def test_an_inspect_spec_is_valid_and_has_no_scorers_until_loaded() -> None:
    spec = parse_spec(doc(args={"samples": 3}, epochs=2))
    assert spec.dataset is None and spec.inspect is not None
    assert spec.inspect.task_file == "qa.py"
    assert spec.scorer_names() == []


@pytest.mark.parametrize("model, word", [("groq/llama-3", "not served"), ("gpt-4o", "provider/model"),
                                         ("hf/some/model", "not served")])
def test_a_model_the_gateway_does_not_serve_is_refused(model: str, word: str) -> None:
    data = doc()
    data["model"] = {"adapter": "inspect", "model": model}
    found = errors(data)
    assert any(word in reason and model in reason for reason in found.values()), found


def test_dataset_and_inspect_together_or_neither_are_refused() -> None:
    both = {**doc(), "dataset": {"samples": [{"input": "q"}]}}
    assert "exactly one of 'dataset'" in " ".join(errors(both).values())
    neither = {k: v for k, v in doc().items() if k != "inspect"}
    assert "exactly one of 'dataset'" in " ".join(errors(neither).values())


def test_an_inspect_task_refuses_proctor_scorers_epochs_and_a_non_inspect_model() -> None:
    assert "own solver and scorers" in " ".join(errors({**doc(), "scorers": [{"type": "exact"}]}).values())
    assert "inspect.epochs" in " ".join(errors({**doc(), "epochs": 3}).values())
    assert "local sandboxes" in " ".join(errors({**doc(), "sandbox": {"runtime": "kubernetes"}}).values())
    assert "adapter 'inspect'" in " ".join(errors({**doc(), "model": {"adapter": "reference"}}).values())
    native = {"name": "n", "model": {"adapter": "inspect", "model": "openai/gpt-4o"},
              "dataset": {"samples": [{"input": "q"}]}, "scorers": [{"type": "exact"}]}
    assert "runs Inspect tasks" in " ".join(errors(native).values())


@pytest.mark.parametrize("task", ["qa.py", "../qa.py@qa", "/abs/qa.py@qa", "qa.py@9bad", "justaname"])
def test_bad_task_references_are_refused_naming_them(task: str) -> None:
    found = errors(doc(task=task))
    assert "inspect.task" in found and task in found["inspect.task"]


def test_task_files_must_stay_inside_the_folder() -> None:
    found = errors(doc(files={"../evil.py": "x"}))
    assert "inspect.files" in found and "../evil.py" in found["inspect.files"]


def test_pack_task_takes_the_file_and_its_folder(tmp_path: Path) -> None:
    (tmp_path / "task.py").write_text("# task\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "rows.jsonl").write_text("{}\n")
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "x.py").write_text("skipped")
    (tmp_path / "blob.bin").write_bytes(b"\0")
    packed = pack_task(f"{tmp_path}/task.py@t")
    assert packed == {"task": "task.py@t", "files": {"task.py": "# task\n", "data/rows.jsonl": "{}\n"}}
    assert pack_task("inspect_evals/gsm8k") == {"task": "inspect_evals/gsm8k"}


def test_pack_task_is_bounded_and_names_the_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        pack_task(f"{tmp_path}/nothing.py@t")
    for i in range(MAX_FILES + 1):
        (tmp_path / f"f{i}.py").write_text("")
    with pytest.raises(ValueError, match=f"more than {MAX_FILES} files"):
        pack_task(f"{tmp_path}/f0.py@t")


def test_a_spec_file_packs_its_task_file_relative_to_itself(tmp_path: Path) -> None:
    (tmp_path / "qa.py").write_text((TASKS / "qa.py").read_text())
    (tmp_path / "spec.yaml").write_text("name: qa\nmodel: {adapter: inspect, model: mockllm/model}\n"
                                        "inspect: {task: qa.py@qa, args: {samples: 2}}\n")
    spec = load_spec(tmp_path / "spec.yaml")
    assert spec.inspect is not None and set(spec.inspect.files) == {"qa.py", "spec.yaml"}
    (tmp_path / "bad.yaml").write_text("name: qa\nmodel: {adapter: inspect, model: mockllm/model}\n"
                                       "inspect: {task: missing.py@qa}\n")
    with pytest.raises(SpecError, match="missing.py"):
        load_spec(tmp_path / "bad.yaml")


def _args(**given: object) -> argparse.Namespace:
    base = {"model": "mockllm/model", "task_arg": [], "model_arg": [], "epochs": None, "limit": None,
            "sample_id": None, "name": None, "image": None, "shard_size": None}
    return argparse.Namespace(**{**base, **given})


def test_the_cli_builds_a_spec_from_a_task_file() -> None:
    ref = f"{EXAMPLE}@square"
    assert is_task_ref(ref) and not is_task_ref("spec.yaml")
    spec = inspect_spec_of(ref, _args(task_arg=["samples=5"], epochs=2, shard_size=2, model_arg=["x=1"]))
    assert spec.name == "square" and spec.shard_size == 2
    assert spec.inspect is not None and spec.inspect.task == "bash_task.py@square"
    assert spec.inspect.args == {"samples": 5} and spec.inspect.epochs == 2
    assert spec.model.args == {"x": 1}  # type: ignore[union-attr]
    with pytest.raises(SpecError, match="needs --model"):
        inspect_spec_of(ref, _args(model=None))
    with pytest.raises(SpecError, match="not KEY=VALUE"):
        inspect_spec_of(ref, _args(task_arg=["samples"]))
    with pytest.raises(SpecError, match="not served"):
        inspect_spec_of(ref, _args(model="together/x"))


def _describe(**inspect: object) -> object:
    return asyncio.run(describe_task(parse_spec(doc(**inspect))))


def test_loading_a_task_counts_its_samples_and_names_its_scorers() -> None:
    spec = _describe(args={"samples": 7}, epochs=2)
    resolved = spec.inspect.resolved  # type: ignore[attr-defined]
    assert resolved.sample_ids == [f"q{i}" for i in range(7)]
    assert resolved.scorers == ["includes"] and resolved.epochs == 2 and not resolved.sandboxed
    assert spec.scorer_names() == ["includes"]  # type: ignore[attr-defined]
    picked = _describe(sample_ids=["q3", "q1"], args={"samples": 7}).inspect.resolved  # type: ignore[attr-defined]
    assert picked.sample_ids == ["q1", "q3"]
    assert _describe(limit=2).inspect.resolved.sample_ids == ["q0", "q1"]  # type: ignore[attr-defined]
    assert _describe(task="qa.py@numbered").inspect.resolved.sample_ids == ["1", "2", "3", "4"]  # type: ignore[attr-defined]


@pytest.mark.parametrize("task, files, why", [
    ("broken.py@broken", {"broken.py": (TASKS / "broken.py").read_text()}, "broken on purpose"),
    ("qa.py@nosuchtask", None, "nosuchtask"),
    ("missing.py@qa", None, "missing.py"),
    ("qa.py@composed", None, "cannot honour"),
    ("qa.py@qa", None, "not in its dataset"),
])
def test_a_task_that_cannot_be_loaded_is_a_spec_error_naming_it(task: str, files: dict[str, str] | None,
                                                                 why: str) -> None:
    extra = {"sample_ids": ["nope"]} if why == "not in its dataset" else {}
    with pytest.raises(SpecError) as caught:
        _describe(task=task, **({"files": files} if files else {}), **extra)
    field, reason = caught.value.errors[0]
    assert field == "inspect.task" and task in reason and why in reason, reason


def test_the_example_task_is_sandboxed_with_fifty_samples() -> None:
    spec = asyncio.run(describe_task(inspect_spec_of(f"{EXAMPLE}@square", _args())))
    resolved = spec.inspect.resolved  # type: ignore[union-attr]
    assert len(resolved.sample_ids) == 50 and resolved.sandboxed and resolved.scorers == ["includes"]


def test_task_spec_names_the_evaluation_after_the_task() -> None:
    data = task_spec(f"{EXAMPLE}@square", "mockllm/model", limit=3)
    assert data["name"] == "square" and data["inspect"]["limit"] == 3  # type: ignore[index]


def test_a_compose_file_proctor_cannot_honour_is_refused_at_submission() -> None:
    files = {"tools.py": (TASKS / "tools.py").read_text(),
             "compose.yaml": "services:\n  default:\n    build: .\n"}
    with pytest.raises(SpecError) as caught:
        _describe(task="tools.py@composed_shell", files=files)
    field, reason = caught.value.errors[0]
    assert field == "inspect.task" and "composed_shell" in reason and "build" in reason, reason


def test_samples_declaring_a_dockerfile_need_an_image_and_then_run_in_proctors_sandbox() -> None:
    with pytest.raises(SpecError) as caught:
        _describe(task="qa.py@dockerfiles")
    field, reason = caught.value.errors[0]
    assert field == "sandbox.image" and "qa.py@dockerfiles" in reason and "dockerfile" in reason, reason
    spec = asyncio.run(describe_task(parse_spec({**doc(task="qa.py@dockerfiles"), "sandbox": {"image": "task:1"}})))
    resolved = spec.inspect.resolved  # type: ignore[union-attr]
    assert resolved.sandboxed and resolved.sandbox_config is None and resolved.sample_ids == ["d0", "d1"]
