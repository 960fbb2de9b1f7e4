"""Pays a tool on an MCP server with the official x402 Python client (PyPI `x402`), unchanged.

Usage: x402_client.py URL TOOL ARGS_JSON
Env:   PAYER_KEY (hex), ALLOW_NETWORK and ALLOW_ASSET (the local test token must be opted in,
       as the official client only pays its built-in USDC by default).
Prints one JSON object: payment_made, is_error, payment_response, content, tools.
"""

import asyncio
import json
import os
import sys

from eth_account import Account
from mcp import ClientSession
from mcp.client.streamable_http import streamablehttp_client
from x402 import x402Client
from x402.mcp.client import x402MCPSession
from x402.mechanisms.evm.exact.register import register_exact_evm_client
from x402.mechanisms.evm.signers import EthAccountSigner


def dump(value):
    return value.model_dump(by_alias=True, exclude_none=True) if hasattr(value, "model_dump") else value


async def main(url: str, tool: str, args: dict) -> None:
    signer = EthAccountSigner(Account.from_key(os.environ["PAYER_KEY"]))
    client = register_exact_evm_client(x402Client(), signer)
    client.set_spend_controls(
        {"allowed_assets": [{"network": os.environ["ALLOW_NETWORK"], "asset": os.environ["ALLOW_ASSET"]}]}
    )
    async with streamablehttp_client(url) as (read, write, _):
        async with ClientSession(read, write) as session:
            await session.initialize()
            paying = x402MCPSession(session, client)
            tools = await paying.list_tools()
            result = await paying.call_tool(tool, args)
            print(
                json.dumps(
                    {
                        "tools": [t.name for t in tools.tools],
                        "payment_made": result.payment_made,
                        "is_error": result.is_error,
                        "payment_response": dump(result.payment_response),
                        "content": [dump(c) for c in result.content],
                    }
                )
            )


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3])))
