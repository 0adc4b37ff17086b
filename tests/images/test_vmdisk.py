"""VM disks: the pieces on small trees (fast), then the real iris disk (debootstrap, root).

Every check reads the result with the standard tools (``e2fsck``, ``debugfs``,
``blkid``, ``sfdisk``, ``mtools``, ``qemu-img``), never with the code under test.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from uniframe.build.examples import write_iris
from uniframe.build.store import ImageStore, load_image_dir
from uniframe.build.vmdisk import (
    SERVICE,
    VMApp,
    build_vm_disk,
    build_vm_image,
    make_bootable_disk,
    make_ext4,
    rootfs_stats,
    service_unit,
)
from uniframe.errors import BuildError


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _debugfs(image: Path, request: str) -> str:
    return subprocess.run(["debugfs", "-R", request, str(image)], check=True, capture_output=True,
                          text=True).stdout


def _tree(root: Path) -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "etc/hostname").write_text("iris\n")
    (root / "usr/bin").mkdir(parents=True)
    tool = root / "usr/bin/tool"
    tool.write_text("#!/bin/sh\necho hi\n")
    tool.chmod(0o755)
    su = root / "usr/bin/su"
    su.write_bytes(b"\x7fELF")
    su.chmod(0o4755)
    wall = root / "usr/bin/wall"
    wall.write_bytes(b"\x7fELF")
    wall.chmod(0o2755)
    (root / "bin").symlink_to("usr/bin")
    (root / "var/lib/dpkg").mkdir(parents=True)
    (root / "var/lib/dpkg/status").write_text(
        "Package: base-files\nStatus: install ok installed\nVersion: 12\nArchitecture: amd64\n\n"
        "Package: gone\nStatus: deinstall ok config-files\nVersion: 1\nArchitecture: amd64\n\n"
    )
    return root


def test_service_unit_runs_the_server_and_restarts_it_on_failure() -> None:
    unit = service_unit(VMApp("iris", Path("iris.onnx"), port=9000))
    assert ("ExecStart=/usr/bin/python3 -m uniframe.serve /srv/model/iris.onnx --name iris --port 9000"
            in unit)
    assert "Restart=on-failure" in unit
    assert "WantedBy=multi-user.target" in unit


def test_service_unit_carries_the_specs_server_arguments_and_env() -> None:
    app = VMApp("iris", Path("iris.onnx"), port=9000,
                args=("--name", "iris", "--model-version", "2", "--port", "9000", "--threads", "2"),
                env=(("GREETING", 'say "hi" 100% $HOME'), ("PLAIN", "/opt/x")))
    unit = service_unit(app)
    assert ("ExecStart=/usr/bin/python3 -m uniframe.serve /srv/model/iris.onnx --name iris "
            "--model-version 2 --port 9000 --threads 2\n") in unit
    assert 'Environment="GREETING=say \\"hi\\" 100%% $HOME"\n' in unit  # systemd unquotes it
    assert "Environment=PLAIN=/opt/x\n" in unit


def test_rootfs_stats_count_files_executables_setuid_and_packages(tmp_path: Path) -> None:
    stats = rootfs_stats(_tree(tmp_path / "root"))
    assert stats.files == 5          # hostname, tool, su, wall, dpkg status (the symlink is not a file)
    assert stats.executables == 3
    assert stats.setuid == 1
    assert stats.setgid == 1
    assert stats.packages == 1       # config-files only is not installed


@pytest.mark.skipif(shutil.which("debugfs") is None, reason="e2fsprogs is not installed")
def test_make_ext4_packs_the_tree_reproducibly(tmp_path: Path) -> None:
    root = _tree(tmp_path / "root")
    log = tmp_path / "log"
    a, b = tmp_path / "a.ext4", tmp_path / "b.ext4"
    make_ext4(root, a, "0b9a0c4e-1111-4222-8333-944455556666", log, free_mib=8)
    (root / "etc/hostname").chmod(0o644)     # a new ctime (only) must not change the image
    make_ext4(root, b, "0b9a0c4e-1111-4222-8333-944455556666", log, free_mib=8)
    assert _sha(a) == _sha(b)
    fsck = subprocess.run(["e2fsck", "-fn", str(a)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert _debugfs(a, "cat /etc/hostname") == "iris\n"
    assert "Mode:  04755" in _debugfs(a, "stat /usr/bin/su")
    probe = subprocess.run(["blkid", "-p", "-o", "export", str(a)], capture_output=True, text=True).stdout
    assert "LABEL=uniframe-root" in probe and "TYPE=ext4" in probe


@pytest.mark.skipif(shutil.which("syslinux") is None or shutil.which("mcopy") is None,
                    reason="syslinux and mtools are not installed")
def test_bootable_disk_has_mbr_syslinux_boot_partition_and_the_root(tmp_path: Path) -> None:
    root = _tree(tmp_path / "root")
    log = tmp_path / "log"
    ext4 = tmp_path / "root.ext4"
    make_ext4(root, ext4, "0b9a0c4e-1111-4222-8333-944455556666", log, free_mib=8)
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd"
    kernel.write_bytes(b"kernel" * 1000)
    initrd.write_bytes(b"initrd" * 1000)
    disk = tmp_path / "disk.raw"
    make_bootable_disk(ext4, kernel, initrd, "root=/dev/vda2 rw console=ttyS0", disk, log)
    table = json.loads(subprocess.run(["sfdisk", "--json", str(disk)], check=True, capture_output=True,
                                      text=True).stdout)["partitiontable"]
    boot, rootp = table["partitions"]
    assert table["label"] == "dos"
    assert boot["type"] == "c" and boot.get("bootable") is True and boot["start"] == 2048
    assert rootp["type"] == "83" and rootp["start"] == (1 + 64) * 2048
    data = disk.read_bytes()
    assert data[:440] == Path("/usr/lib/syslinux/mbr/mbr.bin").read_bytes()[:440]
    assert data[510:512] == b"\x55\xaa"
    start = rootp["start"] * 512
    assert data[start:start + ext4.stat().st_size] == ext4.read_bytes()
    fat = f"{disk}@@{boot['start'] * 512}"
    listing = subprocess.run(["mdir", "-a", "-b", "-i", fat, "::"], check=True, capture_output=True, text=True,
                             env={**os.environ, "MTOOLS_SKIP_CHECK": "1"}).stdout
    assert {"::/LDLINUX.SYS", "::/LDLINUX.C32", "::/VMLINUZ", "::/SYSLINUX.CFG"} <= {
        line.strip().upper() for line in listing.splitlines()}
    cfg = subprocess.run(["mtype", "-i", fat, "::syslinux.cfg"], check=True, capture_output=True,
                         text=True, env={**os.environ, "MTOOLS_SKIP_CHECK": "1"}).stdout
    assert "APPEND root=/dev/vda2 rw console=ttyS0" in cfg


def test_build_refuses_a_missing_model_and_bad_options(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="does not exist"):
        build_vm_disk(VMApp("iris", tmp_path / "nope.onnx"), tmp_path / "out")
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    with pytest.raises(BuildError, match="unknown disk format"):
        build_vm_disk(VMApp("iris", model), tmp_path / "out", disk_format="vmdk")
    with pytest.raises(BuildError, match="letters, digits"):
        build_vm_disk(VMApp("ir is", model), tmp_path / "out")


@pytest.fixture(scope="module")
def iris_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_iris(tmp_path_factory.mktemp("model"))


def _raw(disk: Path, dest: Path) -> Path:
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(disk), str(dest)], check=True)
    return dest


@pytest.mark.slow
@pytest.mark.root
def test_iris_vm_disk_is_a_debian_with_the_server_as_a_service(tmp_path: Path, iris_model: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("debootstrap needs root")
    store = ImageStore(tmp_path / "images")
    image = build_vm_image(VMApp("iris", iris_model), store, "iris-vm:test")
    m = image.manifest
    assert image.kind == "vm" and store.resolve("iris-vm:test").digest == image.digest
    assert sorted(m["files"]) == ["disk", "initrd", "kernel"]
    assert m["cmdline"].startswith("root=/dev/vda rw console=ttyS0")
    assert m["disk"]["format"] == "qcow2"
    stats = m["rootfs"]
    assert stats["files"] > 5000 and stats["executables"] > 300 and stats["setuid"] >= 1
    assert stats["packages"] > 100
    assert [p.split("==")[0] for p in m["python"]] == ["numpy", "onnxruntime", "orjson"]
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(image.file("disk"))],
                                     check=True, capture_output=True, text=True).stdout)
    assert info["format"] == "qcow2" and info["virtual-size"] == m["disk"]["virtual_size"]
    kernel = subprocess.run(["file", "-b", str(image.kernel)], capture_output=True, text=True).stdout
    assert "Linux kernel" in kernel and m["kernel_version"] in kernel

    raw = _raw(image.file("disk"), tmp_path / "disk.raw")
    assert _debugfs(raw, "cat /etc/hostname") == "iris\n"
    assert "LABEL=uniframe-root / ext4" in _debugfs(raw, "cat /etc/fstab")
    unit = _debugfs(raw, f"cat /etc/systemd/system/{SERVICE}")
    assert "--name iris --port 8080" in unit
    assert SERVICE in _debugfs(raw, "ls /etc/systemd/system/multi-user.target.wants")
    assert "/dev/null" in _debugfs(raw, "stat /etc/systemd/system/serial-getty@ttyS0.service")
    dump = tmp_path / "iris.onnx"
    _debugfs(raw, f"dump /srv/model/iris.onnx {dump}")
    assert dump.read_bytes() == iris_model.read_bytes()
    site = "/usr/local/lib/python3.11/dist-packages"
    listing = _debugfs(raw, f"ls -p {site}")
    assert all(f"/{name}/" in listing for name in ("numpy", "onnxruntime", "orjson", "uniframe"))
    assert "/build/" not in listing and "/cli/" not in _debugfs(raw, f"ls -p {site}/uniframe")
    assert not (tmp_path / "images").joinpath(".build").exists()

    # The same inputs again: the same bytes, so the same digest.
    again = build_vm_disk(VMApp("iris", iris_model), tmp_path / "again")
    assert load_image_dir(again).digest == image.digest
