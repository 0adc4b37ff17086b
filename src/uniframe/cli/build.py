"""``uniframe build`` and the image store commands: ``images``, ``image inspect``, ``image rm``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from uniframe.build.store import Image, ImageStore
from uniframe.cli.app import app, console, err_console, fail
from uniframe.cli.output import (
    OUTPUT_OPTION,
    check_output,
    output_option,
    print_data,
    print_fields,
    print_table,
)
from uniframe.spec.runtimes import RUNTIME_NAMES

IRIS_REQUEST = b'{"inputs":[{"name":"X","shape":[1,4],"datatype":"FP32","data":[5.1,3.5,1.4,0.2]}]}'

image_app = typer.Typer(help="Inspect and remove images in the local store.", no_args_is_help=True)
app.add_typer(image_app, name="image")

COMPRESSIONS = ("none", "gzip", "lz4", "zstd")
ROOTFS = ("squashfs", "initramfs")


def _mb(n: int | float) -> str:
    return f"{n / 1e6:.1f} MB"


@app.command()
def build(
    spec: Path = typer.Argument(..., help="spec file (YAML) with an InferenceService"),
    name: str = typer.Option(None, "--name", help="which service, if the file has several"),
    runtime: str = typer.Option(None, "--runtime",
                                help=f"{', '.join(RUNTIME_NAMES)} (default: the spec's)"),
    conventional: bool = typer.Option(False, "--conventional",
                                      help="with --runtime container: the Debian-based image "
                                           "(debootstrap + python3 + pip) instead of the traced one"),
    rootfs: str = typer.Option(None, "--rootfs",
                               help="unikernel root: squashfs (a read-only disk) or initramfs "
                                    "(unpacked into RAM) (default: the spec's, else squashfs)"),
    compression: str = typer.Option(None, "--compression",
                                    help="unikernel root compression: none, gzip, lz4 or zstd "
                                         "(default: the spec's, else the fastest-booting for the "
                                         "root format that keeps the image within its targets)"),
    verify: bool = typer.Option(True, "--verify/--no-verify",
                                help="start the image and answer one inference before accepting it"),
    output: str = OUTPUT_OPTION,
) -> None:
    """Build an InferenceService into an image for its runtime, then prove it by running it."""
    from uniframe.build.images import build_image
    from uniframe.build.unikernel import build_unikernel
    from uniframe.spec import InferenceService, load_file

    check_output(output)
    if compression is not None and compression not in COMPRESSIONS:
        raise fail(f"--compression {compression!r}: use one of {', '.join(COMPRESSIONS)}")
    if rootfs is not None and rootfs not in ROOTFS:
        raise fail(f"--rootfs {rootfs!r}: use one of {', '.join(ROOTFS)}")
    if runtime is not None and runtime not in RUNTIME_NAMES:
        raise fail(f"--runtime {runtime!r}: use one of {', '.join(RUNTIME_NAMES)}")
    docs = [d for d in load_file(spec) if isinstance(d.spec, InferenceService)]
    if name:
        docs = [d for d in docs if d.spec.metadata.name == name]
    if not docs:
        raise fail(f"{spec}: no InferenceService{f' named {name!r}' if name else ''} to build")
    results: list[dict[str, Any]] = []
    for doc in docs:
        service = doc.spec
        assert isinstance(service, InferenceService)
        target = runtime or service.spec.runtime
        method = compression or (service.spec.image.compression if "compression" in
                                 service.spec.image.model_fields_set else None)
        with console.status(f"building {service.metadata.name} ({target})") as status:
            prefix = f"{service.metadata.name} ({target})"

            def progress(msg: str, prefix: str = prefix) -> None:
                status.update(f"{prefix}: {msg}")

            if target == "unikernel":
                result = build_unikernel(service, source_digest=doc.digest(),
                                         compression=method,  # type: ignore[arg-type]
                                         rootfs_format=rootfs,  # type: ignore[arg-type]
                                         progress=progress)
                image = result.image
                timings = result.timings
            else:
                image = build_image(service, source_digest=doc.digest(),
                                    runtime=target,
                                    conventional=conventional, progress=progress)
                timings = {}
        summary = _summary(image)
        summary["timings"] = {k: round(v, 2) for k, v in timings.items()}
        if verify:
            summary["verify"] = _verify(image, output == "table")
        results.append(summary)
        if output == "table":
            _print_summary(image, summary)
    if output != "table":
        print_data(results if len(results) > 1 else results[0], output)


def _verify(image: Image, show: bool) -> dict[str, Any]:
    from uniframe.build.images import image_model_inputs
    from uniframe.build.unikernel import sample_request
    from uniframe.runtime.verify import boot_and_infer

    inputs = image_model_inputs(image)
    body = sample_request(inputs) if inputs else IRIS_REQUEST
    if show:
        with console.status(f"proving the image: starting it ({image.kind}) and sending one inference"):
            proof = boot_and_infer(image, body, timeout=300 if image.kind == "vm" else 120)
    else:
        proof = boot_and_infer(image, body, timeout=300 if image.kind == "vm" else 120)
    return {"seconds_to_first_inference": round(proof.seconds_to_first_inference, 2),
            "accel": proof.accel, "stopped": proof.stop_state, "exit_status": proof.exit_status}


def _summary(image: Image) -> dict[str, Any]:
    m = image.manifest
    files = m.get("files", {})
    rootfs = m.get("rootfs", {})
    # a unikernel's root; images built before disk roots record only "initrd"
    root = m.get("root") or ({"format": "initramfs", **m["initrd"]} if "initrd" in m else {})
    return {
        "image": image.digest, "names": list(image.names), "kind": image.kind,
        "bytes": image.size_bytes(),
        "kernel_bytes": files.get("kernel", {}).get("size"),
        "initrd_bytes": files.get("initrd", {}).get("size"),
        "initrd_uncompressed_bytes": m.get("initrd", {}).get("uncompressed_bytes"),
        "rootfs": root.get("format"),
        "root_bytes": files.get("root", files.get("initrd", {})).get("size"),
        "root_uncompressed_bytes": root.get("uncompressed_bytes"),
        "compression": root.get("compression"),
        "compression_level": root.get("level"),
        "block_size": root.get("block_size"),
        "files": m.get("file_count", rootfs.get("files")),
        "executables": m.get("executables", []),
        "executables_count": len(m["executables"]) if "executables" in m
        else m.get("executables_count", rootfs.get("executables")),
        "setuid": m.get("setuid", rootfs.get("setuid")),
        "packages": m.get("packages", []),
    }


def _print_summary(image: Image, s: dict[str, Any]) -> None:
    console.print(f"[bold green]built[/] {image.kind} image {', '.join(image.names)}  {image.digest}")
    if image.kind == "unikernel":
        how = str(s["compression"])
        if s["compression_level"]:
            how += f" -{s['compression_level']}"
        if s["block_size"]:
            how += f", {s['block_size'] >> 10} KiB blocks"
        part = "root disk" if s["rootfs"] == "squashfs" else "initrd"
        console.print(f"  kernel {_mb(s['kernel_bytes'])}, {part} {_mb(s['root_bytes'])} "
                      f"({s['rootfs']}, {how}; {_mb(s['root_uncompressed_bytes'])} unpacked), "
                      f"{s['files']} files, {len(s['executables'])} executable(s): "
                      f"{', '.join(s['executables'])}")
    else:
        console.print(f"  {_mb(s['bytes'])} on disk, {s['files']} files, {s['executables_count']} "
                      f"executables, {s['setuid']} setuid/setgid files")
    if s["packages"]:
        table = Table("package", "files", "bytes", title="what the image is made of",
                      title_justify="left")
        for row in s["packages"]:
            table.add_row(row["package"], str(row["files"]), _mb(row["bytes"]))
        console.print(table)
    if s["timings"]:
        console.print("  timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in s["timings"].items()))
    if "verify" in s:
        v = s["verify"]
        console.print(f"[bold green]proved[/]: started ({image.kind}, {v['accel']}) and answered an "
                      f"inference {v['seconds_to_first_inference']:.2f} s after launch; stopped "
                      f"cleanly ({v['stopped']}, exit status {v['exit_status']})")


@app.command("images")
def images(output: str = OUTPUT_OPTION) -> None:
    """List the images in the local store."""
    check_output(output)
    found = ImageStore().list()
    if output != "table":
        print_data([{"digest": i.digest, "names": list(i.names), "kind": i.kind,
                     "bytes": i.size_bytes(), **i.build_info} for i in found], output)
        return
    if not found:
        console.print("no images; build one with `uniframe build SPEC`", markup=False,
                      soft_wrap=True)
        return
    print_table(("IMAGE", "NAMES", "KIND", "SIZE", "BUILT"),
                [(i.short, ", ".join(i.names) or "-", i.kind, _mb(i.size_bytes()),
                  i.build_info.get("built_at", "-")) for i in found])


@image_app.command("inspect")
def image_inspect(
    ref: str = typer.Argument(..., help="name[:tag], digest prefix or directory"),
    output: str = output_option("json"),
) -> None:
    """Print an image's manifest and build facts (JSON unless -o)."""
    check_output(output)
    image = ImageStore().resolve(ref)
    if output != "table":
        print_data({"digest": image.digest, "dir": str(image.dir), "names": list(image.names),
                    "manifest": image.manifest, "build": image.build_info}, output)
        return
    m = image.manifest
    print_fields([
        ("Image", image.digest),
        ("Names", ", ".join(image.names) or "-"),
        ("Kind", image.kind),
        ("Size", _mb(image.size_bytes())),
        ("Files", ", ".join(f"{role} {_mb(int(f.get('size', 0)))}"
                            for role, f in m.get("files", {}).items()) or "-"),
        ("Model", _model_line(m.get("model"))),
        ("Built", image.build_info.get("built_at", "-")),
        ("Directory", image.dir),
    ])


def _model_line(model: object) -> str:
    if not isinstance(model, dict):
        return "-"
    return f"{model.get('name')} version {model.get('version')} (sha256 " \
           f"{str(model.get('sha256', ''))[:12]})"


@image_app.command("rm")
def image_rm(refs: list[str] = typer.Argument(..., help="images to remove")) -> None:
    """Remove images (and their names) from the local store."""
    store = ImageStore()
    for ref in refs:
        image = store.remove(ref)
        err_console.print(f"removed {image.short} ({', '.join(image.names) or 'no name'})")
