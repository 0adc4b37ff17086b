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
from uniframe.runtime.qemu import network

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
    monkeypatch.setattr(network.os, "geteuid", lambda: 1000)
    with pytest.raises(RuntimeDriverError, match="--net bridge needs root"):
        network.attach(tmp_path, "0123456789ab", [])


def test_nat_ruleset_publishes_loopback_and_all_addresses() -> None:
    rules = network.nat_ruleset([
        {"host_ip": "127.0.0.1", "host_port": 8080, "guest_ip": "10.88.0.2", "guest_port": 80},
        {"host_ip": "0.0.0.0", "host_port": 9090, "guest_ip": "10.88.0.3", "guest_port": 90},
    ])
    assert "ip daddr 127.0.0.1 tcp dport 8080 dnat to 10.88.0.2:80" in rules
    assert "fib daddr type local tcp dport 9090 dnat to 10.88.0.3:90" in rules
    assert 'ip saddr 127.0.0.0/8 oifname "uniframe0" masquerade' in rules
