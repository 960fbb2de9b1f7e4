#!/usr/bin/env bash
# Installs the official x402 Python package (client and MCP server wrapper) into .tollgate/py,
# for the interop tests. Pinned: x402 2.25.0 imports mcp.server.fastmcp, which the 2.x MCP SDK removed, so it needs mcp<2.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.tollgate/py
if [ -x "$PY/bin/python" ] && "$PY/bin/python" -c "import x402.mcp.client, mcp.server.fastmcp" 2>/dev/null; then
  exit 0
fi
python3 -m venv "$PY"
"$PY/bin/pip" install --quiet --disable-pip-version-check "x402[evm,mcp,httpx]==2.25.0" "mcp<2"
