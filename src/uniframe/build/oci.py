"""OCI images: how a root directory becomes a container image, and an image a root again.

Two formats meet here, both from the Open Container Initiative specs:

- the *image layout* (``oci-layout``, ``index.json``, ``blobs/sha256/``): what
  users bring (``skopeo copy ... oci:DIR``, ``docker save`` since 25, or a
  ``.tar`` of such a directory) and what :func:`write_image_layout` makes from
  a root directory (a traced closure, a debootstrap tree);
- the *layers* inside it: tar streams applied in order, where a ``.wh.NAME``
  entry deletes ``NAME`` from the layers below and ``.wh..wh..opq`` empties a
  directory of them.

The *runtime bundle* runc runs (``rootfs/`` plus ``config.json``) is how the
runc driver runs a container, so it lives with the driver, in
:mod:`uniframe.runtime.runc.bundle`; it unpacks an image with :func:`load_layout`.

Our own layers are made deterministically (names sorted, mtime 0, owner root,
gzip without timestamp), so the same root gives the same digest on any machine
and the digest can key caches. Unpacking resolves every path inside the root
the way the container will (an absolute symlink points into the rootfs, not to
the host), so a hostile layer cannot write outside the bundle.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from uniframe.build.store import Image, ImageStore, finalize_manifest
from uniframe.errors import BuildError, ImageError

LAYOUT_VERSION = "1.0.0"
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
# Docker's media types, which ``docker save`` still writes inside OCI layouts.
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MT_DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"

_GZIP_LAYERS = {MT_LAYER_GZIP, MT_DOCKER_LAYER}
_PLAIN_LAYERS = {MT_LAYER_TAR, "application/vnd.docker.image.rootfs.diff.tar"}
_INDEXES = {MT_INDEX, MT_DOCKER_LIST}
_MANIFESTS = {MT_MANIFEST, MT_DOCKER_MANIFEST}

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
REF_NAME = "org.opencontainers.image.ref.name"
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"


# -- image configuration ---------------------------------------------------


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an OCI image configuration that decide how the container runs."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    workdir: str = "/"
    user: str = ""
    exposed_ports: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def args(self) -> tuple[str, ...]:
        return (*self.entrypoint, *self.cmd)

    def to_oci(self) -> dict[str, Any]:
        env = dict(self.env)
        env.setdefault("PATH", DEFAULT_PATH)
        out: dict[str, Any] = {"Env": [f"{k}={v}" for k, v in env.items()],
                               "WorkingDir": self.workdir or "/"}
        if self.entrypoint:
            out["Entrypoint"] = list(self.entrypoint)
        if self.cmd:
            out["Cmd"] = list(self.cmd)
        if self.user:
            out["User"] = self.user
        if self.exposed_ports:
            out["ExposedPorts"] = {_port_key(p): {} for p in self.exposed_ports}
        if self.labels:
            out["Labels"] = dict(self.labels)
        return out

    @classmethod
    def from_oci(cls, config: Mapping[str, Any]) -> ImageConfig:
        env: dict[str, str] = {}
        for item in config.get("Env") or []:
            key, _, value = str(item).partition("=")
            env[key] = value
        return cls(
            entrypoint=tuple(str(a) for a in config.get("Entrypoint") or ()),
            cmd=tuple(str(a) for a in config.get("Cmd") or ()),
            env=env, workdir=str(config.get("WorkingDir") or "/"), user=str(config.get("User") or ""),
            exposed_ports=tuple(sorted(config.get("ExposedPorts") or {})),
            labels={str(k): str(v) for k, v in (config.get("Labels") or {}).items()},
        )


def _port_key(port: str | int) -> str:
    text = str(port)
    return text if "/" in text else f"{text}/tcp"


# -- writing a layout --------------------------------------------------------


class _HashingWriter(io.RawIOBase):
    """A write-only stream that hashes and counts what passes through to ``sink``."""

    def __init__(self, sink: IO[bytes]) -> None:
        self.sink = sink
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.sha.update(view)
        self.size += len(view)
        self.sink.write(view)
        return len(view)


class _HashingReader(io.RawIOBase):
    """A read-only stream that hashes what is read from ``source``."""

    def __init__(self, source: IO[bytes]) -> None:
        self.source = source
        self.sha = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.source.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.sha.update(data)
        return n

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _walk_sorted(root: Path, rel: str = "") -> Iterator[tuple[str, os.DirEntry[str]]]:
    with os.scandir(root / rel if rel else root) as it:
        entries = sorted(it, key=lambda e: e.name.encode("utf-8", "surrogateescape"))
    for entry in entries:
        path = f"{rel}/{entry.name}" if rel else entry.name
        yield path, entry
        if entry.is_dir(follow_symlinks=False):
            yield from _walk_sorted(root, path)


def write_layer(root: Path, out: IO[bytes], *, keep_owners: bool = False,
                keep_mtimes: bool = False) -> tuple[str, str, int]:
    """Write ``root`` as one gzip layer to ``out``; returns (diff id, blob digest, blob size).

    Device nodes and sockets are left out: a container's ``/dev`` is a fresh
    tmpfs and a socket only means something to the process that bound it.
    Times are zeroed unless ``keep_mtimes``: mind that Python's default
    (timestamp) ``.pyc`` files then no longer match their sources and every
    start recompiles them; compile with ``--invalidation-mode unchecked-hash``
    (the closure materializer does) or keep the times.
    """
    if not root.is_dir():
        raise BuildError(f"cannot make a layer: {root} is not a directory")
    blob = _HashingWriter(out)
    with gzip.GzipFile(filename="", mode="wb", fileobj=blob, mtime=0, compresslevel=6) as gz:
        diff = _HashingWriter(gz)  # type: ignore[arg-type]
        with tarfile.open(fileobj=diff, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for rel, entry in _walk_sorted(root):
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISSOCK(st.st_mode) or stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                    continue
                info = tar.gettarinfo(entry.path, arcname=rel)
                if not keep_mtimes:
                    info.mtime = 0
                if not keep_owners:
                    info.uid = info.gid = 0
                info.uname = info.gname = ""
                if info.isreg():
                    with open(entry.path, "rb") as fh:
                        tar.addfile(info, fh)
                else:
                    tar.addfile(info)
    return "sha256:" + diff.sha.hexdigest(), "sha256:" + blob.sha.hexdigest(), blob.size


def _put_blob(layout: Path, data: bytes) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    path = layout / "blobs" / "sha256" / digest
    path.write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def write_image_layout(
    root: Path,
    out: Path,
    *,
    entrypoint: Sequence[str],
    cmd: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    workdir: str = "/",
    user: str = "",
    exposed_ports: Sequence[str | int] = (),
    labels: Mapping[str, str] | None = None,
    ref_name: str | None = None,
    keep_owners: bool = False,
    keep_mtimes: bool = False,
) -> str:
    """Write an OCI image layout of ``root`` (one layer) at ``out``; returns the manifest digest.

    ``out`` must be missing, empty, or an earlier layout (it is replaced). The
    layout is built beside it and renamed into place, so a failed build never
    leaves a half-written image that later looks valid.
    """
    if out.exists() and any(out.iterdir()) and not (out / "oci-layout").is_file():
        raise BuildError(f"{out} exists and is not an OCI image layout; pick an empty or new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        blobs = tmp / "blobs" / "sha256"
        blobs.mkdir(parents=True)
        layer_tmp = blobs / ".layer"
        with layer_tmp.open("wb") as fh:
            diff_id, layer_digest, layer_size = write_layer(root, fh, keep_owners=keep_owners,
                                                            keep_mtimes=keep_mtimes)
        layer_tmp.rename(blobs / layer_digest.removeprefix("sha256:"))
        image = ImageConfig(entrypoint=tuple(entrypoint), cmd=tuple(cmd), env=dict(env or {}),
                            workdir=workdir, user=user,
                            exposed_ports=tuple(_port_key(p) for p in exposed_ports),
                            labels=dict(labels or {}))
        config = {
            "created": "1970-01-01T00:00:00Z", "architecture": "amd64", "os": "linux",
            "config": image.to_oci(),
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "uniframe: root directory"}],
        }
        config_desc = {"mediaType": MT_CONFIG, **_put_blob(tmp, _json_bytes(config))}
        manifest = {
            "schemaVersion": 2, "mediaType": MT_MANIFEST, "config": config_desc,
            "layers": [{"mediaType": MT_LAYER_GZIP, "digest": layer_digest, "size": layer_size}],
        }
        if labels:
            manifest["annotations"] = dict(labels)
        manifest_desc: dict[str, Any] = {"mediaType": MT_MANIFEST, **_put_blob(tmp, _json_bytes(manifest)),
                                         "platform": {"architecture": "amd64", "os": "linux"}}
        if ref_name:
            manifest_desc["annotations"] = {REF_NAME: ref_name}
        index = {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": [manifest_desc]}
        (tmp / "index.json").write_bytes(_json_bytes(index))
        (tmp / "oci-layout").write_bytes(_json_bytes({"imageLayoutVersion": LAYOUT_VERSION}))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(manifest_desc["digest"])


def add_layout_to_store(layout: Path, name: str | None = None, store: ImageStore | None = None,
                        extra: dict[str, Any] | None = None) -> Image:
    """Put an OCI layout into the image store as an image of kind ``oci``.

    The store's ``manifest.json`` sits beside the layout's own files (OCI
    readers ignore it) and records the sha256 of each, so the store digest
    covers every byte of the image, like for unikernel images.
    """
    read = read_layout(layout)
    store = store or ImageStore()
    staging = store.staging_dir()
    try:
        files: dict[str, Any] = {}
        for src in sorted(p for p in layout.rglob("*") if p.is_file()):
            rel = src.relative_to(layout).as_posix()
            if rel in ("manifest.json", "build.json"):
                continue
            dest = staging / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)
            files[rel] = {"path": rel}
        finalize_manifest(staging, {**(extra or {}), "kind": "oci", "name": name or layout.name,
                                    "oci_manifest": read.manifest_digest, "files": files})
        return store.add_dir(staging, name, move=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# -- reading and validating a layout ---------------------------------------


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int

    @classmethod
    def parse(cls, data: Any, where: str) -> Descriptor:
        if not isinstance(data, dict):
            raise ImageError(f"{where}: a descriptor must be a JSON object")
        digest, size = data.get("digest"), data.get("size")
        if not isinstance(digest, str) or not digest.startswith("sha256:") or len(digest) != 71:
            raise ImageError(f"{where}: digest {digest!r} is not sha256:<64 hex>")
        if not isinstance(size, int) or size < 0:
            raise ImageError(f"{where}: size {size!r} is not a byte count")
        return cls(str(data.get("mediaType", "")), digest, size)


@dataclass(frozen=True)
class Layout:
    """A validated OCI image layout: which manifest was chosen, its config and layers."""

    path: Path
    manifest_digest: str
    config: ImageConfig
    layers: tuple[Descriptor, ...]
    diff_ids: tuple[str, ...]

    def blob(self, digest: str) -> Path:
        return _blob_path(self.path, digest)


def _blob_path(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.removeprefix("sha256:")


def _read_blob(layout: Path, desc: Descriptor, what: str) -> bytes:
    path = _blob_path(layout, desc.digest)
    if not path.is_file():
        raise ImageError(f"{layout}: the {what} blob {desc.digest} is missing from blobs/sha256/")
    data = path.read_bytes()
    if len(data) != desc.size or "sha256:" + hashlib.sha256(data).hexdigest() != desc.digest:
        raise ImageError(f"{layout}: the {what} blob {desc.digest} is damaged (size or sha256 differ)")
    return data


def _read_json(data: bytes, where: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ImageError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ImageError(f"{where}: expected a JSON object")
    return value


def _pick(manifests: list[Any], where: str, ref_name: str | None) -> Descriptor:
    if not isinstance(manifests, list) or not manifests:
        raise ImageError(f"{where}: 'manifests' is empty; the layout holds no image")
    if ref_name is not None:
        named = [m for m in manifests if isinstance(m, dict)
                 and (m.get("annotations") or {}).get(REF_NAME) == ref_name]
        if not named:
            names = sorted({str((m.get("annotations") or {}).get(REF_NAME)) for m in manifests if isinstance(m, dict)})
            raise ImageError(f"{where}: no image named {ref_name!r} (names: {', '.join(names)})")
        manifests = named
    ours = [m for m in manifests if isinstance(m, dict)
            and (m.get("platform") or {}).get("os", "linux") == "linux"
            and (m.get("platform") or {}).get("architecture", "amd64") == "amd64"]
    if not ours:
        raise ImageError(f"{where}: no linux/amd64 image among {len(manifests)} manifests")
    return Descriptor.parse(ours[0], where)


def read_layout(path: Path, ref_name: str | None = None) -> Layout:
    """Validate the layout directory at ``path`` and return its (linux/amd64) image.

    Checks what can be checked without unpacking: the marker file, index and
    manifest JSON, and the digests of the manifest and config blobs. Layer
    digests are checked while unpacking (:func:`unpack_layers`).
    """
    marker = path / "oci-layout"
    if not path.is_dir():
        raise ImageError(f"{path}: no such OCI image layout directory")
    if not marker.is_file():
        raise ImageError(
            f"{path} is not an OCI image layout: 'oci-layout' is missing (a layout holds oci-layout, "
            "index.json and blobs/sha256/; 'skopeo copy docker://IMAGE oci:DIR' or 'docker save' make one)"
        )
    version = _read_json(marker.read_bytes(), str(marker)).get("imageLayoutVersion")
    if not isinstance(version, str) or not version.startswith("1."):
        raise ImageError(f"{marker}: imageLayoutVersion {version!r} is not supported (want 1.x)")
    index_path = path / "index.json"
    if not index_path.is_file():
        raise ImageError(f"{path} is not an OCI image layout: 'index.json' is missing")
    index = _read_json(index_path.read_bytes(), str(index_path))
    desc = _pick(index.get("manifests", []), str(index_path), ref_name)
    for _ in range(4):  # an index may point at further indexes (multi-platform images)
        if desc.media_type not in _INDEXES:
            break
        nested = _read_json(_read_blob(path, desc, "index"), f"{path}: index {desc.digest}")
        desc = _pick(nested.get("manifests", []), f"{path}: index {desc.digest}", None)
    where = f"{path}: manifest {desc.digest}"
    manifest = _read_json(_read_blob(path, desc, "manifest"), where)
    media_type = manifest.get("mediaType", desc.media_type or MT_MANIFEST)
    if media_type not in _MANIFESTS:
        raise ImageError(f"{where}: media type {media_type!r} is not an image manifest")
    if manifest.get("schemaVersion") != 2:
        raise ImageError(f"{where}: schemaVersion {manifest.get('schemaVersion')!r} is not 2")
    config_desc = Descriptor.parse(manifest.get("config"), f"{where}: config")
    if config_desc.media_type not in (MT_CONFIG, MT_DOCKER_CONFIG, ""):
        raise ImageError(f"{where}: config media type {config_desc.media_type!r} is not an image config")
    config = _read_json(_read_blob(path, config_desc, "config"), f"{path}: config {config_desc.digest}")
    if config.get("os", "linux") != "linux" or config.get("architecture", "amd64") != "amd64":
        raise ImageError(f"{path}: the image is for {config.get('os')}/{config.get('architecture')}, "
                         "this host runs linux/amd64")
    layers = tuple(Descriptor.parse(d, f"{where}: layer {i}") for i, d in enumerate(manifest.get("layers") or []))
    for i, layer in enumerate(layers):
        if layer.media_type not in _GZIP_LAYERS | _PLAIN_LAYERS:
            raise ImageError(f"{where}: layer {i} has media type {layer.media_type!r}; only tar and "
                             "tar+gzip layers are supported (re-export the image with gzip layers)")
        if not _blob_path(path, layer.digest).is_file():
            raise ImageError(f"{path}: layer {i} blob {layer.digest} is missing from blobs/sha256/")
    diff_ids = tuple(str(d) for d in (config.get("rootfs") or {}).get("diff_ids") or ())
    if len(diff_ids) != len(layers):
        raise ImageError(f"{path}: the config lists {len(diff_ids)} diff_ids for {len(layers)} layers")
    return Layout(path, desc.digest, ImageConfig.from_oci(config.get("config") or {}), layers, diff_ids)


@contextlib.contextmanager
def opened_layout(path: Path) -> Iterator[Path]:
    """A layout directory for ``path``, which may also be a ``.tar`` of one (unpacked to a temp dir)."""
    if path.is_dir():
        yield path
        return
    if not path.is_file():
        raise ImageError(f"{path}: no such OCI image layout (a directory or a .tar of one)")
    if not tarfile.is_tarfile(path):
        raise ImageError(f"{path} is neither an OCI layout directory nor a tar archive of one")
    with tempfile.TemporaryDirectory(prefix="uniframe-oci-") as tmp, tarfile.open(path) as tar:
        for member in tar:
            name = _clean_name(member.name, str(path))
            if not name:
                continue
            if member.isdir():
                (Path(tmp) / name).mkdir(parents=True, exist_ok=True)
            elif member.isreg():
                dest = Path(tmp) / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(member)
                assert src is not None
                with src, dest.open("wb") as fh:
                    shutil.copyfileobj(src, fh)
        yield Path(tmp)


def load_layout(path: Path, rootfs: Path, ref_name: str | None = None) -> Layout:
    """Validate the layout (directory or ``.tar``) at ``path`` and unpack its layers into ``rootfs``."""
    with opened_layout(path) as directory:
        layout = read_layout(directory, ref_name)
        unpack_layers(layout, rootfs)
        return Layout(path, layout.manifest_digest, layout.config, layout.layers, layout.diff_ids)


# -- unpacking layers --------------------------------------------------------


def _clean_name(name: str, where: str) -> str:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ImageError(f"{where}: entry {name!r} climbs out of the root with '..'; the image is unsafe")
    return "/".join(parts)


def _resolve(root: Path, rel: str, *, create: bool) -> Path:
    """``rel`` inside ``root`` with every symlink followed as if ``root`` were ``/``."""
    current = root
    pending = [p for p in rel.split("/") if p not in ("", ".")]
    hops = 0
    while pending:
        part = pending.pop(0)
        if part == "..":
            current = current.parent if current != root else root
            continue
        candidate = current / part
        if candidate.is_symlink():
            hops += 1
            if hops > 40:
                raise ImageError(f"too many symlinks while resolving {rel!r} in {root}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                current = root
            pending = [p for p in target.split("/") if p not in ("", ".")] + pending
            continue
        if not candidate.exists() and create:
            candidate.mkdir(mode=0o755)
        current = candidate
    return current


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def _hide_lower(directory: Path, rel: str, created: set[str]) -> None:
    """Apply an opaque whiteout: drop what lower layers put under ``directory``."""
    if not directory.is_dir():
        return
    for child in list(directory.iterdir()):
        child_rel = f"{rel}/{child.name}" if rel else child.name
        if child_rel not in created:
            _remove(child)
        elif child.is_dir() and not child.is_symlink():
            _hide_lower(child, child_rel, created)


def _apply_attrs(path: Path, member: tarfile.TarInfo, is_root: bool) -> None:
    if is_root:
        os.lchown(path, member.uid, member.gid)
    if not member.issym():
        os.chmod(path, member.mode & 0o7777)  # after chown, which clears setuid bits
    with contextlib.suppress(OSError):
        os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)


class _Resolver:
    """:func:`_resolve` with a memory of directories, forgotten whenever links or removals could change it.

    Resolving walks every component with an ``lstat``; a Debian layer has
    thousands of entries in the same few directories, so remembering them
    makes unpacking several times faster.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.known: dict[str, Path] = {}

    def dir(self, rel: str, *, create: bool) -> Path:
        hit = self.known.get(rel)
        if hit is not None:
            return hit
        path = _resolve(self.root, rel, create=create)
        if path.is_dir() and not path.is_symlink():
            self.known[rel] = path
        return path

    def forget(self) -> None:
        self.known.clear()


def _extract_member(tar: tarfile.TarFile, member: tarfile.TarInfo, resolver: _Resolver, name: str,
                    is_root: bool) -> None:
    parent_rel, _, base = name.rpartition("/")
    target = resolver.dir(parent_rel, create=True) / base
    existing_dir = target.is_dir() and not target.is_symlink()
    if member.isdir():
        if os.path.lexists(target) and not existing_dir:
            target.unlink()
            resolver.forget()
        if not existing_dir:
            target.mkdir(mode=0o700)
        _apply_attrs(target, member, is_root)
        return
    if os.path.lexists(target):
        _remove(target)
        resolver.forget()
    if member.isreg():
        src = tar.extractfile(member)
        assert src is not None
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with src, os.fdopen(fd, "wb") as fh:
            shutil.copyfileobj(src, fh, 1 << 20)
    elif member.issym():
        os.symlink(member.linkname, target)
        resolver.forget()
    elif member.islnk():
        link_name = _clean_name(member.linkname, name)
        lparent, _, lbase = link_name.rpartition("/")
        source = resolver.dir(lparent, create=False) / lbase
        if not os.path.lexists(source):
            raise ImageError(f"layer entry {name!r} is a hard link to {member.linkname!r}, which is missing")
        os.link(source, target, follow_symlinks=False)
        return
    elif member.isfifo():
        os.mkfifo(target)
    elif member.ischr() or member.isblk():
        if not is_root:
            return
        kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
        os.mknod(target, kind | 0o600, os.makedev(member.devmajor, member.devminor))
    else:
        return
    _apply_attrs(target, member, is_root)


def _apply_layer(stream: IO[bytes], root: Path, where: str) -> None:
    is_root = os.geteuid() == 0
    resolver = _Resolver(root)
    created: set[str] = set()
    dirs: list[tuple[Path, tarfile.TarInfo]] = []
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            name = _clean_name(member.name, where)
            if not name:
                continue
            parent_rel, _, base = name.rpartition("/")
            if base == OPAQUE:
                _hide_lower(resolver.dir(parent_rel, create=True), parent_rel, created)
                resolver.forget()
                continue
            if base.startswith(WHITEOUT):
                victim = resolver.dir(parent_rel, create=False) / base[len(WHITEOUT):]
                if os.path.lexists(victim):
                    _remove(victim)
                    resolver.forget()
                continue
            _extract_member(tar, member, resolver, name, is_root)
            created.add(name)
            if member.isdir():
                dirs.append((resolver.dir(name, create=False), member))
    for path, member in reversed(dirs):  # directory mtimes last: filling them changed them
        with contextlib.suppress(OSError):
            os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)


def unpack_layers(layout: Layout, rootfs: Path) -> None:
    """Apply the layout's layers in order into ``rootfs`` (created; must be empty), checking digests."""
    if rootfs.exists() and any(rootfs.iterdir()):
        raise BuildError(f"cannot unpack an image into {rootfs}: the directory is not empty")
    rootfs.mkdir(parents=True, exist_ok=True)
    os.chmod(rootfs, 0o755)
    for i, (layer, diff_id) in enumerate(zip(layout.layers, layout.diff_ids, strict=True)):
        where = f"{layout.path}: layer {i} ({layer.digest})"
        with layout.blob(layer.digest).open("rb") as raw_file:
            raw = _HashingReader(raw_file)
            buffered = io.BufferedReader(raw, 1 << 20)
            decompressed: IO[bytes] = (gzip.GzipFile(fileobj=buffered, mode="rb")  # type: ignore[assignment]
                                       if layer.media_type in _GZIP_LAYERS else buffered)
            diff = _HashingReader(decompressed)
            try:
                _apply_layer(io.BufferedReader(diff, 1 << 20), rootfs, where)
                diff.drain()
                raw.drain()
            except (tarfile.TarError, EOFError, gzip.BadGzipFile, OSError) as exc:
                raise ImageError(f"{where}: cannot unpack: {exc}") from None
        if "sha256:" + raw.sha.hexdigest() != layer.digest:
            raise ImageError(f"{where}: the blob's sha256 does not match its digest; the layer is damaged")
        if "sha256:" + diff.sha.hexdigest() != diff_id:
            raise ImageError(f"{where}: the unpacked layer does not match diff_id {diff_id}; the image is damaged")
