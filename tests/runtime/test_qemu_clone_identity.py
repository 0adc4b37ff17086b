"""Clones of one template are unique: real QEMU (TCG), the real iris unikernel.

Two clones restored from one snapshot must draw different random values from
their kernels, have different hostnames and a wall clock within 1 s of the
host's (the template's clock stopped at the snapshot). Each restore waits for
the guest init's acknowledgement; what the guest reported there (its hostname,
clock and a UUID from its reseeded CRNG) is read back from its console log.
The cost of the step (the ``_before_serving`` hook, median of 5) is printed.
"""

from __future__ import annotations

import statistics
import time

import pytest
from runtime_helpers import free_port
from test_qemu_snapshot import _config, _until_inference, iris

from uniframe.build.store import Image
from uniframe.runtime.qemu.clone_identity import CloneAck, clone_hostname, parse_ack
from uniframe.runtime.qemu.driver import QemuMicroVMDriver
from uniframe.runtime.qemu.microvm import CONSOLE_LOG
from uniframe.runtime.replica import Replica

pytestmark = [pytest.mark.qemu, pytest.mark.slow]
__all__ = ["iris"]  # the module-scoped image fixture, shared with the snapshot tests


def _ack(clone: Replica) -> CloneAck:
    """The acknowledgement in the clone's console log (QEMU logs it just after the socket has it)."""
    deadline = time.monotonic() + 5
    while True:
        log = (clone.dir / CONSOLE_LOG).read_bytes()
        start = log.rfind(b"uniframe:clone-ok nonce=")
        if (start >= 0 and b"\n" in log[start:]) or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert start >= 0, log[-2000:]
    assert b"seed=" not in log  # the console does not echo the host's line into its log
    nonce = log[start:].split(b"nonce=", 1)[1].split()[0].decode()
    ack = parse_ack(log, nonce)
    assert ack is not None
    return ack


def test_clones_of_one_template_differ_and_keep_time(driver: QemuMicroVMDriver, iris: Image,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    source = driver.start(driver.create(_config(iris, port, snapshottable=True)).id)
    _until_inference(port, 180)
    snap = driver.snapshot(source.id)
    time.sleep(2)  # the template's wall clock now lags the host's by more than the bound

    hook = driver._before_serving
    took: list[float] = []

    def timed(replica: Replica) -> None:
        started = time.monotonic()
        hook(replica)
        took.append(time.monotonic() - started)

    monkeypatch.setattr(driver, "_before_serving", timed)
    acks: list[CloneAck] = []
    for _ in range(5):
        clone_port = free_port()
        clone = driver.restore(snap, _config(iris, clone_port))
        host_ns = time.time_ns()  # restore returns once the guest acknowledged
        ack = _ack(clone)
        # The guest's clock when it acknowledged, against the host's just after.
        assert abs(host_ns - ack.time_ns) < 1e9, (host_ns - ack.time_ns) / 1e9
        assert ack.hostname == clone_hostname(clone.name)
        _until_inference(clone_port, 30)  # and it serves
        acks.append(ack)
        driver.remove(clone.id, force=True)
    print(f"clone identity step, median of 5: {statistics.median(took) * 1000:.1f} ms "
          f"({', '.join(f'{t * 1000:.1f}' for t in took)}); in the guest "
          f"{statistics.median(a.took_ms for a in acks):.1f} ms")
    assert len({a.uuid for a in acks}) == 5, acks  # each clone's CRNG is its own
    assert len({a.hostname for a in acks}) == 5, acks
    assert all(len(a.uuid) == 36 for a in acks), acks
    driver.remove(source.id, force=True)
