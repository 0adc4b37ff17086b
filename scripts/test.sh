#!/usr/bin/env bash
# Install everything the tests need, then run the linters and the whole test suite
# (including the tests marked qemu, root and slow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev
echo "== ruff";        ruff check src tests bench
echo "== mypy";        mypy
echo "== import-linter"; lint-imports
echo "== collected"; python3 scripts/check_collected.py  # every tracked test file is collected
echo "== pytest";      python3 -m pytest "$@"
