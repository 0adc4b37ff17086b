"""``uniframe run | ps | stop | rm``: images as local replicas, without the daemon.

The commands are thin: each finds every replica from its directory on disk,
so ``run -d`` in one shell and ``ps``/``stop`` in another see the same
replicas (``uniframe logs`` reads them too when the daemon does not know
them). ``run`` without ``-d`` is foreground: it streams the guest console
until the guest exits and turns Ctrl-C (or SIGTERM) into a graceful stop, and
it exits with the guest's own exit status.
"""

from __future__ import annotations

import signal
import sys
from datetime import UTC, datetime
from pathlib import Path

import typer

from uniframe.build.images import image_name
from uniframe.build.store import ImageStore
from uniframe.cli.app import app, console, err_console, fail
from uniframe.cli.output import OUTPUT_OPTION, check_output, print_data
from uniframe.runtime.driver import Driver
from uniframe.runtime.ports import PortMapping, parse_port_mapping
from uniframe.runtime.registry import Capability, all_replicas, driver_for, entry, find
from uniframe.runtime.replica import ImageRef, Replica, ReplicaConfig, ReplicaState, ReplicaStatus
from uniframe.runtime.verify import driver_for_image, free_port, image_ref
from uniframe.spec.units import parse_size


def _image(ref: str) -> tuple[ImageRef, Driver]:
    """The seam between the image store and the runtimes: an image and the driver that runs it."""
    image = ImageStore().resolve(ref)
    driver = driver_for_image(image)
    ok, reason = entry(driver.kind).usable()
    if not ok:
        raise fail(f"image {image.short} runs on the {driver.kind} driver, which cannot run on "
                   f"this host: {reason}")
    return image_ref(image), driver


def _check_capabilities(driver: Driver, *, publish: bool, net: str, limits: bool,
                        foreground: bool) -> None:
    """Refuse, before anything is created, what the image's driver cannot do (registry's word)."""
    found = entry(driver.kind)
    if publish:
        found.require(Capability.PORT_PUBLISHING, "-p/--publish")
    if net == "bridge":
        found.require(Capability.BRIDGE_NETWORK, "--net bridge")
    if net == "host":
        found.require(Capability.HOST_NETWORK, "--net host")
    if limits:
        found.require(Capability.RESOURCE_LIMITS, "--cpus/--memory")
    if foreground and not found.can(Capability.LIVE_LOGS):
        raise fail(f"the {driver.kind} driver cannot follow a replica's output, so 'run' cannot "
                   "stay in the foreground; use -d, then 'uniframe logs'")


def _memory_mib(text: str) -> int:
    try:
        size = parse_size(text)
    except ValueError as exc:
        raise fail(f"--memory: {exc}") from None
    if size % (1 << 20):
        raise fail(f"--memory {text}: give a whole number of MiB, e.g. 256Mi")
    return size >> 20


def _stream(driver: Driver, replica: Replica, offset: int) -> int:
    """Copy the console to stdout from ``offset`` until the guest stops; return the new offset."""
    out = sys.stdout.buffer
    for chunk in driver.logs(replica.id, follow=True, offset=offset):
        out.write(chunk)
        out.flush()
        offset += len(chunk)
    return offset


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _exit_code(status: ReplicaStatus) -> int:
    if status.state is ReplicaState.EXITED and status.exit_status is not None:
        return status.exit_status
    return 1


@app.command()
def run(
    image: str = typer.Argument(None, help="image: name[:tag], digest prefix, or image directory"),
    file: Path = typer.Option(None, "-f", "--file",
                              help="run the Workloads (and built InferenceServices) of a spec file, detached"),
    publish: list[str] = typer.Option([], "-p", "--publish", help="publish a port, HOST:GUEST or IP:HOST:GUEST"),
    name: str = typer.Option(None, "--name", help="replica name (default: image name + id)"),
    cpus: int = typer.Option(None, "--cpus", help="virtual CPUs (default 1)"),
    memory: str = typer.Option(None, "--memory", help="guest memory, e.g. 256Mi (the default)"),
    accel: str = typer.Option("auto", "--accel", help="auto (probe KVM, else TCG), kvm or tcg"),
    net: str = typer.Option("user", "--net",
                            help="user (QEMU user-mode, no root), bridge (root) or, for "
                                 "drivers that can share it, host"),
    detach: bool = typer.Option(False, "-d", "--detach", help="start and return; see 'uniframe logs'"),
    remove: bool = typer.Option(False, "--rm", help="remove the replica once it exits (foreground only)"),
    stop_timeout: float = typer.Option(10.0, "--stop-timeout", help="seconds a Ctrl-C stop waits for the guest"),
) -> None:
    """Run an image: unikernel as a microVM, vm as a full VM, oci as a container, process as a
    host process (foreground unless -d; Ctrl-C or SIGTERM stops it)."""
    if file is not None:
        if image is not None:
            raise fail("give an IMAGE or -f SPEC, not both")
        _run_file(file)
        return
    if image is None:
        raise fail("give an IMAGE to run (see 'uniframe images') or -f SPEC")
    ports = tuple(parse_port_mapping(p) for p in publish)
    memory_mib = _memory_mib(memory if memory is not None else "256Mi")
    ref, driver = _image(image)
    _check_capabilities(driver, publish=bool(ports), net=net,
                        limits=cpus is not None or memory is not None, foreground=not detach)
    config = ReplicaConfig(
        image=ref, name=name, cpus=cpus if cpus is not None else 1, memory_mib=memory_mib,
        ports=ports, accel=accel, network=net,
    )
    replica = driver.create(config)
    try:
        replica = driver.start(replica.id)
    except BaseException:
        driver.remove(replica.id, force=True)
        raise
    if detach:
        console.print(replica.id)
        return
    err_console.print(f"[dim]replica {replica.id} ({replica.name}, {driver.kind}"
                      f"{', accel ' + accel if (accel := driver.accelerator(replica)) else ''}); "
                      "Ctrl-C stops it[/]")
    offset = replica.log_offset
    signal.signal(signal.SIGTERM, _terminate)  # a supervisor's SIGTERM stops it like Ctrl-C
    # Python raises KeyboardInterrupt only if SIGINT was not ignored when it started, and a
    # shell without job control starts background commands with SIGINT ignored: say it here,
    # so "Ctrl-C stops it" holds however the CLI was launched.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        offset = _stream(driver, replica, offset)
    except KeyboardInterrupt:
        if not entry(driver.kind).can(Capability.GRACEFUL_STOP):
            stop_timeout = 0  # nothing to ask the workload: waiting would only delay the kill
        err_console.print(f"[dim]stopping {replica.name} (up to {stop_timeout:g} s)...[/]")
        try:
            driver.stop(replica.id, timeout=stop_timeout)
        except KeyboardInterrupt:
            driver.stop(replica.id, timeout=0)
        _stream(driver, replica, offset)
    status = driver.wait(replica.id)
    if status.state is not ReplicaState.EXITED:
        err_console.print(f"replica {replica.name} {status.state.value}: {status.detail}")
    if remove:
        driver.remove(replica.id, force=True)
    raise typer.Exit(_exit_code(status))


def _run_file(path: Path) -> None:
    """Start every document of a spec file, detached, and say where each replica listens."""
    from uniframe.runtime.workload import run_workload
    from uniframe.spec import InferenceService, Workload, load_file

    started: list[tuple[Driver, Replica]] = []
    for doc in load_file(path):
        if isinstance(doc.spec, Workload):
            started += run_workload(doc.spec)
        elif isinstance(doc.spec, InferenceService):
            svc = doc.spec
            ref, driver = _image(image_name(svc.metadata.name, svc.spec.runtime))
            count = svc.spec.replicas if svc.spec.replicas is not None else 1
            for _ in range(count):
                config = ReplicaConfig(image=ref, cpus=max(1, round(svc.spec.resources.cpus)),
                                       memory_mib=max(64, svc.spec.resources.memory >> 20),
                                       ports=(PortMapping(free_port(), svc.spec.port),))
                replica = driver.create(config)
                started.append((driver, driver.start(replica.id)))
    for driver, replica in started:
        ports = ", ".join(f"http://{p.host_ip}:{p.host_port} -> {p.guest_port}"
                          for p in replica.config.ports) or "no published ports"
        console.print(f"{replica.id} {replica.name} ({driver.kind}): {ports}")


def _state_text(status: ReplicaStatus) -> str:
    if status.state is ReplicaState.EXITED:
        return f"exited ({status.exit_status})"
    return status.state.value


def _uptime(replica: Replica, status: ReplicaStatus) -> str:
    if status.state is not ReplicaState.RUNNING or not replica.started_at:
        return "-"
    seconds = int((datetime.now(UTC) - datetime.fromisoformat(replica.started_at)).total_seconds())
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


@app.command()
def ps(
    all_: bool = typer.Option(False, "-a", "--all", help="also show replicas that are not running"),
    output: str = OUTPUT_OPTION,
) -> None:
    """List replicas (running ones unless -a)."""
    check_output(output)
    rows = [(r, driver_for(r.driver).inspect(r.id)) for r in all_replicas()]
    if not all_:
        rows = [(r, s) for r, s in rows if s.state is ReplicaState.RUNNING]
    if output != "table":
        print_data([{**r.to_json(), "accel": _accel(r), "dir": str(r.dir), "status": s.to_json()}
                    for r, s in rows], output)
        return
    header = ("ID", "NAME", "RUNTIME", "IMAGE", "STATE", "PORTS", "UPTIME", "ACCEL")
    lines = [header] + [
        (r.id, r.name, r.driver, _image_label(r), _state_text(s),
         ",".join(str(p) for p in r.config.ports) or "-", _uptime(r, s), _accel(r) or "-")
        for r, s in rows
    ]
    # Plain columns, never truncated: ps output is read by scripts as often as by people.
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print("   ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())


def _accel(replica: Replica) -> str | None:
    return driver_for(replica.driver).accelerator(replica)


def _image_label(replica: Replica) -> str:
    ref = replica.config.image.ref
    return Path(ref).name if "/" in ref else ref


@app.command()
def stop(
    replicas: list[str] = typer.Argument(..., help="replica ids or names"),
    timeout: float = typer.Option(10.0, "--timeout", "-t", help="seconds to wait for a graceful shutdown"),
) -> None:
    """Stop replicas gracefully (guest shutdown request or SIGTERM), then force them."""
    for ref in replicas:
        driver, replica = find(ref)
        status = driver.stop(replica.id, timeout=timeout)
        detail = f" ({status.detail})" if status.state is ReplicaState.CRASHED else ""
        console.print(f"{replica.id} {replica.name}: {_state_text(status)}{detail}")


@app.command()
def rm(
    replicas: list[str] = typer.Argument(..., help="replica ids or names"),
    force: bool = typer.Option(False, "-f", "--force", help="kill running replicas first"),
) -> None:
    """Remove replicas and their logs."""
    for ref in replicas:
        driver, found = find(ref)
        replica = driver.remove(found.id, force=force)
        console.print(f"{replica.id} {replica.name}: removed")


