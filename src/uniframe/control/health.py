"""Readiness and liveness probes of replicas, from the service's ``healthCheck``.

Readiness decides whether a replica gets traffic and whether a rollout may
go on; liveness decides whether a replica that once was ready has hung and
must be restarted. Both use the same HTTP GETs: for an InferenceService, the
OIP readiness of the service's own model (``/v2/models/{name}/ready``, so a
replica that serves another model never reads ready) and the user's
``healthCheck.path`` when it names another one. A replica is restarted only
after ``failureThreshold`` failures in a row, probed every ``periodSeconds``,
so one slow answer under load does not kill it.
"""

from __future__ import annotations

import http.client
import threading
import time
from dataclasses import dataclass
from urllib.parse import quote

SERVER_READY_PATH = "/v2/health/ready"
"""The OIP server readiness path: ``healthCheck.path``'s default."""


def model_ready_path(model: str) -> str:
    """The OIP readiness path of one model the server serves."""
    return f"/v2/models/{quote(model, safe='')}/ready"


def probe(port: int, path: str = SERVER_READY_PATH, timeout: float = 1.0,
          host: str = "127.0.0.1") -> bool:
    """True when ``GET path`` on the replica answers 200 within ``timeout``."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


@dataclass
class _Record:
    next_at: float = 0.0
    failures: int = 0


class Liveness:
    """Consecutive probe failures per replica, in memory (a new daemon starts counting afresh)."""

    def __init__(self) -> None:
        self._records: dict[str, _Record] = {}
        self._lock = threading.Lock()

    def due(self, replica_id: str) -> bool:
        with self._lock:
            return time.monotonic() >= self._records.setdefault(replica_id, _Record()).next_at

    def observe(self, replica_id: str, ok: bool, period: float) -> int:
        """Record one probe; return the failures in a row so far (0 after a success)."""
        with self._lock:
            rec = self._records.setdefault(replica_id, _Record())
            rec.next_at = time.monotonic() + period
            rec.failures = 0 if ok else rec.failures + 1
            return rec.failures

    def forget(self, replica_id: str) -> None:
        with self._lock:
            self._records.pop(replica_id, None)
