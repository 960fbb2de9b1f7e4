#!/usr/bin/env bash
# Rebuilds contracts-abi/{TestUSDC,Multicall3,TestWallet,TestWalletFactory}.{abi.json,bin} from their .sol sources with
# solc-js from the npm registry (pinned), so the committed bytecode can always be reproduced.
set -euo pipefail
cd "$(dirname "$0")/.."
SOLC_VERSION=0.8.30
tools=.tollgate/tools/solc
if [ ! -x "$tools/node_modules/.bin/solcjs" ]; then
  mkdir -p "$tools"
  npm install --prefix "$tools" --silent --no-audit --no-fund "solc@$SOLC_VERSION" >&2
fi

# contracts-abi/FILE.sol's contract NAME (default: FILE) -> contracts-abi/NAME.abi.json and .bin
build() {
  local file=$1 name=${2:-$1} out
  out=$(mktemp -d)
  "$tools/node_modules/.bin/solcjs" --optimize --optimize-runs 200 --bin --abi \
    --output-dir "$out" "contracts-abi/$file.sol" >&2
  python3 -m json.tool "$out/contracts-abi_${file}_sol_${name}.abi" > "contracts-abi/$name.abi.json"
  tr -d '\n' < "$out/contracts-abi_${file}_sol_${name}.bin" > "contracts-abi/$name.bin"
  rm -rf "$out"
  echo "rebuilt contracts-abi/$name.bin ($(wc -c < "contracts-abi/$name.bin") hex chars)" >&2
}

build TestUSDC
# Multicall3's aggregate3 (same ABI as the canonical deployment on Base), for local chains.
build Multicall3
# A minimal ERC-1271 wallet and its CREATE2 factory, for the smart-wallet payer tests.
build TestWallet
build TestWallet TestWalletFactory

# The subset of the USDC (FiatToken v2.2) interface that tollgate itself calls or reads: the same
# selectors and events exist on Base USDC, so production code binds to this file only.
python3 - <<'PY'
import json
abi = json.load(open("contracts-abi/TestUSDC.abi.json"))
keep = {"transferWithAuthorization", "receiveWithAuthorization", "authorizationState", "balanceOf",
        "name", "version", "decimals", "DOMAIN_SEPARATOR", "Transfer", "AuthorizationUsed",
        "AuthorizationCanceled"}
json.dump([e for e in abi if e.get("name") in keep], open("contracts-abi/usdc.abi.json", "w"), indent=2)
PY
