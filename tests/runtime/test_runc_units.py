"""Pieces of the runc driver that need no container: names, the nftables ruleset."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from uniframe.runtime.runc import cgroups, network


def test_names_fit_the_kernels_limits() -> None:
    replica_id = "0123456789ab"
    assert len(network.host_if_name(replica_id)) <= 15  # IFNAMSIZ - 1
    assert network.netns_name(replica_id) == "uf-0123456789ab"
    assert cgroups.cgroups_path(replica_id) == "/uniframe-0123456789ab"


def test_ruleset_publishes_each_port_on_its_address() -> None:
    rules: list[dict[str, object]] = [
        {"host_ip": "127.0.0.1", "host_port": 18080, "guest_port": 8080, "container_ip": "10.89.0.2"},
        {"host_ip": "0.0.0.0", "host_port": 18081, "guest_port": 80, "container_ip": "10.89.0.6"},
    ]
    text = network.nat_ruleset(rules)
    assert text.count("ip daddr 127.0.0.1 tcp dport 18080 dnat to 10.89.0.2:8080") == 2  # prerouting, output
    assert text.count("fib daddr type local tcp dport 18081 dnat to 10.89.0.6:80") == 2
    assert "ip saddr 127.0.0.0/8 ip daddr 10.89.0.0/16 masquerade" in text
    if os.geteuid() != 0 or shutil.which("nft") is None:
        pytest.skip("checking the syntax with nft needs root and nftables")
    check = subprocess.run(["nft", "-c", "-f", "-"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
