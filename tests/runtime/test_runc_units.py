"""Pieces of the runc driver that need no container: names (the nftables table is hostnet's: test_hostnet.py)."""

from __future__ import annotations

from uniframe.runtime.runc import cgroups, network


def test_names_fit_the_kernels_limits() -> None:
    replica_id = "0123456789ab"
    assert len(network.host_if_name(replica_id)) <= 15  # IFNAMSIZ - 1
    assert network.netns_name(replica_id) == "uf-0123456789ab"
    assert cgroups.cgroups_path(replica_id) == "/uniframe-0123456789ab"
