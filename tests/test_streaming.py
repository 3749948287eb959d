"""The API's log merge and WebSocket loop (`serve_app/streaming.py`), without a server: the
event bus is a script of its answers, the client a list of what was sent, and waiting is
counted instead of slept."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from serve_app.streaming import RETRY_S, log_filter, log_lines, relay_events


class Bus:
    """Answers `read(after, wait_s)` from a script: each item an answer (dict) or an
    exception to raise. Records every read; past the script it answers nothing new."""

    def __init__(self, *script: Any, epoch: str = "e1") -> None:
        self.script = list(script)
        self.reads: list[tuple[int, float]] = []
        self.epoch = epoch

    async def read(self, after: int, wait_s: float) -> dict[str, Any]:
        self.reads.append((after, wait_s))
        if not self.script:
            return {"events": [], "last_seq": after, "epoch": self.epoch}
        item = self.script.pop(0)
        if isinstance(item, Exception):
            raise item
        return {"epoch": self.epoch, **item}


def log(seq: int, n: int, message: str, level: str = "info", shard: str = "00000", attempt: int = 1) -> dict[str, Any]:
    return {"type": "log", "seq": seq, "ts": 1.0, "shard_id": shard, "attempt": attempt, "n": n, "level": level,
            "message": message, "eval_id": "ev"}


def status(seq: int, value: str, eval_id: str = "ev") -> dict[str, Any]:
    return {"type": "status", "seq": seq, "eval_id": eval_id, "status": value}


class Clock:
    def __init__(self) -> None:
        self.slept: list[float] = []

    async def sleep(self, s: float) -> None:
        self.slept.append(s)


def ended_after(answers: list[bool]) -> Any:
    async def ended() -> bool:
        return answers.pop(0) if answers else True
    return ended


async def collect(lines: AsyncIterator[str]) -> list[dict[str, Any]]:
    return [json.loads(line) async for line in lines]


def kept(*lines: dict[str, Any]) -> Any:
    async def read() -> list[dict[str, Any]]:
        return [dict(line) for line in lines]
    return read


# ------------------------------------------------------------ log_lines


def test_kept_lines_come_first_and_a_live_line_already_kept_is_not_sent_twice() -> None:
    bus = Bus({"events": [log(5, 0, "kept one"), log(6, 2, "live only")], "last_seq": 6})
    out = asyncio.run(collect(log_lines(kept(log(0, 0, "kept one"), log(0, 1, "kept two")), bus.read,
                                        ended_after([]), keep=log_filter(None, None), follow=False, after=0,
                                        poll_s=10.0)))
    assert [line["message"] for line in out] == ["kept one", "kept two", "live only"]
    assert set(out[0]) == {"seq", "ts", "shard_id", "attempt", "level", "message"}
    assert bus.reads == [(0, 0.0), (6, 0.0)]  # not following: no waiting on the bus


def test_a_resumed_read_skips_the_kept_lines_and_starts_after_the_given_seq() -> None:
    bus = Bus({"events": [log(8, 3, "after eight")], "last_seq": 8})
    out = asyncio.run(collect(log_lines(kept(log(0, 0, "kept")), bus.read, ended_after([]),
                                        keep=log_filter(None, None), follow=False, after=7, poll_s=10.0)))
    assert [line["message"] for line in out] == ["after eight"]
    assert bus.reads[0] == (7, 0.0)


def test_the_filter_keeps_the_level_and_above_and_the_text_in_any_case() -> None:
    keep = log_filter("warning", "DISK")
    assert keep({"level": "error", "message": "disk full"})
    assert keep({"level": "warning", "message": "Disk slow"})
    assert not keep({"level": "info", "message": "disk ok"})
    assert not keep({"level": "error", "message": "network down"})
    assert log_filter(None, None)({"level": "nonsense", "message": ""})  # unknown levels count as info
    assert not log_filter("warning", None)({"level": "nonsense"})


def test_following_waits_on_the_bus_until_a_final_status_and_then_drains_it() -> None:
    bus = Bus({"events": [log(1, 0, "one")], "last_seq": 1},
              {"events": [], "last_seq": 1},
              {"events": [log(2, 1, "two"), status(3, "succeeded")], "last_seq": 3},
              {"events": [log(4, 2, "late")], "last_seq": 4})
    out = asyncio.run(collect(log_lines(kept(), bus.read, ended_after([False]), keep=log_filter(None, None),
                                        follow=True, after=0, poll_s=10.0)))
    assert [line["message"] for line in out] == ["one", "two", "late"]
    # it long-polls while the evaluation runs, and no longer once it has ended
    assert bus.reads == [(0, 10.0), (1, 10.0), (1, 10.0), (3, 0.0), (4, 0.0)]


def test_following_ends_when_the_store_says_the_evaluation_ended_on_a_quiet_bus() -> None:
    bus = Bus()
    out = asyncio.run(collect(log_lines(kept(log(0, 0, "kept")), bus.read, ended_after([False, True]),
                                        keep=log_filter(None, None), follow=True, after=0, poll_s=10.0)))
    assert [line["message"] for line in out] == ["kept"]
    assert bus.reads == [(0, 10.0), (0, 10.0), (0, 0.0)]


def test_a_bus_that_does_not_answer_ends_a_plain_read_and_is_asked_again_when_following() -> None:
    plain = Bus(RuntimeError("restarting"))
    out = asyncio.run(collect(log_lines(kept(log(0, 0, "kept")), plain.read, ended_after([]),
                                        keep=log_filter(None, None), follow=False, after=0, poll_s=10.0)))
    assert [line["message"] for line in out] == ["kept"] and len(plain.reads) == 1

    clock = Clock()
    following = Bus(RuntimeError("restarting"), {"events": [log(1, 0, "back"), status(2, "failed")], "last_seq": 2})
    out = asyncio.run(collect(log_lines(kept(), following.read, ended_after([False]), keep=log_filter(None, None),
                                        follow=True, after=0, poll_s=10.0, sleep=clock.sleep)))
    assert [line["message"] for line in out] == ["back"]
    assert clock.slept == [RETRY_S]


# ------------------------------------------------------------ relay_events


class Socket:
    def __init__(self, leave_after: int | None = None) -> None:
        self.sent: list[dict[str, Any]] = []
        self.leave_after = leave_after

    async def send(self, event: dict[str, Any]) -> None:
        if self.leave_after is not None and len(self.sent) >= self.leave_after:
            raise ConnectionResetError("the client left")
        self.sent.append(event)


async def everyone(_: dict[str, Any]) -> bool:
    return True


def test_one_evaluations_stream_ends_with_its_final_status() -> None:
    ws = Socket()
    bus = Bus({"events": [status(1, "running"), log(2, 0, "hi")], "last_seq": 2},
              {"events": [status(3, "succeeded")], "last_seq": 3},
              {"events": [log(4, 1, "never sent")], "last_seq": 4})
    asyncio.run(relay_events(ws.send, bus.read, everyone, ended_after([False]), after=0, poll_s=10.0))
    assert [e["seq"] for e in ws.sent] == [1, 2, 3]
    assert bus.reads == [(0, 10.0), (2, 10.0)]


def test_one_evaluations_stream_on_a_quiet_bus_ends_when_the_store_says_so() -> None:
    ws = Socket()
    asyncio.run(relay_events(ws.send, Bus().read, everyone, ended_after([False, False, True]), after=5,
                             poll_s=10.0))
    assert ws.sent == []


def test_events_the_caller_may_not_see_are_not_sent_and_do_not_end_the_stream() -> None:
    ws = Socket()

    async def own(event: dict[str, Any]) -> bool:
        return event.get("eval_id") == "mine"

    bus = Bus({"events": [status(1, "succeeded", "theirs"), status(2, "running", "mine")], "last_seq": 2},
              {"events": [status(3, "failed", "mine")], "last_seq": 3})
    asyncio.run(relay_events(ws.send, bus.read, own, ended_after([False]), after=0, poll_s=10.0))
    assert [e["seq"] for e in ws.sent] == [2, 3]


def test_a_restarted_bus_is_a_gap_and_is_read_from_its_start() -> None:
    ws = Socket()
    bus = Bus({"events": [log(7, 0, "old bus")], "last_seq": 7})
    restarted = Bus({"events": [status(1, "cancelled")], "last_seq": 1},  # read after 7: its answer is dropped
                    {"events": [status(1, "cancelled")], "last_seq": 1}, epoch="e2")

    async def read(after: int, wait_s: float) -> dict[str, Any]:
        return await (bus.read if len(bus.reads) < 1 else restarted.read)(after, wait_s)

    asyncio.run(relay_events(ws.send, read, everyone, ended_after([False]), after=0, poll_s=10.0))
    assert ws.sent[0]["message"] == "old bus"
    assert ws.sent[1] == {"type": "gap", "seq": 7, "reason": "the event bus restarted"}
    assert [e.get("status") for e in ws.sent[2:]] == ["cancelled"]
    assert restarted.reads == [(7, 10.0), (0, 10.0)]  # the first answer shows the new epoch; then from 0


def test_a_bus_that_does_not_answer_is_a_gap_and_dropped_events_are_a_gap_too() -> None:
    ws, clock = Socket(), Clock()
    bus = Bus(RuntimeError("restarting"),
              {"events": [status(9, "succeeded")], "last_seq": 9, "gap": True})
    asyncio.run(relay_events(ws.send, bus.read, everyone, ended_after([]), after=3, poll_s=10.0, sleep=clock.sleep))
    assert [(e["type"], e.get("seq")) for e in ws.sent] == [("gap", 3), ("gap", 3), ("status", 9)]
    assert ws.sent[0]["reason"] == "the event bus is restarting"
    assert ws.sent[1]["reason"] == "events were dropped: this client fell too far behind"
    assert clock.slept == [RETRY_S]


def test_the_all_evaluations_stream_runs_until_the_client_leaves() -> None:
    ws = Socket(leave_after=2)
    bus = Bus({"events": [status(1, "succeeded", "a")], "last_seq": 1},
              {"events": [status(2, "failed", "b")], "last_seq": 2},
              {"events": [status(3, "queued", "c")], "last_seq": 3})
    with pytest.raises(ConnectionResetError):
        asyncio.run(relay_events(ws.send, bus.read, everyone, None, after=0, poll_s=10.0))
    assert [e["seq"] for e in ws.sent] == [1, 2]  # final statuses of others end nothing
