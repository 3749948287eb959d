"""The double's scheduler and kubelet: places pods on its configured nodes and runs each
pod's container as a LOCAL process, in a memory/pids/cpu cgroup of its own when it can.

Scheduling honours requests (cpu, memory, `nvidia.com/gpu`) against what the node has
left, nodeSelector, required node affinity (In/NotIn/Exists/DoesNotExist) and NoSchedule
taints; a pod that fits nowhere stays Pending with `PodScheduled=False/Unschedulable` and
the scheduler's kind of message, and is placed once room frees up.

A container is `command + args` with `python` mapped to this machine's Python, its
emptyDir volumes mapped to temporary folders (in the command, the environment and the
working directory), stdin/stdout/stderr on pipes; output nobody is attached to is
dropped, as a real attach would never see it. It is NOT isolated: trusted test tasks
only. A container whose image is in the double's registry (`images`) runs in that image's
root instead, and init containers run first, in order (`containers.py`). The memory limit is the cgroup's (the kernel's OOM kill → OOMKilled; without
cgroups, the process tree's RSS is polled instead), `activeDeadlineSeconds` is enforced
(DeadlineExceeded), and the kubelet can be told to evict a pod, OOM-kill it or fail
pulling an image, or fail to make any pod sandbox (`sandbox_error`: pods stay
ContainerCreating, with a Warning event). A gracefully deleted pod's container gets SIGTERM, SIGKILL after the
grace period, and the pod leaves the store once it has ended; an `unresponsive` kubelet
(its node gone) never confirms, so such pods stay until deleted by force.
"""

from __future__ import annotations

import copy
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes.utils import parse_quantity

from cluster.runtimes.cgroups import CgroupSet

from .containers import command_of, run_init_containers
from .procstats import _process_tree, _rss
from .store import ApiError, Store, now_iso

GPU = "nvidia.com/gpu"


@dataclass
class Node:
    name: str
    cpu: float = 8
    memory: int = 32 * 1024**3
    gpus: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    taints: list[dict[str, str]] = field(default_factory=list)

    @classmethod
    def gpu_node(cls, name: str, product: str, gpus: int) -> "Node":
        return cls(name, 64, 512 * 1024**3, gpus, {"nvidia.com/gpu.product": product},
                   [{"key": GPU, "value": "present", "effect": "NoSchedule"}])


def requests_of(pod: dict[str, Any]) -> dict[str, float]:
    total: Counter[str] = Counter()
    for c in pod["spec"].get("containers") or []:
        for k, v in ((c.get("resources") or {}).get("requests") or {}).items():
            total[k] += float(parse_quantity(v))
    return dict(total)


def _affinity_ok(node: Node, pod: dict[str, Any]) -> bool:
    if any(node.labels.get(k) != v for k, v in (pod["spec"].get("nodeSelector") or {}).items()):
        return False
    required = (((pod["spec"].get("affinity") or {}).get("nodeAffinity") or {})
                .get("requiredDuringSchedulingIgnoredDuringExecution") or {})
    terms = required.get("nodeSelectorTerms") or []
    ops = {"In": lambda v, vs: v in vs, "NotIn": lambda v, vs: v not in vs,
           "Exists": lambda v, vs: v is not None, "DoesNotExist": lambda v, vs: v is None}
    return not terms or any(all(ops[e["operator"]](node.labels.get(e["key"]), e.get("values") or [])
                                for e in t.get("matchExpressions") or []) for t in terms)


def _tolerated(taint: dict[str, str], tolerations: list[dict[str, Any]]) -> bool:
    return any(t.get("key") in (None, taint["key"]) and t.get("effect") in (None, "", taint["effect"])
               and (t.get("operator") == "Exists" or t.get("value") == taint.get("value")) for t in tolerations)


@dataclass
class Container:
    pod: str
    uid: str
    proc: subprocess.Popen[bytes]
    root: Path
    memory_limit: float
    started: float
    deadline: float | None
    session: Any = None  # the attached stream, if any
    ended: str | None = None  # why the kubelet killed it (OOMKilled, Evicted, DeadlineExceeded, Deleted)
    message: str = ""
    pumps: list[threading.Thread] = field(default_factory=list)
    stdin_closed: bool = False
    terminating: bool = False  # deleted gracefully: removed from the store once it has ended
    cgroup: CgroupSet | None = None
    scraped: tuple[float, float] | None = None  # (monotonic time, CPU seconds) at the last metrics scrape


class Kubelet:
    tick_s = 0.02
    pod_pids_limit = 1024  # a kubelet's podPidsLimit

    def __init__(self, store: Store, nodes: list[Node], namespace_root: Path):
        self.store = store
        self.nodes = nodes
        self.root = namespace_root
        self.containers: dict[tuple[str, str], Container] = {}
        self.bound: dict[tuple[str, str], tuple[str, dict[str, float]]] = {}  # pod -> node, requests
        self.failing_images: set[str] = set()
        self.images: dict[str, Path] = {}  # the double's registry: reference → root filesystem (containers.py)
        self.initializing: set[tuple[str, str]] = set()  # pods whose init containers run
        self.lock = threading.RLock()
        self.stopped = threading.Event()
        store.on_delete.append(self._deleted)
        store.on_terminating.append(self._terminating)
        self.unresponsive = False  # a node that no longer answers: deleted pods are never confirmed gone
        self.sandbox_error: str | None = None  # set: no pod sandbox can be made (e.g. no runsc on the node)
        self.stuck: dict[tuple[str, str], float] = {}  # pods left ContainerCreating -> when last reported
        self.thread = threading.Thread(target=self._loop, name="kubeapi-kubelet", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------ scheduling

    def _loop(self) -> None:
        ticks = 0
        while not self.stopped.wait(self.tick_s):
            ticks += 1
            with self.store.cond:
                pods = [(ns, name, copy.deepcopy(o)) for (kind, ns, name), o in self.store.objects.items()
                        if kind == "pods"]
            tree = _process_tree() if ticks % 5 == 0 and self.containers else None
            for ns, name, pod in pods:
                try:
                    self._step(ns, name, pod, tree)
                except Exception as exc:  # a double's bug must show, not hang a test
                    print(f"kubeapi double: kubelet error on {name}: {exc!r}", file=sys.stderr)

    def _step(self, ns: str, name: str, pod: dict[str, Any], tree: dict[int, list[int]] | None) -> None:
        status = pod.get("status") or {}
        if pod["spec"].get("nodeName") is None:
            self._schedule(ns, name, pod)
        elif status.get("phase") == "Pending" and (ns, name) not in self.containers \
                and (ns, name) not in self.initializing:
            if pod["metadata"].get("deletionTimestamp"):  # deleted before it started
                if not self.unresponsive:
                    self._remove(ns, name)
                return
            self._start(ns, name, pod)
        with self.lock:
            c = self.containers.get((ns, name))
        if c is not None and c.ended is None:
            if c.deadline is not None and time.monotonic() > c.deadline:
                self.terminate(ns, name, "DeadlineExceeded")
            elif c.cgroup is None and tree is not None and _rss(c.proc.pid, tree) > c.memory_limit:
                self.terminate(ns, name, "OOMKilled")

    def _schedule(self, ns: str, name: str, pod: dict[str, Any]) -> None:
        want = requests_of(pod)
        why: Counter[str] = Counter()
        chosen = None
        for node in self.nodes:
            used: Counter[str] = Counter()
            for other_node, other in self.bound.values():
                if other_node == node.name:
                    used.update(other)
            free = {"cpu": node.cpu - used["cpu"], "memory": node.memory - used["memory"], GPU: node.gpus - used[GPU]}
            short = [k for k in ("cpu", "memory", GPU) if want.get(k, 0) > free[k] + 1e-9]
            untolerated = [t for t in node.taints if not _tolerated(t, pod["spec"].get("tolerations") or [])]
            if not _affinity_ok(node, pod):
                why["node(s) didn't match Pod's node affinity/selector"] += 1
            elif untolerated:
                taint = untolerated[0]
                why[f"node(s) had untolerated taint {{{taint['key']}: {taint.get('value', '')}}}"] += 1
            elif short:
                why[f"Insufficient {short[0]}"] += 1
            elif chosen is None:
                chosen = node
        if chosen is not None:
            self.bound[(ns, name)] = (chosen.name, want)

            def bind(p: dict[str, Any]) -> None:
                p["spec"]["nodeName"] = chosen.name
                p["status"] = {"phase": "Pending", "startTime": now_iso(), "hostIP": "10.0.0.1",
                               "conditions": [{"type": "PodScheduled", "status": "True",
                                               "lastTransitionTime": now_iso()}],
                               "containerStatuses": [self._status(p, {"waiting": {"reason": "ContainerCreating"}})]}
            if self.store.update("pods", ns, name, bind) is None:  # deleted meanwhile
                self.bound.pop((ns, name), None)
            return
        message = (f"0/{len(self.nodes)} nodes are available: "
                   + ", ".join(f"{n} {reason}" for reason, n in sorted(why.items())) + ".")
        conditions = (pod.get("status") or {}).get("conditions") or []
        if not any(c.get("message") == message for c in conditions):
            def unschedulable(p: dict[str, Any]) -> None:
                p["status"] = {"phase": "Pending", "conditions": [{
                    "type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message,
                    "lastTransitionTime": now_iso()}]}
            self.store.update("pods", ns, name, unschedulable)

    @staticmethod
    def _status(pod: dict[str, Any], state: dict[str, Any], **extra: Any) -> dict[str, Any]:
        c = pod["spec"]["containers"][0]
        return {"name": c["name"], "image": c.get("image", ""), "imageID": "", "ready": "running" in state,
                "restartCount": 0, "started": "running" in state, "state": state, **extra}

    # ------------------------------------------------------------ running

    def _start(self, ns: str, name: str, pod: dict[str, Any]) -> None:
        if self.sandbox_error is not None:  # the pod stays ContainerCreating; only its events say why
            self._warn_stuck(ns, name, pod)
            return
        spec = pod["spec"]
        c = spec["containers"][0]
        for init in spec.get("initContainers") or []:
            if init.get("image") in self.failing_images:
                self.store.update("pods", ns, name, lambda p, i=init: p["status"].update(initContainerStatuses=[
                    {"name": i["name"], "image": i["image"], "imageID": "", "ready": False, "restartCount": 0,
                     "state": {"waiting": {"reason": "ErrImagePull",
                                           "message": f'failed to pull image "{i["image"]}": not found'}}}]))
                return
        registry = (c.get("image") or "").split("/")[0]
        if c.get("image") in self.failing_images or registry.endswith(".invalid"):  # as no registry answers
            state = (pod.get("status") or {}).get("containerStatuses", [{}])[0].get("state", {})
            pulled_once = (state.get("waiting") or {}).get("reason") == "ErrImagePull"
            reason = "ImagePullBackOff" if pulled_once else "ErrImagePull"
            if (state.get("waiting") or {}).get("reason") != reason:
                message = f'Back-off pulling image "{c["image"]}"' if reason == "ImagePullBackOff" \
                    else f'failed to pull image "{c["image"]}": not found'
                self.store.update("pods", ns, name, lambda p: p["status"].update(
                    containerStatuses=[self._status(p, {"waiting": {"reason": reason, "message": message}})]))
            return
        root = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.root))
        for volume in spec.get("volumes") or []:
            (root / volume["name"]).mkdir()
        if spec.get("initContainers"):
            with self.lock:
                self.initializing.add((ns, name))
            threading.Thread(target=self._initialize, args=(ns, name, pod, root), daemon=True).start()
            return
        self._run(ns, name, pod, root)

    def _initialize(self, ns: str, name: str, pod: dict[str, Any], root: Path) -> None:
        """The pod's init containers, in order; then its container, or the pod fails."""
        def report(statuses: list[dict[str, Any]]) -> bool:
            return self.store.update("pods", ns, name, lambda p: p["status"].update(
                initContainerStatuses=copy.deepcopy(statuses))) is not None

        def gone() -> bool:
            p = self.store.find("pods", ns, name)
            return p is None or bool(p["metadata"].get("deletionTimestamp"))

        try:
            ok = run_init_containers(pod, root, self.images, lambda: None, report, gone)
            if ok and not gone():
                self._run(ns, name, pod, root)
                return
            self.store.update("pods", ns, name, lambda p: p["status"].update(
                phase="Failed", conditions=[x for x in p["status"].get("conditions", []) if x["type"] != "Ready"]))
            shutil.rmtree(root, ignore_errors=True)
            with self.lock:
                self.bound.pop((ns, name), None)
            if gone():
                self._remove(ns, name)
        finally:
            with self.lock:
                self.initializing.discard((ns, name))

    def _run(self, ns: str, name: str, pod: dict[str, Any], root: Path) -> None:
        spec = pod["spec"]
        c = spec["containers"][0]
        command = command_of(pod, c, root, self.images)
        argv, env = command.argv, command.env
        limits = (c.get("resources") or {}).get("limits") or {}
        memory = float(parse_quantity(limits["memory"])) if "memory" in limits else float("inf")
        cpus = float(parse_quantity(limits.get("cpu", "64")))
        cgroup = CgroupSet.create(f"kubeapi-{pod['metadata']['uid']}", int(min(memory, 2**62)),
                                  self.pod_pids_limit, cpus)
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=env, cwd=command.cwd, start_new_session=True,
                                preexec_fn=cgroup.attach if cgroup is not None else None)
        deadline = spec.get("activeDeadlineSeconds")
        container = Container(name, pod["metadata"]["uid"], proc, root, memory, time.monotonic(),
                              time.monotonic() + deadline if deadline else None, cgroup=cgroup)
        with self.lock:
            self.containers[(ns, name)] = container
        running = self.store.update("pods", ns, name, lambda p: p["status"].update(
            phase="Running", podIP="10.1.0.7",
            conditions=[*p["status"]["conditions"], {"type": "Ready", "status": "True"}],
            containerStatuses=[self._status(p, {"running": {"startedAt": now_iso()}})]))
        for stream, channel in ((proc.stdout, 1), (proc.stderr, 2)):
            pump = threading.Thread(target=self._pump, args=(container, stream, channel), daemon=True)
            pump.start()
            container.pumps.append(pump)
        threading.Thread(target=self._reap, args=(ns, name, container), daemon=True).start()
        if running is None:  # deleted meanwhile
            self.terminate(ns, name, "Deleted")

    def _warn_stuck(self, ns: str, name: str, pod: dict[str, Any]) -> None:
        """A Warning event FailedCreatePodSandBox about the pod, counted up every second, as
        the kubelet's retries report it."""
        now = time.monotonic()
        if now - self.stuck.get((ns, name), float("-inf")) < 1.0:
            return
        first = (ns, name) not in self.stuck
        self.stuck[(ns, name)] = now
        event = f"{name}.stuck"
        message = f"Failed to create pod sandbox: rpc error: code = Unknown desc = {self.sandbox_error}"
        if first:
            self.store.create("events", ns, {
                "apiVersion": "v1", "kind": "Event", "metadata": {"name": event}, "type": "Warning",
                "reason": "FailedCreatePodSandBox", "message": message, "count": 1,
                "involvedObject": {"kind": "Pod", "name": name, "namespace": ns, "uid": pod["metadata"]["uid"]},
                "source": {"component": "kubelet", "host": pod["spec"].get("nodeName")},
                "firstTimestamp": now_iso(), "lastTimestamp": now_iso()})
        else:
            self.store.update("events", ns, event, lambda e: e.update(count=e["count"] + 1, lastTimestamp=now_iso()))

    def _pump(self, c: Container, stream: Any, channel: int) -> None:
        while chunk := os.read(stream.fileno(), 64 * 1024):
            session = c.session
            if session is not None:
                session.send(channel, chunk)

    def _reap(self, ns: str, name: str, c: Container) -> None:
        code = c.proc.wait()
        for pump in c.pumps:
            pump.join(5)
        for pipe in (c.proc.stdout, c.proc.stderr, c.proc.stdin):
            try:
                pipe.close()
            except OSError:
                pass
        code = 128 - code if code < 0 else code  # killed by a signal: 128 + its number
        session = c.session
        if session is not None:
            session.finish()
        if c.ended is None and c.cgroup is not None and c.cgroup.oom_killed():
            c.ended = "OOMKilled"
        if c.cgroup is not None:
            c.cgroup.remove()
        reason = c.ended or ("Completed" if code == 0 else "Error")

        def ended(p: dict[str, Any]) -> None:
            terminated = {"exitCode": code, "reason": "OOMKilled" if reason == "OOMKilled" else
                          ("Completed" if code == 0 else "Error"), "startedAt": now_iso(), "finishedAt": now_iso()}
            p["status"]["containerStatuses"] = [self._status(p, {"terminated": terminated})]
            p["status"]["phase"] = "Succeeded" if code == 0 and reason == "Completed" else "Failed"
            p["status"]["conditions"] = [x for x in p["status"].get("conditions", []) if x["type"] != "Ready"]
            if reason == "Evicted":
                p["status"].update(reason="Evicted", message=c.message or "evicted")
            elif reason == "DeadlineExceeded":
                p["status"].update(reason="DeadlineExceeded",
                                   message="Pod was active on the node longer than the specified deadline")
        if reason != "Deleted":
            self.store.update("pods", ns, name, ended)
        with self.lock:
            self.containers.pop((ns, name), None)
            self.bound.pop((ns, name), None)
        shutil.rmtree(c.root, ignore_errors=True)
        if c.terminating:  # the kubelet's last word on a gracefully deleted pod
            self._remove(ns, name)

    def _terminating(self, ns: str, name: str, grace_s: int) -> None:
        """A graceful delete: SIGTERM now, SIGKILL once `grace_s` has passed (as the kubelet
        does), and the pod goes from the store when its container has ended."""
        if self.unresponsive:
            return
        with self.lock:
            c = self.containers.get((ns, name))
            if c is not None:
                c.terminating = True
        if c is None or c.ended is not None or c.proc.poll() is not None:
            if c is None:  # nothing runs (still pulling, or already reaped)
                self._remove(ns, name)
            return
        try:
            os.killpg(c.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        timer = threading.Timer(grace_s, self.terminate, (ns, name, "Deleted"))
        timer.daemon = True
        timer.start()

    def _remove(self, ns: str, name: str) -> None:
        try:
            self.store.delete("pods", ns, name, 0)
        except ApiError:  # already gone
            pass

    def terminate(self, ns: str, name: str, why: str, message: str = "") -> bool:
        """Kill the pod's container as the kubelet would for `why` (OOMKilled, Evicted,
        DeadlineExceeded, Deleted)."""
        with self.lock:
            c = self.containers.get((ns, name))
            if c is None or c.ended is not None:
                return False
            c.ended = why
            c.message = message
        try:
            os.killpg(c.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if c.cgroup is not None:
            c.cgroup.kill_all(timeout=1.0)
        return True

    def _deleted(self, kind: str, obj: dict[str, Any]) -> None:
        if kind == "pods":
            key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
            self.terminate(*key, "Deleted")
            with self.lock:
                self.bound.pop(key, None)

    def container(self, ns: str, name: str) -> Container | None:
        with self.lock:
            return self.containers.get((ns, name))

    def close(self) -> None:
        self.stopped.set()
        with self.lock:
            keys = list(self.containers)
        for key in keys:
            self.terminate(*key, "Deleted")
        self.thread.join(5)
        end = time.monotonic() + 5
        while self.containers and time.monotonic() < end:
            time.sleep(0.02)
