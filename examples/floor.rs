//! The benchmark floor: a bare axum handler answering every `POST /mcp` with one constant
//! JSON-RPC body, on the same runtime settings and socket options as tollgate. Whatever
//! tollgate does per request is measured against this in `scripts/bench.sh`.
//!
//! Usage: floor PORT

use axum::Router;
use axum::http::header;
use axum::routing::post;

const BODY: &str =
    r#"{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"ok"}],"isError":false}}"#;

#[tokio::main]
async fn main() {
    let port: u16 = std::env::args().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    let router =
        Router::new().route("/mcp", post(|| async { ([(header::CONTENT_TYPE, "application/json")], BODY) }));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.expect("bind");
    println!("floor: serving http://{}/mcp", listener.local_addr().expect("address"));
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router).await.expect("serve");
}
