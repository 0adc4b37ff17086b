"""Files clients upload for their specs, kept by content in the daemon's data directory.

A client never makes the daemon open a path of its choosing: it uploads the
file a spec names (``uniframe apply`` does this on its own) and the spec then
names the upload, ``<data>/uploads/<sha256>/<name>``, a path the daemon
itself made and the only one it reads without an operator's
``--allow-path``. Uploads are keyed by content, so applying the same spec
again sends nothing, and a changed file is a new path (and so a new
revision).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from uniframe.errors import SpecError
from uniframe.paths import data_dir

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class UploadError(SpecError):
    """An upload's name or digest is not acceptable (the message says which)."""


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name) or ".." in name:
        raise UploadError(f"upload name {name!r}: use a plain file name (letters, digits, '.', "
                          "'_', '-'; no directories), e.g. model.onnx")
    return name


def check_sha256(value: str) -> str:
    if not _SHA256.fullmatch(value):
        raise UploadError(f"sha256 {value!r}: give 64 lowercase hex digits")
    return value


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class Uploads:
    """The upload directory: add a received file, find one by digest and name."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or data_dir() / "uploads"

    def path(self, sha256: str, name: str) -> Path:
        return self.root / check_sha256(sha256) / check_name(name)

    def find(self, sha256: str, name: str) -> Path | None:
        path = self.path(sha256, name)
        return path if path.is_file() else None

    def add(self, received: Path, name: str, expected: str | None = None) -> tuple[Path, bool]:
        """Keep ``received`` (a file the daemon wrote) under its digest; True if it was new.

        ``expected`` is the digest the client computed: a mismatch means the
        body was damaged or cut, and nothing is kept.
        """
        check_name(name)
        actual = file_sha256(received)
        if expected is not None and check_sha256(expected) != actual:
            raise UploadError(f"the upload's sha256 is {actual}, not {expected} as announced; "
                              "the file changed while it was sent, or the body was cut")
        final = self.path(actual, name)
        if final.is_file():
            return final, False
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=self.root))
        try:
            shutil.move(str(received), staging / name)
            os.chmod(staging / name, 0o444)
            final.parent.mkdir(exist_ok=True)
            try:
                os.rename(staging / name, final)
            except OSError:
                if not final.is_file():  # a concurrent upload of the same bytes won otherwise
                    raise
        finally:
            with contextlib.suppress(OSError):
                shutil.rmtree(staging)
        return final, True
