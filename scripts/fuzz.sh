#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (FUZZ_SECS, default 60 s each) with cargo-fuzz
# (libFuzzer). The stable toolchain is used with RUSTC_BOOTSTRAP=1, since cargo-fuzz passes
# unstable flags. Crashes are kept in fuzz/artifacts/<target>/; each must become a test.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
secs="${FUZZ_SECS:-60}"
for target in payment_decode payment_verify receipt_verify config_parse mcp_request; do
  echo "== $target ($secs s)"
  # Committed seeds (fuzz/seeds/<target>) start the search; a dictionary, where there is one,
  # gives the mutator the protocol's words.
  corpora=("fuzz/corpus/$target")
  [ -d "fuzz/seeds/$target" ] && corpora+=("fuzz/seeds/$target")
  dict=()
  [ -f "fuzz/$target.dict" ] && dict=(-dict="fuzz/$target.dict")
  mkdir -p "fuzz/corpus/$target"
  cargo fuzz run --sanitizer none "$target" "${corpora[@]}" -- -max_total_time="$secs" -max_len=4096 \
    "${dict[@]}" 2>&1 \
    | grep -E "^#[0-9]+.*(DONE|pulse)|Done [0-9]+ runs|ERROR|panicked" | tail -n 3
done
