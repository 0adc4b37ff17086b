"""``--net bridge`` as root: bridge, tap, leased address and nftables DNAT, in a private netns.

The whole check runs inside a network namespace made for it (``unshare
--net``), so the bridge, taps and NAT rules never touch the host's network.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from uniframe.errors import RuntimeDriverError
from uniframe.runtime import hostnet
from uniframe.runtime.qemu import network
from uniframe.runtime.replica import ImageRef, Replica, ReplicaConfig

HERE = Path(__file__).parent


@pytest.mark.root
@pytest.mark.qemu
@pytest.mark.slow
def test_bridge_network_in_a_private_netns(test_image: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    for tool in ("unshare", "nft", "ip"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (scripts/install.sh installs it)")
    state = tmp_path_factory.mktemp("br")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(["unshare", "--net", sys.executable, str(HERE / "netns_bridge_check.py"),
                           str(test_image), str(state)],
                          capture_output=True, text=True, timeout=300, env=env)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "bridge networking ok" in proc.stdout


def test_bridge_network_refuses_without_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    config = ReplicaConfig(image=ImageRef("img", "", tmp_path, tmp_path), network="bridge")
    replica = Replica(id="0123456789ab", name="r", dir=tmp_path, config=config, created_at="",
                      driver="qemu-microvm")
    with pytest.raises(RuntimeDriverError, match="--net bridge needs root"):
        network.attach(tmp_path, replica)


def test_the_bridge_and_its_pool_agree() -> None:
    assert str(network.GATEWAY) == "10.88.0.1/16"
    assert network.GATEWAY.network == hostnet.BRIDGE.subnet
    assert len(network.tap_name("0123456789abcdef")) <= 15  # IFNAMSIZ - 1
