"""``uniframe build`` and the image store commands: ``images``, ``image inspect``, ``image rm``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from uniframe.build.store import Image, ImageStore
from uniframe.cli.app import app, console, err_console, fail

image_app = typer.Typer(help="Inspect and remove images in the local store.", no_args_is_help=True)
app.add_typer(image_app, name="image")

COMPRESSIONS = ("none", "gzip", "lz4", "zstd")


def _mb(n: int | float) -> str:
    return f"{n / 1e6:.1f} MB"


@app.command()
def build(
    spec: Path = typer.Argument(..., help="spec file (YAML) with an InferenceService"),
    name: str = typer.Option(None, "--name", help="which service, if the file has several"),
    compression: str = typer.Option(None, "--compression",
                                    help="initramfs compression: none, gzip, lz4 or zstd "
                                         "(default: the spec's, else the fastest-booting)"),
    verify: bool = typer.Option(True, "--verify/--no-verify",
                                help="boot the image and answer one inference before accepting it"),
    output: str = typer.Option("table", "-o", "--output", help="table or json"),
) -> None:
    """Build an InferenceService into a unikernel image, then prove it by booting it."""
    from uniframe.build.unikernel import build_unikernel
    from uniframe.spec import InferenceService, load_file

    if compression is not None and compression not in COMPRESSIONS:
        raise fail(f"--compression {compression!r}: use one of {', '.join(COMPRESSIONS)}")
    docs = [d for d in load_file(spec) if isinstance(d.spec, InferenceService)]
    if name:
        docs = [d for d in docs if d.spec.metadata.name == name]
    if not docs:
        raise fail(f"{spec}: no InferenceService{f' named {name!r}' if name else ''} to build")
    results: list[dict[str, Any]] = []
    for doc in docs:
        service = doc.spec
        assert isinstance(service, InferenceService)
        if service.spec.runtime != "unikernel":
            raise fail(f"{doc.where}: spec.runtime is {service.spec.runtime!r}; "
                       "this uniframe builds unikernel images (runtime: unikernel)")
        method = compression or (service.spec.image.compression if "compression" in
                                 service.spec.image.model_fields_set else None)
        with console.status(f"building {service.metadata.name}") as status:
            prefix = service.metadata.name

            def progress(msg: str, prefix: str = prefix) -> None:
                status.update(f"{prefix}: {msg}")

            result = build_unikernel(
                service, source_digest=doc.digest(), compression=method,  # type: ignore[arg-type]
                progress=progress)
        summary = _summary(result.image)
        summary["timings"] = {k: round(v, 2) for k, v in result.timings.items()}
        if verify:
            summary["verify"] = _verify(result.image, output == "table")
        results.append(summary)
        if output == "table":
            _print_summary(result.image, summary)
    if output == "json":
        console.print_json(data=results if len(results) > 1 else results[0])


def _verify(image: Image, show: bool) -> dict[str, Any]:
    from uniframe.build.unikernel import sample_request
    from uniframe.runtime.verify import boot_and_infer

    body = sample_request(image.manifest["model"]["inputs"])
    if show:
        with console.status("proving the image: booting it and sending one inference"):
            proof = boot_and_infer(image, body)
    else:
        proof = boot_and_infer(image, body)
    return {"seconds_to_first_inference": round(proof.seconds_to_first_inference, 2),
            "accel": proof.accel, "stopped": proof.stop_state, "exit_status": proof.exit_status}


def _summary(image: Image) -> dict[str, Any]:
    m = image.manifest
    return {
        "image": image.digest, "names": list(image.names), "kind": image.kind,
        "kernel_bytes": m["files"]["kernel"]["size"], "initrd_bytes": m["files"]["initrd"]["size"],
        "initrd_uncompressed_bytes": m["initrd"]["uncompressed_bytes"],
        "compression": m["initrd"]["compression"], "files": m["file_count"],
        "executables": m["executables"], "packages": m["packages"],
    }


def _print_summary(image: Image, s: dict[str, Any]) -> None:
    console.print(f"[bold green]built[/] {', '.join(image.names)}  {image.digest}")
    console.print(f"  kernel {_mb(s['kernel_bytes'])}, initrd {_mb(s['initrd_bytes'])} "
                  f"({s['compression']}; {_mb(s['initrd_uncompressed_bytes'])} unpacked), "
                  f"{s['files']} files, {len(s['executables'])} executable(s): "
                  f"{', '.join(s['executables'])}")
    table = Table("package", "files", "bytes", title="what the image is made of", title_justify="left")
    for row in s["packages"]:
        table.add_row(row["package"], str(row["files"]), _mb(row["bytes"]))
    console.print(table)
    console.print("  timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in s["timings"].items()))
    if "verify" in s:
        v = s["verify"]
        console.print(f"[bold green]proved[/]: booted ({v['accel']}) and answered an inference "
                      f"{v['seconds_to_first_inference']:.2f} s after QEMU started; stopped cleanly "
                      f"({v['stopped']}, exit status {v['exit_status']})")


@app.command("images")
def images(output: str = typer.Option("table", "-o", "--output", help="table or json")) -> None:
    """List the images in the local store."""
    found = ImageStore().list()
    if output == "json":
        console.print_json(data=[{"digest": i.digest, "names": list(i.names), "kind": i.kind,
                                  "bytes": i.size_bytes(), **i.build_info} for i in found])
        return
    table = Table("image", "names", "kind", "size", "built")
    for i in found:
        table.add_row(i.short, ", ".join(i.names) or "-", i.kind, _mb(i.size_bytes()),
                      str(i.build_info.get("built_at", "-")))
    console.print(table)


@image_app.command("inspect")
def image_inspect(ref: str = typer.Argument(..., help="name[:tag], digest prefix or directory")) -> None:
    """Print an image's manifest and build facts as JSON."""
    image = ImageStore().resolve(ref)
    console.print_json(json.dumps({"dir": str(image.dir), "names": list(image.names),
                                   "manifest": image.manifest, "build": image.build_info}))


@image_app.command("rm")
def image_rm(refs: list[str] = typer.Argument(..., help="images to remove")) -> None:
    """Remove images (and their names) from the local store."""
    store = ImageStore()
    for ref in refs:
        image = store.remove(ref)
        err_console.print(f"removed {image.short} ({', '.join(image.names) or 'no name'})")
