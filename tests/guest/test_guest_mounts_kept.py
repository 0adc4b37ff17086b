"""Scratch tmpfs mounts over a directory the image ships files in: mounted, the files kept.

The image keeps host paths, so an app installed under ``/tmp`` on the build
host (a CI checkout in ``/tmp/ci``, a virtual environment in ``/tmp``) lives
under ``/tmp`` in the image too. The init used to leave such a ``/tmp``
unmounted ("skipped: directory not empty"), so on a read-only squashfs root
the app had no scratch space. Now the tmpfs goes on and the shipped entries
are bound back in on top of it, read-only as the root they come from.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from guest_support import in_namespaces

from uniframe.guest import libc, mounts
from uniframe.guest.mounts import STANDARD_MOUNTS, Mount, mount_all


class FakeMount:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str, int, str]] = []

    def __call__(self, source: str, target: str, fstype: str, flags: int, data: str) -> None:
        self.calls.append((source, target, fstype, flags, data))


def _ship(root: Path) -> None:
    """What an image built from a checkout in /tmp/ci holds under /tmp."""
    (root / "tmp/ci/src/app").mkdir(parents=True)
    (root / "tmp/ci/src/app/__init__.py").write_text("shipped = True\n")
    (root / "tmp/notes.txt").write_text("a shipped file\n")
    (root / "tmp/src").symlink_to("ci/src")


def test_the_standard_scratch_mounts_keep_shipped_files() -> None:
    keeping = {m.target for m in STANDARD_MOUNTS if m.keep_files}
    assert keeping == {"/dev/shm", "/tmp", "/run"}
    assert all(m.fstype == "tmpfs" for m in STANDARD_MOUNTS if m.keep_files)


def test_a_tmpfs_goes_over_shipped_files_and_binds_them_back(tmp_path: Path) -> None:
    _ship(tmp_path)
    fake = FakeMount()
    (result,) = mount_all([Mount("/tmp", "tmpfs", data="mode=1777", keep_files=True)],
                          root=str(tmp_path), mount=fake)
    assert result.outcome == mounts.KEPT and result.kept == ("ci", "notes.txt", "src")
    tmp = f"{tmp_path}/tmp"
    assert fake.calls[0] == ("tmpfs", tmp, "tmpfs", libc.MS_NOSUID | libc.MS_NODEV, "mode=1777")
    binds = [(c[1], c[2], c[3]) for c in fake.calls[1:]]
    # directories and files are bind mounts of what the tmpfs covers; a symlink is made again
    assert binds == [(f"{tmp}/ci", "", libc.MS_BIND | libc.MS_REC),
                     (f"{tmp}/notes.txt", "", libc.MS_BIND | libc.MS_REC)]
    assert all(c[0].startswith("/proc/self/fd/") for c in fake.calls[1:])


def test_without_keep_files_a_shipped_directory_is_still_skipped(tmp_path: Path) -> None:
    _ship(tmp_path)
    fake = FakeMount()
    (result,) = mount_all([Mount("/tmp", "tmpfs")], root=str(tmp_path), mount=fake)
    assert result.outcome == mounts.NOT_EMPTY and fake.calls == []


def test_real_mounts_over_a_read_only_root_with_files_in_tmp(tmp_path: Path) -> None:
    # The image's root as the guest sees it: read-only (a bind mount remounted ro
    # stands in for the squashfs), the app's files under /tmp.
    root = tmp_path / "root"
    _ship(root)
    for d in ("proc", "sys", "dev", "run"):  # the image's other mount points (MOUNT_POINTS)
        (root / d).mkdir()
    code = f"""
import json, os
from uniframe.guest import libc
from uniframe.guest.mounts import mount_all
root = {str(root)!r}
libc.mount(root, root, "", libc.MS_BIND, "")
libc.mount("", root, "", libc.MS_BIND | libc.MS_REMOUNT | libc.MS_RDONLY, "")
results = {{r.target: [r.outcome, list(r.kept)] for r in mount_all(root=root)}}
tmp = os.path.join(root, "tmp")
with open(os.path.join(tmp, "scratch"), "w") as f:
    f.write("written at run time")
try:
    open(os.path.join(tmp, "ci/new"), "w")
    shipped_writable = True
except OSError:
    shipped_writable = False
print(json.dumps({{
    "results": results,
    "tmp": sorted(os.listdir(tmp)),
    "module": open(os.path.join(tmp, "src/app/__init__.py")).read(),
    "notes": open(os.path.join(tmp, "notes.txt")).read(),
    "shipped_writable": shipped_writable,
    "mounts": [line.split()[4] for line in open("/proc/self/mountinfo")],
}}))
"""
    proc = in_namespaces(["--mount", "--propagation", "private"], code)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["results"]["/tmp"] == [mounts.KEPT, ["ci", "notes.txt", "src"]]
    assert out["results"]["/run"] == [mounts.MOUNTED, []]
    assert out["tmp"] == ["ci", "notes.txt", "scratch", "src"]
    assert out["module"] == "shipped = True\n" and out["notes"] == "a shipped file\n"
    assert out["shipped_writable"] is False
    assert f"{root}/tmp" in out["mounts"] and f"{root}/tmp/ci" in out["mounts"]
    # nothing leaked out of the namespace, nothing was written into the image
    assert not os.path.ismount(root / "tmp")
    assert sorted(os.listdir(root / "tmp")) == ["ci", "notes.txt", "src"]
