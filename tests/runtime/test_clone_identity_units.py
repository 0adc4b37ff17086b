"""The host's half of a clone's identity, against a stand-in guest on a real UNIX socket."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from uniframe.errors import RuntimeDriverError
from uniframe.guest import clone
from uniframe.runtime.qemu.clone_identity import clone_hostname, give_identity, parse_ack


@pytest.mark.parametrize(("name", "hostname"), [
    ("iris-1a2b", "iris-1a2b"), ("Iris_Model.v2", "iris-model-v2"), ("--x--", "x"),
    ("___", "uniframe"), ("a" * 80, "a" * 63), ("a" * 62 + "_b", "a" * 62),
])
def test_clone_hostname(name: str, hostname: str) -> None:
    assert clone_hostname(name) == hostname


def test_parse_ack_waits_for_the_whole_line_of_its_nonce() -> None:
    line = b"uniframe:clone-ok nonce=ab hostname=h time_ns=12 uuid=u-1 took_ms=1.5"
    assert parse_ack(line, "ab") is None  # not yet terminated
    assert parse_ack(line + b"\n", "cd") is None
    ack = parse_ack(b"noise\n" + line + b"\nmore", "ab")
    assert ack is not None and (ack.hostname, ack.time_ns, ack.uuid, ack.took_ms) == ("h", 12, "u-1", 1.5)
    with pytest.raises(RuntimeDriverError, match=r"malformed.*rebuild the image"):
        parse_ack(b"uniframe:clone-ok nonce=ab hostname=h\n", "ab")


Guest = Callable[[socket.socket, bytes], None]


@pytest.fixture
def console(tmp_path: Path) -> Iterator[Callable[[Guest], Path]]:
    """A console socket served by a stand-in guest that gets the first line typed on it."""
    servers: list[socket.socket] = []

    def serve(guest: Guest) -> Path:
        path = tmp_path / "console.sock"
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(path))
        server.listen(1)
        servers.append(server)

        def run() -> None:
            conn, _ = server.accept()
            with conn:
                data = b""
                while b"\n" not in data:
                    data += conn.recv(4096)
                guest(conn, data.split(b"\n")[0])
                time.sleep(0.5)
        threading.Thread(target=run, daemon=True).start()
        return path

    yield serve
    for server in servers:
        server.close()


def test_the_guest_gets_a_fresh_seed_the_clock_and_its_name(console: Callable[[Guest], Path]) -> None:
    got: list[clone.CloneMessage] = []

    def guest(conn: socket.socket, line: bytes) -> None:
        msg = clone.parse(line)
        got.append(msg)
        conn.sendall(b"uniframe:clone " + line[:20] + b"...\n")  # an echo must not count
        conn.sendall((clone.apply(msg, machine=False) + "\n").encode())

    ack = give_identity(console(guest), "r-1", "Iris_1", timeout=5)
    (msg,) = got
    assert (msg.replica_id, msg.hostname, msg.nonce) == ("r-1", "iris-1", ack.nonce)
    assert len(msg.seed) == 64 and abs(msg.time_ns - time.time_ns()) < 5e9


def test_no_acknowledgement_in_time_fails(console: Callable[[Guest], Path]) -> None:
    started = time.monotonic()
    with pytest.raises(RuntimeDriverError, match=r"did not acknowledge .* within 0.3 s"):
        give_identity(console(lambda conn, line: None), "r-1", "iris", timeout=0.3)
    assert time.monotonic() - started < 2


def test_a_refusing_guest_is_reported_at_once(console: Callable[[Guest], Path]) -> None:
    def guest(conn: socket.socket, line: bytes) -> None:
        conn.sendall(b"uniframe: warning: cannot become a clone (seed too short); not acknowledging\n")

    with pytest.raises(RuntimeDriverError, match=r"refused its clone identity \(seed too short\)"):
        give_identity(console(guest), "r-1", "iris", timeout=5)
