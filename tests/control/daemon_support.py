"""A real ``uniframe daemon`` process for tests, and client load on a service endpoint."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from control_helpers import kill_strays, strays, until

from uniframe.build.examples import write_iris
from uniframe.control import rollouts
from uniframe.control.registry import Registry
from uniframe.control.states import COMPLETE
from uniframe.control.store import ReplicaRecord, Store
from uniframe.runtime.verify import free_port

SVC = "InferenceService"
ROW = json.dumps({"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32",
                              "data": [5.1, 3.5, 1.4, 0.2]}]}).encode()


@dataclass
class Daemon:
    root: Path
    env: dict[str, str]
    store_path: str  # a SQLite file or a postgresql:// URL
    service_port: int
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def headers(self) -> dict[str, str]:
        """The daemon's credential, read from the token file it made in its state directory."""
        token = (Path(self.env["UNIFRAME_STATE"]) / "daemon.token").read_text().strip()
        return {"Authorization": f"Bearer {token}"}

    def request(self, path: str, data: bytes | None = None, *, method: str | None = None,
                content_type: str = "application/json") -> urllib.request.Request:
        return urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data,
                                      {"Content-Type": content_type, **self.headers},
                                      method=method)

    def start(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uniframe.cli.main", "daemon", "--listen",
             f"127.0.0.1:{self.port}", "--store", self.store_path, "--period", "0.3",
             "--allow-path", str(self.root)],
            env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=(self.root / "daemon.log").open("ab"))
        until("the daemon answers", lambda: self.get("/openapi.json") is not None, 30)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def get(self, path: str) -> Any:
        assert self.proc is not None and self.proc.poll() is None, self.log()
        with contextlib.suppress(OSError), urllib.request.urlopen(
                self.request(path), timeout=5) as resp:
            return json.loads(resp.read())
        return None

    def apply(self, yaml_text: str) -> None:
        req = self.request("/v1/apply", yaml_text.encode(), content_type="application/yaml")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                assert resp.status == 200
        except urllib.error.HTTPError as exc:
            raise AssertionError(exc.read().decode()) from None

    def metrics(self) -> dict[str, float]:
        """The daemon's /metrics samples by series name with labels."""
        with urllib.request.urlopen(self.request("/metrics"), timeout=10) as r:
            text = r.read().decode()
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if line and not line.startswith("#")}

    def delete(self, kind: str, name: str) -> None:
        req = self.request(f"/v1/objects/{kind}/{name}", method="DELETE")
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200

    def log(self) -> str:
        return (self.root / "daemon.log").read_text(errors="replace")


def spec(version: int, port: int, *, replicas: int = 2, rollout: str = "",
         env: str = "", runtime: str = "process") -> str:
    return f"""
apiVersion: uniframe.dev/v1alpha1
kind: InferenceService
metadata: {{name: iris}}
spec:
  model: iris@{version}
  runtime: {runtime}
  replicas: {replicas}
  servicePort: {port}
  healthCheck: {{periodSeconds: 1}}
  rollout: {{{rollout or "strategy: rolling, maxSurge: 1, maxUnavailable: 0"}}}
  {env}
"""



@dataclass
class Load:
    """Client threads sending inference requests to the endpoint on keep-alive connections."""

    port: int
    threads: int = 4
    versions: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    last: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __enter__(self) -> Load:
        for _ in range(self.threads):
            t = threading.Thread(target=self._run, daemon=True)
            t.start()
            self._workers.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._workers:
            t.join(30)

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        while not self._stop.is_set():
            try:
                conn.request("POST", "/v2/models/iris/infer", ROW,
                             {"Content-Type": "application/json"})
                resp = conn.getresponse()
                body = resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}: {body[:200]!r}")
                version = str(json.loads(body)["model_version"])
                with self._lock:
                    self.versions[version] += 1
                    self.last = [*self.last[-49:], version]
            except Exception as exc:
                with self._lock:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                time.sleep(0.05)
        conn.close()

    def total(self) -> int:
        with self._lock:
            return sum(self.versions.values())


def open_store(d: Daemon) -> Store:
    return Store.open(d.store_path)


def replicas(d: Daemon) -> list[ReplicaRecord]:
    with open_store(d) as store, store.tx(readonly=True) as tx:
        return tx.list_replicas(SVC, "iris")


def rollout_status(d: Daemon) -> rollouts.RolloutStatus:
    with open_store(d) as store:
        return rollouts.status(store, SVC, "iris")


def event_reasons(d: Daemon) -> list[str]:
    with open_store(d) as store, store.tx(readonly=True) as tx:
        return [e.reason for e in tx.events(SVC, "iris")]


def settled(d: Daemon, revision: int, replicas: int = 2) -> Callable[[], bool]:
    def check() -> bool:
        s = rollout_status(d)
        return (s.state == COMPLETE and s.revision == revision and s.updated_ready == replicas
                and s.old == 0)
    return check


def server_pids(root: Path) -> list[int]:
    """Model servers of this test on the host, counted from /proc (not from our own records)."""
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            with contextlib.suppress(OSError):
                argv = (p / "cmdline").read_bytes().split(b"\0")
                if argv[1:3] == [b"-m", b"uniframe.serve"] and str(root).encode() in argv[3]:
                    found.append(int(p.name))
    return found




@contextlib.contextmanager
def running_daemon(tmp_path: Path, monkeypatch: Any, store_target: str,
                   models: int = 2) -> Iterator[Daemon]:
    """A daemon on ``store_target`` with iris pushed as versions 1..``models``; cleaned up after."""
    env = {**os.environ, "UNIFRAME_DATA": str(tmp_path / "data"),
           "UNIFRAME_STATE": str(tmp_path / "state")}
    for key in ("UNIFRAME_DATA", "UNIFRAME_STATE"):
        monkeypatch.setenv(key, env[key])
    d = Daemon(tmp_path, env, store_target, free_port())
    with Store.open(d.store_path) as st:
        model = write_iris(tmp_path / "model")
        registry = Registry(st)
        for version in range(1, models + 1):
            registry.push(model, "iris", version=version)
    d.start()
    try:
        yield d
    finally:
        if d.proc is not None and d.proc.poll() is None:
            with contextlib.suppress(OSError, AssertionError):
                urllib.request.urlopen(d.request(f"/v1/objects/{SVC}/iris", method="DELETE"),
                                       timeout=10).close()
            with contextlib.suppress(AssertionError):
                until("the service is gone", lambda: not replicas(d), 120)
            d.proc.terminate()
            d.proc.wait(30)
        left = strays(tmp_path)
        if left:  # a failed test's leftovers must not disturb the next test
            print(f"killing processes left under {tmp_path}: {left}")
            kill_strays(tmp_path)


def endpoint_pid(d: Daemon) -> int:
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            with contextlib.suppress(OSError):
                argv = (p / "cmdline").read_bytes().split(b"\0")
                if (argv[1:3] == [b"-m", b"uniframe.control.proxy"]
                        and str(d.service_port).encode() in argv):
                    return int(p.name)
    raise AssertionError("no endpoint process")


def revision_digest(d: Daemon, number: int) -> str:
    with open_store(d) as store:
        revs = rollouts.revisions(store, SVC, "iris")
    return next(r.digest for r in revs if r.number == number)
