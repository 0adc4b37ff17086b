"""``spec.autoscaling``: Knative KPA's settings, their defaults, and errors that name the field."""

import textwrap

import pytest

from uniframe.spec import Autoscaling, InferenceService, check_text, load_text

HEAD = "apiVersion: uniframe.dev/v1alpha1\nkind: InferenceService\nmetadata: {name: iris}\n"


def doc(autoscaling: str) -> str:
    return HEAD + "spec:\n  model: {uri: ./iris.onnx}\n  autoscaling: " + textwrap.dedent(autoscaling) + "\n"


def problems(text: str) -> list[str]:
    return [str(p) for p in check_text(text, "svc.yaml").problems]


def scaling(text: str) -> Autoscaling:
    (d,) = load_text(doc(text), "svc.yaml")
    assert isinstance(d.spec, InferenceService)
    assert d.spec.spec.autoscaling is not None
    return d.spec.spec.autoscaling


def test_defaults_are_knatives() -> None:
    a = scaling("{max: 4}")
    assert (a.min, a.max, a.metric, a.target_value) == (0, 4, "concurrency", 4.0)
    assert (a.scale_to_zero_grace_period, a.stable_window) == (30.0, 60.0)
    assert a.panic_window_seconds == 6.0  # 10% of the stable window
    assert (a.panic_threshold, a.activation_timeout) == (200.0, 30.0)
    assert scaling("{max: 4, metric: rps}").target_value == 200.0


def test_durations_and_percentages_as_people_write_them() -> None:
    a = scaling("{min: 1, max: 8, metric: rps, target: 50, scaleToZeroGracePeriod: 1m30s,"
                " stableWindow: 2m, panicWindow: 5%, panicThreshold: 300%, activationTimeout: 500ms}")
    assert (a.scale_to_zero_grace_period, a.stable_window, a.panic_window_seconds) == (
        90.0, 120.0, 6.0)
    assert (a.panic_threshold, a.activation_timeout, a.target_value) == (300.0, 0.5, 50.0)
    assert scaling("{max: 2, stableWindow: 6, panicWindow: 2}").panic_window_seconds == 2.0
    # a share of a short window never goes under one sampling period
    assert scaling("{max: 2, stableWindow: 6s}").panic_window_seconds == 1.0


def test_old_specs_stay_valid() -> None:
    a = scaling("{min: 0, max: 8, targetConcurrency: 2}")
    assert (a.metric, a.target_value) == ("concurrency", 2.0)


@pytest.mark.parametrize(("text", "expected"), [
    ("{max: 2, stableWindow: 3s}",
     "spec.autoscaling.stableWindow: '3s' is outside 6s to 1h: a shorter window averages noise, "
     "a longer one hardly reacts"),
    ("{max: 2, stableWindow: soon}",
     "spec.autoscaling.stableWindow: 'soon' is not a duration, use e.g. 30s, 1m30s or 500ms"),
    ("{max: 2, stableWindow: 10s, panicWindow: 20s}",
     "spec.autoscaling.panicWindow: 20s is longer than stableWindow (10s); a panic window is the "
     "short one"),
    ("{max: 2, panicWindow: 0.5s}",
     "spec.autoscaling.panicWindow: 0.5s is shorter than the daemon's sampling period; use at "
     "least 1s"),
    ("{max: 2, panicWindow: 150%}",
     "spec.autoscaling.panicWindow: '150%': a share of stableWindow is above 0% and at most 100%"),
    ("{max: 2, panicThreshold: 2}",
     "spec.autoscaling.panicThreshold: 2 is outside 110% to 1000%: panicThreshold is a share of the "
     "ready replicas, e.g. 200% (panic when the burst wants twice them)"),
    ("{max: 2, metric: latency}",
     "spec.autoscaling.metric: 'latency' is not one of 'concurrency' or 'rps'"),
    ("{max: 2, target: 0}", "spec.autoscaling.target: must be more than 0, got the number 0"),
    ("{max: 2, scaleToZeroGracePeriod: -1}",
     "spec.autoscaling.scaleToZeroGracePeriod: -1 must not be negative"),
    ("{max: 2, activationTimeout: 0}",
     "spec.autoscaling.activationTimeout: must be more than 0, got the number 0.0"),
    ("{max: 2, targetConcurrency: 2, target: 3}",
     "spec.autoscaling.targetConcurrency: targetConcurrency is the older spelling of metric: "
     "concurrency with target; give target (and metric) only"),
    ("{max: 2, metric: rps, targetConcurrency: 2}",
     "spec.autoscaling.targetConcurrency: targetConcurrency is the older spelling of metric: "
     "concurrency with target; give target (and metric) only"),
    ("{min: 3, max: 2}", "spec.autoscaling: min (3) is above max (2); lower min or raise max"),
    ("{min: -1, max: 2}", "spec.autoscaling.min: must be 0 or more, got the number -1"),
])
def test_errors_name_the_field(text: str, expected: str) -> None:
    found = problems(doc(text))
    assert [p.removeprefix("svc.yaml, document 1: ") for p in found] == [expected], found
