"""``python -m uniframe.control.proxy``: one service's endpoint as a process of its own.

The daemon starts it through :class:`uniframe.control.proxy.Endpoint`; it can
also run by hand with fixed ``--backend`` s (the benchmark does). When ready
it prints one JSON line on stdout, ``{"ready": true, "port": ..., ...}``, so a
parent that asked for port 0 learns the port without a race.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from uniframe.control.proxy.activator import ACTIVATION_TIMEOUT
from uniframe.control.proxy.server import ProxyConfig, ProxyServer


def _backend(text: str) -> dict[str, object]:
    """``ID=HOST:PORT[@GROUP]``."""
    ident, sep, rest = text.partition("=")
    addr, _, group = rest.partition("@")
    host, colon, port = addr.rpartition(":")
    if not sep or not ident or not colon or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not ID=HOST:PORT[@GROUP]")
    out: dict[str, object] = {"id": ident, "host": host.strip("[]"), "port": int(port)}
    if group:
        out["group"] = group
    return out


def _weight(text: str) -> tuple[str, int]:
    group, sep, value = text.partition("=")
    if not sep or not group or not value.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not GROUP=WEIGHT (a non-negative integer)")
    return group, int(value)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="uniframe-proxy",
                                 description="One stable HTTP endpoint balancing over a service's replicas.")
    ap.add_argument("--service", required=True, help="the InferenceService this endpoint fronts")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 picks a free port (printed when ready)")
    ap.add_argument("--admin-host", default="127.0.0.1")
    ap.add_argument("--admin-port", type=int, help="serve /metrics and /status here")
    ap.add_argument("--control", help="unix socket path for JSON commands")
    ap.add_argument("--backend", type=_backend, action="append", default=[], metavar="ID=HOST:PORT[@GROUP]")
    ap.add_argument("--weight", type=_weight, action="append", default=[], metavar="GROUP=WEIGHT")
    ap.add_argument("--retries", type=int, default=2)
    ap.add_argument("--activation-timeout", type=float, default=ACTIVATION_TIMEOUT,
                    help="seconds a request is held while no replica is ready (0: 503 at once)")
    ap.add_argument("--queue-limit", type=int, default=1024, help="requests held at most")
    ap.add_argument("--retry-after", type=int, default=1, help="Retry-After of the endpoint's 503s")
    ap.add_argument("--connect-timeout", type=float, default=2.0)
    ap.add_argument("--response-timeout", type=float, default=60.0)
    ap.add_argument("--check-interval", type=float, default=2.0)
    ap.add_argument("--recheck-interval", type=float, default=0.25)
    ap.add_argument("--drain-timeout", type=float, default=10.0)
    ap.add_argument("--cpu", type=int, help="pin the process to this core")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    config = ProxyConfig(
        service=args.service, host=args.host, port=args.port, admin_host=args.admin_host,
        admin_port=args.admin_port, control_path=args.control, retries=args.retries,
        activation_timeout=args.activation_timeout, queue_limit=args.queue_limit,
        retry_after=args.retry_after, connect_timeout=args.connect_timeout,
        response_timeout=args.response_timeout, check_interval=args.check_interval,
        recheck_interval=args.recheck_interval, drain_timeout=args.drain_timeout,
    )
    try:
        server = ProxyServer(config)
    except OSError as exc:
        print(f"uniframe-proxy: error: {exc.strerror or exc}", file=sys.stderr)
        return 2
    if args.backend or args.weight:
        reply = server.apply({"op": "set_backends", "backends": args.backend,
                              "weights": dict(args.weight) or None})
        if not reply["ok"]:
            print(f"uniframe-proxy: error: {reply['error']}", file=sys.stderr)
            return 2

    def ready(s: ProxyServer) -> None:
        print(json.dumps({"ready": True, "service": s.service, "port": s.port, "admin_port": s.admin_port,
                          "pid": os.getpid()}), flush=True)
        print(f"uniframe-proxy: {s.service} on http://{config.host}:{s.port} (ready)", file=sys.stderr,
              flush=True)

    server.serve_forever(on_ready=ready)
    print(f"uniframe-proxy: {config.service}: stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
