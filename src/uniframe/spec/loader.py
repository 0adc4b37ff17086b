"""Reading spec files: YAML documents in, validated :class:`Document` objects or plain-worded problems out.

A file may hold several documents separated by ``---``; each is validated on
its own and every problem of every document is reported at once, so a user
fixes a file in one pass instead of one error per run. Problems name the file,
the 1-based document and the YAML field path. Relative paths inside a spec are
relative to the spec file, like ``COPY`` in a Dockerfile is relative to its
context, so a spec means the same thing from any working directory.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from uniframe.errors import SpecError
from uniframe.spec.common import API_VERSION
from uniframe.spec.kinds import KINDS, Spec
from uniframe.spec.messages import did_you_mean, explain, shown


@dataclass(frozen=True)
class Document:
    """One validated spec document and where it came from."""

    spec: Spec
    source: str
    index: int
    base_dir: Path

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def name(self) -> str:
        return self.spec.metadata.name

    @property
    def where(self) -> str:
        return f"{self.source}, document {self.index}"

    def digest(self) -> str:
        return self.spec.digest()

    def __str__(self) -> str:
        return f"{self.kind}/{self.name}"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a spec file, phrased for the person who wrote it."""

    source: str
    message: str
    index: int | None = None
    path: str = ""
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        where = self.source
        if self.index is not None:
            where += f", document {self.index}"
        if self.line is not None:
            where += f", line {self.line}, column {self.column}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


@dataclass
class Report:
    """Everything learnt from one spec text: its valid documents and its problems."""

    documents: list[Document] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_for_problems(self) -> None:
        if self.problems:
            raise SpecError("\n".join(str(p) for p in self.problems))


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error.

    Plain PyYAML keeps the last value, so ``replicas: 1`` then ``replicas: 3``
    silently means 3; in a spec that is almost always a mistake.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} appears twice in this mapping; keep one",
                        key_node.start_mark,
                    )
                seen.add(key)
        return super().construct_mapping(node, deep)


_YAML_HINTS = {
    "expected <block end>": "check the indentation of this line against the lines above",
    "mapping values are not allowed here": "quote a value that contains ': ', or check the indentation",
}


def _yaml_problem(exc: yaml.YAMLError, source: str, index: int) -> Problem:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        text = exc.problem or "invalid YAML"
        if exc.context:
            text += f" ({exc.context})"
        text += "".join(f"; {hint}" for start, hint in _YAML_HINTS.items() if text.startswith(start))
        return Problem(source, f"invalid YAML: {text}", index, line=mark.line + 1, column=mark.column + 1)
    return Problem(source, f"invalid YAML: {exc}", index)


def _validate_data(data: Any, source: str, index: int, base_dir: Path) -> Document | list[Problem]:
    """Validate one parsed document; problems come back rather than raise, so all are collected."""
    if not isinstance(data, dict):
        return [Problem(source, f"expected a mapping with apiVersion, kind, metadata and spec, "
                                f"got {shown(data)}", index)]
    kinds = ", ".join(KINDS)
    kind = data.get("kind")
    if not isinstance(kind, str) or kind not in KINDS:
        if kind is None:
            message = f"required field is missing; use one of: {kinds}"
        else:
            guess = did_you_mean(kind, list(KINDS)) if isinstance(kind, str) else None
            message = f"{kind!r} is not a known kind; use one of: {kinds}"
            message += f" (did you mean {guess!r}?)" if guess else ""
        problems = [Problem(source, message, index, "kind")]
        if data.get("apiVersion") != API_VERSION:
            problems.append(Problem(source, f"{data.get('apiVersion')!r} is not supported, "
                                            f"use {API_VERSION}", index, "apiVersion"))
        return problems
    model = KINDS[kind]
    try:
        spec = model.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        return [Problem(source, message, index, path)
                for path, message in (explain(model, err) for err in exc.errors())]
    return Document(spec, source, index, base_dir)


def check_text(text: str, source: str, base_dir: Path | None = None) -> Report:
    """Validate every document of a YAML text; relative paths resolve against ``base_dir`` (default: cwd)."""
    base = (base_dir or Path.cwd()).resolve()
    report = Report()
    loader = _StrictLoader(text)
    index = 0
    try:
        while True:
            index += 1
            try:
                if not loader.check_node():
                    break
                data = loader.construct_document(loader.get_node())
            except yaml.YAMLError as exc:
                report.problems.append(_yaml_problem(exc, source, index))
                return report  # the parser cannot find the next document after a syntax error
            if data is None:
                continue  # an empty document, e.g. after a trailing ---
            result = _validate_data(data, source, index, base)
            if isinstance(result, Document):
                report.documents.append(result)
            else:
                report.problems.extend(result)
    finally:
        loader.dispose()
    if not report.documents and not report.problems:
        report.problems.append(Problem(source, "no documents; a spec needs apiVersion, kind, metadata and spec"))
    return report


def check_file(path: Path | str) -> Report:
    """Validate a spec file; a file that cannot be read is a problem too, not an exception."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Report(problems=[Problem(source, "no such file")])
    except IsADirectoryError:
        return Report(problems=[Problem(source, "is a directory; give the spec files in it")])
    except UnicodeDecodeError:
        return Report(problems=[Problem(source, "is not UTF-8 text; is it really a YAML spec?")])
    except OSError as exc:
        return Report(problems=[Problem(source, f"cannot read: {exc.strerror}")])
    return check_text(text, source, path.parent)


def load_text(text: str, source_name: str, base_dir: Path | None = None) -> list[Document]:
    """The documents of a YAML text; raise :class:`SpecError` listing every problem."""
    report = check_text(text, source_name, base_dir)
    report.raise_for_problems()
    return report.documents


def load_file(path: Path | str) -> list[Document]:
    """The documents of a spec file; raise :class:`SpecError` listing every problem."""
    report = check_file(path)
    report.raise_for_problems()
    return report.documents


def load_data(data: Any, source_name: str = "<input>", base_dir: Path | None = None) -> Document:
    """One document already parsed (e.g. from a JSON request body); raise :class:`SpecError`."""
    result = _validate_data(data, source_name, 1, (base_dir or Path.cwd()).resolve())
    if isinstance(result, Document):
        return result
    raise SpecError("\n".join(str(p) for p in result))
