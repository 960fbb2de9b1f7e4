//! Integration tests: real anvil, real SQLite and Postgres, tollgate on port 0.

mod helpers;

mod abuse;
mod attacks;
mod audit;
mod batching;
mod ceiling;
mod charging;
mod client;
mod concurrency;
mod config_cli;
mod doctor;
mod facilitator;
mod faults;
mod fleet;
mod fuzz_regressions;
mod interop;
mod latency;
mod limits;
mod mcp_surface;
mod operations;
mod payments;
mod pending;
mod policies;
mod pricing;
mod properties;
mod protect;
mod restart;
mod secrets;
mod store;
mod upstream;
mod wallets;
