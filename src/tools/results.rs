//! The renderer: the one place that turns a call's outcome, or its error, into an MCP
//! `CallToolResult`.
//!
//! Side-effect free: no logging, no metrics, no I/O. A challenge carries `x402Version` +
//! `accepts` (the only shape a client may pay from); every other refusal deliberately carries
//! neither, so no client mistakes it for a price. A refusal says `charged: false` only when its
//! error proves no money moved (`Money::Unmoved`); otherwise it makes no claim.

use rmcp::model::{CallToolResult, ContentBlock};
use serde_json::{Value, json};

use super::paid_call::{CallError, Paid};
use crate::limits::LimitError;
use crate::payment::gate::Settlement;
use crate::payment::requirements::{ChallengeTemplate, Quote};
use crate::payment::wire::{META_PAYMENT_RESPONSE, PaymentRequired};
use crate::payment::{Money, PaymentError};
use crate::protect::UpstreamRefusal;
use crate::receipt::{META_RECEIPT, SignedReceipt};

/// The `error` text of a first challenge.
pub const PAYMENT_REQUIRED: &str = "Payment required to access this resource";

/// Renders what `PaidCall::try_call` returned. `offer` is this call's quote, as a challenge
/// shows it (computed for these arguments, with its offer token).
pub fn render(offer: Option<&Quote>, outcome: Result<Paid, CallError>) -> CallToolResult {
    match outcome {
        Ok(Paid::Free(result) | Paid::Settled(result) | Paid::Replayed(result)) => result,
        Ok(Paid::Uncharged(result)) => uncharged(result),
        Err(e) => render_error(offer, &e),
    }
}

/// Renders a refusal. `quote` is the call's price, for the answers that carry one.
pub fn render_error(quote: Option<&Quote>, error: &CallError) -> CallToolResult {
    match (error, quote) {
        (CallError::Arguments(e), _) => invalid_arguments(&e.tool, e.problems.clone()),
        (CallError::Price(e), _) => refusal("price_unavailable", &e.to_string(), error.money(), json!({})),
        (CallError::PaymentRequired, Some(quote)) => {
            payment_required(&quote.payment_required(PAYMENT_REQUIRED))
        }
        (CallError::Payment(e), Some(quote)) => payment_error(quote, e),
        (CallError::Payment(e), None) if !e.is_challenge() => payment_status(e),
        (CallError::Limited(e), _) => limited(e),
        (CallError::Upstream(refusal), _) => upstream_refused(refusal),
        (CallError::Unavailable(why), _) => {
            let extra = json!({ "retry_after_seconds": 5 });
            refusal("tool_unavailable", &why.0, error.money(), extra)
        }
        (CallError::PaymentRequired | CallError::Payment(_) | CallError::Internal(_), _) => internal_error(),
    }
}

/// The text an uncharged tool error carries for the agent that reads only `content`.
pub const NOT_CHARGED: &str =
    "Not charged: the tool failed, so its payment was not settled; the payment authorization stays usable.";

/// `meta` key marking whether a call was charged, on answers whose content is the tool's own.
pub const META_CHARGED: &str = "tollgate/charged";

/// A tool error under `charge = "on_success"`: the tool's own answer, marked uncharged.
pub fn uncharged(mut result: CallToolResult) -> CallToolResult {
    result.content.push(ContentBlock::text(NOT_CHARGED));
    let mut meta = result.meta.take().unwrap_or_default();
    meta.0.insert(META_CHARGED.to_owned(), json!(false));
    result.meta = Some(meta);
    result
}

/// The first challenge of `quote` (carrying its offer token) as the JSON of its MCP result,
/// exactly as [`render_error`] renders it, from the quote's template: only the offer is written
/// per call.
pub fn challenge_json(quote: &Quote) -> Option<String> {
    // Offer tokens are digits, a dot and hex: nothing JSON escapes (else: rendered in full).
    let offer = quote.requirements.extra.offer.as_deref()?;
    if !offer.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.') {
        return None;
    }
    let template = quote.challenge_template(|quote| {
        // A placeholder no description or schema can contain: fresh random hex per process.
        let placeholder = format!("offer{}", hex::encode(rand::random::<[u8; 16]>()));
        let mut blank = quote.clone();
        blank.requirements.extra.offer = Some(placeholder.clone());
        let result = payment_required(&blank.payment_required(PAYMENT_REQUIRED));
        ChallengeTemplate::cut(&serde_json::to_string(&result).ok()?, &placeholder)
    })?;
    Some(template.render(offer))
}

/// The x402 MCP-transport PaymentRequired (x402 MCP transport, specs/transports-v2/mcp.md): `isError: true`,
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

/// A refusal that is not a price: a reason code, a message, and what is known about money.
fn refusal(error: &str, message: &str, money: Money, extra: Value) -> CallToolResult {
    let mut body = json!({ "error": error, "message": message });
    if money == Money::Unmoved {
        body["charged"] = json!(false);
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
    payment_status(error)
}

/// A payment accepted or in flight, or one that bought nothing without being refused: its
/// status, never a price.
fn payment_status(error: &PaymentError) -> CallToolResult {
    match error {
        // Pending: money may have moved, so the answer names the transaction and, unlike every
        // other refusal, makes no "charged" claim either way.
        PaymentError::Pending { transaction } => CallToolResult::structured_error(json!({
            "error": error.code(),
            "message": error.to_string(),
            "settlement": "pending",
            "transaction": transaction,
        })),
        _ => refusal(error.code(), &error.to_string(), error.money(), json!({})),
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
        Money::MayHaveMoved,
        json!({}),
    )
}

/// The answer recorded for a paid call whose tool was withdrawn before it could run: the
/// payment settled, so the receipt carries this (and says so).
pub fn withdrawn(tool: &str) -> CallToolResult {
    CallToolResult::structured_error(json!({
        "error": "tool_withdrawn",
        "message": format!("the tool `{tool}` was withdrawn before this paid call could run"),
        "charged": true,
    }))
}

/// A tool ran past `tools.timeout_secs` and was stopped. On a paid call the payment settled
/// before it ran; its receipt records this result.
pub fn tool_timeout(tool: &str, secs: u64) -> CallToolResult {
    CallToolResult::structured_error(json!({
        "error": "tool_timeout",
        "message": format!("the tool `{tool}` did not finish within {secs}s and was stopped"),
    }))
}

/// The upstream's budget or state refused the call before payment: the limits' structured
/// denial on the `upstream` axis; nothing was charged or claimed.
pub fn upstream_refused(refusal: &UpstreamRefusal) -> CallToolResult {
    let (unit, limit, window_seconds, remaining, retry_after_seconds) = match refusal {
        UpstreamRefusal::Paused { retry_after_seconds, .. } => {
            ("pause", 0, *retry_after_seconds, 0, *retry_after_seconds)
        }
        UpstreamRefusal::Quota { limit, window_seconds, remaining, retry_after_seconds, .. } => {
            ("requests", *limit, *window_seconds, *remaining, *retry_after_seconds)
        }
        UpstreamRefusal::Busy { limit, .. } => ("in_flight", u64::from(*limit), 0, 0, 1),
        UpstreamRefusal::Unavailable { .. } => ("requests", 0, 0, 0, 5),
    };
    CallToolResult::structured_error(json!({
        "error": "upstream_limited",
        "message": refusal.to_string(),
        "axis": "upstream",
        "reason": refusal.reason(),
        "upstream": refusal.upstream(),
        "unit": unit,
        "limit": limit,
        "window_seconds": window_seconds,
        "remaining": remaining,
        "retry_after_seconds": retry_after_seconds,
        "charged": false,
    }))
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
        LimitError::TooManyFailures { limit, window_seconds, retry_after_seconds } => json!({
            "error": "rate_limited",
            "message": error.to_string(),
            "axis": "failed_attempts",
            "unit": "requests",
            "limit": limit,
            "window_seconds": window_seconds,
            "remaining": 0,
            "retry_after_seconds": retry_after_seconds,
            "charged": false,
        }),
        LimitError::Penalized { retry_after_seconds } => json!({
            "error": "rate_limited",
            "message": error.to_string(),
            "axis": "wallet",
            "unit": "penalty",
            "limit": 0,
            "remaining": 0,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payment::requirements::test_terms;

    fn quote(description: &str) -> Quote {
        let terms = test_terms();
        let schema = json!({ "type": "object", "properties": { "q": { "type": "string" } } });
        let schema = schema.as_object().unwrap();
        Quote::new(&terms, "search", description, schema, crate::money::UsdcAmount::from_atomic(1000))
    }

    #[test]
    fn a_challenge_from_its_template_is_the_challenge_rendered_in_full() {
        // Table: descriptions that would trip a naive template (quotes, escapes, the word offer).
        let cases = ["plain", "with \"quotes\", a \\ and a\nnewline", "an offer: \"offer\":\"x\""];
        for description in cases {
            for offer in ["1796607086.eebb95817d8395ee9ac14791fecd4908", "1796607087.00ff"] {
                // Arrange: one quote, offered twice (the template is rendered once, then reused).
                let offered = quote(description).with_offer(offer.to_owned());
                // Act
                let fast = challenge_json(&offered).expect("a template");
                let again = challenge_json(&offered).expect("a template");
                // Assert: the same result, value for value, as the full rendering.
                let full =
                    serde_json::to_value(render_error(Some(&offered), &CallError::PaymentRequired)).unwrap();
                let fast: Value = serde_json::from_str(&fast).unwrap();
                assert_eq!(fast, full, "{description:?} / {offer}");
                assert_eq!(serde_json::from_str::<Value>(&again).unwrap(), full);
                assert_eq!(fast["structuredContent"]["accepts"][0]["extra"]["offer"], offer);
            }
        }
        // A token JSON would escape is never templated.
        assert!(challenge_json(&quote("x").with_offer("a\"b".into())).is_none());
    }
}
