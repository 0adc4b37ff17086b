"""The full-VM driver on real QEMU (q35, TCG here): our Debian image and a user's disk.

Fast tests check the command line and the errors users meet before anything
boots. The slow ones build the iris VM disk (debootstrap, cached), boot it,
infer through the forwarded port, power it off with the ACPI button, and check
nothing is left; then boot a bootable variant *as a user's disk* through
SeaBIOS with a NoCloud seed that real cloud-init in the guest acts on.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from uniframe.build.cloudinit import CloudInitError
from uniframe.build.examples import write_iris
from uniframe.build.store import Image, ImageStore, finalize_manifest, load_image_dir
from uniframe.build.vmdisk import VMApp, build_vm_disk, build_vm_image
from uniframe.errors import RuntimeDriverError
from uniframe.runtime.ports import PortMapping
from uniframe.runtime.process import ProcessRef
from uniframe.runtime.qemu.vm import CloudInitData, QemuVMDriver, VMConfig
from uniframe.runtime.qemu.vm.disks import DiskError
from uniframe.runtime.qemu.vm.driver import CONSOLE_LOG, OVERLAY
from uniframe.runtime.qemu.vm.machine import FullVM
from uniframe.runtime.replica import ImageRef, ReplicaConfig, ReplicaState
from uniframe.spec.loader import load_text
from uniframe.spec.workload import Workload

WORKLOAD = """
apiVersion: uniframe.dev/v1alpha1
kind: Workload
metadata: {{name: userdisk}}
spec:
  image: ./disk.qcow2
  resources: {{cpus: 1, memory: 1Gi}}
  ports: [{{host: {port}, guest: 8080}}]
  cloudInit:
    userData: {user_data}
"""
IRIS_REQUEST = {"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]}
BOOT_TIMEOUT_S = 300.0

needs_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _infer(port: int, timeout: float) -> tuple[dict[str, object], float]:
    """The first successful OIP v2 inference, and how long it took to get one."""
    body = json.dumps(IRIS_REQUEST).encode()
    start = time.monotonic()
    last: Exception | None = None
    while time.monotonic() - start < timeout:
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/iris/infer", body,
                                         {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=5) as resp:
                return json.loads(resp.read()), time.monotonic() - start
        except OSError as exc:
            last = exc
            time.sleep(0.5)
    raise AssertionError(f"no inference within {timeout} s: {last}")


def _label(answer: dict[str, object]) -> object:
    outputs = answer["outputs"]
    assert isinstance(outputs, list)
    return next(o["data"][0] for o in outputs if o["name"] == "label")


def _qemu_processes_using(path: Path) -> list[str]:
    out = subprocess.run(["pgrep", "-af", "qemu-system"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(path) in line]


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@pytest.fixture
def vm_driver(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[QemuVMDriver]:
    """A driver with its own short state directory; every replica is killed and removed after."""
    state = tmp_path_factory.mktemp("vmst")
    monkeypatch.setenv("UNIFRAME_STATE", str(state))
    drv = QemuVMDriver()
    yield drv
    for replica in drv.list():
        log = replica.dir / CONSOLE_LOG
        if log.exists():
            print(f"--- console of {replica.name} ---\n{log.read_text(errors='replace')[-4000:]}")
        drv.remove(replica.id, force=True)


# -- the command line ------------------------------------------------------------


def test_kernel_boot_argv_is_q35_with_virtio_disk_net_and_qmp(tmp_path: Path) -> None:
    vm = FullVM(qemu="qemu-system-x86_64", disk=tmp_path / "a,b.qcow2", cpus=2, memory_mib=768,
                kernel=tmp_path / "kernel", initrd=tmp_path / "initrd", cmdline="root=/dev/vda rw",
                netdev="user,id=net0,hostfwd=tcp:127.0.0.1:8080-:8080", qmp_socket=tmp_path / "qmp.sock")
    argv = vm.argv()
    assert argv[argv.index("-M") + 1] == "q35"
    assert argv[argv.index("-accel") + 1].startswith("tcg,tb-size=")
    assert argv[argv.index("-smp") + 1] == "2" and argv[argv.index("-m") + 1] == "768M"
    assert argv[argv.index("-kernel") + 1] == str(tmp_path / "kernel")
    assert argv[argv.index("-append") + 1] == "root=/dev/vda rw"
    assert f"file={tmp_path}/a,,b.qcow2,if=none,id=disk0,format=qcow2,discard=unmap" in argv
    assert "virtio-blk-pci,drive=disk0" in argv          # no bootindex: QEMU's loader boots
    assert "virtio-net-pci,netdev=net0,romfile=" in argv
    assert "-no-reboot" in argv and "-nodefaults" in argv


def test_firmware_boot_argv_boots_the_disk_and_attaches_the_seed_read_only(tmp_path: Path) -> None:
    argv = FullVM(qemu="q", disk=tmp_path / "d.qcow2", seed=tmp_path / "seed.iso", accel="kvm").argv()
    assert "-kernel" not in argv and "-append" not in argv
    assert "virtio-blk-pci,drive=disk0,bootindex=0" in argv
    assert f"file={tmp_path}/seed.iso,if=none,id=seed,format=raw,readonly=on" in argv
    assert argv[argv.index("-accel") + 1] == "kvm"


# -- errors a user meets before anything boots --------------------------------------


@needs_qemu_img
def test_missing_disk_is_named(vm_driver: QemuVMDriver, tmp_path: Path) -> None:
    with pytest.raises(DiskError, match=r"nope\.qcow2 does not exist"):
        vm_driver.create(VMConfig.for_disk(tmp_path / "nope.qcow2"))
    assert vm_driver.list() == []


@needs_qemu_img
def test_unsupported_disk_format_says_how_to_convert(vm_driver: QemuVMDriver, tmp_path: Path) -> None:
    disk = tmp_path / "disk.vmdk"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", str(disk), "16M"], check=True)
    with pytest.raises(DiskError) as err:
        vm_driver.create(VMConfig.for_disk(disk))
    assert "vmdk format" in str(err.value) and "qemu-img convert -O qcow2" in str(err.value)
    # The format is read from the contents: a vmdk named .qcow2 is still refused.
    renamed = tmp_path / "disk.qcow2"
    disk.rename(renamed)
    with pytest.raises(DiskError, match="vmdk format"):
        vm_driver.create(VMConfig.for_disk(renamed))


@needs_qemu_img
def test_bad_user_data_leaves_no_replica_behind(vm_driver: QemuVMDriver, tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"\0" * (1 << 20))
    with pytest.raises(CloudInitError, match="#cloud-config"):
        vm_driver.create(VMConfig.for_disk(disk, cloud_init=CloudInitData("runcmd: [ls]\n")))
    assert vm_driver.list() == []
    assert not any(vm_driver.root.iterdir()) if vm_driver.root.exists() else True


def test_workload_with_a_disk_becomes_a_vm_config(tmp_path: Path) -> None:
    text = WORKLOAD.format(port=18123, user_data=json.dumps("#cloud-config\n{}\n"))
    spec = load_text(text.replace("cpus: 1", "cpus: 1.5"), "w.yaml", base_dir=tmp_path)[0].spec
    assert isinstance(spec, Workload)
    vm = VMConfig.from_workload(spec)
    assert vm.disk == tmp_path / "disk.qcow2" and vm.boot == "firmware" and vm.kernel is None
    assert (vm.cpus, vm.memory_mib, vm.name) == (2, 1024, "userdisk")
    assert vm.ports == (PortMapping(18123, 8080),)
    assert vm.cloud_init == CloudInitData("#cloud-config\n{}\n", {"local-hostname": "userdisk"})
    no_host = load_text(text.replace("host: 18123, ", ""), "w.yaml", base_dir=tmp_path)[0].spec
    assert isinstance(no_host, Workload)
    assert VMConfig.from_workload(no_host).ports[0].host_port > 0


@needs_qemu_img
def test_a_vm_image_from_the_common_replica_config(vm_driver: QemuVMDriver, tmp_path: Path) -> None:
    """What the control plane hands any driver: an ImageRef to the image's kernel and initrd."""
    image_dir = tmp_path / "img"
    image_dir.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image_dir / "disk.qcow2"), "64M"], check=True)
    (image_dir / "kernel").write_bytes(b"k")
    (image_dir / "initrd").write_bytes(b"i")
    finalize_manifest(image_dir, {"kind": "vm", "cmdline": "root=/dev/vda rw", "files": {
        "disk": {"path": "disk.qcow2"}, "kernel": {"path": "kernel"}, "initrd": {"path": "initrd"}}})
    image = load_image_dir(image_dir)
    ref = ImageRef("iris-vm:1", image.digest, image.kernel, image.initrd, image.cmdline)
    replica = vm_driver.create(ReplicaConfig(image=ref, name="from-common", cpus=2, memory_mib=768))
    assert replica.driver == "qemu-vm" and replica.name == "from-common"
    vm = VMConfig.of_replica(vm_driver.get("from-common"))
    assert (vm.disk, vm.kernel, vm.cmdline, vm.cpus, vm.memory_mib) == (
        image_dir / "disk.qcow2", image_dir / "kernel", "root=/dev/vda rw", 2, 768)
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(replica.dir / OVERLAY)],
                                     check=True, capture_output=True, text=True).stdout)
    assert info["format"] == "qcow2" and info["backing-filename"] == str(image_dir / "disk.qcow2")
    unikernel = tmp_path / "uk"
    unikernel.mkdir()
    (unikernel / "kernel").write_bytes(b"k")
    (unikernel / "initrd").write_bytes(b"i")
    finalize_manifest(unikernel, {"kind": "unikernel", "files": {
        "kernel": {"path": "kernel"}, "initrd": {"path": "initrd"}}})
    with pytest.raises(RuntimeDriverError, match="is a unikernel image"):
        vm_driver.create(ReplicaConfig(image=ImageRef("uk", "", unikernel / "kernel", unikernel / "initrd")))


@needs_qemu_img
def test_too_little_memory_is_refused(vm_driver: QemuVMDriver, tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"\0" * (1 << 20))
    with pytest.raises(RuntimeDriverError, match="at least 1 CPU and 128Mi"):
        vm_driver.create(VMConfig.for_disk(disk, memory_mib=64))


# -- real QEMU ---------------------------------------------------------------------


@pytest.mark.qemu
def test_a_guest_that_ignores_the_power_button_is_quit(vm_driver: QemuVMDriver, tmp_path: Path) -> None:
    """A blank disk: SeaBIOS finds nothing to boot and no OS hears the ACPI button."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    disk = tmp_path / "blank.raw"
    disk.write_bytes(b"\0" * (1 << 20))
    replica = vm_driver.create(VMConfig.for_disk(disk, memory_mib=128, accel="tcg"))
    replica = vm_driver.start(replica.id)
    assert replica.pid is not None and replica.pid_start_time is not None
    assert QemuVMDriver().inspect(replica.id).state is ReplicaState.RUNNING   # found again from disk
    started = time.monotonic()
    status = vm_driver.stop(replica.id, timeout=2)
    assert time.monotonic() - started < 15
    assert status.state is ReplicaState.CRASHED
    assert "did not power off within 2 s" in status.detail
    assert not ProcessRef(replica.pid, replica.pid_start_time).alive()
    assert disk.read_bytes() == b"\0" * (1 << 20)
    vm_driver.remove(replica.id)
    assert not replica.dir.exists()


@pytest.fixture(scope="module")
def iris_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_iris(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def iris_vm_image(tmp_path_factory: pytest.TempPathFactory, iris_model: Path) -> Image:
    if os.geteuid() != 0:
        pytest.skip("building a VM disk needs root (debootstrap)")
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    store = ImageStore(tmp_path_factory.mktemp("images"))
    return build_vm_image(VMApp("iris", iris_model), store, "iris-vm:test")


@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.root
def test_iris_vm_boots_serves_and_powers_off(vm_driver: QemuVMDriver, iris_vm_image: Image) -> None:
    disk = iris_vm_image.file("disk")
    disk_sha = _sha(disk)
    port = _free_port()
    replica = vm_driver.create(VMConfig.from_image(iris_vm_image, name="iris-vm", memory_mib=1024,
                                                   ports=(PortMapping(port, 8080),)))
    assert (replica.dir / OVERLAY).is_file()
    replica = vm_driver.start(replica.id)
    assert replica.pid is not None and replica.pid_start_time is not None
    answer, seconds = _infer(port, BOOT_TIMEOUT_S)
    assert _label(answer) == 0
    print(f"\nboot to first inference: {seconds:.1f} s; QEMU RSS {_rss_mib(replica.pid):.0f} MiB")

    again = QemuVMDriver()   # another process's view: everything from disk
    assert [r.id for r in again.list()] == [replica.id]
    assert again.inspect("iris-vm").state is ReplicaState.RUNNING
    console = b"".join(again.logs("iris-vm"))
    assert b"uniframe-serve: serving iris@1" in console

    started = time.monotonic()
    status = again.stop("iris-vm", timeout=120)
    stopped_in = time.monotonic() - started
    print(f"graceful stop: {stopped_in:.1f} s")
    assert status.state is ReplicaState.EXITED and status.exit_status == 0, status
    assert status.detail == "the guest powered off"
    assert not ProcessRef(replica.pid, replica.pid_start_time).alive()
    assert _qemu_processes_using(replica.dir) == []
    assert _sha(disk) == disk_sha          # the image's disk was never written

    vm_driver.remove("iris-vm")
    assert not replica.dir.exists()        # overlay, seed, logs: all gone
    assert vm_driver.list() == []


@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.root
def test_user_disk_boots_by_firmware_and_cloud_init_reads_the_seed(
        vm_driver: QemuVMDriver, iris_model: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The iris app as a user's own disk in a ``kind: Workload``: MBR + syslinux,
    cloud-init inside, SeaBIOS boot.

    The user data writes a file with a token only this test knows and prints
    it on the serial console from ``runcmd``, cloud-init's last stage: seeing
    the token proves the seed was found by label, parsed, and acted on.
    """
    if os.geteuid() != 0:
        pytest.skip("building a VM disk needs root (debootstrap)")
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    out = build_vm_disk(VMApp("iris", iris_model), tmp_path_factory.mktemp("userdisk"),
                        layout="bootable", cloud_init=True)
    disk = out / "disk.qcow2"
    disk_sha = _sha(disk)
    token = os.urandom(8).hex()
    user_data = (
        "#cloud-config\n"
        "write_files:\n"
        "  - path: /run/uniframe-marker\n"
        f"    content: 'UNIFRAME-NOCLOUD {token}'\n"
        "runcmd:\n"
        "  - sh -c 'echo \"$(cat /run/uniframe-marker) host=$(hostname)\" > /dev/ttyS0'\n"
    )
    port = _free_port()
    spec = load_text(WORKLOAD.format(port=port, user_data=json.dumps(user_data)), "userdisk.yaml",
                     base_dir=out)[0].spec
    assert isinstance(spec, Workload)
    replica = vm_driver.create(VMConfig.from_workload(spec))
    replica = vm_driver.start(replica.id)
    assert replica.extra["boot"] == "firmware" and "-kernel" not in replica.argv
    answer, seconds = _infer(port, BOOT_TIMEOUT_S)
    assert _label(answer) == 0
    print(f"\nfirmware boot to first inference: {seconds:.1f} s")
    deadline = time.monotonic() + BOOT_TIMEOUT_S
    marker = f"UNIFRAME-NOCLOUD {token} host=userdisk".encode()
    while marker not in (replica.dir / CONSOLE_LOG).read_bytes():
        assert time.monotonic() < deadline, "cloud-init never printed the marker"
        assert vm_driver.inspect(replica.id).state is ReplicaState.RUNNING
        time.sleep(1)
    status = vm_driver.stop(replica.id, timeout=120)
    assert status.state is ReplicaState.EXITED and status.exit_status == 0, status
    assert _sha(disk) == disk_sha
    vm_driver.remove(replica.id)
    assert not replica.dir.exists()
