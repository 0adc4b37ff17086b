"""The content-addressed local image store.

An image is a directory: ``manifest.json`` plus the files it names (for a
unikernel ``kernel``, ``initrd`` and ``cmdline``). Its digest is the sha256 of
the manifest's canonical JSON, and the manifest records the sha256 of every
file, so the digest covers all bytes of the image and two builds of the same
inputs give the same digest. Facts that differ between identical builds (when,
how long) live in ``build.json``, outside the digest.

Layout under ``<data>/images``: ``sha256-<hex>/`` per image and ``tags.json``
mapping ``name:tag`` to digests. Writes go to a temporary directory first and
are renamed into place, so a crash never leaves half an image.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uniframe.errors import ImageError
from uniframe.paths import data_dir

MANIFEST = "manifest.json"
BUILD_INFO = "build.json"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def manifest_digest(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return "sha256:" + hashlib.sha256(canonical_json(body)).hexdigest()


@dataclass(frozen=True)
class Image:
    """An image on disk; ``digest`` is ``sha256:<hex>``."""

    dir: Path
    digest: str
    manifest: dict[str, Any]
    names: tuple[str, ...] = field(default=())

    @property
    def kind(self) -> str:
        return str(self.manifest.get("kind", "unikernel"))

    def file(self, role: str) -> Path:
        files = self.manifest.get("files", {})
        entry = files.get(role)
        if entry is None:
            raise ImageError(f"image {self.short} has no {role} (it is a {self.kind} image)")
        return self.dir / str(entry["path"])

    @property
    def kernel(self) -> Path:
        return self.file("kernel")

    @property
    def initrd(self) -> Path:
        return self.file("initrd")

    @property
    def cmdline(self) -> str:
        return str(self.manifest.get("cmdline", ""))

    @property
    def short(self) -> str:
        return self.digest.removeprefix("sha256:")[:12]

    @property
    def build_info(self) -> dict[str, Any]:
        path = self.dir / BUILD_INFO
        if not path.is_file():
            return {}
        data: dict[str, Any] = json.loads(path.read_text())
        return data

    def size_bytes(self) -> int:
        return sum(int(f.get("size", 0)) for f in self.manifest.get("files", {}).values())


def finalize_manifest(image_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Record size and sha256 of every file in ``manifest['files']`` and set the digest."""
    files = manifest.setdefault("files", {})
    for role, entry in files.items():
        path = image_dir / entry["path"]
        if not path.is_file():
            raise ImageError(f"{image_dir}: manifest names {role} file {entry['path']}, which is missing")
        entry["size"] = path.stat().st_size
        entry["sha256"] = file_sha256(path)
    manifest["digest"] = manifest_digest(manifest)
    (image_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def load_image_dir(path: Path, *, verify: bool = False) -> Image:
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise ImageError(f"{path}: not an image directory (no {MANIFEST})")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as exc:
        raise ImageError(f"{mpath}: damaged manifest: {exc}") from None
    digest = manifest_digest(manifest)
    if manifest.get("digest") != digest:
        raise ImageError(f"{mpath}: digest does not match the manifest; rebuild the image")
    if verify:
        for role, entry in manifest.get("files", {}).items():
            fpath = path / entry["path"]
            if not fpath.is_file() or file_sha256(fpath) != entry.get("sha256"):
                raise ImageError(f"{path}: {role} file {entry['path']} is missing or damaged")
    return Image(path, digest, manifest)


class ImageStore:
    """Images by digest, with human names (``name:tag``) on top."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or data_dir() / "images"

    def _tags_path(self) -> Path:
        return self.root / "tags.json"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".lock").open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _tags(self) -> dict[str, str]:
        path = self._tags_path()
        if not path.is_file():
            return {}
        data: dict[str, str] = json.loads(path.read_text())
        return data

    def _write_tags(self, tags: dict[str, str]) -> None:
        tmp = self._tags_path().with_suffix(".tmp")
        tmp.write_text(json.dumps(tags, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self._tags_path())

    @staticmethod
    def _norm_name(name: str) -> str:
        return name if ":" in name else f"{name}:latest"

    def _dir_for(self, digest: str) -> Path:
        return self.root / digest.replace(":", "-")

    def staging_dir(self) -> Path:
        """A fresh directory inside the store's file system, for building an image in."""
        self.root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".build-", dir=self.root))

    def add_dir(self, src: Path, name: str | None = None, *, move: bool = False) -> Image:
        """Store the image in ``src`` (manifest already finalized) and tag it ``name``."""
        image = load_image_dir(src, verify=True)
        with self._locked():
            dest = self._dir_for(image.digest)
            if not dest.exists():
                tmp = Path(tempfile.mkdtemp(prefix=".add-", dir=self.root))
                tmp.rmdir()
                if move:
                    shutil.move(str(src), tmp)
                else:
                    shutil.copytree(src, tmp, symlinks=True)
                os.replace(tmp, dest)
            elif move:
                shutil.rmtree(src, ignore_errors=True)
            if name:
                tags = self._tags()
                tags[self._norm_name(name)] = image.digest
                self._write_tags(tags)
        return self._with_names(load_image_dir(dest))

    def _with_names(self, image: Image) -> Image:
        names = tuple(sorted(n for n, d in self._tags().items() if d == image.digest))
        return Image(image.dir, image.digest, image.manifest, names)

    def list(self) -> list[Image]:
        if not self.root.is_dir():
            return []
        out = []
        for d in sorted(self.root.glob("sha256-*")):
            try:
                out.append(self._with_names(load_image_dir(d)))
            except ImageError:
                continue
        return out

    def resolve(self, ref: str) -> Image:
        """An image by directory path, ``name[:tag]``, or (a unique prefix of) its digest."""
        path = Path(ref)
        if (path / MANIFEST).is_file():
            return load_image_dir(path)
        tags = self._tags()
        digest = tags.get(self._norm_name(ref))
        if digest is not None:
            d = self._dir_for(digest)
            if d.is_dir():
                return self._with_names(load_image_dir(d))
        hexpart = ref.removeprefix("sha256:").removeprefix("sha256-")
        if len(hexpart) >= 4 and all(c in "0123456789abcdef" for c in hexpart):
            hits = [d for d in self.root.glob(f"sha256-{hexpart}*") if d.is_dir()] if self.root.is_dir() else []
            if len(hits) == 1:
                return self._with_names(load_image_dir(hits[0]))
            if len(hits) > 1:
                raise ImageError(f"image reference {ref!r} is ambiguous: give more digest characters")
        known = ", ".join(sorted(tags)) or "none"
        raise ImageError(
            f"no image {ref!r} in {self.root} (images: {known}); build one with "
            "'uniframe build SPEC' or list them with 'uniframe images'"
        )

    def remove(self, ref: str) -> Image:
        image = self.resolve(ref)
        if image.dir.parent != self.root:
            raise ImageError(f"{ref} is a directory outside the store; remove it yourself")
        with self._locked():
            tags = {n: d for n, d in self._tags().items() if d != image.digest}
            self._write_tags(tags)
            shutil.rmtree(image.dir)
        return image
