"""The reaper: orphans go, the app's own children keep their exit status."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from uniframe.guest.reaper import Reaper, zombie_children


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def exited_child(code: int) -> subprocess.Popen[bytes]:
    """A child of this process that has exited and is not waited for: a zombie."""
    child = subprocess.Popen([sys.executable, "-c", f"raise SystemExit({code})"])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        stat = Path(f"/proc/{child.pid}/stat").read_bytes()
        if stat[stat.rindex(b")") + 2:].split()[0] == b"Z":
            return child
        time.sleep(0.01)
    raise AssertionError("the child did not exit")


def test_young_zombies_are_left_to_the_app() -> None:
    clock = Clock()
    reaper = Reaper(5.0, clock=clock)
    child = exited_child(4)
    assert (child.pid, ) == tuple(pid for pid, _ in zombie_children(__import__("os").getpid()))
    assert reaper.reap_once() == []
    clock.now += 4.9
    assert reaper.reap_once() == []
    assert child.wait(timeout=5) == 4  # the app still gets the real status
    clock.now += 10
    assert reaper.reap_once() == []  # nothing left to reap, nothing remembered
    assert reaper.reaped == []


def test_zombies_older_than_the_grace_are_reaped() -> None:
    clock = Clock()
    seen: list[tuple[int, int]] = []
    reaper = Reaper(5.0, clock=clock, on_reap=lambda pid, code: seen.append((pid, code)))
    first = exited_child(4)
    assert reaper.reap_once() == []
    clock.now += 3
    second = exited_child(9)
    assert reaper.reap_once() == []
    clock.now += 2.5  # first is 5.5 s old, second 2.5 s
    assert reaper.reap_once() == [(first.pid, 4)]
    clock.now += 3
    assert reaper.reap_once() == [(second.pid, 9)]
    assert seen == reaper.reaped == [(first.pid, 4), (second.pid, 9)]
    # The documented trade-off: a child left unwaited past the grace loses its status.
    assert first.wait(timeout=5) == 0


def test_no_children_is_quiet() -> None:
    assert Reaper(0.0).reap_once() == []


def test_proc_parsing_survives_odd_process_names(tmp_path: Path) -> None:
    rest = " ".join(str(n) for n in range(40))
    for pid, comm, state, ppid, start in [(11, "a) Z 7 (b", "Z", 7, 501), (12, "x y", "Z", 8, 502),
                                          (13, "ok", "S", 7, 503), (14, "z", "Z", 7, 504)]:
        (tmp_path / str(pid)).mkdir()
        fields = f"{state} {ppid} " + " ".join(["0"] * 17) + f" {start} {rest}"
        (tmp_path / str(pid) / "stat").write_text(f"{pid} ({comm}) {fields}\n")
    (tmp_path / "self").mkdir()
    (tmp_path / "15").mkdir()  # vanished between listdir and open
    assert zombie_children(7, str(tmp_path)) == {(11, 501), (14, 504)}
    assert zombie_children(7, str(tmp_path / "missing")) == set()
