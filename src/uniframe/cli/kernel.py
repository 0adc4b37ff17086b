"""``uniframe kernel``: build the tailored microVM kernel and show what is cached."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.table import Table

from uniframe.build.kernel import Kernel, cached_kernel, ensure_kernel, user_kernel
from uniframe.cli.app import app, console, err_console, fail
from uniframe.cli.output import OUTPUT_OPTION, check_output, print_data

kernel_app = typer.Typer(help="The tailored microVM kernel (Lupine-style, from linux-source-6.1).",
                         no_args_is_help=True)
app.add_typer(kernel_app, name="kernel")

_STEPS = {
    "extract": "unpacking the kernel source",
    "configure": "configuring (tinyconfig + fragment + olddefconfig)",
    "verify": "verifying every fragment option is set",
    "compile": "compiling",
    "install": "installing into the cache",
    "wait": "waiting for another build of this kernel",
    "cached": "already built: using the cached kernel (--force rebuilds it)",
}


@kernel_app.command("build")
def build(
    fragment: Path | None = typer.Option(None, "--fragment", "-f",
                                         help="Kconfig fragment (default: the microVM one)"),
    jobs: int | None = typer.Option(None, "--jobs", "-j", min=1, help="make -j (default: CPUs)"),
    force: bool = typer.Option(False, "--force", help="rebuild even if the kernel is cached"),
    output: str = OUTPUT_OPTION,
) -> None:
    """Build the kernel (minutes, once) or report the cached one."""
    check_output(output)
    started = time.monotonic()
    state = {"step": ""}
    # progress goes to stderr when stdout is a document for a parser
    out = console if output == "table" else err_console
    with out.status("preparing the kernel build") as status:
        def progress(step: str, line: str) -> None:
            if step != state["step"]:
                state["step"] = step
                if step in _STEPS:
                    out.print(f"[{time.monotonic() - started:6.1f}s] {_STEPS[step]}")
            if step == "compile" and line.startswith(" "):
                status.update(f"compiling: {line.strip()}")
            elif step != "compile":
                status.update(line)

        kernel = ensure_kernel(fragment=fragment, jobs=jobs, progress=progress, force=force)
    _show(kernel, output)


@kernel_app.command("info")
def info(
    fragment: Path | None = typer.Option(None, "--fragment", "-f",
                                         help="Kconfig fragment (default: the microVM one)"),
    kernel_file: Path | None = typer.Option(None, "--kernel",
                                            help="describe your own bzImage or PVH vmlinux"),
    output: str = OUTPUT_OPTION,
) -> None:
    """Show the cached kernel: size, enabled options, build time, key, path, config hash."""
    check_output(output)
    if kernel_file is not None:
        kernel = user_kernel(kernel_file)
    else:
        found = cached_kernel(fragment=fragment)
        if found is None:
            raise fail("no kernel is built for this fragment yet: run `uniframe kernel build`"
                       + (f" --fragment {fragment}" if fragment else ""))
        kernel = found
    _show(kernel, output)


def _show(kernel: Kernel, output: str) -> None:
    view = kernel.describe()
    if output != "table":
        print_data(view, output)
        return
    table = Table(title=f"kernel {kernel.key}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    rows = [
        ("key", kernel.key),
        ("path", f"{kernel.path} ({kernel.boot} boot)"),
        ("size", _mib(kernel.size_bytes)),
        ("vmlinux", _file_row(kernel.vmlinux, view["vmlinux_bytes"])),
        ("bzImage", _file_row(kernel.bzimage, view["bzimage_bytes"])),
        ("options enabled", _or_unknown(kernel.options_enabled)),
        ("build time", "unknown" if kernel.build_seconds is None
         else f"{kernel.build_seconds:.1f} s"),
        ("source", kernel.source_version),
        ("config", _or_unknown(kernel.config_path)),
        ("config sha256", _or_unknown(kernel.config_hash)),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)


def _file_row(path: Path | None, size: int | None) -> str:
    return "-" if path is None or size is None else f"{path}, {_mib(size)}"


def _mib(size: int) -> str:
    return f"{size / 1048576:.2f} MiB, {size:,} bytes"


def _or_unknown(value: object) -> str:
    return "unknown" if value is None else str(value)
