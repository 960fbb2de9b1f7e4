//! How each outcome of a tool call is rendered as an MCP `CallToolResult`.
//!
//! Side-effect free. A challenge carries `x402Version` + `accepts` (the only shape a client may
//! pay from); every other refusal deliberately carries neither, so no client mistakes it for
//! a price.

use rmcp::model::{CallToolResult, ContentBlock};
use serde_json::{Value, json};

use crate::payment::wire::PaymentRequired;

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

/// A refusal that is not a price: a reason code, a message, and whether money moved.
pub fn refusal(error: &str, message: &str, charged: bool, extra: Value) -> CallToolResult {
    let mut body = json!({ "error": error, "message": message, "charged": charged });
    if let (Value::Object(body), Value::Object(extra)) = (&mut body, extra) {
        body.extend(extra);
    }
    CallToolResult::structured_error(body)
}
