"""NoCloud seeds: how users' own VM disks get their configuration.

cloud-init's NoCloud datasource reads ``user-data``, ``meta-data`` and
optionally ``network-config`` from any file system labelled ``cidata``. An
ISO 9660 volume is what every cloud image's cloud-init understands, is
read-only by nature, and is built from plain files with ``xorriso`` (or
``genisoimage``), so no mount or root is needed. The seed is attached as a
second drive by the VM runtime.

The user data is checked here rather than in the guest, because a mistake found
by cloud-init minutes into a boot under emulation is found far too late: it
must start with ``#cloud-config`` (then be a YAML mapping) or ``#!`` (a script).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

from uniframe.errors import BuildError

VOLUME_LABEL = "cidata"
CLOUD_CONFIG = "#cloud-config"
# Fixed file times inside the ISO, so the same data gives the same seed bytes.
SOURCE_DATE_EPOCH = "1704067200"


class CloudInitError(BuildError):
    """User data, meta data or network config that cloud-init would reject."""


def check_user_data(user_data: str, where: str = "user-data") -> None:
    """Raise :class:`CloudInitError` unless cloud-init would accept ``user_data``."""
    first = user_data.split("\n", 1)[0].rstrip()
    if first.startswith("#!"):
        return
    if first != CLOUD_CONFIG:
        shown = first[:40] or "(empty)"
        raise CloudInitError(
            f"{where} must start with '#cloud-config' (a YAML cloud config) or '#!' (a script), "
            f"but its first line is {shown!r}; add '#cloud-config' as the first line"
        )
    try:
        body = yaml.safe_load(user_data)
    except yaml.YAMLError as exc:
        raise CloudInitError(f"{where} is not valid YAML: {exc}") from None
    if body is not None and not isinstance(body, dict):
        raise CloudInitError(f"{where}: a #cloud-config must be a YAML mapping (key: value), "
                             f"not a {type(body).__name__}")


def _check_network_config(text: str) -> None:
    try:
        body = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CloudInitError(f"network-config is not valid YAML: {exc}") from None
    if not isinstance(body, dict) or not ("version" in body or "network" in body):
        raise CloudInitError("network-config must be a YAML mapping with 'version: 2' (netplan style) "
                             "or 'version: 1', e.g. {version: 2, ethernets: {eth0: {dhcp4: true}}}")


def _iso_tool() -> list[str]:
    xorriso = shutil.which("xorriso")
    if xorriso:
        return [xorriso, "-as", "mkisofs"]
    for name in ("genisoimage", "mkisofs"):
        found = shutil.which(name)
        if found:
            return [found]
    raise BuildError("making a cloud-init seed needs xorriso; install it with "
                     "'apt-get install xorriso' (or run scripts/install.sh)")


def make_nocloud_seed(user_data: str, meta_data: dict[str, Any], network_config: str | None,
                      out: Path) -> Path:
    """Write a ``cidata`` ISO 9660 seed to ``out`` and return it.

    ``meta_data`` gets an ``instance-id`` derived from the contents when it has
    none: cloud-init runs its once-per-instance modules again only when the
    instance id changes.
    """
    check_user_data(user_data)
    if network_config is not None:
        _check_network_config(network_config)
    meta = dict(meta_data)
    if "instance-id" not in meta:
        import hashlib

        digest = hashlib.sha256(json.dumps([user_data, meta, network_config], sort_keys=True).encode())
        meta["instance-id"] = f"iid-{digest.hexdigest()[:16]}"
    with tempfile.TemporaryDirectory(prefix="uniframe-seed-") as tmp:
        root = Path(tmp)
        (root / "user-data").write_text(user_data)
        (root / "meta-data").write_text(yaml.safe_dump(meta, default_flow_style=False, sort_keys=True))
        names = ["user-data", "meta-data"]
        if network_config is not None:
            (root / "network-config").write_text(network_config)
            names.append("network-config")
        for name in names:
            os.utime(root / name, (int(SOURCE_DATE_EPOCH), int(SOURCE_DATE_EPOCH)))
        out.parent.mkdir(parents=True, exist_ok=True)
        argv = [*_iso_tool(), "-quiet", "-output", str(out), "-volid", VOLUME_LABEL,
                "-joliet", "-rock", *names]
        env = {**os.environ, "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH}
        proc = subprocess.run(argv, cwd=root, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            raise BuildError(f"making the cloud-init seed {out} failed: {proc.stderr.strip()}")
    return out
