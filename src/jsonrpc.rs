//! The JSON-RPC 2.0 error envelope for requests refused before they were read (the ceiling, a
//! malformed body, an unknown session): `id` is null, and `data` carries the reason code.

use serde_json::{Value, json};

/// `{"jsonrpc":"2.0","id":null,"error":{"code":…,"message":…,"data":…}}`.
pub fn error_body(code: i64, message: &str, data: Value) -> Value {
    json!({ "jsonrpc": "2.0", "id": null, "error": { "code": code, "message": message, "data": data } })
}
