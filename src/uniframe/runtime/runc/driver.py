"""The runc driver: OCI images as detached containers, one network namespace each.

Each replica is a directory ``<state>/replicas/<id>/`` beside the microVMs'::

    replica.json   what was asked for and what was launched (see runtime.replica)
    bundle/        rootfs/ unpacked from the image, and runc's config.json
    container.log  the container's stdout and stderr, complete from the first byte
    container.pid  written by runc once the container's init runs
    exitcode       written by the shim when runc returns: the container's exit status
    exit.json      how the replica ended, once someone has seen it end (runtime.driver)

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
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from uniframe.build.oci import opened_layout, read_layout
from uniframe.build.store import ImageStore
from uniframe.errors import ImageError, RuntimeDriverError
from uniframe.runtime import hostnet
from uniframe.runtime.driver import Driver, log_tail
from uniframe.runtime.process import ProcessRef
from uniframe.runtime.replica import (
    ImageRef,
    Replica,
    ReplicaConfig,
    ReplicaState,
    ReplicaStatus,
)
from uniframe.runtime.runc import cgroups, network
from uniframe.runtime.runc.bundle import RuntimeOptions, bundle_from_layout

EXIT_CODE = "exitcode"
PID_FILE = "container.pid"
LOG_FILE = "container.log"
BUNDLE = "bundle"
RUNC_ROOT = Path("/run/uniframe-runc")
START_TIMEOUT_S = 30.0
NETWORK_MODES = {"user": "private", "bridge": "private", "private": "private", "host": "host", "none": "none"}

# $1 runc, $2 its state root, $3 bundle, $4 pid file, $5 container id, $6 exit code file
SHIM = '"$1" --root "$2" run --bundle "$3" --pid-file "$4" "$5" </dev/null; echo $? >"$6.tmp"; mv "$6.tmp" "$6"'


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


@dataclass(frozen=True)
class RuncRecord:
    """The runc driver's own part of a replica record, kept in ``Replica.extra``.

    ``container_ip`` and ``host_if`` are stored as ``guest_ip`` and ``tap``: the
    names records written before this record existed used for them.
    """

    container_id: str
    bundle: str
    network_mode: str               # private, host or none
    cgroup: str
    runc_root: str | None = None    # None in old records: the driver's default
    args: tuple[str, ...] = ()      # the container's argv, as the bundle says
    shim_pid: int | None = None
    shim_start_time: int | None = None
    host_ip: str | None = None      # the host's end of the veth
    container_ip: str | None = None
    host_if: str | None = None      # the veth's host side

    @classmethod
    def of(cls, replica: Replica) -> RuncRecord:
        e = replica.extra
        return cls(
            container_id=str(e["container_id"]), bundle=str(e["bundle"]),
            network_mode=str(e["network_mode"]), cgroup=str(e["cgroup"]),
            runc_root=e.get("runc_root"), args=tuple(str(a) for a in e.get("args", ())),
            shim_pid=e.get("shim_pid"), shim_start_time=e.get("shim_start_time"),
            host_ip=e.get("host_ip"), container_ip=e.get("guest_ip"), host_if=e.get("tap"))

    def to_extra(self) -> dict[str, Any]:
        return {"container_id": self.container_id, "bundle": self.bundle,
                "network_mode": self.network_mode, "cgroup": self.cgroup, "runc_root": self.runc_root,
                "args": list(self.args), "shim_pid": self.shim_pid,
                "shim_start_time": self.shim_start_time, "host_ip": self.host_ip,
                "guest_ip": self.container_ip, "tap": self.host_if}

    def on(self, replica: Replica) -> Replica:
        """``replica`` carrying this record."""
        return replica.with_(extra={**replica.extra, **self.to_extra()})


class RuncDriver(Driver):
    """Create, start, stop, inspect and remove container replicas with runc (root only)."""

    noun = "container replica"
    kind = "runc"
    log_file = LOG_FILE

    def __init__(self, root: Path | None = None, runc_root: Path = RUNC_ROOT) -> None:
        super().__init__(root)
        self.runc_root = runc_root

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
        source = _layout_source(config)
        replica_id, name, directory = self._allocate(config.name, Path(config.image.ref.split(":")[0]).name)
        try:
            bundle = bundle_from_layout(source, directory / BUNDLE, self._options(replica_id, name, config, mode))
            digest = config.image.digest or bundle.manifest_digest
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        image = replace(config.image, digest=digest)
        record = RuncRecord(
            container_id=f"uf-{replica_id}", bundle=str(bundle.dir), network_mode=mode,
            cgroup=cgroups.cgroups_path(replica_id), runc_root=str(self.runc_root),
            args=tuple(json.loads(bundle.config_path.read_text())["process"]["args"]))
        return self._record_new(replica_id, directory, replace(config, image=image, name=name),
                                record.to_extra())

    def _launch(self, replica: Replica) -> tuple[Replica, subprocess.Popen[bytes]]:
        """The shim, which runs ``runc run`` in the foreground; attached to its network first."""
        record = RuncRecord.of(replica)
        for stale in (EXIT_CODE, PID_FILE):
            (replica.dir / stale).unlink(missing_ok=True)
        attachment = None
        if record.network_mode != "host":
            attachment = network.attach(self.root.parent, replica, record.network_mode)
        argv = ["sh", "-c", SHIM, "uniframe-shim", _runc(), str(self._runc_root(record)),
                record.bundle, str(replica.dir / PID_FILE), record.container_id,
                str(replica.dir / EXIT_CODE)]
        self._runc_root(record).mkdir(parents=True, exist_ok=True)
        with (replica.dir / LOG_FILE).open("ab") as out:
            shim = subprocess.Popen(argv, cwd=replica.dir, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=out, start_new_session=True)
        try:
            shim_ref = ProcessRef.of(shim.pid)
        except ProcessLookupError:
            shim_ref = ProcessRef(shim.pid, -1)
        record = replace(record, shim_pid=shim_ref.pid, shim_start_time=shim_ref.start_time,
                         host_ip=attachment.host_ip if attachment else None,
                         container_ip=attachment.container_ip if attachment else None,
                         host_if=attachment.host_if if attachment else None)
        return record.on(replica.with_(argv=tuple(argv))), shim

    def _until_started(self, replica: Replica, proc: subprocess.Popen[bytes]) -> ProcessRef | None:
        """The container's init, once runc wrote its pid: the process the replica's life is."""
        pid = self._wait_started(replica, proc)
        try:
            container = ProcessRef.of(pid)
        except ProcessLookupError:
            container = ProcessRef(pid, -1)  # it ended already: how is read from the exit code
        # its published ports stay claimed while the container or its shim lives
        hostnet.bind(self.root.parent, replica.id, container, *self._processes(replica))
        return container

    def start(self, ref: str) -> Replica:
        """Run the container detached and return once its init process runs (limits checked)."""
        replica = super().start(ref)
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
                    f"runc could not start {replica.name}:\n{log_tail(replica.dir / LOG_FILE, 8)}\n"
                    f"(full log: {replica.dir / LOG_FILE})")
            time.sleep(0.02)
        raise RuntimeDriverError(f"runc did not start {replica.name} within {START_TIMEOUT_S:.0f} s; "
                                 f"see {replica.dir / LOG_FILE}")

    def _check_limits(self, replica: Replica) -> None:
        """Read the limits back from the cgroup: a limit runc silently skipped must not pass unseen."""
        try:
            limits = cgroups.read_limits(RuncRecord.of(replica).cgroup)
        except OSError:
            if self._alive(replica):
                raise RuntimeDriverError(f"replica {replica.name} runs but its cgroup "
                                         f"{RuncRecord.of(replica).cgroup} cannot be read") from None
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
            return cgroups.read_limits(RuncRecord.of(replica).cgroup)
        except OSError:
            raise RuntimeDriverError(f"replica {replica.name} is not running, so it has no cgroup") from None

    # -- state ---------------------------------------------------------------

    def _processes(self, replica: Replica) -> tuple[ProcessRef, ...]:
        """The container's init and the shim: the replica runs while either does."""
        record = RuncRecord.of(replica)
        refs = super()._processes(replica)
        if record.shim_pid is not None and record.shim_start_time is not None:
            shim = ProcessRef(record.shim_pid, record.shim_start_time)
            refs += () if shim in refs else (shim,)
        return refs

    def _how_it_ended(self, replica: Replica) -> ReplicaStatus:
        """The exit status runc reported (the shim wrote it), or crashed if there is none."""
        try:
            code = int((replica.dir / EXIT_CODE).read_text().strip())
        except (OSError, ValueError):
            return ReplicaStatus(ReplicaState.CRASHED, None, "runc went away without an exit status")
        if code > 128 and code - 128 < signal.NSIG:
            return ReplicaStatus(ReplicaState.EXITED, code, f"killed by {signal.Signals(code - 128).name}")
        return ReplicaStatus(ReplicaState.EXITED, code, f"exited with status {code}")

    # -- stopping and cleaning up ------------------------------------------

    def _runc_root(self, record: RuncRecord) -> Path:
        return Path(record.runc_root) if record.runc_root else self.runc_root

    def _runc_cmd(self, replica: Replica, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([_runc(), "--root", str(self._runc_root(RuncRecord.of(replica))), *args],
                              capture_output=True, text=True, stdin=subprocess.DEVNULL)

    def _ask_to_stop(self, replica: Replica, deadline: float) -> None:
        self._runc_cmd(replica, "kill", RuncRecord.of(replica).container_id, "TERM")

    def _force_stop(self, replica: Replica) -> str | None:
        self._runc_cmd(replica, "kill", RuncRecord.of(replica).container_id, "KILL")
        return "killed"

    def _release(self, replica: Replica) -> None:
        """The container's runc state and cgroup, and its network namespace, veth and port rules."""
        record = RuncRecord.of(replica)
        self._runc_cmd(replica, "delete", "--force", record.container_id)
        cgroups.remove(record.cgroup)
        with contextlib.suppress(OSError):
            self._runc_root(record).rmdir()  # only once empty
        network.detach(self.root.parent, replica.id)

    def leftovers(self, replica: Replica) -> builtins.list[str]:
        """What of ``replica`` still exists on the host: processes, cgroups, namespace, veth, files."""
        record = RuncRecord.of(replica)
        found = [f"process {p.pid}" for p in self._processes(replica) if p.alive()]
        found += [f"cgroup {d}" for d in cgroups.directories(record.cgroup)]
        found += network.leftovers(replica.id)
        if (self._runc_root(record) / record.container_id).exists():
            found.append(f"runc state {record.container_id}")
        if replica.dir.exists():
            found.append(f"directory {replica.dir}")
        return found
