"""The service endpoint: one stable host port per InferenceService, balanced over its replicas.

The reconciler owns the replicas; it tells the endpoint which exist, which
are ready and how traffic splits between versions, through :class:`Endpoint`.
The endpoint relays each request to the ready replica with the fewest
requests in flight and retries on another replica when one dies before
answering (inference is idempotent). Pieces:

- :mod:`.endpoint` — :class:`Endpoint`, the daemon's typed handle (start, command, observe, stop);
- :mod:`.server` — the relay's epoll loop, run as ``python -m uniframe.control.proxy``;
- :mod:`.commands` — what the reconciler can tell it (the control socket's JSON commands);
- :mod:`.activator` — requests held while no replica is ready, and the daemon told at once;
- :mod:`.balancer` — least outstanding requests, weighted groups for canaries;
- :mod:`.framing` — where HTTP/1.1 messages end, without reading what they say;
- :mod:`.metrics` — Prometheus text.
"""

from uniframe.control.proxy.endpoint import (
    Backend,
    BackendStatus,
    Endpoint,
    EndpointError,
    EndpointStatus,
)

__all__ = ["Backend", "BackendStatus", "Endpoint", "EndpointError", "EndpointStatus"]
