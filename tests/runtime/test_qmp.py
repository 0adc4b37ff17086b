"""The QMP client against a scripted QMP server, at every point where QEMU may hang up.

A QEMU that is exiting (its guest just rebooted or powered off) closes the
QMP connection wherever the exchange happens to be. ``stop`` meets exactly
that under load: it sends ``quit`` (or ``system_powerdown``) as the guest
shuts down on its own. Every such moment must end as a result or a
``QmpError``, never as another exception; the last test drives the driver's
``stop`` through the one moment that used to raise ``AssertionError``
(QEMU closing right after the handshake, ``qemu.qmp`` 0.0.6).
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from runtime_helpers import image_ref

from uniframe.runtime.process import ProcessRef
from uniframe.runtime.qemu.driver import QMP_SOCK, QemuMicroVMDriver
from uniframe.runtime.qemu.qmp import Qmp, QmpError
from uniframe.runtime.replica import ReplicaConfig, ReplicaState

GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""},
                    "capabilities": []}}


class Peer:
    """One accepted QMP connection, as the server script sees it."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.buf = ""

    def send(self, message: dict[str, Any]) -> None:
        self.conn.sendall(json.dumps(message).encode() + b"\r\n")

    def answer(self, command: dict[str, Any], message: dict[str, Any]) -> None:
        """A reply to ``command``, carrying its ``id`` if it had one (as QEMU does)."""
        self.send({**message, **({"id": command["id"]} if "id" in command else {})})

    def command(self) -> dict[str, Any]:
        """The next JSON object the client sent (QEMU needs no newline between them)."""
        decoder = json.JSONDecoder()
        while True:
            text = self.buf.lstrip()
            try:
                message, end = decoder.raw_decode(text)
            except json.JSONDecodeError:
                chunk = self.conn.recv(65536)
                assert chunk, "the client hung up"
                self.buf += chunk.decode()
                continue
            self.buf = text[end:]
            assert isinstance(message, dict)
            return message

    def handshake(self) -> None:
        self.send(GREETING)
        caps = self.command()
        assert caps["execute"] == "qmp_capabilities"
        self.answer(caps, {"return": {}})


Script = Callable[[Peer], None]


@pytest.fixture
def qmp_server(tmp_path: Path) -> Iterator[Callable[[Script], Path]]:
    """``serve(script)``: a unix socket whose next connection is handled by ``script``."""
    threads: list[threading.Thread] = []
    errors: list[BaseException] = []

    def serve(script: Script) -> Path:
        path = tmp_path / f"qmp{len(threads)}.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen()

        def run() -> None:
            with listener:
                conn, _ = listener.accept()
                with conn:
                    try:
                        script(Peer(conn))
                    except BaseException as exc:
                        errors.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        threads.append(thread)
        return path

    yield serve
    for thread in threads:
        thread.join(10)
    assert not errors, errors


def test_a_command_returns_its_answer_skipping_events(qmp_server: Callable[[Script], Path]) -> None:
    def script(peer: Peer) -> None:
        peer.handshake()
        cmd = peer.command()
        assert (cmd["execute"], cmd["arguments"]) == ("x-query-virtio-status", {"path": "/m/v"})
        peer.send({"event": "RESUME", "data": {}, "timestamp": {"seconds": 1, "microseconds": 0}})
        peer.answer(cmd, {"return": {"status": "running", "running": True}})

    path = qmp_server(script)
    answer = Qmp(path).execute("x-query-virtio-status", {"path": "/m/v"})
    assert answer == {"status": "running", "running": True}


def test_a_refused_command_names_qemus_reason(qmp_server: Callable[[Script], Path]) -> None:
    def script(peer: Peer) -> None:
        peer.handshake()
        cmd = peer.command()
        peer.answer(cmd, {"error": {"class": "CommandNotFound",
                                    "desc": "The command nope has not been found"}})

    with pytest.raises(QmpError, match="refused QMP nope: The command nope has not been found"):
        Qmp(qmp_server(script)).execute("nope")


@pytest.mark.parametrize("moment", ["at once", "after the greeting", "after the handshake"])
def test_qemu_hanging_up_before_the_command_is_a_qmp_error(
        qmp_server: Callable[[Script], Path], moment: str) -> None:
    """"after the handshake" is the moment ``qemu.qmp`` answered with a bare AssertionError."""
    def script(peer: Peer) -> None:
        if moment == "after the greeting":
            peer.send(GREETING)
        elif moment == "after the handshake":
            peer.handshake()

    path = qmp_server(script)
    with pytest.raises(QmpError, match=r"QMP query-status on .* failed: QEMU closed the connection"):
        Qmp(path, timeout=5).status()
    path = qmp_server(script)
    if moment != "after the handshake":
        with pytest.raises(QmpError, match=r"QMP quit on .* failed"):  # not sent: QEMU may run on
            Qmp(path, timeout=5).quit()
        return
    # Here ``quit`` may or may not have left before the hang-up was seen; sent, it is success.
    with contextlib.suppress(QmpError):
        Qmp(path, timeout=5).quit()


@pytest.mark.parametrize("replies", [True, False])
def test_quit_succeeds_when_qemu_closes_once_it_is_sent(
        qmp_server: Callable[[Script], Path], replies: bool) -> None:
    def script(peer: Peer) -> None:
        peer.handshake()
        cmd = peer.command()
        assert cmd["execute"] == "quit"
        if replies:
            peer.answer(cmd, {"return": {}})

    Qmp(qmp_server(script), timeout=5).quit()


def test_a_silent_qemu_costs_at_most_the_timeout(qmp_server: Callable[[Script], Path]) -> None:
    release = threading.Event()
    path = qmp_server(lambda peer: release.wait(10) and None)
    started = time.monotonic()
    with pytest.raises(QmpError, match="timed out"):
        Qmp(path, timeout=0.3).status()
    assert time.monotonic() - started < 2
    release.set()


def test_no_socket_is_a_qmp_error_and_quit_to_no_socket_succeeds(tmp_path: Path) -> None:
    with pytest.raises(QmpError, match="failed"):
        Qmp(tmp_path / "gone.sock").status()
    Qmp(tmp_path / "gone.sock").quit()  # QEMU exited and took its socket along


def test_stop_survives_qemu_exiting_during_the_quit_handshake(
        state_dir: Path, dummy_image: Path, qmp_server: Callable[[Script], Path]) -> None:
    """The race ``rm -f`` lost under load: the guest shuts down while stop escalates to QMP.

    A stand-in process plays QEMU: no console socket (so stop goes straight to
    QMP after ``timeout``), and the QMP server exits it and hangs up right
    after the handshake, before ``quit`` could be sent.
    """
    driver = QemuMicroVMDriver()
    replica = driver.create(ReplicaConfig(image=image_ref(dummy_image), accel="tcg"))
    stand_in = subprocess.Popen(["sleep", "60"])
    try:
        pref = ProcessRef.of(stand_in.pid)
        driver._save(replica.with_(pid=pref.pid, pid_start_time=pref.start_time))

        def exiting_qemu(peer: Peer) -> None:
            peer.handshake()
            stand_in.kill()

        served = qmp_server(exiting_qemu)
        served.rename(replica.dir / QMP_SOCK)
        status = driver.stop(replica.id, timeout=0.2)
        assert status.state is ReplicaState.CRASHED
        assert "stopped with QMP quit" in status.detail
        assert not pref.alive()
    finally:
        stand_in.kill()
        stand_in.wait()
