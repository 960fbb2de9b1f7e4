//! Bounded load test on loopback (prints figures; not a test): one tollgate on a local anvil
//! chain, driven for a fixed time by a mix of free calls, challenges, paid calls and a flood
//! from one session, then the invariants a payment server must keep are checked:
//! transfers on chain = settled payments = receipts = handler runs = paid answers.
//! Paid calls come from Rust agents and from Python agents running the official x402 MCP client
//! (PyPI `x402`, over the official MCP Python SDK), unchanged.
//!
//! Run: `cargo bench --bench load` (optional: LOAD_SECS, default 20).

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use alloy::primitives::U256;
use alloy::providers::Provider;
use alloy::rpc::types::Filter;
use alloy::sol_types::SolEvent;
use serde_json::{Value, json};
use tollgate::chain::usdc::Usdc;
use tollgate::client::sign::{SignParams, sign_payment};
use tollgate::clock::{Clock, SystemClock};
use tollgate::config::Config;
use tollgate::payment::wire::PaymentRequirements;

const PRICE: u64 = 1000;
const PAYERS: usize = 8;
/// Agents running the official Python x402 MCP client.
const PYTHON_AGENTS: usize = 2;

#[derive(Default)]
struct Tally {
    latencies_us: Vec<u64>,
    ok: usize,
    errors: usize,
    refused_429: usize,
    paid: usize,
}

async fn post(http: &reqwest::Client, url: &str, body: &Value, session: Option<&str>) -> (u16, Value) {
    let mut request = http
        .post(url)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .json(body);
    if let Some(key) = session {
        // Each simulated agent has its own API key, so the ceiling keys them apart.
        request = request.header("x-api-key", key);
    }
    match request.send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            (status, r.json().await.unwrap_or(Value::Null))
        }
        Err(_) => (0, Value::Null),
    }
}

fn call(tool: &str, meta: Option<Value>) -> Value {
    let mut params = json!({ "name": tool, "arguments": { "text": "load" } });
    if let Some(meta) = meta {
        params["_meta"] = meta;
    }
    json!({ "jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params })
}

fn resident_mb() -> f64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: f64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0.0);
    pages * 4096.0 / 1e6
}

#[tokio::main]
async fn main() {
    let secs: u64 = std::env::var("LOAD_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(20);
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::load(None).unwrap();
    config.receipts.key = "33".repeat(32).into();
    config.limits.rules.clear(); // the load is the point here; limits have their own tests
    // Per-agent ceiling (by API key): generous for the workers, and the flooder exceeds it.
    config.ceiling.api_key_header = "x-api-key".into();
    // Only configured keys earn their own bucket: every agent's key, and the flooder's.
    let agents =
        (0..PAYERS).map(|i| format!("payer-{i}")).chain((0..PYTHON_AGENTS).map(|i| format!("python-{i}")));
    let workers = ["free", "challenge"].into_iter().flat_map(|k| (0..64).map(move |n| format!("{k}-{n}")));
    config.ceiling.api_keys_sha256 = agents
        .chain(workers)
        .chain(["flooder".to_owned()])
        .map(|key| hex::encode(<sha2::Sha256 as sha2::Digest>::digest(key.as_bytes())))
        .collect();
    // Free callers and challengers spread over 64 keys and paid agents stay well below 100/s
    // per key even in release builds; the flooder's four loops exceed it even in a debug build.
    config.ceiling.burst = 100;
    config.ceiling.per_second = 100;
    let served = common::serve_counted(config, dir.path(), PRICE).await;
    let payers = served.funded_payers(PAYERS, 1_000_000_000).await;
    let python_payers = served.funded_payers(PYTHON_AGENTS, 1_000_000_000).await;
    let common::Served { url, state, chain, runs, minter: provider } = served;
    let http = reqwest::Client::new();
    let (_, challenge) = post(&http, &url, &call("counted", None), None).await;
    let requirements: PaymentRequirements =
        serde_json::from_value(challenge["result"]["structuredContent"]["accepts"][0].clone()).unwrap();

    let rss_before = resident_mb();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut workers = Vec::new();
    // Paid callers (one per payer), free callers, challengers, and one flooding session.
    for (i, payer) in payers.into_iter().enumerate() {
        let (http, url, req) = (http.clone(), url.clone(), requirements.clone());
        workers.push(tokio::spawn(async move {
            let mut t = Tally::default();
            while Instant::now() < deadline {
                let params = SignParams::standard(SystemClock.now_unix(), req.max_timeout_seconds);
                let payload = sign_payment(&payer, &req, None, &params).unwrap();
                let start = Instant::now();
                let (status, body) = post(
                    &http,
                    &url,
                    &call("counted", Some(json!({ "x402/payment": payload }))),
                    Some(&format!("payer-{i}")),
                )
                .await;
                t.latencies_us.push(start.elapsed().as_micros() as u64);
                match (status, body["result"]["isError"].as_bool()) {
                    (200, Some(false)) => t.paid += 1,
                    (429, _) => t.refused_429 += 1,
                    _ => t.errors += 1,
                }
            }
            ("paid", t)
        }));
    }
    for kind in ["free", "challenge", "free", "challenge"] {
        let (http, url) = (http.clone(), url.clone());
        workers.push(tokio::spawn(async move {
            let mut t = Tally::default();
            let mut n = 0;
            while Instant::now() < deadline {
                n += 1;
                let tool = if kind == "free" { "echo" } else { "sha256" };
                let start = Instant::now();
                let (status, _) =
                    post(&http, &url, &call(tool, None), Some(&format!("{kind}-{}", n % 64))).await;
                t.latencies_us.push(start.elapsed().as_micros() as u64);
                match status {
                    200 => t.ok += 1,
                    429 => t.refused_429 += 1,
                    _ => t.errors += 1,
                }
            }
            (kind, t)
        }));
    }
    // The flooder: four concurrent loops on one key, so it outruns the ceiling's refill even
    // on a loaded machine and in a debug build (one sequential loop did not, always).
    for _ in 0..4 {
        let (http2, url2) = (http.clone(), url.clone());
        workers.push(tokio::spawn(async move {
            let mut t = Tally::default();
            while Instant::now() < deadline {
                let start = Instant::now();
                let (status, _) = post(&http2, &url2, &call("echo", None), Some("flooder")).await;
                t.latencies_us.push(start.elapsed().as_micros() as u64);
                match status {
                    200 => t.ok += 1,
                    429 => t.refused_429 += 1,
                    _ => t.errors += 1,
                }
            }
            ("flood", t)
        }));
    }
    // Python agents: the official x402 client, each in its own process, for the same time.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let python: Vec<_> = python_payers
        .iter()
        .enumerate()
        .map(|(i, payer)| {
            tokio::process::Command::new(root.join(".tollgate/py/bin/python"))
                .arg(root.join("tests/interop/x402_load.py"))
                .args([url.as_str(), "counted", "{}", &secs.to_string()])
                .env("PAYER_KEY", hex::encode(payer.to_bytes()))
                .env("ALLOW_NETWORK", "eip155:31337")
                .env("ALLOW_ASSET", chain.token.to_checksum(None))
                .env("API_KEY", format!("python-{i}"))
                .kill_on_drop(true)
                .output()
        })
        .collect();
    let mut by_kind: std::collections::BTreeMap<&str, Tally> = Default::default();
    let mut python_paid = 0;
    for run in python {
        let out = run.await.expect("the Python agent ran");
        let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        let count = |k: &str| report[k].as_u64().unwrap_or(0) as usize;
        if !out.status.success() || report.is_null() {
            println!(
                "load: a Python agent failed: {}",
                String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("")
            );
        }
        println!(
            "load: python    {:>7} paid calls (official x402 client)  p50 {:>7.2} ms  p99 {:>7.2} ms  paid {:>5} errors {:>4}",
            count("calls"),
            report["p50_ms"].as_f64().unwrap_or(0.0),
            report["p99_ms"].as_f64().unwrap_or(0.0),
            count("paid"),
            count("errors"),
        );
        python_paid += count("paid");
        by_kind.entry("python").or_default().errors += count("errors") + usize::from(report.is_null());
    }
    for w in workers {
        let (kind, t) = w.await.unwrap();
        let e = by_kind.entry(kind).or_default();
        e.latencies_us.extend(t.latencies_us);
        e.ok += t.ok;
        e.errors += t.errors;
        e.refused_429 += t.refused_429;
        e.paid += t.paid;
    }
    let rss_after = resident_mb();
    println!(
        "load: {secs} s on loopback, {PAYERS} paying agents (Rust), {PYTHON_AGENTS} (official Python x402 client), 2 free, 2 challengers, 1 flooder (4 loops)"
    );
    for (kind, t) in by_kind.iter_mut().filter(|(kind, _)| **kind != "python") {
        t.latencies_us.sort_unstable();
        let n = t.latencies_us.len().max(1);
        let p = |q: f64| t.latencies_us.get(((n as f64) * q) as usize).copied().unwrap_or(0) as f64 / 1000.0;
        println!(
            "load: {kind:<9} {:>7} req {:>8.1} req/s  p50 {:>7.2} ms  p99 {:>7.2} ms  ok {:>6} paid {:>5} 429 {:>6} errors {:>4}",
            t.latencies_us.len(),
            t.latencies_us.len() as f64 / secs as f64,
            p(0.50),
            p(0.99),
            t.ok,
            t.paid,
            t.refused_429,
            t.errors
        );
    }
    println!("load: resident memory {rss_before:.1} MB -> {rss_after:.1} MB");

    // Invariants.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let answered_paid = by_kind.get("paid").map_or(0, |t| t.paid) + python_paid;
    let filter = Filter::new()
        .address(chain.token)
        .event_signature(Usdc::AuthorizationUsed::SIGNATURE_HASH)
        .from_block(0);
    let transfers = provider.get_logs(&filter).await.unwrap().len();
    let settled = state.store.receipt_count().await.unwrap() as usize;
    let unresolved = state.store.unresolved(10_000).await.unwrap().len();
    let handler_runs = runs.load(Ordering::SeqCst);
    let payee = Usdc::new(chain.token, &provider).balanceOf(chain.pay_to).call().await.unwrap();
    println!(
        "load: invariants: transfers on chain {transfers} | receipts {settled} | handler runs {handler_runs} | paid answers {answered_paid} | unresolved {unresolved}"
    );
    println!("load: payTo received {payee} atomic = {} × price", payee / U256::from(PRICE));
    // Honest traffic is never refused by the ceiling; the flood is.
    let refused = |kind: &str| by_kind.get(kind).map_or(0, |t| t.refused_429);
    let honest_refused = refused("paid") + refused("free") + refused("challenge");
    println!(
        "load: ceiling refused the flooder {} times, honest callers {honest_refused} times",
        refused("flood")
    );
    let holds = transfers == settled
        && settled == handler_runs
        && handler_runs == answered_paid
        && unresolved == 0
        && payee == U256::from(PRICE * transfers as u64)
        && honest_refused == 0
        && refused("flood") > 0
        && python_paid > 0
        && by_kind.get("python").map_or(0, |t| t.errors) == 0;
    println!("load: invariants {}", if holds { "HOLD" } else { "VIOLATED" });
    chain.anvil.stop().await;
    if !holds {
        std::process::exit(1);
    }
}
