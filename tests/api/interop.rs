//! Interop with the official x402 Python package (PyPI `x402` 2.25.0, with the 1.x MCP SDK its MCP wrapper needs):
//! its MCP client pays tollgate unchanged, and `tollgate call` pays its MCP server wrapper.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use alloy::primitives::U256;
use serde_json::Value;
use tokio::process::Command;
use tokio::sync::OnceCell;
use tollgate::chain::anvil::DEV_KEYS;

use crate::helpers::{COUNTED_PRICE, repo_root, spawn_app};

/// The venv with the official package, installed once per test run.
pub async fn python() -> PathBuf {
    static READY: OnceCell<PathBuf> = OnceCell::const_new();
    READY
        .get_or_init(|| async {
            let status =
                Command::new(repo_root().join("scripts/install-python-interop.sh")).status().await.unwrap();
            assert!(status.success(), "installing the x402 Python package failed");
            repo_root().join(".tollgate/py/bin/python")
        })
        .await
        .clone()
}

#[tokio::test]
async fn the_official_python_x402_client_pays_a_tollgate_tool() {
    // Arrange
    let app = spawn_app().await;
    let payer = app.payer();
    let before = app.balance(payer.address()).await;
    let key = std::fs::read_to_string(app.dir.path().join("payer.key")).unwrap();
    // Act
    let out = Command::new(python().await)
        .arg(repo_root().join("tests/interop/x402_client.py"))
        .args([app.mcp_url().as_str(), "counted", r#"{"text":"from python"}"#])
        .env("PAYER_KEY", key.trim())
        .env("ALLOW_NETWORK", &app.state.network.caip2)
        .env("ALLOW_ASSET", app.chain.token.to_checksum(None))
        .output()
        .await
        .unwrap();
    // Assert
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "python client failed: {stderr}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{stderr}"));
    assert_eq!(report["payment_made"], true, "{report}");
    assert_eq!(report["is_error"], false, "{report}");
    assert_eq!(report["payment_response"]["success"], true, "{report}");
    assert!(report["content"][0]["text"].as_str().unwrap().contains("from python"), "{report}");
    assert!(report["tools"].as_array().unwrap().iter().any(|t| t == "counted"));
    assert_eq!(before - app.balance(payer.address()).await, U256::from(COUNTED_PRICE));
    assert_eq!(app.runs(), 1);
    app.shutdown().await;
}

#[tokio::test]
async fn tollgate_call_pays_a_server_built_with_the_official_python_wrapper() {
    // Arrange: a chain with a funded payer (from a tollgate test app), and the Python seller.
    let app = spawn_app().await;
    let payer = app.payer();
    let seller_pay_to = tollgate::chain::parse_private_key(DEV_KEYS[2]).unwrap().address();
    let (payer_before, seller_before) =
        (app.balance(payer.address()).await, app.balance(seller_pay_to).await);
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut seller = Command::new(python().await)
        .arg(repo_root().join("tests/interop/x402_server.py"))
        .env("RPC_URL", app.chain.anvil.endpoint())
        .env("CHAIN_ID", tollgate::dev::ANVIL_CHAIN_ID.to_string())
        .env("ASSET", app.chain.token.to_checksum(None))
        .env("PAY_TO", seller_pay_to.to_checksum(None))
        .env("FACILITATOR_KEY", DEV_KEYS[3])
        .env("PORT", port.to_string())
        .env("PRICE", "1500")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let ready = async {
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(60), ready).await.is_err() {
        let _ = seller.kill().await;
        let out = seller.wait_with_output().await.unwrap();
        panic!("python seller did not start: {}", String::from_utf8_lossy(&out.stderr));
    }
    // Act
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["call", "--url", &format!("http://127.0.0.1:{port}/mcp"), "--tool", "weather"])
        .args(["--args", r#"{"city":"Paris"}"#, "--json"])
        .arg("--key-file")
        .arg(app.dir.path().join("payer.key"))
        .args(["--allow-asset", &format!("{}:{}", app.state.network.caip2, app.chain.token)])
        .output()
        .await
        .unwrap();
    // Assert
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tollgate call failed: {stderr}\n{}", String::from_utf8_lossy(&out.stdout));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["result"]["content"][0]["text"].as_str().unwrap().contains("Paris"), "{report}");
    assert_eq!(report["paymentResponse"]["success"], true, "{report}");
    assert_eq!(payer_before - app.balance(payer.address()).await, U256::from(1500));
    assert_eq!(app.balance(seller_pay_to).await - seller_before, U256::from(1500));
    let _ = seller.kill().await;
    app.shutdown().await;
}
