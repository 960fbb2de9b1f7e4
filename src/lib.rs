//! tollgate: sell MCP tool calls for USDC on Base, per call, over x402.
//!
//! The request path (ARCHITECTURE.md), visible in two places — `router.rs` for the HTTP layers
//! and `tools::paid_call::PaidCall::try_call` for the stages of a priced call:
//!
//! 1. ceiling — per-session token bucket, before the body is parsed;
//! 2. transport — rmcp Streamable HTTP (sessions or sessionless);
//! 3. arguments — validated against the tool's input schema before any quote;
//! 4. challenge — no payment: x402 PaymentRequired as an `isError` tool result;
//! 5. verify — decode, match `accepted`, recover the EIP-712 signer (no network);
//! 6. wallet limits — keyed on the recovered payer;
//! 7. claim — atomic insert of (network, asset, payer, nonce);
//! 8. settle — USDC moves on chain and is confirmed *before* the handler;
//! 9. handler — the tool runs;
//! 10. receipt — ed25519-signed, appended to a transparency log.
#![forbid(unsafe_code)]

pub mod app;
pub mod audit;
pub mod background;
pub mod canonical;
pub mod cdp_auth;
pub mod ceiling;
pub mod chain;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod dev;
pub mod doctor;
pub mod jsonrpc;
pub mod limits;
pub mod listing;
pub mod money;
pub mod payment;
pub mod protect;
pub mod public_api;
pub mod readiness;
pub mod receipt;
pub mod redact;
pub mod router;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod tools;
pub mod transport;
