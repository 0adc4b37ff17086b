"""The kernel cache: one directory per set of inputs, filled atomically, built once.

A kernel takes minutes to build and depends only on the source version and the
config fragment, so it is built once per key into
``$UNIFRAME_CACHE/kernels/<key>/`` (default ``~/.cache/uniframe``). The build
runs in a scratch directory beside the cache and its output is renamed into
place as the last step: a directory named after a key is always complete,
whatever killed an earlier build. A per-key file lock makes a second process
that wants the same kernel wait for the first instead of building it again.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from uniframe.build.kernel import builder
from uniframe.build.kernel.artifact import DEFAULT_BOOT, Kernel
from uniframe.build.kernel.builder import BuildOutput, Progress
from uniframe.build.kernel.kconfig import parse_options
from uniframe.build.kernel.source import fragment_text, source_tarball, source_version
from uniframe.errors import BuildError

# Bump when the build recipe changes in a way that changes the kernel for the same inputs.
RECIPE = "uniframe-kernel/1: tinyconfig + merge_config.sh -m + olddefconfig, ARCH=x86_64"
METADATA = "kernel.json"

# (source tarball, fragment text, where, scratch dir, output dir, jobs, progress, log) -> output.
# A seam for unit tests of the cache; the real one compiles Linux.
Builder = Callable[..., BuildOutput]


def cache_root() -> Path:
    """``$UNIFRAME_CACHE/kernels`` (default ``~/.cache/uniframe/kernels``)."""
    base = os.environ.get("UNIFRAME_CACHE")
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "uniframe"
    return root / "kernels"


def kernel_key(source_version: str, fragment_text: str) -> str:
    """Key of a kernel: a hash of the recipe, the source version and the fragment's options.

    The fragment enters as its effective options (sorted, later lines winning),
    so editing its comments does not cost a rebuild but changing any option does.
    """
    options = parse_options(fragment_text)
    canonical = "\n".join(f"{k}={'' if v is None else v}" for k, v in sorted(options.items()))
    digest = hashlib.sha256(
        "\0".join((RECIPE, source_version, canonical)).encode()).hexdigest()
    return digest[:16]


def cached_kernel(*, fragment: Path | None = None) -> Kernel | None:
    """The cached kernel for these inputs, or None if it was never built."""
    text, _ = fragment_text(fragment)
    key = kernel_key(source_version(source_tarball()), text)
    return load(cache_root() / key)


def ensure_kernel(*, fragment: Path | None = None, jobs: int | None = None,
                  progress: Progress | None = None, force: bool = False,
                  _builder: Builder | None = None) -> Kernel:
    """Return the kernel for ``fragment`` (default: the microVM fragment), building it if needed.

    ``force`` rebuilds even when a cached kernel exists and replaces it.
    """
    report: Progress = progress or (lambda step, line: None)
    text, where = fragment_text(fragment)
    tarball = source_tarball()
    version = source_version(tarball)
    key = kernel_key(version, text)
    root = cache_root()
    entry = root / key
    if not force and (kernel := load(entry)) is not None:
        report("cached", f"kernel {key} is cached")
        return kernel
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f"{key}.lock", report, key):
        if not force and (kernel := load(entry)) is not None:
            report("cached", f"kernel {key} was built by another process")
            return kernel
        _remove_stale_scratch(root, key)
        return _build_into(entry, key=key, version=version, tarball=tarball, text=text,
                           where=where, jobs=jobs or os.cpu_count() or 1, report=report,
                           build=_builder or builder.build)


def _build_into(entry: Path, *, key: str, version: str, tarball: Path, text: str, where: str,
                jobs: int, report: Progress, build: Builder) -> Kernel:
    root = entry.parent
    work = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=root))
    log = root / f"{key}.build.log"
    log.write_text("")
    started = time.monotonic()
    try:
        out = work / "out"
        result = build(tarball, text, where, work, out, jobs=jobs, progress=report, log=log)
        seconds = round(time.monotonic() - started, 1)
        metadata = {
            "key": key, "source_version": version, "recipe": RECIPE,
            "vmlinux": result.vmlinux.name, "bzimage": result.bzimage.name,
            "config": result.config.name,
            "config_hash": hashlib.sha256(result.config.read_bytes()).hexdigest(),
            "options_enabled": result.options_enabled, "build_seconds": seconds,
            "jobs": jobs, "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (out / METADATA).write_text(json.dumps(metadata, indent=2) + "\n")
        report("install", f"installing into {entry}")
        _install(out, entry, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.unlink(missing_ok=True)
    kernel = load(entry)
    if kernel is None:
        raise BuildError(f"kernel {key} was installed into {entry} but cannot be read back")
    return kernel


def _install(out: Path, entry: Path, work: Path) -> None:
    """Rename the finished output into place; a forced rebuild moves the old one aside first."""
    if entry.exists():
        entry.rename(work / "replaced")
    out.rename(entry)


def load(entry: Path) -> Kernel | None:
    """Read a cache entry; None if it is absent or not a complete kernel."""
    try:
        meta: dict[str, Any] = json.loads((entry / METADATA).read_text())
        vmlinux, bzimage = entry / meta["vmlinux"], entry / meta["bzimage"]
        config = entry / meta["config"]
        path = vmlinux if DEFAULT_BOOT == "pvh" else bzimage
        return Kernel(
            path=path, boot=DEFAULT_BOOT, bzimage=bzimage, vmlinux=vmlinux,
            config_path=config, config_hash=str(meta["config_hash"]),
            source_version=str(meta["source_version"]), size_bytes=path.stat().st_size,
            options_enabled=int(meta["options_enabled"]),
            build_seconds=float(meta["build_seconds"]), key=str(meta["key"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


@contextmanager
def _locked(lock_path: Path, report: Progress, key: str) -> Iterator[None]:
    with lock_path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            report("wait", f"another process is building kernel {key}; waiting for it")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_stale_scratch(root: Path, key: str) -> None:
    """Scratch dirs of this key left by a killed build (we hold the key's lock)."""
    for stale in root.glob(f".build-{key}-*"):
        shutil.rmtree(stale, ignore_errors=True)
