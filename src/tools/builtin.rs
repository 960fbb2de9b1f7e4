//! Built-in demo tools: `echo` (free by default), `sha256` and `quote_of_the_day` (priced).
//!
//! They exist so `tollgate dev` sells something real out of the box. Prices come from
//! `[tools.prices]`; these handlers never see payment data.

use std::sync::Arc;

use rmcp::model::{CallToolResult, JsonObject};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::catalog::ToolHandler;
use crate::clock::SharedClock;

/// Every built-in tool name: the keys `[tools.prices]` accepts, which config owns.
pub const NAMES: [&str; 3] = crate::config::BUILTIN_TOOLS;

/// A built-in tool's definition: name, description, input schema and handler.
pub struct Builtin {
    pub name: &'static str,
    pub description: &'static str,
    pub input_schema: Value,
    pub handler: Arc<dyn ToolHandler>,
}

pub fn all(clock: SharedClock) -> Vec<Builtin> {
    vec![
        Builtin {
            name: "echo",
            description: "Returns the text it is given.",
            input_schema: text_schema("Text to echo back.", 4096),
            handler: Arc::new(Echo),
        },
        Builtin {
            name: "sha256",
            description: "SHA-256 digest (hex) of a UTF-8 text.",
            input_schema: text_schema("Text to hash.", 65536),
            handler: Arc::new(Sha256Tool),
        },
        Builtin {
            name: "quote_of_the_day",
            description: "Today's quotation about money and machines.",
            input_schema: json!({ "type": "object", "properties": {}, "additionalProperties": false }),
            handler: Arc::new(QuoteOfTheDay { clock }),
        },
    ]
}

fn text_schema(description: &str, max_length: u64) -> Value {
    json!({
        "type": "object",
        "properties": { "text": { "type": "string", "description": description, "maxLength": max_length } },
        "required": ["text"],
        "additionalProperties": false
    })
}

/// Arguments were validated against the schema before any handler runs.
fn text_arg(args: &JsonObject) -> &str {
    args.get("text").and_then(Value::as_str).unwrap_or_default()
}

struct Echo;

#[async_trait::async_trait]
impl ToolHandler for Echo {
    async fn call(&self, args: JsonObject) -> CallToolResult {
        CallToolResult::structured(json!({ "text": text_arg(&args) }))
    }
}

struct Sha256Tool;

#[async_trait::async_trait]
impl ToolHandler for Sha256Tool {
    async fn call(&self, args: JsonObject) -> CallToolResult {
        let digest = Sha256::digest(text_arg(&args).as_bytes());
        CallToolResult::structured(json!({ "sha256": hex::encode(digest) }))
    }
}

const QUOTES: [(&str, &str); 5] = [
    (
        "Money is a new form of slavery, and distinguishable from the old simply by the fact that it is impersonal.",
        "Leo Tolstoy",
    ),
    (
        "The machine does not isolate man from the great problems of nature but plunges him more deeply into them.",
        "Antoine de Saint-Exupéry",
    ),
    ("A penny saved is a penny earned.", "Benjamin Franklin"),
    ("Trust, but verify.", "Russian proverb"),
    ("Any sufficiently advanced technology is indistinguishable from magic.", "Arthur C. Clarke"),
];

struct QuoteOfTheDay {
    clock: SharedClock,
}

#[async_trait::async_trait]
impl ToolHandler for QuoteOfTheDay {
    async fn call(&self, _args: JsonObject) -> CallToolResult {
        let day = self.clock.now_unix() / 86_400;
        let (quote, author) = QUOTES[(day % QUOTES.len() as u64) as usize];
        CallToolResult::structured(json!({ "quote": quote, "author": author, "day": day }))
    }
}
