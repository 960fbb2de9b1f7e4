#!/usr/bin/env bash
# Rebuilds contracts-abi/TestUSDC.{abi.json,bin} from contracts-abi/TestUSDC.sol with solc-js
# from the npm registry (pinned), so the committed bytecode can always be reproduced.
set -euo pipefail
cd "$(dirname "$0")/.."
SOLC_VERSION=0.8.30
tools=.tollgate/tools/solc
if [ ! -x "$tools/node_modules/.bin/solcjs" ]; then
  mkdir -p "$tools"
  npm install --prefix "$tools" --silent --no-audit --no-fund "solc@$SOLC_VERSION" >&2
fi
out=$(mktemp -d)
"$tools/node_modules/.bin/solcjs" --optimize --optimize-runs 200 --bin --abi \
  --output-dir "$out" contracts-abi/TestUSDC.sol >&2
python3 -m json.tool "$out"/contracts-abi_TestUSDC_sol_TestUSDC.abi > contracts-abi/TestUSDC.abi.json
tr -d '\n' < "$out"/contracts-abi_TestUSDC_sol_TestUSDC.bin > contracts-abi/TestUSDC.bin
rm -rf "$out"
echo "rebuilt contracts-abi/TestUSDC.bin ($(wc -c < contracts-abi/TestUSDC.bin) hex chars)" >&2

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

# Multicall3's aggregate3 (same ABI as the canonical deployment on Base), for local chains.
out=$(mktemp -d)
"$tools/node_modules/.bin/solcjs" --optimize --optimize-runs 200 --bin --abi \
  --output-dir "$out" contracts-abi/Multicall3.sol >&2
python3 -m json.tool "$out"/contracts-abi_Multicall3_sol_Multicall3.abi > contracts-abi/Multicall3.abi.json
tr -d '\n' < "$out"/contracts-abi_Multicall3_sol_Multicall3.bin > contracts-abi/Multicall3.bin
rm -rf "$out"
echo "rebuilt contracts-abi/Multicall3.bin ($(wc -c < contracts-abi/Multicall3.bin) hex chars)" >&2
