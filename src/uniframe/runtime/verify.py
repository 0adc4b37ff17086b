"""Prove an image by booting it and answering a real inference.

A traced closure can miss a file that only the booted guest needs (a module
imported on the PID-1 path, a library dlopen'ed late); the only proof is to
boot the image and infer through it. The build command calls this right
after building, and the same function gives the benchmark its
"QEMU start to first inference" figure.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uniframe.build.images import image_model_name, image_port
from uniframe.build.store import Image
from uniframe.build.unikernel import ROOT_ROLE
from uniframe.errors import RuntimeDriverError
from uniframe.runtime.driver import Driver
from uniframe.runtime.ports import PortMapping
from uniframe.runtime.registry import driver_for_image_kind
from uniframe.runtime.replica import ImageRef, ReplicaConfig, ReplicaState


@dataclass(frozen=True)
class Proof:
    seconds_to_first_inference: float
    response: dict[str, Any]
    accel: str
    replica_id: str
    stop_state: str
    exit_status: int | None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _post(port: int, path: str, body: bytes, timeout: float) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def image_ref(image: Image) -> ImageRef:
    """What a driver needs to know of a stored image, whatever its kind."""
    ref = image.names[0] if image.names else image.short
    if image.kind in ("unikernel", "vm"):
        files = image.manifest.get("files", {})
        # a unikernel boots from an initramfs or from a read-only root disk
        return ImageRef(ref=ref, digest=image.digest, kernel=image.kernel,
                        initrd=image.initrd if "initrd" in files else Path(),
                        cmdline=image.cmdline, kind=image.kind, path=image.dir,
                        disk=image.file(ROOT_ROLE) if image.kind == "unikernel" and ROOT_ROLE in files
                        else None)
    return ImageRef(ref=ref if image.names or image.kind != "oci" else str(image.dir),
                    digest=image.digest,
                    kernel=Path(), initrd=Path(), kind=image.kind, path=image.dir)


def driver_for_image(image: Image, root: Path | None = None) -> Driver:
    """The preferred driver of the image's kind (see :mod:`uniframe.runtime.registry`)."""
    return driver_for_image_kind(image.kind, root, what=f"image {image.short}")


def boot_and_infer(
    image: Image,
    body: bytes,
    *,
    timeout: float = 120.0,
    driver: Driver | None = None,
    memory_mib: int | None = None,
    accel: str = "auto",
    keep: bool = False,
) -> Proof:
    """Boot ``image``, POST ``body`` to its model until it answers 200, then stop it.

    The clock starts when QEMU is launched. A guest that exits, or no answer
    within ``timeout``, raises :class:`RuntimeDriverError` with the console tail.
    """
    driver = driver or driver_for_image(image)
    model_name = image_model_name(image)
    guest_port = image_port(image)
    resources = image.manifest.get("resources", {})
    floor = 512 if image.kind == "vm" else 256  # a full Debian VM needs room for systemd
    mem = memory_mib or max(floor, int(resources.get("memory", 256 << 20)) >> 20)
    host_port = free_port()
    replica = driver.create(ReplicaConfig(
        image=image_ref(image), cpus=max(1, round(float(resources.get("cpus", 1)))),
        memory_mib=mem, ports=(PortMapping(host_port, guest_port),), accel=accel))
    path = f"/v2/models/{model_name}/infer"
    started = time.monotonic()
    try:
        replica = driver.start(replica.id)
        deadline = started + timeout
        while True:
            status = driver.inspect(replica.id)
            if status.state is not ReplicaState.RUNNING:
                raise RuntimeDriverError(
                    f"the guest stopped before answering ({status.state.value}, exit status "
                    f"{status.exit_status}); console:\n{_console_tail(driver, replica.id)}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                code, raw = _post(host_port, path, body, timeout=2.0)
                if code == 200:
                    elapsed = time.monotonic() - started
                    response = json.loads(raw)
                    break
                raise RuntimeDriverError(f"the booted image answered {code}: {raw[:300]!r}")
            if time.monotonic() > deadline:
                raise RuntimeDriverError(
                    f"no inference answer within {timeout:.0f} s of starting QEMU; console:\n"
                    f"{_console_tail(driver, replica.id)}")
            time.sleep(0.05)
        if keep:
            return Proof(elapsed, response, driver.accelerator(replica) or "?", replica.id, "running", None)
        final = driver.stop(replica.id, timeout=15)
        return Proof(elapsed, response, driver.accelerator(replica) or "?", replica.id, final.state.value,
                     final.exit_status)
    finally:
        if not keep:
            with contextlib.suppress(RuntimeDriverError):
                driver.stop(replica.id, timeout=5)
            with contextlib.suppress(RuntimeDriverError):
                driver.remove(replica.id, force=True)


def _console_tail(driver: Driver, replica_id: str, lines: int = 40) -> str:
    data = b"".join(driver.logs(replica_id, follow=False))
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])
