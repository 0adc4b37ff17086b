"""The host network book: port claims across drivers, address leases, stale reclaim, the one lock.

Everything here runs against a temporary state directory; the nftables step
is replaced by a recorder so no test touches the host's tables (the real
rules are checked by the root tests in test_hostnet_real.py, test_runc.py
and test_bridge_network.py).
"""

from __future__ import annotations

import ipaddress
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from runtime_helpers import free_port

from uniframe.errors import RuntimeDriverError
from uniframe.runtime import hostnet
from uniframe.runtime.hostnet import claims, nat, pools
from uniframe.runtime.hostnet.records import Owner
from uniframe.runtime.ports import PortInUseError, PortMapping
from uniframe.runtime.process import ProcessRef

NatCall = tuple[str, list[nat.Forward], bool]


@pytest.fixture(autouse=True)
def own_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests make up holdings: they keep them in their own directory, not the host's."""
    monkeypatch.setenv("UNIFRAME_HOSTNET", str(tmp_path / "hostnet"))


@pytest.fixture
def nft(monkeypatch: pytest.MonkeyPatch) -> list[NatCall]:
    """Every table hostnet would write, instead of writing it."""
    calls: list[NatCall] = []

    def record(pool: pools.Pool, forwards: Sequence[nat.Forward], in_use: bool) -> None:
        calls.append((pool.name, list(forwards), in_use))

    monkeypatch.setattr(nat, "apply", record)
    return calls


def owner(state: Path, replica_id: str, driver: str = "runc") -> Owner:
    d = state / "replicas" / replica_id
    d.mkdir(parents=True, exist_ok=True)
    return Owner(replica_id, f"name-{replica_id}", driver, d)


def claim(state: Path, who: Owner, *ports: PortMapping) -> None:
    with hostnet.locked(state) as net:
        net.claim(who, ports)


def dead_process() -> ProcessRef:
    proc = subprocess.Popen(["sleep", "30"])
    ref = ProcessRef.of(proc.pid)
    proc.kill()
    proc.wait()
    return ref


# -- when two ports are the same port -----------------------------------------


@pytest.mark.parametrize(("a", "b", "same"), [
    (("127.0.0.1", 8080), ("127.0.0.1", 8080), True),
    (("0.0.0.0", 8080), ("127.0.0.1", 8080), True),
    (("127.0.0.1", 8080), ("0.0.0.0", 8080), True),
    (("", 8080), ("10.1.2.3", 8080), True),
    (("127.0.0.1", 8080), ("127.0.0.2", 8080), False),
    (("0.0.0.0", 8080), ("0.0.0.0", 8081), False),
])
def test_overlap_treats_the_wildcard_as_every_address(a: tuple[str, int], b: tuple[str, int],
                                                       same: bool) -> None:
    pa, pb = PortMapping(a[1], 80, a[0]), PortMapping(b[1], 80, b[0])
    assert claims.overlap(pa, pb) is same
    assert claims.overlap(pb, pa) is same


def test_other_protocols_do_not_overlap() -> None:
    assert not claims.overlap(PortMapping(53, 53, "0.0.0.0", "udp"), PortMapping(53, 53, "0.0.0.0", "tcp"))


# -- claims across drivers ----------------------------------------------------


def test_a_port_published_by_one_driver_is_refused_to_every_other(tmp_path: Path, nft: list[NatCall]) -> None:
    port = free_port()
    container = owner(tmp_path, "c0ffee000001", "runc")
    claim(tmp_path, container, PortMapping(port, 8080))
    for driver in ("process", "qemu-microvm", "qemu-vm"):
        other = owner(tmp_path, f"{driver[:4]}00000002", driver)
        with pytest.raises(PortInUseError) as err:
            claim(tmp_path, other, PortMapping(port, 9000, "0.0.0.0"))
        message = str(err.value)
        assert f"already published by replica {container.replica_id} ({container.name}, runc)" in message
        assert "-p OTHER:9000" in message
    # another address on the same port is another port
    claim(tmp_path, owner(tmp_path, "0000000000aa", "process"), PortMapping(port, 9000, "127.0.0.2"))
    assert nft == []  # no pool was touched: nothing to rewrite


def test_the_wildcard_claim_blocks_a_later_loopback_claim(tmp_path: Path, nft: list[NatCall]) -> None:
    port = free_port()
    claim(tmp_path, owner(tmp_path, "aaaaaaaaaaaa", "qemu-microvm"), PortMapping(port, 80, "0.0.0.0"))
    with pytest.raises(PortInUseError, match="already published by replica aaaaaaaaaaaa"):
        claim(tmp_path, owner(tmp_path, "bbbbbbbbbbbb", "process"), PortMapping(port, 80))


def test_a_replica_may_claim_again_and_release_frees(tmp_path: Path, nft: list[NatCall]) -> None:
    port = free_port()
    first, second = owner(tmp_path, "111111111111"), owner(tmp_path, "222222222222", "process")
    claim(tmp_path, first, PortMapping(port, 80))
    claim(tmp_path, first, PortMapping(port, 80))  # a restart claims the same again
    hostnet.release(tmp_path, first.replica_id)
    hostnet.release(tmp_path, first.replica_id)  # twice is fine
    claim(tmp_path, second, PortMapping(port, 80))
    with hostnet.locked(tmp_path) as net:
        assert [h.owner.replica_id for h in net.holdings()] == [second.replica_id]


def test_one_request_cannot_take_a_port_twice(tmp_path: Path, nft: list[NatCall]) -> None:
    port = free_port()
    with pytest.raises(PortInUseError, match="published twice"):
        claim(tmp_path, owner(tmp_path, "333333333333"), PortMapping(port, 80, "0.0.0.0"),
              PortMapping(port, 81, "127.0.0.1"))
    with hostnet.locked(tmp_path) as net:
        assert net.holdings() == []  # all or nothing


def test_a_port_something_else_listens_on_is_refused(tmp_path: Path, nft: list[NatCall]) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(PortInUseError, match=f"127.0.0.1:{port} is already in use"):
            claim(tmp_path, owner(tmp_path, "444444444444"), PortMapping(port, 80))


# -- nothing leaks for ever ---------------------------------------------------


def test_ports_of_a_replica_whose_directory_is_gone_are_reclaimed(tmp_path: Path, nft: list[NatCall]) -> None:
    port = free_port()
    gone = owner(tmp_path, "555555555555")
    claim(tmp_path, gone, PortMapping(port, 80))
    gone.dir.rmdir()
    claim(tmp_path, owner(tmp_path, "666666666666", "process"), PortMapping(port, 80))


def test_ports_of_a_replica_whose_processes_died_are_reclaimed(tmp_path: Path, nft: list[NatCall]) -> None:
    port = free_port()
    crashed = owner(tmp_path, "777777777777")
    claim(tmp_path, crashed, PortMapping(port, 80))
    hostnet.bind(tmp_path, crashed.replica_id, dead_process())
    claim(tmp_path, owner(tmp_path, "888888888888", "process"), PortMapping(port, 80))


def test_a_claim_lives_with_the_replica_process_not_the_claimer(tmp_path: Path, nft: list[NatCall]) -> None:
    """As with `uniframe run -d`: the CLI claims, launches, binds and exits; the claim stays."""
    port = free_port()
    runner = owner(tmp_path, "999999999999", "process")
    replica = subprocess.Popen(["sleep", "30"])
    try:
        script = ("import sys; from pathlib import Path; from uniframe.runtime import hostnet; "
                  "from uniframe.runtime.hostnet.records import Owner; "
                  "from uniframe.runtime.ports import PortMapping; "
                  "from uniframe.runtime.process import ProcessRef; "
                  f"s = Path({str(tmp_path)!r}); o = Owner({runner.replica_id!r}, 'r', 'process', "
                  f"Path({str(runner.dir)!r})); "
                  "net = hostnet.locked(s)\n"
                  f"with net as n: n.claim(o, [PortMapping({port}, 80)])\n"
                  f"hostnet.bind(s, o.replica_id, ProcessRef.of({replica.pid}))")
        subprocess.run([sys.executable, "-c", script], check=True, timeout=30)
        with pytest.raises(PortInUseError, match=runner.replica_id):
            claim(tmp_path, owner(tmp_path, "aaaaaaaaaaa1"), PortMapping(port, 80))
    finally:
        replica.kill()
        replica.wait()
    claim(tmp_path, owner(tmp_path, "aaaaaaaaaaa1"), PortMapping(port, 80))


def test_a_claimer_that_crashed_before_launching_leaks_nothing(tmp_path: Path, nft: list[NatCall]) -> None:
    port = free_port()
    script = ("from pathlib import Path; from uniframe.runtime import hostnet; "
              "from uniframe.runtime.hostnet.records import Owner; "
              "from uniframe.runtime.ports import PortMapping\n"
              f"with hostnet.locked(Path({str(tmp_path)!r})) as n: "
              f"n.claim(Owner('bbbbbbbbbbb1', 'b', 'qemu-microvm', Path({str(owner(tmp_path, 'bbbbbbbbbbb1').dir)!r})), "
              f"[PortMapping({port}, 80)])")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=30)
    claim(tmp_path, owner(tmp_path, "ccccccccccc1", "process"), PortMapping(port, 80))


def test_a_dead_replica_keeps_its_lease_but_not_its_ports(tmp_path: Path, nft: list[NatCall]) -> None:
    port = free_port()
    crashed = owner(tmp_path, "dddddddddddd")
    with hostnet.locked(tmp_path) as net:
        net.claim(crashed, [PortMapping(port, 80)])
        lease = net.lease(crashed.replica_id, hostnet.VETH)
        net.bind(crashed.replica_id, [dead_process()])
    assert nft[-1] == ("veth", [(PortMapping(port, 80), lease.guest_ip)], True)
    with hostnet.locked(tmp_path) as net:
        held = net.holding(crashed.replica_id)
        assert held is not None and held.ports == () and held.leases == (("veth", lease.index),)
        assert net.orphans(hostnet.VETH) == []  # its devices are still there: its driver releases it
    assert nft[-1] == ("veth", [], True)  # the table lost the dead replica's DNAT at once
    crashed.dir.rmdir()
    with hostnet.locked(tmp_path) as net:
        assert net.orphans(hostnet.VETH) == [crashed.replica_id]
        net.release(crashed.replica_id)
    assert nft[-1] == ("veth", [], False)  # no lease left: the table goes


# -- address leases -----------------------------------------------------------


def test_leases_come_from_one_allocator_and_never_overlap(tmp_path: Path, nft: list[NatCall]) -> None:
    ids = [f"{i:012x}" for i in range(1, 5)]
    with hostnet.locked(tmp_path) as net:
        for replica_id in ids:
            net.claim(owner(tmp_path, replica_id), [])
        veths = [net.lease(replica_id, hostnet.VETH) for replica_id in ids[:2]]
        bridged = [net.lease(replica_id, hostnet.BRIDGE) for replica_id in ids[2:]]
        assert net.lease(ids[0], hostnet.VETH) == veths[0]  # asking again: the same block
    assert [(v.host_ip, v.guest_ip) for v in veths] == [("10.89.0.1", "10.89.0.2"), ("10.89.0.5", "10.89.0.6")]
    assert [b.guest_ip for b in bridged] == ["10.88.0.2", "10.88.0.3"]  # .1 is the bridge itself
    blocks = [lease.block for lease in veths + bridged]
    assert not any(a.overlaps(b) for i, a in enumerate(blocks) for b in blocks[i + 1:])
    hostnet.release(tmp_path, ids[0])
    with hostnet.locked(tmp_path) as net:
        net.claim(owner(tmp_path, "ffffffffffff"), [])
        assert net.lease("ffffffffffff", hostnet.VETH) == veths[0]  # a freed block is handed on


def test_a_lease_needs_a_claim_first(tmp_path: Path, nft: list[NatCall]) -> None:
    with hostnet.locked(tmp_path) as net, pytest.raises(RuntimeDriverError, match="claim first"):
        net.lease("0123456789ab", hostnet.BRIDGE)


def test_pools_are_disjoint_and_a_full_pool_says_so() -> None:
    pools.check_disjoint(pools.POOLS.values())
    clash = pools.Pool("x", ipaddress.IPv4Network("10.88.128.0/24"), 30, "uniframe_x", 2)
    with pytest.raises(ValueError, match="overlap"):
        pools.check_disjoint([*pools.POOLS.values(), clash])
    tiny = pools.Pool("tiny", ipaddress.IPv4Network("10.99.0.0/29"), 30, "t", 2, frozenset({0}))
    assert tiny.size == 2 and tiny.free_index([]) == 1 and tiny.free_index([1]) is None


def test_nat_table_forwards_loopback_and_every_address() -> None:
    text = nat.ruleset(hostnet.BRIDGE, [(PortMapping(8080, 80), "10.88.0.2"),
                                        (PortMapping(9090, 90, "0.0.0.0"), "10.88.0.3")])
    assert text.startswith("table ip uniframe {")
    assert text.count("ip daddr 127.0.0.1 tcp dport 8080 dnat to 10.88.0.2:80") == 2  # prerouting + output
    assert text.count("fib daddr type local tcp dport 9090 dnat to 10.88.0.3:90") == 2
    assert "ip saddr 127.0.0.0/8 ip daddr 10.88.0.0/16 masquerade" in text
    assert "ip saddr 10.88.0.0/16 ip daddr != 10.88.0.0/16 masquerade" in text
    veth = nat.ruleset(hostnet.VETH, [(PortMapping(18081, 80, "0.0.0.0"), "10.89.0.6")])
    assert veth.startswith("table ip uniframe_runc {")
    assert "ip saddr 127.0.0.0/8 ip daddr 10.89.0.0/16 masquerade" in veth
    if os.geteuid() != 0 or shutil.which("nft") is None:
        pytest.skip("checking the syntax with nft needs root and nftables")
    for table in (text, veth):
        check = subprocess.run(["nft", "-c", "-f", "-"], input=table, capture_output=True, text=True)
        assert check.returncode == 0, check.stderr


# -- one lock for every process -----------------------------------------------


def _race(state: str, replica_id: str, port: int, barrier: multiprocessing.synchronize.Barrier,
          results: multiprocessing.Queue[str]) -> None:
    from uniframe.runtime import ports as host_ports
    from uniframe.runtime.hostnet import session

    def slow_check(wanted: list[PortMapping]) -> None:
        host_ports.ensure_free(wanted)
        time.sleep(0.3)  # widen the gap between checking and writing: only the lock closes it

    setattr(session, "ensure_free", slow_check)  # noqa: B010 (a forked child: nothing to undo)
    who = Owner(replica_id, replica_id, "process", Path(state) / replica_id)
    who.dir.mkdir()
    barrier.wait()
    try:
        with hostnet.locked(Path(state)) as net:
            net.claim(who, [PortMapping(port, 80)])
        results.put(f"won {replica_id}")
    except PortInUseError as exc:
        results.put(f"refused {replica_id}: {exc}")


def test_concurrent_claimers_in_two_processes_get_one_winner(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    port = free_port()
    barrier = ctx.Barrier(2)
    results: multiprocessing.Queue[str] = ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(tmp_path), rid, port, barrier, results))
             for rid in ("aaaa00000001", "bbbb00000002")]
    for p in procs:
        p.start()
    outcomes = sorted(results.get(timeout=30) for _ in procs)
    for p in procs:
        p.join(10)
    assert [o.split()[0] for o in outcomes] == ["refused", "won"], outcomes
    winner = outcomes[1].split()[1]
    assert f"already published by replica {winner}" in outcomes[0]


def test_the_lock_holds_other_processes_off(tmp_path: Path) -> None:
    port = free_port()
    script = ("import os; from pathlib import Path; from uniframe.runtime import hostnet; "
              "from uniframe.runtime.hostnet.records import Owner; "
              "from uniframe.runtime.ports import PortMapping; "
              "from uniframe.runtime.process import ProcessRef\n"
              f"d = Path({str(tmp_path)!r}) / 'other'; d.mkdir()\n"
              f"with hostnet.locked(Path({str(tmp_path)!r})) as n:\n"
              f"    n.claim(Owner('other0000001', 'o', 'runc', d), [PortMapping({port}, 80)])\n"
              "    n.bind('other0000001', [ProcessRef.of(os.getppid())])  # us: keep the claim alive")
    with hostnet.locked(tmp_path):
        other = subprocess.Popen([sys.executable, "-c", script])
        time.sleep(1.0)
        assert other.poll() is None  # still waiting for the lock
    assert other.wait(timeout=30) == 0
    with hostnet.locked(tmp_path) as net:
        assert [h.owner.replica_id for h in net.holdings()] == ["other0000001"]


# -- records of earlier versions ----------------------------------------------


def test_the_per_driver_books_of_earlier_versions_are_taken_over(tmp_path: Path, nft: list[NatCall]) -> None:
    """A bridged microVM and a container started before the upgrade keep their address and port."""
    me = ProcessRef.of(os.getpid())
    bridge_port, runc_port = free_port(), free_port()
    for replica_id, book, lease, port, target in (
        ("0b0b0b0b0b0b", "network", "10.88.0.2", bridge_port, {"guest_ip": "10.88.0.2"}),
        ("0c0c0c0c0c0c", "runc-network", "0", runc_port, {"container_ip": "10.89.0.2"}),
    ):
        (tmp_path / book / "leases").mkdir(parents=True, exist_ok=True)
        (tmp_path / book / "ports").mkdir(exist_ok=True)
        (tmp_path / book / "leases" / lease).write_text(replica_id)
        rule = {**PortMapping(port, 80).to_json(), **target}
        (tmp_path / book / "ports" / f"{replica_id}.json").write_text(json.dumps([rule]))
        d = tmp_path / "replicas" / replica_id
        d.mkdir(parents=True)
        (d / "replica.json").write_text(json.dumps({"id": replica_id, "name": f"old-{book}",
                                                    "driver": "x", "pid": me.pid,
                                                    "pid_start_time": me.start_time}))
    with hostnet.locked(tmp_path) as net:
        held = {h.owner.replica_id: (h.owner.name, h.ports, h.leases) for h in net.holdings()}
        assert held == {
            "0b0b0b0b0b0b": ("old-network", (PortMapping(bridge_port, 80),), (("bridge", 2),)),
            "0c0c0c0c0c0c": ("old-runc-network", (PortMapping(runc_port, 80),), (("veth", 0),)),
        }
        newcomer = owner(tmp_path, "0d0d0d0d0d0d")
        with pytest.raises(PortInUseError, match="already published by replica 0c0c0c0c0c0c"):
            net.claim(newcomer, [PortMapping(runc_port, 80, "0.0.0.0")])
        net.claim(newcomer, [])
        assert net.lease(newcomer.replica_id, hostnet.VETH).index == 1  # block 0 is still taken
    assert not (tmp_path / "network").exists() and (tmp_path / "network.imported").is_dir()
    assert ("veth", [(PortMapping(runc_port, 80), "10.89.0.2")], True) in nft  # DNAT rewritten


def test_the_records_are_the_hosts_for_root_and_the_state_roots_otherwise(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two state roots on one host share root's records (one lock, one nftables table each)."""
    from uniframe.runtime.hostnet.session import HOST_DIR, hostnet_dir

    monkeypatch.delenv("UNIFRAME_HOSTNET")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert hostnet_dir(tmp_path / "a") == hostnet_dir(tmp_path / "b") == HOST_DIR
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert hostnet_dir(tmp_path / "a") == tmp_path / "a" / "hostnet"
    monkeypatch.setenv("UNIFRAME_HOSTNET", str(tmp_path / "elsewhere"))
    assert hostnet_dir(tmp_path / "a") == tmp_path / "elsewhere"
