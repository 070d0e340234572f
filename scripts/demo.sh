#!/usr/bin/env bash
# Set up .venv and run the demo twice: stop-gradient removed at t0, then the healthy twin.
# Writes demo_out/collapse/ and demo_out/healthy/ (summary.json, timeline.png).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "lightning,demo"
.venv/bin/topo-callbacks demo --out demo_out/collapse "$@"
.venv/bin/topo-callbacks demo --healthy --out demo_out/healthy "$@"
