"""The two inputs of a kernel build: the Linux source tarball and the config fragment.

Both are named here so the cache key is computed from exactly what the build
reads. The source is Debian's ``linux-source-6.1`` package (a tarball under
/usr/src); its package version identifies it without reading 138 MB.
``UNIFRAME_KERNEL_SOURCE`` points at another tarball of the same layout.
"""

from __future__ import annotations

import os
import subprocess
from importlib import resources
from pathlib import Path

from uniframe.errors import BuildError

DEBIAN_PACKAGE = "linux-source-6.1"
DEFAULT_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")


def source_tarball() -> Path:
    """The tarball to build from; a clear error if it is not installed."""
    override = os.environ.get("UNIFRAME_KERNEL_SOURCE")
    tarball = Path(override) if override else DEFAULT_TARBALL
    if not tarball.is_file():
        where = "UNIFRAME_KERNEL_SOURCE points at" if override else "expected"
        raise BuildError(
            f"the Linux source tarball is missing ({where} {tarball}): run "
            f"`apt-get install {DEBIAN_PACKAGE}` (scripts/install.sh does it)")
    return tarball


def source_version(tarball: Path) -> str:
    """Identify the source cheaply: Debian's package version, else the file's size and mtime."""
    if tarball == DEFAULT_TARBALL:
        try:
            proc = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", DEBIAN_PACKAGE],
                                  capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            proc = None
        if proc is not None and proc.returncode == 0 and proc.stdout.strip():
            return f"{DEBIAN_PACKAGE} {proc.stdout.strip()}"
    st = tarball.stat()
    return f"{tarball.name} size={st.st_size} mtime={int(st.st_mtime)}"


def default_fragment_text() -> str:
    """The fragment shipped with uniframe: what a Python inference microVM needs."""
    return (resources.files("uniframe.build") / "kernel_configs" / "microvm.config").read_text()


def fragment_text(fragment: Path | None) -> tuple[str, str]:
    """Return (text, where) for a user fragment, or the default one when None."""
    if fragment is None:
        return default_fragment_text(), "the default fragment (kernel_configs/microvm.config)"
    try:
        return Path(fragment).read_text(), str(fragment)
    except OSError as exc:
        raise BuildError(f"cannot read kernel config fragment {fragment}: {exc.strerror}") from None
