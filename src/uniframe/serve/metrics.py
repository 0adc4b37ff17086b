"""Prometheus metrics for the model server, written in the text exposition format.

The server is single-threaded, so plain integers and lists suffice; this
avoids the locks (and the import weight) of prometheus_client on the request
path of every image.
"""

from __future__ import annotations

from bisect import bisect_left

# Upper bounds in seconds: from tens of microseconds (the iris model) to seconds.
BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
)


class Histogram:
    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds


def _labels(pairs: tuple[tuple[str, str], ...]) -> str:
    inner = ",".join(
        f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for k, v in pairs
    )
    return "{" + inner + "}" if inner else ""


class Metrics:
    """Requests by model and status code, latency by model, in-flight requests, errors by kind."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = {}
        self.latency: dict[tuple[str, str], Histogram] = {}
        self.errors: dict[str, int] = {}
        self.inflight = 0
        self.connections = 0

    def record(self, model: str, version: str, code: int, seconds: float) -> None:
        key = (model, version, code)
        self.requests[key] = self.requests.get(key, 0) + 1
        hist = self.latency.get((model, version))
        if hist is None:
            hist = self.latency[(model, version)] = Histogram()
        hist.observe(seconds)

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def render(self) -> bytes:
        lines = [
            "# HELP uniframe_infer_requests_total Inference requests by model, version and HTTP status.",
            "# TYPE uniframe_infer_requests_total counter",
        ]
        for (model, version, code), n in sorted(self.requests.items()):
            lab = _labels((("model", model), ("version", version), ("code", str(code))))
            lines.append(f"uniframe_infer_requests_total{lab} {n}")
        lines += [
            "# HELP uniframe_infer_duration_seconds Time from a complete request to its answer.",
            "# TYPE uniframe_infer_duration_seconds histogram",
        ]
        for (model, version), hist in sorted(self.latency.items()):
            base = (("model", model), ("version", version))
            total = 0
            for bound, n in zip((*BUCKETS, float("inf")), hist.counts, strict=True):
                total += n
                le = "+Inf" if bound == float("inf") else repr(bound)
                lines.append(f"uniframe_infer_duration_seconds_bucket{_labels((*base, ('le', le)))} {total}")
            lines.append(f"uniframe_infer_duration_seconds_sum{_labels(base)} {hist.sum!r}")
            lines.append(f"uniframe_infer_duration_seconds_count{_labels(base)} {total}")
        lines += [
            "# HELP uniframe_requests_in_flight HTTP requests received and not yet answered.",
            "# TYPE uniframe_requests_in_flight gauge",
            f"uniframe_requests_in_flight {self.inflight}",
            "# HELP uniframe_open_connections Client connections currently open.",
            "# TYPE uniframe_open_connections gauge",
            f"uniframe_open_connections {self.connections}",
            "# HELP uniframe_errors_total Requests answered with an error, by kind.",
            "# TYPE uniframe_errors_total counter",
        ]
        for kind, n in sorted(self.errors.items()):
            lines.append(f"uniframe_errors_total{_labels((('kind', kind),))} {n}")
        return ("\n".join(lines) + "\n").encode()
