"""Pays a tool again and again, for a while, with the official x402 Python MCP client (PyPI `x402`)
over the official MCP Python SDK's Streamable HTTP client: the load test's Python agent.

Usage: x402_load.py URL TOOL ARGS_JSON SECONDS
Env:   PAYER_KEY (hex), ALLOW_NETWORK, ALLOW_ASSET (the local test token must be opted in), and
       API_KEY (sent as x-api-key, so the server's ceiling gives this agent its own bucket).
Prints one JSON object: calls, paid (answers that carry a settled payment), errors, p50_ms, p99_ms.
"""

import asyncio
import json
import os
import sys
import time

import httpx
from eth_account import Account
from mcp import ClientSession
from mcp.client.streamable_http import streamablehttp_client
from x402 import x402Client
from x402.mcp.client import x402MCPSession
from x402.mechanisms.evm.exact.register import register_exact_evm_client
from x402.mechanisms.evm.signers import EthAccountSigner


async def main(url: str, tool: str, args: dict, seconds: float) -> None:
    signer = EthAccountSigner(Account.from_key(os.environ["PAYER_KEY"]))
    client = register_exact_evm_client(x402Client(), signer)
    client.set_spend_controls(
        {"allowed_assets": [{"network": os.environ["ALLOW_NETWORK"], "asset": os.environ["ALLOW_ASSET"]}]}
    )
    headers = {"x-api-key": os.environ["API_KEY"]} if os.environ.get("API_KEY") else None
    calls, paid, errors, times = 0, 0, 0, []
    async with streamablehttp_client(url, headers=headers) as (read, write, _):
        async with ClientSession(read, write) as session:
            await session.initialize()
            paying = x402MCPSession(session, client)
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                calls += 1
                start = time.perf_counter()
                try:
                    result = await paying.call_tool(tool, args)
                except (httpx.HTTPError, RuntimeError, ValueError) as e:
                    errors += 1
                    print(f"call failed: {e!r}"[:300], file=sys.stderr)
                    continue
                times.append((time.perf_counter() - start) * 1000)
                settled = result.payment_response is not None and getattr(result.payment_response, "success", False)
                if result.payment_made and settled and not result.is_error:
                    paid += 1
                else:
                    errors += 1
    times.sort()
    pick = lambda q: times[min(len(times) - 1, int(len(times) * q))] if times else 0.0
    print(json.dumps({"calls": calls, "paid": paid, "errors": errors, "p50_ms": pick(0.5), "p99_ms": pick(0.99)}))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), float(sys.argv[4])))
