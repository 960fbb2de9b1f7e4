"""Side by side, in one run: the floor, tollgate, and the official Python x402 MCP server.

Started here, all on one local anvil chain:
  floor     a bare axum handler answering one constant JSON body (examples/floor.rs);
  tollgate  `tollgate dev` (release build): free `echo`, priced `sha256`;
  peer      the official x402 Python package's FastMCP payment wrapper (tests/interop/
            x402_server.py): free `echo`, priced `weather`, settled by its in-process facilitator.
Drivers: Python httpx (the MCP Python SDK's HTTP stack), with and without a session, for
latency; wrk over 32 connections (sessionless, and spread over 8 sessions) for throughput.
Every line gives its ratio to a floor measured in the same run: latency to the floor's
constant JSON (paid calls to the chain's mined transfer, in interleaved rounds), throughput to
the floor's wrk figure measured just before it.
"""

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

from bench_httpx import summary

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
PY = os.path.join(ROOT, ".tollgate/py/bin/python")
TOLLGATE = os.path.join(ROOT, "target/release/tollgate")
FLOOR = os.path.join(ROOT, "target/release/examples/floor")
N_CALLS = int(os.environ.get("BENCH_CALLS", "300"))
N_PAID = int(os.environ.get("BENCH_PAID", "200"))
PAID_ROUNDS = int(os.environ.get("BENCH_PAID_ROUNDS", "5"))
WRK_SECS = os.environ.get("BENCH_WRK_SECS", "5")
FACILITATOR_KEY = "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6"  # anvil #3
PEER_PAY_TO = "0x9965507D1a55bcC2695C58ba16FB37d819B0A4dc"  # anvil #5
CHAIN_FLOOR_KEY = "0x4bbbf85ce3377467afe5d46f804f221813b2bb87f24d81f60f1fcdbf7cbf4356"  # anvil #7

children = []


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, secs=60):
    deadline = time.time() + secs
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"nothing listens on {port}")


def start(cmd, env, patterns):
    """Starts `cmd`; reads its output until every pattern matched; returns the matches."""
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    children.append(proc)
    found = {}
    deadline = time.time() + 120
    while len(found) < len(patterns) and time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            sys.exit(f"{cmd[0]} exited: {proc.wait()}")
        for name, pattern in patterns.items():
            m = re.search(pattern, line)
            if m and name not in found:
                found[name] = m.group(1)
    # Keep draining so the child never blocks on a full pipe.
    subprocess.Popen(["cat"], stdin=proc.stdout, stdout=subprocess.DEVNULL)
    return found


def httpx(url, mode, tool, args, n, session, key=None):
    cmd = [PY, os.path.join(ROOT, "scripts/bench_httpx.py"), url, mode, tool, json.dumps(args), str(n), session]
    out = subprocess.run(cmd + ([key] if key else []), capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        return {"failed": out.stderr.strip().splitlines()[-1:]}
    return json.loads(out.stdout)


WRK_SCRIPT = """
local sessions = {}
for id in string.gmatch(os.getenv("SESSIONS") or "", "[^,]+") do table.insert(sessions, id) end
wrk.method = "POST"
wrk.body = os.getenv("BODY")
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Accept"] = "application/json, text/event-stream"
local n = 0
request = function()
  if #sessions > 0 then
    n = n + 1
    wrk.headers["Mcp-Session-Id"] = sessions[(n % #sessions) + 1]
    wrk.headers["Mcp-Protocol-Version"] = "2025-06-18"
  end
  return wrk.format()
end
"""


def sessions(url, count):
    import urllib.request
    ids = []
    for _ in range(count):
        init = {"jsonrpc": "2.0", "id": 0, "method": "initialize",
                "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "wrk", "version": "0"}}}
        req = urllib.request.Request(url, data=json.dumps(init).encode(), method="POST",
                                     headers={"content-type": "application/json", "accept": "application/json, text/event-stream"})
        with urllib.request.urlopen(req) as r:
            sid = r.headers.get("mcp-session-id")
            r.read()
        note = urllib.request.Request(url, data=b'{"jsonrpc":"2.0","method":"notifications/initialized"}', method="POST",
                                      headers={"content-type": "application/json", "accept": "application/json, text/event-stream",
                                               "mcp-session-id": sid or "", "mcp-protocol-version": "2025-06-18"})
        urllib.request.urlopen(note).read()
        ids.append(sid or "")
    return ids


def wrk(url, tool, args, session_ids):
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": tool, "arguments": args}})
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_SCRIPT)
    env = {**os.environ, "BODY": body, "SESSIONS": ",".join(session_ids)}
    out = subprocess.run(["wrk", "-t2", "-c32", f"-d{WRK_SECS}s", "-s", f.name, url], env=env,
                         capture_output=True, text=True, timeout=120)
    m = re.search(r"Requests/sec:\s+([\d.]+)", out.stdout)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out.stdout)
    return float(m.group(1)) if m else 0.0, int(errors.group(1)) if errors else 0


def pool(rounds):
    """One figure from rounds run apart: every sample together, summarised as each round was."""
    failed = [r for r in rounds if "failed" in r]
    if failed:
        return failed[0]
    times = [t for r in rounds for t in r["times_ms"]]
    return {**summary(times), "errors": sum(r.get("errors", 0) for r in rounds)}


def line(target, what, result, floor_p50, floor="floor"):
    if "failed" in result:
        print(f"{target:<9} {what:<36} failed: {result['failed']}")
        return
    ratio = result["p50_ms"] / floor_p50 if floor_p50 else 0
    errors = f"  errors {result['errors']}" if result.get("errors") else ""
    print(f"{target:<9} {what:<36} p50 {result['p50_ms']:8.2f} ms  p99 {result['p99_ms']:8.2f} ms"
          f"  ({ratio:5.1f}x {floor} p50){errors}", flush=True)


def main():
    state = tempfile.mkdtemp(prefix="tollgate-bench-")
    port = free_port()
    # Limits are not what is measured here: the ceiling and the wallet limit are lifted.
    config = os.path.join(state, "bench.toml")
    with open(config, "w") as f:
        f.write("[ceiling]\nburst = 1000000\nper_second = 1000000\n"
                "[[limits.rules]]\naxis = \"wallet\"\nwindow_secs = 60\nrequests = 1000000\n")
    dev = start([TOLLGATE, "--config", config, "dev"],
                {"TOLLGATE_SERVER__BIND": f"127.0.0.1:{port}", "TOLLGATE_DEV__STATE_DIR": state, "RUST_LOG": "warn"},
                {"url": r"serving (\S+)", "rpc": r"anvil at (\S+)", "token": r"USDC\s+(0x[0-9a-fA-F]{40})",
                 "key": r"key in ([^)]+)\)"})
    payer_key = open(dev["key"]).read().strip()
    floor_port = free_port()
    start([FLOOR, str(floor_port)], {}, {"url": r"serving (\S+)"})
    peer_port = free_port()
    subprocess_env = {"RPC_URL": dev["rpc"], "CHAIN_ID": "31337", "ASSET": dev["token"], "PAY_TO": PEER_PAY_TO,
                      "FACILITATOR_KEY": FACILITATOR_KEY, "PORT": str(peer_port), "PRICE": "1000"}
    peer_proc = subprocess.Popen([PY, os.path.join(ROOT, "tests/interop/x402_server.py")],
                                 env={**os.environ, **subprocess_env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children.append(peer_proc)
    wait_port(peer_port)
    floor = f"http://127.0.0.1:{floor_port}/mcp"
    tollgate = dev["url"]
    peer = f"http://127.0.0.1:{peer_port}/mcp"
    print(f"bench: {N_CALLS} calls per latency line ({N_PAID} paid), wrk 32 connections for {WRK_SECS}s; anvil automine")

    # Latency from httpx. Free calls and challenges first (they add no blocks).
    floor_free = httpx(floor, "free", "echo", {"text": "hi"}, N_CALLS, "sessionless")
    line("floor", "constant JSON (httpx)", floor_free, floor_free["p50_ms"])
    f50 = floor_free["p50_ms"]
    for session in ["session", "sessionless"]:
        line("tollgate", f"free echo (httpx, {session})", httpx(tollgate, "free", "echo", {"text": "hi"}, N_CALLS, session), f50)
        line("tollgate", f"challenge sha256 (httpx, {session})",
             httpx(tollgate, "challenge", "sha256", {"text": "hi"}, N_CALLS, session), f50)
    line("peer", "free echo (httpx, session)", httpx(peer, "free", "echo", {"text": "hi"}, N_CALLS, "session"), f50)
    line("peer", "challenge weather (httpx, session)",
         httpx(peer, "challenge", "weather", {"city": "Paris"}, N_CALLS, "session"), f50)
    # Paid calls, and the chain's own mined transfer beside them, in interleaved rounds: anvil
    # slows as its chain grows (a plain transfer takes about twice as long after a few thousand
    # blocks), so each figure must be measured at the same heights as its floor.
    paid = {"tollgate session": [], "tollgate sessionless": [], "peer": [], "chain": []}
    per_round = max(1, N_PAID // PAID_ROUNDS)
    for _ in range(PAID_ROUNDS):
        paid["tollgate session"].append(httpx(tollgate, "paid", "sha256", {"text": "hi"}, per_round, "session", payer_key))
        paid["tollgate sessionless"].append(
            httpx(tollgate, "paid", "sha256", {"text": "hi"}, per_round, "sessionless", payer_key))
        paid["peer"].append(httpx(peer, "paid", "weather", {"city": "Paris"}, per_round, "session", payer_key))
        paid["chain"].append(httpx(dev["rpc"], "chain", "-", {}, per_round, "-", CHAIN_FLOOR_KEY))
    pooled = {name: pool(rounds) for name, rounds in paid.items()}
    c50 = pooled["chain"].get("p50_ms", 0)
    print(f"paid calls: {PAID_ROUNDS} interleaved rounds of {per_round}; ratios to the mined transfer in the same rounds")
    line("anvil", "mined transfer (sendRawTransactionSync)", pooled["chain"], c50, "chain")
    for session in ["session", "sessionless"]:
        line("tollgate", f"paid sha256 (httpx, {session})", pooled[f"tollgate {session}"], c50, "chain")
    line("peer", "paid weather (httpx, session)", pooled["peer"], c50, "chain")
    print("peer      sessionless                          n/a (FastMCP serves sessions only)")

    # Throughput from wrk. This machine's throughput drifts within a run, so the floor is
    # measured again just before each line and the ratio is to that one.
    for target, url, free_tool, priced, args in [("tollgate", tollgate, "echo", "sha256", {"text": "hi"}),
                                                 ("peer", peer, "echo", "weather", {"city": "Paris"})]:
        modes = [("8 sessions", 8), ("sessionless", 0)] if target == "tollgate" else [("8 sessions", 8)]
        for label, count in modes:
            ids = sessions(url, count) if count else []
            for what, tool, a in [("free", free_tool, {"text": "hi"}), ("challenge", priced, args)]:
                floor_rps, _ = wrk(floor, "echo", {"text": "hi"}, [])
                rps, non2xx = wrk(url, tool, a, ids)
                bad = f"  non-2xx {non2xx}" if non2xx else ""
                print(f"{target:<9} {what + ' (wrk, ' + label + ')':<36} {rps:10.0f} req/s  ({rps / floor_rps:5.2f}x "
                      f"the floor's {floor_rps:.0f} req/s beside it){bad}", flush=True)


if __name__ == "__main__":
    try:
        main()
    finally:
        for child in children:
            child.terminate()
        for child in children:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
