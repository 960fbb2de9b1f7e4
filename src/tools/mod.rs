//! Tools: the catalog (built-in and, later, upstream), the MCP adapter, and the `paid_call`
//! orchestrator that every priced call goes through.

pub mod builtin;
pub mod catalog;
pub mod paid_call;
pub mod results;
pub mod upstream;
