"""The kernel build itself: unpack the Debian source, configure, verify, compile.

Everything happens inside one scratch directory the caller owns (and removes),
so a build that fails or is killed leaves nothing behind that could be taken
for a finished kernel. The steps follow the Lupine recipe: ``make tinyconfig``
turns everything off, the fragment adds back what a microVM application needs,
``olddefconfig`` resolves the rest, and :func:`verify_options` catches what
Kconfig dropped on the way.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from uniframe.build.kernel.bootformat import has_pvh_note
from uniframe.build.kernel.kconfig import count_enabled, parse_options, verify_options
from uniframe.errors import BuildError

# progress(step, line): step names the phase ("extract", "configure", "verify",
# "compile", "install", "wait", "cached"); line is a human-readable detail, for
# "compile" one line of make's output ("  CC      mm/memory.o").
Progress = Callable[[str, str], None]

ARCH = "x86_64"

# Which Debian package provides each tool the build runs.
_TOOLS = {
    "make": "make",
    "gcc": "gcc",
    "ld": "binutils",
    "objcopy": "binutils",
    "flex": "flex",
    "bison": "bison",
    "bc": "bc",
    "perl": "perl",
    "tar": "tar",
    "xz": "xz-utils",
}


@dataclass(frozen=True)
class BuildOutput:
    """Files a finished build leaves in its output directory, and what they hold."""

    vmlinux: Path
    bzimage: Path
    config: Path
    options_enabled: int


def check_tools() -> None:
    """Fail before unpacking 1.3 GB if a tool the build needs is missing."""
    missing = sorted({tool for tool in _TOOLS if shutil.which(tool) is None})
    if missing:
        packages = " ".join(sorted({_TOOLS[t] for t in missing}))
        raise BuildError(
            f"building the kernel needs {', '.join(missing)}, not found on PATH: "
            f"run `apt-get install {packages}` (scripts/install.sh installs everything)")


def build(source: Path, fragment_text: str, where: str, work: Path, out: Path, *,
          jobs: int, progress: Progress, log: Path) -> BuildOutput:
    """Build the kernel from the ``source`` tarball in ``work``, leaving results in ``out``.

    ``where`` names the fragment in error messages.
    """
    check_tools()
    tree = work / "linux"
    tree.mkdir()
    progress("extract", f"unpacking {source}")
    _run(["tar", "-I", f"xz -T{jobs}", "-xf", str(source), "-C", str(tree),
          "--strip-components=1"], cwd=work, log=log, step="unpacking the kernel source")

    progress("configure", "make tinyconfig")
    _make(tree, ["tinyconfig"], log=log)
    fragment = work / "uniframe.config"
    fragment.write_text(fragment_text)
    progress("configure", "merging the fragment")
    _run(["sh", "scripts/kconfig/merge_config.sh", "-m", ".config", str(fragment)],
         cwd=tree, log=log, step="merge_config.sh")
    progress("configure", "make olddefconfig")
    _make(tree, ["olddefconfig"], log=log)

    progress("verify", "checking every option of the fragment is in .config")
    config_text = (tree / ".config").read_text()
    verify_options(fragment_text, config_text, where=where)
    _check_libelf(config_text)

    progress("compile", f"make -j{jobs} bzImage")
    _make(tree, [f"-j{jobs}", "bzImage"], log=log, progress=progress)

    progress("install", "stripping vmlinux")
    out.mkdir()
    result = BuildOutput(vmlinux=out / "vmlinux", bzimage=out / "bzImage", config=out / "config",
                         options_enabled=count_enabled(parse_options(config_text)))
    # -S drops the symbol table (the kernel does the same before compressing it); the
    # PT_NOTE segment with the PVH entry stays, and QEMU loads the file faster.
    _run(["objcopy", "-R", ".comment", "-S", str(tree / "vmlinux"), str(result.vmlinux)],
         cwd=tree, log=log, step="objcopy vmlinux")
    if not has_pvh_note(result.vmlinux):
        raise BuildError("the built vmlinux has no PVH entry note although CONFIG_PVH=y was "
                         f"verified; see {log}")
    shutil.copyfile(tree / "arch/x86/boot/bzImage", result.bzimage)
    shutil.copyfile(tree / ".config", result.config)
    return result


def _check_libelf(config_text: str) -> None:
    if parse_options(config_text).get("CONFIG_OBJTOOL") != "y":
        return
    if not any(Path(d, "gelf.h").exists() for d in ("/usr/include", "/usr/local/include")):
        raise BuildError("this kernel config builds objtool, which needs libelf headers "
                         "(gelf.h not found): run `apt-get install libelf-dev`")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # No host name, user or build time inside the kernel: it depends on its inputs only.
    env.update(LC_ALL="C", ARCH=ARCH, KBUILD_BUILD_USER="uniframe",
               KBUILD_BUILD_HOST="uniframe", KBUILD_BUILD_TIMESTAMP="1970-01-01")
    env.pop("KCONFIG_CONFIG", None)
    return env


def _make(tree: Path, targets: list[str], *, log: Path, progress: Progress | None = None) -> None:
    _run(["make", f"ARCH={ARCH}", *targets], cwd=tree, log=log,
         step="make " + " ".join(targets), progress=progress)


def _run(argv: list[str], *, cwd: Path, log: Path, step: str,
         progress: Progress | None = None) -> None:
    """Run one build command, appending its output to ``log``; raise with its last lines."""
    tail: deque[str] = deque(maxlen=25)
    with log.open("a") as sink:
        sink.write(f"$ {' '.join(argv)}\n")
        sink.flush()
        # Own session: on an early exit the whole make -j tree is stopped, not just make.
        proc = subprocess.Popen(argv, cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace",
                                start_new_session=True)
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                sink.write(line)
                tail.append(line.rstrip())
                if progress is not None:
                    progress("compile", line.rstrip())
        except BaseException:
            _stop(proc)
            raise
        code = proc.wait()
    if code != 0:
        last = "\n".join(f"  {line}" for line in tail)
        raise BuildError(f"kernel build step '{step}' failed (exit {code}); last output:\n"
                         f"{last}\nfull log: {log}")


def _stop(proc: subprocess.Popen[str]) -> None:
    """On an exception or Ctrl-C, stop the command's process group instead of orphaning it."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
