"""What the reconciler can tell an endpoint, and how each command changes the backend set.

Commands arrive as JSON objects (``{"op": "add", "backend": {...}}``) over the
control socket and are applied between two turns of the event loop, so no
lock is needed and no request sees a half-applied change. Every command is
idempotent, so a client that lost a reply can simply send it again. Removal
is always graceful: a backend taken out gets no new request, and the ones in
flight on it finish on their own connections, which then close.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from uniframe.control.proxy.balancer import BackendState, resolve

if TYPE_CHECKING:
    from uniframe.control.proxy.server import ProxyServer

_FIELDS = {"id", "host", "port", "group", "ready"}


def apply(server: ProxyServer, command: dict[str, Any]) -> dict[str, Any]:
    """Carry out one command; the reply is ``{"ok": true, ...}`` or ``{"ok": false, "error": ...}``."""
    op = command.get("op")
    try:
        if op == "set_backends":
            set_backends(server, [backend_args(d) for d in command.get("backends", [])],
                         command.get("weights"))
        elif op == "add":
            add(server, backend_args(command["backend"]))
        elif op == "remove":
            remove(server, find(server, command["id"]))
        elif op == "drain":
            b = find(server, command["id"])
            b.draining = True
            server.close_idle(b)
            server.backends_changed()
        elif op == "set_ready":
            b = find(server, command["id"])
            if not isinstance(command["ready"], bool):
                raise ValueError("ready must be true or false")
            if command["ready"] and not b.ready:
                server.reported_ready(b)
            b.ready = command["ready"]
            server.backends_changed()
        elif op == "set_weights":
            server.balancer.weights = weights(command.get("weights"))
            server.backends_changed()
        elif op == "configure":
            configure(server, command)
        elif op == "status":
            return {"ok": True, "status": server.status()}
        elif op == "metrics":
            return {"ok": True, "text": server.render_metrics().decode()}
        elif op == "stop":
            server.shutdown()
        else:
            return {"ok": False, "error": f"unknown command {op!r}; commands: set_backends, add, remove, "
                                          "drain, set_ready, set_weights, configure, status, metrics, "
                                          "subscribe, stop"}
    except (KeyError, TypeError, ValueError) as exc:
        text = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
        return {"ok": False, "error": f"{op}: {text}"}
    return {"ok": True}


def configure(server: ProxyServer, command: dict[str, Any]) -> None:
    """Change how requests are held with no ready replica (the service's spec may change them).

    ``activation_timeout`` (seconds, >= 0; 0 answers 503 at once), ``queue_limit``
    (>= 0) and ``retry_after`` (seconds, >= 0), each optional; checked whole before
    anything changes. Requests already held are judged by the new timeout.
    """
    cfg = server.config
    timeout, limit, retry = (command.get("activation_timeout", cfg.activation_timeout),
                             command.get("queue_limit", cfg.queue_limit),
                             command.get("retry_after", cfg.retry_after))
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) or not 0 <= timeout < 1e6:
        raise ValueError(f"activation_timeout must be seconds (a number >= 0), got {timeout!r}")
    for name, value in (("queue_limit", limit), ("retry_after", retry)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    cfg.activation_timeout, cfg.queue_limit, cfg.retry_after = float(timeout), limit, retry


def find(server: ProxyServer, backend_id: str) -> BackendState:
    b = server.balancer.backends.get(backend_id)
    if b is None:
        known = ", ".join(sorted(server.balancer.backends)) or "none"
        raise ValueError(f"service {server.service} has no backend {backend_id!r} (backends: {known})")
    return b


def add(server: ProxyServer, args: dict[str, Any]) -> None:
    """Add a backend; one with the same id and address is updated in place (and undrained).

    One that turns ready is trusted at once (:meth:`ProxyServer.reported_ready`).
    """
    backends = server.balancer.backends
    old = backends.get(args["id"])
    if old is not None and (old.host, old.port) == (args["host"], args["port"]):
        old.group = args.get("group", old.group)
        ready = args.get("ready", old.ready)
        if ready and not old.ready:
            server.reported_ready(old)
        old.ready = ready
        old.draining = False
    else:
        b = BackendState(**args)
        b.next_check = server.now  # look at it soon, but trust the reconciler until then
        if old is not None:
            retire(server, old)
        backends[b.id] = b
    server.backends_changed()


def retire(server: ProxyServer, b: BackendState) -> None:
    b.removed = True
    server.close_idle(b)


def remove(server: ProxyServer, b: BackendState) -> None:
    """Out of rotation now; requests already on it finish, then its connections close."""
    retire(server, b)
    del server.balancer.backends[b.id]
    server.backends_changed()


def set_backends(server: ProxyServer, backends: list[dict[str, Any]], new_weights: Any) -> None:
    """Make the set exactly ``backends``; checked whole before anything changes."""
    wanted = {a["id"]: a for a in backends}
    if len(wanted) != len(backends):
        raise ValueError("backend ids must be unique")
    for a in backends:
        resolve(a["host"], a["port"])
    parsed = weights(new_weights) if new_weights is not None else None
    for b in list(server.balancer.backends.values()):
        if b.id not in wanted:
            remove(server, b)
    if parsed is not None:
        server.balancer.weights = parsed
    for a in backends:
        add(server, a)
    server.backends_changed()


def weights(value: Any) -> dict[str, int]:
    """``{group: weight}`` with non-negative integer weights; None means no split (one pool)."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
            for k, v in value.items()):
        raise ValueError(f"weights must map group names to non-negative integers, got {value!r}")
    return dict(value)


def backend_args(data: Any) -> dict[str, Any]:
    """Validate one backend of a command: ``{"id", "host", "port", "group"?, "ready"?}``."""
    if not isinstance(data, dict):
        raise ValueError(f"a backend is an object with id, host and port, got {data!r}")
    unknown = set(data) - _FIELDS
    if unknown:
        raise ValueError(f"unknown backend fields {sorted(unknown)}")
    args: dict[str, Any] = {"id": data["id"], "host": data["host"], "port": data["port"]}
    if not isinstance(args["id"], str) or not args["id"]:
        raise ValueError(f"backend id must be a non-empty string, got {args['id']!r}")
    if not isinstance(args["host"], str) or not args["host"]:
        raise ValueError(f"backend {args['id']}: host must be a non-empty string")
    port = args["port"]
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise ValueError(f"backend {args['id']}: port must be 1..65535, got {port!r}")
    if "group" in data:
        if not isinstance(data["group"], str) or not data["group"]:
            raise ValueError(f"backend {args['id']}: group must be a non-empty string")
        args["group"] = data["group"]
    if "ready" in data:
        if not isinstance(data["ready"], bool):
            raise ValueError(f"backend {args['id']}: ready must be true or false")
        args["ready"] = data["ready"]
    return args
