"""The runc driver: OCI images as detached containers, one network namespace each.

Each replica is a directory ``<state>/replicas/<id>/`` beside the microVMs'::

    replica.json   what was asked for and what was launched (see runtime.replica)
    bundle/        rootfs/ unpacked from the image, and runc's config.json
    container.log  the container's stdout and stderr, complete from the first byte
    container.pid  written by runc once the container's init runs
    exitcode       written by the shim when runc returns: the container's exit status
    exit.json      how the replica ended, once someone has seen it end

runc has no daemon, and ``runc run --detach`` hands the container to PID 1,
so nobody would learn how it exited. The driver therefore starts a *shim*:
``sh`` in its own session that runs ``runc run`` in the foreground and writes
runc's exit status (the container's, or 128+signal) to ``exitcode``. runc
stays the container's parent, copies its output to the log, and deletes the
container (state and cgroup) when it ends. Nothing else runs beside the
container, so nothing else can leak.

Stopping is ``runc kill TERM``, a wait, then ``runc kill KILL``; removing also
drops the network namespace, veth, port rules, any cgroup left over, and the
bundle. ``leftovers`` lists what of a replica still exists on the host, which
is what the tests check after every run.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from uniframe.build.oci import opened_layout, read_layout
from uniframe.build.store import ImageStore
from uniframe.errors import ImageError, RuntimeDriverError
from uniframe.paths import state_dir
from uniframe.runtime.driver import Driver
from uniframe.runtime.ports import ensure_free
from uniframe.runtime.process import ProcessRef
from uniframe.runtime.replica import (
    ImageRef,
    Replica,
    ReplicaConfig,
    ReplicaState,
    ReplicaStatus,
    utcnow,
)
from uniframe.runtime.runc import cgroups, network
from uniframe.runtime.runc.bundle import RuntimeOptions, bundle_from_layout

REPLICA_FILE = "replica.json"
EXIT_FILE = "exit.json"
EXIT_CODE = "exitcode"
PID_FILE = "container.pid"
LOG_FILE = "container.log"
BUNDLE = "bundle"
RUNC_ROOT = Path("/run/uniframe-runc")
START_TIMEOUT_S = 30.0
NETWORK_MODES = {"user": "private", "bridge": "private", "private": "private", "host": "host", "none": "none"}

# $1 runc, $2 its state root, $3 bundle, $4 pid file, $5 container id, $6 exit code file
SHIM = '"$1" --root "$2" run --bundle "$3" --pid-file "$4" "$5" </dev/null; echo $? >"$6.tmp"; mv "$6.tmp" "$6"'


def _tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


def _runc() -> str:
    path = shutil.which("runc")
    if path is None:
        raise RuntimeDriverError("runc is not installed; install it with 'apt-get install runc'")
    return path


def image_ref(ref: str, store: ImageStore | None = None) -> ImageRef:
    """An :class:`ImageRef` for an OCI image: a layout directory, a ``.tar`` of one, or a store image.

    Containers have no kernel or initrd: both stay empty paths, and ``ref``
    names the image (the lead's common driver interface may grow a field for it).
    """
    source = resolve_image(ref, store)
    digest = read_layout(source).manifest_digest if source.is_dir() else ""
    return ImageRef(ref, digest, Path(), Path())


def _layout_source(config: ReplicaConfig) -> Path:
    """The layout to unpack: the image directory the caller resolved, else by reference."""
    path = config.image.path
    if path is not None and (path / "oci-layout").is_file():
        return path
    return resolve_image(config.image.ref)


def resolve_image(ref: str, store: ImageStore | None = None) -> Path:
    """The OCI layout directory or archive that ``ref`` names."""
    path = Path(ref)
    if path.is_dir() and (path / "oci-layout").is_file():
        return path
    if path.is_file():
        return path
    try:
        image = (store or ImageStore()).resolve(ref)
    except ImageError:
        if path.exists():
            raise ImageError(f"{ref} is not an OCI image layout (no oci-layout file); give a layout "
                             "directory, a .tar of one, or an image name from 'uniframe images'") from None
        raise
    if image.kind != "oci":
        raise ImageError(f"image {ref} is a {image.kind} image; the runc driver runs OCI images",
                         permanent=True)  # only a changed spec names another image
    return image.dir


class RuncDriver(Driver):
    """Create, start, stop, inspect and remove container replicas with runc (root only)."""

    noun = "container replica"
    kind = "runc"
    capabilities = frozenset({"port-forward", "host-network", "cgroup-limits", "logs"})

    def __init__(self, root: Path | None = None, runc_root: Path = RUNC_ROOT) -> None:
        self.root = root or state_dir() / "replicas"
        self.runc_root = runc_root

    # -- records on disk -------------------------------------------------

    # -- lifecycle ---------------------------------------------------------

    def _options(self, replica_id: str, name: str, config: ReplicaConfig, mode: str) -> RuntimeOptions:
        netns = None if mode == "host" else network.NETNS_DIR / network.netns_name(replica_id)
        return RuntimeOptions(hostname=name, netns=netns, host_network=mode == "host",
                              cgroups_path=cgroups.cgroups_path(replica_id),
                              cpus=float(config.cpus), memory_mib=config.memory_mib,
                              args=self._process_args(config), env=dict(config.env))

    @staticmethod
    def _process_args(config: ReplicaConfig) -> tuple[str, ...] | None:
        """OCI semantics: ``command`` replaces the image's Entrypoint, ``args`` its Cmd."""
        if config.command is None and config.args is None:
            return None
        if config.command is not None:
            return (*config.command, *(config.args or ()))
        with opened_layout(_layout_source(config)) as layout_dir:
            entrypoint = read_layout(layout_dir).config.entrypoint
        return (*entrypoint, *(config.args or ()))

    def create(self, config: ReplicaConfig) -> Replica:
        """Unpack the image into a bundle and record the replica; :meth:`start` runs it."""
        if os.geteuid() != 0:
            raise RuntimeDriverError("the runc driver needs root (namespaces, cgroups); run as root")
        _runc()
        mode = NETWORK_MODES.get(config.network)
        if mode is None:
            raise RuntimeDriverError(f"unknown network mode {config.network!r} for a container; "
                                     "use private (own namespace, published ports), host or none")
        if config.ports and mode != "private":
            raise RuntimeDriverError(f"ports cannot be published with network {mode}: "
                                     + ("the container listens on the host's ports directly" if mode == "host"
                                        else "the container has no network"))
        if config.cpus < 1 or config.memory_mib < 8:
            raise RuntimeDriverError(f"a container needs at least 1 CPU and 8Mi of memory "
                                     f"(got {config.cpus} CPUs, {config.memory_mib}Mi)")
        if config.name and any(r.name == config.name for r in self.list()):
            raise RuntimeDriverError(f"a replica named {config.name!r} already exists; remove it "
                                     f"with 'uniframe rm {config.name}' or pick another --name")
        source = _layout_source(config)
        replica_id = secrets.token_hex(6)
        base = re.sub(r"[^A-Za-z0-9_.-]", "-", Path(config.image.ref.split(":")[0]).name)[:40] or "container"
        name = config.name or f"{base}-{replica_id[:4]}"
        directory = self.root / replica_id
        directory.mkdir(parents=True)
        try:
            bundle = bundle_from_layout(source, directory / BUNDLE, self._options(replica_id, name, config, mode))
            digest = config.image.digest or bundle.manifest_digest
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        image = replace(config.image, digest=digest)
        replica = Replica(
            id=replica_id, name=name, dir=directory, config=replace(config, image=image, name=name),
            created_at=utcnow(), driver=self.kind,
            extra={"container_id": f"uf-{replica_id}", "bundle": str(bundle.dir), "network_mode": mode,
                   "cgroup": cgroups.cgroups_path(replica_id), "runc_root": str(self.runc_root),
                   "args": list(json.loads(bundle.config_path.read_text())["process"]["args"])},
        )
        self._save(replica)
        return replica

    def start(self, ref: str) -> Replica:
        """Run the container detached and return once its init process runs."""
        replica = self.get(ref)
        if self._running(replica):
            raise RuntimeDriverError(f"replica {replica.name} is already running")
        config = replica.config
        mode = str(replica.extra["network_mode"])
        ensure_free(list(config.ports))
        for stale in (EXIT_FILE, EXIT_CODE, PID_FILE):
            (replica.dir / stale).unlink(missing_ok=True)
        self._delete_container(replica)
        attachment = None
        if mode != "host":
            attachment = network.attach(self.root.parent, replica.id, mode, list(config.ports))
        log = replica.dir / LOG_FILE
        log_offset = log.stat().st_size if log.exists() else 0
        argv = ["sh", "-c", SHIM, "uniframe-shim", _runc(), str(self.runc_root),
                str(replica.extra["bundle"]), str(replica.dir / PID_FILE),
                str(replica.extra["container_id"]), str(replica.dir / EXIT_CODE)]
        self.runc_root.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            shim = subprocess.Popen(argv, cwd=replica.dir, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=out, start_new_session=True)
        shim_ref = ProcessRef.of(shim.pid)
        replica = replica.with_(started_at=utcnow(), log_offset=log_offset, argv=tuple(argv),
                                guest_ip=attachment.container_ip if attachment else None,
                                tap=attachment.host_if if attachment else None,
                                extra={**replica.extra, "shim_pid": shim_ref.pid,
                                       "shim_start_time": shim_ref.start_time,
                                       "host_ip": attachment.host_ip if attachment else None})
        self._save(replica)
        try:
            pid = self._wait_started(replica, shim)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(shim.pid, signal.SIGKILL)
            shim.wait()
            self._delete_container(replica)
            self._release(replica)
            raise
        container = ProcessRef.of(pid)
        replica = replica.with_(pid=container.pid, pid_start_time=container.start_time)
        self._save(replica)
        self._check_limits(replica)
        return replica

    def _wait_started(self, replica: Replica, shim: subprocess.Popen[bytes]) -> int:
        deadline = time.monotonic() + START_TIMEOUT_S
        pid_file = replica.dir / PID_FILE
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                return int(pid_file.read_text().strip())
            if shim.poll() is not None:
                raise RuntimeDriverError(
                    f"runc could not start {replica.name}:\n{_tail(replica.dir / LOG_FILE)}\n"
                    f"(full log: {replica.dir / LOG_FILE})")
            time.sleep(0.02)
        raise RuntimeDriverError(f"runc did not start {replica.name} within {START_TIMEOUT_S:.0f} s; "
                                 f"see {replica.dir / LOG_FILE}")

    def _check_limits(self, replica: Replica) -> None:
        """Read the limits back from the cgroup: a limit runc silently skipped must not pass unseen."""
        try:
            limits = cgroups.read_limits(str(replica.extra["cgroup"]))
        except OSError:
            if self._running(replica):
                raise RuntimeDriverError(f"replica {replica.name} runs but its cgroup "
                                         f"{replica.extra['cgroup']} cannot be read") from None
            return  # it already ended; inspect reports how
        want_quota = int(replica.config.cpus * 100_000)
        want_memory = replica.config.memory_mib << 20
        if limits.cpu_quota_us != want_quota or limits.memory_bytes != want_memory:
            self.stop(replica.id, timeout=0)
            raise RuntimeDriverError(
                f"replica {replica.name}: the cgroup holds cpu quota {limits.cpu_quota_us} us and memory "
                f"{limits.memory_bytes} bytes, not the {want_quota} us and {want_memory} bytes asked for")

    def cgroup_limits(self, ref: str) -> cgroups.CgroupLimits:
        """The CPU and memory limits the kernel applies to the running replica."""
        replica = self.get(ref)
        try:
            return cgroups.read_limits(str(replica.extra["cgroup"]))
        except OSError:
            raise RuntimeDriverError(f"replica {replica.name} is not running, so it has no cgroup") from None

    # -- state ---------------------------------------------------------------

    def _refs(self, replica: Replica) -> tuple[ProcessRef, ...]:
        refs = []
        if replica.pid is not None and replica.pid_start_time is not None:
            refs.append(ProcessRef(replica.pid, replica.pid_start_time))
        shim_pid, shim_start = replica.extra.get("shim_pid"), replica.extra.get("shim_start_time")
        if shim_pid is not None and shim_start is not None:
            refs.append(ProcessRef(int(shim_pid), int(shim_start)))
        return tuple(refs)

    def _running(self, replica: Replica) -> bool:
        alive = False
        for pref in self._refs(replica):
            pref.reap()
            alive = alive or pref.alive()
        return alive

    def inspect(self, ref: str) -> ReplicaStatus:
        """Running, or how it ended: the exit status runc reported, or crashed if there is none."""
        return self._status(self.get(ref))

    def _status(self, replica: Replica, how: str = "") -> ReplicaStatus:
        if replica.started_at is None:
            return ReplicaStatus(ReplicaState.CREATED)
        if self._running(replica):
            return ReplicaStatus(ReplicaState.RUNNING)
        exit_file = replica.dir / EXIT_FILE
        with contextlib.suppress(OSError, ValueError, KeyError):
            return ReplicaStatus.from_json(json.loads(exit_file.read_text()))
        try:
            code = int((replica.dir / EXIT_CODE).read_text().strip())
        except (OSError, ValueError):
            code = None
        if code is None:
            result = ReplicaStatus(ReplicaState.CRASHED, None, how or "runc went away without an exit status",
                                   utcnow())
        else:
            if how:
                detail = how
            elif code > 128 and code - 128 < signal.NSIG:
                detail = f"killed by {signal.Signals(code - 128).name}"
            else:
                detail = f"exited with status {code}"
            result = ReplicaStatus(ReplicaState.EXITED, code, detail, utcnow())
        self._delete_container(replica)
        self._release(replica)
        tmp = exit_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(result.to_json()) + "\n")
        os.replace(tmp, exit_file)
        return result

    def wait(self, ref: str, timeout: float | None = None) -> ReplicaStatus:
        """Block until the replica is no longer running (or ``timeout`` passes)."""
        replica = self.get(ref)
        if not self._wait_gone(replica, timeout):
            return ReplicaStatus(ReplicaState.RUNNING)
        return self._status(replica)

    def _wait_gone(self, replica: Replica, seconds: float | None) -> bool:
        deadline = None if seconds is None else time.monotonic() + seconds
        while self._running(replica):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    # -- stopping and cleaning up ------------------------------------------

    def _runc_cmd(self, replica: Replica, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([_runc(), "--root", str(replica.extra.get("runc_root", self.runc_root)), *args],
                              capture_output=True, text=True, stdin=subprocess.DEVNULL)

    def _kill(self, replica: Replica, sig: str) -> None:
        self._runc_cmd(replica, "kill", str(replica.extra["container_id"]), sig)

    def stop(self, ref: str, timeout: float = 10.0) -> ReplicaStatus:
        """SIGTERM to the container's init, wait ``timeout`` seconds, then SIGKILL."""
        replica = self.get(ref)
        if not self._running(replica):
            return self._status(replica)
        if timeout > 0:
            self._kill(replica, "TERM")
            if self._wait_gone(replica, timeout):
                return self._status(replica)
        self._kill(replica, "KILL")
        if not self._wait_gone(replica, 5.0):
            for pref in self._refs(replica):  # runc could not: the processes themselves
                pref.signal(signal.SIGKILL)
            self._wait_gone(replica, 5.0)
        how = "killed" if timeout <= 0 else f"did not stop within {timeout:g} s; killed"
        return self._status(replica, how)

    def _delete_container(self, replica: Replica) -> None:
        container_id = str(replica.extra["container_id"])
        self._runc_cmd(replica, "delete", "--force", container_id)
        cgroups.remove(str(replica.extra["cgroup"]))
        with contextlib.suppress(OSError):
            Path(str(replica.extra.get("runc_root", self.runc_root))).rmdir()  # only once empty

    def _release(self, replica: Replica) -> None:
        network.detach(self.root.parent, replica.id)

    def remove(self, ref: str, force: bool = False) -> Replica:
        """Delete the replica and everything it had on the host; a running one needs ``force``."""
        replica = self.get(ref)
        if self._running(replica):
            if not force:
                raise RuntimeDriverError(f"replica {replica.name} is running; stop it first "
                                         f"('uniframe stop {replica.name}') or use rm -f")
            self.stop(replica.id, timeout=0)
        self._delete_container(replica)
        self._release(replica)
        shutil.rmtree(replica.dir, ignore_errors=True)
        return replica

    def leftovers(self, replica: Replica) -> builtins.list[str]:
        """What of ``replica`` still exists on the host: processes, cgroups, namespace, veth, files."""
        found = [f"process {p.pid}" for p in self._refs(replica) if p.alive()]
        found += [f"cgroup {d}" for d in cgroups.directories(str(replica.extra["cgroup"]))]
        found += network.leftovers(replica.id)
        if (Path(str(replica.extra.get("runc_root", self.runc_root))) / str(replica.extra["container_id"])).exists():
            found.append(f"runc state {replica.extra['container_id']}")
        if replica.dir.exists():
            found.append(f"directory {replica.dir}")
        return found

    # -- output --------------------------------------------------------------

    def logs(self, ref: str, follow: bool = False, offset: int = 0) -> Iterator[bytes]:
        """The container's output from ``offset``; with ``follow``, until the replica stops."""
        replica = self.get(ref)
        path = replica.dir / LOG_FILE
        yield from self._read_log(path, offset, follow, lambda: self._running(replica))

