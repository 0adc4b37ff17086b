"""Pure pieces of the microVM driver: command lines, port specs, cpio archives, process identity."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from uniframe.errors import RuntimeDriverError
from uniframe.runtime.ports import PortMapping, parse_port_mapping
from uniframe.runtime.process import ProcessRef
from uniframe.runtime.qemu.driver import QemuMicroVMDriver
from uniframe.runtime.qemu.initramfs import init_initramfs
from uniframe.runtime.qemu.microvm import (
    USER_NET_IP_ARG,
    MicroVM,
    accel_args,
    add_kernel_args,
    kernel_cmdline,
)
from uniframe.runtime.qemu.tsc import host_tsc_khz, measure_tsc_khz
from uniframe.runtime.replica import ImageRef, ReplicaConfig


def test_kernel_cmdline_adds_runtime_keys_once_and_before_init_args() -> None:
    line = kernel_cmdline("console=ttyS0 quiet ip=dhcp -- --port 80", [USER_NET_IP_ARG])
    kernel_part, init_part = line.split(" -- ")
    words = kernel_part.split()
    assert words.count("console=ttyS0") == 1
    assert {"reboot=t", "panic=-1", "random.trust_cpu=on", USER_NET_IP_ARG} <= set(words)
    assert "ip=dhcp" not in words  # only the runtime knows the address
    assert init_part == "--port 80"
    assert kernel_cmdline("", []) == "console=ttyS0 reboot=t panic=-1 random.trust_cpu=on"


def test_tcg_gets_a_bounded_code_cache_and_max_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UNIFRAME_TCG_TB_SIZE", raising=False)
    assert accel_args("tcg") == ["-accel", "tcg,tb-size=32", "-cpu", "max"]
    monkeypatch.setenv("UNIFRAME_TCG_TB_SIZE", "0")
    assert accel_args("tcg") == ["-accel", "tcg", "-cpu", "max"]
    assert accel_args("kvm") == ["-accel", "kvm", "-cpu", "host"]


def test_microvm_argv_escapes_commas_in_paths() -> None:
    argv = MicroVM(qemu="qemu", kernel=Path("/k"), cmdline="x", qmp_socket=Path("/a,b/qmp.sock")).argv()
    assert "unix:/a,,b/qmp.sock,server=on,wait=off" in argv
    assert argv[argv.index("-M") + 1] == "microvm,acpi=off,x-option-roms=off"
    assert "-no-reboot" in argv and "-nodefaults" in argv


def test_tcg_guests_get_the_timer_arguments_unless_the_image_set_them() -> None:
    def appended(accel: str, cmdline: str) -> str:
        argv = MicroVM(qemu="qemu", kernel=Path("/k"), cmdline=cmdline, accel=accel).argv()
        return argv[argv.index("-append") + 1]

    khz = host_tsc_khz()
    rate = f" tsc_early_khz={khz}" if khz else ""
    assert appended("tcg", "console=ttyS0 -- --port 80") == \
        f"console=ttyS0 tsc=reliable noapictimer{rate} -- --port 80"
    assert appended("tcg", "tsc=unstable") == f"tsc=unstable noapictimer{rate}"
    assert appended("kvm", "console=ttyS0") == "console=ttyS0"
    assert add_kernel_args("a=1 b -- c=2", ["a=3", "b", "c=4"]) == "a=1 b c=4 -- c=2"


def test_guests_report_freed_pages_to_qemu() -> None:
    argv = MicroVM(qemu="qemu", kernel=Path("/k"), cmdline="x").argv()
    assert argv[argv.index("virtio-balloon-device,free-page-reporting=on") - 1] == "-device"
    argv = MicroVM(qemu="qemu", kernel=Path("/k"), cmdline="x", free_page_reporting=False).argv()
    assert not any("balloon" in a for a in argv)


def test_a_root_disk_is_attached_read_only_instead_of_an_initrd() -> None:
    argv = MicroVM(qemu="qemu", kernel=Path("/k"), cmdline="x", disk=Path("/i,j/root.squashfs")).argv()
    drive = argv[argv.index("-drive") + 1]
    assert drive == "if=none,id=root,file=/i,,j/root.squashfs,format=raw,readonly=on"
    assert argv[argv.index("virtio-blk-device,drive=root") - 1] == "-device"
    assert "-initrd" not in argv
    argv = MicroVM(qemu="qemu", kernel=Path("/k"), cmdline="x", initrd=Path("/initrd")).argv()
    assert "-drive" not in argv and argv[argv.index("-initrd") + 1] == "/initrd"


def test_image_refs_carry_the_disk_and_old_records_still_load() -> None:
    ref = ImageRef("iris", "sha256:ab", Path("/i/kernel"), Path(), "quiet", disk=Path("/i/root.squashfs"))
    assert ImageRef.from_json(json.loads(json.dumps(ref.to_json()))) == ref
    old = {k: v for k, v in ref.to_json().items() if k != "disk"}  # written before disk roots
    old["initrd"] = "/i/initrd"
    assert ImageRef.from_json(old) == ImageRef("iris", "sha256:ab", Path("/i/kernel"),
                                               Path("/i/initrd"), "quiet")


def test_a_missing_root_disk_is_refused_at_create(tmp_path: Path) -> None:
    (tmp_path / "kernel").write_bytes(b"k")
    ref = ImageRef("iris", "sha256:ab", tmp_path / "kernel", Path(), disk=tmp_path / "root.squashfs")
    with pytest.raises(RuntimeDriverError, match=r"root.squashfs is missing; rebuild the image"):
        QemuMicroVMDriver(root=tmp_path / "replicas").create(ReplicaConfig(image=ref))


def test_the_host_tsc_rate_is_measured_consistently() -> None:
    first, second = measure_tsc_khz(), measure_tsc_khz()
    if first is None:  # not x86-64, no constant TSC, or no executable memory: nothing to check
        assert second is None
        return
    assert second is not None and 100_000 < first < 10_000_000  # 100 MHz to 10 GHz
    assert abs(first - second) / first < 1e-3


@pytest.mark.parametrize(("spec", "mapping"), [
    ("8080:80", PortMapping(8080, 80)),
    ("0.0.0.0:8080:80/tcp", PortMapping(8080, 80, host_ip="0.0.0.0")),
])
def test_port_mappings(spec: str, mapping: PortMapping) -> None:
    assert parse_port_mapping(spec) == mapping


@pytest.mark.parametrize("spec", ["80", "8080:80/udp", "0:80", "x:80", "8080:70000"])
def test_bad_port_mappings(spec: str) -> None:
    with pytest.raises(RuntimeDriverError, match="port"):
        parse_port_mapping(spec)


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio not installed")
def test_initramfs_is_a_cpio_archive_cpio_can_read(tmp_path: Path) -> None:
    archive = tmp_path / "initrd"
    archive.write_bytes(init_initramfs(b"#!/bin/true\n"))
    listing = subprocess.run(["cpio", "-itv"], stdin=archive.open("rb"), capture_output=True, text=True, check=True)
    lines = listing.stdout.splitlines()
    assert [line.split()[-1] for line in lines] == ["dev", "dev/console", "proc", "init"]
    assert lines[1].startswith("crw") and "5," in lines[1]


def test_process_identity_survives_only_with_the_same_start_time() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        ref = ProcessRef.of(proc.pid)
        assert ref.alive()
        assert not ProcessRef(proc.pid, ref.start_time + 1).alive()  # a reused PID
    finally:
        proc.kill()
        proc.wait()
    assert not ref.alive()
