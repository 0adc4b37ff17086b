"""The daemon side of autoscaling without a daemon: tracking, sampling, demand, reports."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

from uniframe.control.autoscaler import Decision, Settings
from uniframe.control.autoscaling import Autoscalers, Load
from uniframe.control.proxy import EndpointError

SETTINGS = Settings(min=0, max=5, metric="concurrency", target=2, stable_window=6,
                    panic_window=1, panic_threshold=2.0, grace=2)


def test_sampling_deciding_and_reporting_changes() -> None:
    now = [0.0]
    loads: dict[str, Load | Exception] = {"a": Load(0, 0), "b": EndpointError("gone")}
    changes: list[tuple[str, int, int]] = []

    def load(service: str) -> Load | None:
        value = loads.get(service)
        if isinstance(value, Exception):
            raise value
        return value

    def changed(service: str, before: int, decision: Decision, settings: Settings) -> None:
        changes.append((service, before, decision.desired))

    scalers = Autoscalers(load, changed=changed, clock=lambda: now[0])
    assert scalers.track("a", SETTINGS, running=0, ready=0) == 0
    assert scalers.track("b", SETTINGS, running=2, ready=2) == 2  # takes over what runs
    assert scalers.poke("nobody") is False  # not autoscaled: nothing to change

    now[0] = 1.0
    loads["a"] = Load(in_flight=7, requests=3)
    assert scalers.sample() == ["a"]  # b's endpoint fails: no sample, no change, no crash
    assert changes == [("a", 0, 4)]
    status = scalers.status()["a"]
    assert (status.desired, status.observed, status.panicking) == (4, 7.0, True)
    assert scalers.desired("b") == 2

    scalers.forget("a")
    assert scalers.desired("a") is None and "a" not in scalers.status()


def test_demand_wants_a_replica_at_once() -> None:
    changes: list[int] = []
    scalers = Autoscalers(lambda _s: None, clock=lambda: 50.0,
                          changed=lambda _s, _b, d, _c: changes.append(d.desired))
    scalers.track("a", SETTINGS, running=0, ready=0)
    assert scalers.poke("a") is True
    assert scalers.desired("a") == 1 and changes == [1]
    # a changed spec's settings apply at once: a raised min is the floor now
    scalers.track("a", replace(SETTINGS, min=2), running=1, ready=1)
    assert scalers.desired("a") == 2


def test_the_sampler_thread_survives_a_failure() -> None:
    """A decision whose report fails (the store refused the event) is logged; sampling goes on."""
    calls: list[int] = []
    logged: list[str] = []

    def changed(_s: str, _b: int, _d: Decision, _c: Settings) -> None:
        calls.append(1)
        raise RuntimeError("store closed")

    stop = threading.Event()
    in_flight = iter(range(1, 1000))
    scalers = Autoscalers(lambda _s: Load(next(in_flight) * 4, 0), changed=changed, period=0.01)
    scalers.track("a", replace(SETTINGS, max=1000), running=0, ready=0)
    worker = threading.Thread(target=scalers.run, args=(stop, logged.append))
    worker.start()
    deadline = time.monotonic() + 10
    while len(calls) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    worker.join(10)
    assert len(calls) >= 3, calls
    assert logged[0] == "autoscaler: sampling failed: RuntimeError: store closed"
