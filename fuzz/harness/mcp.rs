//! The MCP request fuzz input format and the invariants every answer must keep. Shared by the
//! libFuzzer target (`fuzz/fuzz_targets/mcp_request.rs`, in process) and the regression test
//! (`tests/api/fuzz_regressions.rs`, over real HTTP), so a crash input replays the same way.
//!
//! Input: one flags byte, then up to three segments separated by NUL: `session id`, `payment
//! header`, `body` (fewer segments: the last one present is the body). Flags: bits 0–1 the
//! method (POST, POST, GET, DELETE); bit 2 send the session segment as `Mcp-Session-Id`; bit 3
//! send the payment segment as `PAYMENT-SIGNATURE`; bits 4–5 the `Accept` header (both, JSON
//! only, SSE only, none); bit 6 a non-JSON content type. Wherever `"$PAYMENT"` appears (in the
//! body, or as the whole payment segment), a genuinely signed payment for `sha256` is put in,
//! so mutations around a valid signature reach the limits, the claim and the chain.

use http::{HeaderName, HeaderValue, Method, Request};

pub const PAYMENT_SLOT: &[u8] = b"\"$PAYMENT\"";

/// Builds the request `data` describes; `payment` is the signed payment's JSON.
pub fn build(data: &[u8], payment: &[u8]) -> Request<Vec<u8>> {
    let (flags, rest) = data.split_first().map_or((0, &[][..]), |(f, r)| (*f, r));
    let segments: Vec<&[u8]> = rest.splitn(3, |b| *b == 0).collect();
    let (session, header, body) = match segments.as_slice() {
        [body] => (None, None, *body),
        [session, body] => (Some(*session), None, *body),
        [session, header, body] => (Some(*session), Some(*header), *body),
        _ => (None, None, &[][..]),
    };
    let method = match flags & 0b11 {
        2 => Method::GET,
        3 => Method::DELETE,
        _ => Method::POST,
    };
    // As every HTTP/1.1 client sends it (the transport checks it against DNS rebinding).
    let mut request = Request::builder().method(method).uri("/mcp").header("host", "127.0.0.1");
    let accept = match (flags >> 4) & 0b11 {
        0 => Some("application/json, text/event-stream"),
        1 => Some("application/json"),
        2 => Some("text/event-stream"),
        _ => None,
    };
    if let Some(accept) = accept {
        request = request.header("accept", accept);
    }
    let content_type = if flags & 0x40 == 0 { "application/json" } else { "text/plain" };
    request = request.header("content-type", content_type);
    let mut extra = Vec::new();
    if let Some(session) = session.filter(|_| flags & 0x04 != 0) {
        extra.push(("mcp-session-id", session.to_vec()));
    }
    if let Some(header) = header.filter(|_| flags & 0x08 != 0) {
        let value = if header == PAYMENT_SLOT {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.encode(payment).into_bytes()
        } else {
            header.to_vec()
        };
        extra.push(("payment-signature", value));
    }
    for (name, value) in extra {
        // Bytes no header may carry are simply not sent (a client could not send them either).
        if let Ok(value) = HeaderValue::from_bytes(&value) {
            request = request.header(HeaderName::from_static(name), value);
        }
    }
    request.body(splice(body, payment)).expect("a request from valid parts")
}

fn splice(body: &[u8], payment: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len());
    let mut rest = body;
    while let Some(at) = rest.windows(PAYMENT_SLOT.len()).position(|w| w == PAYMENT_SLOT) {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(payment);
        rest = &rest[at + PAYMENT_SLOT.len()..];
    }
    out.extend_from_slice(rest);
    out
}

/// What must hold for any input, with a chain that cannot be reached (so nothing can settle):
/// no internal error, no paid result, JSON where JSON is promised, and every refusal a
/// JSON-RPC error a client can read.
pub fn check(status: u16, content_type: &str, body: &[u8]) -> Result<(), String> {
    if status >= 500 {
        return Err(format!("status {status}: {}", String::from_utf8_lossy(body)));
    }
    if body.windows(16).any(|w| w == b"tollgate/receipt") {
        return Err("a receipt without a settlement".into());
    }
    if status >= 400 {
        let error = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v.get("error").filter(|e| e["code"].is_i64() && e["message"].is_string()).cloned());
        if error.is_none() {
            return Err(format!(
                "status {status} without a JSON-RPC error: {}",
                String::from_utf8_lossy(body)
            ));
        }
    }
    if content_type.starts_with("application/json") && !body.is_empty() {
        serde_json::from_slice::<serde_json::Value>(body)
            .map_err(|e| format!("invalid JSON answer ({e}): {}", String::from_utf8_lossy(body)))?;
    }
    Ok(())
}
