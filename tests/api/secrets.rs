//! Secrets never leave the process: a hosted RPC URL's API key appears in no log line, no
//! readiness answer and no MCP answer, whatever fails.

use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};
use tollgate::chain::anvil::DEV_KEYS;

use crate::helpers::{Mcp, wait_listening};

/// `tollgate [--config FILE] serve` on a free port with a complete config from the environment
/// (a SQLite file in `dir`) and debug logs, its RPC URL given by the caller, output piped;
/// returns it once it listens, with its base URL.
async fn start_serving(
    dir: &std::path::Path,
    rpc_url: &str,
    config: Option<&std::path::Path>,
) -> (Child, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut command = Command::new(env!("CARGO_BIN_EXE_tollgate"));
    if let Some(config) = config {
        command.arg("--config").arg(config);
    }
    command
        .arg("serve")
        .env("TOLLGATE_SERVER__BIND", format!("127.0.0.1:{port}"))
        .env("TOLLGATE_NETWORK__RPC_URL", rpc_url)
        .env("TOLLGATE_NETWORK__ASSET", "0x5FbDB2315678afecb367f032d93F642f64180aa3")
        .env("TOLLGATE_PAYMENT__PAY_TO", "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC")
        .env("TOLLGATE_PAYMENT__RELAYER_KEY", DEV_KEYS[1])
        .env("TOLLGATE_RECEIPTS__KEY", "11".repeat(32))
        .env("TOLLGATE_DATABASE__URL", format!("sqlite://{}", dir.join("t.db").display()))
        .env("RUST_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let server = command.spawn().unwrap();
    wait_listening(port).await;
    (server, format!("http://127.0.0.1:{port}"))
}

/// Stops a server from `start_serving`; returns everything it printed.
async fn stop_collecting(mut server: Child) -> String {
    server.start_kill().unwrap();
    let mut output = String::new();
    server.stdout.take().unwrap().read_to_string(&mut output).await.unwrap();
    server.stderr.take().unwrap().read_to_string(&mut output).await.unwrap();
    output
}

#[tokio::test]
async fn credentials_in_an_rpc_url_never_reach_logs_readiness_or_answers() {
    // Arrange: `tollgate serve` whose RPC URL carries keys in its path and query, and is down.
    let dir = tempfile::tempdir().unwrap();
    let (server, base) = start_serving(dir.path(), "http://127.0.0.1:1/v2/SECRETKEY?key=SECRET2", None).await;
    // Act: readiness, and a paid call that needs the chain.
    let ready = reqwest::get(format!("{base}/readyz")).await.unwrap().text().await.unwrap();
    let mcp = Mcp::sessionless(&format!("{base}/mcp"));
    let challenge = mcp.call_tool("sha256", json!({ "text": "x" }), None).await;
    let requirements = serde_json::from_value(challenge["structuredContent"]["accepts"][0].clone()).unwrap();
    let payer = alloy::signers::local::PrivateKeySigner::random();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let params = tollgate::client::sign::SignParams::standard(now, 300);
    let payload = tollgate::client::sign::sign_payment(&payer, &requirements, None, &params).unwrap();
    let paid =
        mcp.call_tool("sha256", json!({ "text": "x" }), Some(json!({ "x402/payment": payload }))).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let logs = stop_collecting(server).await;
    // Assert: the failures are reported (so the test saw them), the secrets nowhere.
    let ready: Value = serde_json::from_str(&ready).unwrap();
    assert_eq!(ready["ready"], false, "{ready}");
    assert_eq!(paid["structuredContent"]["error"], "chain_unavailable", "{paid}");
    assert!(logs.contains("chain unavailable"), "the failure is logged: {logs}");
    for (place, text) in [("readyz", ready.to_string()), ("answer", paid.to_string()), ("logs", logs)] {
        for secret in ["SECRETKEY", "SECRET2"] {
            assert!(!text.contains(secret), "{secret} leaked into {place}: {text}");
        }
    }
}

#[tokio::test]
async fn credentials_in_an_upstream_url_never_reach_the_output() {
    // Arrange: an upstream that is down, reached through a URL with a key in its query.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("up.toml");
    std::fs::write(
        &config,
        "[[upstream]]\nname = \"keyed\"\nurl = \"http://127.0.0.1:1/mcp?key=UPSECRET\"\n",
    )
    .unwrap();
    // Act: the server starts without the upstream and reports it, retrying in the background
    // (each retry may log again); everything it printed for a while is collected.
    let (server, _) = start_serving(dir.path(), "http://127.0.0.1:1/", Some(&config)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let text = stop_collecting(server).await;
    // Assert
    assert!(text.contains("keyed"), "the failing upstream is named: {text}");
    assert!(!text.contains("UPSECRET"), "the upstream's key leaked: {text}");
}
