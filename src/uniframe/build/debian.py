"""The conventional container image: Debian plus pip, the way most teams ship a model.

uniframe's point is that an image should hold only what the app uses. To show
what that saves, this module builds the image a team would write a Dockerfile
for — ``debian:bookworm`` (minbase), ``python3``, a virtualenv, ``pip install
numpy onnxruntime orjson``, the server's code and the model — from the same
inputs, so the comparison is like for like (same Python 3.11, same wheels).

Root file systems come from ``debootstrap`` against the Debian mirror the host's
own apt uses, and are cached under ``<cache>/rootfs/<key>/`` keyed by suite,
variant and packages: a debootstrap takes minutes, a cache hit is free. Each
is built in a temporary directory and renamed into place, so an interrupted
build is never mistaken for a finished one. Commands that run inside the root
(``chroot``) run in their own mount and PID namespaces with a private
``/proc``, so whatever they mount disappears with them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import uniframe
from uniframe.build.oci import write_image_layout
from uniframe.errors import BuildError
from uniframe.paths import cache_dir

DEFAULT_MIRROR = "http://deb.debian.org/debian"
PYTHON_PACKAGES = ("python3", "python3-venv", "python3-pip")
APP_REQUIREMENTS = ("numpy", "onnxruntime", "orjson")
VENV = "/opt/venv"
INFO = "info.json"
CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _run(argv: Sequence[str], what: str, *, log: Path | None = None, timeout: float = 1800) -> None:
    """Run a build step; on failure the error shows the end of its output."""
    try:
        proc = subprocess.run(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=timeout)
    except FileNotFoundError:
        raise BuildError(f"{what}: {argv[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise BuildError(f"{what}: still running after {timeout:.0f} s; gave up") from None
    if log is not None:
        with log.open("ab") as fh:
            fh.write(proc.stdout)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.decode(errors="replace").strip().splitlines()[-15:])
        raise BuildError(f"{what} failed (exit {proc.returncode}):\n{tail}")


def host_mirror(suite: str = "bookworm", sources: Sequence[Path] | None = None) -> str:
    """The Debian mirror this host's apt fetches ``suite`` from (it is the one that is reachable)."""
    if sources is None:
        sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        with contextlib.suppress(OSError):
            text = path.read_text()
            if path.suffix == ".sources":
                for stanza in re.split(r"\n\s*\n", text):
                    fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.M))
                    if suite in fields.get("Suites", "").split() and "deb" in fields.get("Types", "").split():
                        return str(fields.get("URIs", "").split()[0])
            else:
                for line in text.splitlines():
                    parts = line.split("#", 1)[0].split()
                    if len(parts) >= 3 and parts[0] == "deb":
                        uri_at = 1  # past "[option=value ...]", which may span several words
                        if parts[1].startswith("["):
                            uri_at = 1 + next((i for i, p in enumerate(parts[1:]) if p.endswith("]")), 0) + 1
                        if len(parts) > uri_at + 1 and parts[uri_at + 1] == suite:
                            return parts[uri_at]
    return DEFAULT_MIRROR


def rootfs_key(suite: str, variant: str, include: Sequence[str]) -> str:
    """``<suite>-<variant>-<hash of the sorted packages>``: one cache entry per distinct input."""
    packages = sorted(set(include))
    digest = hashlib.sha256(json.dumps([suite, variant, packages]).encode()).hexdigest()[:16]
    return f"{suite}-{variant}-{digest}"


@contextlib.contextmanager
def _cache_lock(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".lock").open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _unmount_under(path: Path) -> None:
    """Detach any mount left below ``path`` (a failed debootstrap leaves /proc mounted)."""
    prefix = str(path.resolve())
    mounts = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                mounts.append(point)
    for point in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)


def _discard(path: Path) -> None:
    _unmount_under(path)
    shutil.rmtree(path, ignore_errors=True)


def _need_root(what: str) -> None:
    if os.geteuid() != 0:
        raise BuildError(f"{what} needs root (debootstrap and chroot); run it as root")


def debootstrap_rootfs(suite: str = "bookworm", variant: str = "minbase", include: Sequence[str] = (),
                       *, mirror: str | None = None, cache: bool = True) -> Path:
    """A Debian root file system with ``include`` installed, from the cache when it is there.

    Returns ``<cache>/rootfs/<key>/rootfs``; ``info.json`` beside it records
    the inputs and how long debootstrap took. ``cache=False`` rebuilds it.
    """
    _need_root("debootstrap")
    if shutil.which("debootstrap") is None:
        raise BuildError("debootstrap is not installed; install it with 'apt-get install debootstrap'")
    base = cache_dir() / "rootfs"
    key = rootfs_key(suite, variant, include)
    entry = base / key
    with _cache_lock(base):
        if cache and (entry / INFO).is_file() and (entry / "rootfs").is_dir():
            return entry / "rootfs"
        mirror = mirror or host_mirror(suite)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=base))
        try:
            debs = base / ".debs"
            debs.mkdir(exist_ok=True)
            argv = ["debootstrap", f"--variant={variant}", f"--cache-dir={debs}"]
            if include:
                argv.append("--include=" + ",".join(sorted(set(include))))
            argv += [suite, str(tmp / "rootfs"), mirror]
            started = time.monotonic()
            _run(argv, f"debootstrap {suite} ({variant}) from {mirror}", log=tmp / "debootstrap.log")
            seconds = time.monotonic() - started
            _unmount_under(tmp)
            _clean_apt(tmp / "rootfs")
            info = {"suite": suite, "variant": variant, "include": sorted(set(include)),
                    "mirror": mirror, "debootstrap_seconds": round(seconds, 1)}
            (tmp / INFO).write_text(json.dumps(info, indent=2) + "\n")
            if entry.exists():
                old = base / f".old-{key}-{os.getpid()}"
                entry.rename(old)
                _discard(old)
            tmp.rename(entry)
        except BaseException:
            _discard(tmp)
            raise
    return entry / "rootfs"


def rootfs_info(rootfs: Path) -> dict[str, object]:
    """What :func:`debootstrap_rootfs` recorded about the root at ``rootfs`` (empty if nothing)."""
    with contextlib.suppress(OSError, ValueError):
        data: dict[str, object] = json.loads((rootfs.parent / INFO).read_text())
        return data
    return {}


def _clean_apt(rootfs: Path) -> None:
    """Drop downloaded package files and lists, as every Dockerfile's last RUN line does."""
    for pattern in ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*_*"):
        for path in rootfs.glob(pattern):
            with contextlib.suppress(OSError):
                path.unlink()


def chroot_run(rootfs: Path, argv: Sequence[str], what: str, *, env: dict[str, str] | None = None,
               log: Path | None = None) -> None:
    """Run ``argv`` inside ``rootfs`` with a private /proc that vanishes with the command."""
    environment = {"PATH": CHROOT_PATH, "HOME": "/root", "LANG": "C.UTF-8", **(env or {})}
    _run(["unshare", "--mount", "--pid", "--fork", f"--mount-proc={rootfs / 'proc'}",
          "env", "-i", *(f"{k}={v}" for k, v in environment.items()),
          "chroot", str(rootfs), *argv], what, log=log)


def pinned_requirements(names: Sequence[str] = APP_REQUIREMENTS) -> list[str]:
    """``name==version`` as installed on this host, so both images run the very same wheels."""
    pins = []
    for name in names:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pins.append(name)
    return pins


def _server_sources() -> Path:
    """``src/uniframe``: the server needs its ``__init__`` and ``serve/``, nothing else of ours."""
    return Path(uniframe.__file__).parent


def _source_digest(package: Path) -> str:
    h = hashlib.sha256()
    for path in sorted([package / "__init__.py", *(package / "serve").rglob("*.py")]):
        h.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def _copy_server(package: Path, site_packages: Path) -> None:
    dest = site_packages / "uniframe"
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(package / "__init__.py", dest / "__init__.py")
    shutil.copytree(package / "serve", dest / "serve", ignore=shutil.ignore_patterns("__pycache__"))


def conventional_python_rootfs(requirements: Sequence[str] | None = None, *, suite: str = "bookworm",
                               cache: bool = True) -> Path:
    """Debian minbase + Python + a venv with the server's wheels and code, cached by its inputs."""
    _need_root("the conventional image")
    reqs = list(requirements) if requirements is not None else pinned_requirements()
    package = _server_sources()
    key = "conventional-" + hashlib.sha256(json.dumps(
        [rootfs_key(suite, "minbase", PYTHON_PACKAGES), sorted(reqs), _source_digest(package)]
    ).encode()).hexdigest()[:16]
    base_dir = cache_dir() / "rootfs"
    entry = base_dir / key
    base = debootstrap_rootfs(suite, "minbase", PYTHON_PACKAGES)
    with _cache_lock(base_dir):
        if cache and (entry / INFO).is_file():
            return entry / "rootfs"
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=base_dir))
        try:
            started = time.monotonic()
            rootfs = tmp / "rootfs"
            _run(["cp", "-a", str(base), str(rootfs)], "copying the Debian root")
            wheels = rootfs / "tmp" / "wheels"
            wheels.mkdir(parents=True)
            _run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:",
                  "--dest", str(wheels), *reqs], "downloading wheels on the host", log=tmp / "pip.log")
            log = tmp / "pip.log"
            chroot_run(rootfs, ["python3", "-m", "venv", VENV], "python3 -m venv in the root", log=log)
            chroot_run(rootfs, [f"{VENV}/bin/pip", "install", "--no-index", "--find-links", "/tmp/wheels",
                                "--disable-pip-version-check", "--no-cache-dir", *reqs],
                       "pip install in the root", log=log)
            shutil.rmtree(wheels)
            site = next((rootfs / VENV.lstrip("/") / "lib").glob("python3*/site-packages"))
            _copy_server(package, site)
            chroot_run(rootfs, [f"{VENV}/bin/python3", "-m", "compileall", "-q",
                                "/" + str(site.relative_to(rootfs) / "uniframe")], "compiling the server")
            info = {"base": str(base), "requirements": reqs, "seconds": round(time.monotonic() - started, 1)}
            (tmp / INFO).write_text(json.dumps(info, indent=2) + "\n")
            if entry.exists():
                _discard(entry)
            tmp.rename(entry)
        except BaseException:
            _discard(tmp)
            raise
    return entry / "rootfs"


def conventional_python_image(out: Path, model: Path, *, port: int = 8080,
                              requirements: Sequence[str] | None = None, suite: str = "bookworm") -> str:
    """The conventional image of the model server for ``model``, as an OCI layout at ``out``.

    Returns the manifest digest. The model goes to ``/model/<file name>`` and
    the image runs ``python3 -m uniframe.serve /model/<file name>`` from the venv.
    """
    if not model.is_file():
        raise BuildError(f"model file {model} does not exist")
    rootfs = conventional_python_rootfs(requirements, suite=suite)
    with tempfile.TemporaryDirectory(prefix=".conventional-", dir=out.parent if out.parent.exists() else None) as tmp:
        work = Path(tmp) / "rootfs"
        _run(["cp", "-a", "--reflink=auto", str(rootfs), str(work)], "copying the conventional root")
        (work / "model").mkdir(exist_ok=True)
        shutil.copyfile(model, work / "model" / model.name)
        return write_image_layout(
            work, out, entrypoint=[f"{VENV}/bin/python3", "-m", "uniframe.serve"],
            cmd=[f"/model/{model.name}", "--port", str(port)],
            env={"PATH": f"{VENV}/bin:{CHROOT_PATH}", "PYTHONUNBUFFERED": "1", "LANG": "C.UTF-8"},
            exposed_ports=[port], keep_owners=True, keep_mtimes=True,  # as docker build keeps them
            labels={"org.opencontainers.image.title": "uniframe conventional model server"},
        )


@dataclass(frozen=True)
class RootfsStats:
    """How big a root is and how much in it could run: the attack surface in four numbers."""

    size_bytes: int
    files: int
    executables: int
    setuid: int


def _runnable(path: str) -> bool:
    with contextlib.suppress(OSError), open(path, "rb") as fh:
        head = fh.read(4)
        return head == b"\x7fELF" or head[:2] == b"#!"
    return False


def rootfs_stats(root: Path) -> RootfsStats:
    """Bytes and regular files under ``root``, executables (x bit and ELF or ``#!``), setuid/setgid files."""
    size = files = executables = setuid = 0
    seen: set[tuple[int, int]] = set()
    for directory, _dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode):
                continue
            files += 1
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                size += st.st_size
            if st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                setuid += 1
            if st.st_mode & 0o111 and _runnable(path):
                executables += 1
    return RootfsStats(size, files, executables, setuid)
