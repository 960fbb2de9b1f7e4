//! Benchmark for the ceiling and wallet limits (prints figures; not a test).
//!
//! 1. Ceiling refusals per second against a bare axum handler returning a constant, through the
//!    same in-process tower stack, in the same run: the ratio is the figure that matters.
//! 2. Memory per tracked ceiling key (resident set growth over 100,000 keys).
//! 3. Redis-backed wallet-limit check latency (three buckets, one Lua round trip), p50/p99.
//!
//! Run: `cargo bench --bench limits` (Redis at 127.0.0.1:6379 for part 3).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::Request;
use axum::routing::post;
use tollgate::ceiling::guard::Guarded;
use tollgate::ceiling::{Ceiling, ClientKey};
use tollgate::config::CeilingConfig;
use tollgate::limits::gcra::{Charge, Rate};
use tollgate::limits::redis::RedisBuckets;
use tower::{Service, ServiceExt};

const REQUESTS: usize = 200_000;

fn ceiling(burst: u32, max_keys: usize) -> Arc<Ceiling> {
    let config = CeilingConfig {
        burst,
        per_second: 1,
        max_tracked_keys: max_keys,
        api_key_header: String::new(),
        api_keys_sha256: vec![],
        api_key_tiers: Default::default(),
        max_sessions_per_client: 16,
        public_burst: 60,
        public_per_second: 10,
        trusted_proxies: vec![],
        shared: false,
    };
    Arc::new(Ceiling::from_config(&config, None))
}

fn request() -> Request<Body> {
    Request::post("/mcp").header("mcp-session-id", "flooder").body(Body::empty()).unwrap()
}

/// Requests per second through `service`, sequentially, in one round.
async fn rps<S>(service: &S) -> f64
where
    S: Service<Request<Body>, Response = axum::response::Response, Error = Infallible> + Clone,
{
    let start = Instant::now();
    for _ in 0..REQUESTS {
        let response = service.clone().oneshot(request()).await.unwrap();
        std::hint::black_box(response.status());
    }
    REQUESTS as f64 / start.elapsed().as_secs_f64()
}

fn resident_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    statm.split_whitespace().nth(1).and_then(|p| p.parse::<usize>().ok()).unwrap_or(0) * 4096
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    // 1. Refusal path vs a bare handler: the same router, once served as it is and once behind
    //    the ceiling exactly as `tollgate serve` puts it (one `Guard` per connection). Rounds
    //    alternate so that both see the same machine; the best round of each counts.
    let bare = Router::new().route("/mcp", post(|| async { "constant" }));
    let guard = ceiling(1, 1000);
    // The flood as it comes: a session id the server never issued, so the request counts
    // against its IP (a lookup in the live-session set first). Exhaust that bucket.
    let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
    guard.check(&ClientKey::Ip(peer.ip())).await.unwrap();
    let refusing = Guarded::new(bare.clone(), guard).for_peer(peer);
    let status = refusing.clone().oneshot(request()).await.unwrap().status();
    assert_eq!(status, 429, "the benchmark must measure refusals");
    let (mut bare_rps, mut refusal_rps) = (0f64, 0f64);
    for _ in 0..5 {
        bare_rps = bare_rps.max(rps(&bare).await);
        refusal_rps = refusal_rps.max(rps(&refusing).await);
    }
    println!("ceiling: bare handler        {bare_rps:>12.0} req/s");
    println!("ceiling: refusal path        {refusal_rps:>12.0} req/s");
    println!("ceiling: refusal / bare      {:>12.2}x (goal >= 0.9x)", refusal_rps / bare_rps);

    // 2. Memory per tracked key.
    let keys = 100_000usize;
    let table = ceiling(120, keys * 2);
    let before = resident_bytes();
    for i in 0..keys {
        let _ = table.check(&ClientKey::Session(format!("session-{i:032}"))).await;
    }
    let grown = resident_bytes().saturating_sub(before);
    println!("ceiling: tracked keys        {:>12}", table.tracked_keys());
    println!("ceiling: memory per key      {:>12.0} bytes (RSS growth / keys)", grown as f64 / keys as f64);

    // 3. Redis-backed wallet-limit checks.
    let redis = match RedisBuckets::connect("redis://127.0.0.1:6379", &format!("bench{}", std::process::id()))
        .await
    {
        Ok(r) => r,
        Err(e) => {
            println!("redis: unavailable ({e}); skipped latency figures");
            return;
        }
    };
    let rate = Rate { limit: 1_000_000_000, window_us: 60_000_000 };
    let mut latencies = Vec::with_capacity(5000);
    for i in 0..5000u64 {
        let charges: Vec<Charge> = ["wallet", "tool", "wallet_tool"]
            .iter()
            .map(|axis| Charge { key: format!("{axis}:{}", i % 50), rate, cost: 1 })
            .collect();
        let start = Instant::now();
        redis.check(&charges, 1_700_000_000_000_000 + i * 1000).await.unwrap();
        latencies.push(start.elapsed());
    }
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!("redis: check (3 buckets) p50 {:>10.0} µs", us(pct(0.50)));
    println!("redis: check (3 buckets) p99 {:>10.0} µs", us(pct(0.99)));
}
