"""The sandboxes of one Inspect sample: one per service, on a private network of their own.

`ProviderHome` is what the provider keeps per process and per runtime: the runtime (its
sandboxes under `<home>/inspect/`), the image store, and where incidents go. A
`SampleSandboxes` starts its services' sandboxes (each running the harness in service
mode, `--service`), with their private network when two or more services share one
(`networks.py`: namespaces locally, a NetworkPolicy and a headless Service on
Kubernetes), watched by the policy's monitors; `close` removes all of it and never raises.
On Kubernetes an image goes to the node by its pinned reference (`pulled_image`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.images import ImageStore
from cluster.runtimes import LaunchRequest, SandboxError, SandboxLimits, SandboxRuntime, select_runtime
from cluster.runtimes.layout import SANDBOX_USER, harness_layout, injected_layout
from cluster.stopping import StopMarks
from eval_actors.launch import NOBODY, ImageRefused, image_problem, pulled_image
from eval_actors.inspect_sandbox.channel import ServiceChannel
from eval_actors.inspect_sandbox.networks import SampleNetwork, open_network
from proctor.compose import ProctorConfig, ServiceConfig
from eval_actors.inspect_sandbox.watch import ServiceWatch
from proctor.requests import ServiceStart
from proctor.settings import Settings, load_settings

log = logging.getLogger("proctor.inspect_sandbox")
SERVICE_OUTPUT_CAP = 1 << 40  # a service lives for many requests: each is bounded, the channel's total is not
DEFAULTS = SandboxLimits()
WORKSPACE = "/workspace"


class ProviderHome:
    """The runtime, images and folders of the provider in this process, one per runtime name."""

    _homes: dict[tuple[str, ...], "ProviderHome"] = {}
    _lock = threading.Lock()  # samples start on threads of their own

    def __init__(self, runtime: SandboxRuntime, images: ImageStore, root: Path):
        self.runtime = runtime
        self.images = images
        self.root = root
        self.workspaces = root / "workspaces"
        self.incidents = root / "incidents"
        self.workspaces.mkdir(parents=True, exist_ok=True)
        root.chmod(0o711)
        self.workspaces.chmod(0o711)

    @classmethod
    def get(cls, config: ProctorConfig) -> "ProviderHome":
        """This process's home for the config's runtime ('auto' picks gVisor, else
        bubblewrap) and home folder. Raises `RuntimeUnavailable` saying how to install a
        runtime: nothing runs unsandboxed."""
        settings = settings_of(config)
        runtime = config.runtime
        key: tuple[str, ...] = (runtime, str(settings.home))
        if runtime == "kubernetes":  # one per cluster and platform instance
            key += (str(settings.kubeconfig), settings.kube_namespace, settings.kube_instance)
        with cls._lock:
            return cls._homes.get(key) or cls._create(key, settings)

    @classmethod
    def _create(cls, key: tuple[str, ...], settings: Settings) -> "ProviderHome":
        root = root_of(settings)
        root.mkdir(parents=True, exist_ok=True)
        runtime = select_runtime(key[0], root / "runtimes", settings=settings)
        home = cls._homes[key] = cls(runtime, ImageStore.from_settings(settings), root)
        return home

    @classmethod
    def release(cls, config: ProctorConfig) -> None:
        """Forget this process's home for `config`, closing its runtime (its API client)."""
        with cls._lock:
            found = [k for k, h in cls._homes.items() if k[0] == config.runtime and k[1] == str(settings_of(config).home)]
            homes = [cls._homes.pop(k) for k in found]
        for home in homes:
            close = getattr(home.runtime, "close", None)
            if close is not None:
                close()

    def check_images(self, config: ProctorConfig) -> None:
        """Every service's image is in the store and can run the harness. Raises `ImageRefused`."""
        for name, svc in config.services.items():
            if svc.image and self.runtime.pulls_images:  # pinned, or in the store to pin it
                pulled_image(svc.image, self.images, True)
            elif svc.image:
                problem = image_problem(self._resolve(name, svc.image), agentic=True)
                if problem is not None:
                    raise ImageRefused(f"services.{name}.image {svc.image!r}: {problem}")

    def _resolve(self, service: str, ref: str) -> Any:
        """The image `ref` of `service`. Raises `ImageRefused` saying how to get it."""
        try:
            return self.images.resolve(ref)
        except Exception as exc:  # ImageError: not in the store
            raise ImageRefused(f"services.{service}.image: {exc}; import it with `proctor image import "
                               f"ARCHIVE --name {ref}` or build it with `proctor image build`") from None


def settings_of(config: ProctorConfig | None) -> Settings:
    settings = load_settings()
    if config is not None and config.home:
        settings = settings.model_copy(update={"home": Path(config.home)})
    return settings


def root_of(settings: Settings) -> Path:
    """Where the provider keeps its sandboxes, workspaces and incidents."""
    return settings.home / "inspect"


@dataclass
class Service:
    """One running service of a sample."""

    name: str
    config: ServiceConfig
    sandbox: Any
    channel: ServiceChannel
    watch: ServiceWatch
    start: ServiceStart


@dataclass
class SampleSandboxes:
    home: ProviderHome
    config: ProctorConfig
    key: str = field(default_factory=lambda: secrets.token_hex(5))
    services: dict[str, Service] = field(default_factory=dict)
    network: SampleNetwork | None = None
    _leases: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    _sandboxes: list[Any] = field(default_factory=list)

    async def start(self) -> None:
        """Start every service (the default one first in `services`). Raises `ImageRefused`,
        `NetworkError`, `SandboxError` or `SandboxEnded`, having removed what it made."""
        try:
            networked = self.config.networked()
            if networked:
                self.network = await open_network(self.home.runtime, self.key, networked,
                                                  (("proctor.dev/inspect-sample", self.key),))
            plans = {name: self._plan(name, svc) for name, svc in self.config.services.items()}
            order = [self.config.default_service(), *(n for n in plans if n != self.config.default_service())]
            started = await asyncio.gather(*(self._launch(name, *plans[name]) for name in order),
                                           return_exceptions=True)
            for result in started:
                if isinstance(result, BaseException):
                    raise result
            self.services = {name: self.services[name] for name in order}
        except BaseException:
            await self.close()
            raise

    def _claim(self, sandbox_id: str) -> None:
        """In a Proctor shard: no sandbox for an evaluation being stopped, and each one
        claimed for its evaluation first, so that the stop's killer finds it by name."""
        if not (self.config.evaluation and self.config.stops):
            return
        marks = StopMarks(Path(self.config.stops))
        if marks.requested(self.config.evaluation):
            raise SandboxError(f"evaluation {self.config.evaluation} is being stopped: no sandbox starts")
        marks.claim(self.config.evaluation, sandbox_id)

    def _plan(self, name: str, svc: ServiceConfig) -> tuple[LaunchRequest, ServiceStart]:
        runtime = self.home.runtime
        image, reference = None, None
        if svc.image and runtime.pulls_images:  # a node pulls it; the runtime injects the harness
            image, reference = pulled_image(svc.image, self.home.images, True)
        elif svc.image:
            self.home._resolve(name, svc.image)  # refused with how to import it
            image = self._leases.enter_context(self.home.images.lease(svc.image))
            problem = image_problem(image, agentic=True)
            if problem is not None:
                raise ImageRefused(f"services.{name}.image {svc.image!r}: {problem}")
        unprivileged = runtime.isolation == "weak"
        layout = injected_layout(unprivileged) if image is not None and reference is None \
            else harness_layout(unprivileged)
        sid = f"pxi-{self.key}-{list(self.config.services).index(name)}"
        workspace = self.home.workspaces / sid
        workspace.mkdir(mode=0o700)
        os.chown(workspace, SANDBOX_USER, SANDBOX_USER)
        joins = self.network.fields(name) if self.network is not None and name in self.network.services else {}
        request = LaunchRequest(
            sandbox_id=sid,
            argv=layout.argv(*(["--sandboxed"] if runtime.harness_root else []), "--service"),
            workspace=workspace,
            limits=SandboxLimits(cpus=svc.cpus or DEFAULTS.cpus, memory_bytes=svc.mem_limit or DEFAULTS.memory_bytes,
                                 pids=svc.pids_limit or DEFAULTS.pids, timeout_s=self.config.timeout_s,
                                 output_cap_bytes=SERVICE_OUTPUT_CAP),
            env=layout.env, ro_binds=layout.ro_binds,
            rootfs=image.rootfs if image is not None and reference is None else None, image=reference,
            labels=(("proctor.dev/inspect-sample", self.key), ("proctor.dev/service", name)),
            protocol="service", **joins,
        )
        own = image.config.user if image is not None and image.config.user and \
            image.config.user.partition(":")[0] not in ("root", "0") else None
        env = dict(image.config.env) if image is not None else {}
        start = ServiceStart(user=svc.user or own or (NOBODY if image is not None or reference else "nobody"),
                             cwd=svc.working_dir or WORKSPACE, env={**env, **svc.environment})
        return request, start

    async def _launch(self, name: str, request: LaunchRequest, start: ServiceStart) -> Service:
        self._claim(request.sandbox_id)
        sandbox = await self.home.runtime.launch(request)
        self._sandboxes.append(sandbox)
        watch = ServiceWatch(self.config.policy, sandbox, name, self.home.incidents)
        channel = ServiceChannel(sandbox, lambda: watch.reason)
        service = self.services[name] = Service(name, self.config.services[name], sandbox, channel, watch, start)
        watch.start()
        await channel.start(start)
        svc = self.config.services[name]
        if svc.command:  # the service's own program, in the background, as its user
            argv = svc.command if isinstance(svc.command, list) else ["/bin/sh", "-c", svc.command]
            await watch.check_command(argv)
            background = ["/bin/sh", "-c", 'nohup "$@" >/dev/null 2>&1 </dev/null &', "command", *argv]
            await channel.exec(background, timeout_s=30)
        return service

    async def close(self) -> None:
        """Stop and remove every sandbox, the network, the workspaces and the image leases.
        Never raises; safe to call twice."""
        for sandbox in self._sandboxes:
            with contextlib.suppress(Exception):
                await sandbox.kill("killed", "sample cleanup")
        for service in self.services.values():
            with contextlib.suppress(Exception):
                await service.watch.close()
            with contextlib.suppress(Exception):
                await service.channel.close()
        for sandbox in self._sandboxes:
            try:
                await sandbox.cleanup()
            except Exception as exc:  # noqa: BLE001 - cleanup goes on with the rest
                log.warning("sandbox %s: cleanup failed: %s", getattr(sandbox, "id", "?"), exc)
        self._sandboxes.clear()
        if self.network is not None:
            try:
                await self.network.close()
            except Exception as exc:  # noqa: BLE001 - reconciliation or cli_cleanup removes it
                log.warning("sample %s: the private network was not removed: %s", self.key, exc)
            else:
                self.network = None
        for i in range(len(self.config.services)):
            shutil.rmtree(self.home.workspaces / f"pxi-{self.key}-{i}", ignore_errors=True)
        with contextlib.suppress(Exception):
            self._leases.close()
