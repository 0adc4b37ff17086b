"""Traditional VM images: a Debian disk with the model server as a systemd service.

This is the conventional baseline the unikernels are measured against, and the
image the ``vm`` runtime boots: Debian bookworm from ``debootstrap`` (minbase
plus systemd, udev, dbus, python3 and Debian's cloud kernel), the three wheels
the server imports, ``uniframe.serve`` and the model, started by
``uniframe-serve.service``. Nothing is trimmed beyond choosing few packages, so
the figures in the manifest (files, executables, setuid files, packages) are
those of an ordinary small Debian VM.

Two steps, because they differ a thousandfold in cost:

- the *base* (debootstrap, kernel, initramfs) takes minutes and depends only on
  the suite, mirror and package list, so it is built once per key into
  ``<cache>/rootfs/vm-<key>/`` and renamed into place when complete;
- the *disk* copies the base, adds the app and packs the tree into an ext4
  file system with ``mke2fs -d`` (no mount, no loop device), in seconds. With
  a fixed UUID, hash seed and ``E2FSPROGS_FAKE_TIME`` two builds of the same
  inputs give the same bytes, so the image digest is stable.

The kernel and initramfs come out of the base's ``/boot``: installing
``linux-image-cloud-amd64`` inside the debootstrap tree is what makes
initramfs-tools build an initramfs that matches the kernel's modules. The
initramfs lists only the modules a QEMU VM needs to mount its root, which keeps
it small (it is decompressed by an emulated CPU under TCG).

Two disk layouts: ``partitionless`` (the file system is the whole disk, booted
with QEMU ``-kernel``: the fastest), and ``bootable`` (an MBR with a FAT boot
partition holding syslinux, kernel and initramfs, plus the ext4 root), which
any BIOS boots, so the same app runs as a user-supplied disk too.

The disk is stored as uncompressed qcow2. Measured on the 2-core TCG host with
the iris app: raw and qcow2 boot alike (28-33 s to the first inference either
way, since every replica boots a qcow2 overlay anyway); the qcow2 file is 490 MB
where the raw one is 1.07 GB (506 MB allocated, but only while copied sparsely);
zlib-compressed qcow2 is 173 MB but boots 3-4 s slower.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import stat
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from uniframe.build.store import BUILD_INFO, Image, ImageStore, finalize_manifest
from uniframe.errors import BuildError
from uniframe.paths import cache_dir

log = logging.getLogger("uniframe.build.vmdisk")

# Bump when the base recipe changes in a way that changes the tree for the same inputs.
BASE_RECIPE = "uniframe-vm-base/1"
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = (
    "systemd", "systemd-sysv", "udev",  # init, and the device events its units wait for
    "dbus",                             # logind needs it, and logind turns ACPI power-button into poweroff
    "python3",
    "linux-image-cloud-amd64", "initramfs-tools", "zstd",
)
# Only what a QEMU VM needs before its root is mounted; udev loads the rest after.
INITRAMFS_MODULES = ("virtio_pci", "virtio_blk", "ext4")
PYTHON_REQUIREMENTS = ("numpy", "onnxruntime", "orjson")
GUEST_PYTHON = "3.11"
GUEST_SITE = f"usr/local/lib/python{GUEST_PYTHON}/dist-packages"
ROOT_LABEL = "uniframe-root"
SERVICE = "uniframe-serve.service"
DISK_RECIPE = "uniframe-vm-disk/1"
# The fixed time every inode of the disk gets (2024-01-01), so builds repeat byte for byte.
FAKE_TIME = 1704067200
BOOT_PARTITION_MIB = 64


@dataclass(frozen=True)
class VMApp:
    """The app a VM disk serves: one ONNX model behind ``uniframe.serve`` on ``port``."""

    name: str
    model: Path
    port: int = 8080
    args: tuple[str, ...] = ()  # the server's arguments after the model path; () = name and port
    env: tuple[tuple[str, str], ...] = ()

    @property
    def model_file(self) -> str:
        return f"{self.name}.onnx"

    @property
    def server_args(self) -> tuple[str, ...]:
        return self.args or ("--name", self.name, "--port", str(self.port))


@dataclass(frozen=True)
class BaseSpec:
    """The inputs of a debootstrap base; its key is a hash of all of them."""

    packages: tuple[str, ...] = BASE_PACKAGES
    suite: str = SUITE
    mirror: str = field(default_factory=lambda: os.environ.get("UNIFRAME_DEBIAN_MIRROR", DEFAULT_MIRROR))
    initramfs_modules: tuple[str, ...] = INITRAMFS_MODULES
    extra_packages: tuple[str, ...] = ()   # installed by apt after debootstrap

    def with_packages(self, *extra: str) -> BaseSpec:
        return replace(self, extra_packages=tuple(dict.fromkeys(self.extra_packages + extra)))

    def all_packages(self) -> list[str]:
        return sorted({*self.packages, *self.extra_packages})

    def inputs(self) -> dict[str, Any]:
        return {"recipe": BASE_RECIPE, "suite": self.suite, "mirror": self.mirror,
                "packages": sorted(self.packages), "initramfs_modules": list(self.initramfs_modules),
                "debootstrap": _debootstrap_version(),
                **({"extra_packages": sorted(self.extra_packages)} if self.extra_packages else {})}

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.inputs(), sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Base:
    """A complete debootstrap tree in the cache, with the kernel it boots."""

    dir: Path
    key: str
    inputs: dict[str, Any]

    @property
    def rootfs(self) -> Path:
        return self.dir / "rootfs"

    @property
    def kernel(self) -> Path:
        return _one(self.rootfs / "boot", "vmlinuz-*")

    @property
    def initrd(self) -> Path:
        return _one(self.rootfs / "boot", "initrd.img-*")


def _one(directory: Path, pattern: str) -> Path:
    hits = sorted(directory.glob(pattern))
    if len(hits) != 1:
        raise BuildError(f"{directory}: expected one {pattern}, found {len(hits)}; "
                         f"delete {directory.parent.parent} to rebuild the VM base")
    return hits[0]


def _debootstrap_version() -> str:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "debootstrap"],
                             capture_output=True, text=True, check=False)
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown"


def _require(tool: str, package: str) -> str:
    found = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")
    if found is None:
        raise BuildError(f"building a VM disk needs {tool}; install it with "
                         f"'apt-get install {package}' (or run scripts/install.sh)")
    return found


def _run(argv: Sequence[str | Path], what: str, *, env: dict[str, str] | None = None,
         log_file: Path | None = None) -> str:
    """Run a build step; on failure the error names the step and shows the end of its output."""
    args = [str(a) for a in argv]
    log.debug("+ %s", " ".join(args))
    proc = subprocess.run(args, capture_output=True, text=True, env=env, check=False,
                          stdin=subprocess.DEVNULL)
    if log_file is not None:
        with log_file.open("a") as fh:
            fh.write(f"+ {' '.join(args)}\n{proc.stdout}{proc.stderr}")
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        where = f" (full log: {log_file})" if log_file else ""
        raise BuildError(f"{what} failed (exit {proc.returncode}){where}:\n{tail}")
    return proc.stdout


def _chroot(rootfs: Path, command: str, what: str, log_file: Path | None = None) -> str:
    """Run ``command`` in the tree with /proc, /sys and /dev mounted in a private namespace.

    The mounts live only in the ``unshare`` namespace, so a crash can never
    leave them behind on the host.
    """
    script = ("mount -t proc proc \"$R/proc\" && mount -t sysfs sys \"$R/sys\" && "
              "mount --rbind /dev \"$R/dev\" && exec chroot \"$R\" /bin/sh -c \"$CMD\"")
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "R": str(rootfs), "CMD": command,
           "LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive", "HOME": "/root"}
    return _run(["unshare", "--mount", "--fork", "sh", "-c", script], what, env=env, log_file=log_file)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def base_root() -> Path:
    return cache_dir() / "rootfs"


def ensure_base(spec: BaseSpec | None = None) -> Base:
    """The cached base for ``spec``, debootstrapping it first if needed (minutes, needs root)."""
    spec = spec or BaseSpec()
    key = spec.key()
    root = base_root()
    final = root / f"vm-{key}"
    # Extra packages go on top of a copy of the plain base: one debootstrap serves every variant.
    parent = ensure_base(replace(spec, extra_packages=())) if spec.extra_packages else None
    with _locked(root / f".vm-{key}.lock"):
        if (final / "base.json").is_file():
            return Base(final, key, json.loads((final / "base.json").read_text())["inputs"])
        if os.geteuid() != 0:
            raise BuildError("building the VM base needs root (debootstrap creates device nodes "
                             "and files owned by other users); run as root")
        debootstrap = _require("debootstrap", "debootstrap")
        _require("unshare", "util-linux")
        scratch = Path(tempfile.mkdtemp(prefix=f".vm-{key}-", dir=root))
        try:
            started = time.monotonic()
            build_log = root / f"vm-{key}.log"   # kept beside the cache when a build fails
            build_log.write_text("")
            rootfs = scratch / "rootfs"
            if parent is not None:
                log.info("adding %s to a copy of the VM base %s", ", ".join(spec.extra_packages), parent.key)
                _run(["cp", "-a", "--reflink=auto", parent.rootfs, rootfs], "copying the VM base")
                _apt_install(rootfs, spec.extra_packages, build_log)
            else:
                log.info("debootstrap %s (%s) into %s; this takes a few minutes", spec.suite,
                         ", ".join(spec.packages), rootfs)
                # In a private mount namespace: debootstrap mounts /proc and /sys in
                # the target, and a failed run must not leave them on the host.
                _run(["unshare", "--mount", "--fork", debootstrap, "--variant=minbase",
                      "--components=main", f"--include={','.join(spec.packages)}", spec.suite,
                      rootfs, spec.mirror], "debootstrap", log_file=build_log)
                _configure_initramfs(rootfs, spec.initramfs_modules, build_log)
            _scrub_base(rootfs)
            info = {"inputs": spec.inputs(), "seconds": round(time.monotonic() - started, 1)}
            (scratch / "base.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
            os.replace(scratch, final)
        except BuildError:
            inner = rootfs / "debootstrap/debootstrap.log"
            if inner.exists():
                with build_log.open("a") as fh:
                    fh.write(f"--- {inner} ---\n{inner.read_text(errors='replace')}")
            raise
        finally:
            _remove_tree(scratch)
        return Base(final, key, spec.inputs())


def _apt_install(rootfs: Path, packages: Sequence[str], build_log: Path) -> None:
    """Packages whose dependencies debootstrap's simple resolver gets wrong (cloud-init's
    Python stack), installed by apt inside the tree, with the host's resolver for the download."""
    shutil.copyfile("/etc/resolv.conf", rootfs / "etc/resolv.conf")
    try:
        _chroot(rootfs, "apt-get update -qq && apt-get install -y -qq --no-install-recommends "
                + " ".join(packages) + " && apt-get clean", f"apt-get install {' '.join(packages)}",
                build_log)
    finally:
        (rootfs / "etc/resolv.conf").unlink(missing_ok=True)


def _configure_initramfs(rootfs: Path, modules: Sequence[str], build_log: Path) -> None:
    """Rebuild the initramfs with only ``modules`` (``MODULES=most`` packs ~every driver)."""
    conf = rootfs / "etc/initramfs-tools"
    (conf / "conf.d").mkdir(parents=True, exist_ok=True)
    (conf / "conf.d/uniframe.conf").write_text("# a QEMU VM: only its disk and file system\nMODULES=list\nCOMPRESS=zstd\n")
    (conf / "modules").write_text("".join(f"{m}\n" for m in modules))
    _chroot(rootfs, "update-initramfs -u -k all", "update-initramfs in the VM base", build_log)


def _remove_tree(path: Path) -> None:
    """``rm -rf`` that refuses to descend into anything still mounted below ``path``."""
    if not path.exists():
        return
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mountinfo") as fh:
        mounted = [line.split()[4] for line in fh if line.split()[4].startswith(prefix)]
    if mounted:
        raise BuildError(f"{path} still has mounts ({', '.join(mounted)}); unmount them "
                         f"('umount -R {mounted[0]}') and delete {path} by hand")
    shutil.rmtree(path, ignore_errors=True)


def _scrub_base(rootfs: Path) -> None:
    """Drop what must differ per machine or only wastes space in the image."""
    # An empty machine-id makes systemd generate one at first boot, so VMs never share it.
    (rootfs / "etc/machine-id").write_text("")
    (rootfs / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    for d in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for p in (rootfs / d).glob("*"):
            if p.is_file():
                p.unlink()


# -- the disk -------------------------------------------------------------------


@dataclass(frozen=True)
class RootfsStats:
    """What an auditor counts in a root file system."""

    files: int
    executables: int
    setuid: int
    setgid: int
    bytes: int
    packages: int

    def to_json(self) -> dict[str, int]:
        return {"files": self.files, "executables": self.executables, "setuid": self.setuid,
                "setgid": self.setgid, "bytes": self.bytes, "packages": self.packages}


def rootfs_stats(rootfs: Path) -> RootfsStats:
    """Regular files, those with an execute bit, setuid/setgid ones, bytes, installed packages."""
    files = executables = setuid = setgid = size = 0
    for dirpath, _dirs, names in os.walk(rootfs):
        for name in names:
            st = os.lstat(os.path.join(dirpath, name))
            if not stat.S_ISREG(st.st_mode):
                continue
            files += 1
            size += st.st_size
            if st.st_mode & 0o111:
                executables += 1
            if st.st_mode & stat.S_ISUID:
                setuid += 1
            if st.st_mode & stat.S_ISGID:
                setgid += 1
    return RootfsStats(files, executables, setuid, setgid, size, installed_packages(rootfs))


def installed_packages(rootfs: Path) -> int:
    """Packages dpkg in ``rootfs`` records as installed (read from the host, no chroot)."""
    out = _run(["dpkg-query", f"--admindir={rootfs / 'var/lib/dpkg'}", "-W", "-f=${db:Status-Abbrev}\n"],
               "dpkg-query on the VM rootfs")
    return sum(1 for line in out.splitlines() if line.startswith("ii"))


def _requirements() -> list[str]:
    """The server's wheels, pinned to the versions this host runs (and tests) it with."""
    pins = []
    for name in PYTHON_REQUIREMENTS:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            raise BuildError(f"{name} is not installed here, so its version for the VM is unknown; "
                             "run scripts/install.sh") from None
    return pins


def _install_python(rootfs: Path, build_log: Path) -> list[str]:
    """The server's wheels into the guest's site directory, by the host's pip.

    The guest's Python is Debian's 3.11, the wheels are manylinux CPython 3.11
    builds, so the host's pip can unpack them with ``--target`` and the image
    needs neither pip nor network access at build time. ``--no-deps``: the
    server imports only these three (onnxruntime's own requirements serve its
    tooling, not inference).
    """
    pins = _requirements()
    target = rootfs / GUEST_SITE
    target.mkdir(parents=True, exist_ok=True)
    _run([_host_python(), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
          "--no-deps", "--no-compile", "--only-binary=:all:", "--python-version", GUEST_PYTHON,
          "--implementation", "cp", "--target", target, *pins],
         "pip install of the server's wheels into the VM rootfs", log_file=build_log)
    shutil.rmtree(target / "bin", ignore_errors=True)   # console scripts nobody runs
    return pins


def _host_python() -> str:
    import sys

    return sys.executable


def _install_server(rootfs: Path, app: VMApp) -> None:
    """``uniframe.serve`` (only it: it imports nothing else of ours) and the model."""
    import uniframe.serve

    src = Path(uniframe.serve.__file__).parent
    pkg = rootfs / GUEST_SITE / "uniframe"
    (pkg / "serve").mkdir(parents=True, exist_ok=True)
    _write(pkg / "__init__.py", '"""uniframe: only the model server ships in a VM image."""\n')
    for py in sorted(src.glob("*.py")):
        shutil.copyfile(py, pkg / "serve" / py.name)
        (pkg / "serve" / py.name).chmod(0o644)
    model_dir = rootfs / "srv/model"
    model_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(app.model, model_dir / app.model_file)
    (model_dir / app.model_file).chmod(0o644)


def service_unit(app: VMApp) -> str:
    """The systemd unit that runs the server; its output goes to the serial console too.

    The server runs as a transient unprivileged user (``DynamicUser``), allowed
    to bind a port below 1024 if the app asks for one.
    """
    args = " ".join(_unit_quote(a, command=True) for a in app.server_args)
    env = "".join(f"Environment={_unit_quote(f'{k}={v}')}\n" for k, v in app.env)
    return f"""[Unit]
Description=uniframe model server ({app.name})
After=network.target

[Service]
ExecStart=/usr/bin/python3 -m uniframe.serve /srv/model/{app.model_file} {args}
Restart=on-failure
RestartSec=1
Environment=PYTHONUNBUFFERED=1 HOME=/var/lib/uniframe
{env}StateDirectory=uniframe
DynamicUser=yes
AmbientCapabilities=CAP_NET_BIND_SERVICE
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
"""


def _unit_quote(word: str, *, command: bool = False) -> str:
    """One word for a systemd unit line: double-quoted when needed, ``%`` kept literal.

    Only command lines expand ``$VAR``, so only there is ``$`` doubled.
    """
    word = word.replace("%", "%%")
    if command:
        word = word.replace("$", "$$")
    if word and all(c.isalnum() or c in "-_.=/:,+@" for c in word):
        return word
    escaped = word.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


NETWORK_FILE = """# QEMU user-mode networking (and most clouds) hand out addresses by DHCP.
[Match]
Name=en* eth*

[Network]
DHCP=ipv4
"""

FSTAB = f"LABEL={ROOT_LABEL} / ext4 rw,noatime,errors=remount-ro 0 1\n"


def _enable(rootfs: Path, unit: str, target: str = "multi-user.target") -> None:
    """What ``systemctl enable`` does for a unit with one ``WantedBy=``, as a plain symlink."""
    wants = rootfs / "etc/systemd/system" / f"{target}.wants"
    wants.mkdir(parents=True, exist_ok=True)
    link = wants / unit
    link.unlink(missing_ok=True)
    src = rootfs / "etc/systemd/system" / unit
    link.symlink_to(f"/etc/systemd/system/{unit}" if src.exists() else f"/lib/systemd/system/{unit}")


def _mask(rootfs: Path, unit: str) -> None:
    link = rootfs / "etc/systemd/system" / unit
    link.unlink(missing_ok=True)
    link.symlink_to("/dev/null")


def _write(path: Path, text: str) -> None:
    """A config file, readable by all, writable by root (whatever the host's umask)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o644)


def _configure_system(rootfs: Path, app: VMApp, hostname: str) -> None:
    etc = rootfs / "etc"
    _write(etc / "hostname", hostname + "\n")
    _write(etc / "hosts", f"127.0.0.1 localhost\n127.0.1.1 {hostname}\n::1 localhost ip6-localhost\n")
    _write(etc / "fstab", FSTAB)
    _write(etc / "systemd/network/20-uplink.network", NETWORK_FILE)
    _enable(rootfs, "systemd-networkd.service")
    _enable(rootfs, "systemd-networkd.socket", "sockets.target")
    _write(etc / "systemd/system" / SERVICE, service_unit(app))
    _enable(rootfs, SERVICE)
    # No login prompt on the console (root has no password anyway), and no
    # timers that would download package lists in a serving VM.
    for unit in ("serial-getty@ttyS0.service", "getty@tty1.service", "apt-daily.timer",
                 "apt-daily-upgrade.timer"):
        _mask(rootfs, unit)


def _compile_python(rootfs: Path, build_log: Path) -> None:
    """Byte-compile what we added, once, at build time: under TCG a first start that
    compiles numpy costs seconds. Unchecked hashes keep the .pyc bytes reproducible."""
    # -s/-p: the .pyc files name their sources as the guest sees them, not the build directory.
    _run([_host_python(), "-m", "compileall", "-q", "-j", "0", "--invalidation-mode",
          "unchecked-hash", "-s", rootfs, "-p", "/", rootfs / GUEST_SITE],
         "byte-compiling the VM's Python packages", log_file=build_log)


def _fix_times(rootfs: Path) -> None:
    """Give every path we add the same mtime, so the ext4 image repeats byte for byte."""
    for dirpath, dirs, names in os.walk(rootfs):
        for name in dirs + names:
            os.utime(os.path.join(dirpath, name), (FAKE_TIME, FAKE_TIME), follow_symlinks=False)
    os.utime(rootfs, (FAKE_TIME, FAKE_TIME))


def _stable_uuid(*parts: str) -> str:
    return str(uuid.UUID(hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]))


def make_ext4(rootfs: Path, out: Path, fs_uuid: str, build_log: Path, *, label: str = ROOT_LABEL,
              free_mib: int = 512) -> int:
    """``mke2fs -d``: the tree as an ext4 image file, with ``free_mib`` to spare; returns its size."""
    mke2fs = _require("mke2fs", "e2fsprogs")
    used = int(_run(["du", "-s", "-B1", "--apparent-size", rootfs], "measuring the VM rootfs").split()[0])
    # Room for as many files again as the tree has, and for the inode table itself.
    inodes = 2 * (sum(len(d) + len(f) for _, d, f in os.walk(rootfs)) + 1) + 1024
    size_mib = int(used * 1.15 / (1 << 20)) + inodes * 256 // (1 << 20) + free_mib
    env = {**os.environ, "E2FSPROGS_FAKE_TIME": str(FAKE_TIME)}
    out.unlink(missing_ok=True)
    _run([mke2fs, "-q", "-F", "-t", "ext4", "-d", rootfs, "-L", label, "-U", fs_uuid,
          "-E", f"hash_seed={fs_uuid},root_owner=0:0", "-N", str(inodes), "-m", "0",
          out, f"{size_mib}M"], "mke2fs -d (packing the VM rootfs)", env=env, log_file=build_log)
    _pin_ctimes(rootfs, out, build_log)
    return size_mib << 20


def _pin_ctimes(rootfs: Path, image: Path, build_log: Path) -> None:
    """Set every inode's ctime and atime to ``FAKE_TIME`` with ``debugfs``.

    ``mke2fs -d`` copies each file's ctime, which no one can set on the source
    tree (it is the moment we fixed the mtimes), and symlinks' atimes, which
    reading them moves on; these are what would make two builds differ.
    """
    debugfs = _require("debugfs", "e2fsprogs")
    stamp = f"@{FAKE_TIME}"
    lines = [f"sif / ctime {stamp}", f"sif / atime {stamp}"]
    for dirpath, dirs, names in os.walk(rootfs):
        rel = os.path.relpath(dirpath, rootfs)
        for name in dirs + names:
            path = "/" + name if rel == "." else f"/{rel}/{name}"
            if '"' in path or "\n" in path:
                raise BuildError(f"cannot pin the time of {path!r} in the VM image: odd characters in its name")
            lines += [f'sif "{path}" ctime {stamp}', f'sif "{path}" atime {stamp}']
    script = image.parent / "pin-ctimes.debugfs"
    script.write_text("\n".join(lines) + "\n")
    try:
        # The fake time also stamps the superblock's last-write time as debugfs closes.
        env = {**os.environ, "E2FSPROGS_FAKE_TIME": str(FAKE_TIME)}
        _run([debugfs, "-w", "-f", script, image], "debugfs (pinning inode times)", env=env)
    finally:
        script.unlink(missing_ok=True)


def make_bootable_disk(root_fs: Path, kernel: Path, initrd: Path, cmdline: str, out: Path,
                       build_log: Path) -> None:
    """An MBR disk any BIOS boots: syslinux on a FAT partition, then the ext4 root.

    Built from files alone (``sfdisk`` on the image, ``mkfs.vfat``, ``mcopy`` and
    the mtools flavour of ``syslinux`` on a separate FAT image, then ``dd`` into
    place), so no loop device or mount is needed.
    """
    sfdisk = _require("sfdisk", "fdisk")
    mkfs_vfat = _require("mkfs.vfat", "dosfstools")
    mcopy = _require("mcopy", "mtools")
    syslinux = _require("syslinux", "syslinux")
    mbr = Path("/usr/lib/syslinux/mbr/mbr.bin")
    if not mbr.is_file():
        raise BuildError(f"{mbr} is missing; install it with 'apt-get install syslinux-common'")
    work = out.parent
    fat = work / "boot.fat"
    fat.unlink(missing_ok=True)
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(FAKE_TIME), "MTOOLS_SKIP_CHECK": "1"}
    _run([mkfs_vfat, "-C", "-n", "UFBOOT", "-i", "75f10001", "--invariant", fat,
          str(BOOT_PARTITION_MIB * 1024)], "mkfs.vfat (boot partition)", env=env, log_file=build_log)
    cfg = work / "syslinux.cfg"
    cfg.write_text(f"DEFAULT linux\nPROMPT 0\nTIMEOUT 0\nLABEL linux\n  KERNEL /vmlinuz\n"
                   f"  INITRD /initrd.img\n  APPEND {cmdline}\n")
    for src, name in ((kernel, "vmlinuz"), (initrd, "initrd.img"), (cfg, "syslinux.cfg")):
        _run([mcopy, "-m", "-i", fat, src, f"::{name}"], f"mcopy {name} to the boot partition",
             env=env, log_file=build_log)
    _run([syslinux, "--install", fat], "syslinux --install", env=env, log_file=build_log)
    start_mib = 1
    root_start = start_mib + BOOT_PARTITION_MIB
    total = (root_start << 20) + root_fs.stat().st_size
    out.unlink(missing_ok=True)
    with out.open("wb") as fh:
        fh.truncate(total)
    table = (f"label: dos\nlabel-id: 0x75f10001\n"
             f"start={start_mib << 11}, size={BOOT_PARTITION_MIB << 11}, type=c, bootable\n"
             f"start={root_start << 11}, type=83\n")
    proc = subprocess.run([sfdisk, "-q", "--no-reread", "--no-tell-kernel", str(out)], input=table,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BuildError(f"sfdisk on {out} failed: {proc.stderr.strip()}")
    _dd(mbr, out, 0, limit=440)
    _dd(fat, out, start_mib << 20)
    _dd(root_fs, out, root_start << 20)
    fat.unlink()
    cfg.unlink()


def _dd(src: Path, dest: Path, offset: int, limit: int | None = None) -> None:
    """Copy ``src`` into ``dest`` at ``offset`` without filling holes (the disk stays sparse)."""
    with src.open("rb") as fin, dest.open("r+b") as fout:
        copied = 0
        while limit is None or copied < limit:
            want = 1 << 20 if limit is None else min(1 << 20, limit - copied)
            chunk = fin.read(want)
            if not chunk:
                break
            if chunk.count(0) != len(chunk):
                fout.seek(offset + copied)
                fout.write(chunk)
            copied += len(chunk)


def _qemu_img() -> str:
    return _require("qemu-img", "qemu-utils")


def disk_info(path: Path) -> dict[str, Any]:
    """``qemu-img info`` as JSON: format, virtual size, bytes allocated on the host."""
    data: dict[str, Any] = json.loads(_run([_qemu_img(), "info", "--output=json", path],
                                           f"qemu-img info {path}"))
    return data


CLOUD_INIT_CFG = """# uniframe: only the NoCloud seed (a cidata volume) can configure this VM
datasource_list: [NoCloud, None]
"""

DISK_FORMATS = ("qcow2", "raw")
LAYOUTS = ("partitionless", "bootable")


def build_vm_disk(app: VMApp, out_dir: Path, *, disk_format: str = "qcow2",
                  layout: str = "partitionless", cloud_init: bool = False,
                  base: BaseSpec | None = None, source_digest: str | None = None) -> Path:
    """Build the VM image for ``app`` into ``out_dir`` (created); returns ``out_dir``.

    ``cloud_init`` adds Debian's cloud-init (restricted to the NoCloud
    datasource) to the base, for disks that take user data from a seed.
    """
    if disk_format not in DISK_FORMATS:
        raise BuildError(f"unknown disk format {disk_format!r}; use {' or '.join(DISK_FORMATS)}")
    if layout not in LAYOUTS:
        raise BuildError(f"unknown disk layout {layout!r}; use {' or '.join(LAYOUTS)}")
    if not app.model.is_file():
        raise BuildError(f"model {app.model} does not exist; give the path of an .onnx file")
    if not app.name or not all(c.isalnum() or c in "-_." for c in app.name):
        raise BuildError(f"app name {app.name!r} must be letters, digits, '-', '_' or '.'")
    if os.geteuid() != 0:
        raise BuildError("building a VM disk needs root: the Debian tree holds files of many "
                         "owners and device nodes, which only root can copy as they are")
    spec = base or BaseSpec()
    if cloud_init:
        spec = spec.with_packages("cloud-init")
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    cached = base_root().joinpath(f"vm-{spec.key()}", "base.json").is_file()
    base_tree = ensure_base(spec)
    timings["base"] = time.monotonic() - t0
    out_dir.mkdir(parents=True, exist_ok=True)
    build_log = out_dir / "build.log"
    build_log.write_text("")
    work = Path(tempfile.mkdtemp(prefix=".vmdisk-", dir=out_dir))
    try:
        t = time.monotonic()
        rootfs = work / "rootfs"
        _run(["cp", "-a", "--reflink=auto", base_tree.rootfs, rootfs], "copying the VM base")
        shutil.copyfile(base_tree.kernel, out_dir / "kernel")
        shutil.copyfile(base_tree.initrd, out_dir / "initrd")
        kernel_version = base_tree.kernel.name.removeprefix("vmlinuz-")
        for p in (rootfs / "boot").glob("*"):   # they live beside the disk, not in it
            if p.is_file():
                p.unlink()
        pins = _install_python(rootfs, build_log)
        _install_server(rootfs, app)
        _configure_system(rootfs, app, app.name.replace("_", "-").replace(".", "-"))
        if cloud_init:
            _write(rootfs / "etc/cloud/cloud.cfg.d/90_uniframe.cfg", CLOUD_INIT_CFG)
        _compile_python(rootfs, build_log)
        stats = rootfs_stats(rootfs)
        _fix_times(rootfs)
        timings["rootfs"] = time.monotonic() - t
        t = time.monotonic()
        inputs = {"recipe": DISK_RECIPE, "base": spec.key(), "app": [app.name, app.port],
                  "args": list(app.server_args), "env": [list(e) for e in app.env],
                  "model": hashlib.sha256(app.model.read_bytes()).hexdigest(), "python": pins,
                  "layout": layout, "cloud_init": cloud_init}
        fs_uuid = _stable_uuid(json.dumps(inputs, sort_keys=True))
        root_dev = "/dev/vda" if layout == "partitionless" else "/dev/vda2"
        cmdline = f"root={root_dev} rw console=ttyS0 panic=-1"
        ext4 = work / "root.ext4"
        make_ext4(rootfs, ext4, fs_uuid, build_log)
        raw = work / "disk.raw"
        if layout == "bootable":
            make_bootable_disk(ext4, out_dir / "kernel", out_dir / "initrd", cmdline, raw, build_log)
            ext4.unlink()
        else:
            os.replace(ext4, raw)
        timings["mke2fs"] = time.monotonic() - t
        t = time.monotonic()
        disk_name = f"disk.{disk_format}"
        if disk_format == "qcow2":
            _run([_qemu_img(), "convert", "-O", "qcow2", "-o", "cluster_size=65536", raw,
                  out_dir / disk_name], "qemu-img convert to qcow2", log_file=build_log)
        else:
            os.replace(raw, out_dir / disk_name)
        timings["convert"] = time.monotonic() - t
        info = disk_info(out_dir / disk_name)
    finally:
        _remove_tree(work)
    manifest: dict[str, Any] = {
        "kind": "vm", "name": app.name, "cmdline": cmdline,
        "files": {"disk": {"path": disk_name}, "kernel": {"path": "kernel"}, "initrd": {"path": "initrd"}},
        "disk": {"format": disk_format, "layout": layout, "virtual_size": int(info["virtual-size"]),
                 "root": root_dev, "fs_uuid": fs_uuid},
        "kernel_version": kernel_version,
        "app": {"model": f"/srv/model/{app.model_file}", "name": app.name, "port": app.port,
                "service": SERVICE, "model_sha256": inputs["model"],
                "args": list(app.server_args), "env": dict(app.env)},
        "base": {"key": spec.key(), "suite": spec.suite, "packages": spec.all_packages()},
        "python": pins, "cloud_init": cloud_init,
        "rootfs": stats.to_json(),
        "ports": [app.port],
    }
    if source_digest is not None:
        manifest["source_spec_digest"] = source_digest
    finalize_manifest(out_dir, manifest)
    build = {"seconds": {k: round(v, 1) for k, v in timings.items()}, "base_cached": cached,
             "disk_allocated_bytes": int(info.get("actual-size", 0)),
             "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (out_dir / BUILD_INFO).write_text(json.dumps(build, indent=2, sort_keys=True) + "\n")
    return out_dir


def build_vm_image(app: VMApp, store: ImageStore | None = None, name: str | None = None,
                   **options: Any) -> Image:
    """Build the VM image for ``app`` straight into the image store, tagged ``name``."""
    store = store or ImageStore()
    staging = store.staging_dir()
    try:
        build_vm_disk(app, staging, **options)
        (staging / "build.log").unlink(missing_ok=True)
        return store.add_dir(staging, name or f"{app.name}-vm:latest", move=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
