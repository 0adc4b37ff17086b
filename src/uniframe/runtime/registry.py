"""The runtime registry: the one place that declares every driver and what it can do.

Each :class:`DriverEntry` says, for one driver: its kind (the word recorded
in every replica it owns, ``qemu-microvm``), the spec runtime names it
serves (``unikernel``), the image kinds it runs, its capabilities, where
its class lives, and how to tell whether this host can run it. Everything
that used to key a map on a runtime name (spec validation, the builder,
``uniframe run``, ``ps``, the reconciler, the daemon's logs) asks here, so
adding a driver is one new package plus one entry in :data:`ENTRIES`.

Why the parts are where they are:

- **Names vs drivers.** The spec's runtime names live in
  :mod:`uniframe.spec.runtimes` because the spec layer may import nothing
  of ours and must still validate ``spec.runtime``. This module checks on
  import that every name there has a driver and that no driver serves an
  unknown name, so the two lists cannot drift (and the tests say so).
- **Several drivers per name.** A runtime name maps to an ordered list of
  drivers; the first registered is the preferred one. A second microVM
  monitor can sit beside QEMU under ``unikernel`` without a new spec word,
  and replicas it made are still found by their recorded kind.
- **Lazy classes.** An entry names its class by import path and imports it
  only when a driver is wanted, so listing drivers (``uniframe runtimes``)
  stays cheap and a broken optional driver cannot break the others.
- **Capabilities are data here, not class attributes.** Callers ask the
  registry (:meth:`DriverEntry.require`) before doing something only some
  drivers can do, and get one clear error naming the drivers that can.
- **A seam.** :class:`Registry` can be built from other entries (a fake
  driver in tests); the reconciler takes one, defaulting to :data:`REGISTRY`.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from uniframe.errors import RuntimeDriverError
from uniframe.paths import state_dir
from uniframe.runtime.driver import REPLICA_FILE, Driver, ReplicaNotFoundError
from uniframe.runtime.replica import Replica
from uniframe.spec.runtimes import RUNTIME_NAMES, RUNTIMES, Runtime


class Capability(StrEnum):
    """Something only some drivers can do; the value is the word users see."""

    SNAPSHOT = "snapshot"                # save a running replica and restore it (QEMU migration)
    UNPRIVILEGED = "unprivileged"        # runs without root (in its default network mode)
    PORT_PUBLISHING = "port-publishing"  # published host ports (-p HOST:GUEST) reach the replica
    EXIT_STATUS = "exit-status"          # reports the workload's own exit status
    RESOURCE_LIMITS = "resource-limits"  # CPUs and memory enforced (a VM's size, cgroups)
    GRACEFUL_STOP = "graceful-stop"      # asks the workload to stop before forcing it
    LIVE_LOGS = "live-logs"              # logs can be followed while the replica runs
    CONSOLE = "console"                  # a serial console the host can type into
    BRIDGE_NETWORK = "bridge-network"    # its own address on a host bridge (root)
    HOST_NETWORK = "host-network"        # can share the host's network

    @property
    def meaning(self) -> str:
        return _MEANINGS[self]


_MEANINGS = {
    Capability.SNAPSHOT: "save a running replica and restore it",
    Capability.UNPRIVILEGED: "run without root",
    Capability.PORT_PUBLISHING: "publish host ports",
    Capability.EXIT_STATUS: "report the workload's exit status",
    Capability.RESOURCE_LIMITS: "enforce CPU and memory limits",
    Capability.GRACEFUL_STOP: "stop a replica gracefully",
    Capability.LIVE_LOGS: "follow logs while a replica runs",
    Capability.CONSOLE: "give a console to type into",
    Capability.BRIDGE_NETWORK: "put a replica on a host bridge",
    Capability.HOST_NETWORK: "share the host's network",
}

DriverFactory = Callable[[Path | None], Driver]
"""Makes a driver whose replicas live under the given root (None: the default state directory)."""


@dataclass(frozen=True)
class DriverEntry:
    """One driver as the rest of the code sees it."""

    kind: str
    runtimes: tuple[Runtime, ...]       # the spec runtime names it serves
    image_kinds: tuple[str, ...]        # the stored image kinds it runs
    capabilities: frozenset[Capability]
    factory: str | DriverFactory        # "module:Class" (imported when first used), or a callable
    probe: Callable[[], tuple[bool, str]] = field(default=lambda: (True, "always available"))
    summary: str = ""

    def can(self, capability: Capability) -> bool:
        return capability in self.capabilities

    def require(self, capability: Capability, doing: str, registry: Registry | None = None) -> None:
        """Refuse ``doing`` with a clear error unless this driver has ``capability``."""
        if self.can(capability):
            return
        # only drivers a spec can choose (the fake serves no runtime name)
        others = [e.kind for e in (registry or REGISTRY).entries()
                  if e.can(capability) and e.runtimes]
        raise RuntimeDriverError(
            f"{doing}: the {self.kind} driver cannot {capability.meaning} (it lacks the "
            f"'{capability.value}' capability); "
            + (f"drivers that can: {', '.join(others)}" if others else "no driver here can")
            + " (see 'uniframe runtimes')")

    def usable(self) -> tuple[bool, str]:
        """Whether this host can run the driver, and why (or why not); boots nothing."""
        try:
            return self.probe()
        except Exception as exc:  # a probe must never break a listing
            return False, f"the host check failed: {exc}"

    def create(self, root: Path | None = None) -> Driver:
        """A driver instance keeping its replicas under ``root``."""
        if not isinstance(self.factory, str):
            return self.factory(root)
        module, _, name = self.factory.partition(":")
        cls = getattr(importlib.import_module(module), name)
        driver: Driver = cls(root)
        return driver


# -- host probes ----------------------------------------------------------------------------

def _is_root() -> bool:
    return os.geteuid() == 0


def _qemu_usable() -> tuple[bool, str]:
    """QEMU installed, and the accelerator guests would get (as far as known without a boot)."""
    from uniframe.runtime.qemu.accel import known_choice
    from uniframe.runtime.qemu.binary import QemuMissingError, qemu_binary, qemu_version

    try:
        binary = qemu_binary()
        version = qemu_version(binary)
        choice = known_choice()
    except QemuMissingError as exc:
        return False, str(exc)
    accel = (f"accel {choice.name}: {choice.reason}" if choice is not None else
             "accel kvm or tcg: KVM is not probed yet (the first guest started probes it)")
    number = version.split("version", 1)[-1].split()[:1] or ["(version unknown)"]
    return True, f"QEMU {number[0]} at {binary}; {accel}"


def _runc_usable() -> tuple[bool, str]:
    runc = shutil.which("runc")
    if runc is None:
        return False, "runc is not installed; install it with 'apt-get install runc'"
    if not _is_root():
        return False, f"{runc} found, but the runc driver needs root (namespaces, cgroups)"
    return True, f"{runc}; running as root"


def _process_usable() -> tuple[bool, str]:
    return True, f"the host's Python {sys.version.split()[0]} ({sys.executable})"


# -- the entries ----------------------------------------------------------------------------

ENTRIES: tuple[DriverEntry, ...] = (
    DriverEntry(
        kind="qemu-microvm", runtimes=("unikernel",), image_kinds=("unikernel",),
        capabilities=frozenset({
            Capability.UNPRIVILEGED, Capability.PORT_PUBLISHING, Capability.EXIT_STATUS,
            Capability.RESOURCE_LIMITS, Capability.GRACEFUL_STOP, Capability.LIVE_LOGS,
            Capability.CONSOLE, Capability.BRIDGE_NETWORK, Capability.SNAPSHOT}),
        factory="uniframe.runtime.qemu.driver:QemuMicroVMDriver", probe=_qemu_usable,
        summary="QEMU -M microvm: a tailored kernel plus the server as PID 1"),
    DriverEntry(
        kind="qemu-vm", runtimes=("vm",), image_kinds=("vm",),
        # A PC has no exit status: a powered-off guest is "exited", not "exited with N".
        capabilities=frozenset({
            Capability.UNPRIVILEGED, Capability.PORT_PUBLISHING, Capability.RESOURCE_LIMITS,
            Capability.GRACEFUL_STOP, Capability.LIVE_LOGS, Capability.SNAPSHOT}),
        factory="uniframe.runtime.qemu.vm.driver:QemuVMDriver", probe=_qemu_usable,
        summary="QEMU -M q35: full VMs from our disks or users' own"),
    DriverEntry(
        kind="runc", runtimes=("container",), image_kinds=("oci",),
        capabilities=frozenset({
            Capability.PORT_PUBLISHING, Capability.EXIT_STATUS, Capability.RESOURCE_LIMITS,
            Capability.GRACEFUL_STOP, Capability.LIVE_LOGS, Capability.HOST_NETWORK}),
        factory="uniframe.runtime.runc.driver:RuncDriver", probe=_runc_usable,
        summary="runc: OCI containers in their own namespaces and cgroup"),
    DriverEntry(
        kind="process", runtimes=("process",), image_kinds=("process",),
        # -p HOST:GUEST makes the server listen on HOST (one port); nothing bounds its resources.
        capabilities=frozenset({
            Capability.UNPRIVILEGED, Capability.PORT_PUBLISHING, Capability.EXIT_STATUS,
            Capability.GRACEFUL_STOP, Capability.LIVE_LOGS, Capability.HOST_NETWORK}),
        factory="uniframe.runtime.local:ProcessDriver", probe=_process_usable,
        summary="a host process: the server from this host's Python (the baseline)"),
    DriverEntry(
        # Serves no spec runtime, so nothing picks it by itself: tests hand the reconciler a
        # Registry in which it serves one (see docs/drivers.md). Listed here so replicas it
        # recorded are found like any other's, and as the worked example of adding a driver.
        kind="fake", runtimes=(), image_kinds=(),
        capabilities=frozenset({
            Capability.UNPRIVILEGED, Capability.PORT_PUBLISHING, Capability.EXIT_STATUS,
            Capability.GRACEFUL_STOP, Capability.LIVE_LOGS, Capability.SNAPSHOT,
            Capability.HOST_NETWORK}),
        factory="uniframe.runtime.fake:FakeDriver",
        probe=lambda: (True, "in memory: replicas simulated in the process that runs it"),
        summary="replicas simulated in this process, for tests of the control plane"),
)


class Registry:
    """Drivers by kind, by runtime name (preferred first) and by image kind.

    ``complete`` (the real registry) also demands a driver for every runtime
    name the spec accepts; a test registry may serve only some.
    """

    def __init__(self, entries: Iterable[DriverEntry], *, complete: bool = False) -> None:
        self._entries = tuple(entries)
        problems = check_entries(self._entries, complete=complete)
        if problems:
            raise RuntimeDriverError("the runtime registry is inconsistent: " + "; ".join(problems))

    def entries(self) -> tuple[DriverEntry, ...]:
        return self._entries

    def kinds(self) -> tuple[str, ...]:
        return tuple(e.kind for e in self._entries)

    def entry(self, kind: str) -> DriverEntry:
        """The entry of driver ``kind``; an unknown kind names the known ones."""
        for e in self._entries:
            if e.kind == kind:
                return e
        raise RuntimeDriverError(f"unknown driver {kind!r}; drivers: {', '.join(self.kinds())}")

    def serving(self, runtime: str) -> tuple[DriverEntry, ...]:
        """The drivers that serve runtime name ``runtime``, the preferred one first."""
        return tuple(e for e in self._entries if runtime in e.runtimes)

    def entry_for_runtime(self, runtime: str) -> DriverEntry:
        """The preferred driver of a spec runtime name; an unknown name lists the known ones."""
        found = self.serving(runtime)
        if not found:
            names = sorted({r for e in self._entries for r in e.runtimes})
            raise RuntimeDriverError(f"unknown runtime {runtime!r}; use one of {', '.join(names)}",
                                     permanent=True)  # only a changed spec names another
        return found[0]

    def entry_for_image_kind(self, image_kind: str, what: str = "an image") -> DriverEntry:
        """The preferred driver that runs images of ``image_kind``."""
        for e in self._entries:
            if image_kind in e.image_kinds:
                return e
        kinds = sorted({k for e in self._entries for k in e.image_kinds})
        raise RuntimeDriverError(f"{what} is of kind {image_kind!r}, which no driver runs; "
                                 f"drivers run {', '.join(kinds)} images", permanent=True)

    def driver_for(self, kind: str, root: Path | None = None) -> Driver:
        """The driver of ``kind`` keeping its replicas under ``root`` (default: the state dir)."""
        return self.entry(kind).create(root)

    def driver_for_runtime(self, runtime: str, root: Path | None = None) -> Driver:
        return self.entry_for_runtime(runtime).create(root)

    def driver_for_image_kind(self, image_kind: str, root: Path | None = None,
                              what: str = "an image") -> Driver:
        return self.entry_for_image_kind(image_kind, what).create(root)

    def all_replicas(self, root: Path | None = None) -> list[Replica]:
        """Every replica of every registered driver, oldest first."""
        out: list[Replica] = []
        for e in self._entries:
            out += e.create(root).list()
        return sorted(out, key=lambda r: (r.created_at, r.id))

    def find(self, ref: str, root: Path | None = None) -> tuple[Driver, Replica]:
        """The replica called ``ref`` (id, unique id prefix or name) and the driver that owns it.

        Reads only the ``driver`` field of each record, so a replica is found
        whichever driver made it, and only that driver is imported.
        """
        base = root or state_dir() / "replicas"
        kinds: dict[str, str] = {}
        if base.is_dir():
            for d in base.iterdir():
                try:
                    data = json.loads((d / REPLICA_FILE).read_text())
                except (OSError, ValueError):
                    continue
                kinds[str(data.get("id"))] = str(data.get("driver"))
                kinds.setdefault(str(data.get("name")), str(data.get("driver")))
        kind = kinds.get(ref)
        if kind is None:
            prefixed = {k for i, k in kinds.items() if ref and i.startswith(ref)}
            kind = prefixed.pop() if len(prefixed) == 1 else None
        if kind is None:
            known = ", ".join(sorted(kinds)) or "none"
            raise ReplicaNotFoundError(f"no replica {ref!r} (replicas: {known}); see 'uniframe ps -a'")
        driver = self.driver_for(kind, root)
        return driver, driver.get(ref)


def check_entries(entries: Iterable[DriverEntry], *, complete: bool) -> list[str]:
    """What is wrong between ``entries`` and the spec's runtime names (empty: nothing)."""
    entries = tuple(entries)
    problems: list[str] = []
    kinds = [e.kind for e in entries]
    problems += [f"driver {k!r} is registered twice" for k in sorted({k for k in kinds
                                                                      if kinds.count(k) > 1})]
    for e in entries:
        unknown = [r for r in e.runtimes if r not in RUNTIMES]
        if unknown:
            problems.append(f"driver {e.kind!r} serves {', '.join(unknown)}, which the spec does "
                            f"not accept (add them to uniframe.spec.runtimes)")
    if complete:
        for name in RUNTIME_NAMES:
            serving = [e for e in entries if name in e.runtimes]
            if not serving:
                problems.append(f"runtime {name!r} has no driver (add a DriverEntry)")
            elif RUNTIMES[name].image_kind not in serving[0].image_kinds:
                problems.append(f"runtime {name!r} builds {RUNTIMES[name].image_kind!r} images, "
                                f"which its driver {serving[0].kind!r} does not run")
    return problems


REGISTRY = Registry(ENTRIES, complete=True)
"""The real drivers; checked against the spec's runtime names when this module is imported."""


# -- the registry's answers as plain functions, for callers that need no other registry -----

def entry(kind: str) -> DriverEntry:
    return REGISTRY.entry(kind)


def entry_for_runtime(runtime: str) -> DriverEntry:
    return REGISTRY.entry_for_runtime(runtime)


def driver_for(kind: str, root: Path | None = None) -> Driver:
    """The driver of ``kind`` (``qemu-microvm``, ``qemu-vm``, ``runc``, ``process``)."""
    return REGISTRY.driver_for(kind, root)


def driver_for_runtime(runtime: str, root: Path | None = None) -> Driver:
    """The preferred driver of spec runtime name ``runtime``."""
    return REGISTRY.driver_for_runtime(runtime, root)


def driver_for_image_kind(image_kind: str, root: Path | None = None,
                          what: str = "an image") -> Driver:
    return REGISTRY.driver_for_image_kind(image_kind, root, what)


def all_replicas(root: Path | None = None) -> list[Replica]:
    return REGISTRY.all_replicas(root)


def find(ref: str, root: Path | None = None) -> tuple[Driver, Replica]:
    return REGISTRY.find(ref, root)
