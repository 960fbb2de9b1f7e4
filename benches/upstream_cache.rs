//! The result cache under load (prints figures; not a test): one tollgate on a local anvil
//! chain sells the same upstream read tool twice — once live, once with `cache_ttl_secs` — and
//! the same paying agents call each with arguments drawn from the same small set. Each agent
//! does what an x402 client does: ask (the challenge names the price), sign, pay. Printed: paid
//! calls, upstream calls, cache hits and revenue for both, side by side; then the invariants:
//! transfers on chain = receipts = paid answers, the live upstream saw one call per paid answer,
//! and every cached call was a cache hit or one upstream call.
//!
//! Run: `cargo bench --bench upstream_cache` (optional: CACHE_CALLS per tool, default 400).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use alloy::primitives::U256;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, InitializeResult, ListToolsResult,
    PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData as McpError, RoleServer, ServerHandler};
use serde_json::{Value, json};
use tollgate::client::sign::{SignParams, sign_payment};
use tollgate::clock::{Clock, SystemClock};
use tollgate::config::{Config, UpstreamConfig, UpstreamToolConfig};
use tollgate::money::UsdcAmount;
use tollgate::payment::wire::PaymentRequirements;

const PRICE: u64 = 1000;
const CACHED_PRICE: u64 = 400;
const AGENTS: usize = 8;
/// Distinct argument sets (cities) the agents ask about.
const CITIES: usize = 20;

/// A weather API behind MCP (rmcp's server): `forecast` counts every call it answers.
#[derive(Clone)]
struct WeatherApi(Arc<AtomicUsize>);

impl ServerHandler for WeatherApi {
    fn get_info(&self) -> ServerConfig {
        InitializeResult::new(ServerCapabilities::builder().enable_tools().build())
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        let schema = json!({ "type": "object", "properties": { "city": { "type": "string" } } });
        let schema = Arc::new(schema.as_object().cloned().unwrap_or_default());
        Ok(ListToolsResult::with_all_items(vec![Tool::new("forecast", "tomorrow's weather", schema)]))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let n = self.0.fetch_add(1, Ordering::SeqCst) + 1;
        let city = request.arguments.and_then(|a| a.get("city").cloned()).unwrap_or_default();
        Ok(CallToolResult::success(vec![ContentBlock::text(format!("sunny in {city} (answer #{n})"))]).into())
    }
}

/// Serves a counting weather API on loopback; returns its URL and its call counter.
async fn weather_api() -> (String, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let api = WeatherApi(calls.clone());
    let config = StreamableHttpServerConfig::default().with_legacy_session_mode(true);
    let service =
        StreamableHttpService::new(move || Ok(api.clone()), Arc::new(LocalSessionManager::default()), config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/mcp", listener.local_addr().unwrap());
    let router = axum::Router::new().nest_service("/mcp", service);
    tokio::spawn(async move { axum::serve(listener, router).await });
    (url, calls)
}

fn upstream(name: &str, url: String, cache_ttl_secs: u64) -> UpstreamConfig {
    let mut tools = std::collections::BTreeMap::new();
    if cache_ttl_secs > 0 {
        let cached_price = Some(UsdcAmount::from_atomic(CACHED_PRICE));
        tools.insert("forecast".to_owned(), UpstreamToolConfig { cache_ttl_secs, cached_price });
    }
    UpstreamConfig {
        name: name.to_owned(),
        command: vec![],
        url,
        prefix: format!("{name}_"),
        default_price: UsdcAmount::from_atomic(PRICE),
        prices: Default::default(),
        charge: None,
        free: vec![],
        hidden: vec![],
        max_result_bytes: 1 << 20,
        quota: None,
        max_in_flight: 0,
        throttle_patterns: vec![],
        throttle_pause_secs: 30,
        tools,
    }
}

async fn rpc(http: &reqwest::Client, url: &str, tool: &str, city: &str, meta: Option<Value>) -> Value {
    let mut params = json!({ "name": tool, "arguments": { "city": city } });
    if let Some(meta) = meta {
        params["_meta"] = meta;
    }
    let body = json!({ "jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params });
    let response = http
        .post(url)
        .header("accept", "application/json, text/event-stream")
        .json(&body)
        .send()
        .await
        .expect("tollgate answers");
    response.json::<Value>().await.map(|v| v["result"].clone()).unwrap_or(Value::Null)
}

#[derive(Default)]
struct Phase {
    paid: usize,
    errors: usize,
    cached: usize,
    revenue: u64,
    latencies_us: Vec<u64>,
}

#[tokio::main]
async fn main() {
    let per_tool: usize = std::env::var("CACHE_CALLS").ok().and_then(|s| s.parse().ok()).unwrap_or(400);
    let dir = tempfile::tempdir().unwrap();
    let (live_url, live_calls) = weather_api().await;
    let (cached_url, cached_calls) = weather_api().await;
    let mut config = Config::load(None).unwrap();
    config.receipts.key = "44".repeat(32).into();
    config.limits.rules.clear();
    config.limits.failed_attempts.attempts = 0;
    config.ceiling.burst = 1_000_000;
    config.ceiling.per_second = 1_000_000;
    config.upstream = vec![upstream("live", live_url, 0), upstream("cached", cached_url, 3600)];
    let served = common::serve_counted(config, dir.path(), PRICE).await;
    let payers = served.funded_payers(AGENTS, 1_000_000_000).await;
    let http = reqwest::Client::new();
    let mut phases = Vec::new();
    for tool in ["live_forecast", "cached_forecast"] {
        let started = Instant::now();
        let agents: Vec<_> = payers
            .iter()
            .cloned()
            .enumerate()
            .map(|(agent, payer)| {
                let (http, url) = (http.clone(), served.url.clone());
                tokio::spawn(async move {
                    let mut phase = Phase::default();
                    for n in 0..per_tool / AGENTS {
                        let city = format!("city-{}", (agent * 7 + n * 3) % CITIES);
                        let start = Instant::now();
                        let challenge = rpc(&http, &url, tool, &city, None).await;
                        let accepts = challenge["structuredContent"]["accepts"][0].clone();
                        let Ok(req) = serde_json::from_value::<PaymentRequirements>(accepts) else {
                            phase.errors += 1;
                            continue;
                        };
                        let params = SignParams::standard(SystemClock.now_unix(), req.max_timeout_seconds);
                        let payload = sign_payment(&payer, &req, None, &params).unwrap();
                        let answer =
                            rpc(&http, &url, tool, &city, Some(json!({ "x402/payment": payload }))).await;
                        phase.latencies_us.push(start.elapsed().as_micros() as u64);
                        let body = &answer["_meta"]["tollgate/receipt"]["body"];
                        match body["amount"].as_str().and_then(|a| a.parse::<u64>().ok()) {
                            Some(amount) if answer["isError"] != true => {
                                phase.paid += 1;
                                phase.revenue += amount;
                                phase.cached += usize::from(body["cached"] == true);
                            }
                            _ => phase.errors += 1,
                        }
                    }
                    phase
                })
            })
            .collect();
        let mut total = Phase::default();
        for agent in agents {
            let p = agent.await.unwrap();
            total.paid += p.paid;
            total.errors += p.errors;
            total.cached += p.cached;
            total.revenue += p.revenue;
            total.latencies_us.extend(p.latencies_us);
        }
        phases.push((tool, total, started.elapsed()));
    }
    println!(
        "upstream_cache: {AGENTS} paying agents, {CITIES} distinct cities, challenge + sign + pay per call"
    );
    let upstream_calls = [live_calls.load(Ordering::SeqCst), cached_calls.load(Ordering::SeqCst)];
    for ((tool, phase, took), upstream) in phases.iter_mut().zip(upstream_calls) {
        phase.latencies_us.sort_unstable();
        let n = phase.latencies_us.len().max(1);
        let p50 = phase.latencies_us.get(n / 2).copied().unwrap_or(0) as f64 / 1000.0;
        println!(
            "upstream_cache: {tool:<16} paid {:>5}  upstream calls {upstream:>5} ({:.3} per paid call)  cache hits {:>5}  revenue {:>8} atomic  p50 {p50:>6.2} ms  {:>6.1} paid/s  errors {}",
            phase.paid,
            upstream as f64 / phase.paid.max(1) as f64,
            phase.cached,
            phase.revenue,
            phase.paid as f64 / took.as_secs_f64(),
            phase.errors,
        );
    }
    // Invariants.
    let (live, cached) = (&phases[0].1, &phases[1].1);
    let transfers = served.authorizations_used().await;
    let receipts = served.state.store.receipt_count().await.unwrap() as usize;
    let answered = live.paid + cached.paid;
    let payee = served.payee_balance().await;
    println!(
        "upstream_cache: invariants: transfers {transfers} | receipts {receipts} | paid answers {answered} | payTo {payee} atomic"
    );
    // Nothing else was sold in this run (the built-in `counted` tool never ran).
    let holds = served.runs.load(Ordering::SeqCst) == 0
        && transfers == receipts
        && receipts == answered
        && live.errors + cached.errors == 0
        && upstream_calls[0] == live.paid
        // Every cached call is a hit or one upstream call; concurrent first calls of one city
        // may each miss (there is no request coalescing), so the upstream count is not CITIES.
        && cached.paid == cached.cached + upstream_calls[1]
        && upstream_calls[1] < cached.paid
        && payee == U256::from(live.revenue + cached.revenue);
    println!("upstream_cache: invariants {}", if holds { "HOLD" } else { "VIOLATED" });
    served.chain.anvil.stop().await;
    if !holds {
        std::process::exit(1);
    }
}
