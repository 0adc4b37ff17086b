"""The runtime names a spec may write, and what each one builds: the one table of them.

A runtime *name* (``spec.runtime: unikernel``) is a word of the spec
language; a *driver* (``qemu-microvm``) is the code that runs replicas on a
host. They are kept apart on purpose. The spec layer must import nothing of
ours, so it cannot ask the runtime layer which names exist; yet spec
validation, the image builder, ``uniframe build --runtime`` and the runtime
registry all need the same list. So the names live here, at the lowest layer
that needs them, together with the two facts about them that the layers
above share: which kind of image a runtime's build produces (the ``kind`` of
the stored image manifest) and the suffix the builder adds to the service's
name for it. :mod:`uniframe.runtime.registry` declares which drivers serve
each name and checks, when it is imported and in its tests, that every name
here has a driver and that no driver serves a name missing here.

``Runtime`` must stay a ``Literal`` for pydantic and mypy; the check at the
bottom of this module keeps it and :data:`RUNTIMES` the same list, so a name
added to one and forgotten in the other fails on import, not in production.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

Runtime = Literal["unikernel", "vm", "container", "process"]

ImageSource = Literal["store", "oci-layout", "oci-archive", "disk"]
"""Where an image comes from: uniframe's image store, an OCI layout directory or archive, a VM disk."""


@dataclass(frozen=True)
class RuntimeName:
    """One word ``spec.runtime`` accepts and what building for it makes."""

    name: Runtime
    image_kind: str              # the stored image's manifest ``kind`` this runtime's build makes
    image_suffix: str            # appended to the service's name to name that image
    summary: str
    foreign_sources: tuple[ImageSource, ...] = ()  # images not built by uniframe it runs (Workload)

    def image_name(self, service: str) -> str:
        """The store name of ``service``'s image for this runtime (``iris-container``)."""
        return service + self.image_suffix


RUNTIMES: dict[Runtime, RuntimeName] = {
    "unikernel": RuntimeName("unikernel", "unikernel", "",
                             "a tailored kernel and the server alone, booted as a microVM"),
    "vm": RuntimeName("vm", "vm", "-vm", "a full Debian VM, or a user's own disk",
                      foreign_sources=("disk",)),
    "container": RuntimeName("container", "oci", "-container", "an OCI container",
                             foreign_sources=("oci-layout", "oci-archive")),
    "process": RuntimeName("process", "process", "-process",
                           "the server as a plain host process (the baseline)"),
}

RUNTIME_NAMES: tuple[Runtime, ...] = tuple(RUNTIMES)


def runtime_name(name: str) -> RuntimeName:
    """The entry for ``name``; an unknown name is an error that lists the known ones."""
    for runtime in RUNTIMES.values():
        if runtime.name == name:
            return runtime
    raise ValueError(f"unknown runtime {name!r}; use one of {', '.join(RUNTIME_NAMES)}")


def runtime_of_image_kind(kind: str) -> Runtime | None:
    """The runtime whose build makes images of ``kind`` (``oci`` -> ``container``), if any."""
    return next((r.name for r in RUNTIMES.values() if r.image_kind == kind), None)


def runtime_for_source(source: ImageSource) -> Runtime:
    """The runtime a Workload defaults to for an image from ``source`` (a store image: unikernel)."""
    return next((r.name for r in RUNTIMES.values() if source in r.foreign_sources), "unikernel")


if set(get_args(Runtime)) != set(RUNTIMES) or any(k != v.name for k, v in RUNTIMES.items()):
    raise ImportError(f"uniframe.spec.runtimes: the Runtime literal {get_args(Runtime)} and the "
                      f"RUNTIMES table {tuple(RUNTIMES)} name different runtimes; keep them equal")
