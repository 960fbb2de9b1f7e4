//! Routes and THE layer order. Requests pass the layers top to bottom as listed in `router`.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{Request, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{any, get};
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::ceiling::guard::Guarded;
use crate::state::AppState;
use crate::transport::{McpTransport, mcp_endpoint};

/// The whole server: the ceiling in front (1), then the router and its layers (0, 2…).
pub fn router(app: Arc<AppState>, cancel: CancellationToken) -> Guarded {
    let server = &app.config.server;
    let mcp = McpTransport::new(app.clone(), cancel);
    let routes = Router::new()
        .route("/mcp", any(mcp_endpoint).with_state(mcp))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(crate::public_api::routes())
        .with_state(app.clone());

    let routes = routes.layer(
        ServiceBuilder::new()
            // 0. Every request gets an id (kept if the client sent one) and a span carrying it.
            .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
            .layer(TraceLayer::new_for_http().make_span_with(request_span))
            .layer(PropagateRequestIdLayer::x_request_id())
            // Oversized bodies are refused before anything reads them.
            .layer(RequestBodyLimitLayer::new(server.max_body_bytes))
            // A stuck request (or settlement) cannot hold a connection forever, nor block
            // graceful shutdown. The settle timeout is validated to be shorter than this.
            .layer(TimeoutLayer::with_status_code(
                StatusCode::REQUEST_TIMEOUT,
                Duration::from_secs(server.request_timeout_secs),
            )),
    );
    // 1. The ceiling guards /mcp before anything else runs — before routing, request ids and
    //    the body (probes, metrics and the public log are exempt): see `ceiling::guard`.
    Guarded::new(routes, app.ceiling.clone())
    // 2. transport (rmcp) → tools/call → paid_call (src/tools/paid_call.rs): steps 3–10.
}

fn request_span<B>(request: &Request<B>) -> tracing::Span {
    let request_id = request.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or_default();
    tracing::info_span!(
        "request",
        http.method = %request.method(),
        http.path = %request.uri().path(),
        request.id = %request_id,
    )
}

/// Ready when everything a paid call needs answers: the store, the chain, Redis (when used)
/// and, with our own relayer, enough gas to settle. `/healthz` only says the process is up.
async fn readyz(State(app): State<Arc<AppState>>) -> impl IntoResponse {
    let probe = Duration::from_secs(3);
    let mut checks = serde_json::Map::new();
    let mut ready = true;
    let mut check = |name: &str, outcome: Result<(), String>| {
        ready &= outcome.is_ok();
        checks.insert(name.to_owned(), outcome.err().unwrap_or_else(|| "ok".to_owned()).into());
    };
    let store = tokio::time::timeout(probe, app.store.ping()).await;
    let store = store
        .map_err(|_| "timeout".to_owned())
        .and_then(|r| r.map_err(|e| crate::redact::urls(&e.to_string())));
    check("store", store);
    let limiter = tokio::time::timeout(probe, app.limits.ping()).await.unwrap_or(false);
    check("limiter", if limiter { Ok(()) } else { Err("redis unavailable".into()) });
    let chain = tokio::time::timeout(probe, app.gate.chain.chain_id()).await;
    let chain = match chain {
        Ok(Ok(id)) if id == app.network.chain_id => Ok(()),
        Ok(Ok(id)) => Err(format!("RPC is on chain {id}, expected {}", app.network.chain_id)),
        Ok(Err(e)) => Err(crate::redact::urls(&e.to_string())),
        Err(_) => Err("timeout".into()),
    };
    check("chain", chain);
    if let Some(relayer) = app.gate.settler.relayer() {
        let floor = app.config.payment.min_relayer_balance_wei;
        let balance = tokio::time::timeout(probe, app.gate.chain.gas_balance(relayer)).await;
        let outcome = match balance {
            Ok(Ok(wei)) => {
                metrics::gauge!("tollgate_relayer_balance_wei").set(f64::from(wei));
                if wei >= alloy::primitives::U256::from(floor) {
                    Ok(())
                } else {
                    Err(format!("relayer balance {wei} wei is below {floor}"))
                }
            }
            Ok(Err(e)) => Err(crate::redact::urls(&e.to_string())),
            Err(_) => Err("timeout".into()),
        };
        check("relayer_gas", outcome);
    }
    if !ready {
        tracing::warn!(?checks, "not ready");
    }
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, axum::Json(serde_json::json!({ "ready": ready, "checks": checks })))
}

/// Prometheus text exposition.
async fn metrics(State(app): State<Arc<AppState>>) -> impl IntoResponse {
    metrics::gauge!("tollgate_ceiling_tracked_keys").set(app.ceiling.tracked_keys() as f64);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], app.metrics.render())
}
