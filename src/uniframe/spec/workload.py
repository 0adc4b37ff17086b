"""``kind: Workload``: run an image uniframe did not build from a model.

This is how existing containers and VMs live beside the inference services:
the same resources, replicas, ports and health checks, with the image given
by reference. The image reference decides the default runtime, because a VM
disk can only boot as a VM and an OCI image only runs as a container.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from uniframe.spec.common import (
    BaseSpec,
    EnvVars,
    LocalPath,
    Port,
    Resources,
    Runtime,
    StrictModel,
    UrlPath,
    resolve_path,
)
from uniframe.spec.runtimes import RUNTIMES, ImageSource, runtime_for_source

_DISK_SUFFIXES = (".raw", ".qcow2", ".img")
_ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_PATH_PREFIXES = ("/", "./", "../", "~")
_STORE_REF = re.compile(r"sha256:[0-9a-f]{64}|[a-z0-9][a-z0-9._/-]*(:[A-Za-z0-9._-]+)?")


def image_source(reference: str) -> ImageSource:
    """Classify an image reference by its spelling alone (no file system access).

    Local directories must start with ``/``, ``./`` or ``../`` so a store name
    such as ``iris:1`` is never mistaken for a directory.
    """
    lower = reference.lower()
    if lower.endswith(_DISK_SUFFIXES):
        return "disk"
    if lower.endswith(_ARCHIVE_SUFFIXES):
        return "oci-archive"
    if reference.startswith(_PATH_PREFIXES):
        return "oci-layout"
    return "store"


class PortMapping(StrictModel):
    host: Port | None = Field(default=None, description="omit to pick a free host port")
    guest: Port = Field(description="the port the workload listens on, e.g. guest: 80")
    protocol: Literal["tcp", "udp"] = "tcp"


class HttpCheck(StrictModel):
    path: UrlPath = "/"
    port: Port = Field(description="the guest port to probe, e.g. port: 80")


class TcpCheck(StrictModel):
    port: Port = Field(description="the guest port to probe, e.g. port: 22")


class WorkloadHealthCheck(StrictModel):
    """Ready when an HTTP GET answers 2xx or 3xx, or when a TCP connection is accepted."""

    http: HttpCheck | None = None
    tcp: TcpCheck | None = None
    period_seconds: float = Field(default=10, gt=0)
    timeout_seconds: float = Field(default=1, gt=0)
    failure_threshold: int = Field(default=3, ge=1)

    @model_validator(mode="after")
    def _one_probe(self) -> WorkloadHealthCheck:
        if (self.http is None) == (self.tcp is None):
            raise ValueError("give exactly one of http: {path, port} or tcp: {port}")
        return self


class CloudInit(StrictModel):
    """User data for cloud-init in a VM, inline or from a file next to the spec."""

    user_data: str | None = None
    user_data_file: LocalPath | None = None

    @model_validator(mode="after")
    def _one_source(self) -> CloudInit:
        if (self.user_data is None) == (self.user_data_file is None):
            raise ValueError("give exactly one of userData or userDataFile")
        return self


class WorkloadSpec(StrictModel):
    image: str = Field(
        description="add e.g. image: iris:latest, image: ./oci-layout or image: ./disk.qcow2"
    )
    runtime: Runtime = "unikernel"
    resources: Resources = Field(default_factory=Resources)
    replicas: int = Field(default=1, ge=0)
    ports: list[PortMapping] = Field(default_factory=list)
    command: list[str] | None = None
    args: list[str] | None = None
    env: EnvVars = Field(default_factory=dict)
    health_check: WorkloadHealthCheck | None = None
    cloud_init: CloudInit | None = None

    @model_validator(mode="before")
    @classmethod
    def _runtime_from_image(cls, data: Any) -> Any:
        if isinstance(data, dict) and "runtime" not in data and isinstance(data.get("image"), str):
            data = {**data, "runtime": runtime_for_source(image_source(data["image"]))}
        return data

    @field_validator("image")
    @classmethod
    def _reference(cls, value: str, info: ValidationInfo) -> str:
        source = image_source(value)
        if source == "store":
            if not _STORE_REF.fullmatch(value):
                raise ValueError(
                    f"{value!r} is not an image reference: use a uniframe image (iris:latest or "
                    "sha256:<digest>), an OCI layout directory (./layout), an OCI archive "
                    "(./image.tar) or a VM disk (./disk.qcow2, ./disk.raw)"
                )
            return value
        resolved = resolve_path(Path(value), info)
        # keep the spelling when nothing changed: Path("./layout") prints as "layout", a store name
        return value if resolved == Path(value) else str(resolved)

    @model_validator(mode="after")
    def _fits_runtime(self) -> WorkloadSpec:
        source = self.image_source
        if source != "store" and source not in RUNTIMES[self.runtime].foreign_sources:
            what = "a VM disk image" if source == "disk" else "an OCI image"
            raise ValueError(f"{what} runs only with runtime: {runtime_for_source(source)}, "
                             f"not {self.runtime}")
        if self.cloud_init is not None and self.runtime != "vm":
            raise ValueError(f"cloudInit applies only to runtime: vm, not {self.runtime}")
        if source == "disk" and (self.command is not None or self.args is not None):
            raise ValueError("a VM disk image boots its own init; drop command and args")
        hosts = [p.host for p in self.ports if p.host is not None]
        twice = sorted({h for h in hosts if hosts.count(h) > 1})
        if twice:
            raise ValueError(f"host port {twice[0]} is mapped twice; a host port serves one mapping")
        return self

    @property
    def image_source(self) -> ImageSource:
        return image_source(self.image)

    @property
    def image_path(self) -> Path | None:
        """The image's local path (absolute once loaded from a file), or None for store images."""
        return None if self.image_source == "store" else Path(self.image)


class Workload(BaseSpec):
    kind: Literal["Workload"]
    spec: WorkloadSpec = Field(description="add the spec: mapping, with at least image")

    def local_paths(self) -> dict[str, Path]:
        """Files the spec refers to, by field path, for a runtime to read or a linter to check."""
        paths: dict[str, Path] = {}
        if self.spec.image_path is not None:
            paths["spec.image"] = self.spec.image_path
        if self.spec.cloud_init is not None and self.spec.cloud_init.user_data_file is not None:
            paths["spec.cloudInit.userDataFile"] = self.spec.cloud_init.user_data_file
        return paths
