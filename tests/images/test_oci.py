"""OCI image layouts and runtime bundles, on real files (no runc here: see tests/runtime)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
from pathlib import Path

import pytest

from uniframe.build import oci
from uniframe.build.store import ImageStore
from uniframe.errors import ImageError


def make_root(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "app").write_bytes(b"#!/bin/sh\necho hi\n")
    (root / "bin" / "app").chmod(0o755)
    (root / "bin" / "su").write_bytes(b"\x7fELF fake")
    (root / "bin" / "su").chmod(0o4755)
    (root / "etc").mkdir()
    (root / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/home:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\nstaff:x:1001:\n")
    (root / "etc" / "secret").write_text("s")
    (root / "etc" / "secret").chmod(0o600)
    (root / "lib").mkdir()
    (root / "lib" / "libz.so.1.2").write_bytes(b"lib")
    (root / "lib" / "libz.so.1").symlink_to("libz.so.1.2")
    (root / "lib" / "abs").symlink_to("/etc/passwd")
    os.link(root / "lib" / "libz.so.1.2", root / "lib" / "hardlink")
    (root / "empty").mkdir()
    os.mkfifo(root / "fifo")
    return root


def build(root: Path, out: Path, **kw: object) -> str:
    return oci.write_image_layout(root, out, entrypoint=["/bin/app"], cmd=["--port", "8080"],
                                  env={"A": "1"}, workdir="/srv", exposed_ports=[8080],
                                  labels={"team": "ml"}, **kw)  # type: ignore[arg-type]


def blob(layout: Path, digest: str) -> bytes:
    return (layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()


def test_layout_follows_the_image_spec(tmp_path: Path) -> None:
    root = make_root(tmp_path / "root")
    digest = build(root, tmp_path / "img", ref_name="app:1")
    layout = tmp_path / "img"
    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((layout / "index.json").read_text())
    assert index["schemaVersion"] == 2 and index["mediaType"] == oci.MT_INDEX
    [desc] = index["manifests"]
    assert desc["digest"] == digest and desc["annotations"][oci.REF_NAME] == "app:1"
    assert desc["platform"] == {"architecture": "amd64", "os": "linux"}
    # every blob's name is the sha256 of its bytes and every descriptor's size is right
    for path in (layout / "blobs" / "sha256").iterdir():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name
    manifest = json.loads(blob(layout, digest))
    assert len(blob(layout, digest)) == desc["size"]
    assert manifest["mediaType"] == oci.MT_MANIFEST and manifest["schemaVersion"] == 2
    [layer] = manifest["layers"]
    assert layer["mediaType"] == oci.MT_LAYER_GZIP
    raw = blob(layout, layer["digest"])
    assert len(raw) == layer["size"]
    assert raw[4:8] == b"\0\0\0\0"  # gzip header mtime 0
    config = json.loads(blob(layout, manifest["config"]["digest"]))
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(gzip.decompress(raw)).hexdigest()]
    assert config["os"] == "linux" and config["architecture"] == "amd64"
    c = config["config"]
    assert c["Entrypoint"] == ["/bin/app"] and c["Cmd"] == ["--port", "8080"]
    assert "A=1" in c["Env"] and any(e.startswith("PATH=") for e in c["Env"])
    assert c["WorkingDir"] == "/srv" and c["ExposedPorts"] == {"8080/tcp": {}}
    assert c["Labels"] == {"team": "ml"}


def test_layer_is_deterministic(tmp_path: Path) -> None:
    root = make_root(tmp_path / "root")
    first = build(root, tmp_path / "a")
    os.utime(root / "bin" / "app", (12345, 12345))
    (root / "etc" / "secret").chmod(0o600)
    second = build(root, tmp_path / "b")
    assert first == second
    (root / "etc" / "new").write_text("x")
    assert build(root, tmp_path / "c") != first
    # the layer lists names sorted, owned by root, dated 0; devices and sockets are left out
    layout = oci.read_layout(tmp_path / "c")
    with tarfile.open(layout.blob(layout.layers[0].digest)) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    children: dict[str, list[str]] = {}
    for name in names:
        parent, _, base = name.rpartition("/")
        children.setdefault(parent, []).append(base)
    assert all(kids == sorted(kids) for kids in children.values())
    assert names.index("bin") < names.index("bin/app") < names.index("empty") < names.index("etc")
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 for m in members)


def test_round_trip_keeps_links_modes_and_special_files(tmp_path: Path) -> None:
    root = make_root(tmp_path / "root")
    build(root, tmp_path / "img")
    rootfs = tmp_path / "rootfs"
    layout = oci.load_layout(tmp_path / "img", rootfs)
    assert layout.config.args == ("/bin/app", "--port", "8080")
    assert layout.config.workdir == "/srv" and layout.config.env["A"] == "1"
    assert (rootfs / "bin" / "app").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert stat.S_IMODE((rootfs / "bin" / "su").stat().st_mode) == 0o4755
    assert stat.S_IMODE((rootfs / "etc" / "secret").stat().st_mode) == 0o600
    assert os.readlink(rootfs / "lib" / "libz.so.1") == "libz.so.1.2"
    assert os.readlink(rootfs / "lib" / "abs") == "/etc/passwd"
    assert (rootfs / "lib" / "hardlink").stat().st_ino == (rootfs / "lib" / "libz.so.1.2").stat().st_ino
    assert (rootfs / "empty").is_dir() and stat.S_ISFIFO((rootfs / "fifo").lstat().st_mode)


@pytest.mark.root
def test_owners_are_root_unless_kept(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to chown")
    root = make_root(tmp_path / "root")
    os.chown(root / "etc" / "secret", 1000, 1001)
    build(root, tmp_path / "a")
    build(root, tmp_path / "b", keep_owners=True)
    oci.load_layout(tmp_path / "a", tmp_path / "ra")
    oci.load_layout(tmp_path / "b", tmp_path / "rb")
    assert (tmp_path / "ra" / "etc" / "secret").stat().st_uid == 0
    st = (tmp_path / "rb" / "etc" / "secret").stat()
    assert (st.st_uid, st.st_gid) == (1000, 1001)


# -- hand-made layouts: several layers, whiteouts, damage ---------------------


def tar_bytes(entries: list[tuple[str, str, bytes | str]]) -> bytes:
    """(name, kind, data) with kind file | dir | symlink."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, data in entries:
            info = tarfile.TarInfo(name)
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, str(data)
                tar.addfile(info)
            else:
                payload = data if isinstance(data, bytes) else data.encode()
                info.size, info.mode = len(payload), 0o644
                tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def put(layout: Path, data: bytes) -> dict[str, object]:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def hand_layout(layout: Path, layers: list[bytes], *, arch: str = "amd64", gz: bool = True) -> Path:
    layout.mkdir(parents=True)
    descs, diff_ids = [], []
    for raw in layers:
        diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
        body = gzip.compress(raw) if gz else raw
        descs.append({"mediaType": oci.MT_LAYER_GZIP if gz else oci.MT_LAYER_TAR, **put(layout, body)})
    config = {"architecture": arch, "os": "linux", "config": {"Cmd": ["/x"]},
              "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    cfg = {"mediaType": oci.MT_CONFIG, **put(layout, json.dumps(config).encode())}
    manifest = {"schemaVersion": 2, "mediaType": oci.MT_MANIFEST, "config": cfg, "layers": descs}
    man = {"mediaType": oci.MT_MANIFEST, **put(layout, json.dumps(manifest).encode())}
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [man]}))
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return layout


def test_layers_apply_in_order_with_whiteouts(tmp_path: Path) -> None:
    lower = tar_bytes([("a", "dir", ""), ("a/x", "file", "x"), ("a/y", "file", "y"),
                       ("b", "dir", ""), ("b/old", "file", "old"), ("b/sub", "dir", ""),
                       ("b/sub/deep", "file", "d"), ("c", "file", "c1")])
    upper = tar_bytes([("a/.wh.x", "file", ""), ("b/new", "file", "new"), ("b/.wh..wh..opq", "file", ""),
                       ("c", "file", "c2"), ("d", "symlink", "c")])
    layout = hand_layout(tmp_path / "img", [lower, upper])
    rootfs = tmp_path / "rootfs"
    read = oci.load_layout(layout, rootfs)
    assert len(read.layers) == 2
    assert sorted(p.name for p in (rootfs / "a").iterdir()) == ["y"]
    assert sorted(p.name for p in (rootfs / "b").iterdir()) == ["new"]
    assert (rootfs / "c").read_text() == "c2" and os.readlink(rootfs / "d") == "c"
    assert not any(p.name.startswith(".wh.") for p in rootfs.rglob("*"))


def test_plain_tar_layers_and_tar_archives_of_layouts(tmp_path: Path) -> None:
    layout = hand_layout(tmp_path / "img", [tar_bytes([("hello", "file", "world")])], gz=False)
    archive = tmp_path / "img.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(layout, arcname=".")
    oci.load_layout(archive, tmp_path / "rootfs")
    assert (tmp_path / "rootfs" / "hello").read_text() == "world"


def test_symlinks_in_the_image_cannot_reach_the_host(tmp_path: Path) -> None:
    host_dir = tmp_path / "host"
    host_dir.mkdir()
    layer = tar_bytes([("escape", "symlink", str(host_dir)), ("escape/pwned", "file", "x"),
                       ("up", "symlink", "../../../.."), ("up/pwned2", "file", "y")])
    oci.load_layout(hand_layout(tmp_path / "img", [layer]), tmp_path / "rootfs")
    assert not (host_dir / "pwned").exists()
    # followed as if the rootfs were /: they land inside it
    assert (tmp_path / "rootfs" / str(host_dir).lstrip("/") / "pwned").read_text() == "x"
    assert (tmp_path / "rootfs" / "pwned2").read_text() == "y"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: (p / "oci-layout").unlink(), "'oci-layout' is missing"),
        (lambda p: (p / "index.json").unlink(), "'index.json' is missing"),
        (lambda p: (p / "index.json").write_text("{"), "not valid JSON"),
        (lambda p: (p / "index.json").write_text('{"manifests": []}'), "holds no image"),
        (lambda p: (p / "oci-layout").write_text('{"imageLayoutVersion": "2.0.0"}'), "not supported"),
    ],
)
def test_layout_errors_name_what_is_wrong(tmp_path: Path, damage: object, message: str) -> None:
    layout = hand_layout(tmp_path / "img", [tar_bytes([("f", "file", "1")])])
    damage(layout)  # type: ignore[operator]
    with pytest.raises(ImageError, match=message):
        oci.load_layout(layout, tmp_path / "rootfs")


def test_damaged_and_missing_blobs_are_reported(tmp_path: Path) -> None:
    layout = hand_layout(tmp_path / "img", [tar_bytes([("f", "file", "1")])])
    read = oci.read_layout(layout)
    layer_blob = read.blob(read.layers[0].digest)
    good = layer_blob.read_bytes()
    layer_blob.write_bytes(gzip.compress(tar_bytes([("f", "file", "2")])))
    with pytest.raises(ImageError, match="damaged"):
        oci.load_layout(layout, tmp_path / "r1")
    layer_blob.unlink()
    with pytest.raises(ImageError, match=r"layer 0 blob .* is missing"):
        oci.read_layout(layout)
    layer_blob.write_bytes(good)
    manifest_blob = read.blob(read.manifest_digest)
    manifest_blob.write_bytes(manifest_blob.read_bytes() + b" ")
    with pytest.raises(ImageError, match=r"manifest blob .* is damaged"):
        oci.read_layout(layout)


def test_foreign_architecture_and_unsafe_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="linux/arm64"):
        oci.read_layout(hand_layout(tmp_path / "arm", [tar_bytes([])], arch="arm64"))
    with pytest.raises(ImageError, match="climbs out"):
        oci.load_layout(hand_layout(tmp_path / "evil", [tar_bytes([("../evil", "file", "x")])]),
                        tmp_path / "rootfs")
    with pytest.raises(ImageError, match="not an OCI image layout"):
        oci.read_layout(tmp_path)


def test_store_keeps_oci_images_by_digest(tmp_path: Path) -> None:
    root = make_root(tmp_path / "root")
    build(root, tmp_path / "img")
    store = ImageStore(tmp_path / "store")
    image = oci.add_layout_to_store(tmp_path / "img", "app:1", store)
    again = oci.add_layout_to_store(tmp_path / "img", "app:1", store)
    assert image.digest == again.digest and image.kind == "oci"
    resolved = store.resolve("app:1")
    assert oci.read_layout(resolved.dir).manifest_digest == oci.read_layout(tmp_path / "img").manifest_digest


def test_times_are_zero_unless_kept(tmp_path: Path) -> None:
    root = make_root(tmp_path / "root")
    os.utime(root / "bin" / "app", (1_700_000_000, 1_700_000_000))
    build(root, tmp_path / "zero")
    build(root, tmp_path / "kept", keep_mtimes=True)
    oci.load_layout(tmp_path / "zero", tmp_path / "rz")
    oci.load_layout(tmp_path / "kept", tmp_path / "rk")
    assert (tmp_path / "rz" / "bin" / "app").stat().st_mtime == 0
    assert (tmp_path / "rk" / "bin" / "app").stat().st_mtime == 1_700_000_000
