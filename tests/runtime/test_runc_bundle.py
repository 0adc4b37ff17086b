"""The runc bundle configuration: what a container may do, and what it runs.

These need no runc: they read the ``config.json`` the driver hands runc.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from uniframe.build import oci
from uniframe.errors import BuildError, ImageError
from uniframe.runtime.runc import bundle


def make_root(root: Path) -> Path:
    """A tiny image root: an app, a user and group the image names, a soname link."""
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "app").write_bytes(b"#!/bin/sh\necho hi\n")
    (root / "bin" / "app").chmod(0o755)
    (root / "etc").mkdir()
    (root / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/home:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\nstaff:x:1001:\n")
    (root / "lib").mkdir()
    (root / "lib" / "libz.so.1.2").write_bytes(b"lib")
    (root / "lib" / "libz.so.1").symlink_to("libz.so.1.2")
    return root


def build(root: Path, out: Path) -> str:
    return oci.write_image_layout(root, out, entrypoint=["/bin/app"], cmd=["--port", "8080"],
                                  env={"A": "1"}, workdir="/srv")


def test_runtime_config_isolates_and_limits(tmp_path: Path) -> None:
    root = make_root(tmp_path / "root")
    image = oci.ImageConfig(entrypoint=("/bin/app",), cmd=("-v",), env={"A": "1"}, workdir="/srv",
                            user="app")
    netns = Path("/run/netns/uf-test")
    config = bundle.runtime_config(image, bundle.RuntimeOptions(
        netns=netns, cgroups_path="/uniframe-x", cpus=1.5, memory_mib=256, readonly_rootfs=True,
        env={"B": "2"}, mounts=(bundle.BindMount(tmp_path, "/model"),)), root)
    proc = config["process"]
    assert proc["args"] == ["/bin/app", "-v"] and proc["cwd"] == "/srv"
    assert {"A=1", "B=2"} <= set(proc["env"])
    assert proc["user"] == {"uid": 1000, "gid": 1001}
    assert proc["noNewPrivileges"] is True
    assert proc["capabilities"]["bounding"] == ["CAP_NET_BIND_SERVICE"]
    assert "inheritable" not in proc["capabilities"] and "ambient" not in proc["capabilities"]
    assert config["root"] == {"path": "rootfs", "readonly": True}
    linux = config["linux"]
    assert {"type": "network", "path": str(netns)} in linux["namespaces"]
    assert {n["type"] for n in linux["namespaces"]} == {"pid", "ipc", "uts", "mount", "network"}
    assert linux["resources"]["cpu"] == {"quota": 150000, "period": 100000}
    assert linux["resources"]["memory"] == {"limit": 256 << 20}
    assert linux["cgroupsPath"] == "/uniframe-x"
    mounts = {m["destination"]: m for m in config["mounts"]}
    assert mounts["/dev"]["type"] == "tmpfs" and "ro" in mounts["/sys"]["options"]
    assert mounts["/tmp"]["type"] == "tmpfs" and mounts["/model"]["source"] == str(tmp_path)
    host = bundle.runtime_config(image, bundle.RuntimeOptions(host_network=True), root)
    assert "network" not in {n["type"] for n in host["linux"]["namespaces"]}


def test_runtime_config_needs_something_to_run(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="neither Entrypoint nor Cmd"):
        bundle.runtime_config(oci.ImageConfig(), bundle.RuntimeOptions(), tmp_path)
    with pytest.raises(ImageError, match="not in its /etc/passwd"):
        bundle.runtime_config(oci.ImageConfig(cmd=("/x",), user="nobody"), bundle.RuntimeOptions(), tmp_path)


def test_bundles_from_layouts_and_roots(tmp_path: Path) -> None:
    root = make_root(tmp_path / "root")
    build(root, tmp_path / "img")
    from_layout = bundle.bundle_from_layout(tmp_path / "img", tmp_path / "b1",
                                            bundle.RuntimeOptions(cpus=1, memory_mib=64))
    from_root = bundle.bundle_from_root(root, tmp_path / "b2", entrypoint=["/bin/app"], workdir="/srv")
    for made in (from_layout, from_root):
        config = json.loads(made.config_path.read_text())
        assert config["process"]["args"][0] == "/bin/app"
        assert (made.rootfs / "bin" / "app").is_file()
        assert os.readlink(made.rootfs / "lib" / "libz.so.1") == "libz.so.1.2"
    with pytest.raises(BuildError, match="already exists"):
        bundle.bundle_from_root(root, tmp_path / "b2", entrypoint=["/bin/app"])
