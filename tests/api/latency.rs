//! Latency regressions seen from the clients agents use, not from our own Rust client.

use serde_json::Value;
use tokio::process::Command;

use crate::helpers::{repo_root, spawn_app};
use crate::interop::python;

/// Nagle's algorithm on the accepted socket holds each small SSE write until the client's
/// delayed ACK, about 40 ms on Linux. The timing assertion is safe only because that gap is
/// 40x: with TCP_NODELAY a free call takes about a millisecond here, even in a debug build.
#[tokio::test]
async fn sequential_session_calls_from_httpx_do_not_stall_on_nagle() {
    // Arrange
    let app = spawn_app().await;
    // Act: 20 sequential session calls on one keep-alive connection, as the MCP Python SDK makes.
    let out = Command::new(python().await)
        .arg(repo_root().join("scripts/bench_httpx.py"))
        .args([app.mcp_url().as_str(), "free", "echo", r#"{"text":"ping"}"#, "20", "session"])
        .output()
        .await
        .unwrap();
    // Assert
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "httpx client failed: {stderr}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{stderr}"));
    assert_eq!(report["last"]["result"]["isError"], false, "{report}");
    let median = report["p50_ms"].as_f64().unwrap();
    eprintln!("httpx session call median: {median:.2} ms");
    assert!(median < 20.0, "median {median:.1} ms per call: the 40 ms delayed-ACK stall is back ({report})");
    app.shutdown().await;
}

/// A refused agent must see its 429 and Retry-After, never a dropped connection: on a
/// keep-alive connection, answering before the request body was read used to leave the rest
/// of it on the wire, and the connection reset under the client's next request.
#[tokio::test]
async fn a_ceiling_refusal_never_drops_the_connection() {
    // Arrange: a tight ceiling, so most of the calls are refused.
    let app = crate::helpers::spawn_app_with(|c| {
        c.ceiling.burst = 5;
        c.ceiling.per_second = 1;
    })
    .await;
    for (label, threads) in [("sequential", "1"), ("8 threads on one pool", "8")] {
        // Act
        let out = Command::new(python().await)
            .arg(repo_root().join("tests/interop/httpx_ceiling.py"))
            .args([app.mcp_url().as_str(), "800", threads])
            .output()
            .await
            .unwrap();
        // Assert
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "httpx client failed: {stderr}");
        let counts: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{stderr}"));
        assert_eq!(counts["transport_errors"], 0, "{label}: {counts}");
        assert_eq!(counts["refused_without_retry_after"], 0, "{label}: {counts}");
        assert!(counts["refused"].as_u64().unwrap() > 700, "{label}: the ceiling held: {counts}");
    }
    app.shutdown().await;
}
