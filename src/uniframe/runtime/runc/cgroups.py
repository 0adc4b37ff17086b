"""Where runc puts a container's cgroup, and reading its limits back.

runc writes the limits from ``config.json``; reading the files back is how the
driver proves they took effect (a silently ignored limit is worse than an
error). Hosts differ: cgroup v2 has one tree with ``cpu.max`` and
``memory.max``; v1 and the hybrid layout (v1 controllers plus an empty v2
tree at ``/sys/fs/cgroup/unified``, as here) have one directory per
controller. runc's cgroupfs driver makes ``<name>`` under every hierarchy, so
cleanup and leak checks look in all of them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroups_path(replica_id: str) -> str:
    """The ``linux.cgroupsPath`` for a replica: one flat directory, no shared parent to tidy up."""
    return f"/uniframe-{replica_id}"


def unified() -> bool:
    """True on a pure cgroup v2 host."""
    return (CGROUP_ROOT / "cgroup.controllers").is_file()


def directories(name: str) -> list[Path]:
    """Every existing cgroup directory called ``name`` (``cgroups_path`` without the slash)."""
    name = name.lstrip("/")
    if unified():
        return [p for p in [CGROUP_ROOT / name] if p.is_dir()]
    return sorted(p for p in CGROUP_ROOT.glob(f"*/{name}") if p.is_dir())


@dataclass(frozen=True)
class CgroupLimits:
    """Limits as the kernel holds them; ``None`` means unlimited."""

    cpu_quota_us: int | None
    cpu_period_us: int
    memory_bytes: int | None

    @property
    def cpus(self) -> float | None:
        return None if self.cpu_quota_us is None else self.cpu_quota_us / self.cpu_period_us


def _read(path: Path) -> str:
    return path.read_text().strip()


def read_limits(name: str) -> CgroupLimits:
    """The CPU quota and memory limit of the cgroup ``name``; raises OSError if it is gone."""
    name = name.lstrip("/")
    if unified():
        quota, period = _read(CGROUP_ROOT / name / "cpu.max").split()
        memory = _read(CGROUP_ROOT / name / "memory.max")
        return CgroupLimits(None if quota == "max" else int(quota), int(period),
                            None if memory == "max" else int(memory))
    cpu = CGROUP_ROOT / "cpu" / name
    quota_us = int(_read(cpu / "cpu.cfs_quota_us"))
    memory_bytes = int(_read(CGROUP_ROOT / "memory" / name / "memory.limit_in_bytes"))
    # v1 reports "no limit" as -1 for the quota and as a huge page-aligned number for memory
    return CgroupLimits(None if quota_us < 0 else quota_us, int(_read(cpu / "cpu.cfs_period_us")),
                        None if memory_bytes >= 1 << 62 else memory_bytes)


def remove(name: str) -> None:
    """Remove what runc left of the cgroup ``name`` (only empty cgroups can be removed)."""
    for directory in sorted(directories(name), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            directory.rmdir()
