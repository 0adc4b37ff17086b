"""Loading YAML spec files: documents, where they came from, and every problem worded for people."""

import textwrap
from pathlib import Path

import pytest

from uniframe.errors import SpecError
from uniframe.spec import (
    FileModel,
    InferenceService,
    RegistryModel,
    Workload,
    check_file,
    check_text,
    load_data,
    load_file,
    load_text,
)

DATA = Path(__file__).parent / "data"

HEAD = "apiVersion: uniframe.dev/v1alpha1\nkind: InferenceService\nmetadata: {name: iris}\n"


def problems(text: str) -> list[str]:
    return [str(p) for p in check_text(textwrap.dedent(text), "svc.yaml").problems]


def service_with(spec: str) -> str:
    """A valid InferenceService whose spec mapping gets ``spec`` (YAML lines) added."""
    return HEAD + "spec:\n  model: {uri: ./iris.onnx}\n" + textwrap.indent(textwrap.dedent(spec), "  ")


def test_one_document_with_every_section() -> None:
    (doc,) = load_file(DATA / "service.yaml")
    assert (doc.source, doc.index, doc.kind, doc.name) == (str(DATA / "service.yaml"), 1, "InferenceService", "iris")
    assert doc.where == f"{DATA / 'service.yaml'}, document 1"
    assert str(doc) == "InferenceService/iris"
    assert isinstance(doc.spec, InferenceService)
    spec = doc.spec.spec
    assert doc.spec.metadata.labels == {"team": "ml"}
    assert spec.model == FileModel(uri=DATA / "models" / "iris.onnx", format="onnx")
    assert spec.kernel == DATA.parent / "kernels" / "bzImage"
    assert spec.resources.memory == 256 * 1024**2
    assert spec.replicas is None
    assert spec.autoscaling is not None
    assert (spec.autoscaling.min, spec.autoscaling.max, spec.autoscaling.target_concurrency) == (0, 8, 4)
    assert spec.rollout.strategy == "canary"
    assert spec.rollout.max_surge == "25%"
    assert spec.rollout.canary is not None and spec.rollout.canary.traffic_percent == 10
    assert spec.env == {"OMP_NUM_THREADS": "1"}
    assert spec.health_check.period_seconds == 5
    assert spec.health_check.path == "/v2/health/ready"
    assert (spec.server.threads, spec.server.max_body_size) == (2, 16 * 1024**2)
    assert spec.image.compression == "zstd"


def test_several_documents_keep_their_index_and_skip_empty_ones() -> None:
    docs = load_file(DATA / "several.yaml")
    assert [(d.index, str(d)) for d in docs] == [
        (1, "InferenceService/iris"), (3, "Workload/legacy-db"), (4, "Workload/web"),
    ]
    svc, vm, web = (d.spec for d in docs)
    assert isinstance(svc, InferenceService)
    assert svc.spec.model == RegistryModel(name="iris", version=3)
    assert svc.spec.replicas == 2
    assert isinstance(vm, Workload) and isinstance(web, Workload)
    assert vm.spec.runtime == "vm"
    assert vm.spec.image == str(DATA / "disks" / "debian.qcow2")
    assert vm.spec.health_check is not None and vm.spec.health_check.tcp is not None
    assert vm.local_paths() == {"spec.image": DATA / "disks" / "debian.qcow2",
                                "spec.cloudInit.userDataFile": DATA / "user-data.yaml"}
    assert web.spec.runtime == "container"
    assert web.spec.image_path == DATA / "oci" / "nginx"
    assert web.spec.command == ["nginx", "-g", "daemon off;"]


def test_relative_paths_follow_the_spec_file_not_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec_dir = tmp_path / "project" / "deploy"
    spec_dir.mkdir(parents=True)
    (spec_dir / "svc.yaml").write_text(HEAD + "spec:\n  model: {uri: ../models/iris.onnx}\n  kernel: bzImage\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    (doc,) = load_file(Path("..") / "project" / "deploy" / "svc.yaml")
    assert isinstance(doc.spec, InferenceService)
    assert doc.spec.local_paths() == {
        "spec.model.uri": (tmp_path / "project" / "models" / "iris.onnx").resolve(),
        "spec.kernel": (spec_dir / "bzImage").resolve(),
    }
    assert doc.base_dir == spec_dir.resolve()
    # text without a file resolves against the directory given, else the working directory
    (from_text,) = load_text(HEAD + "spec: {model: {uri: m.onnx}}\n", "<stdin>")
    assert isinstance(from_text.spec, InferenceService)
    assert isinstance(from_text.spec.spec.model, FileModel)
    assert from_text.spec.spec.model.uri == elsewhere.resolve() / "m.onnx"
    (based,) = load_text(HEAD + "spec: {model: {uri: m.onnx}}\n", "<stdin>", base_dir=spec_dir)
    assert based.spec.local_paths()["spec.model.uri"] == spec_dir.resolve() / "m.onnx"


def test_errors_of_every_document_are_collected_and_valid_documents_kept() -> None:
    path = DATA / "invalid.yaml"
    report = check_file(path)
    assert [str(d) for d in report.documents] == ["InferenceService/good"]
    assert [str(p) for p in report.problems] == [
        f"{path}, document 2: spec.resources.memory: '256Mb' is not a size, use e.g. 256Mi",
        f"{path}, document 2: spec.replica: unknown field; did you mean 'replicas'?",
    ]
    with pytest.raises(SpecError) as info:
        load_file(path)
    assert str(info.value).splitlines() == [str(p) for p in report.problems]


def test_yaml_syntax_errors_give_line_and_column() -> None:
    path = DATA / "broken.yaml"
    with pytest.raises(SpecError) as info:
        load_file(path)
    assert str(info.value) == (
        f"{path}, document 1, line 6, column 4: invalid YAML: expected <block end>, but found "
        "'<block mapping start>' (while parsing a block mapping); check the indentation of this line "
        "against the lines above"
    )
    assert problems("a: b: c\n") == [
        "svc.yaml, document 1, line 1, column 5: invalid YAML: mapping values are not allowed here; "
        "quote a value that contains ': ', or check the indentation"
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # the two examples of the brief, word for word
        (HEAD + "spec:\n  model: {uri: ./iris.onnx}\n  replica: 3\n",
         ["svc.yaml, document 1: spec.replica: unknown field; did you mean 'replicas'?"]),
        (service_with("resources: {memory: 256Mb}"),
         ["svc.yaml, document 1: spec.resources.memory: '256Mb' is not a size, use e.g. 256Mi"]),
        # unknown fields deep down, with and without a close match
        (service_with("autoscaling: {max: 3, targetConcurency: 2}"),
         ["svc.yaml, document 1: spec.autoscaling.targetConcurency: unknown field; did you mean 'targetConcurrency'?"]),
        (service_with("rollout: {max_surge: 2}"), []),  # snake_case is accepted too (populate_by_name)
        (service_with("healthCheck: {zzz: 1}"),
         ["svc.yaml, document 1: spec.healthCheck.zzz: unknown field; allowed here: "
          "failureThreshold, path, periodSeconds, timeoutSeconds"]),
        (HEAD.replace("{name: iris}", "{name: iris, labelz: {a: b}}") + "spec: {model: iris@1}\n",
         ["svc.yaml, document 1: metadata.labelz: unknown field; did you mean 'labels'?"]),
        (HEAD + "spec:\n  model: {uri: ./iris.onnx, formt: onnx}\n",
         ["svc.yaml, document 1: spec.model.formt: unknown field; did you mean 'format'?"]),
        (HEAD + "spec: {model: iris@1}\nstatus: {}\n",
         ["svc.yaml, document 1: status: unknown field; allowed here: apiVersion, kind, metadata, spec"]),
        # missing fields, with a hint on what to write
        (HEAD + "spec: {replicas: 2}\n",
         ["svc.yaml, document 1: spec.model: required field is missing; add e.g. "
          "model: {uri: ./model.onnx} or model: {name: iris, version: 3}"]),
        (HEAD,
         ["svc.yaml, document 1: spec: required field is missing; add the spec: mapping, with at least model"]),
        ("apiVersion: uniframe.dev/v1alpha1\nkind: Workload\nmetadata: {}\nspec: {}\n",
         ["svc.yaml, document 1: metadata.name: required field is missing; add e.g. name: iris",
          "svc.yaml, document 1: spec.image: required field is missing; add e.g. image: iris:latest, "
          "image: ./oci-layout or image: ./disk.qcow2"]),
        # wrong types
        (service_with("replicas: two"),
         ["svc.yaml, document 1: spec.replicas: expected a whole number, got the text 'two'"]),
        (service_with("replicas: 1.5"),
         ["svc.yaml, document 1: spec.replicas: expected a whole number, got the number 1.5"]),
        (service_with("env: {PORT: 8080}"),
         ["svc.yaml, document 1: spec.env.PORT: expected text, got the number 8080; "
          "quote it if you meant text, e.g. \"8080\""]),
        (service_with("resources:"),
         ["svc.yaml, document 1: spec.resources: expected a mapping (key: value), got nothing (null)"]),
        (service_with("resources: [1]"),
         ["svc.yaml, document 1: spec.resources: expected a mapping (key: value), got a list"]),
        (HEAD + "spec: {model: iris@1, env: {1BAD: x}}\n",
         ["svc.yaml, document 1: spec.env: '1BAD' is not an environment variable name: use letters, "
          "digits and '_', not starting with a digit"]),
        # bounds and choices
        (service_with("resources: {cpus: 0}"),
         ["svc.yaml, document 1: spec.resources.cpus: must be more than 0, got the number 0"]),
        (service_with("replicas: -1"),
         ["svc.yaml, document 1: spec.replicas: must be 0 or more, got the number -1"]),
        (service_with("port: 70000"),
         ["svc.yaml, document 1: spec.port: must be 65535 or less, got the number 70000"]),
        (service_with("runtime: unikernal"),
         ["svc.yaml, document 1: spec.runtime: 'unikernal' is not one of 'unikernel', 'vm', "
          "'container' or 'process'; did you mean 'unikernel'?"]),
        (service_with("image: {compression: xz}"),
         ["svc.yaml, document 1: spec.image.compression: 'xz' is not one of 'none', 'gzip', 'lz4' or 'zstd'"]),
        (service_with("healthCheck: {path: ready}"),
         ["svc.yaml, document 1: spec.healthCheck.path: 'ready' is not a URL path; start it with '/', "
          "e.g. /healthz"]),
        # cross-field rules are reported on the mapping that holds both fields
        (service_with("replicas: 2\nautoscaling: {max: 4}"),
         ["svc.yaml, document 1: spec: give either replicas or autoscaling, not both"]),
        (service_with("autoscaling: {min: 5, max: 4}"),
         ["svc.yaml, document 1: spec.autoscaling: min (5) is above max (4); lower min or raise max"]),
        (HEAD.replace("iris}", "Iris_V2}") + "spec: {model: iris@1}\n",
         ["svc.yaml, document 1: metadata.name: 'Iris_V2' is not a valid name: use at most 63 lowercase "
          "letters, digits and '-', starting and ending with a letter or digit (e.g. iris-v2)"]),
        # lists: the index is part of the path
        ("apiVersion: uniframe.dev/v1alpha1\nkind: Workload\nmetadata: {name: w}\n"
         "spec:\n  image: iris:1\n  ports: [{guest: 80}, {gest: 81, protocol: sctp}]\n",
         ["svc.yaml, document 1: spec.ports[1].guest: required field is missing; the port the workload "
          "listens on, e.g. guest: 80",
          "svc.yaml, document 1: spec.ports[1].protocol: 'sctp' is not one of 'tcp' or 'udp'",
          "svc.yaml, document 1: spec.ports[1].gest: unknown field; did you mean 'guest'?"]),
        # kind and apiVersion
        ("apiVersion: uniframe.dev/v1alpha1\nkind: InferenceServce\nmetadata: {name: a}\n",
         ["svc.yaml, document 1: kind: 'InferenceServce' is not a known kind; use one of: "
          "InferenceService, Workload (did you mean 'InferenceService'?)"]),
        ("apiVersion: uniframe.dev/v1alpha1\nmetadata: {name: a}\n",
         ["svc.yaml, document 1: kind: required field is missing; use one of: InferenceService, Workload"]),
        ("apiVersion: v1\nkind: Deployment\n",
         ["svc.yaml, document 1: kind: 'Deployment' is not a known kind; use one of: InferenceService, Workload",
          "svc.yaml, document 1: apiVersion: 'v1' is not supported, use uniframe.dev/v1alpha1"]),
        (HEAD.replace("uniframe.dev/v1alpha1", "uniframe.dev/v1") + "spec: {model: iris@1}\n",
         ["svc.yaml, document 1: apiVersion: 'uniframe.dev/v1' is not supported, use uniframe.dev/v1alpha1"]),
        # documents that are not specs at all
        ("- a\n- b\n",
         ["svc.yaml, document 1: expected a mapping with apiVersion, kind, metadata and spec, got a list"]),
        ("", ["svc.yaml: no documents; a spec needs apiVersion, kind, metadata and spec"]),
        ("# only a comment\n---\n", ["svc.yaml: no documents; a spec needs apiVersion, kind, metadata and spec"]),
        # YAML the parser refuses, with line and column
        (HEAD + "spec: {model: iris@1}\nspec: {model: iris@2}\n",
         ["svc.yaml, document 1, line 5, column 1: invalid YAML: key 'spec' appears twice in this mapping; keep one"]),
        (HEAD + "spec:\n  model: [iris\n",
         ["svc.yaml, document 1, line 6, column 1: invalid YAML: expected ',' or ']', but got '<stream end>' "
          "(while parsing a flow sequence)"]),
        (HEAD + "spec: {model: iris@1}\n---\nkind: Workload\n\tmetadata: {}\n",
         ["svc.yaml, document 2, line 7, column 1: invalid YAML: found character '\\t' that cannot start any "
          "token (while scanning for the next token)"]),
    ],
)
def test_problems_name_file_document_and_field(text: str, expected: list[str]) -> None:
    assert problems(text) == expected


def test_every_error_of_a_document_at_once_and_no_pydantic_noise() -> None:
    text = HEAD + textwrap.dedent("""\
        spec:
          model: {uri: ./iris.onnx}
          replica: 3
          resources: {cpus: -1, memory: 256Mb}
          runtime: docker
          port: http
        """)
    found = problems(text)
    assert [line.split(": ")[1] for line in found] == [
        "spec.runtime", "spec.resources.cpus", "spec.resources.memory", "spec.port", "spec.replica",
    ]
    joined = "\n".join(found)
    for noise in ("pydantic", "https://", "Input should", "Value error", "type="):
        assert noise not in joined


def test_several_bad_documents_are_all_reported() -> None:
    text = (HEAD + "spec: {model: iris@1, replicas: x}\n---\n" + HEAD + "spec: {model: iris@1}\n---\n"
            + HEAD + "spec: {model: iris@1, port: 0}\n")
    report = check_text(text, "svc.yaml")
    assert [d.index for d in report.documents] == [2]
    assert [(p.index, p.path) for p in report.problems] == [(1, "spec.replicas"), (3, "spec.port")]


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: d / "missing.yaml", "no such file"),
        (lambda d: d, "is a directory; give the spec files in it"),
        (lambda d: (d / "bin.yaml", (d / "bin.yaml").write_bytes(b"\xff\xfe\x00"))[0], "is not UTF-8 text; is it really a YAML spec?"),
    ],
)
def test_unreadable_files(tmp_path: Path, setup: object, message: str) -> None:
    path = setup(tmp_path)  # type: ignore[operator]
    with pytest.raises(SpecError) as info:
        load_file(path)
    assert str(info.value) == f"{path}: {message}"


def test_load_data_for_documents_already_parsed() -> None:
    doc = load_data({"apiVersion": "uniframe.dev/v1alpha1", "kind": "InferenceService",
                     "metadata": {"name": "iris"}, "spec": {"model": "iris@3"}}, "request body")
    assert (doc.source, doc.index, str(doc)) == ("request body", 1, "InferenceService/iris")
    with pytest.raises(SpecError) as info:
        load_data({"kind": "Workload", "apiVersion": "uniframe.dev/v1alpha1", "metadata": {"name": "w"},
                   "spec": {"image": "x:1", "replicas": -2}}, "request body")
    assert str(info.value) == "request body, document 1: spec.replicas: must be 0 or more, got the number -2"


def test_digest_does_not_depend_on_spelling() -> None:
    a = load_text(service_with("resources: {memory: 1Gi}"), "a.yaml", base_dir=Path("/srv"))[0]
    b = load_text(service_with("resources: {memory: 1073741824, cpus: 1.0}\nruntime: unikernel"),
                  "b.yaml", base_dir=Path("/srv"))[0]
    c = load_text(service_with("resources: {memory: 1Gi}"), "c.yaml", base_dir=Path("/elsewhere"))[0]
    assert a.digest() == b.digest()
    assert a.digest() != c.digest()  # another directory means another model file
