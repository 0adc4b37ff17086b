"""The daemon's autoscaling: one decider per autoscaled service, fed from its endpoint.

:mod:`.autoscaler` decides; this module owns what a decision needs from the
running daemon: a sampler thread that reads each service's endpoint about once
a second (requests in flight, held ones included, and requests answered), the
deciders themselves (in memory: a new daemon starts watching afresh and only
scales up during its first stable window), demand from the activator
(:meth:`Autoscalers.poke`), and a report of every change of the desired count
(the reconciler turns it into an event and a pass at once).

Why a thread of its own and not the reconciler's passes: a pass may wait
(draining a replica takes up to 30 s, a start some seconds), and windows
with holes would average the wrong thing; sampling is one short control
socket call per service. The reconciler reads the desired count at each pass
(:meth:`Autoscalers.track`) and acts on it through the planner, so scaling
follows the same rules as every other change of the count (rollouts keep
their surge and unavailability limits, no replica is replaced).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from uniframe.control.autoscaler import Autoscaler, Decision, Sample, Settings
from uniframe.errors import UniframeError

__all__ = ["SAMPLE_PERIOD", "Autoscalers", "Load", "ScaleStatus", "describe_change"]

SAMPLE_PERIOD = 1.0  # seconds between two looks at an endpoint (the windows are 6 s and more)


@dataclass(frozen=True)
class Load:
    """What an endpoint reports: requests in flight now (held ones included) and answered so far."""

    in_flight: int
    requests: int


@dataclass(frozen=True)
class ScaleStatus:
    """One autoscaled service as ``get``, ``describe`` and ``/metrics`` show it."""

    service: str
    min: int
    max: int
    desired: int
    ready: int
    metric: str
    target: float
    observed: float   # the metric as the last decision read it (per service, not per replica)
    panicking: bool


@dataclass
class _Tracked:
    scaler: Autoscaler
    ready: int = 0
    last: Decision | None = None


class Autoscalers:
    """Every autoscaled service's decider; sampled by :meth:`run` (or :meth:`sample` in tests)."""

    def __init__(self, load: Callable[[str], Load | None], *,
                 changed: Callable[[str, int, Decision, Settings], None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 period: float = SAMPLE_PERIOD) -> None:
        self._load = load
        self._changed = changed or (lambda _s, _old, _d, _c: None)
        self._clock = clock
        self.period = period
        self._services: dict[str, _Tracked] = {}
        self._lock = threading.Lock()

    def track(self, service: str, settings: Settings, *, running: int, ready: int) -> int:
        """Register or update ``service`` (each pass calls this) and return its desired count.

        ``running`` is the count a new decider takes over (what runs now, e.g. after a
        daemon restart); ``ready`` the replicas serving now, which the next decisions
        scale from.
        """
        with self._lock:
            tracked = self._services.get(service)
            if tracked is None:
                tracked = self._services[service] = _Tracked(Autoscaler(settings, initial=running))
            elif tracked.scaler.settings != settings:
                tracked.scaler.configure(settings)
            tracked.ready = ready
            return tracked.scaler.desired

    def forget(self, service: str) -> None:
        """The service was deleted, or is no longer autoscaled."""
        with self._lock:
            self._services.pop(service, None)

    def poke(self, service: str) -> bool:
        """A request waits for ``service`` (the activator holds it): want a replica now.

        Decides at once, so the pass this triggers already sees the new count.
        False if the service is not autoscaled (nothing to change).
        """
        with self._lock:
            tracked = self._services.get(service)
            if tracked is None:
                return False
            now = self._clock()
            tracked.scaler.poke(now)
            before = tracked.scaler.desired
            decision = tracked.scaler.decide(now, tracked.ready)
            tracked.last = decision
        if decision.desired != before:
            self._changed(service, before, decision, tracked.scaler.settings)
        return True

    def desired(self, service: str) -> int | None:
        with self._lock:
            tracked = self._services.get(service)
            return tracked.scaler.desired if tracked is not None else None

    def sample(self) -> list[str]:
        """Look at every tracked endpoint once and decide; the services whose count changed."""
        with self._lock:
            names = list(self._services)
        changed = []
        for service in names:
            load: Load | None = None
            with contextlib.suppress(UniframeError, OSError):
                load = self._load(service)
            now = self._clock()
            with self._lock:
                tracked = self._services.get(service)
                if tracked is None:
                    continue
                if load is not None:
                    tracked.scaler.observe(Sample(now, load.in_flight, load.requests))
                before = tracked.scaler.desired
                decision = tracked.scaler.decide(now, tracked.ready)
                tracked.last = decision
            if decision.desired != before:
                changed.append(service)
                self._changed(service, before, decision, tracked.scaler.settings)
        return changed

    def run(self, stop: threading.Event, log: Callable[[str], None] | None = None) -> None:
        """Sample every ``period`` seconds until ``stop`` is set.

        A failure (a store that cannot take the event, a bug) is logged and the next
        sample comes as usual: a sampler that died would freeze every service's count.
        """
        while not stop.wait(self.period):
            try:
                self.sample()
            except Exception as exc:
                if log is not None:
                    log(f"autoscaler: sampling failed: {type(exc).__name__}: {exc}")

    def status(self) -> dict[str, ScaleStatus]:
        with self._lock:
            items = sorted(self._services.items())
            return {name: ScaleStatus(
                service=name, min=t.scaler.settings.min, max=t.scaler.settings.max,
                desired=t.scaler.desired, ready=t.ready, metric=t.scaler.settings.metric,
                target=t.scaler.settings.target,
                observed=t.last.observed if t.last is not None else 0.0,
                panicking=t.scaler.panicking) for name, t in items}


def describe_change(service: str, before: int, decision: Decision, settings: Settings) -> tuple[str, str]:
    """The event for a change of the desired count: its reason and message."""
    after = decision.desired
    reason = "ScaledToZero" if after == 0 else "ScaledUp" if after > before else "ScaledDown"
    unit = "requests in flight" if settings.metric == "concurrency" else "requests/s"
    window = "panic" if decision.panicking else "stable"
    message = (f"{before} -> {after} replicas: {decision.observed:.2f} {unit} over the {window} "
               f"window, target {settings.target:g} per replica, {decision.ready} ready "
               f"({decision.why})")
    return reason, message
