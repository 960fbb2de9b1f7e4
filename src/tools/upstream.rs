//! Upstream MCP servers whose tools tollgate sells: reached by a stdio command or a Streamable
//! HTTP URL with rmcp's client, listed at start, and re-connected when they go away.
//!
//! Guarantees: a priced upstream tool is probed before payment is taken, so nobody pays for a
//! call that cannot run; a dead stdio child is respawned (with backoff) and an HTTP upstream
//! re-connected on the next call. Does not retry a call that failed mid-flight: it may have
//! run, so the failure is returned (and recorded in the receipt) rather than repeated.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rmcp::model::{CallToolRequestParams, CallToolResult, ContentBlock, JsonObject, Tool};
use rmcp::service::RunningService;
use rmcp::transport::{StreamableHttpClientTransport, TokioChildProcess};
use rmcp::{RoleClient, ServiceExt};
use tokio::sync::Mutex;

use super::catalog::ToolHandler;
use crate::config::UpstreamConfig;

/// How long one probe or call may take before the upstream counts as unavailable.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Reconnect backoff bounds.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

type Client = RunningService<RoleClient, ()>;

struct Connection {
    client: Option<Client>,
    /// No reconnect attempt before this instant (after a failure).
    retry_at: Option<Instant>,
    backoff: Duration,
}

/// One upstream server.
pub struct Upstream {
    pub name: String,
    command: Vec<String>,
    url: String,
    /// Largest result served (and stored, and receipted) from this upstream.
    max_result_bytes: usize,
    conn: Mutex<Connection>,
}

impl Upstream {
    pub fn new(c: &UpstreamConfig) -> Upstream {
        Upstream {
            name: c.name.clone(),
            command: c.command.clone(),
            url: c.url.clone(),
            max_result_bytes: c.max_result_bytes,
            conn: Mutex::new(Connection { client: None, retry_at: None, backoff: BACKOFF_MIN }),
        }
    }

    async fn connect(&self) -> anyhow::Result<Client> {
        if let Some((program, args)) = self.command.split_first() {
            let mut command = tokio::process::Command::new(program);
            command.args(args).kill_on_drop(true);
            let transport = TokioChildProcess::new(command).with_context(|| format!("spawning {program}"))?;
            Ok(().serve(transport).await?)
        } else {
            let transport = StreamableHttpClientTransport::from_uri(self.url.clone());
            Ok(().serve(transport).await?)
        }
    }

    /// A live client, (re)connecting when needed and allowed by the backoff.
    async fn client(&self) -> Result<rmcp::Peer<RoleClient>, String> {
        let mut conn = self.conn.lock().await;
        if let Some(client) = conn.client.as_ref().filter(|c| !c.is_closed()) {
            return Ok(client.peer().clone());
        }
        if conn.retry_at.is_some_and(|t| Instant::now() < t) {
            return Err(format!("upstream `{}` is down; reconnecting with backoff", self.name));
        }
        match tokio::time::timeout(PROBE_TIMEOUT * 2, self.connect()).await {
            Ok(Ok(client)) => {
                tracing::info!(upstream = %self.name, "upstream connected");
                let peer = client.peer().clone();
                *conn = Connection { client: Some(client), retry_at: None, backoff: BACKOFF_MIN };
                Ok(peer)
            }
            outcome => {
                let why = match outcome {
                    // Connect errors carry the upstream's URL, and with it any key: cut to the host.
                    Ok(Err(e)) => crate::redact::urls(&format!("{e:#}")),
                    _ => "connection timed out".to_owned(),
                };
                conn.client = None;
                conn.retry_at = Some(Instant::now() + conn.backoff);
                conn.backoff = (conn.backoff * 2).min(BACKOFF_MAX);
                tracing::warn!(upstream = %self.name, error = %why, "upstream unavailable");
                Err(format!("upstream `{}` is unavailable: {why}", self.name))
            }
        }
    }

    /// Forgets the connection after a transport failure, so the next use reconnects.
    async fn drop_connection(&self) {
        self.conn.lock().await.client = None;
    }

    pub async fn list_tools(&self) -> anyhow::Result<Vec<Tool>> {
        let peer = self.client().await.map_err(anyhow::Error::msg)?;
        Ok(peer.list_all_tools().await?)
    }

    /// A round trip, so a hung or dead upstream is found before anyone pays.
    pub async fn probe(&self) -> Result<(), String> {
        let peer = self.client().await?;
        match tokio::time::timeout(PROBE_TIMEOUT, peer.list_tools(None)).await {
            Ok(Ok(_)) => Ok(()),
            _ => {
                self.drop_connection().await;
                // One immediate reconnect: a restarted upstream should not cost a refusal.
                let peer = self.client().await?;
                match tokio::time::timeout(PROBE_TIMEOUT, peer.list_tools(None)).await {
                    Ok(Ok(_)) => Ok(()),
                    _ => Err(format!("upstream `{}` does not answer", self.name)),
                }
            }
        }
    }

    pub async fn call(&self, tool: &str, args: JsonObject) -> CallToolResult {
        let failed = |why: String| CallToolResult::error(vec![ContentBlock::text(why)]);
        let peer = match self.client().await {
            Ok(peer) => peer,
            Err(why) => return failed(why),
        };
        let params = CallToolRequestParams::new(tool.to_owned()).with_arguments(args);
        match tokio::time::timeout(CALL_TIMEOUT, peer.call_tool(params)).await {
            Ok(Ok(result)) => self.bounded(result),
            Ok(Err(e)) => {
                self.drop_connection().await;
                // A throttled HTTP upstream (429, 503): its Retry-After pauses its sales.
                if let Some((status, retry_after)) = http_status(&e) {
                    return crate::protect::throttle::http_throttled(
                        &self.name,
                        status,
                        retry_after.as_deref(),
                    );
                }
                // The error may name the upstream's URL, and with it a key: cut to the host.
                failed(crate::redact::urls(&format!("upstream `{}` failed: {e}", self.name)))
            }
            Err(_) => failed(format!("upstream `{}` timed out", self.name)),
        }
    }
}

impl Upstream {
    /// The result, or a clear error if it is larger than this upstream may send. (rmcp has
    /// read it by then; the bound keeps it out of answers, stored results and receipts.)
    fn bounded(&self, result: CallToolResult) -> CallToolResult {
        let size = serde_json::to_vec(&result).map_or(usize::MAX, |b| b.len());
        if size <= self.max_result_bytes {
            return result;
        }
        CallToolResult::structured_error(serde_json::json!({
            "error": "result_too_large",
            "message": format!("upstream `{}` answered {size} bytes, more than its max_result_bytes", self.name),
            "limit_bytes": self.max_result_bytes,
        }))
    }
}

/// The HTTP status (429 or 503) and raw `Retry-After` a failed call ran into, if that is why
/// it failed. rmcp's streamable HTTP client keeps them in its error, inside the service error's
/// source chain (its `HttpStatus` variant is transparent, so the chain itself skips them).
fn http_status(e: &rmcp::ServiceError) -> Option<(u16, Option<String>)> {
    use rmcp::transport::streamable_http_client::{HttpStatusError, StreamableHttpError};
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(current) = source {
        let status = match current.downcast_ref::<StreamableHttpError<reqwest::Error>>() {
            Some(StreamableHttpError::HttpStatus(status)) => Some(status),
            _ => current.downcast_ref::<HttpStatusError>(),
        };
        if let Some(status) = status.filter(|s| s.status == 429 || s.status == 503) {
            return Some((status.status, status.retry_after.clone()));
        }
        source = current.source();
    }
    None
}

/// One upstream tool, as the catalog sees it.
pub struct UpstreamTool {
    pub upstream: Arc<Upstream>,
    /// The tool's name on the upstream (the catalog may show it with a prefix).
    pub remote: String,
}

#[async_trait::async_trait]
impl ToolHandler for UpstreamTool {
    async fn call(&self, args: JsonObject) -> CallToolResult {
        self.upstream.call(&self.remote, args).await
    }

    async fn ready(&self) -> Result<(), String> {
        self.upstream.probe().await
    }
}
