"""What one object's replicas should be, whatever its kind, as the reconciler consumes it.

An InferenceService and a Workload differ in where the image comes from
(built from a model, or given by reference), how a replica is made and
probed (OIP readiness on the server's port, or the workload's own HTTP or
TCP check on a mapped guest port) and whether a service endpoint fronts them;
they share everything else: revisions, rollouts, restarts, back-off,
re-adoption. A :class:`Target` carries the differences, so the reconciler
has one code path.
"""

from __future__ import annotations

import http.client
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass

from uniframe.build.images import image_port
from uniframe.build.store import Image
from uniframe.build.unikernel import sample_request
from uniframe.control.health import SERVER_READY_PATH, model_ready_path, probe
from uniframe.control.store import ReplicaRecord
from uniframe.runtime.driver import Driver
from uniframe.runtime.ports import PortMapping
from uniframe.runtime.replica import Replica, ReplicaConfig
from uniframe.runtime.verify import free_port, image_ref
from uniframe.runtime.workload import create_replica, workload_ports
from uniframe.spec import InferenceService, Workload


@dataclass(frozen=True)
class Rules:
    """How replicas of a new revision replace the old ones."""

    strategy: str = "rolling"
    traffic_percent: int | None = None
    max_surge: int | str = 1
    max_unavailable: int | str = 0
    deadline: float = 300.0


@dataclass(frozen=True)
class Health:
    period: float = 10.0
    timeout: float = 1.0
    failure_threshold: int = 3
    describe: str = "GET /v2/health/ready"


@dataclass(frozen=True)
class Target:
    """One object's wanted replicas: made by ``make``, judged by ``probe``."""

    driver_kind: str
    image_digest: str
    rules: Rules
    health: Health
    make: Callable[[Driver], tuple[Replica, int | None]]  # create (not start): replica, probe port
    probe: Callable[[ReplicaRecord], bool]
    endpoint: bool = False  # InferenceServices get a service endpoint
    service_port: int | None = None
    # A service's replica config and its probe port, without creating it (a restore makes the
    # replica from a snapshot instead); None for a Workload, which never restores.
    configure: Callable[[], tuple[ReplicaConfig, int]] | None = None
    # One inference (path, JSON body) built from the model's recorded signature: a template's
    # warm-up, so the snapshot holds a server that has answered once (lazy paths taken).
    warmup: tuple[str, bytes] | None = None


def rules_of(doc: InferenceService | Workload) -> Rules:
    """A service's rollout settings; a Workload rolls one replica at a time, never below its count."""
    if isinstance(doc, Workload):
        return Rules()
    rollout = doc.spec.rollout
    return Rules(strategy=rollout.strategy,
                 traffic_percent=rollout.canary.traffic_percent if rollout.canary else None,
                 max_surge=rollout.max_surge, max_unavailable=rollout.max_unavailable,
                 deadline=rollout.progress_deadline_seconds)


def service_target(service: InferenceService, image: Image | None, driver_kind: str, *,
                   snapshottable: bool = False) -> Target:
    """The service's replicas on ``driver_kind`` (the registry's choice for its runtime); with
    ``image`` None (still building) it can probe but not make. ``snapshottable`` replicas can
    become a snapshot template (see :mod:`.templates`)."""
    spec = service.spec
    check = spec.health_check
    resources = image.manifest.get("resources", {}) if image is not None else {}

    def configure() -> tuple[ReplicaConfig, int]:
        if image is None:
            raise RuntimeError("no image to make a replica from yet")
        port = free_port()
        return ReplicaConfig(
            image=image_ref(image), cpus=max(1, round(float(resources.get("cpus", 1)))),
            memory_mib=max(256, int(resources.get("memory", 256 << 20)) >> 20),
            ports=(PortMapping(port, image_port(image)),), snapshottable=snapshottable), port

    def make(driver: Driver) -> tuple[Replica, int | None]:
        config, port = configure()
        return driver.create(config), port

    inputs = (image.manifest.get("model") or {}).get("inputs") if image is not None else None
    warmup = ((f"/v2/models/{service.metadata.name}/infer", sample_request(inputs))
              if inputs else None)

    # The service's own model must answer, not only the server: a replica serving another
    # model (an image built under another name) is healthy but answers every request 404.
    # The model's readiness implies the server's, so the default path is not asked again.
    paths = [model_ready_path(service.metadata.name)]
    if check.path != SERVER_READY_PATH:
        paths.append(check.path)

    def ready(rec: ReplicaRecord) -> bool:
        port = rec.host_port
        return port is not None and all(probe(port, p, check.timeout_seconds) for p in paths)

    return Target(
        driver_kind=driver_kind,
        image_digest=image.digest if image is not None else "",
        rules=rules_of(service),
        health=Health(check.period_seconds, check.timeout_seconds, check.failure_threshold,
                      " and ".join(f"GET {p}" for p in paths)),
        make=make, probe=ready, endpoint=True, service_port=spec.service_port,
        configure=configure, warmup=warmup)


def workload_target(workload: Workload, revision: str, driver_kind: str) -> Target:
    """A Workload's replicas on ``driver_kind``; without a health check a running replica
    counts as ready."""
    spec = workload.spec
    check = spec.health_check
    guest = (check.http.port if check and check.http else
             check.tcp.port if check and check.tcp else None)

    def make(driver: Driver) -> tuple[Replica, int | None]:
        ports = workload_ports(workload)
        name = f"{workload.metadata.name}-{secrets.token_hex(3)}"
        replica = create_replica(workload, driver, name, ports)
        probe_port = next((p.host_port for p in ports if p.guest_port == guest), None)
        if probe_port is None and ports:
            probe_port = ports[0].host_port
        return replica, probe_port

    def ready(rec: ReplicaRecord) -> bool:
        if check is None:
            return True
        if rec.host_port is None:
            return False
        if check.http is not None:
            return _http_ok(rec.host_port, check.http.path, check.timeout_seconds)
        return _tcp_ok(rec.host_port, check.timeout_seconds)

    health = (Health(check.period_seconds, check.timeout_seconds, check.failure_threshold,
                     f"GET {check.http.path}" if check.http else "TCP connect")
              if check is not None else Health())
    return Target(driver_kind=driver_kind, image_digest=revision,
                  rules=Rules(), health=health, make=make, probe=ready)


def _http_ok(port: int, path: str, timeout: float) -> bool:
    """2xx or 3xx, as Kubernetes' httpGet probe counts success."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        return 200 <= conn.getresponse().status < 400
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def _tcp_ok(port: int, timeout: float) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False
