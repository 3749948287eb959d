"""`sandbox="proctor"`: Proctor's sandboxes as an Inspect AI sandbox environment.

Each sample gets one sandbox per service of its configuration (`proctor.compose`): gVisor
by default (bubblewrap where gVisor cannot run; never none; or a pod each with
`runtime: kubernetes`), no network, or a private one shared by the sample's services only. Inspect's `exec`, `read_file` and `write_file`
become requests on the sandbox's one channel (`proctor.requests`), served by the harness
inside; every command passes the safety policy's rules first and runs under its monitors,
and a safety stop fails the sample with an error that names the incident.

The errors are Inspect's: `TimeoutError`, `PermissionError`, `FileNotFoundError`,
`IsADirectoryError`, `UnicodeDecodeError`, `OutputLimitExceededError`,
`SandboxUnavailableError` (the sandbox is gone), and `SafetyStopped` (a `RuntimeError`).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Literal, Union, overload

from inspect_ai.util import (
    ExecResult,
    OutputLimitExceededError,
    SandboxEnvironment,
    SandboxEnvironmentConfigType,
    SandboxEnvironmentLimits,
    sandboxenv,
)
from inspect_ai.util._sandbox.environment import SandboxUnavailableError
from pydantic import BaseModel

from eval_actors.inspect_sandbox.channel import SandboxEnded
from proctor.compose import CONFIG_FILES, ProctorConfig, load_config
from eval_actors.inspect_sandbox.sample import ProviderHome, SampleSandboxes, Service
from proctor.requests import RequestFailed

log = logging.getLogger("proctor.inspect_sandbox")
SAMPLE_MEMORY = 1024**3  # what one sample's sandbox is given by default (SandboxLimits)


@sandboxenv(name="proctor")
class ProctorSandboxEnvironment(SandboxEnvironment):
    """One service of a sample: a Proctor sandbox serving Inspect's requests."""

    def __init__(self, service: Service, sample: SampleSandboxes):
        super().__init__()
        self.service = service
        self.sample = sample

    # ------------------------------------------------------------ the lifecycle

    @classmethod
    def config_files(cls) -> list[str]:
        return list(CONFIG_FILES)

    @classmethod
    def default_concurrency(cls) -> int | None:
        """Samples at once that this machine can give their sandboxes to: its CPUs, and
        its memory at the default 1 GiB a sandbox."""
        cpus = os.cpu_count() or 1
        try:
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            memory = SAMPLE_MEMORY * cpus
        return max(1, min(cpus * 2, memory // SAMPLE_MEMORY))

    @classmethod
    def config_deserialize(cls, config: dict[str, Any]) -> BaseModel:
        return ProctorConfig.model_validate(config)

    @classmethod
    async def task_init(cls, task_name: str, config: SandboxEnvironmentConfigType | None) -> None:
        """Check the configuration, that a sandbox runtime exists and that every image is
        in the store, before any sample starts."""
        cfg = load_config(config)
        ProviderHome.get(cfg).check_images(cfg)

    @classmethod
    async def sample_init(cls, task_name: str, config: SandboxEnvironmentConfigType | None,
                          metadata: dict[str, str]) -> dict[str, SandboxEnvironment]:
        cfg = load_config(config)
        home = await asyncio.to_thread(ProviderHome.get, cfg)
        sample = SampleSandboxes(home, cfg)
        await sample.start()
        return {name: cls(service, sample) for name, service in sample.services.items()}

    @classmethod
    async def sample_cleanup(cls, task_name: str, config: SandboxEnvironmentConfigType | None,
                             environments: dict[str, SandboxEnvironment], interrupted: bool) -> None:
        samples = {id(env.sample): env.sample for env in environments.values() if isinstance(env, cls)}
        for sample in samples.values():
            try:
                await sample.close()
            except BaseException as exc:  # noqa: BLE001 - sample_cleanup never raises
                log.warning("proctor sample cleanup: %s", exc)

    @classmethod
    async def task_cleanup(cls, task_name: str, config: SandboxEnvironmentConfigType | None, cleanup: bool) -> None:
        """Nothing outlives its sample (sample_cleanup removes it all)."""

    @classmethod
    async def cli_cleanup(cls, id: str | None) -> None:
        """`inspect sandbox cleanup proctor`: remove every sandbox, network namespace and
        workspace the provider left on this machine (an interrupted run's), and its pods,
        policies and Services in the cluster that `PROCTOR_KUBECONFIG` names."""
        from cluster.runtimes import SandboxError
        from eval_actors.inspect_sandbox.leftovers import remove_leftovers, remove_pod_leftovers

        removed = await asyncio.to_thread(remove_leftovers)
        try:
            removed += await remove_pod_leftovers()
        except SandboxError as exc:
            print(f"proctor: could not remove the provider's pods: {exc}")
        print(f"proctor: removed {len(removed)} leftover(s)" + (f": {', '.join(removed)}" if removed else ""))

    # ------------------------------------------------------------ requests

    async def exec(self, cmd: list[str], input: str | bytes | None = None, cwd: str | None = None,
                   env: dict[str, str] | None = None, user: str | None = None, timeout: int | None = None,
                   timeout_retry: bool = True, concurrency: bool = True) -> ExecResult[str]:
        watch = self.service.watch
        await watch.check_command(cmd)
        limit = SandboxEnvironmentLimits.MAX_EXEC_OUTPUT_SIZE
        stdin = input.encode() if isinstance(input, str) else input
        try:
            out = await self.service.channel.exec(list(cmd), stdin, cwd, env, user, timeout, limit)
        except RequestFailed as exc:
            if exc.kind == "unknown_user":
                return ExecResult(False, 126, "", f"unable to find user {user}: {exc}\n")
            if exc.kind == "permission":
                raise PermissionError(str(exc)) from None
            raise RuntimeError(f"proctor: exec failed: {exc}") from None
        except SandboxEnded as exc:
            raise self._gone(exc) from None
        if out.timed_out:
            raise TimeoutError(f"command timed out after {timeout} seconds: {cmd[0]}")
        stdout, stderr = out.stdout.decode("utf-8", "replace"), out.stderr.decode("utf-8", "replace")
        if out.message and out.returncode in (126, 127):  # it could not start: the reason is its stderr
            stderr += out.message + "\n"
        await watch.check_output(stdout + stderr)
        if out.stdout_bytes > limit or out.stderr_bytes > limit:
            raise OutputLimitExceededError(SandboxEnvironmentLimits.MAX_EXEC_OUTPUT_SIZE_STR,
                                           stdout if out.stdout_bytes > limit else stderr)
        code = 128 - out.returncode if out.returncode < 0 else out.returncode  # killed by signal N: 128+N, as a shell says
        return ExecResult(code == 0, code, stdout, stderr)

    async def write_file(self, file: str, contents: str | bytes) -> None:
        self.service.watch.raise_if_stopped()
        data = contents.encode("utf-8") if isinstance(contents, str) else contents
        try:
            await self.service.channel.write_file(file, data)
        except RequestFailed as exc:
            raise _file_error(exc, file) from None
        except SandboxEnded as exc:
            raise self._gone(exc) from None

    @overload
    async def read_file(self, file: str, text: Literal[True] = True) -> str: ...

    @overload
    async def read_file(self, file: str, text: Literal[False]) -> bytes: ...

    async def read_file(self, file: str, text: bool = True) -> Union[str, bytes]:
        self.service.watch.raise_if_stopped()
        limit = SandboxEnvironmentLimits.MAX_READ_FILE_SIZE
        try:
            data = await self.service.channel.read_file(file, limit)
        except RequestFailed as exc:
            if exc.kind == "too_large":
                raise OutputLimitExceededError(SandboxEnvironmentLimits.MAX_READ_FILE_SIZE_STR, None) from None
            raise _file_error(exc, file) from None
        except SandboxEnded as exc:
            raise self._gone(exc) from None
        return data.decode("utf-8") if text else data

    def _gone(self, exc: SandboxEnded) -> Exception:
        """The error for a request to a sandbox that has ended: the safety stop's, naming
        its incident, or Inspect's 'unavailable'."""
        self.service.watch.raise_if_stopped()
        return SandboxUnavailableError(f"proctor service {self.service.name!r}: {exc}")


def _file_error(exc: RequestFailed, file: str) -> Exception:
    message = str(exc) if file in str(exc) else f"{file}: {exc}"
    kinds: dict[str, type[Exception]] = {"not_found": FileNotFoundError, "permission": PermissionError,
                                         "is_a_directory": IsADirectoryError}
    return kinds.get(exc.kind, RuntimeError)(message)
