"""One endpoint process per InferenceService, kept alive across daemon restarts.

The endpoint (:mod:`uniframe.control.proxy`) runs in its own session, like
the replicas, so a daemon that dies leaves traffic flowing; the next daemon
finds it again through its control socket. The service's host port is
recorded in the store the first time (``spec.servicePort`` or a free port)
and reused for ever after, so clients never chase a moving port.

An endpoint with no ready replica holds requests and says so at once (see
:mod:`uniframe.control.proxy.activator`): every endpoint this daemon holds
has a second control connection, subscribed to its event lines, and one
thread (:class:`_DemandWatcher`, one for all services: a parked service must
cost next to nothing) turns a ``demand`` line into a call of each
:meth:`Endpoints.on_demand` callback, which wakes the reconciler instead of
leaving the request to its next pass. A new daemon subscribes when it
attaches an endpoint on its first pass, and the endpoint repeats the demand
to a new subscriber, so requests held across a daemon restart still wake it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uniframe.control.proxy import Backend, Endpoint, EndpointError, EndpointStatus
from uniframe.control.proxy.activator import ACTIVATION_TIMEOUT
from uniframe.control.proxy.unixsock import private_dir, socket_path
from uniframe.control.store import Store
from uniframe.paths import state_dir
from uniframe.runtime.process import ProcessRef
from uniframe.runtime.verify import free_port


@dataclass(frozen=True)
class Activation:
    """How a service's endpoint holds requests while no replica is ready."""

    timeout: float = ACTIVATION_TIMEOUT  # seconds held before a 503 (0: 503 at once)
    queue_limit: int = 1024  # requests held at most; one more is a 503 at once


def activation_of(spec: Mapping[str, Any], queue_limit: int = Activation.queue_limit) -> Activation:
    """The activation settings a stored spec asks for: ``spec.autoscaling.activationTimeout``.

    Read from the stored document (camelCase, as the API stores it) rather than
    the parsed model, because the reconciler calls this on every pass and only
    needs one number; a spec without it (fixed replicas, or written before the
    field existed) gets :data:`ACTIVATION_TIMEOUT`.
    """
    scaling = spec.get("spec", {}).get("autoscaling")
    timeout = scaling.get("activationTimeout") if isinstance(scaling, dict) else None
    if isinstance(timeout, int | float) and not isinstance(timeout, bool) and timeout >= 0:
        return Activation(float(timeout), queue_limit)
    return Activation(ACTIVATION_TIMEOUT, queue_limit)


class Endpoints:
    """The daemon's handles on its endpoint processes, one per service name."""

    def __init__(self, store: Store, root: Path | None = None, *, host: str = "127.0.0.1",
                 check_interval: float = 1.0) -> None:
        self.store = store
        self.root = root or state_dir() / "endpoints"
        self.host = host
        self.check_interval = check_interval
        self._live: dict[str, Endpoint] = {}
        self._configured: dict[str, Activation] = {}  # as last told to the endpoint in _live
        self._lock = threading.Lock()
        self._listeners: list[Callable[[str], None]] = []
        self._watcher: _DemandWatcher | None = None

    def on_demand(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(service)`` when a service's endpoint holds requests with no ready replica.

        Called on the watcher thread, once per burst of requests (and again every
        few seconds while they stay held): it must return quickly (set an event).
        """
        self._listeners.append(callback)

    def _demand(self, service: str) -> None:
        for callback in list(self._listeners):
            try:
                callback(service)
            except Exception as exc:  # one broken listener must not silence the others
                print(f"uniframe: endpoints: demand callback for {service} failed: {exc!r}",
                      file=sys.stderr)

    def _hold(self, service: str, ep: Endpoint) -> None:
        """Keep ``ep`` as the service's endpoint (settings to be sent again) and hear its demand."""
        with self._lock:
            self._live[service] = ep
            self._configured.pop(service, None)
            watcher = self._watcher
            if watcher is None:
                watcher = self._watcher = _DemandWatcher(self._demand)
        watcher.watch(service, ep)

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
                    watcher = self._watcher
                    if watcher is not None and not watcher.watching(service):
                        watcher.watch(service, ep)  # its subscription broke: subscribe again
                    return ep
            except EndpointError:
                pass
            self._discard(service, ep)
        path = self.control_path(service)
        if path.exists():
            try:
                ep = Endpoint.attach(path)
                outdated = ep.status().activation_timeout is None
                if ep.port == port and ep.service == service and not outdated:
                    self._hold(service, ep)
                    return ep
                # on a port the spec no longer wants, or started by a daemon older than the
                # activator (it could neither hold requests nor wake us): replace it, letting
                # its requests in flight finish first
                ep.stop()
                self._await_end(service)
            except EndpointError:
                pass  # its process is gone; the socket file is stale
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self._end_strays(service)  # one that stopped answering must not keep the port
        private_dir(self.root)
        ep = Endpoint.start(service, host=self.host, port=port, control_path=path,
                            check_interval=self.check_interval,
                            log=self.root / f"{service}.log")
        self._hold(service, ep)
        return ep

    def _discard(self, service: str, ep: Endpoint) -> None:
        self._unwatch(service)
        with contextlib.suppress(EndpointError):
            ep.stop()
        with self._lock:
            if self._live.get(service) is ep:
                del self._live[service]

    def _unwatch(self, service: str) -> None:
        watcher = self._watcher
        if watcher is not None:
            watcher.unwatch(service)

    def sync(self, service: str, wanted_port: int | None, backends: Iterable[Backend],
             weights: Mapping[str, int] | None, activation: Activation | None = None) -> Endpoint:
        """Make the endpoint route to exactly ``backends``, split by ``weights`` (None: one pool),
        holding requests as ``activation`` says (None: as it does now)."""
        ep = self.ensure(service, wanted_port)
        if activation is not None and self._configured.get(service) != activation:
            ep.configure(activation_timeout=activation.timeout, queue_limit=activation.queue_limit)
            with self._lock:
                self._configured[service] = activation
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
        self._unwatch(service)
        with self._lock:
            ep = self._live.pop(service, None)
            self._configured.pop(service, None)
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

    def _await_end(self, service: str, timeout: float = 12.0) -> None:
        """Wait (up to ``timeout``, past the endpoint's 10 s drain) for a stopped endpoint's
        process to end on its own, so :meth:`_end_strays` kills only one that hangs."""
        marker = str(self.control_path(service)).encode()
        deadline = time.monotonic() + timeout
        while _processes_with_arg(b"--control", marker) and time.monotonic() < deadline:
            time.sleep(0.05)

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
        """Drop the control connections; the endpoint processes keep serving (and holding)."""
        with self._lock:
            live = list(self._live.values())
            self._live.clear()
            self._configured.clear()
            watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.close()
        for ep in live:
            ep.close()


class _DemandWatcher:
    """One thread reading the event lines of every endpoint the daemon holds.

    One thread and one epoll set for all services, not a thread per endpoint:
    a daemon with hundreds of services parked at zero must stay idle. A
    subscription that reaches EOF (its endpoint stopped or was replaced) is
    dropped; :meth:`Endpoints.ensure` subscribes again on the next pass.
    """

    def __init__(self, deliver: Callable[[str], None]) -> None:
        self._deliver = deliver
        self._poll = select.epoll()
        self._lock = threading.Lock()
        self._by_fd: dict[int, tuple[str, socket.socket, bytearray]] = {}
        self._by_service: dict[str, int] = {}
        self._stop_r, self._stop_w = socket.socketpair()
        self._poll.register(self._stop_r.fileno(), select.EPOLLIN)
        self._thread = threading.Thread(target=self._run, name="endpoint-demand", daemon=True)
        self._thread.start()

    def watching(self, service: str) -> bool:
        with self._lock:
            return service in self._by_service

    def watch(self, service: str, ep: Endpoint) -> None:
        """Subscribe to ``ep``'s events (replacing an older subscription of ``service``)."""
        try:
            sock = ep.subscribe()
        except EndpointError as exc:  # the next pass's ensure tries again
            print(f"uniframe: endpoints: {exc}", file=sys.stderr)
            return
        sock.setblocking(False)
        self.unwatch(service)
        with self._lock:
            self._by_fd[sock.fileno()] = (service, sock, bytearray())
            self._by_service[service] = sock.fileno()
            self._poll.register(sock.fileno(), select.EPOLLIN)

    def unwatch(self, service: str) -> None:
        with self._lock:
            fd = self._by_service.pop(service, None)
            if fd is None:
                return
            entry = self._by_fd.pop(fd, None)
            if entry is not None:
                with contextlib.suppress(OSError):
                    self._poll.unregister(fd)
                entry[1].close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._stop_w.send(b"x")
        self._thread.join(5)
        with self._lock:
            for _, sock, _ in self._by_fd.values():
                sock.close()
            self._by_fd.clear()
            self._by_service.clear()
        self._poll.close()
        self._stop_r.close()
        self._stop_w.close()

    def _run(self) -> None:
        stop = self._stop_r.fileno()
        while True:
            for fd, _ in self._poll.poll():
                if fd == stop:
                    return
                self._read(fd)

    def _read(self, fd: int) -> None:
        with self._lock:
            entry = self._by_fd.get(fd)
        if entry is None:
            return
        service, sock, buf = entry
        try:
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the endpoint went away; ensure() subscribes to its successor
            with self._lock:
                if self._by_fd.get(fd) is entry:  # not already replaced by a new subscription
                    self._by_service.pop(service, None)
                    self._by_fd.pop(fd, None)
                    with contextlib.suppress(OSError):
                        self._poll.unregister(fd)
                    sock.close()
            return
        buf += data
        while (nl := buf.find(b"\n")) >= 0:
            raw = bytes(buf[:nl])
            del buf[: nl + 1]
            with contextlib.suppress(ValueError):
                event = json.loads(raw)
                if isinstance(event, dict) and event.get("event") == "demand":
                    self._deliver(service)


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
