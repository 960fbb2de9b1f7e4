"""Times MCP calls from httpx, the HTTP stack of the official MCP Python SDK.

Usage: bench_httpx.py URL MODE TOOL ARGS_JSON N SESSION [KEY]
  MODE     free | challenge | paid | chain (URL is then the RPC, KEY a funded account's)
  SESSION  session (initialize first, as the SDK does) | sessionless
For `paid`, each call carries a fresh EIP-3009 authorization for the server's first offer,
signed before the clock starts (signing is the client's cost, not the server's).
Prints one JSON object: n, p50_ms, p99_ms, mean_ms, errors, last, and times_ms (every sample,
so that rounds run apart can be pooled).
"""

import json
import os
import statistics
import sys
import time

import httpx
from eth_account import Account

HEADERS = {"content-type": "application/json", "accept": "application/json, text/event-stream"}


def answer(response):
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        for line in response.text.splitlines():
            if line.startswith("data:"):
                message = json.loads(line[5:].strip() or "null")
                if isinstance(message, dict) and "id" in message:
                    return message
        return {"error": "no answer in stream"}
    return response.json()


def open_session(http, url):
    init = {"jsonrpc": "2.0", "id": 0, "method": "initialize",
            "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                       "clientInfo": {"name": "bench", "version": "0"}}}
    first = http.post(url, json=init, headers=HEADERS)
    first.raise_for_status()
    headers = dict(HEADERS)
    if "mcp-session-id" in first.headers:
        headers["mcp-session-id"] = first.headers["mcp-session-id"]
        headers["mcp-protocol-version"] = "2025-06-18"
    http.post(url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=headers)
    return headers


def sign(account, offer):
    """An x402 v2 exact-EVM payload for `offer`, as the official clients build it."""
    now = int(time.time())
    nonce = "0x" + os.urandom(32).hex()
    message = {"from": account.address, "to": offer["payTo"], "value": int(offer["amount"]),
               "validAfter": now - 600, "validBefore": now + int(offer["maxTimeoutSeconds"]), "nonce": nonce}
    typed = {
        "types": {
            "EIP712Domain": [{"name": "name", "type": "string"}, {"name": "version", "type": "string"},
                             {"name": "chainId", "type": "uint256"}, {"name": "verifyingContract", "type": "address"}],
            "TransferWithAuthorization": [{"name": "from", "type": "address"}, {"name": "to", "type": "address"},
                                          {"name": "value", "type": "uint256"}, {"name": "validAfter", "type": "uint256"},
                                          {"name": "validBefore", "type": "uint256"}, {"name": "nonce", "type": "bytes32"}],
        },
        "primaryType": "TransferWithAuthorization",
        "domain": {"name": offer["extra"]["name"], "version": offer["extra"]["version"],
                   "chainId": int(offer["network"].split(":")[1]), "verifyingContract": offer["asset"]},
        "message": message,
    }
    signed = account.sign_typed_data(full_message=typed)
    authorization = {k: str(v) for k, v in message.items()}
    return {"x402Version": 2, "accepted": offer,
            "payload": {"signature": "0x" + signed.signature.hex().removeprefix("0x"), "authorization": authorization}}


def summary(times):
    ordered = sorted(times)
    return {"n": len(times), "p50_ms": statistics.median(ordered), "p99_ms": ordered[min(len(times) - 1, int(len(times) * 0.99))],
            "mean_ms": statistics.fmean(ordered), "times_ms": times}


def main(url, mode, tool, args, n, session, key=None):
    with httpx.Client(timeout=60) as http:
        headers = open_session(http, url) if session == "session" else dict(HEADERS)
        call = lambda i, meta=None: {"jsonrpc": "2.0", "id": i, "method": "tools/call",
                                     "params": {"name": tool, "arguments": args, **({"_meta": meta} if meta else {})}}
        offer = None
        if mode == "paid":
            challenge = answer(http.post(url, json=call(0), headers=headers))
            offer = challenge["result"]["structuredContent"]["accepts"][0]
            account = Account.from_key(key)
        times, errors, last = [], 0, None
        for i in range(1, n + 1):
            meta = {"x402/payment": sign(account, offer)} if offer else None
            body = call(i, meta)
            start = time.perf_counter()
            response = http.post(url, json=body, headers=headers)
            last = answer(response)
            times.append((time.perf_counter() - start) * 1000)
            is_error = last.get("result", {}).get("isError")
            if "error" in last or (mode != "challenge" and is_error):
                errors += 1
        print(json.dumps({**summary(times), "errors": errors, "last": last}))




def chain_floor(rpc, key, n):
    """The chain's own cost of a mined transaction: eth_sendRawTransactionSync of a plain
    transfer, the floor under any paid call settled on this chain."""
    account = Account.from_key(key)
    with httpx.Client(timeout=60) as http:
        rpc_call = lambda method, params: http.post(rpc, json={"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).json()
        nonce = int(rpc_call("eth_getTransactionCount", [account.address, "pending"])["result"], 16)
        times = []
        for i in range(n):
            tx = {"nonce": nonce + i, "to": account.address, "value": 1, "gas": 21000, "maxFeePerGas": 10**10,
                  "maxPriorityFeePerGas": 10**9, "chainId": int(rpc_call("eth_chainId", [])["result"], 16) if i == 0 else chain_id,
                  "type": 2}
            chain_id = tx["chainId"]
            raw = "0x" + account.sign_transaction(tx).raw_transaction.hex().removeprefix("0x")
            start = time.perf_counter()
            rpc_call("eth_sendRawTransactionSync", [raw])
            times.append((time.perf_counter() - start) * 1000)
        print(json.dumps({**summary(times), "errors": 0}))


if __name__ == "__main__":
    a = sys.argv
    if a[2] == "chain":
        chain_floor(a[1], a[7], int(a[5]))
    else:
        main(a[1], a[2], a[3], json.loads(a[4]), int(a[5]), a[6], a[7] if len(a) > 7 else None)
