"""Entry point of the ``uniframe`` console script: imports every command module once."""

from __future__ import annotations

# Each import registers its commands on ``app``.
from uniframe.cli import examples, infer, serve  # noqa: F401
from uniframe.cli.app import run


def main() -> None:
    run()


if __name__ == "__main__":
    main()
