//! `tollgate doctor`: the preflight an operator runs before going live, and whenever something
//! looks wrong. Each check says what it found and, when it fails, what that would break; the
//! command exits non-zero on any failure. It only reads: it migrates nothing, sends no
//! transaction, and its facilitator `/verify` call carries a payload no one signed.

use std::time::Duration;

use alloy::primitives::{Address, B256, U256};
use serde::Serialize;
use serde_json::json;

use crate::chain::Network;
use crate::chain::client::ChainClient;
use crate::config::{Config, LimitBackend, SettlerKind, secret_opt};

/// One check's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Fail,
    /// Not applicable to this configuration (e.g. relayer gas with a facilitator).
    Skip,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub status: Status,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub ok: bool,
    pub checks: Vec<Check>,
}

impl Report {
    pub fn check(&self, name: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.name == name)
    }

    /// A table for a person.
    pub fn render(&self) -> String {
        let width = self.checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
        let mut out = String::new();
        for c in &self.checks {
            let status = match c.status {
                Status::Ok => "ok",
                Status::Fail => "FAIL",
                Status::Skip => "skip",
            };
            out.push_str(&format!("{:<width$}  {status:<4}  {}\n", c.name, c.detail));
        }
        let failed = self.checks.iter().filter(|c| c.status == Status::Fail).count();
        match failed {
            0 => out.push_str("\nall checks passed\n"),
            n => out.push_str(&format!("\n{n} check(s) failed\n")),
        }
        out
    }
}

/// Each network call of a check is bounded by this.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs every check that applies to `config`.
pub async fn run(config: &Config) -> Report {
    let mut checks = Checks::default();
    checks.add(
        "config",
        config.validate_for_serving().map(|()| "complete for serving".into()).map_err(|e| e.to_string()),
    );
    let network = Network::from_config(&config.network).map_err(|e| e.to_string());
    let endpoints = config.network.rpc_endpoints();
    if endpoints.is_empty() {
        checks.add("rpc", Err("no network.rpc_url or rpc_urls".into()));
    }
    // Every endpoint on its own: a fallback one on the wrong chain would only show in an outage.
    let mut any_answered = false;
    for (i, url) in endpoints.iter().enumerate() {
        let name =
            if endpoints.len() == 1 { "chain_id".to_owned() } else { format!("chain_id (rpc {})", i + 1) };
        let outcome = match (&network, ChainClient::connect(url, Address::ZERO)) {
            (Err(e), _) => Err(e.clone()),
            (_, Err(e)) => Err(e.to_string()),
            (Ok(n), Ok(client)) => bounded(client.chain_id()).await.and_then(|id| {
                crate::readiness::chain_id_is(id, n.chain_id).map(|()| format!("{id} ({})", n.caip2))
            }),
        };
        any_answered |= outcome.is_ok();
        checks.add(&name, outcome);
    }
    let asset = network.as_ref().map(|n| n.asset).unwrap_or_default();
    let chain = any_answered.then(|| ChainClient::connect_any(&endpoints, asset).ok()).flatten();
    let relayer = relayer_address(config);
    match (&chain, &network) {
        (Some(chain), Ok(network)) => checks.add("eip712_domain", eip712_domain(chain, network).await),
        _ => checks.add("eip712_domain", Err("needs a reachable chain on the configured network".into())),
    }
    checks.add("pay_to", pay_to(config, relayer));
    match (config.payment.settler, relayer, &chain) {
        (SettlerKind::SelfRelay, Some(relayer), Some(chain)) => checks
            .add("relayer_gas", relayer_gas(chain, relayer, config.payment.min_relayer_balance_wei).await),
        (SettlerKind::SelfRelay, _, _) => {
            checks.add("relayer_gas", Err("needs a relayer key and a reachable chain".into()))
        }
        (SettlerKind::Facilitator, _, _) => checks.skip("relayer_gas", "a facilitator pays gas"),
    }
    if config.payment.settler == SettlerKind::Facilitator {
        let (supported, auth) = facilitator(config, network.as_ref().ok()).await;
        checks.add("facilitator_supported", supported);
        checks.add("facilitator_auth", auth);
    } else {
        checks.skip("facilitator_supported", "settler = \"self\"");
        checks.skip("facilitator_auth", "settler = \"self\"");
    }
    checks.add(
        "receipt_key",
        crate::receipt::ReceiptSigner::from_config(&config.receipts)
            .map(|s| format!("kid {}", s.kid))
            .map_err(|e| e.to_string()),
    );
    checks.add("migrations", migrations(config).await);
    let l = &config.limits;
    if l.backend == LimitBackend::Redis || config.ceiling.shared {
        checks.add("redis", redis(config).await);
    } else {
        checks.skip("redis", "limits.backend = \"memory\" and no shared ceiling");
    }
    let checks = checks.0;
    let ok = checks.iter().all(|c| c.status != Status::Fail);
    Report { ok, checks }
}

#[derive(Default)]
struct Checks(Vec<Check>);

impl Checks {
    fn add(&mut self, name: &str, outcome: Result<String, String>) {
        let (status, detail) = match outcome {
            Ok(detail) => (Status::Ok, detail),
            // Errors may quote a URL (an RPC's, with its key): scheme and host only.
            Err(detail) => (Status::Fail, crate::redact::urls(&detail)),
        };
        self.0.push(Check { name: name.to_owned(), status, detail });
    }

    /// A check that does not apply to this configuration, and why.
    fn skip(&mut self, name: &str, why: &str) {
        self.0.push(Check { name: name.to_owned(), status: Status::Skip, detail: why.to_owned() });
    }
}

async fn bounded<T, E: std::fmt::Display>(
    f: impl std::future::IntoFuture<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(CHECK_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer within 10 s".into()),
    }
}

fn relayer_address(config: &Config) -> Option<Address> {
    let key = secret_opt(&config.payment.relayer_key)?;
    crate::chain::parse_private_key(key).ok().map(|k| k.address())
}

alloy::sol! {
    #[sol(rpc)]
    interface IERC5267 {
        function eip712Domain() external view returns (
            bytes1 fields, string name, string version, uint256 chainId, address verifyingContract,
            bytes32 salt, uint256[] extensions
        );
    }
    #[sol(rpc)]
    interface IDomainSeparator {
        function DOMAIN_SEPARATOR() external view returns (bytes32);
    }
}

/// The token's EIP-712 domain against the configured one: read through EIP-5267 when the token
/// implements it, else compared by `DOMAIN_SEPARATOR()`. A mismatch fails every payment.
async fn eip712_domain(chain: &ChainClient, network: &Network) -> Result<String, String> {
    let token = network.asset;
    let ours = format!("name {:?}, version {:?}", network.eip712_name, network.eip712_version);
    let erc5267 = IERC5267::new(token, chain.provider());
    if let Ok(d) = bounded(erc5267.eip712Domain().call()).await {
        let same = d.name == network.eip712_name
            && d.version == network.eip712_version
            && d.chainId == U256::from(network.chain_id)
            && d.verifyingContract == token;
        return match same {
            true => Ok(format!("{ours} (EIP-5267)")),
            false => Err(format!(
                "the token's domain is name {:?}, version {:?}, chain {}; the config says {ours}: every \
                 payment would fail verification",
                d.name, d.version, d.chainId
            )),
        };
    }
    let separator: B256 =
        bounded(IDomainSeparator::new(token, chain.provider()).DOMAIN_SEPARATOR().call()).await.map_err(
            |e| format!("the token at {token} answers neither eip712Domain() nor DOMAIN_SEPARATOR(): {e}"),
        )?;
    match separator == network.domain().separator() {
        true => Ok(format!("{ours} (DOMAIN_SEPARATOR)")),
        false => Err(format!(
            "the token's DOMAIN_SEPARATOR differs from the one {ours} gives: every payment would fail verification"
        )),
    }
}

fn pay_to(config: &Config, relayer: Option<Address>) -> Result<String, String> {
    match config.payment.pay_to {
        None => Err("payment.pay_to is not set".into()),
        Some(a) if a.is_zero() => Err("payment.pay_to is the zero address: payments would be burnt".into()),
        Some(a) if Some(a) == relayer => {
            Err("payment.pay_to is the relayer: revenue and gas money would mix in one hot key".into())
        }
        Some(a) => Ok(a.to_checksum(None)),
    }
}

async fn relayer_gas(chain: &ChainClient, relayer: Address, floor: u128) -> Result<String, String> {
    let wei = bounded(chain.gas_balance(relayer)).await?;
    crate::readiness::gas_enough(wei, floor).map(|()| format!("{wei} wei at {relayer}"))
}

/// `/supported` for our network, and whether our credentials pass: a `/verify` of a payload no
/// one signed must be refused for the payload (any answer but 401/403), not for auth.
async fn facilitator(
    config: &Config,
    network: Option<&Network>,
) -> (Result<String, String>, Result<String, String>) {
    let settler = match crate::app::facilitator_settler(config) {
        Ok(s) => s,
        Err(e) => return (Err(format!("{e:#}")), Err("not checked".into())),
    };
    let supported = match network {
        Some(n) => settler
            .check_supported(&n.caip2)
            .await
            .map(|signers| format!("x402 v2 exact on {}; signers {signers:?}", n.caip2))
            .map_err(|e| e.to_string()),
        None => Err("no network".into()),
    };
    let probe = json!({ "x402Version": 2, "paymentPayload": {}, "paymentRequirements": {} });
    let auth = match settler.probe("verify", &probe).await {
        Ok(status @ (401 | 403)) => Err(format!("/verify refused our credentials (HTTP {status})")),
        Ok(status) => Ok(format!("/verify judged the probe on its payload (HTTP {status})")),
        Err(e) => Err(e),
    };
    (supported, auth)
}

async fn migrations(config: &Config) -> Result<String, String> {
    let store = bounded(crate::store::connect(&config.database)).await?;
    let pending = bounded(store.pending_migrations()).await?;
    match pending.as_slice() {
        [] => Ok("all applied".into()),
        versions => Err(format!("not applied: {versions:?} (run `tollgate migrate`)")),
    }
}

async fn redis(config: &Config) -> Result<String, String> {
    let url = secret_opt(&config.limits.redis_url).ok_or("limits.redis_url is not set")?;
    let buckets =
        bounded(crate::limits::redis::RedisBuckets::connect(url, &config.limits.key_prefix)).await?;
    bounded(buckets.ping()).await.map(|()| "PING answered".to_owned())
}
