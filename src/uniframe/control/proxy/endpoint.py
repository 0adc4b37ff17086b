"""The daemon's handle on one service endpoint: start it, tell it the replicas, read its state.

The relay runs as a process of its own (``python -m uniframe.control.proxy``),
because a relay sharing the daemon's interpreter would share its GIL: every
reconcile pass or API call would stall requests in flight, and one Python
thread cannot reach the throughput target beside other work anyway. It can
be pinned to a core (``cpu=``).

The reconciler talks to it over a unix socket, one JSON object per line each
way (``{"op": "add", "backend": {...}}`` → ``{"ok": true}``); this class is
that protocol's typed client. The process outlives a daemon restart on
purpose (the service keeps its port and its traffic): :meth:`Endpoint.attach`
takes it over again from its control socket.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from uniframe.control.proxy.activator import ACTIVATION_TIMEOUT
from uniframe.errors import UniframeError


class EndpointError(UniframeError):
    """A service endpoint could not be started, reached or told something."""


@dataclass(frozen=True)
class Backend:
    """One replica behind the endpoint, as the reconciler knows it.

    ``group`` is the version the replica serves; with weights set (see
    :meth:`Endpoint.set_weights`) traffic is split between groups by weight.
    ``ready`` is the reconciler's verdict; the endpoint adds its own health
    checks on top and sends traffic only where both agree.
    """

    id: str
    host: str
    port: int
    group: str = "default"
    ready: bool = True


@dataclass(frozen=True)
class BackendStatus:
    id: str
    host: str
    port: int
    group: str
    ready: bool
    healthy: bool
    draining: bool
    outstanding: int
    requests: int
    failures: int
    last_error: str

    @property
    def eligible(self) -> bool:
        return self.ready and self.healthy and not self.draining


@dataclass(frozen=True)
class EndpointStatus:
    service: str
    host: str
    port: int
    admin_port: int | None
    requests: int
    codes: dict[int, int]
    retries: int
    upstream_errors: int
    held: int  # requests waiting for a ready replica (demand an autoscaler must count)
    in_flight: int  # requests on replicas now
    demands: int  # times the endpoint told its subscribers it holds requests (see activator)
    activation_timeout: float | None  # None: an endpoint process older than the activator
    queue_limit: int
    clients: int
    weights: dict[str, int]
    backends: tuple[BackendStatus, ...]

    def backend(self, backend_id: str) -> BackendStatus:
        for b in self.backends:
            if b.id == backend_id:
                return b
        raise KeyError(backend_id)


class Endpoint:
    """One service's stable host port; create with :meth:`start` or :meth:`attach`."""

    def __init__(self, service: str, control_path: Path, *, host: str, port: int,
                 admin_port: int | None, process: subprocess.Popen[bytes] | None = None,
                 owned_dir: Path | None = None) -> None:
        self.service = service
        self.control_path = control_path
        self.host = host
        self.port = port
        self.admin_port = admin_port
        self.process = process
        self._owned_dir = owned_dir
        self._sock: socket.socket | None = None
        self._reader: IO[bytes] | None = None
        self._lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        service: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        admin_port: int | None = None,
        control_path: Path | None = None,
        cpu: int | None = None,
        backends: Iterable[Backend] = (),
        weights: Mapping[str, int] | None = None,
        retries: int = 2,
        activation_timeout: float = ACTIVATION_TIMEOUT,
        queue_limit: int = 1024,
        retry_after: int = 1,
        connect_timeout: float = 2.0,
        response_timeout: float = 60.0,
        check_interval: float = 2.0,
        recheck_interval: float = 0.25,
        drain_timeout: float = 10.0,
        log: Path | None = None,
        ready_timeout: float = 15.0,
    ) -> Endpoint:
        """Start the endpoint process for ``service`` on ``host:port`` (0: any free port)."""
        owned: Path | None = None
        if control_path is None:
            owned = Path(tempfile.mkdtemp(prefix=f"uniframe-proxy-{service}-"))
            control_path = owned / "control.sock"
        argv = [
            sys.executable, "-m", "uniframe.control.proxy", "--service", service,
            "--host", host, "--port", str(port), "--control", str(control_path),
            "--retries", str(retries), "--activation-timeout", str(activation_timeout),
            "--queue-limit", str(queue_limit), "--retry-after", str(retry_after),
            "--connect-timeout", str(connect_timeout), "--response-timeout", str(response_timeout),
            "--check-interval", str(check_interval), "--recheck-interval", str(recheck_interval),
            "--drain-timeout", str(drain_timeout),
        ]
        if admin_port is not None:
            argv += ["--admin-host", host, "--admin-port", str(admin_port)]
        if cpu is not None:
            argv += ["--cpu", str(cpu)]
        stderr: Any = subprocess.DEVNULL
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            stderr = log.open("ab")
        try:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        finally:
            if log is not None:
                stderr.close()
        ready = _read_ready(proc, ready_timeout)
        if ready is None:
            proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
            if owned is not None:
                shutil.rmtree(owned, ignore_errors=True)
            where = f"; see {log}" if log is not None else " (pass log= to keep its output)"
            raise EndpointError(
                f"the endpoint of service {service} did not start on {host}:{port} within "
                f"{ready_timeout:g} s (exit status {proc.returncode}){where}")
        ep = cls(service, control_path, host=host, port=int(ready["port"]), admin_port=ready.get("admin_port"),
                 process=proc, owned_dir=owned)
        try:
            backends = list(backends)
            if backends or weights is not None:
                ep.set_backends(backends, weights)
        except BaseException:
            ep.stop()
            raise
        return ep

    @classmethod
    def attach(cls, control_path: Path) -> Endpoint:
        """Take over an endpoint process that is already running (after a daemon restart)."""
        ep = cls("?", control_path, host="127.0.0.1", port=0, admin_port=None)
        st = ep.status()
        ep.service, ep.host, ep.port, ep.admin_port = st.service, st.host, st.port, st.admin_port
        return ep

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def stop(self, timeout: float = 15.0) -> None:
        """Stop accepting, let requests in flight finish (up to ``timeout``), then end the process."""
        proc = self.process
        try:
            if proc is None:
                self._call({"op": "stop"})
            elif proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        finally:
            self.close()
            if proc is not None and proc.stdout is not None:
                proc.stdout.close()
            if self._owned_dir is not None:
                shutil.rmtree(self._owned_dir, ignore_errors=True)

    def close(self) -> None:
        """Drop the control connection; the endpoint keeps running."""
        with self._lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def __enter__(self) -> Endpoint:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    # -- the reconciler's commands -----------------------------------------------------------

    def set_backends(self, backends: Iterable[Backend], weights: Mapping[str, int] | None = None) -> None:
        """Make the backend set exactly ``backends``; those left out are removed gracefully.

        ``weights`` (group → non-negative integer), when given, replaces the
        traffic split; ``None`` leaves it as it is.
        """
        self._call({"op": "set_backends", "backends": [asdict(b) for b in backends],
                    "weights": dict(weights) if weights is not None else None})

    def add(self, backend: Backend) -> None:
        """Add a backend, or update the group and readiness of one with the same id and address."""
        self._call({"op": "add", "backend": asdict(backend)})

    def remove(self, backend_id: str) -> None:
        """Take a backend out now: no new requests; those in flight on it still complete."""
        self._call({"op": "remove", "id": backend_id})

    def drain(self, backend_id: str, *, wait: float | None = None) -> bool:
        """Send a backend no new requests; with ``wait``, wait that long for its in-flight ones.

        The backend stays listed (draining) until :meth:`remove`, so the
        reconciler can watch it empty before stopping the replica. True when
        nothing is in flight on it any more.
        """
        self._call({"op": "drain", "id": backend_id})
        deadline = time.monotonic() + (wait or 0.0)
        while True:
            if self.status().backend(backend_id).outstanding == 0:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    def set_ready(self, backend_id: str, ready: bool) -> None:
        self._call({"op": "set_ready", "id": backend_id, "ready": ready})

    def set_weights(self, weights: Mapping[str, int] | None) -> None:
        """Split traffic between groups, e.g. ``{"v1": 90, "v2": 10}``; ``None``: one pool again.

        While weights are set, a group without one (or with 0) gets no traffic,
        so a new version's replicas can join before the rollout gives them a
        share; a group with no eligible replica passes its share to the others.
        """
        self._call({"op": "set_weights", "weights": dict(weights) if weights is not None else None})

    def configure(self, *, activation_timeout: float | None = None, queue_limit: int | None = None,
                  retry_after: int | None = None) -> None:
        """Change how requests are held while no replica is ready (None: leave as it is)."""
        command: dict[str, Any] = {"op": "configure"}
        for key, value in (("activation_timeout", activation_timeout), ("queue_limit", queue_limit),
                           ("retry_after", retry_after)):
            if value is not None:
                command[key] = value
        self._call(command)

    def subscribe(self, timeout: float = 10.0) -> socket.socket:
        """A new control connection that carries the endpoint's event lines from now on.

        Each line is a JSON object; ``{"event": "demand", "service": ..., "held": N}``
        says requests are held with no ready replica (see :mod:`.activator`). The
        connection is separate from the one commands use, so an event never lands
        where a command's reply is expected. The caller owns (and closes) it; it
        reaches EOF when the endpoint stops.
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(str(self.control_path))
            sock.sendall(b'{"op": "subscribe"}\n')
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = sock.recv(1)  # byte by byte: an event may follow the reply at once
                if not chunk:
                    raise ConnectionResetError("the endpoint closed the connection")
                reply += chunk
            if not json.loads(reply).get("ok"):
                raise EndpointError(f"endpoint of service {self.service} refused to subscribe: {reply!r}")
        except OSError as exc:
            sock.close()
            raise EndpointError(f"cannot subscribe to the endpoint of service {self.service} at "
                                f"{self.control_path}: {exc}; is its process running?") from None
        except BaseException:
            sock.close()
            raise
        return sock

    def status(self) -> EndpointStatus:
        raw = self._call({"op": "status"})["status"]
        return EndpointStatus(
            service=raw["service"], host=raw["host"], port=raw["port"], admin_port=raw["admin_port"],
            requests=raw["requests"], codes={int(k): v for k, v in raw["codes"].items()},
            retries=raw["retries"], upstream_errors=raw["upstream_errors"],
            # an endpoint started by an older daemon lacks the activator's fields
            held=raw.get("held", raw.get("queued", 0)),
            in_flight=raw.get("in_flight", sum(b["outstanding"] for b in raw["backends"])),
            demands=raw.get("demands", 0), activation_timeout=raw.get("activation_timeout"),
            queue_limit=raw.get("queue_limit", 0),
            clients=raw["clients"], weights=raw["weights"],
            backends=tuple(BackendStatus(**b) for b in raw["backends"]),
        )

    def metrics(self) -> str:
        """The Prometheus text the admin port serves at ``/metrics``."""
        text: str = self._call({"op": "metrics"})["text"]
        return text

    # -- the wire --------------------------------------------------------------------------

    def _call(self, command: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            for attempt in (1, 2):  # one reconnect: the endpoint may have been restarted
                try:
                    if self._sock is None:
                        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                        sock.settimeout(10.0)
                        sock.connect(str(self.control_path))
                        self._sock, self._reader = sock, sock.makefile("rb")
                    assert self._reader is not None
                    self._sock.sendall(json.dumps(command).encode() + b"\n")
                    line = self._reader.readline()
                    if not line:
                        raise ConnectionResetError("the endpoint closed the control connection")
                    break
                except OSError as exc:
                    if self._sock is not None:
                        self._sock.close()
                    self._sock = self._reader = None
                    if attempt == 2 or isinstance(exc, TimeoutError):
                        raise EndpointError(
                            f"cannot reach the endpoint of service {self.service} at {self.control_path}: "
                            f"{exc}; is its process running?") from None
        reply: dict[str, Any] = json.loads(line)
        if not reply.get("ok"):
            raise EndpointError(f"endpoint of service {self.service}: {reply.get('error')}")
        return reply


def _read_ready(proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any] | None:
    """The process's ready line, or None if it exits or stays silent past ``timeout``."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    buf = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            chunk = None
        if chunk == b"":
            return None
        if chunk:
            buf += chunk
            if b"\n" in buf:
                try:
                    data: dict[str, Any] = json.loads(buf.split(b"\n", 1)[0])
                except ValueError:
                    return None
                return data if data.get("ready") else None
        elif proc.poll() is not None:
            return None
        else:
            time.sleep(0.01)
    return None
