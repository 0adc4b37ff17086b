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
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from uniframe.build.store import load_image_dir
from uniframe.errors import RuntimeDriverError
from uniframe.runtime import hostnet
from uniframe.runtime.driver import Driver
from uniframe.runtime.ports import PortMapping
from uniframe.runtime.process import ProcessRef, wait_group_gone
from uniframe.runtime.replica import Replica, ReplicaConfig, ReplicaState, ReplicaStatus

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
    log_file = LOG

    def create(self, config: ReplicaConfig) -> Replica:
        if config.image.path is None:
            raise RuntimeDriverError(f"image {config.image.ref}: no image directory to run")
        image = load_image_dir(config.image.path)
        if image.kind != "process":
            raise RuntimeDriverError(f"image {config.image.ref} is a {image.kind} image, not a "
                                     "process image", permanent=True)
        if len(config.ports) > 1:
            raise RuntimeDriverError("a process replica serves one port; publish one -p HOST:GUEST")
        replica_id, name, directory = self._allocate(config.name, Path(config.image.ref.split(":")[0]).name)
        return self._record_new(replica_id, directory, replace(config, name=name))

    @staticmethod
    def _listens_on(replica: Replica) -> PortMapping:
        """The host address and port the server binds: the published one, else the image's own."""
        if replica.config.ports:
            return replica.config.ports[0]
        assert replica.config.image.path is not None
        port = int(load_image_dir(replica.config.image.path).manifest["port"])
        return PortMapping(port, port)

    def _argv(self, replica: Replica) -> builtins.list[str]:
        assert replica.config.image.path is not None
        image = load_image_dir(replica.config.image.path)
        args = list(image.manifest["args"])
        listen = self._listens_on(replica)
        args[args.index("--port") + 1] = str(listen.host_port)
        model = image.file("model")
        return [sys.executable, "-m", "uniframe.serve", str(model), *args, "--host", listen.host_ip]

    def _image_env(self, replica: Replica) -> dict[str, str]:
        """The spec's ``env``, as the build recorded it (the same variables every runtime gets)."""
        assert replica.config.image.path is not None
        env = load_image_dir(replica.config.image.path).manifest.get("env", {})
        return {str(k): str(v) for k, v in env.items()}

    def _launch(self, replica: Replica) -> tuple[Replica, subprocess.Popen[bytes]]:
        (replica.dir / EXIT).unlink(missing_ok=True)
        argv = self._argv(replica)
        env = {**os.environ, "UNIFRAME_EXIT_FILE": str(replica.dir / EXIT), "PYTHONUNBUFFERED": "1",
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
               **self._image_env(replica), **dict(replica.config.env)}
        hostnet.claim_ports(self.root.parent, replica, [self._listens_on(replica)])  # published or not
        try:
            with (replica.dir / LOG).open("ab") as out:
                proc = subprocess.Popen(["sh", "-c", _SHIM, "uniframe-process", *argv], cwd=replica.dir,
                                        stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                        env=env, start_new_session=True)
        except BaseException:
            hostnet.release(self.root.parent, replica.id)
            raise
        return replica.with_(argv=tuple(argv)), proc

    def _until_started(self, replica: Replica, proc: subprocess.Popen[bytes]) -> ProcessRef | None:
        """The port claim now lives as long as the shim (and so the server) does."""
        hostnet.bind(self.root.parent, replica.id, *self._processes(replica))
        return None

    def _ask_to_stop(self, replica: Replica, deadline: float) -> None:
        """SIGTERM to the shim, which hands it to the server."""
        for shim in self._processes(replica):
            shim.signal(signal.SIGTERM)

    def _force_stop(self, replica: Replica) -> str | None:
        """SIGKILL to the whole session: the shim and the server it started."""
        if replica.pid is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(replica.pid, signal.SIGKILL)
        return "killed"

    def _how_it_ended(self, replica: Replica) -> ReplicaStatus:
        """The server's exit status, as the shim wrote it once the server was gone."""
        with contextlib.suppress(OSError, ValueError):
            return ReplicaStatus(ReplicaState.EXITED, int((replica.dir / EXIT).read_text().strip()))
        return ReplicaStatus(ReplicaState.CRASHED, None, "the process went away without an exit status")

    def _release(self, replica: Replica) -> None:
        """Wait for the server too, not only the shim: it holds the published port."""
        if replica.pid is not None:
            wait_group_gone(replica.pid, 5)
        hostnet.release(self.root.parent, replica.id)
