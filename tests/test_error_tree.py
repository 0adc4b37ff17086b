"""The exception tree: which errors are permanent, and that every error uniframe raises is in it."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from uniframe import errors
from uniframe.build.model import resolve_model
from uniframe.build.modelstore import ModelStore
from uniframe.build.store import ImageStore, finalize_manifest
from uniframe.errors import (
    BuildError,
    CredentialError,
    ImageError,
    MissingExtraError,
    RuntimeDriverError,
    SpecError,
    UniframeError,
    is_permanent,
)
from uniframe.extras import BUILD
from uniframe.runtime.local import ProcessDriver
from uniframe.runtime.registry import REGISTRY
from uniframe.runtime.replica import ImageRef, ReplicaConfig
from uniframe.runtime.runc.driver import resolve_image
from uniframe.spec import InferenceService, load_data


def test_errors_are_temporary_unless_marked() -> None:
    assert not is_permanent(BuildError("mksquashfs crashed"))
    assert is_permanent(BuildError("spec.model: iris@3 is not in the registry", permanent=True))
    assert is_permanent(SpecError("spec.replicas: must be >= 0"))
    assert not is_permanent(SpecError("odd, but retry", permanent=False))
    assert is_permanent(ImageError("kind vm-disk is not run by runtime process", permanent=True))


def test_an_exception_from_outside_the_tree_is_temporary() -> None:
    assert not is_permanent(OSError(28, "No space left on device"))
    assert not is_permanent(KeyError("a bug"))


def test_the_mark_belongs_to_the_instance_not_the_class() -> None:
    BuildError("one", permanent=True)
    assert not BuildError("another").permanent
    assert BuildError.permanent is False and SpecError.permanent is True


def test_the_mark_survives_pickling() -> None:
    """The mark lives in the instance, so an error sent across processes keeps it."""
    again = pickle.loads(pickle.dumps(BuildError("x", permanent=True)))
    assert is_permanent(again) and str(again) == "x"


def test_credential_and_missing_extra_errors_are_in_the_tree() -> None:
    assert issubclass(CredentialError, UniframeError)
    err = MissingExtraError("uniframe examples iris", "scikit-learn", BUILD, "is not installed")
    assert isinstance(err, UniframeError) and not is_permanent(err)
    assert "pip install 'uniframe[build]'" in str(err)
    documented = errors.__doc__ or ""
    for name in ("CredentialError", "MissingExtraError"):
        assert name in documented


def test_a_model_missing_from_the_registry_is_permanent(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both where the registry's files say so and through the build that asked."""
    with pytest.raises(UniframeError) as caught:
        ModelStore(tmp_path).resolve("iris", 3)
    assert is_permanent(caught.value), caught.value
    monkeypatch.setenv("UNIFRAME_DATA", str(tmp_path))
    service = load_data({"apiVersion": "uniframe.dev/v1alpha1", "kind": "InferenceService",
                         "metadata": {"name": "iris"}, "spec": {"model": "iris@3"}}).spec
    assert isinstance(service, InferenceService)
    with pytest.raises(BuildError, match="iris@3 is not in the model registry") as built:
        resolve_model(service, tmp_path / "work")
    assert is_permanent(built.value)


def _stored_image(tmp_path: Path, kind: str) -> tuple[ImageStore, Path]:
    """An image of ``kind`` in a fresh store (no files: only its kind is read)."""
    src = tmp_path / "src"
    src.mkdir()
    finalize_manifest(src, {"kind": kind, "files": {}})
    store = ImageStore(tmp_path / "images")
    return store, store.add_dir(src, f"{kind}:1").dir


def test_an_image_kind_a_driver_cannot_run_is_permanent(tmp_path: Path) -> None:
    """Retrying cannot make runc run a unikernel or the process driver a VM: the spec must
    name another image or runtime."""
    store, unikernel = _stored_image(tmp_path, "unikernel")
    with pytest.raises(ImageError, match="the runc driver runs OCI images") as runc:
        resolve_image("unikernel:1", store)
    assert is_permanent(runc.value)
    config = ReplicaConfig(image=ImageRef("unikernel:1", "", Path(), Path(), kind="unikernel",
                                          path=unikernel))
    with pytest.raises(RuntimeDriverError, match="not a process image") as process:
        ProcessDriver(tmp_path / "replicas").create(config)
    assert is_permanent(process.value)


def test_a_runtime_or_image_kind_no_driver_serves_is_permanent() -> None:
    with pytest.raises(RuntimeDriverError, match="unknown runtime") as runtime:
        REGISTRY.entry_for_runtime("wasm")
    assert is_permanent(runtime.value)
    with pytest.raises(RuntimeDriverError, match="which no driver runs") as kind:
        REGISTRY.entry_for_image_kind("wasm-module")
    assert is_permanent(kind.value)
