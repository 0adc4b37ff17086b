"""How many replicas a service wants, from its endpoint's load: Knative's KPA rules, as pure code.

Why pure: the rules (two windows, panic mode, the scale-to-zero grace) are
easy to get subtly wrong and slow to test against a real daemon, so this
module only turns samples into decisions. It owns no thread, clock or
socket; :mod:`.autoscaling` feeds it from the endpoints and the reconciler
acts on its answer through :mod:`.planner`. The tests drive it with recorded
load traces (``tests/control/autoscaler_traces/``).

The rules, after Knative's ``pkg/autoscaler/scaling``:

- every sample carries the requests in flight at the endpoint (held ones
  included) and its count of requests answered so far; the metric
  (``concurrency``: in flight, ``rps``: answered per second) is averaged
  over the stable window and over the shorter panic window;
- each window asks for ``ceil(average / target)`` replicas, at most
  ``MAX_SCALE_UP_RATE`` times the ready ones and at least half of them
  (``MAX_SCALE_DOWN_RATE``) per decision;
- panic starts when the panic window asks for ``panicThreshold`` of the
  ready replicas (at least one counted) or more; while panicking the larger
  of the two windows' answers wins and the count never goes down; panic ends
  once a whole stable window passed without the threshold being met;
- a request seen anywhere in a window counts as demand for one replica
  (sampled in-flight counts miss short requests, and a service answering
  requests cannot run on zero); a request held by the activator is a
  :meth:`Autoscaler.poke`;
- when the stable window has seen no request at all, the service goes to
  one replica, and to zero once that has lasted ``scaleToZeroGracePeriod``;
- a decider that has not yet watched a whole stable window (a new one, or
  one rebuilt after a daemon restart) only scales up: it does not know the
  load before it started, and the running count is the best guess of it;
- the answer is clamped to ``min`` and ``max`` last.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from uniframe.spec import Autoscaling

__all__ = ["MAX_SCALE_DOWN_RATE", "MAX_SCALE_UP_RATE", "Autoscaler", "Decision", "Sample",
           "Settings"]

MAX_SCALE_UP_RATE = 1000.0  # Knative's default: up to 1000x the ready replicas per decision
MAX_SCALE_DOWN_RATE = 2.0   # Knative's default: down to half the ready replicas per decision
_EPSILON = 1e-9             # averages of whole numbers, so ceil(4.000000001) is not 5


@dataclass(frozen=True)
class Settings:
    """``spec.autoscaling`` resolved to plain numbers (seconds, ratios)."""

    min: int
    max: int
    metric: str            # "concurrency" or "rps"
    target: float          # the metric's value per replica
    stable_window: float
    panic_window: float
    panic_threshold: float  # a ratio: 2.0 for 200%
    grace: float            # scaleToZeroGracePeriod

    @classmethod
    def of(cls, spec: Autoscaling) -> Settings:
        return cls(min=spec.min, max=spec.max, metric=spec.metric, target=spec.target_value,
                   stable_window=spec.stable_window, panic_window=spec.panic_window_seconds,
                   panic_threshold=spec.panic_threshold / 100,
                   grace=spec.scale_to_zero_grace_period)


@dataclass(frozen=True)
class Sample:
    """One look at the endpoint: when (seconds, any monotonic clock), what was in flight,
    and how many requests it had answered since it started (a counter)."""

    at: float
    in_flight: int
    requests: int


@dataclass(frozen=True)
class Decision:
    """What the decider wants at ``at``, and the figures it read to get there."""

    at: float
    desired: int
    ready: int
    stable: float     # the metric over the stable window
    panic: float      # the metric over the panic window
    panicking: bool
    why: str          # what held or moved the count, for events and tests

    @property
    def observed(self) -> float:
        """The metric the decision followed: the panic window's while panicking."""
        return self.panic if self.panicking else self.stable


@dataclass(frozen=True)
class _Point:
    at: float
    in_flight: int
    answered: int   # requests answered since the previous sample
    span: float     # seconds since the previous sample (0 for the first)


class Autoscaler:
    """One service's decider: feed it :meth:`observe` and :meth:`poke`, ask :meth:`decide`."""

    def __init__(self, settings: Settings, *, initial: int = 0) -> None:
        self.settings = settings
        self.desired = min(settings.max, max(settings.min, initial))
        self._points: deque[_Point] = deque()
        self._last: Sample | None = None
        self._first_at: float | None = None     # when watching began
        self._active_at: float | None = None    # the last request seen (or held)
        self._panic_at: float | None = None     # the last time the panic threshold was met
        self._max_panic = 0
        self._zero_since: float | None = None   # since when the stable window has wanted zero

    def configure(self, settings: Settings) -> None:
        """Take changed settings (a new spec) without forgetting what was observed."""
        self.settings = settings
        self.desired = min(settings.max, max(settings.min, self.desired))

    @property
    def panicking(self) -> bool:
        return self._panic_at is not None

    def observe(self, sample: Sample) -> None:
        """Add one sample; a counter that went back (a restarted endpoint) counts from zero."""
        last = self._last
        if last is not None and sample.at <= last.at:
            return  # out of order or repeated: the windows are by time
        answered = 0 if last is None else (sample.requests - last.requests
                                           if sample.requests >= last.requests else sample.requests)
        span = 0.0 if last is None else sample.at - last.at
        self._points.append(_Point(sample.at, max(0, sample.in_flight), answered, span))
        self._last = sample
        if self._first_at is None:
            self._first_at = sample.at
        if sample.in_flight > 0 or answered > 0:
            self._active_at = sample.at
        horizon = sample.at - self.settings.stable_window
        while len(self._points) > 1 and self._points[0].at <= horizon:
            self._points.popleft()

    def poke(self, at: float) -> None:
        """A request is waiting for a replica (the activator holds it): demand for one, now."""
        if self._active_at is None or at > self._active_at:
            self._active_at = at
        if self._first_at is None:
            self._first_at = at

    def average(self, at: float, window: float) -> float:
        """The metric averaged over ``(at - window, at]``; the latest sample if none is inside."""
        inside = [p for p in self._points if p.at > at - window] or list(self._points)[-1:]
        if self.settings.metric == "rps":
            span = sum(p.span for p in inside)
            return sum(p.answered for p in inside) / span if span > 0 else 0.0
        return sum(p.in_flight for p in inside) / len(inside) if inside else 0.0

    def _active_within(self, at: float, window: float) -> bool:
        return self._active_at is not None and at - self._active_at < window

    def decide(self, at: float, ready: int) -> Decision:
        """The replicas wanted at ``at``, given ``ready`` replicas serving now."""
        s = self.settings
        stable = self.average(at, s.stable_window)
        panic = self.average(at, s.panic_window)
        if self._first_at is None:  # nothing seen yet: keep what runs (Knative: no data, no change)
            return Decision(at, self.desired, ready, stable, panic, False, "no samples yet")
        counted = max(1.0, float(ready))
        most = math.ceil(MAX_SCALE_UP_RATE * counted)
        least = math.floor(counted / MAX_SCALE_DOWN_RATE)
        want_stable = math.ceil(stable / s.target - _EPSILON)
        want_panic = math.ceil(panic / s.target - _EPSILON)
        if self._active_within(at, s.stable_window):
            want_stable = max(1, want_stable)
        if self._active_within(at, s.panic_window):
            want_panic = max(1, want_panic)
        over = want_panic / counted >= s.panic_threshold
        desired_stable = min(max(want_stable, least), most)
        desired_panic = min(max(want_panic, least), most)

        if over:
            self._panic_at = at
        elif self._panic_at is not None and at - self._panic_at >= s.stable_window:
            self._panic_at, self._max_panic = None, 0
        desired, why = desired_stable, "stable window"
        if self._panic_at is not None:
            desired, why = max(desired_stable, desired_panic), "panic window"
            if desired > self._max_panic:
                self._max_panic = desired
            elif desired < self._max_panic:
                desired, why = self._max_panic, "panicking: never down"

        warming = at - self._first_at < s.stable_window
        if warming and desired < self.desired:
            desired, why = self.desired, "watching a first stable window: only up"

        if desired == 0:
            if self._zero_since is None:
                self._zero_since = at
            if self.desired > 0 and at - self._zero_since < s.grace:
                desired, why = 1, "idle: scaleToZeroGracePeriod not over"
            else:
                why = "idle for a stable window and the grace period"
        else:
            self._zero_since = None
        clamped = min(s.max, max(s.min, desired))
        if clamped != desired:
            why = f"{why}, clamped to {'min' if clamped > desired else 'max'}"
        self.desired = clamped
        return Decision(at, clamped, ready, stable, panic, self._panic_at is not None, why)
