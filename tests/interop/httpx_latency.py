"""Times sequential MCP calls from httpx, the HTTP stack of the official MCP Python SDK.

Usage: httpx_latency.py URL TOOL ARGS_JSON N
Opens a 2025-06-18 session as the SDK does (initialize, then notifications/initialized), then
makes N `tools/call` requests one after another on one keep-alive connection, reading each
answer (SSE or JSON) to its end. httpx does not set TCP_NODELAY on its own sockets, so a server
that leaves Nagle's algorithm on stalls each small write behind the client's delayed ACK.
Prints one JSON object: the per-call milliseconds, their median, and the last answer.
"""

import json
import statistics
import sys
import time

import httpx

HEADERS = {"content-type": "application/json", "accept": "application/json, text/event-stream"}


def answer(response: httpx.Response) -> dict:
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        for line in response.text.splitlines():
            if line.startswith("data:"):
                message = json.loads(line[5:].strip() or "null")
                if isinstance(message, dict) and "id" in message:
                    return message
        raise SystemExit(f"no JSON-RPC answer in the SSE stream: {response.text!r}")
    return response.json()


def main(url: str, tool: str, args: dict, n: int) -> None:
    with httpx.Client(timeout=30) as http:
        init = {
            "jsonrpc": "2.0", "id": 0, "method": "initialize",
            "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                       "clientInfo": {"name": "httpx-latency", "version": "0"}},
        }
        first = http.post(url, json=init, headers=HEADERS)
        first.raise_for_status()
        session = first.headers["mcp-session-id"]
        headers = {**HEADERS, "mcp-session-id": session, "mcp-protocol-version": "2025-06-18"}
        http.post(url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=headers)
        times, last = [], None
        for i in range(1, n + 1):
            call = {"jsonrpc": "2.0", "id": i, "method": "tools/call", "params": {"name": tool, "arguments": args}}
            start = time.perf_counter()
            response = http.post(url, json=call, headers=headers)
            last = answer(response)
            times.append((time.perf_counter() - start) * 1000)
        print(json.dumps({"ms": times, "median_ms": statistics.median(times), "last": last}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]))
