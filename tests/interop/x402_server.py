"""An MCP server built with the official x402 Python package's payment wrapper (FastMCP).

It settles through an in-process x402 facilitator on the given chain, as a seller using the
official SDK would. `tollgate call` must be able to pay it.

Env: RPC_URL, CHAIN_ID, ASSET, PAY_TO, FACILITATOR_KEY, PORT, PRICE (atomic units).
Tools: `weather` (city: str) -> JSON text, paid; `echo` (text: str), free (for benchmarks).
"""

import json
import os

from mcp.server.fastmcp import FastMCP
from x402 import x402Facilitator, x402ResourceServer
from x402.mcp.server import create_payment_wrapper
from x402.mechanisms.evm.exact.register import register_exact_evm_facilitator, register_exact_evm_server
from x402.mechanisms.evm.signers import FacilitatorWeb3Signer
from x402.schemas.base import AssetAmount
from x402.schemas.config import ResourceConfig

network = f"eip155:{os.environ['CHAIN_ID']}"
facilitator = register_exact_evm_facilitator(
    x402Facilitator(),
    FacilitatorWeb3Signer(private_key=os.environ["FACILITATOR_KEY"], rpc_url=os.environ["RPC_URL"]),
    networks=network,
)
resource_server = register_exact_evm_server(x402ResourceServer(facilitator), network)
resource_server.initialize()
accepts = resource_server.build_payment_requirements(
    ResourceConfig(
        scheme="exact",
        pay_to=os.environ["PAY_TO"],
        price=AssetAmount(
            amount=os.environ.get("PRICE", "1500"),
            asset=os.environ["ASSET"],
            extra={"name": "USD Coin", "version": "2"},
        ),
        network=network,
        max_timeout_seconds=120,
    )
)

mcp = FastMCP("x402-python-seller", host="127.0.0.1", port=int(os.environ["PORT"]))
paid = create_payment_wrapper(resource_server, accepts=accepts)


@mcp.tool(name="weather", description="Weather for a city (paid).")
@paid
async def weather(city: str) -> str:
    return json.dumps({"city": city, "weather": "sunny", "seller": "x402-python"})


@mcp.tool(name="echo", description="Returns the text it is given (free).")
async def echo(text: str) -> str:
    return text


if __name__ == "__main__":
    mcp.run(transport="streamable-http")
