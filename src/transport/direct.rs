//! The direct path for `tools/call`, the one request that carries money.
//!
//! rmcp answers each sessionless request by building a service, a one-shot transport, channels
//! and a task, and each request on a session through the session's worker and an SSE stream.
//! A `tools/call` needs none of it: its answer depends on its own message and HTTP request
//! alone. So a plain one, sessionless or on a live session this server issued, is parsed here
//! and handed to the same [`call_tool`] rmcp's handler calls, and its result is answered as
//! `application/json` (which Streamable HTTP allows for any POST). Payment behaviour is the
//! same either way: both paths end in the same function.
//!
//! Anything out of the ordinary goes to rmcp, which answers it as before: another method, a
//! notification or batch, a session this server does not hold, a protocol version of the
//! per-request era or one rmcp does not know, SEP-2243 `Mcp-*` headers, a request for client
//! input (MRTR), an `Accept` or `Content-Type` rmcp would refuse, a `Host` it would check
//! beyond an exact match, or any `Origin`.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode, header, request::Parts};
use axum::response::{IntoResponse, Response};
use futures_util::FutureExt as _;
use rmcp::model::{CallToolRequestParams, ProtocolVersion, RequestId};
use serde::{Deserialize, Serialize};

use super::mcp::{PAYMENT_SIGNATURE_HEADER, call_tool_reply};
use crate::payment::wire::META_PAYMENT;
use crate::state::AppState;
use crate::tools::paid_call::Reply;
use crate::tools::results;

/// A JSON-RPC `tools/call` request, as far as the direct path reads it.
#[derive(Deserialize)]
struct ToolsCall {
    jsonrpc: String,
    id: RequestId,
    method: String,
    params: CallToolRequestParams,
}

#[derive(Serialize)]
struct Answer<'a, T: Serialize> {
    jsonrpc: &'static str,
    id: &'a RequestId,
    #[serde(flatten)]
    outcome: T,
}

#[derive(Serialize)]
#[serde(rename_all = "lowercase")]
enum Outcome {
    Result(rmcp::model::CallToolResult),
    Error(rmcp::ErrorData),
}

/// Protocol versions of the handshake era, answered here; the per-request era (2026-07-28)
/// negotiates inside each message, which rmcp does.
const HANDSHAKE_ERA: [ProtocolVersion; 4] = [
    ProtocolVersion::V_2024_11_05,
    ProtocolVersion::V_2025_03_26,
    ProtocolVersion::V_2025_06_18,
    ProtocolVersion::V_2025_11_25,
];

/// Answers `body` when it is a plain `tools/call` the direct path serves; otherwise hands the
/// request back, untouched, for rmcp.
pub async fn try_serve(
    app: &Arc<AppState>,
    allowed_hosts: &[String],
    parts: Parts,
    body: Bytes,
) -> Result<Response, (Parts, Bytes)> {
    if !plain_headers(&parts.headers, allowed_hosts) {
        return Err((parts, body));
    }
    let Ok(call) = serde_json::from_slice::<ToolsCall>(&body) else {
        return Err((parts, body));
    };
    let p = &call.params;
    let per_request_era = p.meta.as_ref().is_some_and(|m| m.protocol_version().is_some());
    if call.jsonrpc != "2.0"
        || call.method != "tools/call"
        || p.input_responses.is_some()
        || p.request_state.is_some()
        || per_request_era
    {
        return Err((parts, body));
    }
    // A call that brings a payment, or reaches an upstream, runs in a task of its own, as
    // rmcp runs handlers: a client that hangs up mid-call cuts no pipeline short between two
    // of its steps, and frees no upstream slot while the upstream still works on the call.
    // Any other (a challenge, a built-in free tool) holds nothing that outlives it, and skips a
    // task's allocation, copy and cross-thread wake-up; a panic in it is still an answer.
    let own_task = p.meta.as_ref().is_some_and(|m| m.get(META_PAYMENT).is_some())
        || parts.headers.contains_key(PAYMENT_SIGNATURE_HEADER)
        || app.catalog.current().get(p.name.as_ref()).is_some_and(|e| e.upstream().is_some());
    let ran = match own_task {
        true => {
            let app = app.clone();
            tokio::spawn(async move { call_tool_reply(&app, call.params, None, Some(&parts)).await })
                .await
                .map_err(drop)
        }
        false => AssertUnwindSafe(call_tool_reply(app, call.params, None, Some(&parts)))
            .catch_unwind()
            .await
            .map_err(drop),
    };
    let outcome = match ran {
        Ok(Ok(Reply::Challenge(quote))) => match results::challenge_json(&quote) {
            Some(result) => return Ok(challenge(&call.id, &result)),
            None => Outcome::Result(Reply::Challenge(quote).into_result()),
        },
        Ok(Ok(Reply::Result(result))) => Outcome::Result(result),
        Ok(Err(error)) => Outcome::Error(error),
        Err(_) => Outcome::Error(rmcp::ErrorData::internal_error("the call failed", None)),
    };
    let answer = Answer { jsonrpc: "2.0", id: &call.id, outcome };
    Ok(match serde_json::to_vec(&answer) {
        Ok(body) => (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(_) => super::jsonrpc_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            -32603,
            "the result could not be encoded",
            serde_json::json!({ "error": "internal" }),
        ),
    })
}

/// A first challenge's answer from its rendered result (`results::challenge_json`): the same
/// JSON-RPC envelope [`Answer`] writes.
fn challenge(id: &RequestId, result: &str) -> Response {
    let id = serde_json::to_string(id).expect("a request id serialises");
    let body = format!(r#"{{"jsonrpc":"2.0","id":{id},"result":{result}}}"#);
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// The headers of a request rmcp would accept without a second look: JSON in, JSON and SSE
/// accepted, a known handshake-era protocol version (or none), no SEP-2243 headers, no
/// `Origin`, and a `Host` that exactly matches an allowed one (when any are configured).
fn plain_headers(headers: &HeaderMap, allowed_hosts: &[String]) -> bool {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let content_json =
        text(header::CONTENT_TYPE.as_str()).is_some_and(|v| is_media_type(v, "application/json"));
    // Every Accept header, every entry: the media type, and not refused by `q=0`.
    let accepts = |wanted: &str| {
        let entries = headers.get_all(header::ACCEPT).iter().filter_map(|v| v.to_str().ok());
        entries.flat_map(|v| v.split(',')).any(|entry| is_media_type(entry, wanted) && !refused(entry))
    };
    let version_ok = match headers.get("mcp-protocol-version") {
        None => true,
        Some(v) => v.to_str().is_ok_and(|v| HANDSHAKE_ERA.iter().any(|known| known.as_str() == v)),
    };
    let mcp_headers = headers.keys().any(|k| {
        let k = k.as_str();
        k.starts_with("mcp-") && k != "mcp-protocol-version" && k != "mcp-session-id"
    });
    let origin = headers.contains_key(header::ORIGIN);
    let host_ok = allowed_hosts.is_empty()
        || text(header::HOST.as_str()).is_some_and(|h| host_allowed(h, allowed_hosts));
    content_json
        && accepts("application/json")
        && accepts("text/event-stream")
        && version_ok
        && !mcp_headers
        && !origin
        && host_ok
}

/// Whether an Accept entry carries `q=0` (this type is not acceptable).
fn refused(entry: &str) -> bool {
    entry.split(';').skip(1).any(|param| {
        let param = param.trim();
        param.strip_prefix("q=").is_some_and(|q| q.trim().parse::<f32>().is_ok_and(|q| q == 0.0))
    })
}

/// Whether `value` (a header value, or one entry of a list) names the media type `wanted`
/// (lower-case), whatever its parameters and case.
fn is_media_type(value: &str, wanted: &str) -> bool {
    value.split(';').next().unwrap_or_default().trim().eq_ignore_ascii_case(wanted)
}

/// Whether `host` (a `Host` header: name, optional port) is one of `allowed`, each a name with
/// or without a port, compared as rmcp compares them (case-insensitive name; a port only when
/// the allowed entry names one).
fn host_allowed(host: &str, allowed: &[String]) -> bool {
    let Ok(host) = host.parse::<http::uri::Authority>() else { return false };
    let name = host.host().trim_matches(['[', ']']).to_ascii_lowercase();
    allowed.iter().filter_map(|a| a.trim().parse::<http::uri::Authority>().ok()).any(|a| {
        a.host().trim_matches(['[', ']']).eq_ignore_ascii_case(&name)
            && a.port_u16().is_none_or(|port| host.port_u16() == Some(port))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_headers_take_the_direct_path() {
        let plain = || {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
            h.insert(header::ACCEPT, "application/json, text/event-stream".parse().unwrap());
            h.insert(header::HOST, "localhost:8402".parse().unwrap());
            h
        };
        let allowed = vec!["localhost".to_owned()];
        assert!(plain_headers(&plain(), &allowed));
        let with = |name: &'static str, value: &[u8]| {
            let mut h = plain();
            h.insert(name, http::HeaderValue::from_bytes(value).unwrap());
            plain_headers(&h, &allowed)
        };
        assert!(with("content-type", b"application/json; charset=utf-8"));
        assert!(!with("content-type", b"application/jsonp"));
        assert!(!with("accept", b"application/json;q=0, text/event-stream"));
        assert!(!with("accept", b"application/json"));
        assert!(with("mcp-protocol-version", b"2025-06-18"));
        assert!(!with("mcp-protocol-version", b"2026-07-28"), "the per-request era is rmcp's");
        assert!(!with("mcp-protocol-version", b"\xff"));
        assert!(!with("origin", b"http://localhost"));
        assert!(!with("mcp-method", b"tools/call"));
        assert!(!with("host", b"evil.example"));
    }

    #[test]
    fn hosts_match_by_name_and_by_port_only_when_the_allowed_entry_names_one() {
        let allowed = vec!["localhost".to_owned(), "mcp.example.com:8443".to_owned(), "::1".to_owned()];
        assert!(host_allowed("localhost:8402", &allowed));
        assert!(host_allowed("LOCALHOST", &allowed));
        assert!(host_allowed("mcp.example.com:8443", &allowed));
        assert!(!host_allowed("mcp.example.com:9000", &allowed));
        assert!(!host_allowed("mcp.example.com", &allowed));
        assert!(!host_allowed("evil.example", &allowed));
        assert!(!host_allowed("localhost.evil.example", &allowed));
    }
}
