"""``uniframe runtimes`` as the real console command, checked against this host; and ``run``
refusing what the image's driver cannot do, before anything is created."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml
from runtime_helpers import uniframe

from uniframe.build.store import finalize_manifest
from uniframe.runtime.registry import REGISTRY


def test_runtimes_json_describes_every_driver_as_this_host_sees_it() -> None:
    result = uniframe("runtimes", "-o", "json")
    assert result.returncode == 0, result.stderr
    rows = {row["driver"]: row for row in json.loads(result.stdout)}
    assert list(rows) == list(REGISTRY.kinds())  # every registered driver, in order
    assert list(rows)[:4] == ["qemu-microvm", "qemu-vm", "runc", "process"]
    assert rows["qemu-microvm"]["runtimes"] == ["unikernel"]
    assert rows["runc"]["image_kinds"] == ["oci"]
    assert {r for row in rows.values() for r in row["preferred_for"]} == {
        "unikernel", "vm", "container", "process"}
    for row in rows.values():
        assert row["capabilities"] == sorted(c.value for c in REGISTRY.entry(row["driver"]).capabilities)
        assert row["reason"]

    qemu = shutil.which("qemu-system-x86_64")
    for kind in ("qemu-microvm", "qemu-vm"):
        assert rows[kind]["usable"] == (qemu is not None), rows[kind]
        if qemu is not None:
            assert qemu in rows[kind]["reason"] and "accel " in rows[kind]["reason"]
    runc = shutil.which("runc")
    assert rows["runc"]["usable"] == (runc is not None and os.geteuid() == 0), rows["runc"]
    if runc is None:
        assert "apt-get install runc" in rows["runc"]["reason"]
    elif os.geteuid() == 0:
        assert runc in rows["runc"]["reason"]
    assert rows["process"]["usable"] is True
    assert "exit-status" not in rows["qemu-vm"]["capabilities"]
    assert "resource-limits" not in rows["process"]["capabilities"]


def test_runtimes_table_and_yaml() -> None:
    table = uniframe("runtimes")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:5] == ["DRIVER", "RUNTIMES", "IMAGES", "USABLE", "CAPABILITIES"]
    assert [line.split()[0] for line in lines[1:]] == list(REGISTRY.kinds())
    as_yaml = uniframe("runtimes", "-o", "yaml")
    assert [row["driver"] for row in yaml.safe_load(as_yaml.stdout)] == list(REGISTRY.kinds())
    bad = uniframe("runtimes", "-o", "xml")
    assert bad.returncode == 2 and "use one of table, json, yaml" in bad.stderr


def test_run_refuses_limits_the_driver_cannot_enforce(state_dir: Path, tmp_path: Path) -> None:
    image = tmp_path / "proc"
    image.mkdir()
    (image / "model.onnx").write_bytes(b"never loaded: run stops before anything starts")
    finalize_manifest(image, {"schema": 1, "kind": "process", "name": "p", "port": 8080,
                              "files": {"model": {"path": "model.onnx"}}, "args": ["--port", "8080"]})
    result = uniframe("run", str(image), "-d", "--memory", "128Mi")
    assert result.returncode == 2
    assert ("--cpus/--memory: the process driver cannot enforce CPU and memory limits (it lacks "
            "the 'resource-limits' capability); drivers that can: qemu-microvm, qemu-vm, runc") in result.stderr
    result = uniframe("run", str(image), "-d", "--net", "bridge")
    assert result.returncode == 2
    assert "--net bridge: the process driver cannot put a replica on a host bridge" in result.stderr
    assert list((state_dir / "replicas").glob("*")) == []  # refused before anything was created
