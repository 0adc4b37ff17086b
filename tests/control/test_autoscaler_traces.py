"""The autoscaler's decisions, driven by load traces in data files (facts in, decisions out).

Each file in ``autoscaler_traces/`` holds the ``autoscaling`` settings (as a spec
writes them), the load (recorded ``samples`` ``[t, inFlight, requestsAnswered]``, or
``load`` segments expanded to one sample a second), demand from the activator
(``pokes``), how long a wanted replica takes to read ready (``readyLag``), and the
decisions expected: ``at`` one sample or over ``from``..``to``, the ``desired``
count (or ``atLeast``), ``panic`` mode, or ``rising`` (never down over the range).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from uniframe.control.autoscaler import Autoscaler, Decision, Sample, Settings
from uniframe.spec import Autoscaling

TRACES = sorted((Path(__file__).parent / "autoscaler_traces").glob("*.json"))


def samples(trace: dict[str, Any]) -> list[Sample]:
    if "samples" in trace:
        return [Sample(float(t), int(n), int(r)) for t, n, r in trace["samples"]]
    out: list[Sample] = []
    period = float(trace.get("period", 1.0))
    t, answered = 0.0, 0.0
    for segment in trace["load"]:
        while t + period <= segment["until"] + 1e-9:
            t += period
            answered += segment.get("rps", 0) * period
            out.append(Sample(round(t, 6), int(segment.get("inFlight", 0)), int(answered)))
    return out


def replay(trace: dict[str, Any]) -> list[Decision]:
    settings = Settings.of(Autoscaling.model_validate(trace["autoscaling"]))
    scaler = Autoscaler(settings, initial=int(trace.get("initial", 0)))
    lag = float(trace.get("readyLag", 0))
    pokes = sorted(float(p) for p in trace.get("pokes", []))
    wanted: list[tuple[float, int]] = [(-1e9, scaler.desired)]
    decisions = []
    for sample in samples(trace):
        while pokes and pokes[0] <= sample.at:
            scaler.poke(pokes.pop(0))
        # ready: what was wanted readyLag seconds ago (replicas start instantly with 0)
        ready = next(n for t, n in reversed(wanted) if t <= sample.at - lag)
        scaler.observe(sample)
        decision = scaler.decide(sample.at, ready)
        wanted.append((sample.at, decision.desired))
        decisions.append(decision)
    return decisions


def test_traces_are_collected() -> None:
    names = {p.stem for p in TRACES}
    assert {"burst", "slow_ramp", "idle_to_zero_min0", "idle_min1", "spike_panic",
            "poke_from_zero", "rps"} <= names


@pytest.mark.parametrize("path", TRACES, ids=[p.stem for p in TRACES])
def test_trace(path: Path) -> None:
    trace = json.loads(path.read_text())
    decisions = replay(trace)
    by_time = {round(d.at, 6): d for d in decisions}
    assert trace["expect"], f"{path.name} expects nothing"
    for rule in trace["expect"]:
        if "at" in rule:
            chosen = [by_time[round(float(rule["at"]), 6)]]
        else:
            chosen = [d for d in decisions if rule["from"] <= d.at <= rule["to"]]
            assert chosen, f"{path.name}: no decision in {rule}"
        for d in chosen:
            where = f"{path.name} at t={d.at:g} ({d.why}; stable {d.stable:.2f}, panic {d.panic:.2f})"
            if "desired" in rule:
                assert d.desired == rule["desired"], f"{where}: desired {d.desired}, rule {rule}"
            if "atLeast" in rule:
                assert d.desired >= rule["atLeast"], f"{where}: desired {d.desired}, rule {rule}"
            if "panic" in rule:
                assert d.panicking == rule["panic"], f"{where}: panicking {d.panicking}, rule {rule}"
        if rule.get("rising"):
            counts = [d.desired for d in chosen]
            assert counts == sorted(counts), f"{path.name}: went down in {rule}: {counts}"
