//! [`FacilitatorSettler`]: an x402 facilitator's `/verify` then `/settle` (x402 v2
//! specification §7). The gate still confirms the payment on chain itself.

use std::sync::Arc;
use std::time::Duration;

use alloy::primitives::{Address, B256};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Cached, SettleError, SettleRequest, Settler, Submitted, TxRecorder};
use crate::cdp_auth::CdpAuth;
use crate::payment::error::PaymentError;

/// How tollgate proves itself to a facilitator.
pub enum FacilitatorAuth {
    /// None: the public testnet facilitator.
    None,
    /// A fixed `Authorization` header value.
    Header(SecretString),
    /// A fresh JWT per request, signed with a CDP API key (Coinbase's facilitator).
    Cdp(CdpAuth),
}

/// Why a facilitator cannot settle our payments, found by asking its `/supported`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FacilitatorCheckError {
    #[error("facilitator unreachable: {0}")]
    Unreachable(String),
    #[error(
        "the facilitator refused our credentials (HTTP {status}: {said}): check \
         payment.facilitator.cdp_key_id and cdp_key_secret, or auth_header"
    )]
    Unauthorized { status: u16, said: String },
    #[error("facilitator /supported answered HTTP {0}")]
    Status(u16),
    #[error("facilitator /supported did not answer with a list of supported kinds")]
    Malformed,
    #[error("the facilitator does not settle x402 v2 `exact` payments on {network}; it offers: {offers}")]
    Unsupported { network: String, offers: String },
}

/// `GET /supported`: what a facilitator settles, and with which signer addresses.
#[derive(Debug, Deserialize)]
struct Supported {
    kinds: Vec<SupportedKind>,
    #[serde(default)]
    signers: std::collections::BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SupportedKind {
    x402_version: u64,
    scheme: String,
    network: String,
}

impl Supported {
    /// The signers that settle on `network`: those listed for it, or for its whole CAIP-2
    /// namespace (`eip155:*`).
    fn signers_for(&self, network: &str) -> Vec<Address> {
        let namespace = network.split(':').next().map(|n| format!("{n}:*"));
        let mut signers: Vec<Address> = self
            .signers
            .iter()
            .filter(|(k, _)| k.as_str() == network || Some(k.as_str()) == namespace.as_deref())
            .flat_map(|(_, list)| list.iter().filter_map(|a| a.parse().ok()))
            .collect();
        signers.sort();
        signers.dedup();
        signers
    }
}

/// Success of `/supported` is reused this long by readiness probes: it rarely changes, and
/// each probe would otherwise spend the facilitator's rate limit.
const SUPPORTED_TTL: Duration = Duration::from_secs(60);
/// `/supported` answering 429 is retried this many times, with doubling backoff (as the
/// official x402 HTTP facilitator client does).
const SUPPORTED_RETRIES: u32 = 3;

/// Submits through an x402 facilitator (x402 v2 specification §7, the facilitator API).
pub struct FacilitatorSettler {
    http: reqwest::Client,
    base_url: String,
    auth: FacilitatorAuth,
    /// The facilitator's signers on our network, from its last `/supported` answer.
    signers: std::sync::RwLock<Vec<Address>>,
    checked: Cached<()>,
}

impl FacilitatorSettler {
    pub fn new(base_url: &str, auth: FacilitatorAuth, timeout: Duration) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder().timeout(timeout).build()?;
        Ok(FacilitatorSettler {
            http,
            base_url: base_url.trim_end_matches('/').to_owned(),
            auth,
            signers: Default::default(),
            checked: Cached::new(SUPPORTED_TTL),
        })
    }

    /// One authenticated request. Errors are for logs: URLs redacted, never the token.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Option<Value>), String> {
        let url: reqwest::Url =
            format!("{}/{path}", self.base_url).parse().map_err(|_| "bad facilitator URL".to_owned())?;
        let mut request = self.http.request(method.clone(), url.clone());
        if let Some(body) = body {
            request = request.json(body);
        }
        request = match &self.auth {
            FacilitatorAuth::None => request,
            FacilitatorAuth::Header(value) => request.header("authorization", value.expose_secret()),
            FacilitatorAuth::Cdp(cdp) => {
                let token = cdp.header_for(method.as_str(), &url).map_err(|_| "cannot sign the CDP token")?;
                request.header("authorization", token)
            }
        };
        let response =
            request.send().await.map_err(|e| crate::redact::urls(&format!("facilitator /{path}: {e}")))?;
        let status = response.status().as_u16();
        // A body that is not JSON is treated like no body: the status alone decides.
        Ok((status, response.json::<Value>().await.ok()))
    }

    async fn post(&self, path: &str, body: &Value) -> Result<(u16, Option<Value>), String> {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    /// The HTTP status the facilitator answers `body` at `path` with (`tollgate doctor`).
    pub async fn probe(&self, path: &str, body: &Value) -> Result<u16, String> {
        self.post(path, body).await.map(|(status, _)| status)
    }

    /// [`Self::check_supported`], its success reused for `SUPPORTED_TTL` (start-up and readiness
    /// probes share it).
    async fn supported_cached(&self, network: &str) -> Result<(), FacilitatorCheckError> {
        self.checked.get(async { self.check_supported(network).await.map(drop) }).await
    }

    /// Asks `/supported` whether the facilitator settles x402 v2 `exact` on `network`, and
    /// records its signers there.
    pub async fn check_supported(&self, network: &str) -> Result<Vec<Address>, FacilitatorCheckError> {
        let mut backoff = Duration::from_millis(250);
        let mut attempt = 0;
        let (status, body) = loop {
            let answer = self.call(reqwest::Method::GET, "supported", None).await;
            let (status, body) = answer.map_err(FacilitatorCheckError::Unreachable)?;
            attempt += 1;
            if status != 429 || attempt > SUPPORTED_RETRIES {
                break (status, body);
            }
            tokio::time::sleep(backoff).await;
            backoff *= 2;
        };
        match status {
            200..=299 => {}
            401 | 403 => {
                // What the facilitator says about it (CDP: `errorMessage`), cut short.
                let said = body
                    .as_ref()
                    .and_then(|b| b.get("errorMessage").or_else(|| b.get("message")))
                    .and_then(Value::as_str)
                    .unwrap_or("no reason given");
                let said = said.chars().filter(|c| !c.is_control()).take(200).collect();
                return Err(FacilitatorCheckError::Unauthorized { status, said });
            }
            _ => return Err(FacilitatorCheckError::Status(status)),
        }
        let supported: Supported =
            body.and_then(|b| serde_json::from_value(b).ok()).ok_or(FacilitatorCheckError::Malformed)?;
        let ours = |k: &SupportedKind| k.x402_version == 2 && k.scheme == "exact" && k.network == network;
        if !supported.kinds.iter().any(ours) {
            let offers: Vec<String> = supported
                .kinds
                .iter()
                .take(20)
                .map(|k| format!("v{} {} on {}", k.x402_version, k.scheme, k.network))
                .collect();
            let offers = if offers.is_empty() { "nothing".to_owned() } else { offers.join(", ") };
            return Err(FacilitatorCheckError::Unsupported { network: network.to_owned(), offers });
        }
        let signers = supported.signers_for(network);
        *self.signers.write().expect("not poisoned") = signers.clone();
        Ok(signers)
    }
}

#[async_trait::async_trait]
impl Settler for FacilitatorSettler {
    async fn submit(
        &self,
        req: &SettleRequest<'_>,
        _recorder: Arc<dyn TxRecorder>,
    ) -> Result<Submitted, SettleError> {
        let body = json!({
            "x402Version": 2,
            "paymentPayload": req.payload,
            "paymentRequirements": req.requirements,
        });
        // /verify moves no money: any failure to get an answer means "not sent".
        let (status, verdict) = self.post("verify", &body).await.map_err(SettleError::NotSent)?;
        match verdict.as_ref().and_then(|v| v.get("isValid")).and_then(Value::as_bool) {
            Some(true) => {}
            // Spent already (by a front-runner, or through another route): the gate asks the
            // chain who spent it, as it does when our own simulation says so.
            Some(false) if invalid_reason(verdict.as_ref()).contains("nonce_already_used") => {
                return Err(SettleError::Refused(PaymentError::NonceReused));
            }
            Some(false) => return Err(refused(verdict.as_ref(), "invalidReason")),
            None if status == 401 || status == 403 => {
                tracing::error!(facilitator.status = status, "the facilitator refused our credentials");
                return Err(SettleError::NotSent(format!(
                    "facilitator refused our credentials (HTTP {status})"
                )));
            }
            None => return Err(SettleError::NotSent(format!("facilitator /verify answered HTTP {status}"))),
        }
        // /settle may move money: from here on, no answer means "ambiguous".
        let (_, settled) =
            self.post("settle", &body).await.map_err(|_| SettleError::Ambiguous { tx: None })?;
        let Some(settled) = settled else {
            return Err(SettleError::Ambiguous { tx: None });
        };
        let tx = settled.get("transaction").and_then(Value::as_str).and_then(|t| t.parse::<B256>().ok());
        match settled.get("success").and_then(Value::as_bool) {
            Some(true) => tx.map(Submitted::from).ok_or(SettleError::Ambiguous { tx: None }),
            // Upstream's non-terminal outcome: submitted, not confirmed.
            // `success:false` from /settle is not proof that nothing moved: a facilitator may
            // broadcast, then fail waiting for the receipt (or report `settlement_pending`).
            // The gate asks the chain before it concludes anything.
            Some(false) | None => {
                let reason = settled.get("errorReason").and_then(Value::as_str).unwrap_or("none");
                tracing::warn!(facilitator.reason = %reason.chars().take(100).collect::<String>(), "facilitator /settle did not confirm");
                Err(SettleError::Ambiguous { tx })
            }
        }
    }

    async fn preflight(&self, network: &str) -> anyhow::Result<()> {
        // Through the readiness cache, so the first probe right after start asks no second time.
        match self.supported_cached(network).await {
            Ok(()) => {}
            // Down for now is no verdict: serve unready (readiness keeps asking), rather than
            // crash-loop a fleet while the facilitator has an outage.
            Err(e @ FacilitatorCheckError::Unreachable(_)) => {
                tracing::warn!(error = %e, "the facilitator did not answer at start; unready until it does");
                return Ok(());
            }
            Err(FacilitatorCheckError::Status(status)) if status == 429 || status >= 500 => {
                tracing::warn!(
                    facilitator.status = status,
                    "the facilitator is failing at start; unready until it answers"
                );
                return Ok(());
            }
            // A definitive answer: wrong credentials, network or URL.
            Err(e) => return Err(e.into()),
        }
        let signers = self.signers();
        tracing::info!(facilitator.signers = ?signers, network, "the facilitator settles our payments");
        Ok(())
    }

    async fn ready(&self, network: &str) -> Option<Result<(), String>> {
        let checked = self.supported_cached(network).await;
        Some(checked.map_err(|e| e.to_string()))
    }

    fn kind(&self) -> &'static str {
        "facilitator signer"
    }

    fn signers(&self) -> Vec<Address> {
        self.signers.read().expect("not poisoned").clone()
    }
}

fn invalid_reason(body: Option<&Value>) -> &str {
    body.and_then(|b| b.get("invalidReason")).and_then(Value::as_str).unwrap_or_default()
}

fn refused(body: Option<&Value>, field: &str) -> SettleError {
    let reason = body
        .and_then(|b| b.get(field))
        .and_then(Value::as_str)
        .filter(|r| !r.is_empty() && r.len() <= 100)
        .unwrap_or("unexpected_settle_error");
    SettleError::Refused(PaymentError::SettlementFailed { reason: reason.to_owned() })
}
