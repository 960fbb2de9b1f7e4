//! Streamable HTTP transport: serves MCP clients with and without `Mcp-Session-Id` sessions.
//!
//! rmcp serves either with sessions (the handshake era, 2025-06-18/2025-11-25) or statelessly
//! (the 2026-07-28 era, and clients that never initialize). tollgate runs both behind one URL:
//! a request that carries a session id, or that is an `initialize`, goes to the session-keeping
//! service (which issues the id); everything else is served statelessly. Either way every
//! `tools/call` reaches the same handler, so payment behaviour cannot differ between them.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::state::AppState;

mod direct;
pub mod mcp;
mod sessions;

use mcp::McpServer;
use sessions::TrackedSessions;

pub const SESSION_HEADER: &str = "mcp-session-id";

type Service = StreamableHttpService<McpServer, TrackedSessions>;

/// The two rmcp services and the body limit they share. Shared by every request (an `Arc`):
/// the services are cloned only for a request that goes to rmcp.
pub struct McpTransport {
    app: Arc<AppState>,
    /// `server.allowed_hosts`, which the direct path checks as rmcp does.
    allowed_hosts: Arc<[String]>,
    /// Who holds which session: an `initialize` past a client's share is refused here.
    live: Arc<crate::ceiling::LiveSessions>,
    with_sessions: Service,
    /// The session manager of `with_sessions`, which the transport touches and sweeps.
    sessions: Arc<TrackedSessions>,
    stateless: Service,
    max_body_bytes: usize,
}

impl McpTransport {
    pub fn new(app: Arc<AppState>, cancel: CancellationToken) -> Self {
        let server = &app.config.server;
        let cancel_sweeper = cancel.clone();
        let base = StreamableHttpServerConfig::default()
            .with_cancellation_token(cancel)
            .with_max_request_body_bytes(server.max_body_bytes);
        let base = if server.allowed_hosts.is_empty() {
            base.disable_allowed_hosts()
        } else {
            base.with_allowed_hosts(server.allowed_hosts.clone())
        };
        let factory_app = app.clone();
        let factory = move || Ok(McpServer::new(factory_app.clone()));
        let live = app.ceiling.sessions.clone();
        let sessions = Arc::new(TrackedSessions::new(live.clone()));
        let with_sessions = StreamableHttpService::new(
            factory.clone(),
            sessions.clone(),
            base.clone().with_legacy_session_mode(true),
        );
        tokio::spawn(sweep_idle_sessions(sessions.clone(), cancel_sweeper));
        let stateless = StreamableHttpService::new(
            factory,
            Arc::new(TrackedSessions::new(live)),
            base.with_legacy_session_mode(false).with_json_response(true),
        );
        let live = app.ceiling.sessions.clone();
        let (allowed_hosts, max_body_bytes) = (server.allowed_hosts.clone().into(), server.max_body_bytes);
        McpTransport { app, allowed_hosts, live, with_sessions, sessions, stateless, max_body_bytes }
    }
}

/// Closes idle sessions every so often, until the server stops.
async fn sweep_idle_sessions(sessions: Arc<TrackedSessions>, cancel: CancellationToken) {
    let mut every = tokio::time::interval(sessions::SESSION_IDLE / 10);
    loop {
        tokio::select! {
            _ = every.tick() => sessions.sweep(std::time::Instant::now(), sessions::SESSION_IDLE).await,
            _ = cancel.cancelled() => return,
        }
    }
}

/// Only the method name is read here; rmcp parses and validates the message itself.
#[derive(Deserialize)]
struct MethodPeek<'a> {
    #[serde(borrow)]
    method: Option<&'a str>,
}

fn is_initialize(body: &Bytes) -> bool {
    serde_json::from_slice::<MethodPeek>(body).ok().and_then(|p| p.method) == Some("initialize")
}

/// `POST|GET|DELETE /mcp`.
pub async fn mcp_endpoint(State(t): State<Arc<McpTransport>>, request: Request) -> Response {
    let session = request.headers().get(SESSION_HEADER).map(|id| id.to_str().ok().map(str::to_owned));
    // A POST on a live session of ours may take the direct path; anything else on a session
    // (an unknown one included, which rmcp answers 404) is rmcp's.
    let live_session = matches!(&session, Some(Some(id)) if t.live.is_live(id));
    if let (true, Some(Some(id))) = (live_session, &session) {
        t.sessions.touch(id, std::time::Instant::now());
    }
    if request.method() != Method::POST || (session.is_some() && !live_session) {
        return serve(t.with_sessions.clone(), request).await;
    }
    let (parts, body) = request.into_parts();
    let bytes = match axum::body::to_bytes(body, t.max_body_bytes).await {
        Ok(bytes) => bytes,
        Err(_) => return body_too_large(t.max_body_bytes),
    };
    // A plain tools/call is answered directly (see `direct`); the rest goes to rmcp.
    let (parts, bytes) = match direct::try_serve(&t.app, &t.allowed_hosts, parts, bytes).await {
        Ok(answered) => return answered,
        Err(request) => request,
    };
    if live_session {
        return serve(t.with_sessions.clone(), Request::from_parts(parts, Body::from(bytes))).await;
    }
    if !is_initialize(&bytes) {
        return serve(t.stateless.clone(), Request::from_parts(parts, Body::from(bytes))).await;
    }
    // A new session is a new ceiling bucket: each client may hold only so many.
    let client =
        parts.extensions.get::<crate::ceiling::ClientIdentity>().map(|c| c.0.to_string()).unwrap_or_default();
    if let Err(refusal) = t.live.may_open(&client) {
        return session_refused(refusal);
    }
    let response = serve(t.with_sessions.clone(), Request::from_parts(parts, Body::from(bytes))).await;
    if let Some(id) = response.headers().get(SESSION_HEADER).and_then(|v| v.to_str().ok()) {
        t.live.opened_by(id, &client);
    }
    response
}

fn session_refused(refusal: crate::ceiling::SessionRefusal) -> Response {
    use crate::ceiling::SessionRefusal;
    let (status, message, data) = match refusal {
        SessionRefusal::PerClient { limit } => (
            StatusCode::TOO_MANY_REQUESTS,
            format!("this client holds {limit} open sessions already: reuse one, or close one (DELETE)"),
            serde_json::json!({ "error": "session_limit", "limit": limit, "charged": false }),
        ),
        SessionRefusal::Full => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the server holds as many sessions as it can; retry shortly".to_owned(),
            serde_json::json!({ "error": "sessions_full", "retry_after_seconds": 5, "charged": false }),
        ),
    };
    jsonrpc_error(status, -32000, &message, data)
}

async fn serve(service: Service, request: Request) -> Response {
    let response = match service.oneshot(request).await {
        Ok(response) => response.map(Body::new),
        Err(never) => match never {},
    };
    structured(response).await
}

/// rmcp refuses a malformed request (bad JSON, a batch, a wrong content type or `Accept`, an
/// unknown session) with a plain-text body; clients get a JSON-RPC error instead, with the same
/// HTTP status and rmcp's explanation as the message.
async fn structured(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    // rmcp's refusals are one short line; anything longer is cut, not buffered.
    let text = match axum::body::to_bytes(response.into_body(), 4096).await {
        Ok(bytes) => String::from_utf8_lossy(&bytes).trim().to_owned(),
        Err(_) => String::new(),
    };
    let message =
        if text.is_empty() { status.canonical_reason().unwrap_or("refused").to_owned() } else { text };
    let reason = match status {
        StatusCode::NOT_FOUND => "session_not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::NOT_ACCEPTABLE => "not_acceptable",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_request",
        s if s.is_server_error() => "internal",
        _ => "invalid_request",
    };
    let code = if status.is_server_error() { -32603 } else { -32600 };
    jsonrpc_error(status, code, &message, serde_json::json!({ "error": reason }))
}

/// A JSON-RPC error body for a request we refuse before parsing it.
pub fn jsonrpc_error(status: StatusCode, code: i64, message: &str, data: serde_json::Value) -> Response {
    let body = crate::jsonrpc::error_body(code, message, data);
    (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

fn body_too_large(limit: usize) -> Response {
    jsonrpc_error(
        StatusCode::PAYLOAD_TOO_LARGE,
        -32600,
        "request body too large",
        serde_json::json!({ "error": "body_too_large", "limit_bytes": limit }),
    )
}
