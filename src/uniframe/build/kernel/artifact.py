"""What a kernel is to the rest of uniframe: a file for QEMU's ``-kernel`` and its facts.

Built kernels and kernels users bring share one type, so runtime drivers never
ask where a kernel came from. :data:`DEFAULT_BOOT` picks which of a built
kernel's two files ``path`` points at; it was chosen by measurement (see
``bench/kernel_bench.py``): under TCG, QEMU loads the uncompressed PVH
``vmlinux`` and jumps to it faster than the bzImage decompresses itself.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from uniframe.build.kernel.bootformat import BootProtocol, boot_protocol
from uniframe.errors import BuildError

DEFAULT_BOOT: BootProtocol = "pvh"


@dataclass(frozen=True)
class Kernel:
    """A bootable kernel; fields a user-supplied kernel cannot know are None."""

    path: Path                    # what QEMU boots (-kernel)
    boot: BootProtocol            # how QEMU boots ``path``
    bzimage: Path | None          # the compressed Linux boot protocol image
    vmlinux: Path | None          # the uncompressed ELF with the PVH entry note
    config_path: Path | None      # the final .config
    config_hash: str | None       # sha256 of the final .config
    source_version: str           # e.g. "linux-source-6.1 6.1.192-2", or "user"
    size_bytes: int               # size of ``path``
    options_enabled: int | None   # number of =y lines in the final .config
    build_seconds: float | None
    key: str                      # cache key (inputs), or "user-<sha256 prefix>"

    def describe(self) -> dict[str, Any]:
        """A JSON-ready view, paths as strings, plus the other file's size."""
        view = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}
        view["bzimage_bytes"] = _size(self.bzimage)
        view["vmlinux_bytes"] = _size(self.vmlinux)
        return view


def _size(path: Path | None) -> int | None:
    return path.stat().st_size if path is not None and path.exists() else None


def user_kernel(path: Path) -> Kernel:
    """Wrap a kernel the user built: check QEMU can boot it, and say how."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise BuildError(f"kernel {path} does not exist (or is not a file): pass a bzImage or a "
                         "PVH vmlinux, or build one with `uniframe kernel build`")
    protocol = boot_protocol(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return Kernel(
        path=path, boot=protocol,
        bzimage=path if protocol == "bzimage" else None,
        vmlinux=path if protocol == "pvh" else None,
        config_path=None, config_hash=None, source_version="user",
        size_bytes=path.stat().st_size, options_enabled=None, build_seconds=None,
        key=f"user-{digest[:16]}")
