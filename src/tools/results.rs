//! How each outcome of a tool call is rendered as an MCP `CallToolResult`.
//!
//! Side-effect free. A challenge carries `x402Version` + `accepts` (the only shape a client may
//! pay from); every other refusal deliberately carries neither, so no client mistakes it for
//! a price.

use rmcp::model::{CallToolResult, ContentBlock};
use serde_json::{Value, json};

use crate::limits::LimitError;
use crate::payment::PaymentError;
use crate::payment::gate::Settlement;
use crate::payment::requirements::Quote;
use crate::payment::wire::{META_PAYMENT_RESPONSE, PaymentRequired};
use crate::receipt::{META_RECEIPT, SignedReceipt};

/// The x402 MCP-transport PaymentRequired (reference/x402.md §4.1): `isError: true`,
/// `structuredContent` = the object, `content[0].text` = the same JSON, from one serialisation.
pub fn payment_required(required: &PaymentRequired) -> CallToolResult {
    let text = serde_json::to_string(required).expect("PaymentRequired serialises");
    let value: Value = serde_json::from_str(&text).expect("round-trips");
    let mut result = CallToolResult::error(vec![ContentBlock::text(text)]);
    result.structured_content = Some(value);
    result
}

/// Arguments do not match the tool's input schema. Nothing was quoted or charged.
pub fn invalid_arguments(tool: &str, problems: Vec<String>) -> CallToolResult {
    CallToolResult::structured_error(json!({
        "error": "invalid_arguments",
        "message": format!("arguments for `{tool}` do not match its input schema"),
        "problems": problems,
        "charged": false,
    }))
}

/// What an answer may say about money. Once a transaction may exist, only `Unknown` or `Yes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Charged {
    /// Nothing moved for this request, provably.
    No,
    /// Money may have moved: the answer makes no claim either way.
    Unknown,
    /// The payment settled.
    Yes,
}

/// A refusal that is not a price: a reason code, a message, and what is known about money.
pub fn refusal(error: &str, message: &str, charged: Charged, extra: Value) -> CallToolResult {
    let mut body = json!({ "error": error, "message": message });
    match charged {
        Charged::No => body["charged"] = json!(false),
        Charged::Yes => body["charged"] = json!(true),
        Charged::Unknown => {}
    }
    if let (Value::Object(body), Value::Object(extra)) = (&mut body, extra) {
        body.extend(extra);
    }
    CallToolResult::structured_error(body)
}

/// A payment that did not buy a result: a re-challenge carrying the reason code when the
/// payment was not accepted, a status otherwise (never a price: the client must not pay again).
pub fn payment_error(quote: &Quote, error: &PaymentError) -> CallToolResult {
    if error.is_challenge() {
        let mut required = quote.payment_required(error.code());
        required.message = Some(error.to_string());
        return payment_required(&required);
    }
    match error {
        // Pending: money may have moved, so the answer names the transaction and, unlike every
        // other refusal, makes no "charged" claim either way.
        PaymentError::Pending { transaction } => CallToolResult::structured_error(json!({
            "error": error.code(),
            "message": error.to_string(),
            "settlement": "pending",
            "transaction": transaction,
        })),
        _ => {
            let charged = match error.charged() {
                Some(false) => Charged::No,
                _ => Charged::Unknown,
            };
            refusal(error.code(), &error.to_string(), charged, json!({}))
        }
    }
}

/// A paid result: the handler's answer, the standard settlement response and the receipt.
pub fn paid(
    mut result: CallToolResult,
    settlement: &Settlement,
    receipt: Option<&SignedReceipt>,
) -> CallToolResult {
    let mut meta = result.meta.take().unwrap_or_default();
    let response = serde_json::to_value(settlement.response()).expect("serialises");
    meta.0.insert(META_PAYMENT_RESPONSE.to_owned(), response);
    if let Some(receipt) = receipt {
        meta.0.insert(META_RECEIPT.to_owned(), crate::receipt::meta_value(receipt));
    }
    result.meta = Some(meta);
    result
}

/// Something failed on our side after the payment was verified; nothing more is known, so
/// the answer makes no claim about money.
pub fn internal_error() -> CallToolResult {
    refusal(
        "internal_error",
        "the server failed while processing this payment; resend the same payment (never a new one) to get its outcome",
        Charged::Unknown,
        json!({}),
    )
}

/// A tool ran past `tools.timeout_secs` and was stopped. On a paid call the payment settled
/// before it ran; its receipt records this result.
pub fn tool_timeout(tool: &str, secs: u64) -> CallToolResult {
    CallToolResult::structured_error(json!({
        "error": "tool_timeout",
        "message": format!("the tool `{tool}` did not finish within {secs}s and was stopped"),
    }))
}

/// The result stored for a completed payment, served again to a replay.
pub fn stored(json: &str) -> CallToolResult {
    serde_json::from_str(json).unwrap_or_else(|e| {
        tracing::error!(error = %e, "stored result does not parse");
        internal_error()
    })
}

/// A wallet-limit refusal: never a price, and nothing was charged or claimed.
pub fn limited(error: &LimitError) -> CallToolResult {
    let body = match error {
        LimitError::Exceeded { axis, unit, limit, window_seconds, remaining, retry_after_seconds } => json!({
            "error": "rate_limited",
            "message": error.to_string(),
            "axis": axis.as_str(),
            "unit": unit.to_string(),
            "limit": limit,
            "window_seconds": window_seconds,
            "remaining": remaining,
            "retry_after_seconds": retry_after_seconds,
            "charged": false,
        }),
        LimitError::Unavailable => json!({
            "error": "limiter_unavailable",
            "message": error.to_string(),
            "retry_after_seconds": 5,
            "charged": false,
        }),
        LimitError::Saturated => json!({
            "error": "limiter_saturated",
            "message": error.to_string(),
            "retry_after_seconds": 1,
            "charged": false,
        }),
    };
    CallToolResult::structured_error(body)
}
