"""Where uniframe keeps things on the host, overridable by environment for tests and CI.

- cache (``UNIFRAME_CACHE``, ``~/.cache/uniframe``): rebuildable artifacts (kernels, probes).
- data (``UNIFRAME_DATA``, ``~/.local/share/uniframe``): the image store and model registry.
- state (``UNIFRAME_STATE``, ``~/.local/state/uniframe``): replicas and their logs.
"""

from __future__ import annotations

import os
from pathlib import Path


def _dir(env: str, default: str) -> Path:
    value = os.environ.get(env)
    return Path(value) if value else Path.home() / default


def cache_dir() -> Path:
    return _dir("UNIFRAME_CACHE", ".cache/uniframe")


def data_dir() -> Path:
    return _dir("UNIFRAME_DATA", ".local/share/uniframe")


def state_dir() -> Path:
    return _dir("UNIFRAME_STATE", ".local/state/uniframe")
