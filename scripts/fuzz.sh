#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (FUZZ_SECS, default 60 s each) with cargo-fuzz
# (libFuzzer). The stable toolchain is used with RUSTC_BOOTSTRAP=1, since cargo-fuzz passes
# unstable flags. Crashes are kept in fuzz/artifacts/<target>/; each must become a test.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
secs="${FUZZ_SECS:-60}"
for target in payment_decode payment_verify receipt_verify config_parse; do
  echo "== $target ($secs s)"
  cargo fuzz run --sanitizer none "$target" -- -max_total_time="$secs" -max_len=4096 2>&1 \
    | grep -E "^#[0-9]+.*(DONE|pulse)|Done [0-9]+ runs|ERROR|panicked" | tail -n 3
done
