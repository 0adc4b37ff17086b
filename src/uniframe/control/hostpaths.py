"""Which host files a client may make the root daemon read: uploads, and roots the operator allows.

A spec names files (``spec.model.uri``, ``spec.cloudInit.userDataFile``, a
Workload's ``spec.image``), and the daemon reads them as root to build or
boot. Left unchecked, ``uri: /etc/shadow`` or ``image: /`` hands any file
on the host to whoever can apply a spec. So a path is accepted only if,
with every symlink resolved, it lies under an allowed root: the daemon's
own upload directory (the CLI uploads the files a spec names, see
:mod:`uniframe.control.api.uploads`) and the directories the operator lists
with ``uniframe daemon --allow-path DIR``. Pickled models are refused
outright: the daemon never unpickles (the CLI converts them on the user's
side).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from uniframe.errors import RuntimeDriverError
from uniframe.runtime.qemu.vm.disks import inspect_disk
from uniframe.spec import FileModel, InferenceService, Workload

PICKLE_SUFFIXES = (".pkl", ".pickle", ".joblib")


@dataclass(frozen=True)
class PathProblem:
    path: str
    message: str


@dataclass(frozen=True)
class PathPolicy:
    """The roots under which spec paths may point, each fully resolved."""

    roots: tuple[Path, ...]

    @classmethod
    def of(cls, roots: Iterable[Path]) -> PathPolicy:
        return cls(tuple(Path(os.path.realpath(r)) for r in roots))

    def allows(self, path: Path) -> bool:
        real = Path(os.path.realpath(path))
        return any(real == root or real.is_relative_to(root) for root in self.roots)

    def check(self, spec: InferenceService | Workload) -> list[PathProblem]:
        """Every host path of ``spec`` outside the roots, and any pickled model, by field path."""
        problems = []
        model = spec.spec.model if isinstance(spec, InferenceService) else None
        if isinstance(model, FileModel) and model.format == "sklearn":
            problems.append(PathProblem(
                "spec.model.format", "the daemon never loads pickles (a pickle can run any code "
                "as root); convert it to ONNX on your side (`uniframe apply` does this for you, "
                "or `uniframe convert MODEL.pkl`) and give the .onnx"))
        for field, path in spec.local_paths().items():
            if field == "spec.model.uri" and path.suffix.lower() in PICKLE_SUFFIXES:
                continue  # reported above
            if not self.allows(path):
                problems.append(PathProblem(field, (
                    f"{path} is not under a directory the daemon may read from "
                    f"({', '.join(str(r) for r in self.roots) or 'none'}): let `uniframe apply` "
                    "upload the file, or start the daemon with --allow-path DIR for a directory "
                    "you trust")))
            elif field == "spec.image" and isinstance(spec, Workload) \
                    and spec.spec.image_source == "disk":
                try:  # the disk may name further files (a backing chain) that QEMU would open
                    inspect_disk(path)
                except RuntimeDriverError as exc:
                    problems.append(PathProblem(field, str(exc)))
        return problems
