"""The models on their own: defaults, normal forms, cross-field rules and the digest."""

from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from uniframe.spec import (
    API_VERSION,
    FileModel,
    InferenceService,
    RegistryModel,
    Spec,
    Workload,
    image_source,
)


def service(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": "InferenceService",
            "metadata": {"name": "iris"}, "spec": {"model": {"uri": "./iris.onnx"}, **spec}}


def workload(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": "Workload", "metadata": {"name": "w"}, "spec": spec}


def errors(model: type[InferenceService] | type[Workload], data: dict[str, Any]) -> list[str]:
    with pytest.raises(ValidationError) as info:
        model.model_validate(data)
    return [str(e.get("ctx", {}).get("error", e["msg"])) for e in info.value.errors()]


def test_defaults_are_filled_in() -> None:
    svc = InferenceService.model_validate(service())
    spec = svc.spec
    assert spec.runtime == "unikernel"
    assert spec.resources.cpus == 1.0
    assert spec.resources.memory == 256 * 1024**2
    assert spec.replicas == 1
    assert spec.autoscaling is None
    assert spec.port == 8080
    assert spec.health_check.path == "/v2/health/ready"
    assert spec.rollout.strategy == "rolling"
    assert (spec.rollout.max_surge, spec.rollout.max_unavailable) == (1, 0)
    assert spec.server.max_body_size is None  # derived from memory: 26Mi for 256Mi
    assert spec.server.body_limit(spec.resources.memory) == 26 * 1024**2
    assert spec.kernel is None
    assert isinstance(spec.model, FileModel)
    assert spec.model.format == "onnx"


def test_snake_case_names_work_from_python() -> None:
    data = service(autoscaling={"max": 3, "target_concurrency": 2})
    data["api_version"] = data.pop("apiVersion")
    svc = InferenceService.model_validate(data)
    assert svc.spec.autoscaling is not None
    assert svc.spec.autoscaling.target_concurrency == 2
    assert svc.spec.replicas is None
    assert svc.to_dict()["spec"]["autoscaling"]["targetConcurrency"] == 2


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("iris@3", RegistryModel(name="iris", version=3)),
        ("iris@2024-05", RegistryModel(name="iris", version="2024-05")),
        ({"name": "iris", "version": 3}, RegistryModel(name="iris", version=3)),
        ({"name": "iris", "version": "v2", "format": "sklearn"},
         RegistryModel(name="iris", version="v2", format="sklearn")),
        ({"uri": "./m.onnx"}, FileModel(uri=Path("m.onnx"), format="onnx")),
        ({"uri": "./m.joblib"}, FileModel(uri=Path("m.joblib"), format="sklearn")),
        ({"uri": "./m.bin", "format": "onnx"}, FileModel(uri=Path("m.bin"), format="onnx")),
        ({"uri": "file://m.pkl"}, FileModel(uri=Path("m.pkl"), format="sklearn")),
    ],
)
def test_model_references(model: Any, expected: Any) -> None:
    assert InferenceService.model_validate(service(model=model)).spec.model == expected


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("iris", "'iris' has no version; write name@version (e.g. iris@1), {name, version} or {uri: ./model.onnx}"),
        ("./iris.onnx", "'./iris.onnx' looks like a file; write model: {uri: ./iris.onnx}"),
        ({"uri": "./m.bin"}, "cannot tell the format of './m.bin' from its name; add format: onnx or format: sklearn"),
        ({"uri": "https://x/m.onnx"}, "'https://x/m.onnx': only local model files are supported; download it "
                                      "and use uri: ./model.onnx, or use a registry model {name, version}"),
        ({"uri": "a.onnx", "name": "a"}, "give either uri (a local file) or name and version (a registry model), not both"),
        ({"name": "iris", "version": 0}, "0 is not a version: versions start at 1"),
        ({"name": "iris", "version": 1.1}, "1.1 is not a version: YAML read a decimal number; use a whole "
                                           "number, or quote the version as text (e.g. version: '1.10')"),
        (7, "expected a model: {uri: ./model.onnx}, {name: iris, version: 3} or iris@3"),
    ],
)
def test_bad_model_references(model: Any, message: str) -> None:
    assert errors(InferenceService, service(model=model)) == [message]


def test_replicas_and_autoscaling_exclude_each_other() -> None:
    assert errors(InferenceService, service(replicas=2, autoscaling={"max": 3})) == [
        "give either replicas or autoscaling, not both"
    ]


def test_autoscaling_min_above_max() -> None:
    assert errors(InferenceService, service(autoscaling={"min": 4, "max": 2})) == [
        "min (4) is above max (2); lower min or raise max"
    ]


def test_zero_replicas_is_allowed() -> None:
    assert InferenceService.model_validate(service(replicas=0)).spec.replicas == 0


@pytest.mark.parametrize(
    ("rollout", "message"),
    [
        ({"maxSurge": 0, "maxUnavailable": "0%"},
         "maxSurge and maxUnavailable are both 0, so no replica could ever be replaced; raise one of them"),
        ({"strategy": "canary"}, "strategy canary needs canary: {trafficPercent: 10} (any 0..100)"),
        ({"canary": {"trafficPercent": 5}}, "canary settings apply only with strategy: canary"),
        ({"maxSurge": "150%"}, "'150%' is not a count or a percentage, use e.g. 1 or 25%"),
    ],
)
def test_rollout_rules(rollout: dict[str, Any], message: str) -> None:
    assert errors(InferenceService, service(rollout=rollout)) == [message]


def test_kernel_needs_a_machine() -> None:
    assert errors(InferenceService, service(runtime="container", kernel="./bzImage")) == [
        "kernel applies to runtimes unikernel and vm, not container"
    ]


def test_paths_stay_as_written_without_a_base_dir_and_resolve_with_one(tmp_path: Path) -> None:
    data = service(kernel="k/bzImage")
    plain = InferenceService.model_validate(data)
    assert plain.spec.kernel == Path("k/bzImage")
    based = InferenceService.model_validate(data, context={"base_dir": tmp_path})
    assert based.spec.kernel == tmp_path / "k/bzImage"
    assert based.local_paths() == {"spec.model.uri": tmp_path / "iris.onnx",
                                   "spec.kernel": tmp_path / "k/bzImage"}


def test_digest_is_stable_and_normalised() -> None:
    a = InferenceService.model_validate(service(resources={"memory": "256Mi"}))
    b = InferenceService.model_validate(service(resources={"memory": 268435456, "cpus": 1}))
    c = InferenceService.model_validate(service(resources={"memory": "512Mi"}))
    assert a.digest() == b.digest()
    assert a.digest() != c.digest()
    assert a.digest().startswith("sha256:") and len(a.digest()) == len("sha256:") + 64


def test_normalised_documents_validate_again_to_the_same_digest() -> None:
    adapter: TypeAdapter[InferenceService | Workload] = TypeAdapter(Spec)
    for data in (service(autoscaling={"max": 2}), workload(image="./d.qcow2", cloudInit={"userData": "#cloud-config"})):
        first = adapter.validate_python(data)
        again = adapter.validate_python(first.to_dict())
        assert again == first
        assert again.digest() == first.digest()


@pytest.mark.parametrize(
    ("reference", "source", "runtime"),
    [
        ("iris:latest", "store", "unikernel"),
        ("sha256:" + "a" * 64, "store", "unikernel"),
        ("./layout", "oci-layout", "container"),
        ("/srv/images/nginx", "oci-layout", "container"),
        ("nginx.tar", "oci-archive", "container"),
        ("./nginx.tar.gz", "oci-archive", "container"),
        ("disk.qcow2", "disk", "vm"),
        ("../disks/debian.RAW", "disk", "vm"),
    ],
)
def test_image_reference_decides_source_and_default_runtime(reference: str, source: str, runtime: str) -> None:
    assert image_source(reference) == source
    wl = Workload.model_validate(workload(image=reference))
    assert wl.spec.image_source == source
    assert wl.spec.runtime == runtime


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"image": "Not An Image"}, "'Not An Image' is not an image reference: use a uniframe image "
         "(iris:latest or sha256:<digest>), an OCI layout directory (./layout), an OCI archive "
         "(./image.tar) or a VM disk (./disk.qcow2, ./disk.raw)"),
        ({"image": "d.qcow2", "runtime": "container"}, "a VM disk image runs only with runtime: vm, not container"),
        ({"image": "./layout", "runtime": "vm"}, "an OCI image runs only with runtime: container, not vm"),
        ({"image": "iris:1", "cloudInit": {"userData": "x"}}, "cloudInit applies only to runtime: vm, not unikernel"),
        ({"image": "d.raw", "command": ["/bin/sh"]}, "a VM disk image boots its own init; drop command and args"),
        ({"image": "iris:1", "ports": [{"host": 80, "guest": 80}, {"host": 80, "guest": 81}]},
         "host port 80 is mapped twice; a host port serves one mapping"),
        ({"image": "iris:1", "healthCheck": {"http": {"port": 80}, "tcp": {"port": 80}}},
         "give exactly one of http: {path, port} or tcp: {port}"),
        ({"image": "d.raw", "cloudInit": {}}, "give exactly one of userData or userDataFile"),
    ],
)
def test_workload_rules(spec: dict[str, Any], message: str) -> None:
    assert errors(Workload, workload(**spec)) == [message]


@pytest.mark.parametrize("name", ["iris", "a", "iris-v2", "0x", "a" * 63])
def test_good_names(name: str) -> None:
    data = service()
    data["metadata"]["name"] = name
    assert InferenceService.model_validate(data).name == name


@pytest.mark.parametrize("name", ["Iris", "iris_v2", "-iris", "iris-", "", "a" * 64, "iris.v2"])
def test_bad_names(name: str) -> None:
    data = service()
    data["metadata"]["name"] = name
    (message,) = errors(InferenceService, data)
    assert message.startswith(f"{name!r} is not a valid name: use at most 63 lowercase letters")
