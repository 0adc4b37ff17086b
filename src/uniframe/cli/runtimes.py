"""``uniframe runtimes``: the registered drivers, whether this host can run each, what each can do.

Everything shown comes from :mod:`uniframe.runtime.registry`; the host
checks boot nothing (QEMU's accelerator is the cached probe verdict, when
there is one), so the command is quick enough for scripts and bug reports.
"""

from __future__ import annotations

from typing import Any

from uniframe.cli.app import app
from uniframe.cli.output import OUTPUT_OPTION, check_output, print_data, print_table
from uniframe.runtime.registry import REGISTRY, DriverEntry


def describe(entry: DriverEntry) -> dict[str, Any]:
    """One driver as ``-o json`` shows it."""
    ok, reason = entry.usable()
    return {
        "driver": entry.kind,
        "runtimes": list(entry.runtimes),
        "preferred_for": [r for r in entry.runtimes if REGISTRY.entry_for_runtime(r) is entry],
        "image_kinds": list(entry.image_kinds),
        "usable": ok,
        "reason": reason,
        "capabilities": sorted(c.value for c in entry.capabilities),
        "summary": entry.summary,
    }


@app.command()
def runtimes(output: str = OUTPUT_OPTION) -> None:
    """List the runtime drivers, whether each is usable on this host (and why), and what each can do."""
    check_output(output)
    rows = [describe(e) for e in REGISTRY.entries()]
    if output != "table":
        print_data(rows, output)
        return
    print_table(("DRIVER", "RUNTIMES", "IMAGES", "USABLE", "CAPABILITIES", "WHY"),
                [(r["driver"], ",".join(r["runtimes"]), ",".join(r["image_kinds"]),
                  "yes" if r["usable"] else "no", ",".join(r["capabilities"]), r["reason"])
                 for r in rows], wrap=("CAPABILITIES", "WHY"))
