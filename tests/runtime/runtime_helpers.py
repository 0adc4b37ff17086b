"""Helpers the runtime tests share (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from uniframe.build.store import finalize_manifest, load_image_dir
from uniframe.runtime.qemu.initramfs import init_initramfs
from uniframe.runtime.replica import ImageRef

GUEST_PORT = 8080
READY = b"UNIFRAME-TEST-READY"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def make_image(directory: Path, kernel: Path, init: bytes, cmdline: str) -> Path:
    """An image directory as the store keeps them: manifest, kernel, initrd."""
    directory.mkdir(parents=True)
    shutil.copyfile(kernel, directory / "kernel")
    (directory / "initrd").write_bytes(init_initramfs(init))
    finalize_manifest(directory, {
        "kind": "unikernel", "name": directory.name, "cmdline": cmdline,
        "files": {"kernel": {"path": "kernel"}, "initrd": {"path": "initrd"}},
    })
    return directory


def image_ref(directory: Path) -> ImageRef:
    image = load_image_dir(directory)
    return ImageRef(str(directory), image.digest, image.kernel, image.initrd, image.cmdline)


def wait_for(path: Path, marker: bytes, timeout: float = 90.0) -> float:
    """Seconds until ``marker`` appears in the file at ``path``; fails after ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if path.exists() and marker in path.read_bytes():
            return time.monotonic() - start
        time.sleep(0.05)
    text = path.read_text(errors="replace") if path.exists() else "(no file)"
    raise AssertionError(f"{marker!r} not in {path} after {timeout} s:\n{text[-3000:]}")


def uniframe(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """The real CLI in a fresh process (so state must come from disk)."""
    return subprocess.run([sys.executable, "-m", "uniframe.cli.main", *args], capture_output=True,
                          text=True, timeout=timeout, env=os.environ.copy())


def host_traces(replica_id: str) -> list[str]:
    """Everything on the host that still carries the replica's id: mounts, network links,
    network namespaces, cgroups (what a removed replica must not leave behind)."""
    short = replica_id[:10]
    found = []
    mounts = Path("/proc/self/mounts").read_text()
    found += [f"mount {line.split()[1]}" for line in mounts.splitlines() if short in line]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    found += [f"link {line.split(':')[1].strip()}" for line in links.splitlines() if short in line]
    netns = Path("/run/netns")
    if netns.is_dir():
        found += [f"netns {p.name}" for p in netns.iterdir() if short in p.name]
    found += [f"cgroup {cg}" for cg in Path("/sys/fs/cgroup").rglob(f"*{short}*")]
    return found
