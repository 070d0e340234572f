#!/usr/bin/env bash
# Create (or reuse) .venv and install the package with the given extras; torch is pinned to the CPU build
# first so that nothing pulls the multi-GB CUDA build (an unpinned `torch` would).
# Usage: source-free, e.g. `bash scripts/setup.sh dev`
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[${extras}]"
