//! `kill -9` of tollgate in the middle of a settlement, or of writing a receipt, loses nothing:
//! after a restart the call is finished, the same payment collects its result, the money moved
//! exactly once, and the payer's audit passes.

use std::process::Stdio;
use std::time::Duration;

use alloy::primitives::U256;
use serde_json::json;
use tokio::process::{Child, Command};
use tollgate::chain::anvil::DEV_KEYS;
use tollgate::store::{PaymentState, SqliteStore, Store};

use tollgate::audit::{AuditRequest, audit};

use crate::helpers::{Mcp, TestApp, fresh_pg_url, spawn_app, wait_listening};

/// `tollgate serve` as a separate process on `port`, on the test app's chain, with its own DB.
fn serve(app: &TestApp, port: u16, db: &std::path::Path) -> Child {
    serve_on(app, port, &format!("sqlite://{}", db.display()), &[])
}

fn serve_on(app: &TestApp, port: u16, database: &str, env: &[(&str, &str)]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("serve")
        .env("TOLLGATE_RECEIPTS__CHECKPOINT_INTERVAL_SECS", "1")
        .envs(env.iter().copied())
        .env("TOLLGATE_SERVER__BIND", format!("127.0.0.1:{port}"))
        .env("TOLLGATE_NETWORK__RPC_URL", app.chain.anvil.endpoint())
        .env("TOLLGATE_NETWORK__ASSET", app.chain.token.to_checksum(None))
        .env("TOLLGATE_PAYMENT__PAY_TO", app.chain.pay_to.to_checksum(None))
        .env("TOLLGATE_PAYMENT__RELAYER_KEY", DEV_KEYS[1])
        .env("TOLLGATE_DATABASE__URL", database)
        .env("TOLLGATE_RECEIPTS__KEY", "11".repeat(32))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

#[tokio::test]
async fn kill_9_during_settlement_then_restart_resolves_the_payment_and_charges_once() {
    // Arrange: a server process, and a chain that holds the settlement in its mempool.
    let app = spawn_app().await;
    let payer = app.payer();
    let before = app.balance(payer.address()).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let db = app.dir.path().join("victim.db");
    let mut victim = serve(&app, port, &db);
    wait_listening(port).await;
    let url = format!("http://127.0.0.1:{port}/mcp");
    let mcp = Mcp::sessionless(&url);
    let challenge = mcp.call_tool("sha256", json!({ "text": "x" }), None).await;
    let requirements = serde_json::from_value(challenge["structuredContent"]["accepts"][0].clone()).unwrap();
    let payload = app.sign(&payer, &requirements);
    let meta = json!({ "x402/payment": payload });
    app.anvil_rpc("evm_setAutomine", json!([false])).await;
    let in_flight = tokio::spawn({
        let (mcp, meta) = (mcp.clone(), meta.clone());
        async move { mcp.call_tool_raw("sha256", json!({ "text": "x" }), Some(meta)).await }
    });
    // Act 1: kill -9 once the transaction is out and recorded.
    let store = SqliteStore::connect(&format!("sqlite://{}", db.display()), 1).await.unwrap();
    let settling = async {
        loop {
            let rows = store.unresolved(10).await.unwrap();
            if let Some(row) = rows.iter().find(|r| r.state == PaymentState::Settling && r.tx_hash.is_some())
            {
                return row.clone();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let row = tokio::time::timeout(Duration::from_secs(30), settling).await.expect("settlement starts");
    victim.start_kill().unwrap();
    victim.wait().await.unwrap();
    in_flight.abort();
    // Act 2: the block arrives while tollgate is down; then tollgate restarts.
    app.anvil_rpc("evm_mine", json!([])).await;
    let _restarted = serve(&app, port, &db);
    wait_listening(port).await;
    let retry = mcp.call_tool("sha256", json!({ "text": "x" }), Some(meta)).await;
    // Assert: the result, for the transaction sent before the crash; charged exactly once.
    assert_eq!(retry["isError"], false, "{retry}");
    let response = &retry["_meta"]["x402/payment-response"];
    assert_eq!(response["transaction"], format!("{:#x}", row.tx_hash.unwrap()));
    let digest = retry["structuredContent"]["sha256"].as_str().unwrap();
    assert_eq!(digest, "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881");
    assert_eq!(before - app.balance(payer.address()).await, U256::from(1000));
    let stored = store.payment(row.id).await.unwrap().unwrap();
    assert_eq!(stored.state, PaymentState::Settled);
    assert!(stored.result_json.is_some(), "the result is stored for later replays");
    assert_audit_passes(&app, &format!("http://127.0.0.1:{port}")).await;
    app.shutdown().await;
}

#[tokio::test]
async fn kill_9_while_writing_the_receipt_then_restart_finishes_the_call_and_the_audit_passes() {
    // Arrange: a server process on Postgres (a short request timeout, so a dead request's
    // handler lease expires soon),
    // and the receipts table locked, so the server will stop inside its receipt transaction.
    let app = spawn_app().await;
    let payer = app.payer();
    let before = app.balance(payer.address()).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let database = fresh_pg_url().await;
    let env = [
        ("TOLLGATE_SERVER__REQUEST_TIMEOUT_SECS", "4"),
        ("TOLLGATE_PAYMENT__SETTLE_TIMEOUT_SECS", "3"),
        ("TOLLGATE_TOOLS__TIMEOUT_SECS", "3"),
    ];
    let mut victim = serve_on(&app, port, &database, &env);
    wait_listening(port).await;
    let url = format!("http://127.0.0.1:{port}");
    let mcp = Mcp::sessionless(&format!("{url}/mcp"));
    let challenge = mcp.call_tool("sha256", json!({ "text": "x" }), None).await;
    let requirements = serde_json::from_value(challenge["structuredContent"]["accepts"][0].clone()).unwrap();
    let meta = json!({ "x402/payment": app.sign(&payer, &requirements) });
    let pool = sqlx::PgPool::connect(&database).await.unwrap();
    let mut lock = pool.begin().await.unwrap();
    sqlx::query("lock table receipts in exclusive mode").execute(&mut *lock).await.unwrap();
    let in_flight = tokio::spawn({
        let (mcp, meta) = (mcp.clone(), meta.clone());
        async move { mcp.call_tool_raw("sha256", json!({ "text": "x" }), Some(meta)).await }
    });
    // Act 1: kill -9 once the call is settled, its handler has run, and its receipt insert waits.
    let waiting_on_receipts = "select count(*) from pg_locks l join pg_class c on c.oid = l.relation \
                               where c.relname = 'receipts' and not l.granted";
    let stuck = async {
        loop {
            let (waiting,): (i64,) = sqlx::query_as(waiting_on_receipts).fetch_one(&pool).await.unwrap();
            if waiting > 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), stuck).await.expect("the receipt write starts");
    victim.start_kill().unwrap();
    victim.wait().await.unwrap();
    in_flight.abort();
    lock.rollback().await.unwrap();
    let store = tollgate::store::PgStore::connect(&database, 1).await.unwrap();
    assert_eq!(store.receipt_count().await.unwrap(), 0, "killed before the receipt was committed");
    // Act 2: restart; nobody retries.
    let _restarted = serve_on(&app, port, &database, &env);
    wait_listening(port).await;
    let finished = async {
        while store.receipt_count().await.unwrap() == 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), finished).await.expect("the server finishes the call");
    // Assert: charged once, one receipt, and the client's retry collects the stored result.
    assert_eq!(before - app.balance(payer.address()).await, U256::from(1000));
    assert_eq!(store.receipt_count().await.unwrap(), 1);
    let retry = mcp.call_tool("sha256", json!({ "text": "x" }), Some(meta)).await;
    assert_eq!(retry["isError"], false, "{retry}");
    let digest = retry["structuredContent"]["sha256"].as_str().unwrap();
    assert_eq!(digest, "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881");
    let receipt = &retry["_meta"]["tollgate/receipt"];
    assert_eq!(receipt["body"]["tx"], retry["_meta"]["x402/payment-response"]["transaction"], "{retry}");
    assert_audit_passes(&app, &url).await;
    app.shutdown().await;
}

/// The payer's audit of `server` — every receipt signed and logged, one per transfer on chain —
/// passes once the log's next checkpoint covers the receipts (the server checkpoints each second).
async fn assert_audit_passes(app: &TestApp, server: &str) {
    let (payer, rpc) = (app.payer(), app.chain.anvil.endpoint());
    let state_file = app.dir.path().join("audit.json");
    let request = AuditRequest { wallet: &payer, server, rpc: &rpc, state_file };
    let mut report = audit(&request).await.unwrap();
    for _ in 0..50 {
        if report.ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        report = audit(&request).await.unwrap();
    }
    assert!(report.ok(), "{}", tollgate::audit::render(&report));
}
