"""The microVM snapshot's pure parts: the argv it keys on, the facts, the store, the RAM copy,
the idle check and the CLI over the store. No guest boots here (test_qemu_snapshot.py does)."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from uniframe.cli.app import app
from uniframe.cli.main import main  # noqa: F401  (registers every command on app)
from uniframe.errors import RuntimeDriverError
from uniframe.runtime.qemu.driver import QemuMicroVMDriver
from uniframe.runtime.qemu.microvm import GuestMemory, MicroVM, console_chardev, user_netdev
from uniframe.runtime.qemu.snapshot import (
    SnapshotNotFoundError,
    SnapshotStore,
    StoredSnapshot,
    differences,
    facts_key,
    normalise_argv,
    snapshot_facts,
    snapshot_store,
)
from uniframe.runtime.qemu.snapshot_io import copy_sparse, open_connections
from uniframe.runtime.qemu.vm.machine import FullVM
from uniframe.runtime.replica import ImageRef, ReplicaConfig
from uniframe.runtime.snapshot import Snapshot, SnapshotMismatchError


@pytest.fixture
def image(tmp_path: Path) -> ImageRef:
    d = tmp_path / "img"
    d.mkdir()
    (d / "kernel").write_bytes(b"kernel one")
    (d / "root.squashfs").write_bytes(b"root")
    return ImageRef("iris", "sha256:aaa", d / "kernel", Path(), "console=ttyS0", disk=d / "root.squashfs")


@pytest.fixture
def qemu(tmp_path: Path) -> Path:
    """A stand-in binary: snapshot_facts runs ``--version`` and hashes the file."""
    path = tmp_path / "qemu-system-x86_64"
    path.write_text("#!/bin/sh\necho 'QEMU emulator version 7.2.22 (test)'\n")
    path.chmod(0o755)
    return path


def _argv(qemu: Path, image: ImageRef, directory: Path, *, port: int, memory: GuestMemory,
          incoming: bool = False, memory_mib: int = 256, cpus: int = 1) -> list[str]:
    vm = MicroVM(qemu=str(qemu), kernel=image.kernel, disk=image.disk, cmdline=image.cmdline,
                 cpus=cpus, memory_mib=memory_mib, netdev=(user_netdev([("127.0.0.1", port, 8080)]),),
                 serial=console_chardev(directory / "console.sock", directory / "console.log"),
                 qmp_socket=directory / "qmp.sock", memory=memory, incoming=incoming)
    return vm.argv()


def test_file_backed_ram_drops_free_page_reporting_and_restore_waits_for_its_state(tmp_path: Path) -> None:
    plain = MicroVM(qemu="q", kernel=tmp_path / "k", cmdline="").argv()
    assert "virtio-balloon-device,free-page-reporting=on" in plain and "-object" not in plain
    argv = MicroVM(qemu="q", kernel=tmp_path / "k", cmdline="", memory_mib=128,
                   memory=GuestMemory(tmp_path / "ram,x", shared=False), incoming=True).argv()
    assert not any("balloon" in w for w in argv)
    assert argv[argv.index("-M") + 1].endswith(",memory-backend=ram")
    assert argv[argv.index("-object") + 1] == (
        f"memory-backend-file,id=ram,size=128M,mem-path={tmp_path}/ram,,x,share=off")
    assert argv[argv.index("-m") + 1] == "128M"
    assert argv[-2:] == ["-incoming", "defer"]


def test_a_full_vm_with_file_backed_ram_and_incoming(tmp_path: Path) -> None:
    argv = FullVM(qemu="q", disk=tmp_path / "disk.qcow2", memory_mib=512,
                  memory=GuestMemory(tmp_path / "ram"), incoming=True).argv()
    assert argv[argv.index("-M") + 1] == "q35,memory-backend=ram"
    assert f"memory-backend-file,id=ram,size=512M,mem-path={tmp_path}/ram,share=on" in argv
    assert argv[-2:] == ["-incoming", "defer"]
    plain = FullVM(qemu="q", disk=tmp_path / "disk.qcow2").argv()
    assert plain[plain.index("-M") + 1] == "q35" and "-object" not in plain and "-incoming" not in plain


def test_template_and_clone_normalise_to_the_same_argv(tmp_path: Path, qemu: Path, image: ImageRef) -> None:
    source = _argv(qemu, image, tmp_path / "r1", port=8001, memory=GuestMemory(Path("/dev/shm/a.ram")))
    clone = _argv(qemu, image, tmp_path / "r2", port=9002,
                  memory=GuestMemory(tmp_path / "snap" / "ram", shared=False), incoming=True)
    a = normalise_argv(source, replica_dir=tmp_path / "r1", image=image)
    b = normalise_argv(clone, replica_dir=tmp_path / "r2", image=image)
    assert a == b
    text = " ".join(a)
    assert a[0] == "<qemu>" and "<kernel>" in a and "file=<disk>" in text
    assert "<replica>/qmp.sock" in text and "hostfwd" not in text and "-incoming" not in a
    assert "mem-path" not in text and "share=" not in text and "size=256M" in text
    bigger = _argv(qemu, image, tmp_path / "r2", port=9002, memory_mib=512,
                   memory=GuestMemory(tmp_path / "ram", shared=False))
    assert normalise_argv(bigger, replica_dir=tmp_path / "r2", image=image) != a


def test_the_key_changes_with_each_fact_and_a_refusal_names_it(tmp_path: Path, qemu: Path,
                                                               image: ImageRef) -> None:
    mem = GuestMemory(tmp_path / "ram")

    def facts(argv: list[str], accel: str = "tcg") -> dict[str, str | int | float | None]:
        return snapshot_facts(argv, replica_dir=tmp_path / "r", image=image, accel=accel, network="user")

    base = facts(_argv(qemu, image, tmp_path / "r", port=1, memory=mem))
    assert base["qemu_version"] == "QEMU emulator version 7.2.22 (test)"
    assert base["cpu"] == "max" or base["cpu"] == "default"
    assert facts_key(base) == facts_key(facts(_argv(qemu, image, tmp_path / "r", port=2, memory=mem)))
    two_cpus = facts(_argv(qemu, image, tmp_path / "r", port=1, memory=mem, cpus=2))
    assert facts_key(two_cpus) != facts_key(base)
    assert any("QEMU arguments" in d and "'2'" in d for d in differences(base, two_cpus))
    assert facts_key(facts(_argv(qemu, image, tmp_path / "r", port=1, memory=mem), "kvm")) != facts_key(base)

    image.kernel.write_bytes(b"kernel two")  # a rebuilt kernel: new content, new mtime
    os.utime(image.kernel, ns=(1, 1))
    rebuilt = facts(_argv(qemu, image, tmp_path / "r", port=1, memory=mem))
    assert facts_key(rebuilt) != facts_key(base)
    assert differences(base, rebuilt) == [
        f"kernel_sha256 ({base['kernel_sha256']} in the snapshot, {rebuilt['kernel_sha256']} here)"]

    qemu.write_text(qemu.read_text() + "# another build, same version\n")
    os.utime(qemu, ns=(2, 2))
    assert [d.split(" ")[0] for d in differences(rebuilt, facts(_argv(qemu, image, tmp_path / "r",
                                                                      port=1, memory=mem)))] == ["qemu_sha256"]


def _stored(store: SnapshotStore, snapshot_id: str, created: str = "2026-01-01T00:00:00+00:00") -> StoredSnapshot:
    directory = store.new_dir(snapshot_id)
    (directory / "state").write_bytes(b"s" * 10)
    (directory / "ram").write_bytes(b"r" * 20)
    snap = Snapshot(snapshot_id, "qemu-microvm", "r1", "sha256:aaa", created, str(directory),
                    "sha256:key", 30)
    stored = StoredSnapshot(snap, directory, {"qemu_version": "7.2", "accel": "tcg", "cpu": "max"},
                            {"pause_ms": 95.0, "save_ms": 11.0, "state_bytes": 10})
    store.save(stored)
    return stored


def test_the_store_lists_finds_by_prefix_and_removes(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "snapshots")
    assert store.list() == []
    first = _stored(store, "abc111")
    _stored(store, "abc222", created="2026-01-02T00:00:00+00:00")
    (store.root / "half-made").mkdir()  # no snapshot.json: not a snapshot
    assert [s.snapshot.id for s in store.list()] == ["abc111", "abc222"]
    assert store.get("abc1") == first
    with pytest.raises(SnapshotNotFoundError, match="ambiguous"):
        store.get("abc")
    with pytest.raises(SnapshotNotFoundError, match=r"no snapshot 'zzz'.*abc111, abc222.*snapshot ls"):
        store.get("zzz")
    assert store.remove("abc2").snapshot.id == "abc222"
    assert not (store.root / "abc222").exists() and (store.root / "abc111" / "ram").exists()


def test_copy_sparse_keeps_holes_and_content(tmp_path: Path) -> None:
    src = tmp_path / "src"
    with src.open("wb") as fh:
        fh.truncate(64 << 20)
        fh.seek(8 << 20)
        fh.write(b"A" * 4096)
        fh.seek(40 << 20)
        fh.write(b"B" * 8192)
    dst = tmp_path / "dst"
    copied = copy_sparse(src, dst)
    assert dst.read_bytes() == src.read_bytes()
    assert copied < (1 << 20) and os.stat(dst).st_blocks * 512 < (1 << 20)


def test_open_connections_counts_only_established_ones_on_the_ports() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert open_connections(os.getpid(), {port}) == 0  # listening is not a connection
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = listener.accept()
            with accepted:
                assert open_connections(os.getpid(), {port}) == 1  # the accepted end
                assert open_connections(os.getpid(), {port + 1 if port < 65535 else 1}) == 0
            client.close()


def test_restore_refuses_a_foreign_or_mismatched_snapshot_before_launching(
        tmp_path: Path, image: ImageRef, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNIFRAME_STATE", str(tmp_path / "st"))
    driver = QemuMicroVMDriver()
    config = ReplicaConfig(image=image, accel="tcg")
    foreign = Snapshot("s1", "fake", "r1", "sha256:aaa", "now", "memory:s1", "k")
    with pytest.raises(SnapshotMismatchError, match="only it can restore it"):
        driver.restore(foreign, config)
    stored = _stored(driver.snapshots, "s2")
    facts = {**driver._facts_for(config), "qemu_sha256": "sha256:another-build"}
    snap = replace(stored.snapshot, valid_for=facts_key(facts))
    driver.snapshots.save(replace(stored, snapshot=snap, facts=facts))
    with pytest.raises(SnapshotMismatchError,
                       match=r"not valid for this config.*what differs: qemu_sha256 \(sha256:another-build in"):
        driver.restore(snap, config)
    with pytest.raises(SnapshotMismatchError, match=r"what differs: QEMU arguments .*'256M'.*'512M'"):
        driver.restore(snap, replace(config, memory_mib=512))
    with pytest.raises(Exception, match="user-mode networking"):
        driver.restore(stored.snapshot, ReplicaConfig(image=image, accel="tcg", network="bridge"))
    assert driver.list() == []  # nothing was created


def test_snapshot_cli_lists_inspects_and_removes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNIFRAME_STATE", str(tmp_path))
    runner = CliRunner()
    _stored(snapshot_store(), "cafe01")
    table = runner.invoke(app, ["snapshot", "ls"])
    assert table.exit_code == 0, table.output
    assert "cafe01" in table.output and "95.0 ms" in table.output
    [row] = json.loads(runner.invoke(app, ["snapshot", "ls", "-o", "json"]).output)
    assert (row["id"], row["stats"]["pause_ms"]) == ("cafe01", 95.0)
    inspected = json.loads(runner.invoke(app, ["snapshot", "inspect", "caf"]).output)
    assert inspected["facts"]["accel"] == "tcg" and inspected["dir"] == str(tmp_path / "snapshots" / "cafe01")
    assert "Pause:" in runner.invoke(app, ["snapshot", "inspect", "caf", "-o", "table"]).output
    assert "id: cafe01" in runner.invoke(app, ["snapshot", "inspect", "cafe01", "-o", "yaml"]).output
    gone = runner.invoke(app, ["snapshot", "rm", "cafe01"])
    assert gone.exit_code == 0 and not (tmp_path / "snapshots" / "cafe01").exists()
    missing = runner.invoke(app, ["snapshot", "rm", "cafe01"])
    assert missing.exit_code == 2 and "no snapshot 'cafe01'" in missing.output


def test_a_snapshot_taken_under_another_state_root_is_found_by_its_location(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = _stored(SnapshotStore(tmp_path / "other" / "snapshots"), "feed01")
    monkeypatch.setenv("UNIFRAME_STATE", str(tmp_path / "st"))
    driver = QemuMicroVMDriver()
    assert driver._stored(elsewhere.snapshot).dir == elsewhere.dir
    gone = replace(elsewhere.snapshot, id="feed02")
    with pytest.raises(RuntimeDriverError, match=r"snapshot feed02 is not in .*take a new one"):
        driver._stored(gone)
