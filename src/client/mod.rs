//! The paying client behind `tollgate call`: speaks MCP Streamable HTTP to any x402 server,
//! answers a PaymentRequired by signing an EIP-3009 authorization within its spend caps, and
//! resends the *same* payment while a settlement is pending — never a second one.

pub mod caps;
pub mod sign;

use std::time::Duration;

use alloy::signers::local::PrivateKeySigner;
use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::clock::{Clock, SystemClock};
use crate::money::UsdcAmount;
use crate::payment::wire::{META_PAYMENT, META_PAYMENT_RESPONSE, PaymentRequirements};
use caps::SpendCaps;
use sign::{SignParams, sign_payment};

/// A JSON-RPC session with one MCP server (with `Mcp-Session-Id` when the server issues one).
pub struct McpSession {
    http: reqwest::Client,
    url: String,
    session: Option<String>,
    next_id: std::sync::atomic::AtomicU64,
}

const PROTOCOL_VERSION: &str = "2025-06-18";

impl McpSession {
    /// Performs the `initialize` handshake, which every MCP server generation accepts.
    pub async fn connect(url: &str) -> anyhow::Result<McpSession> {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(120)).build()?;
        let mut s = McpSession { http, url: url.to_owned(), session: None, next_id: 1.into() };
        let params = json!({
            "protocolVersion": PROTOCOL_VERSION,
            "capabilities": {},
            "clientInfo": { "name": "tollgate-call", "version": env!("CARGO_PKG_VERSION") }
        });
        let response = s.send(&s.envelope("initialize", params)).await?;
        s.session = response.headers().get("mcp-session-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let init = read_jsonrpc(response).await?;
        if let Some(error) = init.get("error") {
            bail!("initialize failed: {error}");
        }
        s.send(&json!({ "jsonrpc": "2.0", "method": "notifications/initialized" })).await?;
        Ok(s)
    }

    fn envelope(&self, method: &str, params: Value) -> Value {
        let id = self.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params })
    }

    async fn send(&self, body: &Value) -> anyhow::Result<reqwest::Response> {
        let mut request = self
            .http
            .post(&self.url)
            .header("accept", "application/json, text/event-stream")
            .header("mcp-protocol-version", PROTOCOL_VERSION)
            .json(body);
        if let Some(session) = &self.session {
            request = request.header("mcp-session-id", session);
        }
        let response = request.send().await.with_context(|| format!("POST {}", self.url))?;
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            bail!("HTTP {status} from {}: {}", self.url, text.chars().take(500).collect::<String>());
        }
        Ok(response)
    }

    /// `tools/call`; returns the `result` object.
    pub async fn call_tool(&self, name: &str, args: &Value, meta: Option<Value>) -> anyhow::Result<Value> {
        let mut params = json!({ "name": name, "arguments": args });
        if let Some(meta) = meta {
            params["_meta"] = meta;
        }
        let response = read_jsonrpc(self.send(&self.envelope("tools/call", params)).await?).await?;
        if let Some(error) = response.get("error") {
            bail!("tools/call {name} failed: {error}");
        }
        response.get("result").cloned().context("JSON-RPC response without a result")
    }
}

/// Reads a JSON-RPC response sent as plain JSON or inside an SSE stream.
pub async fn read_jsonrpc(response: reqwest::Response) -> anyhow::Result<Value> {
    let is_sse = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let text = response.text().await?;
    if !is_sse {
        return serde_json::from_str(&text).with_context(|| format!("not JSON: {}", truncate(&text)));
    }
    text.lines()
        .filter_map(|line| line.strip_prefix("data:"))
        .filter_map(|data| serde_json::from_str::<Value>(data.trim()).ok())
        .find(|message| message.get("id").is_some())
        .with_context(|| format!("no JSON-RPC response in the event stream: {}", truncate(&text)))
}

fn truncate(s: &str) -> String {
    s.chars().take(300).collect()
}

/// The x402 PaymentRequired inside a tool result, if that is what it is.
pub fn payment_required(result: &Value) -> Option<Value> {
    if result.get("isError") != Some(&Value::Bool(true)) {
        return None;
    }
    let is_402 = |v: &Value| v.get("x402Version").is_some() && v.get("accepts").is_some();
    if let Some(structured) = result.get("structuredContent").filter(|v| is_402(v)) {
        return Some(structured.clone());
    }
    let text = result.pointer("/content/0/text")?.as_str()?;
    serde_json::from_str::<Value>(text).ok().filter(is_402)
}

/// What one paid (or free) call ended with.
#[derive(Debug)]
pub struct CallOutcome {
    pub result: Value,
    /// The server's `x402/payment-response`, when a payment settled.
    pub payment_response: Option<Value>,
    /// What was paid, when a payment was sent.
    pub paid: Option<(UsdcAmount, PaymentRequirements)>,
}

/// Everything `tollgate call` needs.
pub struct CallRequest<'a> {
    pub url: &'a str,
    pub tool: &'a str,
    pub args: Value,
    pub signer: &'a PrivateKeySigner,
    pub caps: &'a SpendCaps,
    /// How long to keep resending the same payment while its settlement is pending.
    pub pending_patience: Duration,
}

/// Calls a tool, paying once if the server asks.
pub async fn call(req: CallRequest<'_>) -> anyhow::Result<CallOutcome> {
    let session = McpSession::connect(req.url).await?;
    let first = session.call_tool(req.tool, &req.args, None).await?;
    let Some(required) = payment_required(&first) else {
        return Ok(CallOutcome { result: first, payment_response: None, paid: None });
    };
    let accepts: Vec<PaymentRequirements> = serde_json::from_value(required["accepts"].clone())
        .context("the server's accepts[] is not x402 v2 PaymentRequirements")?;
    let chosen = req.caps.choose(&accepts).map_err(anyhow::Error::msg)?.clone();
    let amount = UsdcAmount::parse(&chosen.amount)?;
    let params = SignParams::standard(SystemClock.now_unix(), chosen.max_timeout_seconds);
    let mut payload = sign_payment(req.signer, &chosen, required.get("resource"), &params)?;
    if let Some(extensions) = required.get("extensions").filter(|e| e.is_object()) {
        // Servers expect their declared extensions echoed (e.g. bazaar cataloguing).
        payload["extensions"] = extensions.clone();
    }
    req.caps.reserve(amount).map_err(anyhow::Error::msg)?;
    let meta = json!({ META_PAYMENT: payload });
    let deadline = tokio::time::Instant::now() + req.pending_patience;
    let mut session = Some(session);
    loop {
        // Once a signed authorization is out, every answer that does not prove nothing was
        // charged (a pending or unknown outcome, an internal error, a timeout, a dropped
        // connection) is answered by resending this same payment: never by signing another.
        let answer = match &session {
            Some(s) => s.call_tool(req.tool, &req.args, Some(meta.clone())).await,
            None => Err(anyhow::anyhow!("reconnecting")),
        };
        let unproven = match answer {
            Ok(result) if is_settled(&result) || proves_uncharged(&result) => {
                if !is_settled(&result) {
                    // Refused: the server charged nothing, so the reservation is returned.
                    req.caps.release(amount).map_err(anyhow::Error::msg)?;
                }
                let payment_response = result.pointer(&settlement_pointer()).cloned();
                return Ok(CallOutcome { result, payment_response, paid: Some((amount, chosen)) });
            }
            Ok(result) => {
                let status = result.pointer("/structuredContent/error").and_then(Value::as_str);
                Unproven::Answer(result.clone(), status.unwrap_or("no status").to_owned())
            }
            Err(e) => {
                session = None;
                Unproven::Failed(format!("{e:#}"))
            }
        };
        if tokio::time::Instant::now() >= deadline {
            eprintln!(
                "the payment may have been charged ({}); no second authorization was signed. Resend \
                 later: the server answers the same payment with its outcome.",
                unproven.why()
            );
            let result = match unproven {
                Unproven::Answer(result, _) => result,
                Unproven::Failed(why) => json!({
                    "isError": true,
                    "structuredContent": { "error": "payment_outcome_unknown", "message": why },
                }),
            };
            return Ok(CallOutcome { result, payment_response: None, paid: Some((amount, chosen)) });
        }
        eprintln!(
            "no proof that nothing was charged ({}); resending the same payment (never a new one)…",
            unproven.why()
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        if session.is_none() {
            session = McpSession::connect(req.url).await.ok();
        }
    }
}

/// An answer to a paid request that proves neither a settlement nor that nothing moved.
enum Unproven {
    Answer(Value, String),
    Failed(String),
}

impl Unproven {
    fn why(&self) -> &str {
        match self {
            Unproven::Answer(_, status) => status,
            Unproven::Failed(why) => why,
        }
    }
}

fn settlement_pointer() -> String {
    format!("/_meta/{}", META_PAYMENT_RESPONSE.replace('/', "~1"))
}

/// A paid result: the server's settlement response is attached.
fn is_settled(result: &Value) -> bool {
    result.pointer(&settlement_pointer()).is_some()
}

/// Whether an answer to a paid request proves no money moved: a fresh challenge (the payment
/// was not accepted), or a refusal that says `charged: false`.
pub fn proves_uncharged(result: &Value) -> bool {
    payment_required(result).is_some()
        || result.pointer("/structuredContent/charged") == Some(&Value::Bool(false))
}
