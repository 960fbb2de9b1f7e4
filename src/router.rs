//! Routes and THE layer order. Requests pass the layers top to bottom as listed in `router`.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{Request, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{any, get};
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::app::AppState;
use crate::transport::{McpTransport, mcp_endpoint};

pub fn router(app: Arc<AppState>, cancel: CancellationToken) -> Router {
    let server = &app.config.server;
    let mcp = McpTransport::new(app.clone(), cancel);
    let routes = Router::new()
        .route("/mcp", any(mcp_endpoint).with_state(mcp))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(app.clone());

    routes.layer(
        ServiceBuilder::new()
            // 0. Every request gets an id (kept if the client sent one) and a span carrying it.
            .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
            .layer(TraceLayer::new_for_http().make_span_with(request_span))
            .layer(PropagateRequestIdLayer::x_request_id())
            // 1. Oversized bodies are refused before anything reads them.
            .layer(RequestBodyLimitLayer::new(server.max_body_bytes))
            // A stuck request (or settlement) cannot hold a connection forever, nor block
            // graceful shutdown. The settle timeout is validated to be shorter than this.
            .layer(TimeoutLayer::with_status_code(
                StatusCode::REQUEST_TIMEOUT,
                Duration::from_secs(server.request_timeout_secs),
            )),
    )
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

/// Ready when the store answers; `/healthz` only says the process is up.
async fn readyz(State(app): State<Arc<AppState>>) -> impl IntoResponse {
    match app.store.ping().await {
        Ok(()) => (StatusCode::OK, "ready").into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "not ready: store");
            (StatusCode::SERVICE_UNAVAILABLE, "store unavailable").into_response()
        }
    }
}
