"""NoCloud seeds: user data checked up front, a real ISO 9660 ``cidata`` volume out.

The volume is read back with the tools a guest's cloud-init relies on
(``blkid`` for the label, an ISO reader for the files), not with our own code.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from uniframe.build.cloudinit import CloudInitError, check_user_data, make_nocloud_seed
from uniframe.errors import BuildError

pytestmark = pytest.mark.skipif(shutil.which("xorriso") is None, reason="xorriso is not installed")

USER_DATA = "#cloud-config\nruncmd:\n  - echo hello > /dev/ttyS0\n"
NETWORK = "version: 2\nethernets:\n  eth0:\n    dhcp4: true\n"


def _extract(seed: Path, dest: Path) -> dict[str, str]:
    subprocess.run(["xorriso", "-osirrox", "on", "-indev", str(seed), "-extract", "/", str(dest)],
                   check=True, capture_output=True)
    return {p.name: p.read_text() for p in dest.iterdir() if p.is_file()}


def _probe(path: Path) -> dict[str, str]:
    out = subprocess.run(["blkid", "-p", "-o", "export", str(path)], check=True,
                         capture_output=True, text=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_seed_is_an_iso9660_volume_labelled_cidata_with_the_three_files(tmp_path: Path) -> None:
    seed = make_nocloud_seed(USER_DATA, {"instance-id": "i-1", "local-hostname": "web-1"}, NETWORK,
                             tmp_path / "seed.iso")
    probe = _probe(seed)
    assert probe["TYPE"] == "iso9660"
    assert probe["LABEL"] == "cidata"
    files = _extract(seed, tmp_path / "out")
    assert sorted(files) == ["meta-data", "network-config", "user-data"]
    assert files["user-data"] == USER_DATA
    assert yaml.safe_load(files["meta-data"]) == {"instance-id": "i-1", "local-hostname": "web-1"}
    assert files["network-config"] == NETWORK


def test_seed_without_network_config_gets_an_instance_id_from_its_contents(tmp_path: Path) -> None:
    a = make_nocloud_seed(USER_DATA, {}, None, tmp_path / "a.iso")
    files = _extract(a, tmp_path / "a")
    assert sorted(files) == ["meta-data", "user-data"]
    iid = yaml.safe_load(files["meta-data"])["instance-id"]
    assert iid.startswith("iid-")
    b = make_nocloud_seed(USER_DATA.replace("hello", "bye"), {}, None, tmp_path / "b.iso")
    assert yaml.safe_load(_extract(b, tmp_path / "b")["meta-data"])["instance-id"] != iid


def test_same_data_gives_the_same_seed_bytes(tmp_path: Path) -> None:
    digests = {hashlib.sha256(make_nocloud_seed(USER_DATA, {"instance-id": "x"}, NETWORK,
                                                tmp_path / f"{i}.iso").read_bytes()).hexdigest()
               for i in range(2)}
    assert len(digests) == 1


def test_scripts_are_user_data_too(tmp_path: Path) -> None:
    seed = make_nocloud_seed("#!/bin/sh\necho hi\n", {}, None, tmp_path / "s.iso")
    assert _extract(seed, tmp_path / "s")["user-data"].startswith("#!/bin/sh")


@pytest.mark.parametrize(("user_data", "words"), [
    ("runcmd: [ls]\n", "must start with '#cloud-config'"),
    ("", "(empty)"),
    ("#cloud-confg\nruncmd: [ls]\n", "'#cloud-confg'"),
    ("#cloud-config\n- a\n- b\n", "must be a YAML mapping"),
    ("#cloud-config\nruncmd: [ls\n", "not valid YAML"),
])
def test_bad_user_data_is_refused_before_anything_is_written(tmp_path: Path, user_data: str,
                                                             words: str) -> None:
    with pytest.raises(CloudInitError) as err:
        make_nocloud_seed(user_data, {}, None, tmp_path / "seed.iso")
    assert words in str(err.value)
    assert not (tmp_path / "seed.iso").exists()


def test_network_config_must_say_its_version(tmp_path: Path) -> None:
    with pytest.raises(CloudInitError, match="version: 2"):
        make_nocloud_seed(USER_DATA, {}, "ethernets: {}\n", tmp_path / "seed.iso")


def test_cloud_init_errors_are_build_errors() -> None:
    with pytest.raises(BuildError):
        check_user_data("hello")
    check_user_data("#cloud-config\n")   # empty config is valid
