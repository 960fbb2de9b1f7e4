//! The ceiling's HTTP face: the outermost service of the server.
//!
//! It sits in front of the router, not inside it, so that refusing a flood costs a header
//! lookup, a hash probe and a pre-rendered answer: no routing, no request id, no span, no body
//! read, no boxed future. `/mcp` is counted in the ceiling; the public listing and log in a
//! bucket of their own; probes and metrics pass through untouched (a flood must not blind the
//! operator's monitoring).
//!
//! `Guarded` is what `axum::serve` is given: it sets TCP_NODELAY on every accepted connection
//! and, for each connection, hands out a `Guard` that
//! knows the peer address (the last-resort client key) and passes it on to the router as
//! `ConnectInfo`, as `into_make_service_with_connect_info` would.

use std::convert::Infallible;
use std::future::{Future, Ready, ready};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use axum::Router;
use axum::body::{Body, Bytes, HttpBody as _};
use axum::extract::ConnectInfo;
use axum::http::{HeaderName, HeaderValue, Request, StatusCode, header};
use axum::response::Response;
use axum::routing::future::RouteFuture;
use futures_util::future::Either;
use tower::Service;

use super::{Admitted, Ceiling, CeilingError, ClientIdentity, ClientKey};

/// The path the ceiling counts.
const GUARDED_PATH: &str = "/mcp";

static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// Makes one `Guard` per accepted connection.
#[derive(Clone)]
pub struct Guarded {
    http: Arc<CeilingHttp>,
    router: Router,
}

impl Guarded {
    pub fn new(router: Router, ceiling: Arc<Ceiling>) -> Self {
        Guarded { http: Arc::new(CeilingHttp::new(ceiling)), router }
    }

    /// The service for one connection from `peer`.
    pub fn for_peer(&self, peer: SocketAddr) -> Guard {
        Guard { http: self.http.clone(), router: self.router.clone(), peer }
    }
}

impl<'a> Service<axum::serve::IncomingStream<'a, tokio::net::TcpListener>> for Guarded {
    type Response = Guard;
    type Error = Infallible;
    type Future = Ready<Result<Guard, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, stream: axum::serve::IncomingStream<'a, tokio::net::TcpListener>) -> Self::Future {
        // Nagle's algorithm would hold each small write (an SSE event, a short JSON answer)
        // until the client's delayed ACK, ~40 ms on Linux: every answer is small and wanted now.
        // A socket that refuses the option still serves, only slower.
        if let Err(e) = stream.io().set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set on an accepted connection");
        }
        ready(Ok(self.for_peer(*stream.remote_addr())))
    }
}

/// One connection's service: count `/mcp` requests, refuse or pass them on.
#[derive(Clone)]
pub struct Guard {
    http: Arc<CeilingHttp>,
    router: Router,
    peer: SocketAddr,
}

type Boxed = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

impl Service<Request<Body>> for Guard {
    type Response = Response;
    type Error = Infallible;
    /// Refused: an already-made answer. Not counted: the router's own future. Admitted (or
    /// asked of Redis): boxed, since the `RateLimit` headers are added after the handler.
    type Future = Either<Ready<Result<Response, Infallible>>, Either<RouteFuture<Infallible>, Boxed>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The router is always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let path = request.uri().path();
        if path != GUARDED_PATH {
            if is_public(path)
                && let Err(retry_after_secs) =
                    self.http.ceiling.check_public(request.headers(), self.peer.ip())
            {
                let bodiless = request.body().is_end_stream();
                return Either::Left(ready(Ok(public_refusal(retry_after_secs, bodiless))));
            }
            request.extensions_mut().insert(ConnectInfo(self.peer));
            return Either::Right(Either::Left(self.router.call(request)));
        }
        let peer = self.peer.ip();
        let verdict = self.http.ceiling.check_request_now(request.headers(), peer);
        if let Some(Err(CeilingError::Exceeded { key_kind, retry_after_secs })) = verdict {
            let refusal = self.http.refusal(key_kind, retry_after_secs);
            if request.body().is_end_stream() {
                return Either::Left(ready(Ok(refusal)));
            }
            return Either::Right(Either::Right(Box::pin(async move {
                Ok(discard_body_then(request, refusal).await)
            })));
        }
        // Only a request that goes on needs the peer in its extensions (a first insert allocates).
        request.extensions_mut().insert(ConnectInfo(self.peer));
        let (http, router) = (self.http.clone(), self.router.clone());
        Either::Right(Either::Right(Box::pin(async move {
            let admitted = match verdict {
                Some(decision) => decision,
                // Fleet mode: the shared bucket lives in Redis.
                None => http.ceiling.check_request(request.headers(), peer).await,
            };
            match admitted {
                Ok(admitted) => Ok(admit(&http, router, request, peer, admitted).await),
                Err(CeilingError::Exceeded { key_kind, retry_after_secs }) => {
                    Ok(discard_body_then(request, http.refusal(key_kind, retry_after_secs)).await)
                }
            }
        })))
    }
}

/// The public read-only endpoints, under their own bucket: the listing and the transparency
/// log. Probes and metrics are not (a flood must not blind the operator's monitoring).
fn is_public(path: &str) -> bool {
    path.starts_with("/log/") || path == "/.well-known/x402"
}

/// A public endpoint's refusal. A request with a body (a wallet's receipt listing) is answered
/// with `Connection: close` rather than waiting to read a body it will not use.
fn public_refusal(retry_after_secs: u64, bodiless: bool) -> Response {
    let body = serde_json::json!({
        "error": "rate_limited",
        "axis": "public",
        "message": format!("too many requests to the public endpoints; retry in {retry_after_secs}s"),
        "retry_after_seconds": retry_after_secs,
    });
    let mut response = Response::new(Body::from(body.to_string()));
    *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
    if !bodiless {
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// Bodies a refusal reads (and drops) before answering, at most.
const DISCARD_LIMIT: usize = 64 * 1024;
/// Longest a refusal waits for the rest of a body.
const DISCARD_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Reads and drops the refused request's body before the answer goes out. Answering first
/// leaves the body's bytes on a keep-alive connection; the connection is then torn down under
/// the client's next request ("server disconnected"), and a refused agent never sees its 429.
/// A body too large or too slow to read is answered with `Connection: close` instead.
async fn discard_body_then(request: Request<Body>, mut refusal: Response) -> Response {
    let read = axum::body::to_bytes(request.into_body(), DISCARD_LIMIT);
    if !matches!(tokio::time::timeout(DISCARD_WAIT, read).await, Ok(Ok(_))) {
        refusal.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    refusal
}

/// Passes an admitted request on, with its client key for the wallet limits' `agent` axis and
/// its identity for the budgets a session must not multiply,
/// and adds the `RateLimit` headers to the answer.
async fn admit(
    http: &CeilingHttp,
    mut router: Router,
    mut request: Request<Body>,
    peer: IpAddr,
    admitted: Admitted,
) -> Response {
    let key = http.ceiling.client_key(request.headers(), peer);
    let identity = match &key {
        ClientKey::Session(_) => http.ceiling.client_identity(request.headers(), peer),
        other => ClientIdentity(other.clone()),
    };
    request.extensions_mut().insert(key);
    request.extensions_mut().insert(identity);
    let mut response = match router.call(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    let state = format!("\"ceiling\";r={};t={}", admitted.remaining, admitted.reset_secs);
    let headers = response.headers_mut();
    headers.insert(RATELIMIT_POLICY.clone(), http.policy.clone());
    headers.insert(RATELIMIT.clone(), HeaderValue::from_str(&state).expect("ascii"));
    response
}

/// The ceiling plus its refusal answers, rendered once: a refusal must cost less than serving.
pub struct CeilingHttp {
    pub ceiling: Arc<Ceiling>,
    policy: HeaderValue,
    /// Per key kind × Retry-After (1..=60 s), built on first use.
    refusals: Vec<OnceLock<Refusal>>,
}

/// A rendered refusal: cloning it copies reference counts, not bytes.
#[derive(Clone)]
struct Refusal {
    body: Bytes,
    retry_after: HeaderValue,
    state: HeaderValue,
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
            refusals: (0..slots).map(|_| OnceLock::new()).collect(),
        }
    }

    fn render(&self, key_kind: &str, retry_after_secs: u64) -> Refusal {
        let data = serde_json::json!({
            "error": "rate_limited",
            "axis": "ceiling",
            "key_kind": key_kind,
            "limit": self.ceiling.burst,
            "per_second": self.ceiling.per_second,
            "retry_after_seconds": retry_after_secs,
            "charged": false,
        });
        let message = format!("rate limited (per-{key_kind} ceiling): retry in {retry_after_secs}s");
        let body = crate::jsonrpc::error_body(-32000, &message, data);
        let state = format!("\"ceiling\";r=0;t={retry_after_secs}");
        Refusal {
            body: body.to_string().into(),
            retry_after: HeaderValue::from(retry_after_secs),
            state: HeaderValue::from_str(&state).expect("ascii"),
        }
    }

    fn refusal(&self, key_kind: &'static str, retry_after_secs: u64) -> Response {
        let kind = KINDS.iter().position(|k| *k == key_kind).unwrap_or(KINDS.len() - 1);
        let refusal = if retry_after_secs <= CACHED_RETRY_SECS {
            let slot = kind * (CACHED_RETRY_SECS as usize + 1) + retry_after_secs as usize;
            self.refusals[slot].get_or_init(|| self.render(key_kind, retry_after_secs)).clone()
        } else {
            self.render(key_kind, retry_after_secs)
        };
        let mut response = Response::new(Body::from(refusal.body));
        *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(header::RETRY_AFTER, refusal.retry_after);
        headers.insert(RATELIMIT_POLICY.clone(), self.policy.clone());
        headers.insert(RATELIMIT.clone(), refusal.state);
        response
    }
}
