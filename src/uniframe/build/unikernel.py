"""Build an InferenceService into a unikernel image: kernel + root + command line.

The pipeline, each step a call into its own module:

1. resolve the model to one ONNX file (:mod:`uniframe.build.model`);
2. trace the model server once on the host, with a real inference as warm-up,
   to learn exactly which files it needs (:mod:`uniframe.build.closure`);
3. materialize that closure into a root (stripped, unchecked-hash pycs);
4. add the model, ``/init``, ``/etc/hosts``, the mount points and the device
   nodes, and pack the root in one of two formats: a read-only squashfs disk
   (:mod:`uniframe.build.rootfs`; the driver attaches it as virtio-blk and the
   kernel mounts it as ``/``) or a newc initramfs the kernel unpacks into RAM
   (:mod:`uniframe.build.initramfs`). Both carry the same entries;
5. take the tailored kernel from the cache (:mod:`uniframe.build.kernel`);
6. write ``manifest.json`` and move the image into the content-addressed store.

Proving the image by booting it needs a runtime, which sits above this layer:
the CLI does that after this returns.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, get_args

from uniframe.build import initramfs, rootfs
from uniframe.build.closure.materialize import MaterializeStats, materialize
from uniframe.build.closure.model import Closure
from uniframe.build.closure.trace import WarmupRequest, trace
from uniframe.build.kernel import Kernel, ensure_kernel, user_kernel
from uniframe.build.model import ResolvedModel, resolve_model
from uniframe.build.modelstore import describe_onnx
from uniframe.build.store import BUILD_INFO, Image, ImageStore, finalize_manifest
from uniframe.errors import BuildError, ModelError
from uniframe.guest.cmdline import KERNEL_ARGS, encode_cmdline
from uniframe.guest.initscript import DEVICE_NODES, INIT_PATH, MOUNT_POINTS, render_init_script
from uniframe.guest.net import HOSTS_PATH, hosts_text
from uniframe.spec import InferenceService
from uniframe.spec.runtimes import RUNTIMES
from uniframe.spec.service import BodyLimitError, RootFormat

Progress = Callable[[str], None]
Compression = Literal["none", "gzip", "lz4", "zstd", "xz"]  # xz: squashfs only
ROOT_FORMATS: tuple[RootFormat, ...] = get_args(RootFormat)
MODEL_DIR = "/srv/models"
SERVER_MODULE = "uniframe.serve"
# The default format and its settings are the fastest-booting combination that
# meets every target for the iris service (image <= 30 MB with the kernel, QEMU
# RSS <= 200 MiB after 1000 requests, QEMU start to first inference <= 8 s under
# TCG), as measured by bench/unikernel_bench.py (bench/README.md, "Unikernel"):
# squashfs, zstd -19, 256 KiB blocks: 29.6 MB, 6.2 s, 185 MiB. No initramfs meets
# the RSS target (the whole root stays in guest RAM: 238-249 MiB); lz4 and gzip
# disks are too large (38-48 and 34 MB), xz boots in 9.7-16 s; zstd with 128 KiB
# blocks boots 0.3 s sooner but is 30.6 MB; bigger blocks are smaller but slower
# and cost RSS (every decompressed block stays in the page cache: 512 KiB 6.7 s
# and 191 MiB, 1 MiB 201 MiB). Level 19 is as small as 22 and packs faster.
DEFAULT_ROOTFS: RootFormat = "squashfs"
DEFAULT_SQUASHFS_COMPRESSION: rootfs.Method = "zstd"
DEFAULT_BLOCK_SIZE = 256 << 10
ROOT_FILE = "root.squashfs"
ROOT_ROLE = "root"  # the disk's role in the manifest's files (the initramfs's is "initrd")
# The disk root: the only block device is the first virtio-blk disk; no
# initramfs, so the kernel runs the /init that init= names (it would look for
# /sbin/init otherwise).
DISK_ROOT_ARGS = ("root=/dev/vda", "ro", "rootfstype=squashfs", f"init={INIT_PATH}")
# For an initramfs root, the fastest boot measured under TCG (bench/unikernel_bench.py,
# bench/README.md): QEMU start to first inference of iris took 4.29 s with lz4, 5.11 s
# with gzip and 5.50 s with zstd (the kernel's zstd and gzip decoders are slow under
# TCG). No compression tied with lz4 (4.29 s) but makes the image 2.5x larger and
# QEMU's RSS 52 MB larger (QEMU keeps the initrd file mapped).
DEFAULT_COMPRESSION: initramfs.Method = "lz4"
# zstd is the choice for the smallest initramfs: level 19 makes the iris initrd 11%
# smaller than the default level 9 (24.9 vs 28.0 MB) and the kernel unpacks it
# just as fast; only the build pays (~25-50 s of CPU for iris).
LEVELS: dict[initramfs.Method, int] = {"zstd": 19}
# The initramfs root as ramfs rather than tmpfs: the kernel caps a tmpfs root at
# half the RAM it counts while the initrd still occupies memory, which in 256 MiB
# left the 98 MB iris root a few MB of room with lz4 and made an uncompressed
# initrd fail to unpack ("write error"); ramfs has no cap. /tmp and /run are
# still size-capped tmpfs mounts (uniframe.guest.mounts).
INITRAMFS_ROOT_ARGS = ("rootfstype=ramfs",)
# One thread for the numeric libraries: a replica is one core's worth of work,
# and thread pools only cost start-up time and memory (scale out with replicas).
GUEST_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
             # ONNX Runtime (1.32) otherwise persists a telemetry device id under
             # ~/.cache, which a read-only root refuses with a warning on every boot,
             # and starts an uploader thread that has nowhere to upload to.
             "ORT_DISABLE_TELEMETRY": "1"}


@dataclass(frozen=True)
class BuildResult:
    image: Image
    closure: Closure
    stats: MaterializeStats
    kernel: Kernel
    timings: dict[str, float] = field(default_factory=dict)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def model_signature(model: ResolvedModel) -> dict[str, list[dict[str, Any]]]:
    """The model's inputs and outputs in OIP terms, as the server will announce them."""
    try:
        return describe_onnx(model.path)
    except ModelError as exc:
        raise BuildError(str(exc)) from None


def sample_request(inputs: list[dict[str, Any]]) -> bytes:
    """A valid inference request for these inputs: one row of zeros (or empty strings)."""
    body = []
    for inp in inputs:
        shape = [d if d > 0 else 1 for d in inp["shape"]]
        count = 1
        for d in shape:
            count *= d
        datatype = inp["datatype"]
        value: Any = "" if datatype == "BYTES" else (False if datatype == "BOOL" else 0)
        body.append({"name": inp["name"], "datatype": datatype, "shape": shape,
                     "data": [value] * count})
    return json.dumps({"inputs": body}).encode()


def server_args(service: InferenceService, model_path: str, model: ResolvedModel) -> list[str]:
    """The model server's arguments, the same for every runtime (unikernel, OCI, VM, process)."""
    spec = service.spec
    return [model_path, "--name", model.name, "--model-version", model.version,
            "--port", str(spec.port), "--threads", str(spec.server.threads),
            "--max-body-size", str(max_body_size(service, model))]


def max_body_size(service: InferenceService, model: ResolvedModel) -> int:
    """The body limit the replica's memory can serve with this model (``spec.server.maxBodySize``
    if given and it fits), by the spec's rule (:meth:`uniframe.spec.service.Server.body_limit`).

    The spec checked the limit against the memory alone; only here is the model's size known.
    """
    spec = service.spec
    try:
        return spec.server.body_limit(spec.resources.memory, model.size)
    except BodyLimitError as exc:
        field = "spec.server.maxBodySize" if exc.field == "maxBodySize" else "spec.resources.memory"
        raise BuildError(f"{field}: {exc}") from None


def _host_sys_path() -> list[str]:
    """The interpreter's module path as the traced app saw it, minus the working directory."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", "import json,sys; print(json.dumps(sys.path))"],
                         capture_output=True, text=True, check=True, cwd="/")
    return [p for p in json.loads(out.stdout) if p and p != "/"]


def _root_entries(root: Path) -> Iterator[initramfs.Entry]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = "/" + os.path.relpath(dirpath, root).removeprefix(".")
        for name in sorted(dirnames + filenames):
            full = Path(dirpath) / name
            image_path = f"{rel_dir.rstrip('/')}/{name}"
            st = full.lstat()
            if full.is_symlink():
                yield initramfs.Symlink(image_path, os.readlink(full))
            elif full.is_dir():
                yield initramfs.Directory(image_path, st.st_mode & 0o7777)
            else:
                yield initramfs.File(image_path, full, st.st_mode & 0o777)


@dataclass(frozen=True)
class AppRoot:
    """The traced, materialized root of the model server for one service, before packaging."""

    root: Path
    model: ResolvedModel
    signature: dict[str, list[dict[str, Any]]]
    image_model: str
    guest_args: list[str]
    closure: Closure
    stats: MaterializeStats


def prepare_app_root(service: InferenceService, staging: Path, say: Progress,
                     timings: dict[str, float], *, sources: bool = True) -> AppRoot:
    """Resolve the model, trace the server once (with a real inference), materialize its files.

    ``sources=False`` ships pycs without their ``.py`` files (see
    :func:`~uniframe.build.closure.materialize.materialize`).
    """
    say("resolving the model")
    model = resolve_model(service, staging / "model")
    image_model = f"{MODEL_DIR}/{model.name}/{model.version}/model.onnx"
    signature = model_signature(model)

    say("tracing the model server (one real inference)")
    t = time.monotonic()
    port = _free_port()
    args = server_args(service, str(model.path), model)
    args[args.index("--port") + 1] = str(port)
    home = staging / "home"
    home.mkdir()
    closure = trace(
        [SERVER_MODULE, *args, "--host", "127.0.0.1"],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
             **GUEST_ENV, **service.spec.env},
        ready_url=f"http://127.0.0.1:{port}/v2/health/ready",
        warmup=[WarmupRequest("POST", f"/v2/models/{model.name}/infer",
                              sample_request(signature["inputs"]),
                              {"Content-Type": "application/json"})],
        extra_imports=["uniframe.guest.init"],
        cwd=staging,
    )
    timings["trace"] = time.monotonic() - t

    say(f"copying {len(closure.files())} files into the root (strip, compile)")
    t = time.monotonic()
    root = staging / "root"
    stats = materialize(closure, root, sources=sources)
    timings["materialize"] = time.monotonic() - t
    return AppRoot(root, model, signature, image_model, server_args(service, image_model, model),
                   closure, stats)


def _common_manifest(service: InferenceService, app: AppRoot, source_digest: str) -> dict[str, Any]:
    """What every image of an InferenceService records, whatever its runtime."""
    return {
        "schema": 1,
        "name": service.metadata.name,
        "entrypoint": [app.closure.interpreter, "-m", SERVER_MODULE, *app.guest_args],
        "port": service.spec.port,
        "model": {"name": app.model.name, "version": app.model.version, "sha256": app.model.sha256,
                  "path": app.image_model, "bytes": app.model.size, **app.signature},
        "file_count": app.stats.files + app.stats.symlinks + 1,  # + the model
        "executables": sorted(os.path.realpath(e.image_path) for e in app.closure.executables()),
        "setuid": 0,  # materialize never carries setuid/setgid bits
        "packages": [{"package": r.package, "files": r.files, "bytes": r.bytes}
                     for r in app.closure.by_package()],
        "resources": {"cpus": service.spec.resources.cpus, "memory": service.spec.resources.memory},
        "source_spec_digest": source_digest,
    }


def _build_info(timings: dict[str, float], app: AppRoot) -> str:
    return json.dumps({
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "trace_seconds": app.closure.trace_seconds,
        "materialize": {"bytes_before_strip": app.stats.bytes_before_strip,
                        "bytes": app.stats.total_bytes, "stripped_files": app.stats.stripped_files},
    }, indent=2) + "\n"


@dataclass(frozen=True)
class RootOptions:
    """How the root is packaged; ``None`` fields take the format's measured default."""

    format: RootFormat = DEFAULT_ROOTFS
    compression: Compression | None = None
    level: int | None = None
    block_size: int | None = None  # squashfs only

    def resolved(self) -> RootOptions:
        """These options with every default filled in and checked; raises ``BuildError``."""
        if self.format not in ROOT_FORMATS:
            raise BuildError(f"unknown root format {self.format!r}; use one of {', '.join(ROOT_FORMATS)}")
        if self.format == "initramfs":
            method = self.compression or DEFAULT_COMPRESSION
            if method not in initramfs.METHODS:
                raise BuildError(f"an initramfs cannot be compressed with {method}; use one of "
                                 f"{', '.join(initramfs.METHODS)}, or the squashfs root format")
            if self.block_size is not None:
                raise BuildError("a block size applies to the squashfs root format only")
            level = initramfs.check_level(method, self.level if self.level is not None
                                          else LEVELS.get(method))
            return RootOptions("initramfs", method, level, None)
        squash: rootfs.Method = self.compression or DEFAULT_SQUASHFS_COMPRESSION
        block_size = self.block_size or DEFAULT_BLOCK_SIZE
        level = rootfs.check_options(squash, self.level, block_size)
        return RootOptions("squashfs", squash, level, block_size)


def root_entries(app: AppRoot, init_text: str, hostname: str) -> list[initramfs.Entry]:
    """Everything the image's root holds: the app's files plus what PID 1 needs.

    The same list for either format. A read-only root cannot gain a mount
    point or ``/etc/hosts`` at boot, so both are in the image.
    """
    extra: list[initramfs.Entry] = [
        initramfs.File(INIT_PATH, init_text.encode(), 0o755),
        initramfs.File(app.image_model, app.model.path, 0o644),
        *(initramfs.Directory(p) for p in MOUNT_POINTS if not (app.root / p.lstrip("/")).exists()),
        *(initramfs.Device(path, "c", major, minor, mode)
          for path, _kind, major, minor, mode in DEVICE_NODES),
    ]
    if not (app.root / HOSTS_PATH.lstrip("/")).exists():
        extra.append(initramfs.File(HOSTS_PATH, hosts_text(hostname).encode(), 0o644))
    return [*_root_entries(app.root), *extra]


def build_unikernel(
    service: InferenceService,
    *,
    source_digest: str,
    compression: Compression | None = None,
    rootfs_format: RootFormat | None = None,
    level: int | None = None,
    block_size: int | None = None,
    store: ImageStore | None = None,
    progress: Progress | None = None,
    kernel: Kernel | None = None,
) -> BuildResult:
    """Build ``service`` into a unikernel image in ``store`` and return it with build facts.

    ``rootfs_format`` and ``compression`` override the spec's ``image`` options;
    ``level`` and ``block_size`` are for measuring (bench/unikernel_bench.py).
    """
    say = progress or (lambda _msg: None)
    store = store or ImageStore()
    options = RootOptions(rootfs_format or service.spec.image.rootfs,
                          compression or _spec_compression(service), level, block_size).resolved()
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    staging = store.staging_dir()
    try:
        # No .py sources: the kernel unpacks 4.5 MB and 208 files less, which measured
        # ~0.2 s (4%) less QEMU CPU to the first inference and 8 MB less RSS for iris.
        # A traceback from the guest still names each file and line, and the files
        # are at the same paths on the build host.
        app = prepare_app_root(service, staging, say, timings, sources=False)
        return package_unikernel(service, app, options, source_digest=source_digest, store=store,
                                 progress=say, kernel=kernel, timings=timings, started=t0)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def package_unikernel(
    service: InferenceService,
    app: AppRoot,
    options: RootOptions,
    *,
    source_digest: str,
    store: ImageStore,
    progress: Progress | None = None,
    kernel: Kernel | None = None,
    timings: dict[str, float] | None = None,
    started: float | None = None,
) -> BuildResult:
    """Pack a prepared app root with the kernel into an image in ``store``.

    Separate from :func:`build_unikernel` so that one traced root can be packed
    in several formats (the benchmark's matrix) without tracing it again.
    ``started`` (a ``time.monotonic()``) is when the whole build began, for
    the total in ``build.json``.
    """
    say = progress or (lambda _msg: None)
    options = options.resolved()
    timings = timings if timings is not None else {}
    started = time.monotonic() if started is None else started
    staging = store.staging_dir()
    try:
        init_text = render_init_script(app.closure.interpreter, _host_sys_path())
        entries = root_entries(app, init_text, service.metadata.name)
        raw_bytes = _count_bytes(app.root) + app.model.size + len(init_text)

        image_dir = staging / "image"
        image_dir.mkdir()
        t = time.monotonic()
        root_file, root_args = _write_root(entries, image_dir, options, say)
        timings[options.format] = time.monotonic() - t

        say("getting the kernel")
        t = time.monotonic()
        if kernel is None:
            kernel = user_kernel(Path(service.spec.kernel)) if service.spec.kernel else ensure_kernel()
        # The compressed bzImage (1.6 MB) rather than the PVH vmlinux (15 MB of mostly
        # alignment padding): PVH boots only ~0.1 s faster under TCG (bench/kernel_bench.py)
        # and would make every image 14 MB larger.
        boot_file = kernel.bzimage if kernel.bzimage is not None else kernel.path
        shutil.copyfile(boot_file, image_dir / "kernel")
        timings["kernel"] = time.monotonic() - t

        cmdline = " ".join([*KERNEL_ARGS, "quiet", *root_args, encode_cmdline(
            SERVER_MODULE, app.guest_args, {**GUEST_ENV, **service.spec.env},
            port=service.spec.port, hostname=service.metadata.name)])
        manifest = _common_manifest(service, app, source_digest)
        role = ROOT_ROLE if options.format == "squashfs" else "initrd"
        root: dict[str, Any] = {"format": options.format, "compression": options.compression,
                                "level": options.level, "uncompressed_bytes": raw_bytes,
                                "bytes": (image_dir / root_file).stat().st_size}
        if options.block_size is not None:
            root["block_size"] = options.block_size
        manifest.update({
            "kind": "unikernel",
            "files": {"kernel": {"path": "kernel"}, role: {"path": root_file}},
            "cmdline": cmdline,
            "kernel": {"key": kernel.key, "config_hash": kernel.config_hash,
                       "source_version": kernel.source_version,
                       "boot": "bzimage" if boot_file == kernel.bzimage else str(kernel.boot)},
            "root": root,
            "file_count": sum(isinstance(e, initramfs.File | initramfs.Symlink) for e in entries),
        })
        if options.format == "initramfs":
            # the record older readers of initramfs images know
            manifest["initrd"] = {"compression": options.compression, "uncompressed_bytes": raw_bytes}
        finalize_manifest(image_dir, manifest)
        timings["total"] = time.monotonic() - started
        (image_dir / BUILD_INFO).write_text(_build_info(timings, app))
        image = store.add_dir(image_dir, name=RUNTIMES["unikernel"].image_name(service.metadata.name),
                              move=True)
        return BuildResult(image, app.closure, app.stats, kernel, timings)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_root(entries: list[initramfs.Entry], image_dir: Path, options: RootOptions,
                say: Progress) -> tuple[str, tuple[str, ...]]:
    """Pack ``entries`` in the chosen format; return the file's name and the kernel's root arguments."""
    if options.format == "squashfs":
        assert options.block_size is not None
        say(f"writing the squashfs root ({options.compression}, "
            f"{options.block_size >> 10} KiB blocks)")
        rootfs.write_squashfs(entries, image_dir / ROOT_FILE,
                              options.compression,  # type: ignore[arg-type]
                              options.level, block_size=options.block_size)
        return ROOT_FILE, DISK_ROOT_ARGS
    say(f"packing the initramfs ({options.compression})")
    initramfs.write_initramfs(entries, image_dir / "initrd",
                              options.compression,  # type: ignore[arg-type]
                              options.level)
    return "initrd", INITRAMFS_ROOT_ARGS


def _spec_compression(service: InferenceService) -> Compression | None:
    """The spec's ``image.compression`` if the user wrote it (its model default is not ours)."""
    options = service.spec.image
    return options.compression if "compression" in options.model_fields_set else None


def _count_bytes(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                total += os.path.getsize(p)
    return total
