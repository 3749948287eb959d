"""The `kubernetes` runtime: one hardened pod per shard, driven through its attach stream.

Launch: the sandbox's own NetworkPolicy (no ingress; egress only to the spec's
allowlist), then the pod (`podspec.py`), owned by the platform instance's anchor
ConfigMap; then its status is followed (the runtime's one `PodInformer`) until the container runs — an
unschedulable pod is given `kube_pending_timeout_s`, an image that cannot be pulled or
a container that cannot be created fails at once, a placed pod still not running after
`kube_pending_timeout_s` fails as soon as its events say why (its sandbox or a volume
cannot be made), and either way the pod is deleted and
the launch raises `SandboxError` with the cluster's reason. Then the attach stream opens
(`podattach.py`) and the workspace goes first on it (`proctor.podentry`), followed by
the runner protocol: events from stdout, messages to stdin, like any local sandbox.

`kill()` deletes the pod with a grace period of `KILL_GRACE_S` and returns once it is gone:
the API server keeps a gracefully deleted pod until its kubelet has stopped the container
(SIGTERM, SIGKILL when the grace ends), so gone means dead; a forced delete (no grace)
would remove the object at once while the container still ran. A pod its node never
confirms (the node is away) is deleted by force after `KILL_CONFIRM_S`. `wait()` reads how
the container ended (OOMKilled → oom, evicted → killed, DeadlineExceeded → deadline);
`cleanup()` deletes the pod and its policy, tolerating what is already gone. Pods are
never restarted. `reconcile()` deletes the pods of this platform instance that no live
shard owns. `stats()` reads the metrics API (memory, and CPU seconds summed from its
per-scrape CPU rates) and `trace_log` is None: there is no strace in a pod.

Artifacts come back inline in their `artifact` events (the shard asks for it: the host
cannot read a pod's workspace), in pieces of `INLINE_ARTIFACT_BYTES`, up to 3/8 of the
shard's output cap in all (the executor's `inline_budget`); the ones beyond that, and the
files a safety-stopped pod left behind, are not copied back.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from kubernetes.utils import parse_quantity

from proctor.jsontypes import JsonObject
from proctor.podentry import MAX_WORKSPACE_BYTES, WorkspaceError, pack_workspace
from proctor.protocol import ParsedEvent

from .base import (ExitReason, LaunchRequest, Sandbox, SandboxError, SandboxExit, SandboxRuntime, SandboxStats,
                   StreamSandbox)
from .kubeapi import GONE, RETRIED, Conflict, KubeApi, NotFound, PodInformer, RetryPolicy, load_configuration
from .podattach import STDERR, STDOUT, AttachRefused, PodChannel
from .podnetwork import PodNetwork, join_network, networks_of, reap_networks
from .podspec import (CONTAINER, SANDBOX, PodSettings, anchor_manifest, deny_all_manifest, pod_manifest, pod_name,
                      policy_manifest, policy_name)
from .podstatus import end_state, start_state, stuck_reason

if TYPE_CHECKING:
    from proctor.settings import Settings

log = logging.getLogger("proctor.kubernetes")

ANCHOR_TTL_S = 30.0  # the anchor and the namespace's deny-all policy are checked this often
METRICS_EVERY_S = 10.0  # metrics-server scrapes every 15 s by default: asking more often is waste
FINAL_STATE_S = 15.0  # how long the kubelet may take to report a container's end
UNHEARD_S = 2.0  # a starting pod the informer has not reported by then is read directly
EVENTS_EVERY_S = 5.0  # a placed pod that is slow to start: its events are read this often
KILL_GRACE_S = 1  # SIGTERM, then SIGKILL a second later (kubelets may round it up to 2 s)
KILL_CONFIRM_S = 15.0  # a deleted pod still there by then (its node is away) is deleted by force


_DURATION = re.compile(r"(\d+(?:\.\d*)?)(h|ms|m|s|us|µs|ns)")
_DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def go_duration(text: str) -> float:
    """Seconds in a Go duration string, as the metrics API writes its `window` ("15s",
    "20.031s", "1m0.5s"). Raises ValueError for anything else."""
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"{text!r} is not a duration")
    return sum(float(n) * _DURATION_UNITS[u] for n, u in parts)


class PodSandbox(StreamSandbox):
    runtime = "kubernetes"
    isolation = "strong"

    def __init__(self, request: LaunchRequest, rt: "KubernetesRuntime"):
        super().__init__(request)
        self.rt = rt
        self.api = rt.api
        self.pod = pod_name(request.sandbox_id)
        self.policy = policy_name(request.sandbox_id)
        self.channel: PodChannel | None = None
        self._chunks: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None
        self._capped = False
        self._made = {"pod": False, "policy": False}  # asked for: a lost answer may hide a success
        self._deleting: asyncio.Future[bool] | None = None
        self._closing: asyncio.Future[None] | None = None
        self._exit: SandboxExit | None = None
        self._removed = False
        self._stats = SandboxStats()
        self._stats_at = float("-inf")
        self._scrape: tuple[object, object] = (None, None)  # the metrics API's last (timestamp, window)
        self._cpu_s = 0.0

    # ------------------------------------------------------------ launch

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        limit = min(self.request.limits.disk_bytes, MAX_WORKSPACE_BYTES)
        try:
            payload = await loop.run_in_executor(self.api.pool, pack_workspace, self.request.workspace, limit)
        except (WorkspaceError, OSError) as exc:
            raise SandboxError(f"kubernetes: sandbox {self.id}: {exc}") from exc
        anchor = await self.rt.anchor()
        self._made["policy"] = True
        policy = policy_manifest(self.request, self.rt.pods, anchor)
        try:
            await self.api.create("networkpolicies", policy)
        except Conflict:  # left by an earlier try of this very sandbox: replace it, never trust it
            await self.api.delete("networkpolicies", self.policy)
            await self.api.create("networkpolicies", policy)
        self._made["pod"] = True
        try:
            await self.api.create("pods", join_network(pod_manifest(self.request, self.rt.pods, anchor), self.request,
                                                       self.rt.pods))
        except Conflict as exc:  # a retried create whose first try went through made it: ours (ids are unique)
            existing = await self.api.get("pods", self.pod)
            if _sandbox_of(existing) != self.id:
                raise SandboxError(f"kubernetes: sandbox {self.id}: another pod is named {self.pod}") from exc
        await self._until_running()
        self.channel = await self._attach()
        if not await self.channel.write(payload):
            raise SandboxError(f"kubernetes: sandbox {self.id}: the attach stream closed while sending the workspace")
        self.started = loop.time()
        self._arm_deadline()
        self._reader = asyncio.create_task(self._read())

    async def _attach(self) -> PodChannel:
        """The attach stream, retried like an API call when the API server is busy or away."""
        retry, delay = self.api.retry, self.api.retry.first_s
        for attempt in range(1, retry.attempts + 1):
            try:
                return await PodChannel.open(self.api.cfg, self.api.namespace, self.pod, CONTAINER)
            except SandboxError as exc:
                status = exc.status if isinstance(exc, AttachRefused) else None
                if attempt == retry.attempts or (status is not None and status not in RETRIED):
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, retry.max_s)
        raise AssertionError("unreachable")

    async def _until_running(self) -> None:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.request.limits.timeout_s
        unschedulable_since: float | None = None
        placed_since: float | None = None
        look_at = 0.0  # when to read a slow pod's events next
        watch = self.rt.informer.follow(self.pod)
        pod: JsonObject | None = {}
        followed = loop.time()
        try:
            while True:
                try:
                    item = await asyncio.wait_for(watch.queue.get(), 1.0)
                except asyncio.TimeoutError:
                    if pod == {} and loop.time() - followed >= UNHEARD_S:
                        # the informer has not seen it (still listing, or the pod went before it
                        # looked): read it once directly
                        try:
                            pod = await self.api.get("pods", self.pod)
                        except NotFound:
                            pod = None
                else:
                    if isinstance(item, SandboxError):
                        raise item
                    pod = item
                state = start_state(pod)
                if state.kind == "running":
                    return
                if state.kind == "gone":
                    self.rt.forget_anchor()  # perhaps collected with a deleted anchor
                if state.kind in ("failed", "gone"):
                    raise SandboxError(f"kubernetes: sandbox {self.id}: pod {self.pod} did not start: {state.detail}")
                now = loop.time()
                if state.unschedulable is None:
                    unschedulable_since = None
                else:
                    unschedulable_since = unschedulable_since if unschedulable_since is not None else now
                    if now - unschedulable_since >= self.rt.pending_timeout_s:
                        raise SandboxError(
                            f"kubernetes: sandbox {self.id}: pod {self.pod} could not be scheduled within "
                            f"{self.rt.pending_timeout_s:g}s: {state.unschedulable}")
                placed_since = (placed_since or now) if state.placed else None
                if placed_since is not None and now - placed_since >= self.rt.pending_timeout_s and now >= look_at:
                    look_at = now + EVENTS_EVERY_S
                    why = await self._stuck()
                    if why is not None:
                        raise SandboxError(f"kubernetes: sandbox {self.id}: pod {self.pod} could not start: {why}")
                if now >= give_up:
                    raise SandboxError(f"kubernetes: sandbox {self.id}: pod {self.pod} did not start within "
                                       f"{self.request.limits.timeout_s:g}s ({state.detail})")
        finally:
            watch.stop()

    async def _stuck(self) -> str | None:
        """Why the placed pod cannot start, from its events; None if they say nothing (an image
        still pulling) or cannot be read (the launch then waits for its give-up)."""
        try:
            return stuck_reason(await self.api.events_of(self.pod))
        except SandboxError as exc:
            log.warning("sandbox %s: %s", self.id, exc)
            return None

    # ------------------------------------------------------------ the channel

    async def _read(self) -> None:
        assert self.channel is not None
        try:
            async for stream, data in self.channel.frames():
                if stream == STDOUT and not self._capped:
                    if self._count_output(len(data)):
                        self._chunks.put_nowait(data)
                    else:
                        self._capped = True
                        self._chunks.put_nowait(None)
                elif stream == STDERR:
                    self._keep_stderr(data)
        except Exception:  # a broken stream ends the channel; wait() asks the pod how it ended
            log.exception("sandbox %s: the attach stream failed", self.id)
        finally:
            self._chunks.put_nowait(None)

    async def events(self) -> AsyncIterator[ParsedEvent]:
        while (chunk := await self._chunks.get()) is not None:
            for event in self.parser.feed(chunk):
                yield event
        if not self._capped and self._reason != "output_cap":
            for event in self.parser.finish():
                yield event

    async def send(self, line: bytes) -> None:
        if self.channel is None or self._exit is not None or self._deleting is not None:
            return
        await self.channel.write(line)

    async def stats(self) -> SandboxStats:
        """Memory as the metrics API last saw it; CPU seconds summed from its CPU rates, each
        over its window (metrics-server reports an average rate per scrape, not a counter),
        so they trail the pod by up to a scrape."""
        now = asyncio.get_running_loop().time()
        if now - self._stats_at < self.rt.metrics_every_s:
            return self._stats
        self._stats_at = now
        try:
            metrics = await self.api.pod_metrics(self.pod)
            containers = metrics.get("containers") or []
            memory = sum(int(parse_quantity(c["usage"]["memory"])) for c in containers)
            rate = sum(float(parse_quantity(c["usage"].get("cpu", "0"))) for c in containers)
            scrape = (metrics.get("timestamp"), metrics.get("window"))
            window = go_duration(str(scrape[1]))
        except (SandboxError, KeyError, TypeError, ValueError, AttributeError):
            return SandboxStats(at=now)  # no metrics API, or not scraped yet
        if scrape != self._scrape:  # each scrape counted once
            self._scrape = scrape
            self._cpu_s += rate * window
        self._stats = SandboxStats(memory_bytes=memory, cpu_seconds=self._cpu_s, at=now)
        return self._stats

    # ------------------------------------------------------------ the end

    async def kill(self, reason: ExitReason = "killed", detail: str = "") -> None:
        self._note_reason(reason, detail)
        if not self._made["pod"]:
            return
        if self._deleting is None:
            self._deleting = asyncio.ensure_future(self._delete_pod())
            if self.channel is not None:  # the pod's end closes it too; do not wait for that
                self._closing = asyncio.ensure_future(self.channel.close())
        try:
            await asyncio.shield(self._deleting)
        except SandboxError as exc:
            log.error("sandbox %s: could not delete pod %s: %s", self.id, self.pod, exc)
            self._deleting = None  # the next kill or cleanup tries again

    async def _delete_pod(self) -> bool:
        """Delete the pod and return once it no longer exists (its container has stopped);
        False if it was gone already. Raises `SandboxError` if the API refuses the delete."""
        watch = self.rt.informer.follow(self.pod)
        try:
            if not await self.api.delete("pods", self.pod, grace_s=KILL_GRACE_S):
                return False
            loop = asyncio.get_running_loop()
            give_up = loop.time() + self.rt.kill_confirm_s
            asked = loop.time()
            while loop.time() < give_up:
                try:
                    item = await asyncio.wait_for(watch.queue.get(), min(0.5, max(0.01, give_up - loop.time())))
                except asyncio.TimeoutError:
                    item = {}
                if item is GONE:
                    return True
                if loop.time() - asked >= UNHEARD_S:  # the informer may not know it: ask directly
                    asked = loop.time()
                    try:
                        await self.api.get("pods", self.pod, attempts=1)
                    except NotFound:
                        return True
                    except SandboxError:
                        pass
            log.error("sandbox %s: pod %s was not confirmed stopped within %gs (its node may be away): "
                      "deleting it by force", self.id, self.pod, self.rt.kill_confirm_s)
            await self.api.delete("pods", self.pod, grace_s=0)
            return True
        finally:
            watch.stop()

    async def wait(self) -> SandboxExit:
        if self._exit is not None:
            return self._exit
        if self._reader is None:
            return SandboxExit(None, "launch_failed", self._detail)
        await asyncio.shield(self._reader)
        if self._killing is not None:
            await asyncio.gather(self._killing, return_exceptions=True)
        self._disarm_deadline()
        code, reason, detail = await self._final_state()
        loop = asyncio.get_running_loop()
        self._exit = SandboxExit(code, reason, detail, self.stderr_tail(), loop.time() - self.started)
        return self._exit

    async def _final_state(self) -> tuple[int | None, ExitReason, str]:
        if self._reason is not None and self._deleting is not None:
            return None, self._reason, self._detail  # deleted by us: its status is gone with it
        loop = asyncio.get_running_loop()
        give_up, pause = loop.time() + FINAL_STATE_S, 0.1
        while loop.time() < give_up:
            try:
                pod = await self.api.get("pods", self.pod)
            except NotFound:
                return None, self._reason or "killed", self._detail or "the pod was deleted outside Proctor"
            except SandboxError as exc:
                log.warning("sandbox %s: %s", self.id, exc)
            else:
                end = end_state(pod)
                if end is not None:
                    code, reason, detail = end
                    return (code, self._reason, self._detail) if self._reason else (code, reason, detail)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)
        await self.kill("killed", "the attach stream closed while the container still ran")
        return None, self._reason or "killed", self._detail

    async def cleanup(self) -> None:
        if self._removed:
            return
        if self._reader is not None and not self._reader.done():
            await self.kill("killed", "cleaned up while running")
            try:
                await asyncio.wait_for(asyncio.shield(self._reader), 10)
            except asyncio.TimeoutError:
                self._reader.cancel()
        self._disarm_deadline()
        if self.channel is not None:
            await self.channel.close()
        if self._closing is not None:
            await asyncio.gather(self._closing, return_exceptions=True)
        try:
            if self._made["pod"] and self._deleting is None:
                await self._delete_pod()
            if self._made["policy"]:
                await self.api.delete("networkpolicies", self.policy)
        except SandboxError as exc:  # a second cleanup tries again; else reconciliation deletes it
            log.warning("sandbox %s: cleanup incomplete: %s", self.id, exc)
        else:
            self._removed = True
        finally:
            self.rt.active.pop(self.id, None)  # no longer live: what is left is an orphan to reconcile


class KubernetesRuntime(SandboxRuntime):
    name = "kubernetes"
    isolation = "strong"
    shares_workspace = False  # artifacts come inline in their events
    pulls_images = True  # a task's image by its pinned reference; the harness bundle copied in (podspec.py)

    def __init__(self, settings: Settings, retry: RetryPolicy = RetryPolicy()):
        self.pods = PodSettings.of(settings)
        self.pending_timeout_s: float = settings.kube_pending_timeout_s
        self.metrics_every_s = METRICS_EVERY_S  # how often a sandbox's stats() asks the metrics API
        self.kill_confirm_s = KILL_CONFIRM_S
        self.api = KubeApi(load_configuration(settings.kubeconfig), self.pods.namespace, retry)
        self.informer = PodInformer(self.api, self.pods.selector)  # one watch for every starting pod
        self.active: dict[str, PodSandbox] = {}
        self.networks: set[str] = set()  # the private networks open here (podnetwork.py)
        self._anchor: JsonObject | None = None
        self._anchor_at = float("-inf")

    @classmethod
    def check(cls, kubeconfig: Path | None = None) -> None:
        load_configuration(kubeconfig)

    def close(self) -> None:
        self.informer.close()
        self.api.close()

    async def launch(self, request: LaunchRequest) -> Sandbox:
        sandbox = PodSandbox(request, self)
        self.active[request.sandbox_id] = sandbox
        try:
            await sandbox.start()
        except BaseException as exc:
            await asyncio.shield(sandbox.cleanup())
            self.active.pop(request.sandbox_id, None)
            if isinstance(exc, Exception) and not isinstance(exc, SandboxError):
                raise SandboxError(f"kubernetes: sandbox {request.sandbox_id}: {exc}") from exc
            raise
        return sandbox

    async def open_network(self, network: str, services: list[str],
                           labels: tuple[tuple[str, str], ...] = ()) -> PodNetwork:
        """A private network for the pods whose request names `network` (podnetwork.py);
        `close()` it after them. Raises `SandboxError`."""
        self.networks.add(network)
        try:
            return await PodNetwork.open(self.api, self.pods, await self.anchor(), network, services, labels,
                                         closed=self.networks.discard)
        except BaseException:
            self.networks.discard(network)
            raise

    def forget_anchor(self) -> None:
        self._anchor = None

    async def anchor(self) -> JsonObject:
        """The instance's anchor ConfigMap (made if missing), and the namespace's deny-all
        policy (likewise), checked every `ANCHOR_TTL_S`."""
        now = asyncio.get_running_loop().time()
        if self._anchor is not None and now - self._anchor_at < ANCHOR_TTL_S:
            return self._anchor
        self._anchor = await self._ensure("configmaps", anchor_manifest(self.pods))
        await self._ensure("networkpolicies", deny_all_manifest(self.pods))
        self._anchor_at = now
        return self._anchor

    async def _ensure(self, kind: str, manifest: JsonObject) -> JsonObject:
        name = manifest["metadata"]["name"]
        try:
            return await self.api.get(kind, name)
        except NotFound:
            pass
        try:
            return await self.api.create(kind, manifest)
        except Conflict:  # made meanwhile by another supervisor
            return await self.api.get(kind, name)

    async def reconcile(self, live: set[str] | Callable[[], set[str]]) -> list[str]:
        """Delete this instance's pods and policies whose sandbox is not live, and the private
        networks that no kept pod belongs to and this runtime did not open; returns the
        sandbox ids of the deleted pods. `live` may be a function: it is called after the
        pods are listed, so that a pod made meanwhile (its shard marked running first) is in it.
        Sandboxes this runtime runs now are always live. Raises `SandboxError`."""
        pods = await self.api.list("pods", self.pods.selector)
        policies = await self.api.list("networkpolicies", self.pods.selector)
        keep = set(live() if callable(live) else live) | set(self.active)
        deleted = []
        for pod in pods:
            sid = _sandbox_of(pod)
            if sid is not None and sid not in keep:
                await self.api.delete("pods", pod["metadata"]["name"], grace_s=KILL_GRACE_S)
                deleted.append(sid)
        kept = [p for p in pods if _sandbox_of(p) not in deleted]
        await reap_networks(self.api, self.pods.selector, networks_of(kept) | self.networks)
        for policy in policies:
            sid = _sandbox_of(policy)
            if sid is not None and sid not in keep:
                await self.api.delete("networkpolicies", policy["metadata"]["name"])
        if deleted:
            log.warning("kubernetes: deleted %d orphaned sandbox pods: %s", len(deleted), ", ".join(deleted[:20]))
        return sorted(deleted)


def _sandbox_of(obj: JsonObject) -> str | None:
    meta = obj.get("metadata") or {}
    return (meta.get("annotations") or {}).get(SANDBOX) or (meta.get("labels") or {}).get(SANDBOX)


__all__ = ["KubernetesRuntime", "PodSandbox", "RetryPolicy"]
