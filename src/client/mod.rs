//! The paying client behind `tollgate call`: speaks MCP Streamable HTTP to any x402 server,
//! answers a PaymentRequired by signing an EIP-3009 authorization within its spend caps, and
//! resends the *same* payment while a settlement is pending — never a second one.

pub mod caps;
pub mod sign;

use std::time::Duration;

use alloy::signers::local::PrivateKeySigner;
use anyhow::Context;
use rmcp::model::{CallToolRequestParams, MetaObject, RequestMetaObject};
use rmcp::service::RunningService;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::{RoleClient, ServiceExt};
use serde_json::{Value, json};

use crate::clock::{Clock, SystemClock};
use crate::money::UsdcAmount;
use crate::payment::wire::{META_PAYMENT, META_PAYMENT_RESPONSE, PaymentRequirements};
use caps::SpendCaps;
use sign::{SignParams, sign_payment};

/// One MCP connection, through rmcp's Streamable HTTP client (the same stack the upstream
/// proxy uses): sessions, SSE and JSON answers, and both protocol eras are rmcp's business.
pub struct McpSession {
    client: RunningService<RoleClient, ()>,
}

/// Longest wait for one answer; a payment's outcome is then asked for again.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

impl McpSession {
    /// Connects and performs the MCP handshake.
    pub async fn connect(url: &str) -> anyhow::Result<McpSession> {
        let transport = StreamableHttpClientTransport::from_uri(url.to_owned());
        let client = ().serve(transport).await.with_context(|| format!("connecting to {url}"))?;
        Ok(McpSession { client })
    }

    /// `tools/call`, with `_meta` when given; returns the result as the server sent it.
    pub async fn call_tool(&self, name: &str, args: &Value, meta: Option<Value>) -> anyhow::Result<Value> {
        let arguments = args.as_object().cloned().context("the arguments must be a JSON object")?;
        let mut params = CallToolRequestParams::new(name.to_owned()).with_arguments(arguments);
        if let Some(Value::Object(meta)) = meta {
            params.meta = Some(RequestMetaObject(MetaObject(meta)));
        }
        let call = self.client.peer().call_tool(params);
        let result = tokio::time::timeout(CALL_TIMEOUT, call)
            .await
            .with_context(|| format!("tools/call {name}: no answer within {}s", CALL_TIMEOUT.as_secs()))?
            .with_context(|| format!("tools/call {name} failed"))?;
        Ok(serde_json::to_value(result)?)
    }
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
