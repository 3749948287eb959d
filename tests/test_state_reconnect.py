"""The state store across a lost commit and a database that is briefly away, on SQLite
and on a real PostgreSQL server (cluster/state/reconnect.py).

A lost commit is the hard case of a database restart: the server committed, then the
connection broke before the answer came back, so the store cannot tell whether its write
happened. The driver's commit is wrapped here to commit and then fail once as a broken
connection does; the store's call runs again, and each write must be applied exactly once
and reported as this call's own.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from test_state import db_url  # noqa: F401 - the fixture: an empty database of each backend

from cluster.state import NewShard, StateStore, StateUnavailable
from cluster.state.reconnect import again, is_unreachable

CPU = {"cpus": 1.0, "memory": 512 * 1024**2, "gpus": 0, "gpu_type": None}
SPEC = {"version": 1, "name": "demo", "model": {"adapter": "reference"}}




class LostCommits:
    """The engine's commits go through, then the next `count` of them report a broken
    connection, as a server that restarts right after committing makes them."""

    def __init__(self, store: StateStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        self.lost = 0
        dialect = store._engine.dialect
        error = dialect.loaded_dbapi.OperationalError
        original = dialect.do_commit

        def do_commit(dbapi_conn: Any) -> None:
            original(dbapi_conn)
            if self.count:
                self.count -= 1
                self.lost += 1
                raise error("server closed the connection unexpectedly")

        monkeypatch.setattr(dialect, "do_commit", do_commit)


@pytest.fixture
def store(db_url: str) -> Iterator[StateStore]:
    with StateStore(db_url, retry_s=10) as s:
        yield s


def new_evaluation(store: StateStore, eval_id: str = "ev-1") -> None:
    store.create_evaluation(eval_id, owner="ada", name="demo", spec=SPEC, model="m", runtime="gvisor",
                            shards=[NewShard("s0", ["a", "b"], 2, CPU, max_attempts=3),
                                    NewShard("s1", ["c"], 1, CPU)])


def test_a_lost_commit_of_a_transition_is_applied_once_and_reported_as_this_calls(
        store: StateStore, monkeypatch: pytest.MonkeyPatch) -> None:
    new_evaluation(store)
    lost = LostCommits(store, monkeypatch)
    lost.count = 1
    assert store.transition_shard("ev-1", "s0", "scheduled", expect="queued") is True
    lost.count = 1
    assert store.transition_shard("ev-1", "s0", "running", expect="scheduled") is True
    lost.count = 1
    assert store.transition_shard("ev-1", "s0", "succeeded", expect="running", done_units=2) is True
    lost.count = 1
    assert store.transition_evaluation("ev-1", "scheduled", expect="queued") is True
    assert lost.lost == 4
    ev = store.get_evaluation("ev-1")
    assert ev is not None and ev.status == "scheduled" and ev.done_units == 2  # not 4
    assert [s.status for s in store.shards("ev-1")] == ["succeeded", "queued"]
    # a second, real, call of the same change is still another's: False, nothing added
    assert store.transition_shard("ev-1", "s0", "succeeded", expect="running", done_units=2) is False
    assert store.get_evaluation("ev-1").done_units == 2


def test_a_lost_commit_of_a_retry_uses_one_attempt(store: StateStore, monkeypatch: pytest.MonkeyPatch) -> None:
    new_evaluation(store)
    store.transition_shard("ev-1", "s0", "scheduled", expect="queued")
    lost = LostCommits(store, monkeypatch)
    lost.count = 1
    assert store.transition_shard("ev-1", "s0", "queued", expect="scheduled", error="node lost") is True
    assert lost.lost == 1
    assert store.shards("ev-1")[0].attempt == 1


def test_lost_commits_of_inserts_store_one_row_each(store: StateStore, monkeypatch: pytest.MonkeyPatch) -> None:
    lost = LostCommits(store, monkeypatch)
    lost.count = 1
    new_evaluation(store)  # not "ev-1 already exists"
    lost.count = 1
    store.add_incident("ev-1", rule="resources/memory", severity="high", action="stop", evidence={"rss": 1})
    lost.count = 1
    store.create_user("ada", "admin")
    lost.count = 1
    secret, token = store.create_token("ada", "ci")
    lost.count = 1
    store.add_done_units("ev-1", 3)
    assert lost.lost == 5
    assert len(store.shards("ev-1")) == 2 and len(store.incidents("ev-1")) == 1
    assert [u.name for u in store.list_users()] == ["ada"]
    assert [t.id for t in store.list_tokens("ada")] == [token.id]
    assert store.verify_token(secret) is not None
    assert store.get_evaluation("ev-1").done_units == 3


def test_without_a_retry_window_an_unreachable_database_fails_at_once(db_url: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    with StateStore(db_url) as store:  # retry_s=0: the API's store
        new_evaluation(store)
        lost = LostCommits(store, monkeypatch)
        lost.count = 1
        with pytest.raises(StateUnavailable) as caught:
            store.transition_evaluation("ev-1", "scheduled", expect="queued")
        assert caught.value.ambiguous is True and caught.value.transient is True
        assert store.get_evaluation("ev-1").status == "scheduled"  # it had been committed after all


def test_only_unreachable_databases_are_retried_and_only_for_the_window() -> None:
    from sqlalchemy.exc import OperationalError

    assert is_unreachable(OperationalError("SELECT 1", {}, Exception("terminating connection due to "
                                                                        "administrator command")))
    assert is_unreachable(OperationalError("SELECT 1", {}, Exception("the database system is starting up")))
    assert not is_unreachable(OperationalError("SELECT 1", {}, Exception('relation "x" does not exist')))
    clock = [0.0]
    calls: list[float] = []

    def away() -> None:
        calls.append(clock[0])
        raise StateUnavailable("away")

    with pytest.raises(StateUnavailable):
        again(away, 5.0, "test", sleep=lambda s: clock.__setitem__(0, clock[0] + s), clock=lambda: clock[0],
              rand=lambda: 1.0)
    assert len(calls) > 3 and calls[-1] <= 5.0  # backed off, and gave up inside its window
    with pytest.raises(ValueError):
        again(lambda: (_ for _ in ()).throw(ValueError("no")), 5.0, "test", sleep=lambda s: None)


class BrokenReads:
    """The next `count` statements fail as on a connection the server dropped."""

    def __init__(self, store: StateStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        dialect = store._engine.dialect
        error = dialect.loaded_dbapi.OperationalError
        original = dialect.do_execute

        def do_execute(cursor: Any, statement: Any, parameters: Any, context: Any = None) -> None:
            if self.count:
                self.count -= 1
                raise error("server closed the connection unexpectedly")
            original(cursor, statement, parameters, context)

        monkeypatch.setattr(dialect, "do_execute", do_execute)


def test_reads_of_one_shard_ride_out_a_dropped_connection(store: StateStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a supervisor reads as a shard starts (a connection reset there failed the shard)."""
    new_evaluation(store)
    broken = BrokenReads(store, monkeypatch)
    broken.count = 1
    shard = store.shard("ev-1", "s0")
    assert shard is not None and shard.sample_ids == ("a", "b") and broken.count == 0
    broken.count = 1
    assert store.get_evaluation("ev-1") is not None and broken.count == 0


def test_every_call_of_the_store_that_reaches_the_database_retries() -> None:
    """Each public method is `retried` (or only calls methods that are): one left out lets a
    moment's reset fail whatever called it."""
    delegates = {"close", "create_token"}  # close() ends the engine; create_token stores through _store_token
    plain = [name for name, member in vars(StateStore).items()
             if callable(member) and not name.startswith("_") and name not in delegates
             and not hasattr(member, "__wrapped__")]
    assert plain == []
