//! Routes and THE layer order. Requests pass the layers top to bottom as listed in `router`.

use std::sync::Arc;
use std::time::Duration;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use std::convert::Infallible;

use axum::http::{HeaderName, HeaderValue, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::app::AppState;
use crate::ceiling::{Admitted, Ceiling, CeilingError};
use crate::transport::{McpTransport, mcp_endpoint};

pub fn router(app: Arc<AppState>, cancel: CancellationToken) -> Router {
    let server = &app.config.server;
    let mcp = McpTransport::new(app.clone(), cancel);
    let routes = Router::new()
        // 1. The ceiling guards /mcp before its body is read (probes and metrics are exempt).
        .route(
            "/mcp",
            any(mcp_endpoint)
                .layer(CeilingLayer(Arc::new(CeilingHttp::new(app.ceiling.clone()))))
                .with_state(mcp),
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
    check("store", store.map_err(|_| "timeout".to_owned()).and_then(|r| r.map_err(|e| e.to_string())));
    let limiter = tokio::time::timeout(probe, app.limits.ping()).await.unwrap_or(false);
    check("limiter", if limiter { Ok(()) } else { Err("redis unavailable".into()) });
    let chain = tokio::time::timeout(probe, app.gate.chain.chain_id()).await;
    let chain = match chain {
        Ok(Ok(id)) if id == app.network.chain_id => Ok(()),
        Ok(Ok(id)) => Err(format!("RPC is on chain {id}, expected {}", app.network.chain_id)),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timeout".into()),
    };
    check("chain", chain);
    if let Some(relayer) = app.gate.settler.relayer() {
        let floor: u128 = app.config.payment.min_relayer_balance_wei.parse().unwrap_or(0);
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
            Ok(Err(e)) => Err(e.to_string()),
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

/// The ceiling's HTTP adapter, as a tower layer: key the request, count it, and either pass it
/// on (with the client key for later stages and `RateLimit` headers) or answer 429. A plain
/// `Service` rather than `from_fn`, so an in-process refusal allocates no future.
#[derive(Clone)]
pub struct CeilingLayer(pub Arc<CeilingHttp>);

impl<S> tower::Layer<S> for CeilingLayer {
    type Service = CeilingService<S>;
    fn layer(&self, inner: S) -> CeilingService<S> {
        CeilingService { http: self.0.clone(), inner }
    }
}

#[derive(Clone)]
pub struct CeilingService<S> {
    http: Arc<CeilingHttp>,
    inner: S,
}

type BoxedResponse =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Response, Infallible>> + Send>>;

impl<S> tower::Service<Request<Body>> for CeilingService<S>
where
    S: tower::Service<Request<Body>, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future =
        futures_util::future::Either<std::future::Ready<Result<Response, Infallible>>, BoxedResponse>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        use futures_util::future::Either;
        let peer = request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip())
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let verdict = self.http.ceiling.check_request_now(request.headers(), peer);
        if let Some(Err(CeilingError::Exceeded { key_kind, retry_after_secs })) = verdict {
            // The refusal path touches nothing else: no clone, no allocation of a future.
            return Either::Left(std::future::ready(Ok(self.http.refusal(key_kind, retry_after_secs))));
        }
        let http = self.http.clone();
        // Take the service that was polled ready; leave a fresh clone in its place.
        let fresh = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, fresh);
        match verdict {
            Some(Err(_)) => unreachable!("refused above"),
            Some(Ok(admitted)) => Either::Right(Box::pin(admit(http, inner, request, peer, admitted))),
            None => Either::Right(Box::pin(async move {
                match http.ceiling.check_request(request.headers(), peer).await {
                    Ok(admitted) => admit(http, inner, request, peer, admitted).await,
                    Err(CeilingError::Exceeded { key_kind, retry_after_secs }) => {
                        Ok(http.refusal(key_kind, retry_after_secs))
                    }
                }
            })),
        }
    }
}

/// Passes an admitted request on, with its client key, and adds the `RateLimit` headers.
async fn admit<S>(
    http: Arc<CeilingHttp>,
    mut inner: S,
    mut request: Request<Body>,
    peer: IpAddr,
    admitted: Admitted,
) -> Result<Response, Infallible>
where
    S: tower::Service<Request<Body>, Response = Response, Error = Infallible>,
{
    let key = http.ceiling.client_key(request.headers(), peer);
    request.extensions_mut().insert(key);
    let mut response = inner.call(request).await?;
    let state = format!("\"ceiling\";r={};t={}", admitted.remaining, admitted.reset_secs);
    let headers = response.headers_mut();
    headers.insert(RATELIMIT_POLICY.clone(), http.policy.clone());
    headers.insert(RATELIMIT.clone(), HeaderValue::from_str(&state).expect("ascii"));
    Ok(response)
}

static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// The ceiling plus its refusal answers, rendered once: a refusal must cost less than serving.
pub struct CeilingHttp {
    pub ceiling: Arc<Ceiling>,
    policy: HeaderValue,
    /// (body, `RateLimit` value) per key kind × Retry-After (1..=60 s), built on first use.
    refusals: Vec<std::sync::OnceLock<(axum::body::Bytes, HeaderValue)>>,
}

const KINDS: [&str; 3] = ["session", "api_key", "ip"];
const CACHED_RETRY_SECS: u64 = 60;

impl CeilingHttp {
    pub fn new(ceiling: Arc<Ceiling>) -> Self {
        let policy =
            format!("\"ceiling\";q={};w={}", ceiling.burst, ceiling.burst.div_ceil(ceiling.per_second));
        let slots = KINDS.len() * (CACHED_RETRY_SECS as usize + 1);
        CeilingHttp {
            ceiling,
            policy: HeaderValue::from_str(&policy).expect("ascii"),
            refusals: (0..slots).map(|_| std::sync::OnceLock::new()).collect(),
        }
    }

    fn render(&self, key_kind: &str, retry_after_secs: u64) -> (axum::body::Bytes, HeaderValue) {
        let data = serde_json::json!({
            "error": "rate_limited",
            "axis": "ceiling",
            "key_kind": key_kind,
            "limit": self.ceiling.burst,
            "per_second": self.ceiling.per_second,
            "retry_after_seconds": retry_after_secs,
            "charged": false,
        });
        let body = serde_json::json!({
            "jsonrpc": "2.0",
            "id": null,
            "error": {
                "code": -32000,
                "message": format!("rate limited (per-{key_kind} ceiling): retry in {retry_after_secs}s"),
                "data": data,
            },
        });
        let state = format!("\"ceiling\";r=0;t={retry_after_secs}");
        (body.to_string().into(), HeaderValue::from_str(&state).expect("ascii"))
    }

    fn refusal(&self, key_kind: &'static str, retry_after_secs: u64) -> Response {
        let kind = match key_kind {
            "session" => 0,
            "api_key" => 1,
            _ => 2,
        };
        let (body, state) = if retry_after_secs <= CACHED_RETRY_SECS {
            let slot = kind * (CACHED_RETRY_SECS as usize + 1) + retry_after_secs as usize;
            self.refusals[slot].get_or_init(|| self.render(key_kind, retry_after_secs)).clone()
        } else {
            self.render(key_kind, retry_after_secs)
        };
        let mut response = Response::new(Body::from(body));
        *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
        headers.insert(RATELIMIT_POLICY.clone(), self.policy.clone());
        headers.insert(RATELIMIT.clone(), state);
        response
    }
}
