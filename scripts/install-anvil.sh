#!/usr/bin/env bash
# Installs anvil from the npm registry into .tollgate/tools unless it is already there or on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGE="@foundry-rs/anvil-linux-amd64@1.7.1"
if [ -x .tollgate/tools/node_modules/.bin/anvil ] || command -v anvil >/dev/null; then
  exit 0
fi
command -v npm >/dev/null || { echo "npm is required to install anvil (apt-get install -y nodejs npm)" >&2; exit 1; }
mkdir -p .tollgate/tools
npm install --prefix .tollgate/tools --no-audit --no-fund --silent "$PACKAGE"
.tollgate/tools/node_modules/.bin/anvil --version | head -n1
