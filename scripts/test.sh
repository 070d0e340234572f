#!/usr/bin/env bash
# Set up .venv with the dev extras and run the whole test suite (unit, oracle, property, Lightning, demo).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k topology`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
.venv/bin/python -m pytest -q "$@"
