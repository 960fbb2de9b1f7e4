//! `paid_call`: the stages of one `tools/call`, in order. This function is the one place that
//! shows the pipeline after the HTTP layers (DESIGN.md §1, steps 3–10).

use rmcp::model::{CallToolResult, JsonObject};
use serde_json::Value;

use super::catalog::ToolEntry;
use super::results;
use crate::app::AppState;

/// The payment as the client sent it, not yet decoded.
#[derive(Debug, Clone)]
pub enum PaymentInput {
    /// `params._meta["x402/payment"]`: a JSON object, or a base64 string of one.
    Meta(Value),
    /// The `PAYMENT-SIGNATURE` HTTP header (base64 JSON).
    Header(Vec<u8>),
}

/// One `tools/call` for a known tool.
#[derive(Debug, Clone)]
pub struct ToolCall {
    pub arguments: JsonObject,
    pub payment: Option<PaymentInput>,
}

/// The `error` text of a first challenge.
pub const PAYMENT_REQUIRED: &str = "Payment required to access this resource";

pub async fn paid_call(_app: &AppState, entry: &ToolEntry, call: ToolCall) -> CallToolResult {
    // 3. Arguments are checked before anything is quoted or charged.
    if let Err(problems) = entry.validate(&call.arguments) {
        return results::invalid_arguments(&entry.tool.name, problems);
    }
    let Some(quote) = &entry.quote else {
        return entry.run(call.arguments).await;
    };
    // 4. No payment: the challenge.
    let Some(_payment) = call.payment else {
        return results::payment_required(&quote.payment_required(PAYMENT_REQUIRED));
    };
    results::payment_required(&quote.payment_required("payment verification is not enabled"))
}
