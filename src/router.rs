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
use tower_http::request_id::{MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::ceiling::guard::Guarded;
use crate::readiness::Readiness;
use crate::state::AppState;
use crate::transport::{McpTransport, mcp_endpoint};

/// The whole server: the ceiling in front (1), then the router and its layers (0, 2…).
pub fn router(app: Arc<AppState>, cancel: CancellationToken) -> Guarded {
    let server = &app.config.server;
    let every = Duration::from_millis(server.readiness_refresh_ms);
    let readiness = crate::readiness::spawn_prober(app.clone(), every, cancel.child_token());
    let mcp = McpTransport::new(app.clone(), cancel);
    let mut routes = Router::new()
        .route("/mcp", any(mcp_endpoint).with_state(Arc::new(mcp)))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz).with_state(readiness));
    // With a metrics address of its own, /metrics is not served to the public at all.
    if server.metrics_bind.is_none() {
        routes = routes.route("/metrics", get(metrics));
    }
    let routes = routes.merge(crate::public_api::routes()).with_state(app.clone());

    let routes = routes.layer(
        ServiceBuilder::new()
            // 0. Every request gets an id (kept if the client sent one) and a span carrying it.
            .layer(SetRequestIdLayer::x_request_id(SequentialIds::new()))
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

/// Request ids: a prefix drawn at random once per process, then a counter. A UUID v4 per
/// request cost a `getrandom` syscall each, on every request; an id need only be unique (across
/// replicas and restarts: the prefix), not unguessable.
#[derive(Clone)]
struct SequentialIds {
    prefix: Arc<str>,
    next: Arc<std::sync::atomic::AtomicU64>,
}

impl SequentialIds {
    fn new() -> SequentialIds {
        let prefix = format!("{:016x}", rand::random::<u64>()).into();
        SequentialIds { prefix, next: Default::default() }
    }
}

impl MakeRequestId for SequentialIds {
    fn make_request_id<B>(&mut self, _: &Request<B>) -> Option<RequestId> {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        header::HeaderValue::from_str(&format!("{}-{n:x}", self.prefix)).ok().map(RequestId::new)
    }
}

fn request_span<B>(request: &Request<B>) -> tracing::Span {
    // A client may send its own id: it is logged only when it looks like one (short, plain
    // characters), so it cannot plant fields or lines in text logs.
    let request_id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|id| id.len() <= 128 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b)))
        .unwrap_or("(unprintable)");
    tracing::info_span!(
        "request",
        http.method = %request.method(),
        http.path = %request.uri().path(),
        request.id = %request_id,
    )
}

/// The last background readiness report (see `readiness`): no dependency is asked here.
async fn readyz(State(readiness): State<Arc<Readiness>>) -> impl IntoResponse {
    let (ready, checks) = match readiness.latest().await {
        Some(report) => (report.ready, serde_json::Value::Object(report.checks.clone())),
        None => (false, serde_json::json!({ "probe": "not yet run" })),
    };
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, axum::Json(serde_json::json!({ "ready": ready, "checks": checks })))
}

/// `/metrics` alone, for `server.metrics_bind`: the operator's scrape address, not public.
pub fn metrics_router(app: Arc<AppState>) -> Router {
    Router::new().route("/metrics", get(metrics)).with_state(app)
}

/// Prometheus text exposition.
async fn metrics(State(app): State<Arc<AppState>>) -> impl IntoResponse {
    metrics::gauge!("tollgate_ceiling_tracked_keys").set(app.ceiling.tracked_keys() as f64);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], app.metrics.render())
}
