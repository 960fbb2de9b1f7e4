//! Selling an existing MCP server's tools: stdio and HTTP upstreams (built with the official
//! MCP Python SDK) behind the full payment pipeline.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use alloy::primitives::U256;
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use tollgate::config::{Config, UpstreamConfig};
use tollgate::money::UsdcAmount;

use crate::helpers::{TestApp, repo_root, spawn_app_with};

pub(crate) const PRICE: u64 = 1500;

pub(crate) async fn python() -> PathBuf {
    crate::interop::python().await
}

pub(crate) fn script() -> String {
    repo_root().join("tests/interop/upstream_server.py").display().to_string()
}

pub(crate) fn calls(file: &Path) -> Vec<String> {
    std::fs::read_to_string(file).unwrap_or_default().lines().map(str::to_owned).collect()
}

pub(crate) fn upstream(name: &str) -> UpstreamConfig {
    UpstreamConfig {
        name: name.into(),
        command: vec![],
        url: String::new(),
        prefix: "up_".into(),
        default_price: UsdcAmount::from_atomic(PRICE),
        prices: Default::default(),
        charge: None,
        free: vec!["ping".into()],
        hidden: vec!["admin".into()],
        max_result_bytes: 1024 * 1024,
        quota: None,
        max_in_flight: 0,
        throttle_patterns: vec![],
        throttle_pause_secs: 30,
        tools: Default::default(),
    }
}

async fn stdio_app(calls_file: &Path, crash_after_first: bool) -> TestApp {
    let mut command = vec![python().await.display().to_string(), script(), "stdio".into(), "0".into()];
    command.push(calls_file.display().to_string());
    if crash_after_first {
        command.push("crash".into());
    }
    let mut u = upstream("py-stdio");
    u.command = command;
    spawn_app_with(move |c: &mut Config| c.upstream = vec![u]).await
}

async fn http_upstream(port: u16, calls_file: &Path) -> Child {
    let child = Command::new(python().await)
        .args([script(), "http".into(), port.to_string(), calls_file.display().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let up = async {
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), up).await.expect("python upstream listens");
    child
}

async fn pay(app: &TestApp, tool: &str, args: Value) -> (Value, Value) {
    let payload = app.sign(&app.payer(), &app.requirements(tool, args.clone()).await);
    (app.pay(tool, args, &payload).await, payload)
}

#[tokio::test]
async fn a_stdio_upstreams_tools_are_listed_priced_and_sold_end_to_end() {
    // Arrange
    let dir = tempfile::tempdir().unwrap();
    let calls_file = dir.path().join("calls");
    let app = stdio_app(&calls_file, false).await;
    let payer = app.payer().address();
    let before = app.balance(payer).await;
    // Act
    let tools = app.sessionless().list_tools().await;
    let (paid, _) = pay(&app, "up_reverse", json!({ "text": "hello" })).await;
    let free = app.sessionless().call_tool("up_ping", json!({}), None).await;
    // Assert: prices and visibility as configured.
    let price =
        |n: &str| tools.iter().find(|t| t["name"] == n).map(|t| t["_meta"]["x402/price"]["amount"].clone());
    assert_eq!(price("up_reverse"), Some(json!(PRICE.to_string())));
    assert_eq!(price("up_ping"), Some(Value::Null), "free tools carry no price");
    assert_eq!(price("up_admin"), None, "hidden tools are not listed");
    assert!(paid["content"][0]["text"].as_str().unwrap().contains("olleh"), "{paid}");
    assert_eq!(paid["_meta"]["x402/payment-response"]["success"], true);
    assert_eq!(paid["_meta"]["tollgate/receipt"]["body"]["outcome"], "ok");
    assert_eq!(free["content"][0]["text"], "pong");
    assert_eq!(before - app.balance(payer).await, U256::from(PRICE));
    assert_eq!(calls(&calls_file), ["reverse"], "one upstream call");
    // A hidden tool cannot be called either.
    let hidden = app.sessionless().call_tool_raw("up_admin", json!({}), None).await;
    assert!(hidden.get("error").is_some(), "{hidden}");
    app.shutdown().await;
}

#[tokio::test]
async fn an_upstream_tool_error_after_settlement_is_charged_and_recorded_in_the_receipt() {
    let dir = tempfile::tempdir().unwrap();
    let app = stdio_app(&dir.path().join("calls"), false).await;
    let (result, _) = pay(&app, "up_broken", json!({ "text": "x" })).await;
    assert_eq!(result["isError"], true, "{result}");
    assert_eq!(result["_meta"]["x402/payment-response"]["success"], true, "the payment settled first");
    assert_eq!(result["_meta"]["tollgate/receipt"]["body"]["outcome"], "tool_error");
    app.shutdown().await;
}

#[tokio::test]
async fn a_crashed_stdio_upstream_is_respawned() {
    let dir = tempfile::tempdir().unwrap();
    let calls_file = dir.path().join("calls");
    let app = stdio_app(&calls_file, true).await;
    let (first, _) = pay(&app, "up_reverse", json!({ "text": "ab" })).await;
    assert_eq!(first["isError"], false, "{first}");
    tokio::time::sleep(Duration::from_millis(600)).await; // the child exits after answering
    let (second, _) = pay(&app, "up_reverse", json!({ "text": "cd" })).await;
    assert_eq!(second["isError"], false, "a new child serves the next call: {second}");
    assert_eq!(calls(&calls_file), ["reverse", "reverse"]);
    app.shutdown().await;
}

#[tokio::test]
async fn an_http_upstream_is_sold_and_when_it_is_down_nobody_is_charged() {
    // Arrange: an HTTP upstream on its own port.
    let dir = tempfile::tempdir().unwrap();
    let calls_file = dir.path().join("calls");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut server = http_upstream(port, &calls_file).await;
    let mut u = upstream("py-http");
    u.url = format!("http://127.0.0.1:{port}/mcp");
    let app = spawn_app_with(move |c: &mut Config| c.upstream = vec![u]).await;
    let payer = app.payer().address();
    let (paid, _) = pay(&app, "up_reverse", json!({ "text": "abc" })).await;
    assert!(paid["content"][0]["text"].as_str().unwrap().contains("cba"), "{paid}");
    // Act: the upstream goes down.
    server.kill().await.unwrap();
    let before = app.balance(payer).await;
    let (refused, payload) = pay(&app, "up_reverse", json!({ "text": "abc" })).await;
    // Assert: a clear refusal before any payment; nothing charged.
    assert_eq!(refused["structuredContent"]["error"], "tool_unavailable", "{refused}");
    assert_eq!(refused["structuredContent"]["charged"], false);
    assert_eq!(app.balance(payer).await, before);
    // When it returns, the same authorization pays.
    let _server = http_upstream(port, &calls_file).await;
    let mut paid = Value::Null;
    for _ in 0..40 {
        paid = app.pay("up_reverse", json!({ "text": "abc" }), &payload).await;
        if paid["isError"] == false {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(paid["isError"], false, "{paid}");
    assert_eq!(before - app.balance(payer).await, U256::from(PRICE));
    assert_eq!(calls(&calls_file), ["reverse", "reverse"]);
    app.shutdown().await;
}

#[tokio::test]
async fn an_upstream_down_at_start_does_not_stop_the_server_and_its_tools_join_when_it_answers() {
    // Arrange: an HTTP upstream whose port has nothing listening yet.
    let dir = tempfile::tempdir().unwrap();
    let calls_file = dir.path().join("calls");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut u = upstream("late");
    u.url = format!("http://127.0.0.1:{port}/mcp");
    // Act: the server starts anyway.
    let app = spawn_app_with(move |c: &mut Config| c.upstream = vec![u]).await;
    let names = |tools: Vec<Value>| -> Vec<String> {
        tools.iter().map(|t| t["name"].as_str().unwrap().to_owned()).collect()
    };
    // Assert: it serves its own tools, without the upstream's (nobody is quoted for them).
    let listed = names(app.sessionless().list_tools().await);
    assert!(
        listed.contains(&"echo".to_owned()) && !listed.iter().any(|n| n.starts_with("up_")),
        "{listed:?}"
    );
    let unknown = app.sessionless().call_tool_raw("up_reverse", json!({ "text": "abc" }), None).await;
    assert!(unknown["error"]["message"].as_str().unwrap().contains("unknown tool"), "{unknown}");
    // The upstream comes up: its tools join, priced, and sell.
    let _server = http_upstream(port, &calls_file).await;
    let mut listed = Vec::new();
    for _ in 0..120 {
        listed = names(app.sessionless().list_tools().await);
        if listed.contains(&"up_reverse".to_owned()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(listed.contains(&"up_reverse".to_owned()), "{listed:?}");
    let (paid, _) = pay(&app, "up_reverse", json!({ "text": "abc" })).await;
    assert!(paid["content"][0]["text"].as_str().unwrap().contains("cba"), "{paid}");
    assert_eq!(calls(&calls_file), ["reverse"]);
    app.shutdown().await;
}

#[tokio::test]
async fn two_upstreams_offering_one_tool_name_stop_the_start_naming_both() {
    // Arrange: the same upstream listed twice under one prefix, so every tool name collides.
    let app = spawn_app_with(|_| {}).await;
    let command =
        vec![python().await.display().to_string(), script(), "stdio".into(), "0".into(), "/dev/null".into()];
    let (mut first, mut second) = (upstream("first"), upstream("second"));
    first.command = command.clone();
    second.command = command;
    let mut config = app.state.config.clone();
    config.upstream = vec![first, second];
    // Act
    let built = tollgate::app::App::build(config).await;
    // Assert: refused, naming the tool and both sources (never a silent replacement).
    let error = format!("{:#}", built.err().expect("a duplicate tool name is refused"));
    assert!(error.contains("offered twice"), "{error}");
    assert!(error.contains("upstream `first`") && error.contains("upstream `second`"), "{error}");
    app.shutdown().await;
}

#[tokio::test]
async fn an_upstream_result_past_its_size_bound_is_answered_as_too_large() {
    // Arrange: results from this upstream may be at most 600 bytes.
    let dir = tempfile::tempdir().unwrap();
    let mut command = vec![python().await.display().to_string(), script(), "stdio".into(), "0".into()];
    command.push(dir.path().join("calls").display().to_string());
    let mut u = upstream("py-stdio");
    u.command = command;
    u.max_result_bytes = 600;
    let app = spawn_app_with(move |c: &mut Config| c.upstream = vec![u]).await;
    // Act
    let (small, _) = pay(&app, "up_reverse", json!({ "text": "abc" })).await;
    let (large, _) = pay(&app, "up_reverse", json!({ "text": "x".repeat(2000) })).await;
    // Assert
    assert_eq!(small["isError"], false, "{small}");
    assert_eq!(large["structuredContent"]["error"], "result_too_large", "{large}");
    assert_eq!(large["structuredContent"]["limit_bytes"], 600);
    assert!(!large.to_string().contains(&"x".repeat(700)), "the oversized result is not served");
    app.shutdown().await;
}
