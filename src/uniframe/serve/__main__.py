"""``python -m uniframe.serve``: the model server's own entry point.

This is what runs as PID 1's app in a unikernel and as the process in a
container, so it parses its arguments with argparse and imports nothing that
the server does not need.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from uniframe.serve.errors import ModelLoadError
from uniframe.serve.http import Server
from uniframe.serve.model import OnnxModel


def _size(text: str) -> int:
    units = {"": 1, "k": 1 << 10, "ki": 1 << 10, "m": 1 << 20, "mi": 1 << 20, "g": 1 << 30, "gi": 1 << 30}
    t = text.strip().lower().removesuffix("b")
    num = t.rstrip("kmgi")
    try:
        return int(float(num) * units[t[len(num):]])
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (use e.g. 64Mi)") from None


def parse_model_arg(text: str, default_name: str | None, default_version: str) -> tuple[str, str, Path]:
    """``[NAME[@VERSION]=]PATH`` -> (name, version, path)."""
    name: str | None = default_name
    version = default_version
    spec, sep, path = text.rpartition("=")
    if sep:
        name, _, v = spec.partition("@")
        version = v or default_version
    else:
        path = text
    p = Path(path)
    return (name or p.stem), version, p


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="uniframe-serve",
        description="Serve ONNX models over the Open Inference Protocol v2 (HTTP/1.1).",
    )
    ap.add_argument("models", nargs="+", metavar="MODEL",
                    help="an ONNX file, or NAME[@VERSION]=FILE to serve several models or versions")
    ap.add_argument("--name", help="model name for a single MODEL (default: the file's stem)")
    ap.add_argument("--model-version", default="1", help="model version (default: 1)")
    ap.add_argument("--host", default=os.environ.get("UNIFRAME_HOST", "0.0.0.0"))
    ap.add_argument("--port", type=int, default=int(os.environ.get("UNIFRAME_PORT", "8080")))
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default: 1)")
    ap.add_argument("--max-body-size", type=_size, default=64 << 20,
                    help="largest request body accepted, e.g. 64Mi (default); larger gets 413, "
                         "and so does a JSON body whose parse would cost over 5x this "
                         "(images pass what the replica's memory allows)")
    ap.add_argument("--idle-timeout", type=float, default=75.0,
                    help="seconds an idle keep-alive connection stays open (default: 75)")
    ap.add_argument("--access-log", action="store_true", help="log every request to stderr")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.name and len(args.models) > 1:
        print("uniframe-serve: --name applies to a single MODEL; use NAME=FILE for several",
              file=sys.stderr)
        return 2
    models = []
    try:
        for text in args.models:
            name, version, path = parse_model_arg(text, args.name, args.model_version)
            models.append(OnnxModel(path, name, version, threads=args.threads))
    except ModelLoadError as exc:
        print(f"uniframe-serve: error: {exc}", file=sys.stderr)
        return 2
    try:
        server = Server(models, args.host, args.port, max_body_size=args.max_body_size,
                        idle_timeout=args.idle_timeout, access_log=args.access_log)
    except OSError as exc:
        print(f"uniframe-serve: error: {exc.strerror or exc}", file=sys.stderr)
        return 2

    def ready(s: Server) -> None:
        names = ", ".join(f"{m.name}@{m.version}" for m in models)
        print(f"uniframe-serve: serving {names} on http://{args.host}:{s.port} (ready)",
              file=sys.stderr, flush=True)

    server.serve_forever(on_ready=ready)
    print("uniframe-serve: stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
