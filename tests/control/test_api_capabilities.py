"""The daemon's API consults the reconciler's runtime registry, never a driver class, for
what a replica's driver can do (here: following logs)."""

from __future__ import annotations

from collections.abc import Iterator
from http import HTTPStatus
from pathlib import Path

import pytest

from uniframe.control.api.methods import Api, ApiError
from uniframe.control.reconciler import Reconciler
from uniframe.control.store import Store
from uniframe.runtime.registry import Capability, DriverEntry, Registry

PROCESS = "uniframe.runtime.local:ProcessDriver"


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    registry = Registry([
        DriverEntry("no-follow", ("process",), ("process",), frozenset(), PROCESS),
        DriverEntry("follows", ("process",), ("process",), frozenset({Capability.LIVE_LOGS}),
                    PROCESS),
    ])
    store = Store.open(tmp_path / "state.db")
    reconciler = Reconciler(store, state_root=tmp_path / "st", registry=registry)
    with store.tx() as tx:
        for name, driver in (("quiet", "no-follow"), ("chatty", "follows")):
            tx.create_object("Workload", name, {"apiVersion": "uniframe.dev/v1alpha1",
                                                "kind": "Workload", "metadata": {"name": name},
                                                "spec": {"image": "x:1", "runtime": "process"}})
            tx.add_replica(f"{name}-r1", "Workload", name, driver=driver, image_digest="sha256:0")
    try:
        yield Api(store, reconciler)
    finally:
        reconciler.close()
        store.close()


def test_follow_is_refused_up_front_where_the_driver_cannot(api: Api) -> None:
    with pytest.raises(ApiError) as info:
        api.replica_logs("quiet-r1", follow=True)
    assert info.value.status == HTTPStatus.BAD_REQUEST
    assert "logs -f quiet-r1: the no-follow driver cannot follow logs" in str(info.value)
    with pytest.raises(ApiError, match="logs -f Workload/quiet: the no-follow driver"):
        api.object_logs("Workload", "quiet", follow=True)
    api.replica_logs("quiet-r1")  # reading without follow is fine
    api.replica_logs("chatty-r1", follow=True)
    api.object_logs("Workload", "chatty", follow=True)
