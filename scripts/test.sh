#!/usr/bin/env bash
# The README's test command: installs what the suite needs, then runs every test.
#  - anvil (npm package @foundry-rs/anvil-linux-amd64) into .tollgate/tools when not on PATH;
#  - the official x402 Python package (PyPI) into .tollgate/py, for the interop tests;
#  - PostgreSQL (127.0.0.1:5432, database `test`) and Redis (127.0.0.1:6379) must be running;
#    this script starts the machine's own services if they are installed but stopped.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-anvil.sh
scripts/install-python-interop.sh

if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  if command -v pg_ctlcluster >/dev/null; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  fi
fi
pg_isready -h 127.0.0.1 -p 5432 || { echo "PostgreSQL is not reachable at 127.0.0.1:5432" >&2; exit 1; }

# --all-targets also runs the benchmarks once (unoptimised) as smoke tests; the load test checks
# its invariants (transfers = receipts = handler runs) and fails the run if they break.
export LOAD_SECS="${LOAD_SECS:-5}"
# The settlement bench (2-second blocks) as a smoke test: fewer payers, same invariants.
export SETTLE_PAYERS="${SETTLE_PAYERS:-60}" SETTLE_ROUNDS="${SETTLE_ROUNDS:-2}"
cargo test --all-targets "$@"
