"""The ``process`` runtime: the model server as a plain host process.

It is every benchmark's baseline and the fastest way to run a service while
developing. A process image is a directory with the model and a manifest
naming the server's arguments; the replica runs ``python -m uniframe.serve``
from this host's Python, listening directly on the published host port (a
process shares the host's network, so ``-p HOST:GUEST`` means "listen on
HOST").

The server runs under a small ``sh`` shim, in its own session, that forwards
SIGTERM to it and writes its exit status to a file: the CLI that started it
exits at once, and any later process reads how the server ended from disk.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from uniframe.build.store import load_image_dir
from uniframe.errors import RuntimeDriverError
from uniframe.paths import state_dir
from uniframe.runtime.driver import Driver
from uniframe.runtime.ports import ensure_free
from uniframe.runtime.process import ProcessRef, wait_group_gone
from uniframe.runtime.replica import Replica, ReplicaConfig, ReplicaState, ReplicaStatus, utcnow

LOG = "output.log"
EXIT = "exitcode"
# Forward TERM/INT to the server and record its exit status once it is gone.
_SHIM = r"""
"$@" & pid=$!
trap 'kill -TERM $pid 2>/dev/null' TERM INT
while :; do wait $pid; st=$?; kill -0 $pid 2>/dev/null || break; done
echo $st > "$UNIFRAME_EXIT_FILE"
exit $st
"""


class ProcessDriver(Driver):
    """Run process images as detached host processes."""

    noun = "process replica"
    kind = "process"
    capabilities = frozenset({"host-network", "logs"})

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or state_dir() / "replicas"

    def create(self, config: ReplicaConfig) -> Replica:
        if config.image.path is None:
            raise RuntimeDriverError(f"image {config.image.ref}: no image directory to run")
        image = load_image_dir(config.image.path)
        if image.kind != "process":
            raise RuntimeDriverError(f"image {config.image.ref} is a {image.kind} image, not a "
                                     "process image", permanent=True)
        if len(config.ports) > 1:
            raise RuntimeDriverError("a process replica serves one port; publish one -p HOST:GUEST")
        if config.name and any(r.name == config.name for r in self.list()):
            raise RuntimeDriverError(f"a replica named {config.name!r} already exists")
        replica_id = secrets.token_hex(6)
        base = re.sub(r"[^A-Za-z0-9_.-]", "-", config.image.ref.split(":")[0].split("/")[-1]) or "process"
        name = config.name or f"{base}-{replica_id[:4]}"
        directory = self.root / replica_id
        directory.mkdir(parents=True)
        replica = Replica(id=replica_id, name=name, dir=directory, config=replace(config, name=name),
                          created_at=utcnow(), driver=self.kind)
        self._save(replica)
        return replica

    def _argv(self, replica: Replica) -> builtins.list[str]:
        assert replica.config.image.path is not None
        image = load_image_dir(replica.config.image.path)
        m = image.manifest
        args = list(m["args"])
        host, port = "127.0.0.1", int(m["port"])
        if replica.config.ports:
            p = replica.config.ports[0]
            host, port = p.host_ip, p.host_port
        args[args.index("--port") + 1] = str(port)
        model = image.file("model")
        return [sys.executable, "-m", "uniframe.serve", str(model), *args, "--host", host]

    def _image_env(self, replica: Replica) -> dict[str, str]:
        """The spec's ``env``, as the build recorded it (the same variables every runtime gets)."""
        assert replica.config.image.path is not None
        env = load_image_dir(replica.config.image.path).manifest.get("env", {})
        return {str(k): str(v) for k, v in env.items()}

    def start(self, ref: str) -> Replica:
        replica = self.get(ref)
        if self._alive(replica):
            raise RuntimeDriverError(f"replica {replica.name} is already running")
        ensure_free(list(replica.config.ports))
        (replica.dir / EXIT).unlink(missing_ok=True)
        argv = self._argv(replica)
        log = replica.dir / LOG
        offset = log.stat().st_size if log.exists() else 0
        env = {**os.environ, "UNIFRAME_EXIT_FILE": str(replica.dir / EXIT), "PYTHONUNBUFFERED": "1",
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
               **self._image_env(replica), **dict(replica.config.env)}
        with log.open("ab") as out:
            proc = subprocess.Popen(["sh", "-c", _SHIM, "uniframe-process", *argv], cwd=replica.dir,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env=env, start_new_session=True)
        pref = ProcessRef.of(proc.pid)
        replica = replica.with_(pid=pref.pid, pid_start_time=pref.start_time, started_at=utcnow(),
                                log_offset=offset, argv=tuple(argv))
        self._save(replica)
        return replica

    def _alive(self, replica: Replica) -> bool:
        if replica.pid is None or replica.pid_start_time is None:
            return False
        ref = ProcessRef(replica.pid, replica.pid_start_time)
        alive = ref.alive()
        if not alive:
            ref.reap()
        return alive

    def inspect(self, ref: str) -> ReplicaStatus:
        replica = self.get(ref)
        if replica.pid is None:
            return ReplicaStatus(ReplicaState.CREATED)
        if self._alive(replica):
            return ReplicaStatus(ReplicaState.RUNNING)
        exit_file = replica.dir / EXIT
        if exit_file.is_file():
            with contextlib.suppress(ValueError):
                code = int(exit_file.read_text().strip())
                return ReplicaStatus(ReplicaState.EXITED, code, "", None)
        return ReplicaStatus(ReplicaState.CRASHED, None, "the process went away without an exit status")

    def wait(self, ref: str, timeout: float | None = None) -> ReplicaStatus:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.inspect(ref)
            if status.state is not ReplicaState.RUNNING:
                return status
            if deadline is not None and time.monotonic() > deadline:
                return status
            time.sleep(0.05)

    def stop(self, ref: str, timeout: float = 10.0) -> ReplicaStatus:
        replica = self.get(ref)
        if not self._alive(replica):
            return self.inspect(ref)
        assert replica.pid is not None and replica.pid_start_time is not None
        shim = ProcessRef(replica.pid, replica.pid_start_time)
        shim.signal(signal.SIGTERM)
        status = self.wait(ref, timeout)
        if status.state is ReplicaState.RUNNING:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(replica.pid, signal.SIGKILL)
            status = self.wait(ref, 5)
        wait_group_gone(replica.pid, 5)  # the server too, not only the shim: it holds the port
        return status

    def remove(self, ref: str, force: bool = False) -> Replica:
        replica = self.get(ref)
        if self._alive(replica):
            if not force:
                raise RuntimeDriverError(f"replica {replica.name} is running; stop it first or use -f")
            self.stop(ref, timeout=5)
        shutil.rmtree(replica.dir, ignore_errors=True)
        return replica

    def logs(self, ref: str, follow: bool = False, offset: int = 0) -> Iterator[bytes]:
        replica = self.get(ref)
        path = replica.dir / LOG
        pos = offset
        while True:
            if path.exists():
                with path.open("rb") as fh:
                    fh.seek(pos)
                    chunk = fh.read()
                if chunk:
                    pos += len(chunk)
                    yield chunk
            if not follow or not self._alive(self.get(ref)):
                if follow and path.exists() and path.stat().st_size > pos:
                    continue
                return
            time.sleep(0.2)
