"""The scheduler's admission pass without Ray: what it admits, where, and why the rest waits."""

from __future__ import annotations

from collections import deque

from eval_actors.admission import (
    RELEASE_S,
    AdmissionPass,
    Running,
    in_flight,
    occupied,
    plan_admissions,
    released_view,
)
from eval_actors.capacity import Demand, Node, capacity_summary
from eval_actors.finish import final_status
from eval_actors.shard_queue import QueuedShard

GiB = 1024**3


def cluster() -> list[Node]:
    return [Node("cpu", 8, 32 * GiB, 0, None), Node("h100", 16, 64 * GiB, 2, "H100")]


def queued(eval_id: str, shard_id: str, demand: Demand, owner: str = "alice") -> QueuedShard:
    return QueuedShard(eval_id, shard_id, owner, 0, demand)


def plan(candidates: list[QueuedShard], nodes: list[Node], room: int = 100, gpu_room: int = 100,
         released: dict[str, Node] | None = None) -> AdmissionPass:
    return plan_admissions(candidates, nodes, released or released_view(nodes, deque()), room, gpu_room)


def test_a_pass_admits_what_fits_and_says_why_the_rest_waits() -> None:
    nodes = cluster()
    out = plan([queued("a", "0", Demand(4, GiB)), queued("a", "1", Demand(4, GiB)), queued("a", "2", Demand(4, GiB)),
                queued("g", "0", Demand(1, GiB, 2, "H100")), queued("g", "1", Demand(1, GiB, 1, "H100")),
                queued("x", "0", Demand(1, GiB, 4, "H100"))], nodes)
    assert [(q.eval_id, q.shard_id, n.node_id) for q, n in out.admits] == [
        ("a", "0", "cpu"), ("a", "1", "cpu"), ("a", "2", "h100"), ("g", "0", "h100")]
    assert "no node can ever hold it" in out.reasons["x"]
    assert "g" in out.reasons and out.whole_pass and out.reached == {"a", "g", "x"}
    assert nodes[1].free("GPU") == 0  # the pass took what it admitted


def test_a_gpu_shard_that_does_not_fit_holds_its_type_for_the_rest_of_the_pass() -> None:
    nodes = cluster()
    nodes[1].take(Demand(1, GiB, 1, "H100"))
    out = plan([queued("big", "0", Demand(1, GiB, 2, "H100")), queued("small", "0", Demand(1, GiB, 1, "H100"))], nodes)
    assert out.admits == []
    assert out.reasons["small"] == "waiting behind a larger H100 shard"


def test_room_and_gpu_room_bound_a_pass() -> None:
    out = plan([queued("a", str(i), Demand(1, GiB)) for i in range(5)], cluster(), room=2)
    assert len(out.admits) == 2 and not out.whole_pass
    out = plan([queued("g", "0", Demand(1, GiB, 1, "H100")), queued("a", "0", Demand(1, GiB))], cluster(), gpu_room=0)
    assert [q.eval_id for q, _ in out.admits] == ["a"] and not out.whole_pass and "g" not in out.reached


def test_capacity_freed_a_moment_ago_is_given_out_on_a_later_tick() -> None:
    nodes = cluster()
    releasing = deque([(100.0, "h100", Demand(1, GiB, 2, "H100"))])
    fresh = released_view(nodes, releasing, now=100.0 + RELEASE_S / 2)
    out = plan([queued("g", "0", Demand(1, GiB, 2, "H100"))], nodes, released=fresh)
    assert out.admits == [] and out.reasons == {}  # not a wait reason: the next tick places it
    later = released_view(cluster(), releasing, now=100.0 + RELEASE_S)
    assert not releasing and later["h100"].free("GPU") == 2


def test_wait_reasons_change_only_for_evaluations_the_pass_reached() -> None:
    out = AdmissionPass(reasons={"b": "needs 2×H100"}, reached={"a", "b"}, whole_pass=False)
    assert out.wait_reasons({"a": "old", "c": "kept"}) == {"a": None, "b": "needs 2×H100"}
    out.whole_pass = True
    assert out.wait_reasons({"c": "gone"}) == {"b": "needs 2×H100", "c": None}


def test_what_runs_is_taken_from_the_nodes_and_counted_in_flight() -> None:
    running = [Running("a", "0", "alice", Demand(2, GiB), "cpu", None, 0, supervisor="sup-0"),
               Running("g", "0", "bob", Demand(1, GiB, 1, "H100"), "h100", object(), 0),
               Running("a", "1", "alice", Demand(2, GiB), "gone-node", None, 0)]
    nodes = occupied(cluster(), running)
    assert (nodes[0].free("CPU"), nodes[1].free("GPU")) == (6, 1)
    assert in_flight(running) == ({"alice": 2, "bob": 1}, 2, 1)
    summary = capacity_summary(nodes)
    assert summary["gpus"] == {"H100": {"total": 2, "free": 1}} and summary["cpus"] == {"total": 24, "free": 21}


def test_an_evaluations_final_status_from_its_shards() -> None:
    class S:
        def __init__(self, status: str) -> None:
            self.status = status

    assert final_status([S("succeeded"), S("safety_stopped")], "cancelled") == "safety_stopped"
    assert final_status([S("succeeded"), S("cancelled")], "cancelled") == "cancelled"
    assert final_status([S("succeeded"), S("cancelled")], None) == "failed"
    assert final_status([S("succeeded")], None) == "succeeded"
