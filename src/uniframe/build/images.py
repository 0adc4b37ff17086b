"""One entry point for building an InferenceService into the image its runtime runs.

- ``unikernel``: :func:`uniframe.build.unikernel.build_unikernel`.
- ``container``: the same traced closure as the unikernel, as an OCI image
  ("distroless"); or, with ``conventional=True``, the Debian-based image a
  team would write a Dockerfile for (the comparison baseline).
- ``vm``: a Debian disk with the server as a systemd service.
- ``process``: the model and the server's arguments; the host's Python runs it.

Every image records the same facts where they apply (model, port, files,
executables, setuid files, packages), so runtimes can be compared. Each is
stored under :func:`image_name` (the service's name plus its runtime's
suffix, from :mod:`uniframe.spec.runtimes`), which ``uniframe run -f`` uses
to find it again.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from typing import Any

from uniframe.build.model import resolve_model
from uniframe.build.store import BUILD_INFO, Image, ImageStore, finalize_manifest
from uniframe.build.unikernel import (
    GUEST_ENV,
    SERVER_MODULE,
    _build_info,
    _common_manifest,
    build_unikernel,
    model_signature,
    prepare_app_root,
    server_args,
)
from uniframe.errors import BuildError
from uniframe.spec import InferenceService
from uniframe.spec.runtimes import RUNTIME_NAMES, RUNTIMES, Runtime

Progress = Callable[[str], None]


def image_name(service: str, runtime: Runtime) -> str:
    """The store name of ``service``'s image for ``runtime``: ``iris``, ``iris-container``..."""
    return RUNTIMES[runtime].image_name(service)


def build_image(
    service: InferenceService,
    *,
    source_digest: str,
    runtime: Runtime | None = None,
    conventional: bool = False,
    compression: Any = None,
    store: ImageStore | None = None,
    progress: Progress | None = None,
) -> Image:
    """Build ``service`` for ``runtime`` (default: its spec's) and return the stored image."""
    runtime = runtime or service.spec.runtime
    store = store or ImageStore()
    say = progress or (lambda _m: None)
    if conventional and runtime != "container":
        raise BuildError("--conventional builds the Debian-based container image; use it with "
                         "runtime container")
    if runtime == "unikernel":
        return build_unikernel(service, source_digest=source_digest, compression=compression,
                               store=store, progress=say).image
    if runtime == "container":
        if conventional:
            return build_conventional_container(service, source_digest, store, say)
        return build_container(service, source_digest, store, say)
    if runtime == "vm":
        return build_vm(service, source_digest, store, say)
    if runtime == "process":
        return build_process(service, source_digest, store, say)
    raise BuildError(f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIME_NAMES)}")


def build_container(service: InferenceService, source_digest: str, store: ImageStore,
                    say: Progress) -> Image:
    """The traced closure as an OCI image: no shell, no package manager, one executable."""
    from uniframe.build.oci import add_layout_to_store, write_image_layout

    timings: dict[str, float] = {}
    staging = store.staging_dir()
    try:
        app = prepare_app_root(service, staging, say, timings)
        model_dest = app.root / app.image_model.lstrip("/")
        model_dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(app.model.path, model_dest)
        say("writing the OCI image layout")
        t = time.monotonic()
        layout = staging / "layout"
        write_image_layout(
            app.root, layout, entrypoint=[app.closure.interpreter, "-I", "-m", SERVER_MODULE],
            cmd=app.guest_args, env={**GUEST_ENV, **service.spec.env},
            exposed_ports=[service.spec.port],
            labels={"org.opencontainers.image.title": f"uniframe {service.metadata.name}"})
        timings["layout"] = time.monotonic() - t
        extra = _common_manifest(service, app, source_digest)
        extra["flavour"] = "distroless"
        (layout / BUILD_INFO).write_text(_build_info(timings, app))
        return add_layout_to_store(layout, image_name(service.metadata.name, "container"), store,
                                   extra)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def build_conventional_container(service: InferenceService, source_digest: str,
                                 store: ImageStore, say: Progress) -> Image:
    """The Debian-based image (debootstrap minbase + python3 + pip), for comparison."""
    from uniframe.build.debian import conventional_python_image, rootfs_stats
    from uniframe.build.oci import add_layout_to_store

    staging = store.staging_dir()
    try:
        model = resolve_model(service, staging / "model")
        say("debootstrap + pip (cached after the first build)")
        layout = staging / "layout"
        conventional_python_image(layout, model.path, port=service.spec.port)
        from uniframe.build.debian import conventional_python_rootfs

        stats = rootfs_stats(conventional_python_rootfs())
        extra = {
            "schema": 1, "flavour": "conventional", "port": service.spec.port,
            "model": {"name": model.name, "version": model.version, "sha256": model.sha256,
                      "path": f"/model/{model.path.name}", "bytes": model.size,
                      **model_signature(model)},
            "file_count": stats.files, "executables_count": stats.executables,
            "setuid": stats.setuid, "rootfs_bytes": stats.size_bytes,
            "source_spec_digest": source_digest,
        }
        return add_layout_to_store(layout, f"{service.metadata.name}-conventional", store, extra)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def build_vm(service: InferenceService, source_digest: str, store: ImageStore,
             say: Progress) -> Image:
    """A Debian bookworm disk with the server as a systemd service (full VM under QEMU q35)."""
    from uniframe.build.vmdisk import VMApp, build_vm_image

    staging = store.staging_dir()
    try:
        model = resolve_model(service, staging / "model")
        say("debootstrap, systemd, python and the server into an ext4 disk (base cached)")
        app = VMApp(model.name, model.path, service.spec.port,
                    args=tuple(server_args(service, "", model)[1:]),
                    env=tuple(sorted(service.spec.env.items())))
        return build_vm_image(app, store, image_name(service.metadata.name, "vm"),
                              source_digest=source_digest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def build_process(service: InferenceService, source_digest: str, store: ImageStore,
                  say: Progress) -> Image:
    """The model plus the server's arguments, for the host's own Python to run."""
    staging = store.staging_dir()
    try:
        say("resolving the model")
        model = resolve_model(service, staging / "model")
        image_dir = staging / "image"
        image_dir.mkdir()
        shutil.copyfile(model.path, image_dir / "model.onnx")
        args = server_args(service, "model.onnx", model)[1:]  # the driver puts the model path first
        manifest: dict[str, Any] = {
            "schema": 1, "kind": "process", "name": service.metadata.name,
            "files": {"model": {"path": "model.onnx"}}, "args": args, "port": service.spec.port,
            "env": dict(service.spec.env),
            "model": {"name": model.name, "version": model.version, "sha256": model.sha256,
                      "bytes": model.size, **model_signature(model)},
            "resources": {"cpus": service.spec.resources.cpus,
                          "memory": service.spec.resources.memory},
            "source_spec_digest": source_digest,
        }
        finalize_manifest(image_dir, manifest)
        (image_dir / BUILD_INFO).write_text(json.dumps({"built_at": time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n")
        return store.add_dir(image_dir, image_name(service.metadata.name, "process"), move=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def image_port(image: Image) -> int:
    """The port the image's server listens on inside its runtime."""
    m = image.manifest
    if "port" in m:
        return int(m["port"])
    if "app" in m:
        return int(m["app"]["port"])
    raise BuildError(f"image {image.short} does not say which port it serves")


def image_model_name(image: Image) -> str:
    m = image.manifest
    if "model" in m:
        return str(m["model"]["name"])
    if "app" in m:
        return str(m["app"]["name"])
    raise BuildError(f"image {image.short} does not say which model it serves")


def image_model_inputs(image: Image) -> list[dict[str, Any]]:
    m = image.manifest
    if "model" in m and "inputs" in m["model"]:
        return list(m["model"]["inputs"])
    return []
