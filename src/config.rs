//! Configuration: `config/default.toml` (embedded) < `--config FILE` < `TOLLGATE_*` env.
//!
//! Loading guarantees that every key is known (`deny_unknown_fields`) and that `validate()` has
//! run, so the rest of the program can trust the values it reads. Errors name the offending key.
//! Secrets are [`SecretString`]s: their `Debug` is redacted and nothing here logs them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use alloy::primitives::Address;

use crate::money::UsdcAmount;

/// The embedded defaults, also printed by `tollgate print-default-config`.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Environment variables with this prefix and a `__` section separator override the files.
pub const ENV_PREFIX: &str = "TOLLGATE_";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub network: NetworkConfig,
    pub payment: PaymentConfig,
    pub database: DatabaseConfig,
    pub log: LogConfig,
    pub tools: ToolsConfig,
    pub ceiling: CeilingConfig,
    pub limits: LimitsConfig,
    pub receipts: ReceiptsConfig,
    pub dev: DevConfig,
    /// MCP servers whose tools are sold through tollgate.
    #[serde(default)]
    pub upstream: Vec<UpstreamConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// A short name for logs and errors.
    pub name: String,
    /// Start this command and speak MCP over its stdio (argv, no shell)...
    #[serde(default)]
    pub command: Vec<String>,
    /// ...or connect to this Streamable HTTP URL.
    #[serde(default)]
    pub url: String,
    /// Shown before each tool name (e.g. "files_"), to keep names unique across upstreams.
    #[serde(default)]
    pub prefix: String,
    /// Price of tools not listed in `prices`, atomic units ("0" = free).
    #[serde(default = "zero_price")]
    pub default_price: UsdcAmount,
    /// Per-tool prices (upstream tool names, without the prefix): atomic units, or a table
    /// with an expression, bounds and a charge policy ([`PriceSetting`]).
    #[serde(default)]
    pub prices: BTreeMap<String, PriceSetting>,
    /// This upstream's charge policy, unless a tool's price table sets its own (default:
    /// `tools.charge`).
    #[serde(default)]
    pub charge: Option<ChargePolicy>,
    /// Tools that are free whatever the default price.
    #[serde(default)]
    pub free: Vec<String>,
    /// Tools not exposed at all.
    #[serde(default)]
    pub hidden: Vec<String>,
    /// Largest result this upstream may return (bytes of JSON); past it the call answers
    /// `result_too_large`.
    #[serde(default = "default_max_result_bytes")]
    pub max_result_bytes: usize,
    /// The provider's request budget across all payers (and, in fleet mode, all replicas):
    /// calls past it are refused before payment.
    #[serde(default)]
    pub quota: Option<QuotaConfig>,
    /// Calls into this upstream at once, per replica (0 = no cap); more are refused before
    /// payment.
    #[serde(default)]
    pub max_in_flight: u32,
    /// Regular expressions over a tool error's text that mean "the API behind is throttled"
    /// (e.g. "rate limited"): a match pauses this upstream's sales.
    #[serde(default)]
    pub throttle_patterns: Vec<String>,
    /// How long a throttle signal that names no retry time pauses sales, in seconds.
    #[serde(default = "default_throttle_pause_secs")]
    pub throttle_pause_secs: u64,
    /// Per-tool settings (upstream tool names, without the prefix): the result cache.
    #[serde(default)]
    pub tools: BTreeMap<String, UpstreamToolConfig>,
}

/// `quota = { requests = 1000, window_secs = 3600 }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaConfig {
    pub requests: u64,
    pub window_secs: u64,
}

/// One upstream tool's own settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamToolConfig {
    /// Identical calls (same tool, same canonical arguments) within this many seconds are
    /// answered from the cache: the upstream sees one. 0 = no cache. Cached answers are shared
    /// by every payer with the same arguments.
    #[serde(default)]
    pub cache_ttl_secs: u64,
    /// The price of an answer from the cache (default: the tool's price).
    #[serde(default)]
    pub cached_price: Option<UsdcAmount>,
}

fn default_throttle_pause_secs() -> u64 {
    30
}

impl UpstreamConfig {
    /// The protection settings make sense: a quota with a positive budget and window, patterns
    /// that compile, a pause of at least a second.
    fn validate_protection(&self) -> Result<(), ConfigError> {
        let name = &self.name;
        // Upper bounds keep every sum and product of these (µs, ms) far inside u64 and below
        // 2^53, where Redis's Lua computes the same.
        if let Some(q) = self.quota
            && (q.requests == 0
                || q.window_secs == 0
                || q.requests > 1_000_000_000
                || q.window_secs > YEAR_SECS)
        {
            let reason =
                format!("`{name}`: requests (at most 1e9) and window_secs (at most a year) must be positive");
            return Err(invalid("upstream.quota", reason));
        }
        for (tool, t) in &self.tools {
            if t.cache_ttl_secs > WEEK_SECS {
                return Err(invalid(
                    "upstream.tools",
                    format!("`{name}.{tool}`: cache_ttl_secs is at most a week"),
                ));
            }
            match t.cached_price {
                Some(_) if t.cache_ttl_secs == 0 => {
                    let reason = format!("`{name}.{tool}`: cached_price needs cache_ttl_secs");
                    return Err(invalid("upstream.tools", reason));
                }
                // A zero price is a free call: a cached answer for nothing is a free tool.
                Some(price) if price.atomic() == 0 => {
                    let reason =
                        format!("`{name}.{tool}`: cached_price must be positive (or make the tool free)");
                    return Err(invalid("upstream.tools", reason));
                }
                _ => {}
            }
        }
        for pattern in &self.throttle_patterns {
            if let Err(e) = regex::Regex::new(pattern) {
                return Err(invalid("upstream.throttle_patterns", format!("`{name}`: {e}")));
            }
        }
        if let Err(e) = regex::RegexSet::new(&self.throttle_patterns) {
            return Err(invalid("upstream.throttle_patterns", format!("`{name}`: {e}")));
        }
        if self.throttle_pause_secs == 0 || self.throttle_pause_secs > 3600 {
            return Err(invalid("upstream.throttle_pause_secs", format!("`{name}`: between 1 and 3600")));
        }
        Ok(())
    }
}

const YEAR_SECS: u64 = 366 * 86_400;
const WEEK_SECS: u64 = 7 * 86_400;

fn default_max_result_bytes() -> usize {
    1024 * 1024
}

/// A whole number written as a string ("1000000000000000") or a plain integer: wei amounts
/// outgrow TOML's integers, and an environment variable's value arrives either way.
fn whole_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u128, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Text(String),
        Number(u64),
    }
    match Raw::deserialize(d)? {
        Raw::Text(s) => {
            s.trim().parse().map_err(|_| serde::de::Error::custom(format!("{s:?} is not a whole number")))
        }
        Raw::Number(n) => Ok(u128::from(n)),
    }
}

/// The `TOLLGATE_SECTION__KEY` variables, typed by the configuration below them: a key whose
/// value there is a string takes the variable's text as it is, so
/// `TOLLGATE_NETWORK__EIP712_VERSION=2` is the string "2" (figment's `Env` would read the
/// number 2, which a string key refuses, and "1.10" the number 1.1); any other key is parsed as
/// `Env` parses it (numbers, booleans, arrays). Other TOLLGATE_* variables (such as the paying
/// client's TOLLGATE_PAYER_KEY) are not configuration and must not trip deny_unknown_fields.
/// Written here because figment 0.10's `Env` has no per-key parser.
fn typed_env(below: &Figment) -> Figment {
    let env = Env::prefixed(ENV_PREFIX).filter(|k| k.as_str().contains("__")).split("__");
    let mut layer = Figment::new();
    for (key, raw) in env.iter() {
        let path = key.as_str().to_ascii_lowercase();
        let is_string = matches!(below.find_value(&path), Ok(figment::value::Value::String(..)));
        let value = match is_string {
            true => figment::value::Value::from(raw),
            false => raw.parse().unwrap_or_else(|_| figment::value::Value::from(raw)),
        };
        layer = layer.merge(figment::providers::Serialized::default(&path, value));
    }
    layer
}

/// An address, or nothing when the value is empty (a key to be filled in later).
fn optional_address<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Address>, D::Error> {
    let text = String::deserialize(d)?;
    match text.trim() {
        "" => Ok(None),
        s => s
            .parse()
            .map(Some)
            .map_err(|_| serde::de::Error::custom(format!("{s:?} is not a 0x-prefixed 20-byte hex address"))),
    }
}

/// A socket address, or nothing when the value is empty.
fn optional_socket<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let text = String::deserialize(d)?;
    match text.trim() {
        "" => Ok(None),
        s => {
            s.parse().map(Some).map_err(|_| serde::de::Error::custom(format!("{s:?} is not an address:port")))
        }
    }
}

fn default_sessions_per_client() -> usize {
    16
}

fn zero_price() -> UsdcAmount {
    UsdcAmount::ZERO
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiptsConfig {
    /// Hex ed25519 seed (secret); prefer key_file or TOLLGATE_RECEIPTS__KEY.
    pub key: SecretString,
    pub key_file: String,
    /// Hex public keys of retired signing keys, still published so old receipts verify.
    pub previous_public_keys: Vec<String>,
    pub checkpoint_interval_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CeilingConfig {
    pub burst: u32,
    pub per_second: u32,
    pub max_tracked_keys: usize,
    pub api_key_header: String,
    /// SHA-256 (hex) of the API keys that earn their own bucket; any other key counts
    /// against the caller's IP (a client cannot mint keys).
    #[serde(default)]
    pub api_keys_sha256: Vec<String>,
    /// Named tiers of API keys, each with a quota of its own (a bucket per key).
    #[serde(default)]
    pub api_key_tiers: BTreeMap<String, ApiKeyTier>,
    /// Live MCP sessions one client key may hold: each has a bucket of its own, so this bounds
    /// how far a client can multiply the ceiling by opening sessions.
    #[serde(default = "default_sessions_per_client")]
    pub max_sessions_per_client: usize,
    /// The public endpoints' own bucket per client (API key, else IP), per replica.
    pub public_burst: u32,
    pub public_per_second: u32,
    pub trusted_proxies: Vec<String>,
    /// Share the ceiling through limits.redis_url (fleet) instead of per process.
    pub shared: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyTier {
    pub burst: u32,
    pub per_second: u32,
    /// SHA-256 (hex) of the tier's API keys.
    pub keys_sha256: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LimitBackend {
    Memory,
    Redis,
}

/// What a wallet limit is keyed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Axis {
    Wallet,
    Tool,
    WalletTool,
    Agent,
}

impl Axis {
    pub fn as_str(self) -> &'static str {
        match self {
            Axis::Wallet => "wallet",
            Axis::Tool => "tool",
            Axis::WalletTool => "wallet_tool",
            Axis::Agent => "agent",
        }
    }
}

impl std::fmt::Display for Axis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    pub backend: LimitBackend,
    pub redis_url: SecretString,
    pub key_prefix: String,
    pub max_tracked_keys: usize,
    /// Refused payments a client may cause per window before it is turned away unverified.
    pub failed_attempts: FailureBudgetConfig,
    pub rules: Vec<LimitRule>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailureBudgetConfig {
    /// 0 turns the budget off.
    pub attempts: u64,
    pub window_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitRule {
    pub axis: Axis,
    pub window_secs: u64,
    #[serde(default)]
    pub requests: u64,
    /// USDC (atomic units) per window; none for a requests-only rule.
    #[serde(default)]
    pub spend: Option<UsdcAmount>,
    #[serde(default)]
    pub tool: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub bind: SocketAddr,
    pub server_id: String,
    pub allowed_hosts: Vec<String>,
    pub max_body_bytes: usize,
    pub request_timeout_secs: u64,
    pub shutdown_grace_secs: u64,
    /// The MCP URL clients use (behind any proxy), for listings and `resource` URLs.
    pub public_url: String,
    /// Name in the MCP registry (reverse-DNS, e.g. io.github.you/weather-tools).
    pub listing_name: String,
    pub listing_description: String,
    /// Serve `/metrics` on this address only (not on `bind`); empty: on `bind`.
    #[serde(deserialize_with = "optional_socket")]
    pub metrics_bind: Option<SocketAddr>,
    /// How often readiness (store, chain, Redis, relayer gas) is probed in the background.
    pub readiness_refresh_ms: u64,
    /// Async worker threads; 0 picks one fewer than the cores (see [`ServerConfig::workers`]).
    pub worker_threads: usize,
}

impl ServerConfig {
    /// The async runtime's worker threads. Left to choose, one fewer than the cores (at least
    /// one): much of a paid call's work runs off the workers, on SQLite's connection threads and
    /// in the store or chain node beside the server, and each spare worker costs wake-ups. With
    /// one worker per core on a 2-core machine, idle workers woken to look for work took 44
    /// context switches per paid call where one worker took 21, and a paid call's CPU fell from
    /// 1.8-2.5 to 1.4-1.5 ms (measured on that machine only; free calls under `wrk` kept
    /// their rate within the run-to-run noise, or lost up to a sixth of it).
    pub fn workers(&self) -> usize {
        match self.worker_threads {
            0 => Self::default_workers(),
            n => n,
        }
    }

    pub fn default_workers() -> usize {
        std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NetworkPreset {
    Local,
    BaseSepolia,
    Base,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    pub preset: NetworkPreset,
    pub rpc_url: SecretString,
    /// More JSON-RPC endpoints of the same chain, tried after `rpc_url` in order of health, so
    /// one provider's outage or rate limit does not stop settlement. Secrets, like `rpc_url`.
    pub rpc_urls: Vec<SecretString>,
    pub chain_id: u64,
    /// The token (local preset only); `tollgate dev` deploys one and fills this in.
    #[serde(deserialize_with = "optional_address")]
    pub asset: Option<Address>,
    pub eip712_name: String,
    pub eip712_version: String,
    /// Blocks per `eth_getLogs` request (hosted RPCs refuse wide ranges).
    pub max_log_range: u64,
}

impl NetworkConfig {
    /// The RPC endpoints in order of preference: `rpc_url`, then `rpc_urls` (empty ones skipped).
    pub fn rpc_endpoints(&self) -> Vec<&str> {
        std::iter::once(&self.rpc_url).chain(&self.rpc_urls).filter_map(secret_opt).collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SettlerKind {
    #[serde(rename = "self")]
    SelfRelay,
    Facilitator,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PaymentConfig {
    /// Who is paid; required to serve priced tools.
    #[serde(deserialize_with = "optional_address")]
    pub pay_to: Option<Address>,
    pub max_timeout_seconds: u64,
    pub valid_before_margin_secs: u64,
    pub settler: SettlerKind,
    pub relayer_key: SecretString,
    pub relayer_key_file: String,
    pub confirmations: u64,
    pub settle_timeout_secs: u64,
    /// With settler = "self": most payments one settlement transaction carries (Multicall3
    /// `aggregate3`) when they arrive while another is in flight; 1 sends each alone.
    pub batch_max: usize,
    /// With settler = "self": how long (ms) the next round waits behind a lone payment in
    /// flight, so a burst right behind it gathers into one transaction.
    pub batch_hold_ms: u64,
    /// Below this relayer balance (wei) the server reports unready: it could not settle.
    #[serde(deserialize_with = "whole_number")]
    pub min_relayer_balance_wei: u128,
    /// ERC-6492 factories an undeployed smart wallet may be deployed through to pay (the
    /// deployment costs the settler gas); empty accepts deployed wallets only.
    pub eip6492_allowed_factories: Vec<Address>,
    pub facilitator: FacilitatorConfig,
}

/// Most payments one settlement transaction may carry: at ~35k gas each, 1000 need 35M gas,
/// about a whole block on many chains.
const MAX_BATCH: usize = 1000;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FacilitatorConfig {
    pub url: String,
    pub auth_header: SecretString,
    /// The Coinbase (CDP) facilitator's API key: its id, and its secret (an Ed25519 key in
    /// base64, or an EC P-256 key in PEM), as the CDP portal issues them. With these set,
    /// every facilitator request carries a fresh signed JWT.
    pub cdp_key_id: String,
    pub cdp_key_secret: SecretString,
    pub cdp_key_secret_file: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// May carry a password, hence secret.
    pub url: SecretString,
    pub max_connections: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    Auto,
    Pretty,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    pub filter: String,
}

/// The built-in tools, by name: the keys `[tools.prices]` accepts.
pub const BUILTIN_TOOLS: [&str; 3] = ["echo", "sha256", "quote_of_the_day"];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolsConfig {
    /// Longest a tool may run; below `server.request_timeout_secs` (the handler lease).
    pub timeout_secs: u64,
    /// Built-in tool name → its price ([`PriceSetting`]); "0" is free.
    pub prices: BTreeMap<String, PriceSetting>,
    /// The charge policy of every priced tool that does not set its own.
    pub charge: ChargePolicy,
    /// Wallet that sends refunds (`refund_on_error`): a hex private key holding USDC and gas.
    pub refund_key: SecretString,
    pub refund_key_file: String,
    /// Also reload prices when the config file changes (SIGHUP always reloads them).
    pub watch_config: bool,
    /// A payer whose funds vanished between an `on_success` run and its settlement is refused
    /// paid calls for this long.
    pub unpaid_penalty_secs: u64,
    /// The result cache's bounds in memory (`[[upstream]]` tools with `cache_ttl_secs`).
    pub cache_max_entries: usize,
    pub cache_max_bytes: usize,
}

/// When a priced tool's payment is taken.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChargePolicy {
    /// Settle, then run: the price buys the attempt, and a tool error is charged (or refunded,
    /// with `refund_on_error`).
    #[default]
    BeforeRun,
    /// Check the payment on chain, run, and settle only a result that is not an error; the
    /// result is withheld until settlement is confirmed.
    OnSuccess,
}

impl ChargePolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            ChargePolicy::BeforeRun => "before_run",
            ChargePolicy::OnSuccess => "on_success",
        }
    }
}

/// A tool's price: atomic units (`sha256 = "1000"`), or a table
/// (`sha256 = { price = "1000 + 2 * size(args.text)", min_price = "1000", max_price = "50000" }`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum PriceSetting {
    Fixed(UsdcAmount),
    Rule(PriceRule),
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceRule {
    /// Atomic units ("2500"), or a CEL expression over the validated `args` giving an integer.
    pub price: String,
    /// Bounds the computed price is clamped to; an expression needs `max_price`.
    #[serde(default)]
    pub min_price: Option<UsdcAmount>,
    #[serde(default)]
    pub max_price: Option<UsdcAmount>,
    #[serde(default)]
    pub charge: Option<ChargePolicy>,
    /// `before_run` only: a tool error after settlement is refunded from `tools.refund_key`.
    #[serde(default)]
    pub refund_on_error: bool,
}

impl PriceSetting {
    /// The charge policy this setting asks for, given the default of its source.
    pub fn charge(&self, default: ChargePolicy) -> ChargePolicy {
        match self {
            PriceSetting::Rule(PriceRule { charge: Some(c), .. }) => *c,
            _ => default,
        }
    }

    pub fn refund_on_error(&self) -> bool {
        matches!(self, PriceSetting::Rule(PriceRule { refund_on_error: true, .. }))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevConfig {
    pub anvil_port: u16,
    pub state_dir: PathBuf,
    pub demo_payer_funding: UsdcAmount,
}

/// A configuration problem, always naming the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config: {0}")]
    Parse(Box<figment::Error>),
    #[error("config key `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
    #[error("config key `{key}`: cannot read {path}: {source}")]
    File { key: &'static str, path: String, source: std::io::Error },
}

impl From<figment::Error> for ConfigError {
    fn from(e: figment::Error) -> Self {
        ConfigError::Parse(Box::new(e))
    }
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key, reason: reason.into() }
}

/// Reads the secret at `path` (trimmed) into `secret`, when `path` is set.
fn read_secret_file(key: &'static str, path: &str, secret: &mut SecretString) -> Result<(), ConfigError> {
    let path = path.trim();
    if path.is_empty() {
        return Ok(());
    }
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::File {
        key,
        path: path.to_owned(),
        source,
    })?;
    *secret = SecretString::from(text.trim().to_owned());
    Ok(())
}

/// Returns the secret when it is set (non-empty).
pub fn secret_opt(s: &SecretString) -> Option<&str> {
    let v = s.expose_secret().trim();
    (!v.is_empty()).then_some(v)
}

impl Config {
    /// The layered figment: defaults < optional file < environment.
    pub fn figment(file: Option<&Path>) -> Figment {
        let mut figment = Figment::from(Toml::string(DEFAULT_TOML));
        if let Some(file) = file {
            figment = figment.merge(Toml::file_exact(file));
        }
        let env = typed_env(&figment);
        figment.merge(env)
    }

    /// Loads and validates. This is the only way the program obtains a `Config`.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        Self::from_figment(Self::figment(file))
    }

    pub fn from_figment(figment: Figment) -> Result<Config, ConfigError> {
        let mut config: Config = figment.extract()?;
        config.resolve_secret_files()?;
        config.validate()?;
        Ok(config)
    }

    /// `*_file` keys let orchestrators mount secrets as files (k8s Secrets, Docker secrets).
    fn resolve_secret_files(&mut self) -> Result<(), ConfigError> {
        read_secret_file("receipts.key_file", &self.receipts.key_file, &mut self.receipts.key)?;
        let t = &mut self.tools;
        read_secret_file("tools.refund_key_file", &t.refund_key_file, &mut t.refund_key)?;
        let p = &mut self.payment;
        read_secret_file("payment.relayer_key_file", &p.relayer_key_file, &mut p.relayer_key)?;
        let f = &mut p.facilitator;
        read_secret_file(
            "payment.facilitator.cdp_key_secret_file",
            &f.cdp_key_secret_file,
            &mut f.cdp_key_secret,
        )
    }

    /// Checks what serde cannot: ranges, formats and cross-field rules.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        if s.server_id.trim().is_empty() {
            return Err(invalid("server.server_id", "must not be empty"));
        }
        if s.max_body_bytes < 1024 {
            return Err(invalid("server.max_body_bytes", "must be at least 1024"));
        }
        if s.readiness_refresh_ms < 10 {
            return Err(invalid("server.readiness_refresh_ms", "must be at least 10"));
        }
        if s.worker_threads > 1024 {
            return Err(invalid("server.worker_threads", "must be at most 1024 (0 picks for the machine)"));
        }
        let p = &self.payment;
        if p.pay_to.is_some_and(|a| a.is_zero()) {
            return Err(invalid("payment.pay_to", "must not be the zero address"));
        }
        if !(10..=3600).contains(&p.max_timeout_seconds) {
            return Err(invalid("payment.max_timeout_seconds", "must be between 10 and 3600"));
        }
        if p.valid_before_margin_secs >= p.max_timeout_seconds {
            return Err(invalid(
                "payment.valid_before_margin_secs",
                "must be smaller than payment.max_timeout_seconds",
            ));
        }
        if p.confirmations == 0 {
            return Err(invalid("payment.confirmations", "must be at least 1"));
        }
        if self.tools.timeout_secs == 0 || self.tools.timeout_secs >= s.request_timeout_secs {
            return Err(invalid(
                "tools.timeout_secs",
                "must be positive and below server.request_timeout_secs (the handler lease)",
            ));
        }
        if p.settle_timeout_secs == 0 || p.settle_timeout_secs >= s.request_timeout_secs {
            return Err(invalid(
                "payment.settle_timeout_secs",
                "must be positive and below server.request_timeout_secs",
            ));
        }
        if !(1..=MAX_BATCH).contains(&p.batch_max) {
            return Err(invalid(
                "payment.batch_max",
                "must be from 1 (no batching) to 1000 (a batch must fit in one block)",
            ));
        }
        if p.batch_hold_ms >= s.request_timeout_secs.saturating_mul(1000) {
            return Err(invalid(
                "payment.batch_hold_ms",
                "must be below server.request_timeout_secs (payments held behind it must still be answered)",
            ));
        }
        if let Some(key) = secret_opt(&p.relayer_key) {
            // The shape only; the key itself is parsed (once) where the settler is built.
            let hex = key.trim().trim_start_matches("0x");
            if hex.len() != 64 || hex.parse::<alloy::primitives::B256>().is_err() {
                return Err(invalid("payment.relayer_key", "must be a 32-byte hex private key"));
            }
        }
        if p.settler == SettlerKind::Facilitator && p.facilitator.url.trim().is_empty() {
            return Err(invalid(
                "payment.facilitator.url",
                "is required when payment.settler = \"facilitator\"",
            ));
        }
        let f = &p.facilitator;
        let cdp_secret = secret_opt(&f.cdp_key_secret).is_some();
        let cdp_id = !f.cdp_key_id.trim().is_empty();
        if cdp_id != cdp_secret {
            return Err(invalid(
                "payment.facilitator.cdp_key_id",
                "cdp_key_id and cdp_key_secret (or cdp_key_secret_file) are set together",
            ));
        }
        if cdp_secret && secret_opt(&f.auth_header).is_some() {
            return Err(invalid(
                "payment.facilitator.auth_header",
                "set either auth_header or the CDP key, not both",
            ));
        }
        if cdp_secret && let Err(e) = crate::cdp_auth::CdpKey::parse(&f.cdp_key_secret) {
            return Err(invalid("payment.facilitator.cdp_key_secret", e.to_string()));
        }
        let n = &self.network;
        if n.preset == NetworkPreset::Local && n.eip712_name.is_empty() {
            return Err(invalid("network.eip712_name", "must not be empty"));
        }
        let db = secret_opt(&self.database.url).unwrap_or("");
        if !(db.starts_with("sqlite:") || db.starts_with("postgres:") || db.starts_with("postgresql:")) {
            return Err(invalid("database.url", "must start with sqlite: or postgres://"));
        }
        if self.database.max_connections == 0 {
            return Err(invalid("database.max_connections", "must be at least 1"));
        }
        for tool in self.tools.prices.keys() {
            if !BUILTIN_TOOLS.contains(&tool.as_str()) {
                return Err(ConfigError::Invalid {
                    key: "tools.prices",
                    reason: format!("unknown tool `{tool}` (built-in tools: {})", BUILTIN_TOOLS.join(", ")),
                });
            }
        }
        self.validate_limits()?;
        self.validate_prices()?;
        for u in &self.upstream {
            if u.command.is_empty() == u.url.is_empty() {
                return Err(invalid("upstream", format!("`{}` needs exactly one of command or url", u.name)));
            }
            u.validate_protection()?;
        }
        if self.tools.cache_max_entries == 0 || self.tools.cache_max_bytes < 1024 {
            return Err(invalid("tools.cache_max_entries", "needs at least 1 entry and 1024 bytes"));
        }
        if self.receipts.checkpoint_interval_secs == 0 {
            return Err(invalid("receipts.checkpoint_interval_secs", "must be at least 1"));
        }
        Ok(())
    }

    /// How long an `on_success` authorization must stay valid from its arrival: the margin, the
    /// longest run, then the longest settlement.
    pub fn on_success_validity_secs(&self) -> u64 {
        let p = &self.payment;
        p.valid_before_margin_secs + self.tools.timeout_secs + p.settle_timeout_secs
    }

    /// Whether any tool, built-in or upstream, refunds its errors (`refund_on_error`).
    pub fn refunds_on_error(&self) -> bool {
        let upstream = self.upstream.iter().flat_map(|u| u.prices.values());
        self.tools.prices.values().chain(upstream).any(PriceSetting::refund_on_error)
    }

    /// Price tables: the policies fit together; expressions are compiled where the tools'
    /// schemas are known (`payment::price`).
    fn validate_prices(&self) -> Result<(), ConfigError> {
        let t = &self.tools;
        let builtin = t.prices.iter().map(|(tool, p)| (tool.clone(), p, t.charge));
        let upstream = self.upstream.iter().flat_map(|u| {
            let charge = u.charge.unwrap_or(t.charge);
            u.prices.iter().map(move |(tool, p)| (format!("{}{tool}", u.prefix), p, charge))
        });
        let (mut refunds, mut on_success) = (false, false);
        for (tool, setting, default) in builtin.chain(upstream) {
            on_success |= setting.charge(default) == ChargePolicy::OnSuccess;
            if setting.refund_on_error() && setting.charge(default) == ChargePolicy::OnSuccess {
                let reason = format!(
                    "tool `{tool}`: refund_on_error is for charge = \"before_run\" (on_success never charges a failed call)"
                );
                return Err(invalid("tools.prices", reason));
            }
            refunds |= setting.refund_on_error();
        }
        if let Some(key) = secret_opt(&t.refund_key) {
            let hex = key.trim().trim_start_matches("0x");
            if hex.len() != 64 || hex.parse::<alloy::primitives::B256>().is_err() {
                return Err(invalid("tools.refund_key", "must be a 32-byte hex private key"));
            }
        } else if refunds {
            return Err(invalid(
                "tools.refund_key",
                "is required when a tool sets refund_on_error (set TOLLGATE_TOOLS__REFUND_KEY or refund_key_file)",
            ));
        }
        let upstream_on_success = self.upstream.iter().any(|u| u.charge == Some(ChargePolicy::OnSuccess));
        if (on_success || upstream_on_success || t.charge == ChargePolicy::OnSuccess)
            && self.on_success_validity_secs() >= self.payment.max_timeout_seconds
        {
            return Err(invalid(
                "payment.max_timeout_seconds",
                "must exceed valid_before_margin_secs + tools.timeout_secs + payment.settle_timeout_secs \
                 when a tool charges on_success (its authorization must outlive the run and the settlement)",
            ));
        }
        if t.unpaid_penalty_secs > 86_400 {
            return Err(invalid("tools.unpaid_penalty_secs", "must be at most 86400"));
        }
        Ok(())
    }

    fn validate_limits(&self) -> Result<(), ConfigError> {
        let c = &self.ceiling;
        if c.burst == 0 || c.per_second == 0 {
            return Err(invalid("ceiling.burst", "burst and per_second must be positive"));
        }
        if c.api_key_tiers.len() > 255 {
            return Err(invalid("ceiling.api_key_tiers", "at most 255 tiers"));
        }
        for (name, tier) in &c.api_key_tiers {
            if tier.burst == 0 || tier.per_second == 0 {
                return Err(invalid(
                    "ceiling.api_key_tiers",
                    format!("tier {name:?}: burst and per_second must be positive"),
                ));
            }
        }
        if c.public_burst == 0 || c.public_per_second == 0 {
            return Err(invalid(
                "ceiling.public_burst",
                "public_burst and public_per_second must be positive",
            ));
        }
        if c.max_tracked_keys < 16 {
            return Err(invalid("ceiling.max_tracked_keys", "must be at least 16"));
        }
        for proxy in &c.trusted_proxies {
            if proxy.parse::<ipnet::IpNet>().is_err() && proxy.parse::<std::net::IpAddr>().is_err() {
                return Err(invalid("ceiling.trusted_proxies", format!("{proxy:?} is not an IP or CIDR")));
            }
        }
        let l = &self.limits;
        let needs_redis = l.backend == LimitBackend::Redis || c.shared;
        if needs_redis && secret_opt(&l.redis_url).is_none() {
            return Err(invalid("limits.redis_url", "is required for the redis backend or a shared ceiling"));
        }
        for rule in &l.rules {
            if rule.window_secs == 0 || rule.window_secs > 86_400 * 31 {
                return Err(invalid("limits.rules", "window_secs must be between 1 and 2678400"));
            }
            if rule.requests == 0 && rule.spend.is_none() {
                return Err(invalid("limits.rules", "each rule needs requests and/or spend"));
            }
        }
        Ok(())
    }

    /// What `serve` needs beyond `validate()`: a payee, a chain and a way to settle.
    pub fn validate_for_serving(&self) -> Result<(), ConfigError> {
        if self.payment.pay_to.is_none() {
            return Err(invalid("payment.pay_to", "is required to serve priced tools"));
        }
        if self.network.rpc_endpoints().is_empty() {
            return Err(invalid("network.rpc_url", "is required to serve (or network.rpc_urls)"));
        }
        if self.network.preset == NetworkPreset::Local && self.network.asset.is_none() {
            return Err(invalid("network.asset", "is required for the local preset"));
        }
        if self.payment.settler == SettlerKind::SelfRelay && secret_opt(&self.payment.relayer_key).is_none() {
            return Err(invalid(
                "payment.relayer_key",
                "is required when payment.settler = \"self\" (set TOLLGATE_PAYMENT__RELAYER_KEY)",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
// figment::Jail's closures must return figment::Error, a large type we do not choose.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    fn load_with(toml: &str) -> Result<Config, ConfigError> {
        let mut result = None;
        figment::Jail::expect_with(|jail| {
            jail.create_file("t.toml", toml)?;
            result = Some(Config::load(Some(Path::new("t.toml"))));
            Ok(())
        });
        result.unwrap()
    }

    #[test]
    fn embedded_defaults_load_and_validate() {
        let config = load_with("").expect("defaults are valid");
        assert_eq!(config.server.bind.port(), 8402);
        assert_eq!(config.network.preset, NetworkPreset::Local);
        assert_eq!(config.tools.prices["sha256"], PriceSetting::Fixed(UsdcAmount::from_atomic(1000)));
    }

    #[test]
    fn the_runtime_takes_the_configured_workers_and_otherwise_leaves_a_core_free() {
        let chosen = load_with("[server]\nworker_threads = 3").expect("valid");
        assert_eq!(chosen.server.workers(), 3);
        let auto = load_with("").expect("valid");
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(auto.server.workers(), cores.saturating_sub(1).max(1));
    }

    #[test]
    fn config_errors_name_the_key() {
        // Arrange: one bad value per case, and the key its error must name.
        let cases = [
            ("[payment]\npay_to = \"nope\"", "payment.pay_to"),
            ("[payment]\nmax_timeout_seconds = 1", "payment.max_timeout_seconds"),
            ("[payment]\nconfirmations = 0", "payment.confirmations"),
            ("[payment]\nbatch_hold_ms = 120000", "payment.batch_hold_ms"),
            ("[payment]\nrelayer_key = \"0x1234\"", "payment.relayer_key"),
            ("[payment]\nsettler = \"facilitator\"", "payment.facilitator.url"),
            ("[database]\nurl = \"mysql://x\"", "database.url"),
            ("[tools.prices]\nsha256 = \"1.5\"", "tools.prices"),
            ("[tools.prices]\nnot_a_tool = \"1\"", "tools.prices"),
            ("[server]\nmax_body_bytes = 10", "server.max_body_bytes"),
            ("[server]\nworker_threads = 5000", "server.worker_threads"),
            // serde-level errors name the key through figment's metadata
            ("[server]\nbind = \"not an address\"", "bind"),
            ("[server]\nno_such_key = 1", "no_such_key"),
            ("[network]\npreset = \"mainnet\"", "preset"),
            ("[payment.facilitator]\ncdp_key_id = \"k\"", "payment.facilitator.cdp_key_id"),
            (
                "[payment.facilitator]\ncdp_key_id = \"k\"\ncdp_key_secret = \"c2hvcnQ=\"",
                "payment.facilitator.cdp_key_secret",
            ),
        ];
        for (toml, key) in cases {
            // Act
            let err = load_with(toml).expect_err(toml).to_string();
            // Assert
            assert!(err.contains(key), "error for {toml:?} should name {key}: {err}");
        }
    }

    #[test]
    fn env_overrides_file_and_unrelated_tollgate_vars_are_ignored() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("t.toml", "[payment]\nconfirmations = 2")?;
            jail.set_env("TOLLGATE_PAYMENT__CONFIRMATIONS", "3");
            jail.set_env("TOLLGATE_PAYER_KEY", "0xdeadbeef");
            let config = Config::load(Some(Path::new("t.toml"))).expect("loads");
            assert_eq!(config.payment.confirmations, 3);
            Ok(())
        });
    }

    /// Every leaf key whose value (in the embedded defaults) is a string, dotted.
    fn string_keys() -> Vec<String> {
        fn walk(prefix: &str, dict: &figment::value::Dict, out: &mut Vec<String>) {
            for (key, value) in dict {
                let path = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
                match value {
                    figment::value::Value::String(..) => out.push(path),
                    figment::value::Value::Dict(_, inner) => walk(&path, inner, out),
                    _ => {}
                }
            }
        }
        let mut keys = Vec::new();
        if let Ok(figment::value::Value::Dict(_, dict)) =
            Figment::from(Toml::string(DEFAULT_TOML)).find_value("")
        {
            walk("", &dict, &mut keys);
        }
        keys
    }

    #[test]
    fn every_string_key_takes_a_number_or_a_boolean_from_the_environment() {
        let keys = string_keys();
        assert!(keys.contains(&"network.eip712_version".to_owned()) && keys.len() > 20, "{keys:?}");
        for key in &keys {
            for text in ["2", "1.10", "true"] {
                figment::Jail::expect_with(|jail| {
                    let var = format!("TOLLGATE_{}", key.replace('.', "__").to_uppercase());
                    jail.set_env(&var, text);
                    // Some keys refuse "2" for what it says (not an address, not a network):
                    // never for being a number or a boolean instead of a string.
                    if let Err(e) = Config::figment(None).extract::<Config>() {
                        let e = e.to_string();
                        assert!(!e.contains("invalid type"), "{var}={text}: {e}");
                    }
                    Ok(())
                });
            }
        }
        figment::Jail::expect_with(|jail| {
            jail.set_env("TOLLGATE_NETWORK__EIP712_VERSION", "2");
            jail.set_env("TOLLGATE_NETWORK__EIP712_NAME", "1.10");
            jail.set_env("TOLLGATE_SERVER__SERVER_ID", "true");
            jail.set_env("TOLLGATE_PAYMENT__CONFIRMATIONS", "3");
            let config = Config::load(None).expect("loads");
            assert_eq!(config.network.eip712_version, "2");
            assert_eq!(config.network.eip712_name, "1.10", "the text as typed, not the number 1.1");
            assert_eq!(config.server.server_id, "true");
            assert_eq!(config.payment.confirmations, 3, "numeric keys still parse");
            Ok(())
        });
    }

    #[test]
    fn relayer_key_from_env_is_redacted_in_debug() {
        figment::Jail::expect_with(|jail| {
            let key = "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d";
            jail.set_env("TOLLGATE_PAYMENT__RELAYER_KEY", key);
            let config = Config::load(None).expect("loads");
            assert_eq!(secret_opt(&config.payment.relayer_key), Some(key));
            assert!(!format!("{config:?}").contains("59c6995e"), "key leaked into Debug");
            Ok(())
        });
    }

    #[test]
    fn relayer_key_file_is_read() {
        figment::Jail::expect_with(|jail| {
            let key = "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d";
            jail.create_file("relayer.key", &format!("{key}\n"))?;
            jail.set_env("TOLLGATE_PAYMENT__RELAYER_KEY_FILE", "relayer.key");
            let config = Config::load(None).expect("loads");
            assert_eq!(secret_opt(&config.payment.relayer_key), Some(key));
            Ok(())
        });
    }
}
