#!/usr/bin/env bash
# Create (or reuse) .venv and install the package with the given extras; torch is pinned to the CPU build
# first so that nothing pulls the multi-GB CUDA build (an unpinned `torch` would).
# Usage: source-free, e.g. `bash scripts/setup.sh dev`
#
# The extras are installed with uv when it installs (about half of pip's time on a fresh machine: ~48 s against
# ~94 s for the dev extras on the 2-core CI machine, which keeps CI within its time). torch stays pip's: pip takes
# the CPU build from the machine's own wheels, and the uv step asks for that same version, so it installs no other
# build. Without uv (no network to PyPI for it) pip does everything, as before.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
torch_version="2.13.0"
torch_pin="torch==${torch_version}"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet "$torch_pin"
# uv reads no pip configuration (local wheel folders, extra indexes): it resolves from PyPI, and keeps the torch
# that pip installed because the pin admits it; the check after it makes sure, or pip takes over
if .venv/bin/python -m pip install --quiet --timeout 30 --retries 1 uv \
    && .venv/bin/python -m uv pip install --quiet --python .venv/bin/python "$torch_pin" -e ".[${extras}]" \
    && .venv/bin/python -c "import sys, torch; sys.exit(torch.__version__ != '${torch_version}+cpu')"; then
    exit 0
fi
echo "setup.sh: uv did not install the extras (or changed torch); installing them with pip" >&2
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[${extras}]"
