//! The server side of the audit: its public listing (for the receipt keys) and the wallet's
//! receipts, fetched with a signed challenge.
//!
//! Everything read here is the server's word. A receipt's log index is taken from its signed
//! body; the unsigned `log_index` served beside it must agree, or the receipt is reported.
//! Does not check the receipts themselves: signatures, chain and log are the caller's job.

use std::collections::BTreeMap;

use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use anyhow::{Context, bail};
use ed25519_dalek::VerifyingKey;
use serde_json::{Value, json};

use super::report::Problem;
use crate::receipt::{SignedReceipt, keys};

/// A small HTTP client for the server's public endpoints.
pub struct Server<'a> {
    http: reqwest::Client,
    base: &'a str,
}

impl<'a> Server<'a> {
    pub fn new(base: &'a str) -> Server<'a> {
        Server { http: reqwest::Client::new(), base: base.trim_end_matches('/') }
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let request = self.http.get(format!("{}{path}", self.base));
        let response = request.send().await.with_context(|| format!("GET {path}"))?;
        read_json(response, "GET", path).await
    }

    async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let request = self.http.post(format!("{}{path}", self.base)).json(body);
        let response = request.send().await.with_context(|| format!("POST {path}"))?;
        read_json(response, "POST", path).await
    }
}

/// The JSON of a successful answer; any other status is an error naming it.
async fn read_json(response: reqwest::Response, method: &str, path: &str) -> anyhow::Result<Value> {
    let status = response.status();
    let text = response.text().await.with_context(|| format!("{method} {path}: reading the body"))?;
    if !status.is_success() {
        bail!("{method} {path}: HTTP {status}: {}", error_message(&text));
    }
    serde_json::from_str(&text).with_context(|| format!("{method} {path}: not JSON"))
}

/// The `message` of a JSON error body, else the start of the body: the server chose it, so it
/// is kept short.
fn error_message(text: &str) -> String {
    let message = serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| text.to_owned());
    message.chars().take(200).collect()
}

/// The receipt keys the listing publishes, by key id.
pub fn published_keys(listing: &Value) -> anyhow::Result<BTreeMap<String, VerifyingKey>> {
    let mut out = BTreeMap::new();
    for k in listing["receiptKeys"].as_array().context("listing has no receiptKeys")? {
        let public = k["publicKey"].as_str().and_then(keys::parse_public).context("bad receipt key")?;
        // The key id is derived, never taken on trust.
        out.insert(keys::key_id(&public), public);
    }
    Ok(out)
}

/// All of the wallet's receipts, proving control of the wallet with a signed challenge.
pub async fn fetch_receipts(
    server: &Server<'_>,
    wallet: &PrivateKeySigner,
    problems: &mut Vec<Problem>,
) -> anyhow::Result<Vec<SignedReceipt>> {
    let mut out = Vec::new();
    let mut after_seq = 0;
    loop {
        let page = fetch_page(server, wallet, after_seq).await?;
        let start = after_seq;
        for item in page["receipts"].as_array().context("no receipts array")? {
            let receipt: SignedReceipt =
                serde_json::from_value(item["receipt"].clone()).context("malformed receipt")?;
            check_served_index(item, &receipt, problems);
            after_seq = after_seq.max(receipt.body.payer_seq);
            out.push(receipt);
        }
        if page["more"] != true {
            return Ok(out);
        }
        // A server that keeps saying "more" without moving on would hold the audit forever.
        if after_seq == start {
            bail!("POST /log/receipts: more pages promised after #{after_seq}, but none came");
        }
    }
}

async fn fetch_page(server: &Server<'_>, wallet: &PrivateKeySigner, after_seq: u64) -> anyhow::Result<Value> {
    let challenge = server.post("/log/receipts/challenge", &json!({ "wallet": wallet.address() })).await?;
    let text = challenge["challenge"].as_str().context("no challenge")?;
    let signature = wallet.sign_message_sync(text.as_bytes())?;
    let request = json!({
        "wallet": wallet.address(),
        "after_seq": after_seq,
        "challenge": text,
        "signature": format!("0x{}", hex::encode(signature.as_bytes())),
    });
    server.post("/log/receipts", &request).await
}

/// The `log_index` served beside a receipt is unsigned: only the body's counts, and a wrapper
/// that names another index is the server misdirecting the inclusion check.
fn check_served_index(item: &Value, receipt: &SignedReceipt, problems: &mut Vec<Problem>) {
    let (served, signed) = (&item["log_index"], receipt.body.log_index);
    if !served.is_null() && served.as_u64() != Some(signed) {
        problems.push(Problem::LogIndexMismatch {
            payer_seq: receipt.body.payer_seq,
            signed,
            served: served.to_string(),
        });
    }
}
