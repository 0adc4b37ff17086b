"""The client's half of host-path safety: upload the files a spec names, send the spec naming them.

The daemon (root) reads only paths under roots it allows
(:mod:`uniframe.control.hostpaths`), and its own upload directory is one of
them. So before applying, the client validates the spec the way the daemon
will, uploads every regular file it names (the model, cloud-init user data, a
VM disk or OCI archive; identical bytes are never sent twice) and sends the
spec again with those fields pointing at the uploads. A scikit-learn pickle is
converted to ONNX here, in the user's own process and with the user's own
trust, and the ONNX file is what travels. Directories (an OCI layout) cannot be
uploaded: they go as absolute paths and must lie under a directory the
operator allowed (``uniframe daemon --allow-path``).

A spec with problems goes as written, so the daemon reports them with the
user's own line numbers.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from uniframe.spec import FileModel, InferenceService
from uniframe.spec.loader import check_text

if TYPE_CHECKING:
    from uniframe.control.api.client import DaemonClient


def _set(data: dict[str, Any], dotted: str, value: str) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for key in parents:
        node = node[key]
    node[leaf] = value


def _convert_pickle(client: DaemonClient, model: FileModel) -> str:
    from uniframe.build.sklearn_onnx import convert_pickle

    data = convert_pickle(Path(model.uri))
    with tempfile.TemporaryDirectory(prefix="uniframe-convert-") as tmp:
        onnx = Path(tmp) / f"{Path(model.uri).stem}.onnx"
        onnx.write_bytes(data)
        return client.upload(onnx)


def upload_spec_files(client: DaemonClient, text: str, source: str, base: Path | None) -> str:
    """``text`` with every file it names uploaded and named by its upload path."""
    report = check_text(text, source, base)
    if report.problems:
        return text
    documents = []
    for doc in report.documents:
        spec = doc.spec
        data = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
        paths = spec.local_paths()
        model = spec.spec.model if isinstance(spec, InferenceService) else None
        if isinstance(model, FileModel) and model.format == "sklearn":
            data["spec"]["model"] = {"uri": _convert_pickle(client, model), "format": "onnx"}
            paths.pop("spec.model.uri", None)
        for field, path in paths.items():
            if path.is_file():
                _set(data, field, client.upload(path))
            else:
                _set(data, field, str(path.resolve()))
        documents.append(data)
    return yaml.safe_dump_all(documents, sort_keys=False)
