"""`proctor submit task.py@name --model ...`: an Inspect task (a file, or a registry name
such as `inspect_evals/gsm8k`) submitted directly.

The task file and its folder are packed into the spec (`proctor.inspect_spec.pack_task`);
`-T key=value` are task arguments and `-M key=value` model arguments, as in `inspect eval`
(values are read as YAML: `-T n=3` is a number).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import yaml

from .inspect_spec import task_spec
from .spec import EvaluationSpec, SpecError, parse_spec

_TASK_REF = re.compile(r"^[^@\s]+\.py@[A-Za-z_]\w*$")
_REGISTRY_NAME = re.compile(r"^[A-Za-z_][\w-]*/[A-Za-z_][\w-]*$")  # package/task, no file suffix


def is_task_ref(arg: str) -> bool:
    """'file.py@task' or 'package/registry_name' (not a file here)."""
    return bool(_TASK_REF.match(arg)) or (bool(_REGISTRY_NAME.match(arg)) and not Path(arg).exists())


def inspect_args(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("Inspect tasks (file.py@task_name)")
    group.add_argument("--model", help="an Inspect model string (openai/..., anthropic/..., mockllm/model)")
    group.add_argument("-T", "--task-arg", action="append", default=[], metavar="KEY=VALUE", help="a task argument")
    group.add_argument("-M", "--model-arg", action="append", default=[], metavar="KEY=VALUE",
                       help="a model argument")
    group.add_argument("--epochs", type=int, help="epochs (the task's own if unset)")
    group.add_argument("--limit", type=int, help="run only the first N samples")
    group.add_argument("--sample-id", action="append", help="run only this sample (repeatable)")
    group.add_argument("--name", help="the evaluation's name (the task's if unset)")
    group.add_argument("--image", help="the image the task's sandboxes run in")
    group.add_argument("--shard-size", type=int, help="samples per shard")


def _pairs(items: list[str], flag: str) -> dict[str, object]:
    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SpecError([(flag, f"{item!r} is not KEY=VALUE")])
        out[key] = yaml.safe_load(value) if value else ""
    return out


def inspect_spec_of(ref: str, args: argparse.Namespace) -> EvaluationSpec:
    """The spec `proctor submit` sends for an Inspect task file. Raises `SpecError`."""
    if not args.model:
        raise SpecError([("--model", f"submitting the Inspect task {ref!r} needs --model (an Inspect model "
                          "string, e.g. openai/gpt-4o or mockllm/model)")])
    try:
        doc = task_spec(ref, args.model, args=_pairs(args.task_arg, "-T"), epochs=args.epochs, limit=args.limit,
                        sample_ids=args.sample_id, name=args.name)
    except ValueError as exc:
        raise SpecError([("inspect.task", str(exc))], ref) from None
    model_args = _pairs(args.model_arg, "-M")
    if model_args:
        doc["model"]["args"] = model_args
    if args.image:
        doc["sandbox"] = {"image": args.image}
    if args.shard_size:
        doc["shard_size"] = args.shard_size
    return parse_spec(doc, ref)
