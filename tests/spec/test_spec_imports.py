"""uniframe.spec is the innermost layer: pydantic, yaml, the standard library and uniframe.errors only."""

import ast
import sys
from pathlib import Path

import uniframe.spec

ALLOWED = {"pydantic", "yaml", "uniframe.errors", "uniframe.spec"}


def imported_modules(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def test_spec_imports_only_its_allowed_dependencies() -> None:
    package = Path(uniframe.spec.__file__).parent
    sources = sorted(package.glob("*.py"))
    assert len(sources) > 3
    offending: dict[str, list[str]] = {}
    for source in sources:
        for module in imported_modules(source):
            top = module.split(".")[0]
            if top in sys.stdlib_module_names or top == "__future__":
                continue
            if not any(module == allowed or module.startswith(allowed + ".") for allowed in ALLOWED):
                offending.setdefault(source.name, []).append(module)
    assert offending == {}
