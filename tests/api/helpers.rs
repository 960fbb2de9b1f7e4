//! Test harness: a real anvil chain, a real store, and tollgate on port 0 — per test.

use std::path::PathBuf;
use std::sync::Arc;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use alloy::primitives::{Address, U256};
use alloy::signers::local::PrivateKeySigner;
use rmcp::model::{CallToolResult, JsonObject};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::sync::{OnceCell, oneshot};
use tollgate::app::{App, AppState, Deps};
use tollgate::chain::client::ChainClient;
use tollgate::client::sign::{SignParams, sign_payment};
use tollgate::clock::{Clock, ManualClock, SystemClock};
use tollgate::config::{Config, PriceSetting};
use tollgate::dev::DevChain;
use tollgate::money::UsdcAmount;
use tollgate::payment::wire::PaymentRequirements;
use tollgate::tools::builtin::Builtin;
use tollgate::tools::catalog::ToolHandler;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Installs anvil once per test binary (npm must not run concurrently into one directory).
pub async fn anvil_ready() {
    static READY: OnceCell<PathBuf> = OnceCell::const_new();
    READY
        .get_or_try_init(|| async {
            tollgate::chain::anvil::find_or_install(&repo_root().join(".tollgate")).await
        })
        .await
        .expect("anvil available");
}

/// Postgres for tests: 127.0.0.1:5432, trust auth, database `test`.
pub const PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// A wallet limit: `requests` paid calls per payer per `window_secs`, on every tool.
pub fn wallet_limit(requests: u64, window_secs: u64) -> tollgate::config::LimitRule {
    let axis = tollgate::config::Axis::Wallet;
    tollgate::config::LimitRule { axis, window_secs, requests, spend: None, tool: String::new() }
}

/// A fresh, uniquely named schema name.
pub fn fresh_schema() -> String {
    format!("t_{}", hex::encode(rand::random::<[u8; 8]>()))
}

/// Creates a fresh schema and returns a URL whose sessions use it.
pub async fn fresh_pg_url() -> String {
    let schema = fresh_schema();
    tollgate::store::PgStore::connect_in_schema(PG_URL, &schema, 1).await.expect("postgres reachable");
    format!("{PG_URL}?options=-c%20search_path%3D{schema}")
}

/// Postgres in a fresh schema, reached through a relay the test can cut: the relay, and the
/// database URL that goes through it.
pub async fn pg_behind_relay() -> (Relay, String) {
    let url = fresh_pg_url().await;
    let relay = Relay::start(5432).await;
    let through_relay = url.replacen(":5432/", &format!(":{}/", relay.port), 1);
    (relay, through_relay)
}

pub struct TestApp {
    /// How many times the priced `counted` test tool's handler ran.
    pub runs: Arc<AtomicUsize>,
    pub addr: std::net::SocketAddr,
    /// Where /metrics is served, when `server.metrics_bind` gave it an address of its own.
    pub metrics_addr: Option<std::net::SocketAddr>,
    pub state: Arc<AppState>,
    pub chain: DevChain,
    pub clock: ManualClock,
    pub dir: TempDir,
    stop: Option<oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestApp {
    pub fn mcp_url(&self) -> String {
        format!("http://{}/mcp", self.addr)
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn sessionless(&self) -> Mcp {
        Mcp::sessionless(&self.mcp_url())
    }

    pub fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }

    /// The funded demo payer.
    pub fn payer(&self) -> PrivateKeySigner {
        let key = std::fs::read_to_string(self.dir.path().join("payer.key")).unwrap();
        tollgate::chain::parse_private_key(&key).unwrap()
    }

    pub fn chain(&self) -> ChainClient {
        ChainClient::connect(&self.chain.anvil.endpoint(), self.chain.token).unwrap()
    }

    pub async fn balance(&self, who: Address) -> U256 {
        self.chain().balance_of(who).await.unwrap()
    }

    /// The requirements a client would read from the challenge for `tool`.
    pub async fn requirements(&self, tool: &str, args: Value) -> PaymentRequirements {
        let challenge = self.sessionless().call_tool(tool, args, None).await;
        serde_json::from_value(challenge["structuredContent"]["accepts"][0].clone()).expect("a challenge")
    }

    /// A payload signed by `signer` for the tool's requirements, valid from now.
    pub fn sign(&self, signer: &PrivateKeySigner, requirements: &PaymentRequirements) -> Value {
        let params = SignParams::standard(self.clock.now_unix(), requirements.max_timeout_seconds);
        sign_payment(signer, requirements, None, &params).unwrap()
    }

    /// Calls `tool` paying with `payload` in `_meta["x402/payment"]`.
    pub async fn pay(&self, tool: &str, args: Value, payload: &Value) -> Value {
        let meta = json!({ "x402/payment": payload });
        self.sessionless().call_tool(tool, args, Some(meta)).await
    }

    /// Moves time forward by `secs` for tollgate (its injected clock) and for the chain (the next
    /// block's timestamp): expiry is judged by the chain's clock.
    pub async fn advance_time(&self, secs: u64) {
        self.clock.advance(secs);
        self.anvil_rpc("evm_increaseTime", json!([secs])).await;
        self.anvil_rpc("evm_mine", json!([])).await;
    }

    /// Sends a raw JSON-RPC call to anvil (mining control and the like).
    pub async fn anvil_rpc(&self, method: &str, params: Value) -> Value {
        let body = json!({ "jsonrpc": "2.0", "id": 1, "method": method, "params": params });
        let response =
            reqwest::Client::new().post(self.chain.anvil.endpoint()).json(&body).send().await.unwrap();
        response.json::<Value>().await.unwrap()
    }

    /// Stops serving and waits for graceful shutdown to finish.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(served) = self.served.take() {
            served.await.expect("server task").expect("server ran cleanly");
        }
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// tollgate on port 0 with its own anvil chain and SQLite file; `tweak` edits the config.
pub async fn spawn_app_with(tweak: impl FnOnce(&mut Config)) -> TestApp {
    spawn_app_reading(None, tweak).await
}

/// As [`spawn_app_with`], for a server told its config came from `config_file` (prices reload
/// from it).
pub async fn spawn_app_reading(config_file: Option<PathBuf>, tweak: impl FnOnce(&mut Config)) -> TestApp {
    anvil_ready().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::load(None).expect("default config");
    config.server.bind = "127.0.0.1:0".parse().unwrap();
    config.dev.state_dir = repo_root().join(".tollgate");
    config.database.url = format!("sqlite://{}", dir.path().join("tollgate.db").display()).into();
    let chain = DevChain::start(&config, &dir.path().join("payer.key")).await.expect("dev chain");
    chain.apply(&mut config);
    // Readiness is probed in the background; tests watch it change within a fraction of a second.
    config.server.readiness_refresh_ms = 50;
    let receipt_key = ed25519_dalek::SigningKey::from_bytes(&rand::random::<[u8; 32]>());
    config.receipts.key = hex::encode(receipt_key.to_bytes()).into();
    tweak(&mut config);
    config.validate().expect("test config valid");
    let clock = ManualClock::new(SystemClock.now_unix());
    let runs = Arc::new(AtomicUsize::new(0));
    let server = Server::start_with(config, clock.clone(), runs.clone(), config_file).await;
    let (addr, metrics_addr, state) = (server.addr, server.metrics_addr, server.state.clone());
    TestApp { runs, addr, metrics_addr, state, chain, clock, dir, stop: server.stop, served: server.served }
}

/// A running tollgate without a chain of its own (a sibling replica, or the inside of TestApp).
pub struct Server {
    pub addr: std::net::SocketAddr,
    pub metrics_addr: Option<std::net::SocketAddr>,
    pub state: Arc<AppState>,
    stop: Option<oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Server {
    pub async fn start(config: Config, clock: ManualClock, runs: Arc<AtomicUsize>) -> Server {
        Self::start_with(config, clock, runs, None).await
    }

    pub async fn start_with(
        mut config: Config,
        clock: ManualClock,
        runs: Arc<AtomicUsize>,
        config_file: Option<PathBuf>,
    ) -> Server {
        config.server.bind = "127.0.0.1:0".parse().unwrap();
        let extra_tools = vec![counted_tool(runs.clone()), slow_tool(runs)];
        let deps = Deps { clock: Arc::new(clock), extra_tools, config_file };
        let app = App::build_with(config, deps).await.expect("app builds");
        let (addr, metrics_addr) = (app.local_addr(), app.metrics_addr());
        let state = app.state();
        let (stop, stopped) = oneshot::channel::<()>();
        let served = tokio::spawn(app.run_until(async move {
            let _ = stopped.await;
        }));
        Server { addr, metrics_addr, state, stop: Some(stop), served: Some(served) }
    }

    pub fn mcp_url(&self) -> String {
        format!("http://{}/mcp", self.addr)
    }

    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(served) = self.served.take() {
            served.await.expect("server task").expect("server ran cleanly");
        }
    }
}

impl TestApp {
    /// Restarts the server (same chain, clock and counter) with a new config.
    pub async fn replace_server(&mut self, config: Config) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(served) = self.served.take() {
            served.await.expect("server task").expect("server ran cleanly");
        }
        let server = Server::start(config, self.clock.clone(), self.runs.clone()).await;
        self.addr = server.addr;
        self.metrics_addr = server.metrics_addr;
        self.state = server.state.clone();
        self.stop = server.stop;
        self.served = server.served;
    }

    /// Another replica on the same chain, config and database, sharing the run counter.
    pub async fn sibling(&self) -> Server {
        Server::start(self.state.config.clone(), self.clock.clone(), self.runs.clone()).await
    }
}

/// A minimal MCP Streamable HTTP client speaking raw JSON-RPC, so tests see the exact wire.
#[derive(Clone)]
pub struct Mcp {
    pub http: reqwest::Client,
    pub url: String,
    pub session: Option<String>,
    next_id: Arc<std::sync::atomic::AtomicU64>,
}

impl Mcp {
    pub fn sessionless(url: &str) -> Mcp {
        Mcp { http: reqwest::Client::new(), url: url.to_owned(), session: None, next_id: Arc::new(1.into()) }
    }

    /// A sessionless client whose connections come from another loopback address (another
    /// client IP, as the server sees it).
    pub fn sessionless_from(url: &str, local: std::net::IpAddr) -> Mcp {
        let http = reqwest::Client::builder().local_address(local).build().unwrap();
        Mcp { http, ..Mcp::sessionless(url) }
    }

    /// Performs the 2025-era handshake and keeps the session id the server issues.
    pub async fn with_session(url: &str) -> Mcp {
        let mut mcp = Mcp::sessionless(url);
        let init = json!({
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": { "name": "tollgate-tests", "version": "0" }
        });
        let response = mcp.post(&mcp.envelope("initialize", init)).await;
        let session = response
            .headers()
            .get("mcp-session-id")
            .expect("initialize issues a session id")
            .to_str()
            .unwrap()
            .to_owned();
        let body = read_jsonrpc(response).await;
        assert!(body["result"]["protocolVersion"].is_string(), "initialize failed: {body}");
        mcp.session = Some(session);
        let note = json!({ "jsonrpc": "2.0", "method": "notifications/initialized" });
        let ack = mcp.post(&note).await;
        assert!(ack.status().is_success(), "initialized notification: {}", ack.status());
        mcp
    }

    fn envelope(&self, method: &str, params: Value) -> Value {
        let id = self.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params })
    }

    /// POSTs any body (valid or not) with the headers a Streamable HTTP client sends.
    pub async fn post_bytes(&self, body: Vec<u8>) -> reqwest::Response {
        let mut request = self
            .http
            .post(&self.url)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .body(body);
        if let Some(session) = &self.session {
            request = request.header("mcp-session-id", session).header("mcp-protocol-version", "2025-06-18");
        }
        request.send().await.expect("request sent")
    }

    pub async fn post(&self, body: &Value) -> reqwest::Response {
        self.post_bytes(serde_json::to_vec(body).unwrap()).await
    }

    /// Sends a request and returns the whole JSON-RPC response object.
    pub async fn rpc(&self, method: &str, params: Value) -> Value {
        read_jsonrpc(self.post(&self.envelope(method, params)).await).await
    }

    pub async fn list_tools(&self) -> Vec<Value> {
        let response = self.rpc("tools/list", json!({})).await;
        response["result"]["tools"].as_array().cloned().unwrap_or_else(|| panic!("tools/list: {response}"))
    }

    /// `tools/call`, returning the `result` (panics on a JSON-RPC error).
    pub async fn call_tool(&self, name: &str, args: Value, meta: Option<Value>) -> Value {
        let response = self.call_tool_raw(name, args, meta).await;
        response.get("result").cloned().unwrap_or_else(|| panic!("tools/call {name} failed: {response}"))
    }

    pub async fn call_tool_raw(&self, name: &str, args: Value, meta: Option<Value>) -> Value {
        let mut params = json!({ "name": name, "arguments": args });
        if let Some(meta) = meta {
            params["_meta"] = meta;
        }
        self.rpc("tools/call", params).await
    }
}

/// Reads a JSON-RPC response sent as JSON or as an SSE stream.
pub async fn read_jsonrpc(response: reqwest::Response) -> Value {
    let status = response.status();
    let is_sse = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let text = response.text().await.expect("body");
    if !is_sse {
        return serde_json::from_str(&text).unwrap_or_else(|_| panic!("HTTP {status}, not JSON: {text}"));
    }
    text.lines()
        .filter_map(|line| line.strip_prefix("data:"))
        .filter_map(|data| serde_json::from_str::<Value>(data.trim()).ok())
        .find(|message| message.get("id").is_some())
        .unwrap_or_else(|| panic!("HTTP {status}: no JSON-RPC response in SSE stream: {text}"))
}

/// Price of the `counted` test tool.
pub const COUNTED_PRICE: u64 = 1234;

/// A priced tool that counts its runs: "the handler ran once" is observable.
fn counted_tool(runs: Arc<AtomicUsize>) -> (Builtin, PriceSetting) {
    struct Counted(Arc<AtomicUsize>);
    #[async_trait::async_trait]
    impl ToolHandler for Counted {
        async fn call(&self, args: JsonObject) -> CallToolResult {
            let n = self.0.fetch_add(1, Ordering::SeqCst) + 1;
            CallToolResult::structured(json!({ "run": n, "echo": args.get("text") }))
        }
    }
    let tool = Builtin {
        name: "counted",
        description: "Counts its runs (tests only).",
        input_schema: json!({ "type": "object", "properties": { "text": { "type": "string" } } }),
        handler: Arc::new(Counted(runs)),
    };
    (tool, PriceSetting::Fixed(UsdcAmount::from_atomic(COUNTED_PRICE)))
}

/// A priced tool that counts its run at once, then sleeps `secs` seconds (real time: it stands
/// for a slow upstream API, which no injected clock can speed up).
fn slow_tool(runs: Arc<AtomicUsize>) -> (Builtin, PriceSetting) {
    struct Slow(Arc<AtomicUsize>);
    #[async_trait::async_trait]
    impl ToolHandler for Slow {
        async fn call(&self, args: JsonObject) -> CallToolResult {
            let n = self.0.fetch_add(1, Ordering::SeqCst) + 1;
            let secs = args.get("secs").and_then(Value::as_u64).unwrap_or(0);
            tokio::time::sleep(Duration::from_secs(secs)).await;
            CallToolResult::structured(json!({ "run": n, "slept": secs }))
        }
    }
    let tool = Builtin {
        name: "slow",
        description: "Sleeps, then answers (tests only).",
        input_schema: json!({ "type": "object", "properties": { "secs": { "type": "integer" } } }),
        handler: Arc::new(Slow(runs)),
    };
    (tool, PriceSetting::Fixed(UsdcAmount::from_atomic(COUNTED_PRICE)))
}

/// A TCP relay to a local port that a test can cut and restore: the service behind it
/// "stops" and "returns" for tollgate while it keeps running for everyone else.
pub struct Relay {
    pub port: u16,
    pub up: Arc<AtomicBool>,
    /// Connections relayed now: 0 once a cut has closed every one of them.
    pub live: Arc<AtomicUsize>,
}

impl Relay {
    pub async fn start(target: u16) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let live = Arc::new(AtomicUsize::new(0));
        let (flag, count) = (up.clone(), live.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else { return };
                let (flag, count) = (flag.clone(), count.clone());
                tokio::spawn(async move {
                    if !flag.load(Ordering::SeqCst) {
                        return; // refused: dropped at once
                    }
                    count.fetch_add(1, Ordering::SeqCst);
                    let Ok(mut server) = TcpStream::connect(("127.0.0.1", target)).await else {
                        count.fetch_sub(1, Ordering::SeqCst);
                        return;
                    };
                    // Relay until either side closes or the relay is cut.
                    let relay = tokio::io::copy_bidirectional(&mut client, &mut server);
                    let cut = async {
                        while flag.load(Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    };
                    tokio::select! { _ = relay => {}, () = cut => {} }
                    count.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Relay { port, up, live }
    }
}

/// Spends a signed payment's authorization directly on chain, outside tollgate (as a
/// facilitator or a third party would), with anvil's dev account #3; returns the tx hash.
pub async fn submit_on_chain(rpc: &str, asset: Address, payload: &Value) -> String {
    let a = &payload["payload"]["authorization"];
    let signature: alloy::primitives::Bytes =
        payload["payload"]["signature"].as_str().unwrap().parse().unwrap();
    let key = tollgate::chain::parse_private_key(tollgate::chain::anvil::DEV_KEYS[3]).unwrap();
    let provider = alloy::providers::ProviderBuilder::new()
        .wallet(alloy::network::EthereumWallet::from(key))
        .connect_http(rpc.parse().unwrap());
    let num = |k: &str| U256::from_str_radix(a[k].as_str().unwrap(), 10).unwrap();
    let receipt = tollgate::chain::usdc::TestUsdc::new(asset, &provider)
        .transferWithAuthorization_0(
            a["from"].as_str().unwrap().parse().unwrap(),
            a["to"].as_str().unwrap().parse().unwrap(),
            num("value"),
            num("validAfter"),
            num("validBefore"),
            a["nonce"].as_str().unwrap().parse().unwrap(),
            signature,
        )
        .send()
        .await
        .unwrap()
        .get_receipt()
        .await
        .unwrap();
    format!("{:#x}", receipt.transaction_hash)
}

/// Serves `router` on a fresh loopback port (a fake peer in a test); returns its base URL.
pub async fn serve_on_loopback(router: axum::Router) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    url
}

/// Polls `/readyz` (probed in the background) until it answers `status`; returns the last
/// status and body.
pub async fn readyz_until(base_url: &str, status: u16) -> (u16, Value) {
    let mut last = (0, Value::Null);
    for _ in 0..100 {
        let response = reqwest::get(format!("{base_url}/readyz")).await.unwrap();
        last = (response.status().as_u16(), response.json().await.unwrap_or(Value::Null));
        if last.0 == status {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    last
}

/// Waits (bounded) until something listens on a loopback port.
pub async fn wait_listening(port: u16) {
    let up = async {
        while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), up).await.expect("the server listens");
}

/// A JSON-RPC proxy in front of a node that counts the calls it forwards (each item of a batch).
#[derive(Clone)]
pub struct CountingRpc {
    pub url: String,
    node: String,
    calls: Arc<AtomicUsize>,
}

impl CountingRpc {
    pub async fn start(node: &str) -> CountingRpc {
        let mut rpc = CountingRpc { url: String::new(), node: node.to_owned(), calls: Default::default() };
        let router = axum::Router::new().fallback(count_and_forward).with_state(rpc.clone());
        rpc.url = serve_on_loopback(router).await;
        rpc
    }

    pub fn calls(&self) -> usize {
        self.calls.load(std::sync::atomic::Ordering::SeqCst)
    }
}

async fn count_and_forward(
    axum::extract::State(rpc): axum::extract::State<CountingRpc>,
    body: axum::body::Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let calls = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Array(batch)) => batch.len(),
        _ => 1,
    };
    rpc.calls.fetch_add(calls, std::sync::atomic::Ordering::SeqCst);
    let answer = reqwest::Client::new()
        .post(&rpc.node)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await;
    match answer {
        Ok(answer) => {
            ([("content-type", "application/json")], answer.bytes().await.unwrap_or_default()).into_response()
        }
        Err(_) => axum::http::StatusCode::BAD_GATEWAY.into_response(),
    }
}
