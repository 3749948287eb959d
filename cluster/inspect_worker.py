"""The Inspect worker: a child process that loads an Inspect task or runs its eval loop.

    python -m cluster.inspect_worker describe    < job.json   → facts (JSON, last line of stdout)
    python -m cluster.inspect_worker run         < job.json   → the .eval log's path (JSON)

A job is `{"folder": where the task's files are, "task": ref, "args": {...},
"sample_ids": [...], "limit": N, "epochs": N, "model": "provider/name",
"model_args": {...}, "sandbox": [type, config] | null, "log_dir": ...}`.

Loading a task runs its module's code, so it happens here, in a process of its own with
a scrubbed environment (no provider keys, a private HOME) and a deadline set by the
caller, never in a control-plane actor. `describe` loads the task and reads its dataset
without running anything else: the sample ids (after `sample_ids` and `limit`), the
scorers' names, its epochs, and its sandbox (which Proctor must be able to honour).
`run` runs Inspect's own eval loop for the job's samples and writes one `.eval` log.
A failure is one JSON line `{"error": "..."}` and exit status 2.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Any

RESULT_PREFIX = "PROCTOR-RESULT "
PROGRESS_PREFIX = "PROCTOR-SAMPLE "


def _load(job: dict[str, Any]) -> Any:
    from inspect_ai._eval.loader import load_tasks

    os.chdir(job["folder"])
    sys.path.insert(0, job["folder"])
    tasks = load_tasks([job["task"]], task_args=job.get("args") or {})
    if len(tasks) != 1:
        raise LookupError(f"{job['task']!r} names {len(tasks)} tasks; name exactly one")
    return tasks[0]


def _sample_ids(task: Any, job: dict[str, Any]) -> list[str]:
    ids = [str(s.id) if s.id is not None else str(n) for n, s in enumerate(task.dataset, start=1)]
    if len(set(ids)) != len(ids):
        raise ValueError("its dataset's sample ids are not unique")
    wanted = job.get("sample_ids")
    if wanted:
        missing = [str(w) for w in wanted if str(w) not in set(ids)]
        if missing:
            raise LookupError(f"sample ids not in its dataset: {', '.join(missing[:10])}")
        keep = {str(w) for w in wanted}
        ids = [i for i in ids if i in keep]
    if job.get("limit"):
        ids = ids[: job["limit"]]
    return ids


def _sandbox(task: Any, folder: str) -> list[Any] | None:
    """[type, config]: config None, a file relative to the task's folder, or {"object": name}
    for a config object."""
    spec = task.sandbox
    if spec is None:
        return None
    config = spec.config
    if config is not None and not isinstance(config, str):
        return [spec.type, {"object": type(config).__name__}]
    if isinstance(config, str) and os.path.isabs(config) and config.startswith(folder.rstrip("/") + "/"):
        config = os.path.relpath(config, folder)
    return [spec.type, config]


def describe(job: dict[str, Any]) -> dict[str, Any]:
    from inspect_ai._util.registry import registry_unqualified_name

    task = _load(job)
    ids = _sample_ids(task, job)
    if not ids:
        raise ValueError("it has no samples to run")
    scorers = [registry_unqualified_name(s) for s in (task.scorer or [])]
    epochs = task.epochs if isinstance(task.epochs, int) else getattr(task.epochs, "epochs", 1)
    return {"task_name": task.name, "sample_ids": ids, "scorers": scorers, "epochs": int(epochs or 1),
            "sandbox": _sandbox(task, job["folder"]), "sample_sandboxes": _sample_sandboxes(task)}


def _sample_sandboxes(task: Any) -> list[list[str | None]]:
    """The distinct sandboxes the task's samples declare, each [type, kind of config]:
    kind None (no config), "dockerfile", "compose" or "other"."""
    found: set[tuple[str, str | None]] = set()
    for sample in task.dataset:
        spec = sample.sandbox
        if spec is None:
            continue
        config, kind = spec.config, None
        if isinstance(config, str):
            name = os.path.basename(config).lower()
            kind = "dockerfile" if "dockerfile" in name else "compose" if name.endswith((".yaml", ".yml")) else "other"
        elif config is not None:
            kind = "other"
        found.add((str(spec.type), kind))
    return [list(f) for f in sorted(found, key=str)]


def _report_samples() -> None:
    """A line on stdout for each sample × epoch Inspect finishes (the shard's live progress)."""
    from inspect_ai.hooks import Hooks, SampleEnd, hooks

    @hooks(name="proctor_progress", description="Proctor: one line per finished sample")
    class ProctorProgress(Hooks):
        async def on_sample_end(self, data: SampleEnd) -> None:
            print(PROGRESS_PREFIX + json.dumps({"sample_id": str(data.sample.id), "epoch": data.sample.epoch}),
                  flush=True)


ANTHROPIC_MAX_TOKENS = 16_384  # unless the task sets its own


def run(job: dict[str, Any]) -> dict[str, Any]:
    import inspect_ai

    _report_samples()
    task = _load(job)
    model_args = dict(job.get("model_args") or {})
    if job["model"].startswith("mockllm/"):  # offline: a script, or its default answer, with usage
        script = model_args.pop("script", None)
        model_args.setdefault("custom_outputs", _Script(script) if script else _mock_answer)
    given = job.get("sandbox")
    sandbox: Any = None if not given else given[0] if given[1] is None else tuple(given)
    if sandbox is not None:  # Proctor's config (checked at submission) replaces the samples' own
        for sample in task.dataset:
            sample.sandbox = None
    config: dict[str, Any] = {}
    if job["model"].startswith("anthropic/") and getattr(task, "config", None) is not None \
            and task.config.max_tokens is None:
        # the gateway answers whole (no streaming), and Anthropic's client refuses a
        # non-streamed request whose max_tokens could take over 10 minutes (> ~21k tokens)
        config["max_tokens"] = ANTHROPIC_MAX_TOKENS
    logs = inspect_ai.eval(
        task, model=job["model"], model_args=model_args,
        sample_id=[_typed(i, task) for i in job["sample_ids"]], epochs=job["epochs"],
        sandbox=sandbox, log_dir=job["log_dir"], log_format="eval", display="none",
        fail_on_error=False, retry_on_error=0, log_samples=True, max_samples=job.get("max_samples") or 8,
        max_sandboxes=job.get("max_samples") or 8, **config,
    )
    return {"logs": [log.location for log in logs], "status": [log.status for log in logs]}


def _mock_answer(input: Any, tools: Any, tool_choice: Any, config: Any) -> Any:
    """mockllm's default answer, carrying its usage: without usage Inspect counts the tokens
    with a tokenizer it downloads, and a worker reaches no network."""
    from inspect_ai.model import ModelOutput, ModelUsage

    output = ModelOutput.from_content("mockllm/model", "Default output from mockllm/model")
    output.usage = ModelUsage(input_tokens=10, output_tokens=5, total_tokens=15)
    return output


class _Script:
    """mockllm's answers from the spec (`model.args.script`): the n-th call of each sample ×
    epoch gets the n-th step, `{"content": text}` or `{"tool": name, "arguments": {...}}`
    (the last step again after the script ends). Each step carries its usage, as
    `_mock_answer`'s. Per sample, so samples run at once do not take each other's steps."""

    def __init__(self, steps: list[Any]):
        if not isinstance(steps, list) or not all(isinstance(s, dict) and ("content" in s or "tool" in s)
                                                  for s in steps):
            raise ValueError("model.args.script: a list of {content: text} or {tool: name, arguments: {...}}")
        self.steps = steps

    def __call__(self, input: Any, tools: Any, tool_choice: Any, config: Any) -> Any:
        from inspect_ai.model import ModelOutput, ModelUsage

        turn = sum(1 for m in input if getattr(m, "role", None) == "assistant")
        step = self.steps[min(turn, len(self.steps) - 1)]
        if "tool" in step:
            output = ModelOutput.for_tool_call("mockllm/model", str(step["tool"]), dict(step.get("arguments") or {}))
        else:
            output = ModelOutput.from_content("mockllm/model", str(step["content"]))
        output.usage = ModelUsage(input_tokens=10, output_tokens=5, total_tokens=15)
        return output


def _typed(sample_id: str, task: Any) -> Any:
    """The dataset's own id (Inspect compares ids by value: 3 is not '3')."""
    for n, s in enumerate(task.dataset, start=1):
        if (str(s.id) if s.id is not None else str(n)) == sample_id:
            return s.id if s.id is not None else n
    return sample_id


def main() -> int:
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    try:
        job = json.loads(sys.stdin.read())
        if command == "describe":
            out = describe(job)
        elif command == "run":
            out = run(job)
        else:
            raise ValueError(f"unknown command {command!r}; use describe or run")
    except BaseException as exc:  # the caller reads the cause from the last line
        if isinstance(exc, KeyboardInterrupt):
            raise
        traceback.print_exc(file=sys.stderr)
        print(RESULT_PREFIX + json.dumps({"error": f"{type(exc).__name__}: {exc}"[:2000]}), flush=True)
        return 2
    print(RESULT_PREFIX + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
