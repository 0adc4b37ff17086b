"""One endpoint process per InferenceService, kept alive across daemon restarts.

The endpoint (:mod:`uniframe.control.proxy`) runs in its own session, like
the replicas, so a daemon that dies leaves traffic flowing; the next daemon
finds it again through its control socket. The service's host port is
recorded in the store the first time (``spec.servicePort`` or a free port)
and reused for ever after, so clients never chase a moving port.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

from uniframe.control.proxy import Backend, Endpoint, EndpointError, EndpointStatus
from uniframe.control.proxy.unixsock import private_dir, socket_path
from uniframe.control.store import Store
from uniframe.paths import state_dir
from uniframe.runtime.process import ProcessRef
from uniframe.runtime.verify import free_port


class Endpoints:
    """The daemon's handles on its endpoint processes, one per service name."""

    def __init__(self, store: Store, root: Path | None = None, *, host: str = "127.0.0.1",
                 check_interval: float = 1.0) -> None:
        self.store = store
        self.root = root or state_dir() / "endpoints"
        self.host = host
        self.check_interval = check_interval
        self._live: dict[str, Endpoint] = {}
        self._lock = threading.Lock()

    def control_path(self, service: str) -> Path:
        """The service's control socket, always in the daemon's own (0700) endpoints directory."""
        return socket_path(self.root, f"{service}.sock")

    def _assigned_port(self, service: str, wanted: int | None) -> int:
        with self.store.tx() as tx:
            current = tx.get_endpoint(service)
            if current is not None and (wanted is None or current.host_port == wanted):
                return current.host_port
            if current is not None:
                tx.release_endpoint(service)
            return tx.assign_endpoint(service, wanted or free_port()).host_port

    def ensure(self, service: str, wanted_port: int | None = None) -> Endpoint:
        """The running endpoint of ``service``: the one we hold, one left by an earlier daemon, or a new one."""
        port = self._assigned_port(service, wanted_port)
        with self._lock:
            ep = self._live.get(service)
        if ep is not None:
            try:
                if ep.status().port == port:
                    return ep
            except EndpointError:
                pass
            self._discard(service, ep)
        path = self.control_path(service)
        if path.exists():
            try:
                ep = Endpoint.attach(path)
                if ep.port == port and ep.service == service:
                    with self._lock:
                        self._live[service] = ep
                    return ep
                ep.stop()  # an old endpoint on a port the spec no longer wants
            except EndpointError:
                pass  # its process is gone; the socket file is stale
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self._end_strays(service)  # one that stopped answering must not keep the port
        private_dir(self.root)
        ep = Endpoint.start(service, host=self.host, port=port, control_path=path,
                            check_interval=self.check_interval,
                            log=self.root / f"{service}.log")
        with self._lock:
            self._live[service] = ep
        return ep

    def _discard(self, service: str, ep: Endpoint) -> None:
        with contextlib.suppress(EndpointError):
            ep.stop()
        with self._lock:
            if self._live.get(service) is ep:
                del self._live[service]

    def sync(self, service: str, wanted_port: int | None, backends: Iterable[Backend],
             weights: Mapping[str, int] | None) -> Endpoint:
        """Make the endpoint route to exactly ``backends``, split by ``weights`` (None: one pool)."""
        ep = self.ensure(service, wanted_port)
        ep.set_backends(backends, dict(weights) if weights else {})  # {}: one pool
        return ep

    def drain(self, service: str, replica_id: str, wait: float) -> bool:
        """Stop sending ``replica_id`` new requests and wait for those in flight; True if it emptied."""
        with self._lock:
            ep = self._live.get(service)
        if ep is None:
            return True
        try:
            return ep.drain(replica_id, wait=wait)
        except (EndpointError, KeyError):
            return True  # not a backend (never ready) or no endpoint: nothing in flight

    def remove(self, service: str) -> None:
        """Stop the service's endpoint and give its port back (the service was deleted)."""
        with self._lock:
            ep = self._live.pop(service, None)
        if ep is None:
            path = self.control_path(service)
            if path.exists():
                with contextlib.suppress(EndpointError):
                    ep = Endpoint.attach(path)
        if ep is not None:
            with contextlib.suppress(EndpointError):
                ep.stop()
        self._end_strays(service)
        with contextlib.suppress(FileNotFoundError):
            self.control_path(service).unlink()
        with self.store.tx() as tx:
            tx.release_endpoint(service)

    def status(self, service: str) -> EndpointStatus | None:
        """The endpoint of ``service`` as it reports itself; None if this daemon holds none or
        it does not answer (the autoscaler samples through here)."""
        with self._lock:
            ep = self._live.get(service)
        if ep is None:
            return None
        try:
            return ep.status()
        except EndpointError:
            return None

    def statuses(self) -> dict[str, EndpointStatus]:
        """Each endpoint this daemon holds, as it reports itself (those not answering are left out)."""
        with self._lock:
            live = dict(self._live)
        out: dict[str, EndpointStatus] = {}
        for service, ep in sorted(live.items()):
            with contextlib.suppress(EndpointError):
                out[service] = ep.status()
        return out

    def _end_strays(self, service: str) -> None:
        """Kill endpoint processes of ``service`` that we hold no handle on.

        Found by the control socket in their command line: one a crashed
        daemon started but never recorded, or one that stopped answering.
        """
        marker = str(self.control_path(service)).encode()
        for ref in _processes_with_arg(b"--control", marker):
            _kill_if_still(ref, b"--control", marker)

    def url(self, service: str) -> str | None:
        with self._lock:
            ep = self._live.get(service)
        return ep.url if ep is not None else None

    def close(self) -> None:
        """Drop the control connections; the endpoint processes keep serving."""
        with self._lock:
            live = list(self._live.values())
            self._live.clear()
        for ep in live:
            ep.close()


def _has_arg(pid: int, flag: bytes, value: bytes) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(a == flag and b == value for a, b in itertools.pairwise(argv))


def _processes_with_arg(flag: bytes, value: bytes) -> list[ProcessRef]:
    """Processes (PID and start time) whose command line has ``flag value`` (read from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _has_arg(int(entry.name), flag, value):
            with contextlib.suppress(ProcessLookupError):
                found.append(ProcessRef.of(int(entry.name)))
    return found


def _kill_if_still(ref: ProcessRef, flag: bytes, value: bytes) -> None:
    """SIGKILL ``ref`` only if it is still that very process with that command line.

    A pidfd pins the process: once it is open, the PID cannot be handed to
    another program, so checking the start time and the command line through
    /proc and then signalling through the pidfd hits what was checked.
    """
    try:
        fd = os.pidfd_open(ref.pid)
    except ProcessLookupError:
        return
    try:
        if ref.alive() and _has_arg(ref.pid, flag, value):
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
    finally:
        os.close(fd)
