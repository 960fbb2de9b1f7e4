//! Public, read-only HTTP endpoints: the listing at `/.well-known/x402` and the transparency
//! log (checkpoint, inclusion and consistency proofs, a payer's own receipts).
//!
//! An HTTP adapter only: proofs come from `receipt::merkle`, permissions from
//! `receipt::audit_api`. Listing a payer's receipts requires that wallet's signature.

use std::sync::Arc;

use alloy::primitives::Address;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::receipt::tree::TreeError;
use crate::receipt::{SignedCheckpoint, SignedReceipt, audit_api};
use crate::state::AppState;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/.well-known/x402", get(well_known))
        .route("/log/checkpoint", get(checkpoint))
        .route("/log/inclusion", get(inclusion))
        .route("/log/consistency", get(consistency))
        .route("/log/receipts/challenge", post(challenge))
        .route("/log/receipts", post(receipts))
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": code, "message": message.into() }))).into_response()
}

fn unavailable(e: impl std::fmt::Display) -> Response {
    tracing::warn!(error = %e, "log endpoint: store unavailable");
    error(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", "the log store is unavailable; retry later")
}

/// The server's listing: tools and prices, payment terms, receipt keys and log endpoints.
async fn well_known(State(app): State<Arc<AppState>>) -> Json<Value> {
    let paused = app.protection.paused().await;
    let tools: Vec<Value> = app
        .catalog
        .current()
        .entries()
        .map(|e| {
            let (t, price) = (&e.tool, e.price_meta());
            let mut tool = json!({ "name": t.name, "description": t.description, "inputSchema": t.input_schema, "price": price });
            if let Some(pause) = e.upstream().and_then(|(u, _)| crate::protect::paused_meta(u, &paused)) {
                tool["paused"] = pause;
            }
            tool
        })
        .collect();
    let current = &app.receipts.signer.kid;
    let keys: Vec<Value> = app
        .receipts
        .signer
        .published()
        .iter()
        .map(|(kid, key)| {
            let mut shown = crate::receipt::keys::published_json(kid, key);
            shown["current"] = json!(kid == current);
            shown
        })
        .collect();
    Json(json!({
        "x402Version": 2,
        "server": app.config.server.server_id,
        "mcp": "/mcp",
        "network": app.network.caip2,
        "asset": app.network.asset.to_checksum(None),
        "eip712": { "name": app.network.eip712_name, "version": app.network.eip712_version },
        "payTo": app.config.payment.pay_to.map(|a| a.to_checksum(None)),
        "tools": tools,
        "receiptKeys": keys,
        // Who signs settlement transactions: our relayer, or the facilitator's signers (from
        // its /supported), so a payer or auditor can name who settled.
        "settlement": {
            "by": app.gate.settler.kind(),
            "signers": app.gate.settler.signers().iter().map(|a| a.to_checksum(None)).collect::<Vec<_>>(),
        },
        "log": {
            "checkpoint": "/log/checkpoint",
            "inclusion": "/log/inclusion?index={index}&tree_size={size}",
            "consistency": "/log/consistency?first={first}&second={second}",
            "challenge": "/log/receipts/challenge",
            "receipts": "/log/receipts",
        },
    }))
}

async fn checkpoint(State(app): State<Arc<AppState>>) -> Response {
    match app.store.latest_checkpoint().await {
        Ok(Some(c)) => match SignedCheckpoint::from_stored(&c) {
            Ok(signed) => Json(signed).into_response(),
            Err(e) => unavailable(e),
        },
        Ok(None) => error(StatusCode::NOT_FOUND, "no_checkpoint", "the log has no checkpoint yet"),
        Err(e) => unavailable(e),
    }
}

/// A proof's failure as an answer: a size the log has not reached, or the store.
fn tree_error(e: TreeError) -> Response {
    match e {
        TreeError::BeyondLog { size } => {
            error(StatusCode::BAD_REQUEST, "bad_tree_size", format!("tree size must be 1..={size}"))
        }
        TreeError::Store(e) => unavailable(e),
    }
}

#[derive(Deserialize)]
struct InclusionQuery {
    index: u64,
    tree_size: u64,
}

/// O(log n) from the cached tree (`receipt::tree`), never a read of every leaf.
async fn inclusion(State(app): State<Arc<AppState>>, Query(q): Query<InclusionQuery>) -> Response {
    match app.receipts.tree.inclusion(q.index, q.tree_size).await {
        Ok(Some((leaf, proof))) => {
            let proof: Vec<String> = proof.iter().map(hex::encode).collect();
            let body = json!({ "index": q.index, "tree_size": q.tree_size, "leaf_hash": hex::encode(leaf), "proof": proof });
            Json(body).into_response()
        }
        Ok(None) => error(StatusCode::BAD_REQUEST, "bad_index", "index must be below tree_size"),
        Err(e) => tree_error(e),
    }
}

#[derive(Deserialize)]
struct ConsistencyQuery {
    first: u64,
    second: u64,
}

async fn consistency(State(app): State<Arc<AppState>>, Query(q): Query<ConsistencyQuery>) -> Response {
    if q.first == 0 || q.first > q.second {
        return error(StatusCode::BAD_REQUEST, "bad_sizes", "need 1 <= first <= second");
    }
    match app.receipts.tree.consistency(q.first, q.second).await {
        Ok(proof) => {
            let proof: Vec<String> = proof.iter().map(hex::encode).collect();
            Json(json!({ "first": q.first, "second": q.second, "proof": proof })).into_response()
        }
        Err(e) => tree_error(e),
    }
}

#[derive(Deserialize)]
struct ChallengeRequest {
    wallet: Address,
}

async fn challenge(State(app): State<Arc<AppState>>, Json(req): Json<ChallengeRequest>) -> Json<Value> {
    let server = &app.config.server.server_id;
    let text = audit_api::issue(&app.receipts.signer, server, req.wallet, app.clock.now_unix());
    Json(json!({ "challenge": text, "ttl_seconds": audit_api::CHALLENGE_TTL_SECS }))
}

#[derive(Deserialize)]
struct ReceiptsRequest {
    wallet: Address,
    #[serde(default)]
    after_seq: u64,
    challenge: String,
    /// EIP-191 signature of `challenge` by `wallet`, 0x-hex.
    signature: String,
}

/// Page size for a payer's receipts.
const RECEIPTS_PAGE: i64 = 500;

async fn receipts(State(app): State<Arc<AppState>>, Json(req): Json<ReceiptsRequest>) -> Response {
    let server = &app.config.server.server_id;
    let now = app.clock.now_unix();
    if let Err(e) =
        audit_api::check(&app.receipts.signer, server, req.wallet, &req.challenge, &req.signature, now)
    {
        return error(StatusCode::FORBIDDEN, "not_authorized", e.to_string());
    }
    let payer = format!("{:#x}", req.wallet);
    let rows = match app.store.receipts_of(&payer, req.after_seq as i64, RECEIPTS_PAGE).await {
        Ok(rows) => rows,
        Err(e) => return unavailable(e),
    };
    let mut out = Vec::with_capacity(rows.len());
    for row in &rows {
        match SignedReceipt::from_stored(row) {
            Ok(receipt) => out.push(json!({ "log_index": row.log_index, "receipt": receipt })),
            Err(e) => return unavailable(e),
        }
    }
    let more = rows.len() as i64 == RECEIPTS_PAGE;
    Json(json!({ "receipts": out, "more": more })).into_response()
}
