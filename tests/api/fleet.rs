//! Three `tollgate serve` processes sharing Postgres and Redis on loopback, selling an upstream
//! MCP server's tool: one authorization runs once fleet-wide, wallet limits are combined, and a
//! replica killed mid-settlement loses nothing.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use alloy::primitives::U256;
use alloy::signers::local::PrivateKeySigner;
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use tollgate::chain::anvil::DEV_KEYS;
use tollgate::store::{PaymentState, PgStore, Store};

use crate::helpers::{Mcp, PG_URL, TestApp, fresh_schema, repo_root, spawn_app, wait_listening};

const PRICE: u64 = 1500;

struct Fleet {
    replicas: Vec<(u16, Child)>,
    config: PathBuf,
    store: PgStore,
    calls: PathBuf,
}

impl Fleet {
    /// Writes one config for all replicas and starts them; each gets its own relayer key.
    async fn start(app: &TestApp, dir: &Path) -> Fleet {
        let schema = fresh_schema();
        let store = PgStore::connect_in_schema(PG_URL, &schema, 2).await.unwrap();
        let calls = dir.join("upstream-calls");
        let python = crate::interop::python().await;
        let script = repo_root().join("tests/interop/upstream_server.py");
        let config = dir.join("fleet.toml");
        let toml = format!(
            r#"
[server]
server_id = "fleet-test"
[network]
rpc_url = "{rpc}"
asset = "{asset}"
[payment]
pay_to = "{pay_to}"
[database]
url = "{PG_URL}?options=-c%20search_path%3D{schema}"
[receipts]
key = "{receipt_key}"
[ceiling]
shared = true
[limits]
backend = "redis"
key_prefix = "{schema}"
[[limits.rules]]
axis = "wallet"
window_secs = 3600
requests = 30
[[upstream]]
name = "py"
command = ["{python}", "{script}", "stdio", "0", "{calls}"]
default_price = "{PRICE}"
"#,
            rpc = app.chain.anvil.endpoint(),
            asset = app.chain.token,
            pay_to = app.chain.pay_to,
            receipt_key = "22".repeat(32),
            python = python.display(),
            script = script.display(),
            calls = calls.display(),
        );
        std::fs::write(&config, toml).unwrap();
        let mut fleet = Fleet { replicas: Vec::new(), config, store, calls };
        // Three distinct free ports: each listener stays open until all three are chosen (a
        // port freed at once can be handed out again, and two replicas on one port is one).
        let held: Vec<_> = (0..3).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
        let ports: Vec<u16> = held.iter().map(|l| l.local_addr().unwrap().port()).collect();
        drop(held);
        for (port, relayer) in ports.into_iter().zip([DEV_KEYS[1], DEV_KEYS[4], DEV_KEYS[5]]) {
            let child = fleet.spawn(port, relayer);
            fleet.replicas.push((port, child));
        }
        for (port, _) in &fleet.replicas {
            wait_listening(*port).await;
        }
        fleet
    }

    fn spawn(&self, port: u16, relayer: &str) -> Child {
        Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["--config", self.config.to_str().unwrap(), "serve"])
            .env("TOLLGATE_SERVER__BIND", format!("127.0.0.1:{port}"))
            .env("TOLLGATE_PAYMENT__RELAYER_KEY", relayer)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    }

    fn url(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}/mcp", self.replicas[i].0)
    }

    fn upstream_calls(&self) -> usize {
        std::fs::read_to_string(&self.calls).unwrap_or_default().lines().count()
    }
}

async fn signed(app: &TestApp, url: &str) -> Value {
    signed_by(app, &app.payer(), url).await
}

async fn signed_by(app: &TestApp, payer: &PrivateKeySigner, url: &str) -> Value {
    let challenge = Mcp::sessionless(url).call_tool("reverse", json!({ "text": "fleet" }), None).await;
    let requirements = serde_json::from_value(challenge["structuredContent"]["accepts"][0].clone()).unwrap();
    json!({ "x402/payment": app.sign(payer, &requirements) })
}

/// Mints test USDC to `who` (the deployer, anvil account #0, may mint).
async fn fund(app: &TestApp, who: alloy::primitives::Address, amount: u64) {
    let minter = tollgate::chain::parse_private_key(DEV_KEYS[0]).unwrap();
    let provider = alloy::providers::ProviderBuilder::new()
        .wallet(alloy::network::EthereumWallet::from(minter))
        .connect_http(app.chain.anvil.endpoint().parse().unwrap());
    tollgate::chain::usdc::mint(&provider, app.chain.token, who, U256::from(amount)).await.unwrap();
}

#[tokio::test]
async fn a_fleet_of_three_runs_each_authorization_once_shares_limits_and_survives_a_killed_replica() {
    // Arrange: a chain with a funded payer, and three replicas on one Postgres and one Redis.
    let app = spawn_app().await;
    let dir = tempfile::tempdir().unwrap();
    let mut fleet = Fleet::start(&app, dir.path()).await;
    let payer = app.payer().address();
    let before = app.balance(payer).await;

    // 1. The same authorization sent to all three at once: one upstream call, one transfer.
    let meta = signed(&app, &fleet.url(0)).await;
    let storm: Vec<_> = (0..24)
        .map(|i| {
            let (mcp, meta) = (Mcp::sessionless(&fleet.url(i % 3)), meta.clone());
            tokio::spawn(
                async move { mcp.call_tool("reverse", json!({ "text": "fleet" }), Some(meta)).await },
            )
        })
        .collect();
    let mut served = 0;
    for call in storm {
        let result = call.await.unwrap();
        if result["isError"] == false {
            served += 1;
            assert!(result["content"][0]["text"].as_str().unwrap().contains("teelf"), "{result}");
        } else {
            assert_eq!(result["structuredContent"]["error"], "payment_in_progress", "{result}");
        }
    }
    assert!(served >= 1);
    assert_eq!(fleet.upstream_calls(), 1, "exactly one upstream call");
    assert_eq!(before - app.balance(payer).await, U256::from(PRICE), "exactly one transfer");

    // 2. A burst spread over the three respects one combined limit: 30 per minute per wallet.
    //    (A fresh wallet: the storm's replays of a held payment spend no limit, but the copies
    //    that raced ahead of its claim did, and how many did depends on timing.)
    let burst = PrivateKeySigner::random();
    fund(&app, burst.address(), 100_000).await;
    let mut outcomes = Vec::new();
    for i in 0..32 {
        let meta = signed_by(&app, &burst, &fleet.url(i % 3)).await;
        let mcp = Mcp::sessionless(&fleet.url(i % 3));
        outcomes.push(mcp.call_tool("reverse", json!({ "text": "fleet" }), Some(meta)).await);
    }
    let limited = outcomes.iter().filter(|r| r["structuredContent"]["error"] == "rate_limited").count();
    assert_eq!(limited, 2, "30 pass fleet-wide, then the wallet is limited: {outcomes:?}");

    // 3. A replica killed mid-settlement: another one resolves the payment. (A fresh payer, so
    //    its balance shows exactly one charge.)
    let second = PrivateKeySigner::random();
    fund(&app, second.address(), 10_000).await;
    let challenge =
        Mcp::sessionless(&fleet.url(0)).call_tool("reverse", json!({ "text": "crash" }), None).await;
    let requirements = serde_json::from_value(challenge["structuredContent"]["accepts"][0].clone()).unwrap();
    let meta = json!({ "x402/payment": app.sign(&second, &requirements) });
    let calls_before = fleet.upstream_calls();
    app.anvil_rpc("evm_setAutomine", json!([false])).await;
    let in_flight = tokio::spawn({
        let (mcp, meta) = (Mcp::sessionless(&fleet.url(0)), meta.clone());
        async move { mcp.call_tool_raw("reverse", json!({ "text": "crash" }), Some(meta)).await }
    });
    let settling = async {
        loop {
            let rows = fleet.store.unresolved(10).await.unwrap();
            if let Some(row) =
                rows.into_iter().find(|r| r.state == PaymentState::Settling && r.tx_hash.is_some())
            {
                return row;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let row = tokio::time::timeout(Duration::from_secs(30), settling).await.expect("replica 0 is settling");
    // The hash is recorded just before the broadcast: kill only once the node has the
    // transaction, or the kill may land between the two (then nothing was sent, and the payment
    // is rightly pending until it expires, uncharged: not what this step checks).
    let tx = format!("{:#x}", row.tx_hash.unwrap());
    let broadcast = async {
        while app.anvil_rpc("eth_getTransactionByHash", json!([tx])).await["result"].is_null() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), broadcast).await.expect("replica 0 broadcast it");
    let (_, mut victim) = fleet.replicas.remove(0);
    victim.start_kill().unwrap();
    victim.wait().await.unwrap();
    in_flight.abort();
    app.anvil_rpc("evm_setAutomine", json!([true])).await;
    let retry =
        Mcp::sessionless(&fleet.url(0)).call_tool("reverse", json!({ "text": "crash" }), Some(meta)).await;
    assert_eq!(retry["isError"], false, "another replica served the paid result: {retry}");
    assert_eq!(
        retry["_meta"]["x402/payment-response"]["transaction"],
        format!("{:#x}", row.tx_hash.unwrap())
    );
    assert_eq!(app.balance(second.address()).await, U256::from(10_000 - PRICE), "charged exactly once");
    assert_eq!(fleet.upstream_calls(), calls_before + 1, "the upstream ran once for it");
    assert_eq!(fleet.store.payment(row.id).await.unwrap().unwrap().state, PaymentState::Settled);
    app.shutdown().await;
}
