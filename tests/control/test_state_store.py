"""The state store on both backends: CRUD, transactions, optimistic concurrency, crashes."""

from __future__ import annotations

import gc
import json
import signal
import sqlite3
import subprocess
import threading
from pathlib import Path

import pytest
from control_helpers import python_script, raw_query
from pgserver import PgServer

from uniframe.control.store import SCHEMA_VERSION, ModelRecord, Store, spec_digest
from uniframe.control.store.dialect import Integrity, redact
from uniframe.errors import ConflictError, NotFoundError, StateError

SVC = "InferenceService"
SPEC = {"apiVersion": "uniframe.dev/v1alpha1", "kind": SVC, "metadata": {"name": "iris"},
        "spec": {"model": "iris@1", "replicas": 1}}


def _model(name: str = "iris", version: str = "1", sha: str = "ab" * 32) -> ModelRecord:
    return ModelRecord(name, version, sha, "onnx",
                       [{"name": "X", "datatype": "FP32", "shape": [-1, 4]}],
                       [{"name": "label", "datatype": "INT64", "shape": [-1]}],
                       518, 1700000000.25, {"owner": "ml"})


def test_open_migrates_once_and_reopens(store_target: str) -> None:
    first = Store.open(store_target)
    assert first.migrated_from == 0
    first.close()
    again = Store.open(store_target)
    assert again.migrated_from == SCHEMA_VERSION
    again.close()
    assert raw_query(store_target, "SELECT version FROM schema_version") == [(SCHEMA_VERSION,)]


def test_a_newer_schema_is_refused(store_target: str) -> None:
    Store.open(store_target).close()
    raw_query(store_target, "UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(StateError, match=r"newer than this uniframe knows.*upgrade uniframe"):
        Store.open(store_target)


def test_concurrent_first_opens_migrate_once(store_target: str) -> None:
    stores: list[Store] = []
    errors: list[BaseException] = []

    def open_it() -> None:
        try:
            stores.append(Store.open(store_target))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(s.migrated_from for s in stores) == [0] + [SCHEMA_VERSION] * 3
    for s in stores:
        s.close()


def test_object_lifecycle(store: Store) -> None:
    with store.tx() as tx:
        created = tx.create_object(SVC, "iris", SPEC)
    assert (created.generation, created.deleted, created.digest) == (1, False, spec_digest(SPEC))
    with store.tx(readonly=True) as tx:
        got = tx.get_object(SVC, "iris")
        assert got == created
        assert tx.list_objects() == [created]
        assert tx.list_objects("Workload") == []

    changed = {**SPEC, "spec": {"model": "iris@2", "replicas": 3}}
    with store.tx() as tx:
        updated = tx.update_object(SVC, "iris", changed, generation=1)
    assert (updated.generation, updated.spec, updated.created_at) == (2, changed, created.created_at)

    with store.tx() as tx:
        same, moved = tx.apply_object(SVC, "iris", changed)
        assert (same.generation, moved) == (2, False)       # identical spec: nothing written
        other, moved = tx.apply_object(SVC, "other", SPEC)
        assert (other.generation, moved) == (1, True)       # absent: created
        back, moved = tx.apply_object(SVC, "iris", SPEC)
        assert (back.generation, moved) == (3, True)

    with store.tx() as tx:
        deleted = tx.delete_object(SVC, "iris", generation=3)
    assert (deleted.generation, deleted.deleted) == (4, True)
    with store.tx(readonly=True) as tx:
        assert tx.get_object(SVC, "iris") is None
        assert tx.get_object(SVC, "iris", include_deleted=True) == deleted
        assert [o.name for o in tx.list_objects(SVC)] == ["other"]
        assert [o.name for o in tx.list_objects(SVC, include_deleted=True)] == ["iris", "other"]

    with store.tx() as tx:  # a deleted name can be created again; generations keep counting
        revived = tx.create_object(SVC, "iris", SPEC)
    assert (revived.generation, revived.deleted) == (5, False)
    with store.tx() as tx:
        tx.delete_object(SVC, "iris")
        tx.purge_object(SVC, "iris")
        assert tx.get_object(SVC, "iris", include_deleted=True) is None

    with store.tx(readonly=True) as tx:
        reasons = [(e.name, e.reason, e.message) for e in tx.events(SVC)]
    assert reasons == [("iris", "Created", "generation 1"), ("iris", "Updated", "generation 2"),
                       ("other", "Created", "generation 1"), ("iris", "Updated", "generation 3"),
                       ("iris", "Deleted", "generation 4"), ("iris", "Created", "generation 5"),
                       ("iris", "Deleted", "generation 6")]


def test_object_errors_say_what_to_do(store: Store) -> None:
    with store.tx() as tx:
        tx.create_object(SVC, "iris", SPEC)
    with pytest.raises(ConflictError, match=r"InferenceService/iris already exists"), \
            store.tx() as tx:
        tx.create_object(SVC, "iris", SPEC)
    with pytest.raises(NotFoundError, match=r"InferenceService/nope does not exist"), \
            store.tx() as tx:
        tx.update_object(SVC, "nope", SPEC, generation=1)
    with pytest.raises(ConflictError, match=r"you read generation 7, it is now at 1.*retry"), \
            store.tx() as tx:
        tx.update_object(SVC, "iris", SPEC, generation=7)
    with pytest.raises(ConflictError, match=r"cannot delete InferenceService/iris"), \
            store.tx() as tx:
        tx.delete_object(SVC, "iris", generation=2)
    with pytest.raises(ConflictError, match=r"is not deleted; delete it before purging"), \
            store.tx() as tx:
        tx.purge_object(SVC, "iris")
    with store.tx(readonly=True) as tx:
        obj = tx.get_object(SVC, "iris")
        assert obj is not None and obj.generation == 1
        with pytest.raises(RuntimeError, match="read-only"):
            tx.create_object(SVC, "x", SPEC)


def test_an_exception_rolls_back_every_write_of_the_transaction(store: Store) -> None:
    with store.tx() as tx:
        tx.create_object(SVC, "kept", SPEC)
    with pytest.raises(ValueError, match="boom"), store.tx() as tx:
        tx.create_object(SVC, "iris", SPEC)
        tx.update_object(SVC, "kept", {"changed": True}, generation=1)
        tx.add_replica("r1", SVC, "iris", driver="process", image_digest="sha256:00")
        tx.add_event(SVC, "iris", "Started", "r1")
        tx.add_model(_model())
        tx.assign_endpoint("iris", 18080)
        raise ValueError("boom")
    with store.tx(readonly=True) as tx:
        assert [o.name for o in tx.list_objects(include_deleted=True)] == ["kept"]
        kept = tx.get_object(SVC, "kept")
        assert kept is not None and (kept.generation, kept.spec) == (1, SPEC)
        assert tx.list_replicas() == []
        assert [e.name for e in tx.events()] == ["kept"]
        assert tx.list_models() == []
        assert tx.list_endpoints() == []


def test_a_statement_the_database_refuses_rolls_back_the_transaction(store: Store) -> None:
    """A constraint failure half-way (here a duplicate port) leaves nothing of the transaction."""
    with store.tx() as tx:
        tx.assign_endpoint("taken", 18080)
    with pytest.raises(Integrity), store.tx() as tx:
        tx.create_object(SVC, "iris", SPEC)
        tx._run("INSERT INTO services (name, host_port, created_at) VALUES (?, ?, ?)",
                ("iris", 18080, 0.0))
    with store.tx(readonly=True) as tx:
        assert tx.get_object(SVC, "iris", include_deleted=True) is None
        assert [e.name for e in tx.events()] == []
        assert [(e.service, e.host_port) for e in tx.list_endpoints()] == [("taken", 18080)]
    with store.tx() as tx:  # and the store (its connection) works on
        tx.create_object(SVC, "iris", SPEC)


def test_transactions_do_not_nest(store: Store) -> None:
    with store.tx() as tx, pytest.raises(RuntimeError, match="does not nest"), store.tx():
        pass
    with store.tx() as tx:
        tx.create_object(SVC, "iris", SPEC)


def test_replicas(store: Store) -> None:
    with store.tx() as tx:
        tx.create_object(SVC, "iris", SPEC)
        r1 = tx.add_replica("r1", SVC, "iris", driver="qemu", image_digest="sha256:aa",
                            host_port=41001)
        tx.add_replica("r2", SVC, "iris", driver="qemu", image_digest="sha256:aa")
    assert (r1.state, r1.desired, r1.host_port, r1.restarts, r1.next_restart_at) == \
        ("pending", "running", 41001, 0, None)
    with store.tx() as tx:
        crashed = tx.update_replica("r1", state="crashed", last_error="guest panic", restarts=1,
                                    next_restart_at=tx.now + 2)
        assert (crashed.state, crashed.last_error, crashed.restarts, crashed.host_port) == \
            ("crashed", "guest panic", 1, 41001)
        cleared = tx.update_replica("r1", host_port=None, next_restart_at=None, desired="stopped")
        assert (cleared.host_port, cleared.next_restart_at, cleared.desired) == \
            (None, None, "stopped")
        assert cleared.state == "crashed"  # what was not given stays
    with store.tx(readonly=True) as tx:
        assert [r.id for r in tx.list_replicas(SVC, "iris")] == ["r1", "r2"]
        assert tx.list_replicas(SVC, "other") == []
        assert [r.id for r in tx.list_replicas()] == ["r1", "r2"]
    with pytest.raises(NotFoundError, match="InferenceService/ghost does not exist"), \
            store.tx() as tx:
        tx.add_replica("r3", SVC, "ghost", driver="qemu", image_digest="sha256:aa")
    with pytest.raises(ConflictError, match="replica r1 already exists"), store.tx() as tx:
        tx.add_replica("r1", SVC, "iris", driver="qemu", image_digest="sha256:aa")
    with pytest.raises(NotFoundError, match="replica nope does not exist"), store.tx() as tx:
        tx.update_replica("nope", state="running")
    with store.tx() as tx:  # a deleted object keeps its replicas until they are removed
        tx.delete_object(SVC, "iris")
    with pytest.raises(ConflictError, match=r"still has replicas \(r1, r2\)"), store.tx() as tx:
        tx.purge_object(SVC, "iris")
    with store.tx() as tx:
        tx.remove_replica("r1")
        tx.remove_replica("r2")
        tx.purge_object(SVC, "iris")


def test_foreign_keys_hold_replicas_to_objects(store: Store) -> None:
    """The database itself, not only the repository code, refuses a replica of nothing."""
    with pytest.raises(Integrity), store.tx() as tx:
        tx._run("INSERT INTO replicas (id, object_kind, object_name, driver, image_digest, "
                "state, desired, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                ("r9", SVC, "ghost", "qemu", "sha256:00", "pending", "running", 0.0, 0.0))


def test_events_filter_and_follow(store: Store) -> None:
    with store.tx() as tx:
        tx.create_object(SVC, "a", SPEC)
        tx.create_object(SVC, "b", SPEC)
        tx.add_replica("ra", SVC, "a", driver="process", image_digest="sha256:00")
        warn = tx.add_event(SVC, "a", "BackOff", "restarting in 2 s", type="Warning",
                            replica_id="ra")
        with pytest.raises(ValueError, match="Normal or Warning"):
            tx.add_event(SVC, "a", "X", "y", type="Error")  # type: ignore[arg-type]
    with store.tx(readonly=True) as tx:
        everything = tx.events()
        assert [e.id for e in everything] == sorted(e.id for e in everything)
        assert [e.name for e in tx.events(SVC, "a")] == ["a", "a"]
        assert tx.events(replica_id="ra") == [warn]
        assert warn.type == "Warning"
        assert tx.events(after_id=everything[1].id) == everything[2:]
        assert tx.events(limit=1) == everything[:1]


def test_models_rows(store: Store) -> None:
    with store.tx() as tx:
        tx.add_model(_model("iris", "1", "aa" * 32))
        tx.add_model(_model("iris", "2", "bb" * 32))
        tx.add_model(_model("copy", "1", "aa" * 32))
    with pytest.raises(ConflictError, match="iris@1 already exists"), store.tx() as tx:
        tx.add_model(_model("iris", "1"))
    with store.tx(readonly=True) as tx:
        assert tx.get_model("iris", "1") == _model("iris", "1", "aa" * 32)
        assert tx.get_model("iris", "3") is None
        assert [m.ref for m in tx.list_models()] == ["copy@1", "iris@1", "iris@2"]
        assert [m.ref for m in tx.list_models("iris")] == ["iris@1", "iris@2"]
        assert [m.ref for m in tx.list_models(sha256="aa" * 32)] == ["copy@1", "iris@1"]
    with store.tx() as tx:
        tx.remove_model("iris", "1")
    with pytest.raises(NotFoundError), store.tx() as tx:
        tx.remove_model("iris", "1")


def test_service_endpoints_are_stable_and_unique(store: Store) -> None:
    with store.tx() as tx:
        first = tx.assign_endpoint("iris", 18080)
        again = tx.assign_endpoint("iris", 19999)  # already assigned: the port does not move
        assert (again.service, again.host_port) == ("iris", 18080)
        assert again == first
    with pytest.raises(ConflictError, match="host port 18080 already belongs to service iris"), \
            store.tx() as tx:
        tx.assign_endpoint("other", 18080)
    with store.tx() as tx:
        tx.assign_endpoint("other", 18081)
        assert [(e.service, e.host_port) for e in tx.list_endpoints()] == \
            [("iris", 18080), ("other", 18081)]
        tx.release_endpoint("iris")
        assert tx.get_endpoint("iris") is None


def test_two_threads_update_one_object_one_wins(store: Store) -> None:
    with store.tx() as tx:
        tx.create_object(SVC, "iris", SPEC)
    barrier = threading.Barrier(2)
    outcomes: dict[str, object] = {}

    def writer(tag: str) -> None:
        with store.tx(readonly=True) as tx:
            seen = tx.get_object(SVC, "iris")
        assert seen is not None
        barrier.wait()  # both have read generation 1 before either writes
        try:
            with store.tx() as tx:
                tx.update_object(SVC, "iris", {**SPEC, "writer": tag}, generation=seen.generation)
            outcomes[tag] = "won"
        except ConflictError as exc:
            outcomes[tag] = exc

    threads = [threading.Thread(target=writer, args=(tag,)) for tag in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [tag for tag, result in outcomes.items() if result == "won"]
    losers = [result for result in outcomes.values() if isinstance(result, ConflictError)]
    assert len(winners) == 1 and len(losers) == 1, outcomes
    assert "you read generation 1, it is now at 2" in str(losers[0])
    with store.tx(readonly=True) as tx:
        obj = tx.get_object(SVC, "iris")
    assert obj is not None and (obj.generation, obj.spec["writer"]) == (2, winners[0])


def test_a_thread_that_ends_takes_its_connection_with_it(store: Store) -> None:
    """A daemon serving each request on a new thread must not pile up connections."""
    with store.tx() as tx:
        tx.create_object(SVC, "iris", SPEC)

    def reader() -> None:
        with store.tx(readonly=True) as tx:
            assert tx.get_object(SVC, "iris") is not None

    for _ in range(5):
        t = threading.Thread(target=reader)
        t.start()
        t.join()
    gc.collect()
    assert len(store._conns) == 1  # the main thread's
    store.release()
    assert len(store._conns) == 0
    with store.tx(readonly=True) as tx:  # and a new one comes on demand
        assert tx.get_object(SVC, "iris") is not None
    assert len(store._conns) == 1


def test_processes_never_lose_an_update(store: Store, store_target: str) -> None:
    """Three processes read-then-write one counter; every increment survives, none twice."""
    workers, each = 3, 15
    with store.tx() as tx:
        tx.create_object("Workload", "counter", {"count": 0})
    procs = [subprocess.Popen([*python_script("counter_worker.py"), store_target, str(each)],
                              stdout=subprocess.PIPE, text=True) for _ in range(workers)]
    reports = []
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        reports.append(json.loads(out))
    assert all(r["done"] == each for r in reports)
    with store.tx(readonly=True) as tx:
        counter = tx.get_object("Workload", "counter")
        updates = [e for e in tx.events("Workload", "counter") if e.reason == "Updated"]
    assert counter is not None
    assert counter.spec["count"] == workers * each
    assert counter.generation == 1 + workers * each
    assert len(updates) == workers * each


def _spawn_writer(target: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*python_script("crash_writer.py"), target, *extra],
                            stdout=subprocess.PIPE, text=True)


def _committed_until(proc: subprocess.Popen[str], stop: str) -> list[int]:
    """Read the writer's lines until ``stop`` appears; return the transactions it committed."""
    assert proc.stdout is not None
    committed = []
    for line in proc.stdout:
        word, number = line.split()
        if word == "committed":
            committed.append(int(number))
        if line.strip() == stop:
            return committed
    raise AssertionError(f"the writer ended (status {proc.wait()}) before printing {stop!r}")


def _assert_whole_transactions(target: str, committed: list[int]) -> set[int]:
    """Open the store after the crash: each transaction is all there or not at all."""
    store = Store.open(target)
    try:
        with store.tx(readonly=True) as tx:
            objects = {int(o.name[1:]) for o in tx.list_objects("Workload")}
            replicas = {int(r.id[1:]) for r in tx.list_replicas()}
            events = {int(e.message.split()[1]) for e in tx.events("Workload")
                      if e.reason == "Step"}
            created = {int(e.name[1:]) for e in tx.events("Workload") if e.reason == "Created"}
        assert objects == replicas == events == created
        assert set(committed) <= objects
        with store.tx() as tx:  # and it takes new writes
            tx.create_object("Workload", "after-crash", {})
    finally:
        store.close()
    return objects


def test_a_writer_killed_mid_transaction_leaves_no_trace_of_it(store_target: str) -> None:
    Store.open(store_target).close()
    with _spawn_writer(store_target, "25") as proc:
        try:
            committed = _committed_until(proc, "inside 25")
            # transaction 25 has written its object, replica and event, and not committed
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            proc.kill()
    assert committed == list(range(25))
    assert _assert_whole_transactions(store_target, committed) == set(range(25))


def test_a_writer_killed_at_full_speed_loses_nothing_it_committed(store_target: str) -> None:
    Store.open(store_target).close()
    with _spawn_writer(store_target) as proc:
        try:
            committed = _committed_until(proc, "committed 40")
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            assert proc.stdout is not None
            committed += [int(line.split()[1]) for line in proc.stdout]  # said before dying
        finally:
            proc.kill()
    found = _assert_whole_transactions(store_target, committed)
    # at most the one transaction between its commit and its line is present but unreported
    assert found - set(committed) <= {max(committed) + 1}


def test_sqlite_store_uses_wal_and_a_busy_timeout(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = Store.open(path)
    with store.tx() as tx:
        tx.create_object(SVC, "iris", SPEC)
        conn = store._local.conn
        assert conn.execute("PRAGMA foreign_keys").rows == [(1,)]
        assert conn.execute("PRAGMA busy_timeout").rows == [(10_000,)]
        assert conn.execute("PRAGMA synchronous").rows == [(2,)]  # FULL
    assert (tmp_path / "state.db-wal").exists()
    store.close()
    with sqlite3.connect(path) as plain:
        assert plain.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert plain.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_a_writer_waits_for_another_instead_of_failing(tmp_path: Path) -> None:
    """SQLite has one writer at a time; the second waits (busy_timeout) and then succeeds."""
    store = Store.open(tmp_path / "state.db")
    holding = threading.Event()
    release = threading.Event()

    def slow_writer() -> None:
        with store.tx() as tx:
            tx.create_object(SVC, "slow", SPEC)
            holding.set()
            release.wait(10)

    t = threading.Thread(target=slow_writer)
    t.start()
    assert holding.wait(10)
    threading.Timer(0.5, release.set).start()
    with store.tx() as tx:  # blocks until slow_writer commits, about 0.5 s
        tx.create_object(SVC, "fast", SPEC)
    t.join()
    with store.tx(readonly=True) as tx:
        assert [o.name for o in tx.list_objects()] == ["fast", "slow"]
    store.close()


def test_store_locations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UNIFRAME_STORE", raising=False)
    monkeypatch.setenv("UNIFRAME_DATA", str(tmp_path / "data"))
    with Store.open() as store:
        assert store.target == str(tmp_path / "data" / "state.db")
    assert (tmp_path / "data" / "state.db").is_file()
    with Store.open(f"sqlite://{tmp_path}/other.db") as store:
        assert (store.dialect, store.target) == ("sqlite", f"{tmp_path}/other.db")
    monkeypatch.setenv("UNIFRAME_STORE", str(tmp_path / "env.db"))
    with Store.open() as store:
        assert store.target == str(tmp_path / "env.db")
    with pytest.raises(StateError, match="use a file path, sqlite:///PATH or postgresql://"):
        Store.open("mysql://db/x")


def test_unreachable_postgresql_is_a_clear_error_without_the_password(tmp_path: Path) -> None:
    url = f"postgresql://admin:s3cret@/uniframe?host={tmp_path}&port=1"
    with pytest.raises(StateError) as info:
        Store.open(url)
    message = str(info.value)
    assert "cannot connect to the PostgreSQL state store" in message
    assert "s3cret" not in message and "admin:***@" in message
    assert "that the server is running" in message
    assert redact("postgresql://u:p@db.example:5433/x") == "postgresql://u:***@db.example:5433/x"


def test_a_dropped_postgresql_connection_is_replaced(pg_server: PgServer) -> None:
    """After the server drops the connection, one transaction fails clearly and the next works."""
    db = pg_server.create_database()
    store = Store.open(pg_server.url(db))
    try:
        with store.tx() as tx:
            tx.create_object(SVC, "iris", SPEC)
        assert pg_server.terminate_clients(db) == 1
        with pytest.raises(StateError, match="state store postgresql://"), store.tx() as tx:
            tx.get_object(SVC, "iris")
        with store.tx(readonly=True) as tx:
            assert tx.get_object(SVC, "iris") is not None
    finally:
        store.close()
        pg_server.drop_database(db)


def test_revisions_number_in_rollout_order_and_a_rollback_becomes_the_newest(store: Store) -> None:
    with store.tx() as tx:
        tx.create_object(SVC, "iris", SPEC)
        first = tx.record_revision(SVC, "iris", "sha256:a", SPEC)
        assert tx.record_revision(SVC, "iris", "sha256:a", SPEC) == first  # no change, no row
        tx.record_revision(SVC, "iris", "sha256:b", {**SPEC, "x": 2})
        back = tx.record_revision(SVC, "iris", "sha256:a", SPEC)
        revs = tx.list_revisions(SVC, "iris")
    assert first.number == 1
    assert back.number == 3
    assert [(r.number, r.digest) for r in revs] == [(2, "sha256:b"), (3, "sha256:a")]
    assert revs[0].spec == {**SPEC, "x": 2}


def test_rollouts_are_one_row_per_object_and_purged_with_it(store: Store) -> None:
    with store.tx() as tx:
        tx.create_object(SVC, "iris", SPEC)
        tx.record_revision(SVC, "iris", "sha256:a", SPEC)
        assert tx.get_rollout(SVC, "iris") is None
        tx.start_rollout(SVC, "iris", strategy="canary", from_digest="sha256:a",
                         to_digest="sha256:b", state="progressing", traffic_percent=10)
        tx.start_rollout(SVC, "iris", strategy="rolling", from_digest="sha256:b",
                         to_digest="sha256:c", state="progressing", traffic_percent=None)
        done = tx.update_rollout(SVC, "iris", state="complete", message="3 of 3 ready")
        assert (done.strategy, done.from_digest, done.to_digest) == ("rolling", "sha256:b",
                                                                      "sha256:c")
        assert (done.state, done.message, done.traffic_percent) == ("complete", "3 of 3 ready",
                                                                    None)
        with pytest.raises(NotFoundError, match="has no rollout"):
            tx.update_rollout(SVC, "other", state="complete")
        tx.delete_object(SVC, "iris")
        tx.purge_object(SVC, "iris")
        assert tx.get_rollout(SVC, "iris") is None
        assert tx.list_revisions(SVC, "iris") == []


def test_a_version_1_database_gains_replica_revisions(tmp_path: Path) -> None:
    from uniframe.control.store import schema
    from uniframe.control.store.dialect import SqliteConnection

    path = tmp_path / "old.db"
    conn = SqliteConnection(path)
    conn.begin(readonly=False)
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for statement in schema.MIGRATIONS[0](conn.types):
        conn.execute(statement)
    conn.execute("INSERT INTO schema_version (version) VALUES (1)")
    conn.execute("INSERT INTO objects VALUES (?, ?, ?, ?, 1, 0, 0, 0)",
                 (SVC, "iris", json.dumps(SPEC), spec_digest(SPEC)))
    conn.execute("INSERT INTO replicas (id, object_kind, object_name, driver, image_digest, state, "
                 "desired, created_at, updated_at) VALUES ('r1', ?, 'iris', 'process', 'd', "
                 "'ready', 'running', 0, 0)", (SVC,))
    conn.commit()
    conn.close()
    store = Store.open(path)
    try:
        assert store.migrated_from == 1
        with store.tx(readonly=True) as tx:
            (replica,) = tx.list_replicas()
        assert (replica.id, replica.state, replica.revision) == ("r1", "ready", "")
    finally:
        store.close()
