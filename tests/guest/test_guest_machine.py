"""Machine setup: mounts, loopback, hostname, entropy probe, subreaper."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
from guest_support import SRC, in_namespaces

from uniframe.guest import entropy, libc, mounts
from uniframe.guest.mounts import Mount, mount_all


class FakeMount:
    def __init__(self, fail: dict[str, int] | None = None) -> None:
        self.calls: list[tuple[str, str, str, int, str]] = []
        self.fail = fail or {}

    def __call__(self, source: str, target: str, fstype: str, flags: int, data: str) -> None:
        self.calls.append((source, target, fstype, flags, data))
        if fstype in self.fail:
            raise OSError(self.fail[fstype], os.strerror(self.fail[fstype]), target)


def test_mount_plan_on_a_bare_root(tmp_path: Path) -> None:
    # What the initramfs looks like: /dev holds the bootstrap nodes (here a file),
    # /tmp exists empty, the rest is missing.
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev/console").write_text("")
    (tmp_path / "tmp").mkdir()
    fake = FakeMount()
    results = mount_all(root=str(tmp_path), mount=fake)
    assert [(r.target, r.outcome) for r in results] == [
        ("/proc", "mounted"), ("/sys", "mounted"), ("/dev", "mounted"), ("/dev/shm", "mounted"),
        ("/tmp", "mounted"), ("/run", "mounted")]
    assert [(c[1], c[2], c[4]) for c in fake.calls] == [
        (f"{tmp_path}/proc", "proc", ""), (f"{tmp_path}/sys", "sysfs", ""),
        (f"{tmp_path}/dev", "devtmpfs", "mode=0755"), (f"{tmp_path}/dev/shm", "tmpfs", "mode=1777"),
        (f"{tmp_path}/tmp", "tmpfs", "mode=1777"), (f"{tmp_path}/run", "tmpfs", "mode=0755")]
    assert fake.calls[0][3] == libc.MS_NOSUID | libc.MS_NODEV | libc.MS_NOEXEC
    assert all((tmp_path / d).is_dir() for d in ("proc", "sys", "dev/shm", "run"))


def test_mount_tolerates_what_is_already_there(tmp_path: Path) -> None:
    (tmp_path / "tmp").mkdir()
    (tmp_path / "tmp/keep").write_text("shipped by the image")
    fake = FakeMount(fail={"sysfs": errno.EBUSY, "proc": errno.ENODEV})
    table = [Mount("/proc", "proc"), Mount("/sys", "sysfs"), Mount("/tmp", "tmpfs")]
    results = mount_all(table, root=str(tmp_path), mount=fake)
    assert [r.outcome for r in results] == [mounts.UNSUPPORTED, mounts.ALREADY, mounts.NOT_EMPTY]
    assert [c[2] for c in fake.calls] == ["proc", "sysfs"]
    # A mount point (the host's own /proc) is not even tried.
    assert mount_all([Mount("/proc", "proc")], root="/", mount=fake)[0].outcome == mounts.ALREADY
    assert len(fake.calls) == 2


def test_a_missing_mount_point_on_a_read_only_root_is_skipped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def read_only(path: str, mode: int = 0o777, exist_ok: bool = False) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)

    (tmp_path / "proc").mkdir()
    monkeypatch.setattr(mounts.os, "makedirs", read_only)
    fake = FakeMount()
    results = mount_all([Mount("/proc", "proc"), Mount("/run", "tmpfs")], root=str(tmp_path),
                        mount=fake)
    assert [r.outcome for r in results] == [mounts.MOUNTED, mounts.NO_MOUNT_POINT]
    assert [c[2] for c in fake.calls] == ["proc"]


def test_other_mount_failures_raise(tmp_path: Path) -> None:
    with pytest.raises(PermissionError):
        mount_all([Mount("/proc", "proc")], root=str(tmp_path), mount=FakeMount({"proc": errno.EPERM}))


@pytest.mark.root
def test_real_mounts_in_a_mount_namespace(tmp_path: Path) -> None:
    code = f"""
from uniframe.guest.mounts import mount_all
for r in mount_all(root={str(tmp_path)!r}):
    print(r.target, r.fstype, r.outcome)
for r in mount_all(root={str(tmp_path)!r}):
    print("again", r.target, r.outcome)
print(open('/proc/self/mountinfo').read())
"""
    proc = in_namespaces(["--mount", "--propagation", "private"], code)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:6] == ["/proc proc mounted", "/sys sysfs mounted", "/dev devtmpfs mounted",
                         "/dev/shm tmpfs mounted", "/tmp tmpfs mounted", "/run tmpfs mounted"]
    assert all(line.endswith("already mounted") for line in lines[6:12])
    info = "\n".join(lines[12:])
    for target, fstype in [("proc", "proc"), ("sys", "sysfs"), ("dev", "devtmpfs"),
                           ("dev/shm", "tmpfs"), ("tmp", "tmpfs"), ("run", "tmpfs")]:
        assert f" {tmp_path}/{target} " in info and f" - {fstype} " in info
    # Nothing leaked out of the namespace.
    assert not os.path.ismount(tmp_path / "proc")


@pytest.mark.root
def test_loopback_up_and_hostname_in_fresh_namespaces() -> None:
    code = """
import socket
from uniframe.guest import net
print(net.interface_is_up("lo"))
print(net.interface_up("lo"), net.interface_up("lo"), net.interface_is_up("lo"))
with socket.create_server(("127.0.0.1", 0)) as srv:
    socket.create_connection(srv.getsockname(), timeout=5).close()
net.set_hostname("guest-7")
print(socket.gethostname())
try:
    net.interface_up("nosuch0")
except OSError as exc:
    print("nosuch0", exc.strerror)
"""
    before = os.uname().nodename
    proc = in_namespaces(["--net", "--uts"], code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["False", "True False True", "guest-7", "nosuch0 No such device"]
    assert os.uname().nodename == before


def test_entropy_probe() -> None:
    assert entropy.crng_ready()  # a host that has been up a while

    def not_ready(n: int, flags: int) -> bytes:
        assert flags & os.GRND_NONBLOCK, "the probe must never block"
        raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")

    assert not entropy.crng_ready(not_ready)
    assert "random.trust_cpu=on" in entropy.ADVICE and "virtio-rng" in entropy.ADVICE


def test_child_subreaper_adopts_orphans() -> None:
    code = """
import os, subprocess, sys, time
from uniframe.guest import libc
libc.set_child_subreaper()
child = "import subprocess, sys; print(subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(5)']).pid)"
pid = int(subprocess.run([sys.executable, '-c', child], capture_output=True, text=True).stdout)
stat = open(f'/proc/{pid}/stat').read()
print(int(stat[stat.rindex(')') + 2:].split()[1]) == os.getpid())
os.kill(pid, 9)
print(os.waitpid(pid, 0)[0] == pid)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(SRC)})
    assert proc.stdout.split() == ["True", "True"], proc.stderr
