//! Routes and THE layer order. Requests pass the layers top to bottom as listed in `router`.

use std::sync::Arc;
use std::time::Duration;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderValue, Request, StatusCode, header};
use axum::middleware::{Next, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::app::AppState;
use crate::ceiling::{Ceiling, CeilingError};
use crate::transport::{McpTransport, jsonrpc_error, mcp_endpoint};

pub fn router(app: Arc<AppState>, cancel: CancellationToken) -> Router {
    let server = &app.config.server;
    let mcp = McpTransport::new(app.clone(), cancel);
    let routes = Router::new()
        // 1. The ceiling guards /mcp before its body is read (probes and metrics are exempt).
        .route(
            "/mcp",
            any(mcp_endpoint).layer(from_fn_with_state(app.ceiling.clone(), ceiling_layer)).with_state(mcp),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(crate::public_api::routes())
        .with_state(app.clone());

    routes.layer(
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

/// Ready when the store (and Redis, when used) answer; `/healthz` only says the process is up.
async fn readyz(State(app): State<Arc<AppState>>) -> impl IntoResponse {
    if let Err(e) = app.store.ping().await {
        tracing::warn!(error = %e, "not ready: store");
        return (StatusCode::SERVICE_UNAVAILABLE, "store unavailable").into_response();
    }
    if !app.limits.ping().await {
        return (StatusCode::SERVICE_UNAVAILABLE, "rate limiter (redis) unavailable").into_response();
    }
    (StatusCode::OK, "ready").into_response()
}

/// Prometheus text exposition.
async fn metrics(State(app): State<Arc<AppState>>) -> impl IntoResponse {
    metrics::gauge!("tollgate_ceiling_tracked_keys").set(app.ceiling.tracked_keys() as f64);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], app.metrics.render())
}

/// The ceiling's HTTP adapter: key the request, count it, and either pass it on (with the
/// client key for later stages and `RateLimit` headers) or answer 429.
pub async fn ceiling_layer(
    State(ceiling): State<Arc<Ceiling>>,
    mut request: Request<Body>,
    next: Next,
) -> Response {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let key = ceiling.client_key(request.headers(), peer);
    let policy = format!("\"ceiling\";q={};w={}", ceiling.burst, ceiling.burst.div_ceil(ceiling.per_second));
    match ceiling.check(&key).await {
        Ok(admitted) => {
            request.extensions_mut().insert(key);
            let mut response = next.run(request).await;
            let state = format!("\"ceiling\";r={};t={}", admitted.remaining, admitted.reset_secs);
            let headers = response.headers_mut();
            headers.insert("ratelimit-policy", HeaderValue::from_str(&policy).expect("ascii"));
            headers.insert("ratelimit", HeaderValue::from_str(&state).expect("ascii"));
            response
        }
        Err(CeilingError::Exceeded { key_kind, retry_after_secs }) => {
            let data = serde_json::json!({
                "error": "rate_limited",
                "axis": "ceiling",
                "key_kind": key_kind,
                "limit": ceiling.burst,
                "per_second": ceiling.per_second,
                "retry_after_seconds": retry_after_secs,
                "charged": false,
            });
            let message = format!("rate limited (per-{key_kind} ceiling): retry in {retry_after_secs}s");
            let mut response = jsonrpc_error(StatusCode::TOO_MANY_REQUESTS, -32000, &message, data);
            let headers = response.headers_mut();
            headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
            headers.insert("ratelimit-policy", HeaderValue::from_str(&policy).expect("ascii"));
            let state = format!("\"ceiling\";r=0;t={retry_after_secs}");
            headers.insert("ratelimit", HeaderValue::from_str(&state).expect("ascii"));
            response
        }
    }
}
