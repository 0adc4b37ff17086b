"""Run inside a fresh network namespace (``unshare --net``) by test_bridge_network.py.

Boots the test image with ``--net bridge`` and checks, from the host side of
the namespace: the guest's leased address answers directly, the published
port answers on 127.0.0.1 (nftables DNAT), a second replica cannot take the
same host port, and stopping removes the tap, the lease, the port claim and
the bridge's nftables table.
Exits non-zero (an AssertionError) on the first thing that is wrong.
Usage: python netns_bridge_check.py IMAGE_DIR STATE_DIR
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
from runtime_helpers import GUEST_PORT, READY, image_ref, wait_for

from uniframe.runtime import hostnet
from uniframe.runtime.ports import PortInUseError, PortMapping
from uniframe.runtime.qemu import network
from uniframe.runtime.qemu.driver import CONSOLE_LOG, QemuMicroVMDriver
from uniframe.runtime.replica import ReplicaConfig, ReplicaState


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def leased_ip(state: Path, replica_id: str) -> str:
    with hostnet.locked(state) as net:
        holding = net.holding(replica_id)
        assert holding is not None, f"replica {replica_id} holds nothing"
        return net.lease(replica_id, hostnet.BRIDGE).guest_ip


def main(image: Path, state: Path) -> None:
    sh("ip", "link", "set", "lo", "up")
    driver = QemuMicroVMDriver(state / "replicas")
    config = ReplicaConfig(image=image_ref(image), ports=(PortMapping(18080, GUEST_PORT),),
                           accel="tcg", network="bridge", memory_mib=128)
    replica = driver.start(driver.create(config).id)
    try:
        guest_ip, tap = leased_ip(state, replica.id), network.tap_name(replica.id)
        assert guest_ip == "10.88.0.2", guest_ip
        wait_for(replica.dir / CONSOLE_LOG, READY)
        assert f"ip={guest_ip}::10.88.0.1:255.255.0.0::eth0:off" in " ".join(replica.argv)
        assert tap in sh("ip", "-br", "link", "show", "master", "uniframe0")
        assert "dnat to 10.88.0.2:8080" in sh("nft", "list", "table", "ip", "uniframe")

        direct = httpx.get(f"http://{guest_ip}:{GUEST_PORT}/", timeout=10)
        assert direct.text == "hello from the test guest\n", direct.text
        published = httpx.get("http://127.0.0.1:18080/", timeout=10)
        assert published.text == "hello from the test guest\n", published.text

        second = driver.create(config)
        try:
            driver.start(second.id)
            raise AssertionError("a second replica took host port 18080")
        except PortInUseError as exc:
            print(f"second replica refused: {exc}")
        driver.remove(second.id, force=True)

        status = driver.stop(replica.id, timeout=30)
        assert (status.state, status.exit_status) == (ReplicaState.EXITED, 0), status
        assert tap not in sh("ip", "-br", "link")
        with hostnet.locked(state) as net:
            assert net.holdings() == []  # no lease, no port claim
        assert "table ip uniframe\n" not in sh("nft", "list", "tables") + "\n"  # no guest, no table
    finally:
        for r in driver.list():
            driver.remove(r.id, force=True)
    print("bridge networking ok")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
