"""The clone line the host types on a restored clone's console: parsing, and what init does with it."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest
from guest_support import write_to_fifo

from uniframe.guest import clone, init
from uniframe.guest.clone import CloneMessage, CloneMessageError, is_request, parse
from uniframe.guest.stop import watch_console

SEED = bytes(range(32))
GOOD = CloneMessage("r-1a2b", "iris-1a2b", 1_765_000_000_123_456_789, SEED, "00ff")


def test_a_message_round_trips_through_its_line() -> None:
    line = GOOD.line()
    assert line.endswith(b"\n") and is_request(line)
    assert parse(line) == GOOD
    assert parse(line.rstrip(b"\n") + b"\r") == GOOD  # a tty may leave a carriage return


@pytest.mark.parametrize(("line", "error"), [
    (b"uniframe:shutdown", "not a clone line"),
    (b"uniframe:clone id=a hostname=b time_ns=1 seed=" + SEED.hex().encode(), "missing field.*nonce"),
    (GOOD.line().rstrip() + b" id=x", "field id given twice"),
    (GOOD.line().rstrip() + b" colour=red", "unknown field 'colour=red'"),
    (GOOD.line().rstrip() + b" bare", "unknown field 'bare'"),
    (GOOD.line().replace(b"hostname=iris-1a2b", b"hostname=-bad"), "not a valid hostname"),
    (GOOD.line().replace(b"id=r-1a2b", b"id=a/b"), "id='a/b' must be"),
    (GOOD.line().replace(b"time_ns=1765", b"time_ns=-1765"), "time_ns=.* non-negative integer"),
    (GOOD.line().replace(SEED.hex().encode(), SEED[:16].hex().encode()), "at least 32 bytes"),
    (GOOD.line().replace(SEED.hex().encode(), SEED.hex().upper().encode()), "lowercase hex"),
    (GOOD.line().replace(b"seed=00", b"seed=0"), "lowercase hex"),
])
def test_a_malformed_line_names_what_is_wrong(line: bytes, error: str) -> None:
    with pytest.raises(CloneMessageError, match=error):
        parse(line)


def test_is_request_needs_the_exact_first_word() -> None:
    assert not is_request(b"")
    assert not is_request(b"uniframe:clones id=x")
    assert not is_request(b"say uniframe:clone")
    assert is_request(b"  uniframe:clone \r")


def test_apply_outside_a_vm_reseeds_python_and_sets_the_replica_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(clone.REPLICA_ID_ENV, raising=False)
    random.seed(7)
    ack = clone.apply(GOOD, machine=False)  # the host's clock, pool and name are left alone
    after = random.random()
    random.seed(7)
    assert after != random.random()  # reseeded, not left at the seeded state
    assert os.environ[clone.REPLICA_ID_ENV] == "r-1a2b"
    assert ack.startswith(f"{clone.ACK} nonce=00ff hostname=")
    fields = dict(word.split("=", 1) for word in ack.split()[1:])
    assert abs(int(fields["time_ns"]) - time.time_ns()) < 5e9
    assert len(fields["uuid"]) == 36 and float(fields["took_ms"]) >= 0


def test_add_entropy_sends_the_pool_info_and_a_reseed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[tuple[int, object]] = []
    monkeypatch.setattr("fcntl.ioctl", lambda fd, op, arg=0: calls.append((op, arg)))
    (tmp_path / "random").touch()
    clone.add_entropy(SEED, device=str(tmp_path / "random"))
    assert calls == [(clone.RNDADDENTROPY, (256).to_bytes(4, "little") + (32).to_bytes(4, "little") + SEED),
                     (clone.RNDRESEEDCRNG, 0)]


def test_init_acknowledges_a_clone_line_and_warns_on_a_bad_one(capfd: pytest.CaptureFixture[str]) -> None:
    init.on_console_line(b"hello", machine=False)
    assert capfd.readouterr().err == ""
    init.on_console_line(GOOD.line(), machine=False)
    assert capfd.readouterr().err.startswith(f"{clone.ACK} nonce=00ff ")
    init.on_console_line(b"uniframe:clone id=x", machine=False)
    err = capfd.readouterr().err
    assert "cannot become a clone (missing field(s)" in err and clone.ACK not in err


def test_the_console_reader_hands_other_lines_on(tmp_path: Path) -> None:
    fifo = tmp_path / "console"
    os.mkfifo(fifo)
    shutdowns: list[float] = []
    lines: list[bytes] = []
    watch_console(str(fifo), lambda: shutdowns.append(time.monotonic()), lambda msg: None, lines.append)
    write_to_fifo(fifo, GOOD.line() + b"uniframe:shutdown\npartial")
    deadline = time.monotonic() + 5
    while not (lines and shutdowns) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert lines == [GOOD.line().rstrip(b"\n")] and len(shutdowns) == 1
