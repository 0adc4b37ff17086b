"""The exception tree: which errors are permanent, and that every error uniframe raises is in it."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from uniframe import errors
from uniframe.build.model import resolve_model
from uniframe.build.modelstore import ModelStore
from uniframe.errors import (
    BuildError,
    CredentialError,
    ImageError,
    MissingExtraError,
    SpecError,
    UniframeError,
    is_permanent,
)
from uniframe.extras import BUILD
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
