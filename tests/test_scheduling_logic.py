"""The scheduler's pure parts: capacity arithmetic, the fair queue, and the event log."""

from __future__ import annotations

from eval_actors.capacity import Demand, Node, can_ever_fit, choose_node, wait_reason
from eval_actors.events import EventLog
from eval_actors.shard_queue import QueuedShard, ShardQueue

GiB = 1024**3


def nodes() -> list[Node]:
    return [
        Node("cpu", 8, 32 * GiB, 0, None),
        Node("h100-a", 16, 64 * GiB, 4, "H100"),
        Node("h100-b", 16, 64 * GiB, 4, "H100"),
        Node("a100", 16, 64 * GiB, 2, "A100"),
    ]


def test_gpu_types_must_match() -> None:
    ns = nodes()
    assert choose_node(ns, Demand(1, GiB, 2, "A100")).node_id == "a100"
    assert choose_node(ns, Demand(1, GiB, 3, "A100")) is None
    assert not can_ever_fit(ns, Demand(1, GiB, 3, "A100"))


def test_cpu_work_keeps_off_gpu_nodes() -> None:
    assert choose_node(nodes(), Demand(2, GiB)).node_id == "cpu"


def test_best_fit_keeps_a_whole_node_free_for_large_shards() -> None:
    ns = nodes()
    ns[1].take(Demand(1, GiB, 3, "H100"))  # h100-a has 1 left
    assert choose_node(ns, Demand(1, GiB, 1, "H100")).node_id == "h100-a"
    assert choose_node(ns, Demand(1, GiB, 4, "H100")).node_id == "h100-b"


def test_multi_gpu_is_all_or_nothing_on_one_node() -> None:
    ns = nodes()
    ns[1].take(Demand(1, GiB, 2, "H100"))
    ns[2].take(Demand(1, GiB, 2, "H100"))
    d = Demand(1, GiB, 4, "H100")
    assert choose_node(ns, d) is None  # 4 free in total, but never split
    assert wait_reason(ns, d) == "waiting for 4 x H100 on one node; 4 free but at most 2 on any node"


def test_wait_reasons_say_what_and_how_much() -> None:
    ns = nodes()
    ns[1].take(Demand(1, GiB, 3, "H100"))
    ns[2].take(Demand(1, GiB, 4, "H100"))
    assert wait_reason(ns, Demand(1, GiB, 2, "H100")) == "waiting for 2 x H100; 1 free"
    assert "no L4 nodes" in wait_reason(ns, Demand(1, GiB, 1, "L4"))
    assert wait_reason(ns, Demand(64, GiB)).startswith("waiting for 64 CPU")


def q(eval_id: str, owner: str, priority: int = 0, shard: str = "0") -> QueuedShard:
    return QueuedShard(eval_id, shard, owner, priority, Demand(1, GiB))


def test_priority_comes_first_then_age() -> None:
    queue = ShardQueue()
    queue.push(q("old-low", "a"))
    queue.push(q("new-high", "a", priority=10))
    queue.push(q("new-low", "a"))
    assert [s.eval_id for s in queue.candidates({})] == ["new-high", "old-low", "new-low"]


def test_one_users_thousand_shards_do_not_starve_anothers_one() -> None:
    queue = ShardQueue()
    for i in range(1000):
        queue.push(q("big", "alice", shard=f"{i:04d}"))
    queue.push(q("small", "bob"))
    order = [s.owner for s in queue.candidates({})]
    assert order.index("bob") <= 1
    order = [s.owner for s in queue.candidates({"bob": 3})]
    assert order.index("bob") <= 4  # even with some running, bob waits behind a few of alice's


def test_queue_remove_and_membership() -> None:
    queue = ShardQueue()
    queue.push(q("e", "a", shard="1"))
    queue.push(q("e", "a", shard="2"))
    queue.push(q("e", "a", shard="1"))  # twice is once
    assert len(queue) == 2 and ("e", "1") in queue
    assert queue.remove("e", "1") and not queue.remove("e", "1")
    assert [s.shard_id for s in queue.remove_evaluation("e")] == ["2"]
    assert len(queue) == 0 and list(queue.candidates({})) == []


def test_event_log_resumes_from_a_sequence_number() -> None:
    log = EventLog(keep=100, per_eval=10)
    log.append([{"type": "log", "eval_id": "a", "n": i} for i in range(5)])
    log.append([{"type": "log", "eval_id": "b", "n": 5}])
    first = log.since(0, "a", limit=3)
    assert [e["n"] for e in first["events"]] == [0, 1, 2]
    rest = log.since(first["last_seq"], "a")
    assert [e["n"] for e in rest["events"]] == [3, 4]
    assert [e["n"] for e in log.since(0)["events"]] == list(range(6))


def test_event_log_is_bounded_and_reports_gaps() -> None:
    log = EventLog(keep=50, per_eval=10)
    log.append([{"type": "progress", "eval_id": "a"} for _ in range(200)])
    assert len(log.all) == 50 and len(log.by_eval["a"]) == 10
    late = log.since(5, "a")
    assert late["gap"] is True and len(late["events"]) == 10


def test_a_multi_gpu_bundle_fits_a_node_as_ray_declares_it() -> None:
    """Ray gives a GPU node `accelerator_type:<TYPE>: 1` whatever its GPU count; a shard of
    4 x H100 must still fit a 4-GPU node, and eight 1-GPU shards an 8-GPU one."""
    node = {"CPU": 16.0, "GPU": 8.0, "memory": 64.0 * GiB, "accelerator_type:H100": 1.0}
    big = Demand(1, GiB, 4, "H100").bundle()
    assert big["GPU"] == 4 and all(node[k] >= v for k, v in big.items())
    small = Demand(1, GiB, 1, "H100").bundle()
    assert 8 * small["accelerator_type:H100"] <= node["accelerator_type:H100"]
    assert Node.from_ray("n", node).gpu_type == "H100"
