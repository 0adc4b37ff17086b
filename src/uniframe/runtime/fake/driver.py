"""The ``fake`` driver: replicas simulated in this process, for testing what drives them.

The control plane's subject is decisions (when to start, restart, retire,
roll back), not processes; a test of those decisions that boots real model
servers spends its seconds on Python imports and ONNX loads, and can only
make a replica misbehave in the ways a real process can be made to. The fake
replaces the process by a small state machine with knobs (:class:`Behavior`:
start delay, readiness delay or none at all, crash after some time, exit
status of a graceful stop, a stop that is ignored, a start that fails) and
injections (:meth:`FakeDriver.crash` is ``kill -9``, :meth:`FakeDriver.hang`
is ``SIGSTOP``), and keeps everything else real: replica records and logs on
disk like every driver's, published ports bound by a real HTTP server that
answers the OIP readiness and inference routes (:mod:`.server`), so the
reconciler's probes and the endpoint proxy work unchanged.

What is simulated lives in memory, shared by every ``FakeDriver`` over the same
state root in this process (the reconciler asks for a driver per call). A
replica whose record outlives that memory (another process reads it) was
"running on a host that is gone": it reads crashed, as a real replica does
after a reboot. Snapshots (the ``snapshot`` capability) live in the same
memory: the fake carries its served-request counter across a restore, so a
test can tell a restored replica from a fresh one.

It passes the driver conformance suite (``tests/runtime/test_driver_conformance.py``)
like the real drivers, which is what makes it a fair stand-in.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from uniframe.build.store import load_image_dir
from uniframe.errors import RuntimeDriverError, UniframeError
from uniframe.runtime import hostnet
from uniframe.runtime.driver import STATUS_FILE, Driver
from uniframe.runtime.fake.server import ReplicaServer
from uniframe.runtime.ports import PortInUseError, ensure_free
from uniframe.runtime.process import ProcessRef
from uniframe.runtime.replica import (
    ImageRef,
    Replica,
    ReplicaConfig,
    ReplicaState,
    ReplicaStatus,
    utcnow,
)
from uniframe.runtime.snapshot import Snapshot, validity_key

__all__ = ["Behavior", "BehaviorSource", "FakeDriver"]

LOG = "output.log"
LOST = "the fake replica's process is gone (the process that simulated it ended)"


@dataclass(frozen=True)
class Behavior:
    """How a fake replica behaves from its next start on (all times in seconds)."""

    start_delay: float = 0.0         # start() takes this long, like a slow launch
    ready_delay: float = 0.0         # readiness answers 503 this long after start
    ready: bool = True               # False: never ready (a broken model, a wrong port)
    crash_after: float | None = None  # dies by itself, without an exit status, after this long
    exit_status: int = 0             # what a graceful stop ends with
    stop_delay: float = 0.0          # a graceful stop takes this long
    ignore_stop: bool = False        # graceful stop is ignored: stop() must force it
    fail_start: str | None = None    # start() fails with this message (a missing binary...)


BehaviorSource = Behavior | Callable[[Replica], Behavior]


class _Sim:
    """One simulated run of one replica: its state, its HTTP server, its injections."""

    def __init__(self, replica: Replica, behavior: Behavior, model: tuple[str | None, str],
                 served: int = 0) -> None:
        self.replica = replica
        self.behavior = behavior
        self.model, self.version = model
        self.served = served
        self.state = ReplicaState.RUNNING
        self.status: ReplicaStatus | None = None
        self.started = time.monotonic()
        self.ended = threading.Event()
        self.unhung = threading.Event()
        self.unhung.set()
        self.lock = threading.Lock()
        self.server: ReplicaServer | None = None
        self.timer: threading.Timer | None = None

    # -- what the HTTP server asks (server.Answers) --------------------------------------

    def ready(self) -> bool:
        b = self.behavior
        return (self.state is ReplicaState.RUNNING and b.ready
                and time.monotonic() - self.started >= b.ready_delay)

    def serves(self, model: str) -> bool:
        return self.model is None or model == self.model

    def model_version(self) -> str:
        return self.version

    def hold(self) -> bool:
        self.unhung.wait(60)
        return self.state is ReplicaState.RUNNING

    def note(self, line: str) -> None:
        with contextlib.suppress(OSError), (self.replica.dir / LOG).open("a") as fh:
            fh.write(line + "\n")

    def answered(self) -> int:
        with self.lock:
            self.served += 1
            return self.served

    # -- how it ends -----------------------------------------------------------------------

    def end(self, status: ReplicaStatus) -> bool:
        """Record how the run ended, once; free its ports. False if it had already ended."""
        with self.lock:
            if self.state is not ReplicaState.RUNNING:
                return False
            self.status = status
            self.state = status.state
        if self.timer is not None:
            self.timer.cancel()
        self.unhung.set()
        if self.server is not None:
            self.server.close()
        self.note(f"ended: {status.state.value}" + (f" ({status.detail})" if status.detail else ""))
        self.ended.set()
        return True


@dataclass
class _Host:
    """The simulated machine behind one state root: its runs, its snapshots, its defaults."""

    behavior: BehaviorSource
    runs: dict[str, _Sim]
    snapshots: dict[str, tuple[Snapshot, int]]  # id -> (record, requests served)
    lock: threading.Lock


_HOSTS: dict[Path, _Host] = {}
_HOSTS_LOCK = threading.Lock()


def _host(root: Path) -> _Host:
    with _HOSTS_LOCK:
        return _HOSTS.setdefault(root.resolve(), _Host(Behavior(), {}, {}, threading.Lock()))


def _served_model(image: ImageRef) -> tuple[str | None, str]:
    """The model the image says it serves and its version; no name (answer for any name)
    and version "fake" if the image does not say."""
    if image.path is None:
        return None, "fake"
    with contextlib.suppress(UniframeError, OSError, ValueError, KeyError, TypeError):
        m = load_image_dir(image.path).manifest
        for key in ("model", "app"):
            if isinstance(m.get(key), dict) and m[key].get("name"):
                return str(m[key]["name"]), str(m[key].get("version", "fake"))
    return None, "fake"


class FakeDriver(Driver):
    """Replicas simulated in this process, with real records, logs and HTTP on their ports."""

    kind = "fake"
    noun = "fake replica"
    log_file = LOG

    def __init__(self, root: Path | None = None, behavior: BehaviorSource | None = None) -> None:
        super().__init__(root)
        self._host = _host(self.root)
        if behavior is not None:
            self.behavior = behavior

    @property
    def behavior(self) -> BehaviorSource:
        """How replicas behave from their next start: one Behavior, or one chosen per replica."""
        return self._host.behavior

    @behavior.setter
    def behavior(self, value: BehaviorSource) -> None:
        self._host.behavior = value

    def _run(self, replica_id: str) -> _Sim | None:
        with self._host.lock:
            return self._host.runs.get(replica_id)

    # -- what the base lifecycle asks of a driver (no process: the run in memory instead) --

    def _alive(self, replica: Replica) -> bool:
        run = self._run(replica.id)
        return run is not None and run.state is ReplicaState.RUNNING

    def _how_it_ended(self, replica: Replica) -> ReplicaStatus:
        run = self._run(replica.id)
        if run is not None and run.status is not None:
            return run.status
        return ReplicaStatus(ReplicaState.CRASHED, None, LOST)

    def _release(self, replica: Replica) -> None:
        with self._host.lock:
            run = self._host.runs.get(replica.id)
            if run is not None and run.state is not ReplicaState.RUNNING:
                del self._host.runs[replica.id]
        if run is None or run.state is not ReplicaState.RUNNING:
            hostnet.release(self.root.parent, replica.id)

    # -- the public lifecycle --------------------------------------------------------------

    def create(self, config: ReplicaConfig) -> Replica:
        replica_id, name, directory = self._allocate(
            config.name, config.image.ref.split(":")[0].split("/")[-1])
        return self._record_new(replica_id, directory, replace(config, name=name))

    def start(self, ref: str) -> Replica:
        return self._start(self.get(ref), served=0)

    def _start(self, replica: Replica, served: int) -> Replica:
        run = self._run(replica.id)
        if run is not None and run.state is ReplicaState.RUNNING:
            raise RuntimeDriverError(f"{self.noun} {replica.name} is already running")
        source = self.behavior
        behavior = source(replica) if callable(source) else source
        log = replica.dir / LOG
        offset = log.stat().st_size if log.exists() else 0
        self._release(replica)
        (replica.dir / STATUS_FILE).unlink(missing_ok=True)
        sim = _Sim(replica, behavior, _served_model(replica.config.image), served)
        sim.note(f"fake replica {replica.name} ({replica.id}) starting")
        if behavior.fail_start is not None:
            sim.note(f"start failed: {behavior.fail_start}")
            raise RuntimeDriverError(f"{self.noun} {replica.name} did not start: "
                                     f"{behavior.fail_start} (see {log})")
        ports = list(replica.config.ports)
        ensure_free(ports)
        # Its ports are as real as any replica's: claimed on the one host network, held by this
        # process (the claims go stale with it), given back when the run is seen to end.
        hostnet.claim_ports(self.root.parent, replica, ports)
        try:
            hostnet.bind(self.root.parent, replica.id, ProcessRef.of(os.getpid()))
            if behavior.start_delay:
                time.sleep(behavior.start_delay)
            sim.server = ReplicaServer([(p.host_ip, p.host_port) for p in ports], sim)
        except OSError as exc:
            hostnet.release(self.root.parent, replica.id)
            raise PortInUseError(f"{self.noun} {replica.name} cannot publish "
                                 f"{', '.join(str(p) for p in ports)}: {exc.strerror}; "
                                 "publish a free host port") from None
        except BaseException:
            hostnet.release(self.root.parent, replica.id)
            raise
        sim.started = time.monotonic()
        replica = replica.with_(started_at=utcnow(), log_offset=offset)
        self._save(replica)
        sim.replica = replica
        with self._host.lock:
            self._host.runs[replica.id] = sim
        where = ", ".join(f"{p.host_ip}:{p.host_port}" for p in ports) or "no ports"
        sim.note(f"serving model {sim.model or '(any name)'} on {where}")
        if behavior.crash_after is not None:
            sim.timer = threading.Timer(behavior.crash_after, sim.end, args=(ReplicaStatus(
                ReplicaState.CRASHED, None, "crashed by itself (Behavior.crash_after)",
                utcnow()),))
            sim.timer.daemon = True
            sim.timer.start()
        return replica

    def stop(self, ref: str, timeout: float = 10.0) -> ReplicaStatus:
        """Graceful first (ends with ``Behavior.exit_status``); forced after ``timeout``."""
        replica = self.get(ref)
        run = self._run(replica.id)
        if run is None or run.state is not ReplicaState.RUNNING:
            return self._end(replica)
        b = run.behavior
        if timeout > 0:
            run.note("graceful stop requested")
        hung = not run.unhung.is_set()
        if timeout <= 0 or b.ignore_stop or hung or b.stop_delay > timeout:
            run.ended.wait(timeout)
            late = f"did not stop within {timeout:g} s; " if timeout > 0 else ""
            run.end(ReplicaStatus(ReplicaState.CRASHED, None, late + "killed", utcnow()))
        else:
            if b.stop_delay:
                run.ended.wait(b.stop_delay)
            run.end(ReplicaStatus(ReplicaState.EXITED, b.exit_status,
                                  f"exited with status {b.exit_status}", utcnow()))
        return self._end(replica)

    # -- injections: what a test does to a replica from outside ----------------------------

    def _running_sim(self, ref: str) -> _Sim:
        replica = self.get(ref)
        run = self._run(replica.id)
        if run is None or run.state is not ReplicaState.RUNNING:
            raise RuntimeDriverError(f"{self.noun} {replica.name} is not running; start it first")
        return run

    def crash(self, ref: str, detail: str = "killed by SIGKILL") -> None:
        """``kill -9``: the replica is gone at once, without an exit status."""
        self._running_sim(ref).end(ReplicaStatus(ReplicaState.CRASHED, None, detail, utcnow()))

    def hang(self, ref: str) -> None:
        """``kill -STOP``: still running, but answers nothing (and ignores a graceful stop)."""
        run = self._running_sim(ref)
        run.unhung.clear()
        run.note("hung (SIGSTOP injected)")

    def resume(self, ref: str) -> None:
        """``kill -CONT``: a hung replica answers again."""
        run = self._running_sim(ref)
        run.note("resumed")
        run.unhung.set()

    def served(self, ref: str) -> int:
        """Inferences this replica answered (counted on from the snapshot it was restored from)."""
        run = self._run(self.get(ref).id)
        return run.served if run is not None else 0

    # -- snapshots -------------------------------------------------------------------------

    @staticmethod
    def _valid_for(config: ReplicaConfig) -> str:
        return validity_key(driver="fake", image=config.image.digest, cpus=config.cpus,
                            memory_mib=config.memory_mib)

    def snapshot(self, ref: str) -> Snapshot:
        """Save a running replica's state in memory; the replica keeps running."""
        run = self._running_sim(ref)
        replica = run.replica
        snap = Snapshot(id=secrets.token_hex(6), driver=self.kind, source_replica=replica.id,
                        image_digest=replica.config.image.digest, created_at=utcnow(),
                        location="memory:", valid_for=self._valid_for(replica.config))
        snap = replace(snap, location=f"memory:{snap.id}")
        with self._host.lock:
            self._host.snapshots[snap.id] = (snap, run.served)
        run.note(f"snapshot {snap.id} taken")
        return snap

    def restore(self, snapshot: Snapshot, config: ReplicaConfig) -> Replica:
        """A new replica from ``snapshot``, started and carrying the snapshot's state."""
        snapshot.check(self.kind, self._valid_for(config))
        with self._host.lock:
            saved = self._host.snapshots.get(snapshot.id)
        if saved is None:
            raise RuntimeDriverError(
                f"snapshot {snapshot.id} is not in this process's memory (a fake snapshot "
                "lives only as long as the process that took it); take a new one")
        replica = self.create(config)
        replica = replica.with_(extra={**replica.extra, "restored_from": snapshot.id})
        self._save(replica)
        try:
            replica = self._start(replica, served=saved[1])
        except BaseException:
            self.remove(replica.id, force=True)
            raise
        run = self._run(replica.id)
        if run is not None:
            run.note(f"restored from snapshot {snapshot.id} of {snapshot.source_replica}")
        return replica

    def snapshots(self) -> builtins.list[Snapshot]:
        """The snapshots this process holds for this state root."""
        with self._host.lock:
            return [s for s, _ in self._host.snapshots.values()]

    def remove_snapshot(self, snapshot: Snapshot) -> None:
        self.forget_snapshot(snapshot.id)

    def forget_snapshot(self, snapshot_id: str) -> None:
        with self._host.lock:
            self._host.snapshots.pop(snapshot_id, None)
