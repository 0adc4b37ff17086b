"""Prometheus text for the proxy: what an operator needs to see a replica go bad or a canary skew.

Counters live as plain attributes and dicts on the server (one increment on
the request path, nothing more); this module only renders them when asked.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from uniframe.control.proxy.balancer import BackendState


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(service: str, codes: Mapping[int, int], retries: int, upstream_errors: Mapping[str, int],
           held: int, demands: int, clients: int, backends: Iterable[BackendState]) -> bytes:
    svc = f'service="{_esc(service)}"'
    out: list[str] = []

    def family(name: str, kind: str, help_text: str) -> None:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")

    family("uniframe_proxy_requests_total", "counter",
           "Requests answered, by status code (the proxy's own 502/503/504 included).")
    for code, n in sorted(codes.items()):
        out.append(f'uniframe_proxy_requests_total{{{svc},code="{code}"}} {n}')
    family("uniframe_proxy_retries_total", "counter",
           "Requests sent again to another replica after an upstream failure.")
    out.append(f"uniframe_proxy_retries_total{{{svc}}} {retries}")
    family("uniframe_proxy_upstream_errors_total", "counter",
           "Upstream connections that failed before a complete response, by kind.")
    for kind, n in sorted(upstream_errors.items()):
        out.append(f'uniframe_proxy_upstream_errors_total{{{svc},kind="{kind}"}} {n}')
    family("uniframe_proxy_queued", "gauge", "Requests held waiting for a ready replica.")
    out.append(f"uniframe_proxy_queued{{{svc}}} {held}")
    family("uniframe_proxy_demands_total", "counter",
           "Times the endpoint told the daemon it holds requests with no ready replica.")
    out.append(f"uniframe_proxy_demands_total{{{svc}}} {demands}")
    family("uniframe_proxy_client_connections", "gauge", "Open client connections.")
    out.append(f"uniframe_proxy_client_connections{{{svc}}} {clients}")
    rows = [(f'{svc},backend="{_esc(b.id)}",group="{_esc(b.group)}"', b) for b in backends]
    family("uniframe_proxy_backend_outstanding", "gauge", "Requests in flight on each replica.")
    out += [f"uniframe_proxy_backend_outstanding{{{lab}}} {b.outstanding}" for lab, b in rows]
    family("uniframe_proxy_backend_requests_total", "counter", "Responses relayed from each replica.")
    out += [f"uniframe_proxy_backend_requests_total{{{lab}}} {b.requests}" for lab, b in rows]
    family("uniframe_proxy_backend_failures_total", "counter", "Upstream failures per replica.")
    out += [f"uniframe_proxy_backend_failures_total{{{lab}}} {b.failures}" for lab, b in rows]
    family("uniframe_proxy_backend_eligible", "gauge",
           "1 when the replica takes new requests (ready, healthy, not draining).")
    out += [f"uniframe_proxy_backend_eligible{{{lab}}} {int(b.eligible)}" for lab, b in rows]
    return ("\n".join(out) + "\n").encode()
