"""Hammers a server's ceiling from httpx (the MCP Python SDK's HTTP stack) on keep-alive
connections, and counts what a refused agent saw.

Usage: httpx_ceiling.py URL N THREADS
N requests in all, spread over THREADS threads sharing one connection pool. Prints one JSON
object: ok, refused (429 with a Retry-After), refused_without_retry_after, other, and
transport_errors (the connection dropped: "Server disconnected without sending a response").
"""

import json
import sys
import threading

import httpx

HEADERS = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
BODY = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "x" * 200}}}


def main(url, n, threads):
    counts = {"ok": 0, "refused": 0, "refused_without_retry_after": 0, "other": 0, "transport_errors": 0}
    lock = threading.Lock()
    with httpx.Client(timeout=30, limits=httpx.Limits(max_connections=threads)) as http:
        def worker(count):
            for _ in range(count):
                try:
                    response = http.post(url, json=BODY, headers=HEADERS)
                    key = "ok" if response.status_code == 200 else "other"
                    if response.status_code == 429:
                        key = "refused" if "retry-after" in response.headers else "refused_without_retry_after"
                except httpx.TransportError:
                    key = "transport_errors"
                with lock:
                    counts[key] += 1
        workers = [threading.Thread(target=worker, args=(n // threads,)) for _ in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    print(json.dumps(counts))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
