"""The activator: requests held while a service has no ready replica, and the daemon told at once.

A service scaled to zero (or whose replicas are all starting) still has its
endpoint, and a request to it must not fail: it is *held* here until the
first replica is ready, then released to it in arrival order. Holding is
bounded twice, so a service that cannot come up does not pile up clients:
at most ``queue_limit`` requests wait (one more is answered 503 at once), and
each waits at most ``activation_timeout`` seconds (then 503). Every 503 of
ours carries ``Retry-After`` and a JSON body naming the service and why
(``reason``: ``no-ready-replica``, ``queue-full``, ``activation-timeout``,
``shutting-down``), so a client or a load balancer can tell "come back soon"
from a broken service.

Why the endpoint tells the daemon, rather than the daemon polling it: a
service at zero gets a replica only when the reconciler's next pass sees the
demand, and that pass may be a second away (its period), which is more than
the whole cold-start budget of a restored unikernel. So the first held
request of a burst sends one line, ``{"event": "demand", "service": ...,
"held": N}``, to every control connection that subscribed (``{"op":
"subscribe"}``); the daemon turns it into a wake of its reconciler. One line
per burst, not per request: a hundred requests arriving together cost the
daemon one wake. While requests stay held and no replica is eligible the line
is repeated every ``DEMAND_REPEAT`` seconds, so a wake the daemon missed (it
was busy, or restarting) is not lost; and a daemon that subscribes while
requests are held is told at once, which is how the wake survives a daemon
restart (the endpoint keeps holding meanwhile; the new daemon re-attaches and
subscribes on its first pass). A replica started for held requests is checked
by the endpoint every ``STARTING_RECHECK`` seconds, and the first check it
passes is another demand line, so the daemon's readiness probe follows at
once instead of at its next periodic pass.

The held count is part of the endpoint's status (``held``, beside
``in_flight``), so an autoscaler counts held requests as demand and a
service at zero is given a replica.
"""

from __future__ import annotations

import collections
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from uniframe.control.proxy.balancer import BackendState
    from uniframe.control.proxy.server import Exchange, ProxyServer, _Line

ACTIVATION_TIMEOUT = 30.0  # seconds a request is held by default (a service's spec may say otherwise)
DEMAND_REPEAT = 2.0  # seconds between reminders while requests stay held with no replica
STARTING_RECHECK = 0.02  # seconds between checks of a starting replica while requests are held
#                          (the server's timers tick this often then too)
SUBSCRIBER_BACKLOG = 64 << 10  # unread event bytes before a subscriber is dropped


class Activator:
    """The hold queue and the demand line of one endpoint; driven by :class:`ProxyServer`."""

    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self.queue: collections.deque[Exchange] = collections.deque()
        self.held = 0  # exchanges in the queue whose client is still there
        self.demands = 0  # demand lines announced (one per burst, plus reminders)
        self.expired = 0  # held requests answered 503 after the activation timeout
        self.refused = 0  # requests answered 503 at once: queue full, holding off, or stopping
        self._demand_at: float | None = None  # when the current burst was announced
        self._subscribers: list[_Line] = []

    # -- holding -----------------------------------------------------------------------------

    def hold(self, ex: Exchange) -> None:
        """``ex`` found no eligible replica: hold it (and say so), or answer 503 now."""
        server = self.server
        cfg = server.config
        if server.stopping:
            self.refused += 1
            self.refuse(ex, "shutting-down", f"service {server.service}: its endpoint is shutting down")
            return
        if cfg.activation_timeout <= 0:
            self.refused += 1
            self._want_replica()
            self.refuse(ex, "no-ready-replica", f"service {server.service} has no ready replica")
            return
        if self.held >= cfg.queue_limit:
            self.refused += 1
            self.refuse(ex, "queue-full",
                        f"service {server.service} has no ready replica and already holds "
                        f"{self.held} requests for one (the limit)")
            return
        ex.queued_at = server.now
        ex.held = True
        self.held += 1
        self.queue.append(ex)
        self._want_replica()

    def checked_starting(self, b: BackendState, ok: bool) -> None:
        """A replica the reconciler does not call ready yet was health-checked.

        While requests are held, the reconciler would otherwise notice the new
        replica is ready only at its next pass (up to its period, a second or
        more, on top of a cold start that should take a fraction of one). So a
        starting replica is checked every ``STARTING_RECHECK`` seconds, and the
        first check it passes wakes the daemon (a demand line), whose pass
        probes it, calls it ready, and so releases the held requests.
        """
        if not self.held:
            return
        if ok:
            self._announce()
        else:
            b.next_check = self.server.now + STARTING_RECHECK

    def forget(self, ex: Exchange) -> None:
        """The client of a held exchange went away: it no longer counts (it leaves the queue later)."""
        if ex.held:
            ex.held = False
            self.held -= 1

    def release(self) -> None:
        """Dispatch held requests, oldest first, while some replica takes requests."""
        queue = self.queue
        server = self.server
        for _ in range(len(queue)):  # bounded: a request dispatched may come back to the queue
            if not server.balancer.has_eligible():
                return
            ex = queue.popleft()
            if ex.held:
                self.forget(ex)
                server.dispatch(ex)

    def sweep(self, now: float) -> None:
        """Answer requests held past the activation timeout; remind or close the burst."""
        queue = self.queue
        server = self.server
        timeout = server.config.activation_timeout
        while queue and (not queue[0].held or now - queue[0].queued_at > timeout):
            ex = queue.popleft()
            if ex.held:
                self.forget(ex)
                self.expired += 1
                self.refuse(ex, "activation-timeout",
                            f"service {server.service} has no ready replica: none became ready "
                            f"within the activation timeout of {timeout:g} s")
        if self.held:
            if (self._demand_at is not None and now - self._demand_at >= DEMAND_REPEAT
                    and not server.balancer.has_eligible()):
                self._announce()
        else:
            self._demand_at = None  # the burst is over: the next held request announces again

    def stop(self) -> None:
        """The endpoint stops: answer every held request now."""
        while self.queue:
            ex = self.queue.popleft()
            if ex.held:
                self.forget(ex)
                self.refuse(ex, "shutting-down", f"service {self.server.service}: its endpoint is shutting down")

    def refuse(self, ex: Exchange, reason: str, message: str) -> None:
        retry_after = self.server.config.retry_after
        self.server.reply(ex, 503, message, extra={"service": self.server.service, "reason": reason},
                          headers=b"Retry-After: %d\r\n" % retry_after)

    # -- telling the daemon ------------------------------------------------------------------

    def subscribe(self, conn: _Line) -> None:
        """``conn`` now receives demand lines; told at once if requests are held already."""
        if conn not in self._subscribers:
            self._subscribers.append(conn)
        if self.held:
            self._send(conn, self._line())

    def unsubscribe(self, conn: _Line) -> None:
        if conn in self._subscribers:
            self._subscribers.remove(conn)

    def _want_replica(self) -> None:
        if self._demand_at is None:
            self._announce()

    def _announce(self) -> None:
        self._demand_at = self.server.now
        self.demands += 1
        line = self._line()
        for conn in list(self._subscribers):
            self._send(conn, line)

    def _line(self) -> bytes:
        return json.dumps({"event": "demand", "service": self.server.service,
                           "held": self.held}).encode() + b"\n"

    def _send(self, conn: _Line, line: bytes) -> None:
        if len(conn.outbuf) > SUBSCRIBER_BACKLOG:  # a daemon that stopped reading: let it go
            self.server.close_line(conn)
            return
        conn.outbuf += line
        self.server.flush_line(conn)
