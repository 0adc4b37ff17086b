"""The model registry on both store backends, with real ONNX files; pickles are refused unread."""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from uniframe.build.examples import write_iris
from uniframe.build.modelstore import ModelStore
from uniframe.build.sklearn_onnx import convert_pickle
from uniframe.control.registry import Registry, model_ref_of
from uniframe.control.store import Store
from uniframe.errors import ConflictError, ModelError, NotFoundError

SVC = "InferenceService"
IRIS_SIGNATURE = {
    "inputs": [{"name": "X", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [{"name": "label", "datatype": "INT64", "shape": [-1]},
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}],
}


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real model files: the iris ONNX, another ONNX, a tree converted as the CLI does, a pickle, junk."""
    from onnx import TensorProto, helper, save
    from sklearn.datasets import load_iris
    from sklearn.tree import DecisionTreeClassifier

    root = tmp_path_factory.mktemp("models")
    iris = write_iris(root)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    save(model, str(root / "identity.onnx"))
    features, target = load_iris(return_X_y=True)
    tree = DecisionTreeClassifier(max_depth=3, random_state=0).fit(features, target)
    with (root / "tree.pkl").open("wb") as fh:
        pickle.dump(tree, fh)
    (root / "tree.onnx").write_bytes(convert_pickle(root / "tree.pkl"))  # what `model push` sends
    (root / "notes.onnx").write_text("these are not the bytes of a model\n")
    return {"iris": iris, "identity": root / "identity.onnx", "tree": root / "tree.onnx",
            "pickle": root / "tree.pkl", "junk": root / "notes.onnx"}


@pytest.fixture
def registry(store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Registry]:
    monkeypatch.setenv("UNIFRAME_DATA", str(tmp_path / "data"))
    yield Registry(store)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_push_stores_the_model_content_addressed(registry: Registry, models: dict[str, Path],
                                                  tmp_path: Path) -> None:
    pushed = registry.push(models["iris"], "iris", metadata={"owner": "ml-team"})
    m = pushed.model
    assert pushed.created
    assert (m.ref, m.format, m.sha256, m.size) == \
        ("iris@1", "onnx", _sha(models["iris"]), models["iris"].stat().st_size)
    assert {"inputs": m.inputs, "outputs": m.outputs} == IRIS_SIGNATURE
    assert m.metadata == {"owner": "ml-team"}
    blob = tmp_path / "data" / "models" / "blobs" / "sha256" / m.sha256
    assert blob.read_bytes() == models["iris"].read_bytes()
    assert registry.resolve("iris@1") == blob
    assert registry.inspect("iris", 1) == m
    assert registry.list() == [m]
    record = json.loads((tmp_path / "data" / "models" / "refs" / "iris" / "1.json").read_text())
    assert record["sha256"] == m.sha256  # what `uniframe build` reads without the store
    with registry.store.tx(readonly=True) as tx:
        events = [(e.kind, e.name, e.reason) for e in tx.events("Model")]
    assert events == [("Model", "iris", "Pushed")]


def test_versions_count_up_and_identical_bytes_are_not_pushed_twice(
        registry: Registry, models: dict[str, Path]) -> None:
    v1 = registry.push(models["iris"], "iris").model
    again = registry.push(models["iris"], "iris")
    assert (again.model, again.created) == (v1, False)
    v2 = registry.push(models["identity"], "iris").model
    assert v2.version == "2"
    labelled = registry.push(models["iris"], "iris", version="2024-05").model
    assert labelled.version == "2024-05"  # an explicit label is a new version, same bytes
    v3 = registry.push(models["tree"], "iris").model
    assert v3.version == "3"  # labels do not disturb the numbering
    assert registry.push(models["identity"], "iris", version=2).created is False
    with pytest.raises(ConflictError, match=r"iris@2 already exists with other content"):
        registry.push(models["iris"], "iris", version="2")
    other = registry.push(models["iris"], "copy").model  # same bytes, another name
    assert (other.ref, other.sha256) == ("copy@1", v1.sha256)
    assert [m.ref for m in registry.list()] == \
        ["copy@1", "iris@1", "iris@2", "iris@2024-05", "iris@3"]
    assert [m.ref for m in registry.list("iris")] == \
        ["iris@1", "iris@2", "iris@2024-05", "iris@3"]
    assert registry.inspect("iris", "03") == v3  # "03" is version 3, as iris@3 reads


def test_a_pickle_is_refused_without_being_read(registry: Registry, models: dict[str, Path],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The registry runs in the root daemon: a pickle is refused by name, never opened or loaded."""
    def no_unpickling(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the registry unpickled a file")

    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    with pytest.raises(ModelError, match=r"never loads a pickle.*converts a scikit-learn model"):
        registry.push(models["pickle"], "tree")
    assert registry.list() == []


def test_a_converted_tree_answers_like_the_estimator(registry: Registry,
                                                     models: dict[str, Path]) -> None:
    import onnxruntime as ort
    from sklearn.datasets import load_iris

    m = registry.push(models["tree"], "tree", metadata={"source_format": "sklearn"}).model
    assert (m.format, m.source_format) == ("onnx", "sklearn")
    assert m.inputs == [{"name": "X", "datatype": "FP32", "shape": [-1, 4]}]
    session = ort.InferenceSession(str(registry.resolve(m.ref)), providers=["CPUExecutionProvider"])
    features, _ = load_iris(return_X_y=True)
    with models["pickle"].open("rb") as fh:
        tree = pickle.load(fh)  # the test's own pickle, in the test's own process
    labels = session.run(["label"], {"X": features.astype(np.float32)})[0]
    assert (labels == tree.predict(features)).all()


def test_what_is_not_a_model_is_refused_and_nothing_is_stored(
        registry: Registry, models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"notes.onnx is not an ONNX model ONNX Runtime can load"):
        registry.push(models["junk"], "junk")
    with pytest.raises(ModelError, match="no such model file"):
        registry.push(tmp_path / "missing.onnx", "junk")
    with pytest.raises(ModelError, match="is not a model name"):
        registry.push(models["iris"], "../escape")
    with pytest.raises(ModelError, match="is not a model version"):
        registry.push(models["iris"], "iris", version="1/2")
    assert registry.list() == []
    assert ModelStore().blobs() == []


def test_lookups_of_what_is_not_there(registry: Registry, models: dict[str, Path]) -> None:
    registry.push(models["iris"], "iris")
    with pytest.raises(NotFoundError, match=r"iris@7 is not in the registry; versions of iris: 1"):
        registry.resolve("iris@7")
    with pytest.raises(NotFoundError, match=r"push it with `uniframe model push FILE --name x`"):
        registry.inspect("x", 1)
    with pytest.raises(ModelError, match=r"write NAME@VERSION, e.g. iris@1"):
        registry.resolve("iris")


@pytest.mark.parametrize("stored", [
    {"model": "iris@1"},
    {"model": {"name": "iris", "version": 1}},
    {"apiVersion": "uniframe.dev/v1alpha1", "kind": SVC, "metadata": {"name": "x"},
     "spec": {"model": {"name": "iris", "version": "1"}}},
])
def test_model_ref_of_reads_every_way_a_spec_names_a_model(stored: dict[str, Any]) -> None:
    assert model_ref_of(stored) == ("iris", "1")


def test_model_ref_of_ignores_file_models() -> None:
    assert model_ref_of({"spec": {"model": {"uri": "./iris.onnx"}}}) is None
    assert model_ref_of({"spec": {"model": "iris"}}) is None


def test_a_version_in_use_cannot_be_removed(registry: Registry, models: dict[str, Path]) -> None:
    registry.push(models["iris"], "iris")
    registry.push(models["identity"], "iris")
    with registry.store.tx() as tx:
        tx.create_object(SVC, "front", {"spec": {"model": "iris@1"}})
        tx.create_object(SVC, "back", {"spec": {"model": {"name": "iris", "version": 1}}})
        tx.create_object(SVC, "other", {"spec": {"model": "iris@2"}})
        tx.create_object("Workload", "iris", {"spec": {"image": "iris@1"}})
    with pytest.raises(ConflictError) as info:
        registry.remove("iris", 1)
    assert str(info.value) == (
        "model iris@1 is in use by InferenceService/back, InferenceService/front; change those "
        "specs to another model version or delete them, then remove it")
    assert registry.users("iris", 1) == ["InferenceService/back", "InferenceService/front"]
    assert registry.resolve("iris@1").is_file()  # refused means untouched
    with registry.store.tx() as tx:
        tx.delete_object(SVC, "front")
        tx.update_object(SVC, "back", {"spec": {"model": "iris@2"}}, generation=1)
    removed = registry.remove("iris", 1)
    assert removed.ref == "iris@1"
    assert [m.ref for m in registry.list()] == ["iris@2"]
    assert not ModelStore().blob_path(removed.sha256).exists()
    with pytest.raises(NotFoundError):
        registry.remove("iris", 1)
    with registry.store.tx(readonly=True) as tx:
        assert [e.reason for e in tx.events("Model", "iris")] == ["Pushed", "Pushed", "Removed"]


def test_shared_bytes_stay_while_another_version_has_them(registry: Registry,
                                                          models: dict[str, Path]) -> None:
    a = registry.push(models["iris"], "iris").model
    registry.push(models["iris"], "copy")
    registry.remove("iris", 1)
    assert registry.resolve("copy@1") == ModelStore().blob_path(a.sha256)
    registry.remove("copy", 1)
    assert ModelStore().blobs() == []


def test_require_holds_a_version_for_an_apply(registry: Registry, models: dict[str, Path]) -> None:
    registry.push(models["iris"], "iris")
    with registry.store.tx() as tx:
        assert registry.require(tx, "iris", 1).ref == "iris@1"
        tx.create_object(SVC, "x", {"spec": {"model": "iris@1"}})
    with pytest.raises(NotFoundError), registry.store.tx() as tx:
        registry.require(tx, "iris", 2)
    with pytest.raises(ConflictError, match="in use by InferenceService/x"):
        registry.remove("iris", 1)


def test_sync_repairs_what_a_crash_left_between_the_files_and_the_index(
        registry: Registry, models: dict[str, Path]) -> None:
    files = ModelStore()
    kept = registry.push(models["iris"], "iris").model
    gone = registry.push(models["identity"], "iris").model
    # a crash after deleting iris@2's row, before its files went
    with registry.store.tx() as tx:
        tx.remove_model("iris", "2")
    # and another one that lost iris@1's record file after its row was committed
    (files.root / "refs" / "iris" / "1.json").unlink()
    # and a blob written by a push that never committed
    orphan = files.put_blob(b"half a push")
    registry.sync()
    assert files.read_record("iris", "1") == kept
    assert files.read_record("iris", "2") is None
    assert files.blobs() == [kept.sha256]
    assert gone.sha256 != kept.sha256 and orphan not in files.blobs()


def test_resolve_rebuilds_a_lost_record(registry: Registry, models: dict[str, Path]) -> None:
    m = registry.push(models["iris"], "iris").model
    (ModelStore().root / "refs" / "iris" / "1.json").unlink()
    assert registry.resolve("iris@1") == ModelStore().blob_path(m.sha256)


def test_a_damaged_blob_is_reported_not_served(registry: Registry, models: dict[str, Path]) -> None:
    m = registry.push(models["iris"], "iris").model
    ModelStore().blob_path(m.sha256).write_bytes(b"bit rot")
    with pytest.raises(ModelError, match=r"iris@1: its file .* is missing or damaged"):
        registry.resolve("iris@1")


def test_open_syncs_and_closes_its_store(store_target: str, models: dict[str, Path],
                                         tmp_path: Path) -> None:
    root = tmp_path / "models"
    with Registry.open(store_target, root=root) as registry:
        registry.push(models["iris"], "iris")
    (root / "refs" / "iris" / "1.json").unlink()
    with Registry.open(store_target, root=root) as registry:
        assert (root / "refs" / "iris" / "1.json").is_file()
        assert registry.store._closed is False
    assert registry.store._closed is True
