"""The ``/init`` script and what the init imports: the image builder's side of the contract."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from guest_support import SRC

from uniframe.guest.initscript import PYTHON_FLAGS, render_init_script


def stdlib_path() -> list[str]:
    return [p for p in sys.path if p.startswith(sys.base_prefix) and "site-packages" not in p]


def test_rendered_script_shape() -> None:
    text = render_init_script("/usr/bin/python3.11", ["/usr/lib/python311.zip", "", "/app/src"])
    assert text.splitlines() == [
        "#!/usr/bin/python3.11 -IBS",
        "# uniframe PID 1, written by the image builder (uniframe.guest.initscript).",
        "import sys",
        "sys.path[:] = [",
        "    '/usr/lib/python311.zip',",
        "    '/app/src',",
        "]",
        "from uniframe.guest.init import main",
        "main()",
    ]


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="absolute path"):
        render_init_script("python3", [])
    with pytest.raises(ValueError, match="absolute paths"):
        render_init_script("/usr/bin/python3", ["relative"])
    with pytest.raises(ValueError, match="kernel reads only 255"):
        render_init_script("/" + "p" * 260, [])


def test_flags_work_as_one_shebang_word(tmp_path: Path) -> None:
    """The kernel passes "-IBS" as a single argument; Python must take it as three flags."""
    script = tmp_path / "init"
    script.write_text(f"#!{sys.executable} {PYTHON_FLAGS}\nimport sys, json\n"
                      "print(json.dumps([sys.flags.isolated, sys.flags.no_site, "
                      "sys.dont_write_bytecode, sys.path[0]]))\n")
    script.chmod(0o755)
    out = subprocess.run([str(script)], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": "/nonexistent", "PYTHONSAFEPATH": "0"}).stdout
    isolated, no_site, no_bytecode, first = json.loads(out)
    assert (isolated, no_site, no_bytecode) == (1, 1, True)
    assert first != str(tmp_path) and first != "/nonexistent"  # neither / nor PYTHONPATH


def test_init_imports_only_the_standard_library_and_the_pid1_modules(tmp_path: Path) -> None:
    """What the builder's trace of ``import uniframe.guest.init`` sees, with no site-packages."""
    script = tmp_path / "init"
    script.write_text(render_init_script(sys.executable, [*stdlib_path(), str(SRC)]).replace(
        "from uniframe.guest.init import main\nmain()\n",
        "import json\nimport uniframe.guest.init\n"
        "print(json.dumps({n: getattr(m, '__file__', None) for n, m in sorted(sys.modules.items())}))\n"))
    script.chmod(0o755)
    proc = subprocess.run([str(script)], capture_output=True, text=True, env={})
    assert proc.returncode == 0, proc.stderr
    modules: dict[str, str | None] = json.loads(proc.stdout)
    ours = {n for n in modules if n.split(".")[0] == "uniframe"}
    assert ours == {"uniframe", "uniframe.guest", *(f"uniframe.guest.{m}" for m in (
        "clone", "cmdline", "entropy", "init", "libc", "mounts", "net", "reaper", "report", "stop"))}
    others = {n.split(".")[0] for n in modules} - {"uniframe", "__main__"}
    assert others <= set(sys.stdlib_module_names) | set(sys.builtin_module_names), \
        others - set(sys.stdlib_module_names)
    # The PID-1-only needs are imported up front, so a trace as a plain process sees them.
    for name in ("ctypes", "_ctypes", "fcntl", "runpy", "_socket", "signal", "threading"):
        assert name in modules, name
    assert modules["uniframe"] is not None and modules["uniframe"].startswith(str(SRC))
