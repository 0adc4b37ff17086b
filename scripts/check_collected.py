"""Fail when a test file that git tracks is not collected by pytest.

pytest skips folders silently: its default ``norecursedirs`` holds ``build``,
and for a long time every test under ``tests/build`` (136 of them: closure,
OCI, rootfs, kernel, VM disk, unikernel) was never run while the suite stayed
green. A rename, a new ``norecursedirs`` pattern or a misspelt file name can do
the same again, and nothing in a passing run shows it. This guard compares the
tracked ``tests/**/test_*.py`` files with the files behind the ids that
``python3 -m pytest --collect-only -q`` prints, and names each one missing.

A file skipped as a whole at import (``pytest.importorskip``) counts as
collected: pytest found it and says so in its ``SKIPPED`` summary line.

    python3 scripts/check_collected.py      # from anywhere in the checkout
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

REPO = Path(__file__).resolve().parent.parent
# "SKIPPED [1] tests/serve/test_x.py:9: could not import ..." (from -ra), also
# printed for a module that skipped itself during collection.
_SKIPPED = re.compile(r"^SKIPPED \[\d+\] (?P<path>[^:\s]+\.py):")
# "ERROR tests/control/test_api.py" or "ERROR tests/x.py::test_y - reason": a file
# pytest found but could not import; a different fix than a file it never looked at.
_ERROR = re.compile(r"^ERROR (?P<path>[^:\s]+\.py)(?:::|\s|$)")


def is_test_file(path: str) -> bool:
    """Whether ``path`` (relative to the checkout, ``/``-separated) is a test module under tests/."""
    p = PurePosixPath(path)
    return p.parts[:1] == ("tests",) and p.name.startswith("test_") and p.suffix == ".py"


def collected_files(output: str) -> set[str]:
    """The files named by ``pytest --collect-only -q`` output: ids and module-level skips."""
    files: set[str] = set()
    for line in output.splitlines():
        line = line.strip()
        if "::" in line and not line.startswith(("SKIPPED", "ERROR", "FAILED")):
            files.add(line.split("::", 1)[0])
            continue
        m = _SKIPPED.match(line)
        if m:
            files.add(m["path"])
    return files


def errored_files(output: str) -> set[str]:
    """The files ``pytest --collect-only -q`` names in its ``ERROR`` summary lines."""
    return {m["path"] for line in output.splitlines() if (m := _ERROR.match(line.strip()))}


def missing_files(tracked: Iterable[str], output: str) -> list[str]:
    """The tracked test files that the collection output names neither as collected nor as errors."""
    seen = collected_files(output) | errored_files(output)
    return sorted(p for p in tracked if is_test_file(p) and p not in seen)


def _tracked_test_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z", "--", "tests"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    # a tracked file deleted in the working tree is not a collection problem
    return [p for p in out.split("\0") if p and is_test_file(p) and (REPO / p).is_file()]


def main() -> int:
    tracked = _tracked_test_files()
    run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                          "-p", "no:cacheprovider"],
                         cwd=REPO, capture_output=True, text=True)
    missing = missing_files(tracked, run.stdout)
    if run.returncode != 0:
        errors = sorted(errored_files(run.stdout))
        detail = ("\n".join(f"  {p}" for p in errors) if errors else
                  "\n".join(run.stdout.splitlines()[-30:] + run.stderr.splitlines()[-10:]))
        print(f"check_collected: pytest --collect-only exited with {run.returncode}; "
              f"files that failed to collect (run pytest on them to see why):\n{detail}",
              file=sys.stderr)
    if missing:
        print(f"check_collected: {len(missing)} tracked test file(s) not collected by pytest "
              "(check norecursedirs/testpaths in pyproject.toml and the file names):",
              file=sys.stderr)
        for path in missing:
            print(f"  {path}", file=sys.stderr)
    if run.returncode != 0 or missing:
        return 1
    print(f"check_collected: all {len(tracked)} tracked test files are collected")
    return 0


if __name__ == "__main__":
    sys.exit(main())
