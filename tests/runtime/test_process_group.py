"""Waiting for a whole process group to be gone, not only its leader."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from uniframe.runtime.process import group_members, wait_group_gone


def test_a_killed_group_is_waited_for_until_every_member_is_gone() -> None:
    leader = subprocess.Popen(["sh", "-c", "sleep 30 & sleep 30 & wait"], start_new_session=True)
    try:
        deadline = time.monotonic() + 5
        while len(group_members(leader.pid)) < 3:  # the shell and its two sleeps
            assert time.monotonic() < deadline, group_members(leader.pid)
            time.sleep(0.02)
        assert not wait_group_gone(leader.pid, 0.2)  # still running: times out, says so
        os.killpg(leader.pid, signal.SIGKILL)
        leader.wait()
        assert wait_group_gone(leader.pid, 5)
        assert group_members(leader.pid) == []
    finally:
        if leader.poll() is None:
            os.killpg(leader.pid, signal.SIGKILL)
            leader.wait()
