#!/usr/bin/env bash
# Side-by-side benchmark, one run: floor, tollgate (release) and the official Python x402 MCP
# server on one local chain, driven by Python httpx and wrk. Prints one line per figure with
# its ratio to the floor. Installs what it needs (anvil, the Python packages, wrk).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-anvil.sh
scripts/install-python-interop.sh
if ! command -v wrk >/dev/null; then
  (apt-get update -qq && apt-get install -y -qq wrk) >/dev/null
fi
cargo build --release --bin tollgate --example floor
exec .tollgate/py/bin/python scripts/bench.py
