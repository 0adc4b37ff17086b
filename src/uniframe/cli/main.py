"""Entry point of the ``uniframe`` console script: imports every command module once."""

from __future__ import annotations

# Each import registers its commands on ``app``.
from uniframe.cli import (  # noqa: F401
    apply,
    build,
    daemon,
    examples,
    get,
    infer,
    kernel,
    logs,
    model,
    rollout,
    run,
    runtimes,
    serve,
    snapshot,
    validate,
)
from uniframe.cli.app import run as run_app


def main() -> None:
    run_app()


if __name__ == "__main__":
    main()
