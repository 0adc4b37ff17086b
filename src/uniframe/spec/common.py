"""Parts every kind shares: the strict base model, metadata, resources, paths.

Every model forbids unknown fields, because a misspelt field that is silently
ignored (``replica: 3``) is worse than a refused one. YAML is camelCase and
Python is snake_case: aliases bridge them, and either spelling is accepted
from Python code.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
)
from pydantic.alias_generators import to_camel

from uniframe.spec.runtimes import Runtime as Runtime  # the names live in spec/runtimes.py
from uniframe.spec.units import parse_size

API_VERSION = "uniframe.dev/v1alpha1"

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


class StrictModel(BaseModel):
    """Base of every spec model: unknown fields are errors, YAML spells fields in camelCase."""

    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        alias_generator=to_camel,
    )


Size = Annotated[int, BeforeValidator(parse_size)]
"""Bytes; written in YAML as ``256Mi``, ``1Gi``, ``512M`` or a plain number of bytes."""


def resolve_path(path: Path, info: ValidationInfo) -> Path:
    """Make a relative path absolute against the spec file's directory, when the loader gave one.

    Without a ``base_dir`` in the validation context (models built from Python)
    paths stay as written.
    """
    path = path.expanduser()
    base = info.context.get("base_dir") if isinstance(info.context, dict) else None
    if base is not None and not path.is_absolute():
        path = Path(os.path.normpath(Path(base) / path))
    return path


def _local_path(path: Path, info: ValidationInfo) -> Path:
    if str(path) in ("", "."):
        raise ValueError("is empty; give a file path, e.g. ./iris.onnx")
    return resolve_path(path, info)


LocalPath = Annotated[Path, AfterValidator(_local_path)]
"""A local file path; relative paths are relative to the spec file, not the working directory."""


def dns_label(value: str) -> str:
    if len(value) > 63 or not _DNS_LABEL.fullmatch(value):
        hint = re.sub(r"[^a-z0-9-]+", "-", value.lower()).strip("-")[:63] or "my-service"
        raise ValueError(
            f"{value!r} is not a valid name: use at most 63 lowercase letters, digits and '-', "
            f"starting and ending with a letter or digit (e.g. {hint})"
        )
    return value


def _url_path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"{value!r} is not a URL path; start it with '/', e.g. /healthz")
    return value


UrlPath = Annotated[str, AfterValidator(_url_path)]
Port = Annotated[int, Field(ge=1, le=65535)]


class Metadata(StrictModel):
    name: Annotated[str, AfterValidator(dns_label)] = Field(description="add e.g. name: iris")
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class Resources(StrictModel):
    cpus: float = Field(default=1.0, gt=0)
    memory: Size = 256 * 1024**2


def _env_names(value: dict[str, str]) -> dict[str, str]:
    for name in value:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(
                f"{name!r} is not an environment variable name: use letters, digits and '_', "
                "not starting with a digit"
            )
    return value


EnvVars = Annotated[dict[str, str], AfterValidator(_env_names)]


class BaseSpec(StrictModel):
    """Fields and behaviour shared by every kind (``apiVersion``, ``kind``, ``metadata``)."""

    api_version: Literal["uniframe.dev/v1alpha1"]
    kind: str
    metadata: Metadata = Field(description="add e.g. metadata: {name: iris}")

    @field_validator("api_version", mode="before")
    @classmethod
    def _known_api_version(cls, value: Any) -> Any:
        if value != API_VERSION:
            raise ValueError(f"{value!r} is not supported, use {API_VERSION}")
        return value

    @property
    def name(self) -> str:
        return self.metadata.name

    def local_paths(self) -> dict[str, Path]:
        """Files the document refers to, by field path; each kind lists its own."""
        return {}

    def to_dict(self) -> dict[str, Any]:
        """The normalised document as YAML/JSON would spell it (camelCase, sizes in bytes)."""
        return self.model_dump(mode="json", by_alias=True)

    def digest(self) -> str:
        """``sha256:<hex>`` of the canonical JSON of the validated document.

        Image manifests record it so a build can be traced to the exact spec;
        defaults are filled in and sizes normalised first, so ``256Mi`` and
        ``268435456`` give the same digest.
        """
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()
