"""Inspect tasks from the platform's side: their files on disk, the worker process, and
what loading a task tells (`describe_task`, the submission's validation).

The worker (`cluster.inspect_worker`) runs in a process of its own session with a
scrubbed environment: PATH, a private HOME, the Python path, and what the caller adds
(the gateway's base URLs and grant); never the platform's or a provider's credentials.
`WorkerProcess.kill` ends its whole process group.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from collections.abc import Callable
from typing import Any

from proctor.inspect_spec import InspectResolved, InspectTask
from proctor.spec import EvaluationSpec, SpecError

from .inspect_worker import PROGRESS_PREFIX, RESULT_PREFIX

DESCRIBE_TIMEOUT_S = 120.0
MAX_WORKER_OUTPUT = 4 * 1024**2
MAX_LINE = 64 * 1024
# sandboxes a task may declare that Proctor runs as its own (the spec's sandbox settings apply)
HONOURED_SANDBOXES = ("proctor", "docker", "local")


class WorkerError(RuntimeError):
    """The worker failed or said why it could not do its job. Caught by `describe_task`
    (a `SpecError`) and the Inspect shard runner (a failed shard)."""


def materialize(task: InspectTask, folder: Path) -> Path:
    """Write the task's files under `folder` (made if needed); returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    for rel, content in task.files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    return folder


def worker_env(home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The worker's whole environment: nothing of this process's but PATH and the Python path."""
    pythonpath = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "PYTHONPATH": pythonpath,
            "INSPECT_DISPLAY": "none", "INSPECT_LOG_LEVEL": "warning", "PYTHONUNBUFFERED": "1",
            "LANG": "C.UTF-8", **(extra or {})}


class WorkerProcess:
    """One running worker. `result()` waits for its answer; `kill()` ends it and its children."""

    def __init__(self, proc: asyncio.subprocess.Process):
        self.proc = proc
        self.stderr = b""

    @classmethod
    async def start(cls, command: str, job: dict[str, Any], env: dict[str, str], cwd: Path,
                    pid_file: Path | None = None) -> "WorkerProcess":
        """Start a worker in `cwd`; its process group is written to `pid_file` (for
        `reap_workers` after the caller's death). It is killed if the caller dies."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cluster.inspect_worker", command, cwd=str(cwd), env=env,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            start_new_session=True, preexec_fn=_die_with_parent)
        if pid_file is not None:
            pid_file.write_text(str(proc.pid))
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(job).encode())
        proc.stdin.close()
        return cls(proc)

    async def result(self, on_progress: Callable[[str, int], None] | None = None) -> dict[str, Any]:
        """The worker's answer; `on_progress(sample_id, epoch)` for each sample it finishes
        meanwhile. Raises `WorkerError` with its reason."""
        assert self.proc.stdout is not None and self.proc.stderr is not None
        errors = asyncio.ensure_future(self._tail(self.proc.stderr))
        last: str | None = None
        try:
            async for raw in self.proc.stdout:
                line = raw[:MAX_LINE].decode("utf-8", "replace").rstrip("\n")
                if line.startswith(RESULT_PREFIX):
                    last = line[len(RESULT_PREFIX):]
                elif line.startswith(PROGRESS_PREFIX) and on_progress is not None:
                    _progress(line[len(PROGRESS_PREFIX):], on_progress)
            await self.proc.wait()
        finally:
            self.stderr = await errors
        if last is None:
            tail = self.stderr.decode("utf-8", "replace").strip().splitlines()[-3:]
            raise WorkerError(f"the Inspect worker exited {self.proc.returncode} without an answer"
                              + (f": {' | '.join(tail)}" if tail else ""))
        try:
            answer = json.loads(last)
        except ValueError:
            raise WorkerError("the Inspect worker's answer is not JSON") from None
        if not isinstance(answer, dict):
            raise WorkerError("the Inspect worker's answer is not an object")
        if "error" in answer:
            raise WorkerError(str(answer["error"]))
        return answer

    @staticmethod
    async def _tail(stream: asyncio.StreamReader) -> bytes:
        kept = b""
        while chunk := await stream.read(1 << 16):
            kept = (kept + chunk)[-MAX_WORKER_OUTPUT:]
        return kept

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.returncode is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    async def wait_dead(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False


def _progress(text: str, on_progress: Callable[[str, int], None]) -> None:
    try:
        item = json.loads(text)
        on_progress(str(item["sample_id"]), int(item["epoch"]))
    except (ValueError, KeyError, TypeError):
        pass  # a progress line is a live view only; the rows come from the log


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the thread that started it ends (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def reap_workers(folders: list[Path]) -> int:
    """Kill the process groups of the workers whose `worker.pid` is in `folders` (left by a
    previous life of their supervisor), then the sandboxes their shard's provider home
    holds (`provider_home`). Returns how many workers and sandboxes were alive."""
    killed = 0
    for folder in folders:
        killed += _kill_worker(folder)
        killed += reap_sandboxes(provider_home(folder))
    return killed


def reap_owner_workers(workdir: Path) -> int:
    """Everything of Inspect shards that an owner of `workdir` (a supervisor, gone) left: the
    workers, their providers' sandboxes, and their folders (`<runtime>/inspect-*`). Before
    the runtimes reap the owner's own sandboxes (`cluster.runtimes.reap_owner`)."""
    folders = [w for d in workdir.iterdir() if d.is_dir() for w in d.glob("inspect-*")] if workdir.is_dir() else []
    killed = reap_workers(folders)
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
    return killed


def provider_home(folder: Path) -> Path:
    """The Proctor home the shard's Inspect provider works in: its own sandboxes, workspaces
    and incidents (`<home>/inspect/...`), the platform's images (a link)."""
    return folder / "proctor-home"


def make_provider_home(folder: Path, images_dir: Path) -> Path:
    home = provider_home(folder)
    home.mkdir(parents=True, exist_ok=True)
    home.chmod(0o711)  # the sandbox user must reach its workspaces
    link = home / "images"
    if not link.exists():
        images_dir.mkdir(parents=True, exist_ok=True)
        link.symlink_to(images_dir, target_is_directory=True)
    return home


def reap_sandboxes(home: Path) -> int:
    """Kill the sandboxes the provider made under `home` (only this shard's)."""
    from .runtimes import LOCAL_RUNTIMES, RuntimeUnavailable, select_runtime

    folder = home / "inspect" / "runtimes"
    if not folder.is_dir():
        return 0
    killed = 0
    for name, cls in LOCAL_RUNTIMES.items():
        try:
            cls.check()
        except RuntimeUnavailable:
            continue
        killed += len(select_runtime(name, folder).reap())
    return killed


def _kill_worker(folder: Path) -> int:
    try:
        pgid = int((folder / "worker.pid").read_text())
    except (OSError, ValueError):
        return 0
    try:
        os.killpg(pgid, signal.SIGKILL)
        return 1
    except (ProcessLookupError, PermissionError):
        return 0


def job_of(task: InspectTask, folder: Path, **more: Any) -> dict[str, Any]:
    ref = task.task
    return {"folder": str(folder), "task": ref, "args": task.args, "sample_ids": task.sample_ids,
            "limit": task.limit, **more}


async def describe_task(spec: EvaluationSpec, timeout_s: float = DESCRIBE_TIMEOUT_S) -> EvaluationSpec:
    """Load the spec's Inspect task in a worker (nothing else runs) and return the spec with
    `inspect.resolved` filled in: its sample ids, scorers, epochs. Raises `SpecError` naming
    the task when it cannot be found or loaded, has no samples, or declares a sandbox
    Proctor cannot honour."""
    task = spec.inspect
    assert task is not None
    with tempfile.TemporaryDirectory(prefix="proctor-inspect-") as tmp:
        folder = materialize(task, Path(tmp) / "task")
        home = Path(tmp) / "home"
        home.mkdir()
        worker = await WorkerProcess.start("describe", job_of(task, folder), worker_env(home), folder)
        try:
            facts = await asyncio.wait_for(worker.result(), timeout_s)
        except asyncio.TimeoutError:
            worker.kill()
            await worker.wait_dead(5)
            raise SpecError([("inspect.task", f"task {task.task!r} did not load within {timeout_s:g} s")]) from None
        except WorkerError as exc:
            raise SpecError([("inspect.task", f"task {task.task!r} cannot be loaded: {exc}")]) from None
        finally:
            worker.kill()
    sandbox = facts.get("sandbox")
    config = _sandbox_config(task, sandbox) if sandbox else None
    per_sample = not sandbox and _sample_sandboxes(spec, facts.get("sample_sandboxes") or [])
    resolved = InspectResolved(task_name=str(facts["task_name"]), sample_ids=[str(i) for i in facts["sample_ids"]],
                               scorers=[str(s) for s in facts["scorers"]],
                               epochs=task.epochs or int(facts.get("epochs") or 1),
                               sandboxed=bool(sandbox) or per_sample, sandbox_config=config)
    if not resolved.scorers:
        raise SpecError([("inspect.task", f"task {task.task!r} has no scorer; Proctor needs at least one")])
    return spec.model_copy(update={"inspect": task.model_copy(update={"resolved": resolved})})


def _sample_sandboxes(spec: EvaluationSpec, declared: list[list[Any]]) -> bool:
    """Whether the task's samples declare sandboxes (with no task-wide one), which Proctor
    replaces with its own: one service with the spec's `sandbox`. A sample's Dockerfile or
    compose file is not built (Proctor builds none): the spec must name an image made for
    it (`sandbox.image`). Raises `SpecError` naming the task and the fix."""
    task = spec.inspect
    assert task is not None
    for kind, config in declared:
        where = f"task {task.task!r}: its samples declare sandbox {kind!r}"
        if kind not in HONOURED_SANDBOXES:
            raise SpecError([("inspect.task", f"{where}, which Proctor cannot honour: its tools run in Proctor's "
                              "sandboxes; declare sandbox 'proctor' or 'docker'")])
        if config is not None and spec.sandbox.image is None:
            raise SpecError([("sandbox.image", f"{where} with a {config} config, which Proctor does not build: "
                              "give sandbox.image, a Proctor image of the same environment (proctor image build "
                              "a recipe, or import the image built from it)")])
    return bool(declared)


def _sandbox_config(task: InspectTask, sandbox: list[Any]) -> str | None:
    """The task's sandbox config file (relative to its folder) if Proctor can honour it:
    none, or a compose-shaped file among the task's files that Proctor's provider accepts
    (`proctor.compose`). Raises `SpecError` naming the task and what is refused."""
    kind, config = sandbox[0], sandbox[1]
    where = f"task {task.task!r} declares sandbox {kind!r}"
    if kind not in HONOURED_SANDBOXES:
        raise SpecError([("inspect.task", f"{where}, which Proctor cannot honour: its tools run in Proctor's "
                          f"sandboxes; declare sandbox 'proctor' or 'docker' (no config, or a compose file)")])
    if config is None:
        return None
    if not isinstance(config, str) or config not in task.files:
        raise SpecError([("inspect.task", f"{where} with config {config!r}, which Proctor cannot honour: give a "
                          "compose file beside the task file (it travels with it), not a config object")])
    import yaml

    from proctor.compose import ConfigError, parse_config

    try:
        parse_config(yaml.safe_load(task.files[config]), where=config)
    except (ConfigError, yaml.YAMLError) as exc:
        raise SpecError([("inspect.task", f"{where}, which Proctor cannot honour: {exc}")]) from None
    return config
