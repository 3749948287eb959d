"""Reading a sandbox pod's status (the API's JSON): has it started, and how did it end.

`start_state` says whether a launch may go on (running), must wait (pending, with the
scheduler's message while unschedulable) or has failed (an image that cannot be pulled,
a container that cannot be created, a pod that ended or vanished); `stuck_reason` reads
the pod's events for why a placed pod's sandbox cannot be made (the container status only
says ContainerCreating, as during an image pull). `end_state` turns a
finished pod into our exit: OOMKilled → `oom`, Evicted → `killed` ("evicted: ..."),
DeadlineExceeded → `deadline`, else the container's exit code. A pod is never restarted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from proctor.jsontypes import JsonObject

from .base import ExitReason
from .podspec import CONTAINER

# a container waiting for one of these will not start without someone changing something
FATAL_WAITING = frozenset({
    "ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull", "CreateContainerConfigError",
    "CreateContainerError", "RunContainerError", "CrashLoopBackOff",
})


# warnings after which a placed pod's sandbox will not be made without someone changing something
STUCK_EVENTS = frozenset({"FailedCreatePodSandBox", "FailedMount", "FailedAttachVolume", "FailedCreatePodContainer"})


@dataclass(frozen=True)
class StartState:
    kind: Literal["running", "pending", "failed", "gone"]
    detail: str = ""
    unschedulable: str | None = None  # the scheduler's message while the pod cannot be placed
    placed: bool = False  # on a node (its sandbox and container being made)


def container_status(pod: JsonObject) -> JsonObject:
    statuses: list[JsonObject] = (pod.get("status") or {}).get("containerStatuses") or []
    for cs in statuses:
        if cs.get("name") == CONTAINER:
            return cs
    return {}


def init_failure(pod: JsonObject) -> str | None:
    """Why an init container (the harness bundle's copy) failed or will not start; None if none did."""
    for cs in (pod.get("status") or {}).get("initContainerStatuses") or []:
        state = cs.get("state") or {}
        term, waiting = state.get("terminated"), state.get("waiting") or {}
        if term and term.get("exitCode") != 0:
            message = str(term.get("message") or "").strip()[:500]
            return (f"init container {cs.get('name')!r} failed: {term.get('reason') or 'Error'} exit code "
                    f"{term.get('exitCode')}" + (f": {message}" if message else ""))
        if waiting.get("reason") in FATAL_WAITING:
            return f"init container {cs.get('name')!r}: {waiting['reason']}: {waiting.get('message') or 'no message'}"
    return None


def start_state(pod: JsonObject | None) -> StartState:
    if pod is None:
        return StartState("gone", "the pod was deleted before it started")
    status = pod.get("status") or {}
    phase = status.get("phase") or "Pending"
    failed_init = init_failure(pod)
    if failed_init is not None:
        return StartState("failed", failed_init)
    if phase in ("Succeeded", "Failed"):
        end = end_state(pod)
        return StartState("failed", end[2] if end and end[2] else f"the pod ended ({phase}) before it was attached")
    state = container_status(pod).get("state") or {}
    if "running" in state:
        return StartState("running")
    if "terminated" in state:
        t = state["terminated"]
        return StartState("failed", f"the container ended before it was attached: {t.get('reason') or ''} "
                                    f"exit code {t.get('exitCode')}".strip())
    waiting = state.get("waiting") or {}
    if waiting.get("reason") in FATAL_WAITING:
        return StartState("failed", f"{waiting['reason']}: {waiting.get('message') or 'no message'}")
    placed = False
    for cond in status.get("conditions") or []:
        if (cond.get("type"), cond.get("status"), cond.get("reason")) == ("PodScheduled", "False", "Unschedulable"):
            return StartState("pending", "unschedulable", cond.get("message") or "no node fits the pod")
        placed = placed or (cond.get("type"), cond.get("status")) == ("PodScheduled", "True")
    return StartState("pending", waiting.get("reason") or phase, placed=placed)


def stuck_reason(events: list[JsonObject]) -> str | None:
    """Why a placed pod cannot start, from its events (core/v1 Events about it): the latest
    warning of a kind that does not pass by itself; None if there is none."""
    stuck = [e for e in events if e.get("type") == "Warning" and e.get("reason") in STUCK_EVENTS]
    if not stuck:
        return None
    last = max(stuck, key=lambda e: str(e.get("lastTimestamp") or e.get("eventTime") or ""))
    times = f" ({last['count']} times)" if isinstance(last.get("count"), int) and last["count"] > 1 else ""
    return f"{last['reason']}{times}: {str(last.get('message') or 'no message')[:500]}"


def end_state(pod: JsonObject) -> tuple[int | None, ExitReason, str] | None:
    """(exit code, reason, detail) of a pod whose container has ended; None while it runs."""
    status = pod.get("status") or {}
    phase = status.get("phase")
    term = (container_status(pod).get("state") or {}).get("terminated")
    code = term.get("exitCode") if term else None
    why, message = status.get("reason"), status.get("message") or ""
    if why == "Evicted":
        return code, "killed", f"evicted: {message or 'by the kubelet'}"
    if why == "DeadlineExceeded":
        return code, "deadline", f"activeDeadlineSeconds reached: {message or 'the pod ran too long'}"
    disrupted = next((c for c in status.get("conditions") or []
                      if c.get("type") == "DisruptionTarget" and c.get("status") == "True"), None)
    if disrupted is not None and (term or phase in ("Succeeded", "Failed")):  # preempted, drained, tainted out
        return code, "killed", (f"disrupted: {disrupted.get('reason') or 'by the cluster'}: "
                                f"{disrupted.get('message') or ''}").rstrip(": ")
    if (pod.get("metadata") or {}).get("deletionTimestamp") and (term or phase in ("Succeeded", "Failed")):
        return code, "killed", "the pod was deleted outside Proctor"
    if term:
        if term.get("reason") == "OOMKilled":
            return code, "oom", "OOMKilled: the container reached its memory limit"
        return code, "exited", ""
    if phase in ("Succeeded", "Failed"):
        return None, "killed", f"the pod {phase.lower()} without a container status: {why or ''} {message}".strip()
    return None
