"""The runtime registry: one entry per driver, held equal to the spec's runtime names."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from uniframe.errors import RuntimeDriverError
from uniframe.runtime import registry
from uniframe.runtime.driver import Driver, ReplicaNotFoundError
from uniframe.runtime.registry import (
    ENTRIES,
    REGISTRY,
    Capability,
    DriverEntry,
    Registry,
    check_entries,
)
from uniframe.runtime.replica import ImageRef, ReplicaConfig
from uniframe.spec.runtimes import RUNTIME_NAMES, RUNTIMES, runtime_name, runtime_of_image_kind


def test_every_spec_runtime_name_has_a_driver_that_runs_what_it_builds() -> None:
    assert check_entries(ENTRIES, complete=True) == []
    for name in RUNTIME_NAMES:
        found = REGISTRY.entry_for_runtime(name)
        assert name in found.runtimes
        assert RUNTIMES[name].image_kind in found.image_kinds
        assert runtime_of_image_kind(RUNTIMES[name].image_kind) == name
    served = {r for e in REGISTRY.entries() for r in e.runtimes}
    assert served == set(RUNTIME_NAMES)


def test_every_entry_loads_a_driver_of_its_own_kind(tmp_path: Path) -> None:
    """The kind in the entry is the word the driver writes into every replica record."""
    for e in REGISTRY.entries():
        driver = REGISTRY.driver_for(e.kind, tmp_path)
        assert isinstance(driver, Driver)
        assert driver.kind == e.kind
        assert driver.root == tmp_path
        assert driver.list() == []


@pytest.mark.parametrize(("call", "message"), [
    (lambda: REGISTRY.driver_for_runtime("docker"),
     "unknown runtime 'docker'; use one of container, process, unikernel, vm"),
    (lambda: REGISTRY.driver_for("firecracker"),
     f"unknown driver 'firecracker'; drivers: {', '.join(REGISTRY.kinds())}"),
    (lambda: REGISTRY.driver_for_image_kind("wasm", what="image abc"),
     "image abc is of kind 'wasm', which no driver runs; drivers run oci, process, unikernel, vm images"),
])
def test_unknown_names_are_errors_that_list_the_known_ones(call: object, message: str) -> None:
    with pytest.raises(RuntimeDriverError) as info:
        call()  # type: ignore[operator]
    assert str(info.value) == message


def test_the_spec_table_refuses_unknown_names_listing_the_known_ones() -> None:
    assert runtime_name("vm").image_suffix == "-vm"
    with pytest.raises(ValueError, match=r"unknown runtime 'kvm'; use one of unikernel, vm, container, process"):
        runtime_name("kvm")


def _entry(kind: str, runtimes: tuple[str, ...], factory: str = "uniframe.runtime.local:ProcessDriver",
           caps: frozenset[Capability] = frozenset()) -> DriverEntry:
    return DriverEntry(kind=kind, runtimes=runtimes, image_kinds=("process",),  # type: ignore[arg-type]
                       capabilities=caps, factory=factory)


def test_an_inconsistent_registry_is_refused_with_every_problem() -> None:
    problems = check_entries([_entry("a", ("process",)), _entry("a", ("process", "wasm"))],
                             complete=True)
    assert "driver 'a' is registered twice" in problems
    assert ("driver 'a' serves wasm, which the spec does not accept "
            "(add them to uniframe.spec.runtimes)") in problems
    assert "runtime 'unikernel' has no driver (add a DriverEntry)" in problems
    with pytest.raises(RuntimeDriverError, match="the runtime registry is inconsistent: "):
        Registry([_entry("b", ("process",))], complete=True)
    # a test registry may serve only some names
    assert Registry([_entry("b", ("process",))]).kinds() == ("b",)


def test_a_runtime_may_have_several_drivers_the_first_preferred() -> None:
    second = _entry("process-b", ("process",))
    reg = Registry([*ENTRIES, second], complete=True)
    assert reg.entry_for_runtime("process").kind == "process"
    assert [e.kind for e in reg.serving("process")] == ["process", "process-b"]
    assert reg.entry("process-b") is second


def _process_image(directory: Path) -> ImageRef:
    from uniframe.build.store import finalize_manifest

    directory.mkdir()
    (directory / "model.onnx").write_bytes(b"not a model: nothing here runs")
    manifest = finalize_manifest(directory, {
        "schema": 1, "kind": "process", "name": "p", "files": {"model": {"path": "model.onnx"}},
        "args": ["--port", "8080"], "port": 8080})
    return ImageRef("p", manifest["digest"], Path(), Path(), kind="process", path=directory)


def test_find_and_all_replicas_see_every_driver_s_replicas(tmp_path: Path) -> None:
    root = tmp_path / "replicas"
    created = REGISTRY.driver_for("process", root).create(
        ReplicaConfig(image=_process_image(tmp_path / "img"), name="finder"))
    assert [r.id for r in REGISTRY.all_replicas(root)] == [created.id]
    for ref in (created.id, created.id[:6], "finder"):
        driver, found = REGISTRY.find(ref, root)
        assert (driver.kind, found.id) == ("process", created.id)
    with pytest.raises(ReplicaNotFoundError, match=r"no replica 'nope' \(replicas: .*finder.*uniframe ps -a"):
        REGISTRY.find("nope", root)
    # the module-level answers are the real registry's
    assert [r.id for r in registry.all_replicas(root)] == [created.id]


def test_factories_may_be_callables_for_drivers_made_in_tests(tmp_path: Path) -> None:
    made: list[Path | None] = []

    def factory(root: Path | None) -> Driver:
        made.append(root)
        return registry.driver_for("process", root)

    reg = Registry([DriverEntry("fake", ("process",), ("process",), frozenset(), factory)])
    assert reg.driver_for_runtime("process", tmp_path).kind == "process"
    assert made == [tmp_path]


def test_require_names_the_drivers_that_can() -> None:
    vm = REGISTRY.entry("qemu-vm")
    assert vm.can(Capability.LIVE_LOGS) and not vm.can(Capability.EXIT_STATUS)
    vm.require(Capability.LIVE_LOGS, "logs -f x")  # no error
    with pytest.raises(RuntimeDriverError) as info:
        REGISTRY.entry("process").require(Capability.RESOURCE_LIMITS, "--cpus/--memory")
    assert str(info.value) == (
        "--cpus/--memory: the process driver cannot enforce CPU and memory limits (it lacks the "
        "'resource-limits' capability); drivers that can: qemu-microvm, qemu-vm, runc "
        "(see 'uniframe runtimes')")
    with pytest.raises(RuntimeDriverError, match="drivers that can: qemu-microvm, qemu-vm "):
        REGISTRY.entry("process").require(Capability.SNAPSHOT, "snapshot r1")
    assert all(c.meaning for c in Capability)


def test_host_probes_answer_for_this_host(monkeypatch: pytest.MonkeyPatch) -> None:
    runc_ok, runc_why = REGISTRY.entry("runc").usable()
    assert runc_ok == (shutil.which("runc") is not None and os.geteuid() == 0), runc_why
    qemu_ok, qemu_why = REGISTRY.entry("qemu-microvm").usable()
    assert qemu_ok == (shutil.which("qemu-system-x86_64") is not None), qemu_why
    if qemu_ok:
        assert "accel " in qemu_why
    assert REGISTRY.entry("process").usable()[0]

    monkeypatch.setenv("UNIFRAME_QEMU", "/nonexistent/qemu-system-x86_64")
    ok, why = REGISTRY.entry("qemu-vm").usable()
    assert not ok and "apt-get install qemu-system-x86" in why

    def broken() -> tuple[bool, str]:
        raise OSError("no /proc")

    ok, why = DriverEntry("x", (), (), frozenset(), "m:C", probe=broken).usable()
    assert (ok, why) == (False, "the host check failed: no /proc")


def test_qemu_probe_reports_the_cached_accel_verdict(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    monkeypatch.setenv("UNIFRAME_CACHE", str(tmp_path))
    monkeypatch.delenv("UNIFRAME_ACCEL", raising=False)
    monkeypatch.delenv("UNIFRAME_QEMU", raising=False)
    from uniframe.runtime.qemu import accel

    key = accel.host_key(shutil.which("qemu-system-x86_64") or "")
    accel._write_cache(key, accel.AccelChoice("tcg", "a probe guest failed under KVM: it hangs"))
    ok, why = REGISTRY.entry("qemu-microvm").usable()
    assert ok and why.endswith("accel tcg: a probe guest failed under KVM: it hangs")
    monkeypatch.setenv("UNIFRAME_ACCEL", "kvm")
    assert REGISTRY.entry("qemu-microvm").usable()[1].endswith("accel kvm: set by UNIFRAME_ACCEL")


def test_the_snapshot_capability_matches_the_drivers_that_implement_it(tmp_path: Path) -> None:
    """Declared in the registry, implemented by the class: the two must agree, so a caller
    that asks the registry never meets the base class's refusal, and no driver's snapshot
    support goes unannounced."""
    for e in REGISTRY.entries():
        cls = type(e.create(tmp_path))
        implements = cls.snapshot is not Driver.snapshot and cls.restore is not Driver.restore
        assert e.can(Capability.SNAPSHOT) == implements, e.kind
