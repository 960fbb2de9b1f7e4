"""A small MCP server (official MCP Python SDK, FastMCP) for tollgate's proxy tests.

Usage: upstream_server.py stdio|http PORT CALLS_FILE [exit_after_first_call]
Every tool call appends its tool name to CALLS_FILE, so a test can count upstream runs.
With exit_after_first_call the process exits just after answering its first call (a crash).
"""

import os
import sys
import threading

from mcp.server.fastmcp import FastMCP

transport, port, calls_file = sys.argv[1], int(sys.argv[2]), sys.argv[3]
exit_after_first = len(sys.argv) > 4
mcp = FastMCP("tollgate-upstream-test", host="127.0.0.1", port=port)


def record(name: str) -> None:
    with open(calls_file, "a") as f:
        f.write(name + "\n")
    if exit_after_first:
        threading.Timer(0.3, lambda: os._exit(0)).start()


@mcp.tool(description="Reverses a text.")
def reverse(text: str) -> str:
    record("reverse")
    return text[::-1]


@mcp.tool(description="Always fails.")
def broken(text: str) -> str:
    record("broken")
    raise ValueError("upstream tool failed on purpose")


@mcp.tool(description="Meets the API's rate limit, as a SaaS wrapper reports it.")
def limited(text: str) -> str:
    record("limited")
    raise ValueError("upstream API rate limited: retry after 30s")


@mcp.tool(description="Answers pong (free).")
def ping() -> str:
    return "pong"


@mcp.tool(description="Not for sale.")
def admin() -> str:
    return "secret"


if __name__ == "__main__":
    mcp.run(transport="stdio" if transport == "stdio" else "streamable-http")
