"""How a pod's status reads as a sandbox's end (`cluster/runtimes/podstatus.py`), on pod
statuses shaped as the API server writes them."""

from __future__ import annotations

from typing import Any

import pytest

from cluster.runtimes.podstatus import end_state, start_state, stuck_reason


def pod(phase: str, terminated: dict[str, Any] | None = None, **status: Any) -> dict[str, Any]:
    meta = status.pop("metadata", {"name": "proctor-sbx-1"})
    state = {"terminated": terminated} if terminated else {"running": {"startedAt": "2026-11-27T03:00:00Z"}}
    return {"metadata": meta, "status": {"phase": phase, **status, "containerStatuses": [
        {"name": "sandbox", "state": state, "ready": not terminated, "restartCount": 0, "image": "h",
         "imageID": ""}]}}


def disruption(reason: str, message: str) -> dict[str, Any]:
    return {"type": "DisruptionTarget", "status": "True", "reason": reason, "message": message}


@pytest.mark.parametrize("status, expected", [
    (pod("Running"), None),
    (pod("Succeeded", {"exitCode": 0, "reason": "Completed"}), (0, "exited", "")),
    (pod("Failed", {"exitCode": 3, "reason": "Error"}), (3, "exited", "")),
    (pod("Failed", {"exitCode": 137, "reason": "OOMKilled"}),
     (137, "oom", "OOMKilled: the container reached its memory limit")),
    (pod("Failed", {"exitCode": 137, "reason": "Error"}, reason="Evicted", message="The node was low on memory."),
     (137, "killed", "evicted: The node was low on memory.")),
    (pod("Failed", {"exitCode": 137, "reason": "Error"}, reason="DeadlineExceeded", message="too long"),
     (137, "deadline", "activeDeadlineSeconds reached: too long")),
    (pod("Failed", {"exitCode": 143, "reason": "Error"},
         conditions=[disruption("PreemptionByScheduler", "a higher-priority pod needed the node")]),
     (143, "killed", "disrupted: PreemptionByScheduler: a higher-priority pod needed the node")),
    (pod("Failed", {"exitCode": 143, "reason": "Error"},
         conditions=[disruption("DeletionByTaintManager", "")]),
     (143, "killed", "disrupted: DeletionByTaintManager")),
    (pod("Failed", {"exitCode": 143, "reason": "Error"},
         metadata={"name": "proctor-sbx-1", "deletionTimestamp": "2026-11-27T03:01:00Z"}),
     (143, "killed", "the pod was deleted outside Proctor")),
    (pod("Running", conditions=[disruption("EvictionByEvictionAPI", "drained")]), None),  # not ended yet
])
def test_how_a_pod_ended_is_read_from_its_status(status: dict[str, Any], expected: Any) -> None:
    assert end_state(status) == expected


def test_a_stuck_pod_is_told_from_one_still_pulling_by_its_events() -> None:
    def event(reason: str, type_: str = "Warning", at: str = "2026-11-27T03:00:00Z", **kw: Any) -> dict[str, Any]:
        return {"type": type_, "reason": reason, "message": f"{reason} happened", "lastTimestamp": at, **kw}

    assert stuck_reason([]) is None
    assert stuck_reason([event("Scheduled", "Normal"), event("Pulling", "Normal")]) is None  # still pulling
    assert stuck_reason([event("BackOff")]) is None  # not one that never passes by itself
    assert stuck_reason([event("FailedMount", at="2026-11-27T03:00:01Z"),
                         event("FailedCreatePodSandBox", at="2026-11-27T03:00:05Z", count=7)]) == \
        "FailedCreatePodSandBox (7 times): FailedCreatePodSandBox happened"


def initializing(state: dict[str, Any], phase: str = "Pending") -> dict[str, Any]:
    """A pod in a task's image whose init container (the harness bundle's copy) is in `state`."""
    return {"metadata": {"name": "px-1"}, "status": {"phase": phase, "initContainerStatuses": [
        {"name": "harness", "state": state, "ready": False, "restartCount": 0, "image": "b", "imageID": ""}],
        "containerStatuses": [{"name": "sandbox", "state": {"waiting": {"reason": "PodInitializing"}}}]}}


@pytest.mark.parametrize("state, phase, kind, detail", [
    ({"running": {}}, "Pending", "pending", "PodInitializing"),
    ({"terminated": {"exitCode": 0, "reason": "Completed"}}, "Pending", "pending", "PodInitializing"),
    ({"terminated": {"exitCode": 1, "reason": "Error", "message": "cp: /opt/proctor: Read-only file system\n"}},
     "Failed", "failed", "init container 'harness' failed: Error exit code 1: cp: /opt/proctor: Read-only file system"),
    ({"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image"}}, "Pending", "failed",
     "init container 'harness': ImagePullBackOff: Back-off pulling image"),
])
def test_a_failed_harness_copy_fails_the_start_with_its_reason(state: dict[str, Any], phase: str, kind: str,
                                                               detail: str) -> None:
    got = start_state(initializing(state, phase))
    assert (got.kind, got.detail) == (kind, detail)
