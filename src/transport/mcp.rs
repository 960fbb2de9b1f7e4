//! The MCP face of tollgate: an rmcp `ServerHandler` that lists the catalog and sends every
//! `tools/call` through [`PaidCall`](crate::tools::paid_call::PaidCall).
//!
//! This adapter only translates: it finds the tool, gathers the call's payment (from
//! `_meta["x402/payment"]` or the `PAYMENT-SIGNATURE` header) and the caller's identity from
//! the HTTP request, and renders the outcome. Decisions live in the pipeline.

use std::sync::Arc;

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, Implementation, InitializeResult,
    ListToolsResult, PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData as McpError, RoleServer, ServerHandler};

use crate::ceiling::{ClientIdentity, ClientKey};
use crate::payment::decode::PaymentInput;
use crate::payment::wire::META_PAYMENT;
use crate::state::AppState;
use crate::tools::paid_call::{Reply, ToolCall};

/// HTTP header carrying a base64 PaymentPayload (x402 v2 HTTP transport), also honoured on MCP.
pub const PAYMENT_SIGNATURE_HEADER: &str = "payment-signature";

#[derive(Clone)]
pub struct McpServer {
    app: Arc<AppState>,
}

impl McpServer {
    pub fn new(app: Arc<AppState>) -> Self {
        McpServer { app }
    }
}

impl ServerHandler for McpServer {
    fn get_info(&self) -> ServerConfig {
        InitializeResult::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("tollgate", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "Priced tools answer an unpaid call with an x402 PaymentRequired result; \
                 retry with _meta[\"x402/payment\"]. Prices are in each tool's _meta[\"x402/price\"].",
            )
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        Ok(ListToolsResult::with_all_items(listed_tools(&self.app).await))
    }

    fn get_tool(&self, name: &str) -> Option<Tool> {
        self.app.catalog.current().get(name).map(|e| e.tool.clone())
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let parts = context.extensions.get::<http::request::Parts>();
        // rmcp moves a request's `_meta` into the context; read both places to be robust.
        let payment = context.meta.get(META_PAYMENT).cloned();
        call_tool(&self.app, request, payment, parts).await.map(Into::into)
    }
}

/// The catalog's tools, each of a paused upstream marked `_meta["tollgate/paused"]`.
async fn listed_tools(app: &AppState) -> Vec<Tool> {
    let catalog = app.catalog.current();
    let paused = app.protection.paused().await;
    catalog
        .entries()
        .map(|entry| {
            let mut tool = entry.tool.clone();
            if let Some(pause) = entry.upstream().and_then(|(u, _)| crate::protect::paused_meta(u, &paused)) {
                tool.meta
                    .get_or_insert_with(Default::default)
                    .0
                    .insert(crate::protect::META_PAUSED.into(), pause);
            }
            tool
        })
        .collect()
}

/// A `tools/call`, from rmcp's handler or the transport's direct path: finds the tool, gathers
/// the payment (`_meta["x402/payment"]`, else the `PAYMENT-SIGNATURE` header) and the caller's
/// identity from the HTTP request, and runs the pipeline.
pub async fn call_tool(
    app: &AppState,
    request: CallToolRequestParams,
    meta_payment: Option<serde_json::Value>,
    parts: Option<&http::request::Parts>,
) -> Result<CallToolResult, McpError> {
    call_tool_reply(app, request, meta_payment, parts).await.map(Reply::into_result)
}

/// As [`call_tool`], leaving a first challenge unrendered (for the direct path).
pub async fn call_tool_reply(
    app: &AppState,
    request: CallToolRequestParams,
    meta_payment: Option<serde_json::Value>,
    parts: Option<&http::request::Parts>,
) -> Result<Reply, McpError> {
    let name = request.name.as_ref();
    let Some(entry) = app.catalog.current().get(name).cloned() else {
        // A protocol error, as the MCP spec prescribes for unknown tools: nothing is quoted.
        return Err(McpError::invalid_params(format!("unknown tool `{name}`"), None));
    };
    let headers = parts.map(|p| &p.headers);
    let agent =
        parts.and_then(|p| p.extensions.get::<ClientKey>()).map(ToString::to_string).unwrap_or_default();
    let payment = meta_payment
        .or_else(|| request.meta.as_ref().and_then(|m| m.get(META_PAYMENT)).cloned())
        .map(PaymentInput::Meta)
        .or_else(|| {
            let header = headers.and_then(|h| h.get(PAYMENT_SIGNATURE_HEADER))?;
            Some(PaymentInput::Header(header.as_bytes().to_vec()))
        });
    let client =
        parts.and_then(|p| p.extensions.get::<ClientIdentity>()).map(|c| c.0.to_string()).unwrap_or_default();
    let arguments = request.arguments.unwrap_or_default();
    let call = ToolCall { arguments, payment, agent, client };
    Ok(app.paid.reply(&entry, call).await)
}
