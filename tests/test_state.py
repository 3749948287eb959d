"""The state store, the same tests on SQLite (a file) and on a real PostgreSQL server."""

from __future__ import annotations

import hashlib
import pickle
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import bindparam, create_engine, inspect, text
from sqlalchemy.engine import make_url

from cluster.state import (
    TERMINAL,
    TRANSITIONS,
    ConflictError,
    Evaluation,
    NewShard,
    NotFoundError,
    RetriesExhaustedError,
    StateError,
    StateStore,
)
from cluster.state import migrations
from cluster.state.models import Base, UTCDateTime

LONG_AGO = datetime(2000, 1, 1, tzinfo=timezone.utc)
SPEC = {"version": 1, "name": "demo", "model": {"adapter": "reference"}}
CPU = {"cpus": 1.0, "memory": 512 * 1024**2, "gpus": 0, "gpu_type": None}


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[str]:
    """An empty database of each backend: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/state.db"
        return
    base = request.getfixturevalue("postgres_url")
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        yield make_url(base).set(database=name).render_as_string(hide_password=False)
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        admin.dispose()


@pytest.fixture
def store(db_url: str) -> Iterator[StateStore]:
    with StateStore(db_url) as s:
        yield s


def raw(url: str, sql: str, **params: Any) -> list[Any]:
    """Rows of a query run straight on the database, past the store."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(text(sql), params).all())
    finally:
        engine.dispose()


def set_column(url: str, table: str, column: str, value: datetime) -> None:
    """Set a timestamp column in every row, past the store (as the store would write it)."""
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            stmt = text(f"UPDATE {table} SET {column} = :v").bindparams(bindparam("v", type_=UTCDateTime))
            conn.execute(stmt, {"v": value})
    finally:
        engine.dispose()


def new_eval(store: StateStore, id: str, *, shards: int = 2, **kw: Any) -> Evaluation:
    args: dict[str, Any] = dict(owner="alice", name=f"eval {id}", spec=SPEC, model="reference", runtime="gvisor",
                                shards=[NewShard(f"s{i}", [f"x{i}", f"y{i}"], 4, CPU) for i in range(shards)])
    return store.create_evaluation(id, **(args | kw))


# ---------------------------------------------------------------- schema


def test_opening_migrates_to_head_and_reopening_is_a_noop(db_url: str) -> None:
    with StateStore(db_url) as store:
        new_eval(store, "ev-1")
    tables = set(inspect_tables(db_url))
    assert {"users", "tokens", "evaluations", "shards", "incidents", "alembic_version"} <= tables
    assert raw(db_url, "SELECT version_num FROM alembic_version") == [(migrations.head(),)]
    with StateStore(db_url) as again:
        assert again.get_evaluation("ev-1") is not None
    assert raw(db_url, "SELECT version_num FROM alembic_version") == [(migrations.head(),)]


def test_head_is_alembics_head_and_reopening_does_not_load_alembic(db_url: str) -> None:
    assert migrations.HEAD == migrations.head()  # a new revision moves HEAD with it
    StateStore(db_url).close()
    code = ("import sys; from cluster.state import StateStore; StateStore(sys.argv[1]).close(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'alembic'))")
    out = subprocess.run([sys.executable, "-c", code, db_url], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_a_database_of_a_newer_proctor_is_refused_and_left_as_it_is(db_url: str) -> None:
    StateStore(db_url).close()
    engine = create_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    finally:
        engine.dispose()
    with pytest.raises(StateError, match="upgrade Proctor"):
        StateStore(db_url)
    assert raw(db_url, "SELECT version_num FROM alembic_version") == [("9999",)]


def inspect_tables(url: str) -> list[str]:
    engine = create_engine(url)
    try:
        return inspect(engine).get_table_names()
    finally:
        engine.dispose()


def test_migrations_match_the_models(store: StateStore, db_url: str) -> None:
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    finally:
        engine.dispose()
    assert diff == []


def test_sqlite_runs_in_wal_with_foreign_keys(tmp_path: Any) -> None:
    with StateStore(f"sqlite:///{tmp_path}/deep/er/state.db") as store:
        with store._engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000


def test_bad_urls_and_unreachable_servers_raise_state_error(tmp_path: Any) -> None:
    with pytest.raises(StateError, match="not a database URL"):
        StateStore("not a url")
    with pytest.raises(StateError, match="not supported"):
        StateStore("mysql://localhost/db")
    with pytest.raises(StateError, match="reachable"):
        StateStore("postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=2")
    (tmp_path / "file").write_text("")
    with pytest.raises(StateError, match="writable path"):
        StateStore(f"sqlite:///{tmp_path}/file/state.db")


# ---------------------------------------------------------------- evaluations


def test_create_stores_the_evaluation_and_its_shards(store: StateStore) -> None:
    ev = new_eval(store, "ev-1", shards=3, labels={"team": "red"}, priority=5)
    assert (ev.status, ev.priority, ev.labels, ev.spec) == ("queued", 5, {"team": "red"}, SPEC)
    assert (ev.total_shards, ev.total_units, ev.done_units, ev.version) == (3, 12, 0, 1)
    assert ev.created_at.tzinfo is not None and ev.created_at == ev.updated_at
    assert store.get_evaluation("ev-1") == ev
    assert store.get_evaluation("ev-nope") is None
    shards = store.shards("ev-1")
    assert [s.shard_id for s in shards] == ["s0", "s1", "s2"]
    assert shards[1].sample_ids == ("x1", "y1") and shards[1].resources == CPU
    assert (shards[0].status, shards[0].attempt, shards[0].max_attempts, shards[0].units) == ("queued", 0, 3, 4)


def test_one_shard_is_found_by_its_id(store: StateStore) -> None:
    new_eval(store, "ev-1", shards=3)
    new_eval(store, "ev-2", shards=1)
    assert store.shard("ev-1", "s1") == store.shards("ev-1")[1]
    assert store.shard("ev-2", "s0") == store.shards("ev-2")[0] != store.shard("ev-1", "s0")
    assert store.shard("ev-1", "s9") is None and store.shard("ev-nope", "s0") is None


def test_a_duplicate_id_is_a_conflict_and_stores_nothing(store: StateStore) -> None:
    new_eval(store, "ev-1", shards=1)
    with pytest.raises(ConflictError, match="ev-1 already exists"):
        new_eval(store, "ev-1", shards=3)
    assert len(store.shards("ev-1")) == 1
    with pytest.raises(StateError, match="shard ids repeat"):
        store.create_evaluation("ev-2", owner="a", name="n", spec={}, model="m", runtime="gvisor",
                                shards=[NewShard("s0", [], 0, CPU)] * 2)
    assert store.get_evaluation("ev-2") is None


def test_list_filters_by_status_owner_label_and_text(store: StateStore) -> None:
    new_eval(store, "ev-1", owner="alice", name="Cyber uplift", labels={"team": "red"})
    new_eval(store, "ev-2", owner="bob", name="bio", model="openai:gpt-4o", labels={"team": "blue"})
    new_eval(store, "ev-3", owner="alice", name="100% done_", labels={"team": "red", "tier": "1"})
    store.transition_evaluation("ev-2", "scheduled")

    def ids(**kw: Any) -> list[str]:
        return [e.id for e in store.list_evaluations(**kw)[0]]

    assert ids() == ["ev-3", "ev-2", "ev-1"]
    assert ids(status="scheduled") == ["ev-2"]
    assert ids(status=["queued", "scheduled"]) == ["ev-3", "ev-2", "ev-1"]
    assert ids(owner="alice") == ["ev-3", "ev-1"]
    assert ids(label=("team", "red")) == ["ev-3", "ev-1"]
    assert ids(label=("tier", "1"), owner="alice") == ["ev-3"]
    assert ids(label=("team", "green")) == []
    assert ids(text="CYBER") == ["ev-1"]
    assert ids(text="gpt-4") == ["ev-2"]
    assert ids(text="0% done_") == ["ev-3"]  # % and _ are literal
    assert ids(text="%") == ["ev-3"]
    assert ids(owner="alice", status="scheduled") == []


def test_a_listing_carries_only_the_listed_parts_of_each_spec(store: StateStore) -> None:
    big = {**SPEC, "dataset": {"path": "s3://b/suite.jsonl"}, "sandbox": {"gpu": {"count": 8, "type": "H100"}},
           "notes": "x" * 100_000}
    new_eval(store, "ev-gpu", spec=big)
    new_eval(store, "ev-cpu")  # a spec with neither part
    listed = {e.id: e for e in store.list_evaluations()[0]}
    assert listed["ev-gpu"].spec == {"sandbox": {"gpu": {"count": 8, "type": "H100"}},
                                     "dataset": {"path": "s3://b/suite.jsonl"}}
    assert listed["ev-cpu"].spec == {}
    assert store.get_evaluation("ev-gpu").spec == big  # whole where one evaluation is read
    whole = store.get_evaluation("ev-gpu")
    assert {f: getattr(listed["ev-gpu"], f) for f in vars(whole) if f != "spec"} == \
        {f: getattr(whole, f) for f in vars(whole) if f != "spec"}


def test_cursor_pages_return_every_item_once_despite_inserts(store: StateStore) -> None:
    for i in range(23):
        new_eval(store, f"ev-{i:02d}", shards=0)
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        items, cursor = store.list_evaluations(limit=5, cursor=cursor)
        seen += [e.id for e in items]
        pages += 1
        new_eval(store, f"ev-new-{pages}", shards=0)  # newer than every listed item
        if cursor is None:
            break
    assert pages == 5
    assert seen == [f"ev-{i:02d}" for i in reversed(range(23))]
    with pytest.raises(StateError, match="not one this store returned"):
        store.list_evaluations(cursor="garbage!")
    with pytest.raises(StateError, match="limit"):
        store.list_evaluations(limit=0)


def test_cursor_pages_through_equal_timestamps_by_id(store: StateStore, db_url: str) -> None:
    for i in range(7):
        new_eval(store, f"ev-{i}", shards=0)
    set_column(db_url, "evaluations", "created_at", LONG_AGO)  # one instant for all: the id breaks ties
    seen, cursor = [], None
    while True:
        items, cursor = store.list_evaluations(limit=3, cursor=cursor)
        seen += [e.id for e in items]
        if cursor is None:
            break
    assert seen == [f"ev-{i}" for i in reversed(range(7))]


# ---------------------------------------------------------------- transitions


def test_a_full_run_sets_timestamps_and_versions(store: StateStore) -> None:
    ev = new_eval(store, "ev-1")
    store.update_evaluation("ev-1", wait_reason="needs 2×H100")
    assert store.get_evaluation("ev-1").wait_reason == "needs 2×H100"
    assert store.transition_evaluation("ev-1", "scheduled")
    scheduled = store.get_evaluation("ev-1")
    assert scheduled.scheduled_at and not scheduled.started_at and scheduled.wait_reason is None
    assert store.transition_evaluation("ev-1", "running")
    assert store.transition_evaluation("ev-1", "succeeded", summary={"accuracy": 0.9}, done_units=8,
                                       results_uri="file:///r/eval_id=ev-1")
    done = store.get_evaluation("ev-1")
    assert done.status == "succeeded" and done.terminal
    assert ev.created_at <= done.scheduled_at <= done.started_at <= done.finished_at
    assert (done.summary, done.done_units, done.results_uri) == ({"accuracy": 0.9}, 8, "file:///r/eval_id=ev-1")
    assert done.version == ev.version + 4


def test_illegal_transitions_raise_naming_both_states(store: StateStore) -> None:
    new_eval(store, "ev-1")
    with pytest.raises(ConflictError, match="cannot go from queued to running"):
        store.transition_evaluation("ev-1", "running")
    with pytest.raises(ConflictError, match="cannot go from queued to succeeded"):
        store.transition_evaluation("ev-1", "succeeded")
    assert store.transition_evaluation("ev-1", "cancelled", error="cancelled by alice")
    with pytest.raises(ConflictError, match="from cancelled to queued; from cancelled it may go to nothing"):
        store.transition_evaluation("ev-1", "queued")
    assert store.transition_evaluation("ev-1", "cancelled") is False  # already there: nothing won
    with pytest.raises(StateError, match="'paused' is not a evaluation status"):
        store.transition_evaluation("ev-1", "paused")
    with pytest.raises(NotFoundError, match="evaluation ev-9 does not exist"):
        store.transition_evaluation("ev-9", "scheduled")
    with pytest.raises(TypeError, match="unknown field"):
        store.transition_evaluation("ev-1", "failed", colour="red")
    assert store.get_evaluation("ev-1").status == "cancelled"


def test_expect_makes_a_transition_conditional(store: StateStore) -> None:
    new_eval(store, "ev-1")
    with pytest.raises(ConflictError, match="cannot go from queued to running"):
        store.transition_evaluation("ev-1", "running", expect="queued")
    assert store.transition_evaluation("ev-1", "cancelled", expect="running") is False
    assert store.transition_evaluation("ev-1", "cancelled", expect=["queued", "running"])
    assert store.transition_evaluation("ev-1", "failed", expect="queued") is False


def test_interrupted_only_goes_back_to_queued_or_ends(store: StateStore) -> None:
    for i in range(3):
        new_eval(store, f"ev-{i}")
        store.transition_evaluation(f"ev-{i}", "scheduled")
        store.transition_evaluation(f"ev-{i}", "running")
        assert store.transition_evaluation(f"ev-{i}", "interrupted")
    with pytest.raises(ConflictError, match="from interrupted to running"):
        store.transition_evaluation("ev-0", "running")
    assert store.transition_evaluation("ev-0", "queued")
    assert store.transition_evaluation("ev-1", "failed", error="lost in a crash")
    assert store.transition_evaluation("ev-2", "succeeded")
    assert [e.id for e in store.active_evaluations()] == ["ev-0"]


def test_the_transition_table_is_closed_and_final(store: StateStore) -> None:
    for kind, table in TRANSITIONS.items():
        for source, targets in table.items():
            assert targets <= set(table), (kind, source)
            assert (not targets) == (source in TERMINAL), (kind, source)
    assert "interrupted" not in TRANSITIONS["shard"]


def test_racing_actors_exactly_one_wins(store: StateStore) -> None:
    for r in range(5):
        new_eval(store, f"ev-{r}", shards=1)
        won: dict[str, list[bool]] = {"evaluation": [], "shard": []}
        barrier = threading.Barrier(8)

        def race(kind: str) -> None:
            barrier.wait()
            if kind == "evaluation":
                won[kind].append(store.transition_evaluation(f"ev-{r}", "scheduled"))
            else:
                won[kind].append(store.transition_shard(f"ev-{r}", "s0", "scheduled", placement="n"))

        threads = [threading.Thread(target=race, args=(kind,)) for kind in ["evaluation", "shard"] * 4]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(won["evaluation"]) == sorted(won["shard"]) == [False, False, False, True]
        assert store.get_evaluation(f"ev-{r}").version == 2


# ---------------------------------------------------------------- shards


def test_shard_lifecycle_fields_and_timestamps(store: StateStore) -> None:
    new_eval(store, "ev-1", shards=2)
    assert store.transition_shard("ev-1", "s0", "scheduled", placement="node-a", supervisor="sup-1")
    assert store.transition_shard("ev-1", "s0", "running", sandbox_id="sb-1")
    s0 = store.shards("ev-1")[0]
    assert (s0.status, s0.placement, s0.supervisor, s0.sandbox_id) == ("running", "node-a", "sup-1", "sb-1")
    assert s0.started_at and not s0.finished_at
    store.update_shard("ev-1", "s0", sandbox_id="sb-2")
    assert store.transition_shard("ev-1", "s0", "succeeded")
    s0 = store.shards("ev-1")[0]
    assert s0.sandbox_id == "sb-2" and s0.finished_at >= s0.started_at
    with pytest.raises(ConflictError, match="shard ev-1/s0: cannot go from succeeded to running"):
        store.transition_shard("ev-1", "s0", "running")
    with pytest.raises(NotFoundError, match="shard ev-1/s9"):
        store.transition_shard("ev-1", "s9", "scheduled")
    with pytest.raises(NotFoundError):
        store.update_shard("ev-1", "s9", error="x")
    assert [s.shard_id for s in store.shards_by_status("queued")] == ["s1"]
    assert [s.shard_id for s in store.shards_by_status(["queued", "succeeded"])] == ["s0", "s1"]


def test_shard_retries_are_bounded_by_max_attempts(store: StateStore) -> None:
    store.create_evaluation("ev-1", owner="a", name="n", spec={}, model="m", runtime="gvisor",
                            shards=[NewShard("s0", ["a"], 1, CPU, max_attempts=3)])
    for attempt in (1, 2):
        store.transition_shard("ev-1", "s0", "scheduled", placement="node-a")
        store.transition_shard("ev-1", "s0", "running", sandbox_id=f"sb-{attempt}")
        assert store.transition_shard("ev-1", "s0", "queued", error="node lost")
        shard = store.shards("ev-1")[0]
        assert (shard.status, shard.attempt, shard.error) == ("queued", attempt, "node lost")
        assert (shard.sandbox_id, shard.placement, shard.started_at) == (None, None, None)
    store.transition_shard("ev-1", "s0", "scheduled")
    assert not store.shards("ev-1")[0].can_retry
    with pytest.raises(RetriesExhaustedError, match="used 3 of its 3 attempts"):
        store.transition_shard("ev-1", "s0", "queued")
    assert store.shards("ev-1")[0].status == "scheduled"
    assert store.transition_shard("ev-1", "s0", "failed", error="3 attempts failed")
    new_eval(store, "ev-2", shards=1)
    with pytest.raises(ConflictError, match="from queued to queued"):
        store.transition_shard("ev-2", "s0", "queued", expect="queued")


def test_done_units_counts_and_active(store: StateStore) -> None:
    new_eval(store, "ev-1")
    new_eval(store, "ev-2")
    store.transition_evaluation("ev-2", "scheduled")
    store.transition_evaluation("ev-2", "running")
    store.add_done_units("ev-2", 3)
    store.add_done_units("ev-2", 2)
    ev = store.get_evaluation("ev-2")
    assert ev.done_units == 5
    assert store.update_evaluation("ev-2", expected_version=ev.version, done_units=6)
    assert not store.update_evaluation("ev-2", expected_version=ev.version, done_units=7)
    assert store.get_evaluation("ev-2").done_units == 6
    with pytest.raises(NotFoundError):
        store.update_evaluation("ev-9", done_units=1)
    with pytest.raises(TypeError, match="allowed: done_units"):
        store.update_evaluation("ev-1", status="running")
    store.transition_evaluation("ev-1", "failed", error="no runtime")
    counts = store.counts_by_status()
    assert counts["running"] == 1 and counts["failed"] == 1 and counts["queued"] == 0
    assert set(counts) == set(TRANSITIONS["evaluation"])
    assert store.counts_by_status("shard")["queued"] == 4
    assert [e.id for e in store.active_evaluations()] == ["ev-2"]


# ---------------------------------------------------------------- incidents


def test_incidents_are_recorded_newest_first(store: StateStore) -> None:
    new_eval(store, "ev-1")
    new_eval(store, "ev-2", owner="bob")
    first = store.add_incident("ev-1", rule="network", severity="critical", action="stop",
                               evidence={"dest": "1.1.1.1:443"}, shard_id="s0")
    store.add_incident("ev-2", rule="memory", severity="high", action="stop", evidence={"rss": 9})
    store.add_incident("ev-1", rule="output", severity="low", action="log", evidence={})
    assert [i.rule for i in store.incidents("ev-1")] == ["output", "network"]
    assert [i.rule for i in store.incidents()] == ["output", "memory", "network"]
    assert store.incidents(limit=1)[0].rule == "output"
    assert [i.rule for i in store.incidents(owner="bob")] == ["memory"]  # one owner's, chosen by the database
    assert [i.rule for i in store.incidents(owner="alice", limit=1)] == ["output"]
    assert store.incidents("ev-1")[1] == first and first.evidence == {"dest": "1.1.1.1:443"}
    with pytest.raises(NotFoundError, match="ev-9"):
        store.add_incident("ev-9", rule="r", severity="low", action="log", evidence={})


# ---------------------------------------------------------------- users and tokens


def test_users_have_known_roles_and_unique_names(store: StateStore) -> None:
    alice = store.create_user("alice", "researcher")
    store.create_user("root", "admin")
    assert store.get_user("alice") == alice and store.get_user("nobody") is None
    assert [u.name for u in store.list_users()] == ["alice", "root"]
    with pytest.raises(ConflictError, match="'alice' already exists"):
        store.create_user("alice", "viewer")
    with pytest.raises(StateError, match="known: viewer, researcher, safety, admin"):
        store.create_user("eve", "god")


def test_tokens_verify_until_revoked(store: StateStore) -> None:
    store.create_user("alice", "researcher")
    secret, token = store.create_token("alice", "laptop")
    assert secret.startswith("pk_") and len(secret) == 35 and token.prefix == secret[:8]
    user, verified = store.verify_token(secret)
    assert user.name == "alice" and verified.id == token.id and verified.last_used_at is not None
    assert store.verify_token(secret[:-1] + ("A" if secret[-1] != "A" else "B")) is None
    assert store.verify_token("not-a-token") is None
    assert store.revoke_token(token.id) is True
    assert store.revoke_token(token.id) is False
    assert store.verify_token(secret) is None
    with pytest.raises(NotFoundError):
        store.revoke_token(999)
    with pytest.raises(NotFoundError, match="user 'bob' does not exist"):
        store.create_token("bob", "x")


def test_expired_tokens_do_not_verify(store: StateStore, db_url: str) -> None:
    store.create_user("alice", "viewer")
    soon = datetime.now(timezone.utc) + timedelta(hours=1)
    secret, token = store.create_token("alice", "ci", expires_at=soon)
    assert token.expires_at == soon and store.verify_token(secret) is not None
    set_column(db_url, "tokens", "expires_at", LONG_AGO)
    assert store.verify_token(secret) is None
    with pytest.raises(StateError, match="in the past"):
        store.create_token("alice", "old", expires_at=datetime.now(timezone.utc) - timedelta(seconds=1))


def test_the_secret_is_never_stored(store: StateStore, db_url: str) -> None:
    store.create_user("alice", "admin")
    secret, _ = store.create_token("alice", "laptop")
    rows = raw(db_url, "SELECT * FROM tokens")
    assert len(rows) == 1
    assert not any(secret in str(value) or secret[3:] in str(value) for value in rows[0])
    assert rows[0]._mapping["hash"] == hashlib.sha256(secret.encode()).hexdigest()


def test_last_used_is_written_at_most_once_a_minute(store: StateStore, db_url: str) -> None:
    store.create_user("alice", "viewer")
    secret, token = store.create_token("alice", "t")
    assert token.last_used_at is None
    first = store.verify_token(secret)[1].last_used_at
    assert store.verify_token(secret)[1].last_used_at == first
    assert store.list_tokens("alice")[0].last_used_at == first
    set_column(db_url, "tokens", "last_used_at", LONG_AGO)
    assert store.verify_token(secret)[1].last_used_at > first
    assert [t.name for t in store.list_tokens()] == ["t"] and store.list_tokens("bob") == []


# ---------------------------------------------------------------- records


def test_records_are_frozen_and_pickle(store: StateStore) -> None:
    new_eval(store, "ev-1")
    store.create_user("alice", "admin")
    _, token = store.create_token("alice", "t")
    records = [store.get_evaluation("ev-1"), store.shards("ev-1")[0], store.get_user("alice"), token,
               store.add_incident("ev-1", rule="r", severity="low", action="log", evidence={"a": [1]})]
    for record in records:
        assert pickle.loads(pickle.dumps(record)) == record
        with pytest.raises(AttributeError):
            record.id = "other"  # type: ignore[misc]
    copy = pickle.loads(pickle.dumps(store))
    try:
        assert copy.get_evaluation("ev-1") == records[0]
    finally:
        copy.close()


def test_processes_opening_a_new_database_at_once_migrate_it_once(db_url: str) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def open_store() -> None:
        barrier.wait()
        try:
            StateStore(db_url).close()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_store) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert raw(db_url, "SELECT version_num FROM alembic_version") == [(migrations.head(),)]


def test_values_that_cannot_be_stored_raise_state_error(store: StateStore) -> None:
    with pytest.raises(StateError, match="labels must map strings to strings"):
        new_eval(store, "ev-1", labels={"tier": 1})
    with pytest.raises(StateError) as info:
        new_eval(store, "ev-2", spec={"when": datetime.now(timezone.utc)})
    assert "spec cannot be stored as JSON" in str(info.value) and store.get_evaluation("ev-2") is None
    new_eval(store, "ev-3")
    with pytest.raises(StateError, match="summary cannot be stored as JSON"):
        store.transition_evaluation("ev-3", "failed", summary={"score": float("nan")})
    with pytest.raises(StateError, match="evidence cannot be stored as JSON"):
        store.add_incident("ev-3", rule="r", severity="low", action="log", evidence={"b": b"x"})
