"""The in-memory fake driver behind the reconciler, for tests whose subject is control logic.

Specs keep ``runtime: process`` (so images are the cheap process images the
builder already makes), but the registry handed to the reconciler maps that
runtime to the ``fake`` driver: every replica is simulated in this process,
answers OIP on its published port, and can be crashed or hung on demand
(``FakeDriver.crash``/``hang``), where a real process would need a signal and
a second of Python start-up per restart. The real-driver end-to-end tests
(``test_daemon_runtimes.py``, ``test_rollouts.py``, ``test_daemon.py``) stay.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from uniframe.runtime.fake import BehaviorSource, FakeDriver
from uniframe.runtime.registry import REGISTRY, Registry


def fake_registry() -> Registry:
    """A registry whose only driver is the fake, serving the ``process`` runtime and images."""
    fake = REGISTRY.entry("fake")
    return Registry([replace(fake, runtimes=("process",), image_kinds=("process",))])


def fake_driver(state_root: Path, behavior: BehaviorSource | None = None) -> FakeDriver:
    """The fake the reconciler uses for replicas under ``state_root`` (the same simulated host),
    for a test to inspect and to inject crashes and hangs; ``behavior`` applies from the next start."""
    return FakeDriver(state_root / "replicas", behavior)
