"""The same iris service under every runtime: what each image carries, how fast it answers, what it costs.

Run: ``python bench/runtimes_bench.py [--runs 3] [--only unikernel,container,...]``.

Rows: unikernel (QEMU microvm), vm (QEMU q35, Debian + systemd), container
(the traced "distroless" closure under runc), container-conventional
(debootstrap minbase + python3 + pip, under runc) and process (the host's
Python). Every image is unpacked and counted the same way: regular files,
bytes, executables (regular files with an execute bit that are ELF programs
or ``#!`` scripts), setuid/setgid files, and packages (dpkg's count for
Debian roots, Python distributions for traced closures). Start to first
inference is the median of ``--runs`` cold starts, from launching the
replica to the first 200 answer. RSS is the replica's resident memory after
200 requests: QEMU's for VMs, the container's processes for runc, the
server's for a process. VM rows run under the accelerator the runtime
probes (TCG on these machines): they are marked so.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from uniframe.build.examples import write_iris
from uniframe.build.images import build_image, image_port
from uniframe.build.store import Image, ImageStore
from uniframe.runtime.driver import Driver
from uniframe.runtime.ports import PortMapping
from uniframe.runtime.replica import ReplicaConfig
from uniframe.runtime.verify import driver_for_image, free_port, image_ref
from uniframe.spec import InferenceService, load_file

SPEC = """\
apiVersion: uniframe.dev/v1alpha1
kind: InferenceService
metadata: {name: iris}
spec:
  model: {uri: ./iris.onnx}
  resources: {cpus: 1, memory: 512Mi}
"""
BODY = json.dumps({"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32",
                               "data": [5.1, 3.5, 1.4, 0.2]}]}).encode()
ROWS = {"unikernel": ("unikernel", False), "vm": ("vm", False), "container": ("container", False),
        "container-conventional": ("container", True), "process": ("process", False)}


@dataclass
class TreeStats:
    files: int = 0
    bytes: int = 0
    executables: int = 0
    setuid: int = 0
    packages: int | None = None


@dataclass
class Row:
    name: str
    accel: str = ""
    image_bytes: int = 0
    tree: TreeStats = field(default_factory=TreeStats)
    starts: list[float] = field(default_factory=list)
    rss_mib: float = 0.0


def _is_program(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(64)
    except OSError:
        return False
    if head.startswith(b"#!"):
        return True
    if not head.startswith(b"\x7fELF") or len(head) < 64:
        return False
    # An ELF file with a program interpreter (or ET_EXEC) is a program, not a library.
    import struct

    e_type = struct.unpack_from("<H", head, 16)[0]
    if e_type == 2:
        return True
    if ".so" in os.path.basename(path):  # libc.so.6 has an interpreter entry too, yet is a library
        return False
    phoff, phentsize, phnum = (struct.unpack_from("<Q", head, 32)[0],
                               struct.unpack_from("<H", head, 54)[0], struct.unpack_from("<H", head, 56)[0])
    with open(path, "rb") as fh:
        for i in range(phnum):
            fh.seek(phoff + i * phentsize)
            if struct.unpack("<I", fh.read(4))[0] == 3:  # PT_INTERP
                return True
    return False


def tree_stats(root: Path) -> TreeStats:
    s = TreeStats()
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if not stat.S_ISREG(st.st_mode):
                continue
            s.files += 1
            s.bytes += st.st_size
            if st.st_mode & 0o6000:
                s.setuid += 1
            if st.st_mode & 0o111 and _is_program(p):
                s.executables += 1
    status = root / "var/lib/dpkg/status"
    if status.is_file():
        s.packages = status.read_text(errors="replace").count("Status: install ok installed")
    return s


def unpack(image: Image, dest: Path) -> Path:
    """The image's root file system as a directory."""
    dest.mkdir(parents=True)
    if image.kind == "unikernel" and "root" in image.manifest["files"]:
        # squashfs root disk; -f: into the directory just made
        subprocess.run(["unsquashfs", "-f", "-q", "-n", "-no-xattrs", "-d", str(dest),
                        str(image.file("root"))], check=True, stdout=subprocess.DEVNULL)
    elif image.kind == "unikernel":
        comp = image.manifest["initrd"]["compression"]
        tool = {"none": ["cat"], "gzip": ["gzip", "-dc"], "lz4": ["lz4", "-dc"], "zstd": ["zstd", "-dc"]}[comp]
        with open(image.initrd, "rb") as src:
            dec = subprocess.Popen(tool, stdin=src, stdout=subprocess.PIPE)
            subprocess.run(["cpio", "-id", "--quiet", "--no-absolute-filenames"], stdin=dec.stdout,
                           cwd=dest, check=True, stderr=subprocess.DEVNULL)
            dec.wait()
    elif image.kind == "oci":
        from uniframe.build.oci import load_layout

        load_layout(image.dir, dest)
    elif image.kind == "vm":
        disk = image.file("disk")
        raw = dest.parent / "disk.raw"
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(disk), str(raw)], check=True)
        subprocess.run(["debugfs", "-R", f"rdump / {dest}", str(raw)], check=True,
                       capture_output=True)
        raw.unlink()
    return dest


def rss_mib(driver: Driver, replica_id: str) -> float:
    """Resident memory of everything the replica runs (cgroup for containers, process tree else)."""
    replica = driver.get(replica_id)
    pids: list[int] = []
    cg = replica.extra.get("cgroup") if replica.extra else None
    if cg:
        for procs in Path("/sys/fs/cgroup").glob(f"**/{str(cg).strip('/')}/cgroup.procs"):
            pids += [int(x) for x in procs.read_text().split()]
    if not pids and replica.pid:
        pids = _tree(replica.pid)
    total = 0
    for pid in set(pids):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total / 1024


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
    return out


def first_inference(driver: Driver, image: Image, timeout: float, keep: bool = False) -> tuple[float, str]:
    port = free_port()
    replica = driver.create(ReplicaConfig(image=image_ref(image), memory_mib=512,
                                          ports=(PortMapping(port, image_port(image)),)))
    t0 = time.monotonic()
    replica = driver.start(replica.id)
    path = f"/v2/models/{image.manifest.get('model', {}).get('name', 'iris')}/infer"
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("POST", path, BODY, {"Content-Type": "application/json"})
            r = conn.getresponse()
            r.read()
            if r.status == 200:
                elapsed = time.monotonic() - t0
                break
        except (OSError, http.client.HTTPException):
            pass
        if time.monotonic() - t0 > timeout:
            driver.remove(replica.id, force=True)
            raise RuntimeError(f"{image.kind}: no answer within {timeout} s")
        time.sleep(0.05)
    if keep:
        for _ in range(200):
            conn.request("POST", path, BODY, {"Content-Type": "application/json"})
            conn.getresponse().read()
        return elapsed, replica.id
    driver.stop(replica.id, timeout=60)
    driver.remove(replica.id, force=True)
    return elapsed, replica.id


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", default=",".join(ROWS))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    console = Console(width=170)
    work = Path(tempfile.mkdtemp(prefix="uniframe-rt-bench-"))
    write_iris(work)
    (work / "service.yaml").write_text(SPEC)
    (doc,) = load_file(work / "service.yaml")
    assert isinstance(doc.spec, InferenceService)
    store = ImageStore(work / "images")
    rows: list[Row] = []
    for name in args.only.split(","):
        runtime, conventional = ROWS[name]
        console.print(f"[dim]{name}: building...[/]")
        image = build_image(doc.spec, source_digest=doc.digest(), runtime=runtime,  # type: ignore[arg-type]
                            conventional=conventional, store=store)
        row = Row(name, image_bytes=image.size_bytes())
        if image.kind != "process":
            root = unpack(image, work / f"root-{name}" / "root")
            row.tree = tree_stats(root)
            shutil.rmtree(root.parent, ignore_errors=True)
        if image.kind == "vm":  # debugfs rdump drops setuid/setgid bits: take the build's count
            rootfs = image.manifest.get("rootfs", {})
            row.tree.setuid = int(rootfs.get("setuid", 0)) + int(rootfs.get("setgid", 0))
        if row.tree.packages is None:
            row.tree.packages = len(image.manifest.get("packages", [])) or None
        driver = driver_for_image(image, root=work / "replicas")
        timeout = 600 if image.kind == "vm" else 180
        console.print(f"[dim]{name}: {args.runs} cold starts...[/]")
        for _ in range(args.runs):
            row.starts.append(first_inference(driver, image, timeout)[0])
        _elapsed, rid = first_inference(driver, image, timeout, keep=True)
        row.rss_mib = rss_mib(driver, rid)
        row.accel = driver.accelerator(driver.get(rid)) or ""
        driver.stop(rid, timeout=60)
        driver.remove(rid, force=True)
        rows.append(row)
    load = os.getloadavg()
    table = Table(title=f"iris under each runtime ({args.runs} cold starts each; load avg {load[0]:.1f})")
    for col in ("runtime", "image", "files", "bytes unpacked", "executables", "setuid/gid", "packages",
                "start → first inference (median)", "RSS after 200 req"):
        table.add_column(col)
    for r in rows:
        vm = f" ({r.accel.upper()})" if r.accel else ""
        table.add_row(
            r.name + vm, f"{r.image_bytes / 1e6:.1f} MB", str(r.tree.files or "-"),
            f"{r.tree.bytes / 1e6:.1f} MB" if r.tree.bytes else "(host)", str(r.tree.executables or "-"),
            str(r.tree.setuid), str(r.tree.packages or "-"),
            f"{statistics.median(r.starts):.2f} s{vm}", f"{r.rss_mib:.0f} MiB{vm}")
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ | {"tree": r.tree.__dict__} for r in rows], indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
