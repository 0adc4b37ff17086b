"""Entry point of the ``uniframe`` console script: imports every command module once."""

from __future__ import annotations

# Each import registers its commands on ``app``.
from uniframe.cli import build, daemon, examples, infer, kernel, model, run, serve, validate  # noqa: F401
from uniframe.cli.app import run as run_app


def main() -> None:
    run_app()


if __name__ == "__main__":
    main()
