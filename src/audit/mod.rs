//! `tollgate audit`: a wallet-holder's independent check of a tollgate server.
//!
//! Proves, trusting nothing the server says without checking it: every receipt of the wallet
//! is signed by a published key and names the wallet; `payer_seq` runs 1, 2, 3… with no gap or
//! fork and each `prev` is the previous receipt's leaf hash; every receipt covered by the
//! signed checkpoint is included in it; the checkpoint extends the one saved by the previous
//! audit (so the log did not rewrite history); and receipts match on-chain
//! `AuthorizationUsed`+`Transfer` one to one, both ways.

mod chain;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use alloy::primitives::Address;
use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use anyhow::{Context, bail};
use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::receipt::{SignedCheckpoint, SignedReceipt, keys, merkle};

/// What to audit, and where to remember the last checkpoint.
pub struct AuditRequest<'a> {
    pub wallet: &'a PrivateKeySigner,
    /// Base URL of the server (e.g. http://127.0.0.1:8402).
    pub server: &'a str,
    pub rpc: &'a str,
    pub state_file: PathBuf,
}

/// One finding that makes the audit fail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Problem {
    UnknownKey { payer_seq: u64, kid: String },
    BadSignature { payer_seq: u64 },
    NotOurWallet { payer_seq: u64 },
    SeqGap { expected: u64, found: u64 },
    SeqFork { payer_seq: u64 },
    PrevMismatch { payer_seq: u64 },
    NotInLog { payer_seq: u64, log_index: u64 },
    BadCheckpoint { reason: String },
    LogRewritten { previous_size: u64, size: u64 },
    NoTransfer { payer_seq: u64, tx: String },
    TransferWithoutReceipt { tx: String, nonce: String },
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::UnknownKey { payer_seq, kid } => {
                write!(f, "receipt #{payer_seq} is signed by an unknown key ({kid})")
            }
            Problem::BadSignature { payer_seq } => {
                write!(f, "receipt #{payer_seq} has an invalid signature (a field was changed)")
            }
            Problem::NotOurWallet { payer_seq } => write!(f, "receipt #{payer_seq} names another payer"),
            Problem::SeqGap { expected, found } => {
                write!(f, "gap in payer_seq: expected #{expected}, found #{found} (a receipt was dropped)")
            }
            Problem::SeqFork { payer_seq } => write!(f, "two receipts claim payer_seq #{payer_seq} (a fork)"),
            Problem::PrevMismatch { payer_seq } => {
                write!(f, "receipt #{payer_seq} does not chain to the previous receipt")
            }
            Problem::NotInLog { payer_seq, log_index } => {
                write!(
                    f,
                    "receipt #{payer_seq} (log index {log_index}) is not included in the signed checkpoint"
                )
            }
            Problem::BadCheckpoint { reason } => write!(f, "checkpoint rejected: {reason}"),
            Problem::LogRewritten { previous_size, size } => write!(
                f,
                "the log rewrote history: the checkpoint of size {size} does not extend the one of size \
                 {previous_size} saved by the previous audit"
            ),
            Problem::NoTransfer { payer_seq, tx } => {
                write!(f, "receipt #{payer_seq} has no matching transfer on chain (tx {tx})")
            }
            Problem::TransferWithoutReceipt { tx, nonce } => {
                write!(f, "on-chain transfer {tx} (nonce {nonce}) from this wallet has no receipt")
            }
        }
    }
}

/// One receipt's line in the report.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub payer_seq: u64,
    pub log_index: u64,
    pub tool: String,
    pub amount: String,
    pub outcome: String,
    pub tx: String,
    pub signature_ok: bool,
    /// `Some(true)` included, `Some(false)` not, `None` not yet covered by a checkpoint.
    pub in_log: Option<bool>,
    pub on_chain: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct AuditReport {
    pub wallet: String,
    pub server: String,
    pub receipts: Vec<Row>,
    pub checkpoint_size: u64,
    pub checkpoint_root: String,
    pub previous_checkpoint_size: Option<u64>,
    pub on_chain_payments: usize,
    pub problems: Vec<Problem>,
}

impl AuditReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// The checkpoint remembered between audits of one server by one wallet.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SavedState {
    tree_size: u64,
    root: String,
}

/// A small HTTP client for the server's public endpoints.
struct Server<'a> {
    http: reqwest::Client,
    base: &'a str,
}

impl Server<'_> {
    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let response = self.http.get(format!("{}{path}", self.base)).send().await?;
        let status = response.status();
        let body: Value = response.json().await.with_context(|| format!("GET {path}: not JSON"))?;
        if !status.is_success() {
            bail!("GET {path}: HTTP {status}: {body}");
        }
        Ok(body)
    }

    async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let response = self.http.post(format!("{}{path}", self.base)).json(body).send().await?;
        let status = response.status();
        let body: Value = response.json().await.with_context(|| format!("POST {path}: not JSON"))?;
        if !status.is_success() {
            bail!("POST {path}: HTTP {status}: {}", body["message"].as_str().unwrap_or_default());
        }
        Ok(body)
    }
}

pub async fn audit(req: &AuditRequest<'_>) -> anyhow::Result<AuditReport> {
    let server = Server { http: reqwest::Client::new(), base: req.server.trim_end_matches('/') };
    let wallet = req.wallet.address();
    let listing = server.get("/.well-known/x402").await?;
    let keys = published_keys(&listing)?;
    let pay_to: Address = listing["payTo"].as_str().context("listing has no payTo")?.parse()?;
    let asset: Address = listing["asset"].as_str().context("listing has no asset")?.parse()?;
    let receipts = fetch_receipts(&server, req.wallet).await?;
    let mut problems = Vec::new();

    // Signatures, the payer's chain, and the log.
    check_chain(&receipts, &keys, wallet, &mut problems);
    let checkpoint = fetch_checkpoint(&server, &keys, &mut problems).await?;
    let size = checkpoint.as_ref().map_or(0, |c| c.body.tree_size);
    let root = checkpoint.as_ref().map(|c| c.body.root.clone()).unwrap_or_default();
    let mut in_log = HashMap::new();
    for (log_index, r) in &receipts {
        if *log_index < size {
            let included = prove_inclusion(&server, *log_index, size, r, &root).await?;
            if !included {
                problems.push(Problem::NotInLog { payer_seq: r.body.payer_seq, log_index: *log_index });
            }
            in_log.insert(*log_index, included);
        }
    }
    let previous = check_consistency(&server, &req.state_file, size, &root, &mut problems).await?;

    // Both ways against the chain.
    let payments = chain::payments(req.rpc, asset, wallet, pay_to).await?;
    let mut matched = std::collections::HashSet::new();
    let mut rows = Vec::new();
    for (log_index, r) in &receipts {
        let b = &r.body;
        let on_chain = payments
            .get(&b.nonce.to_ascii_lowercase())
            .is_some_and(|p| p.tx.eq_ignore_ascii_case(&b.tx) && p.amount.to_string() == b.amount);
        if on_chain {
            matched.insert(b.nonce.to_ascii_lowercase());
        } else {
            problems.push(Problem::NoTransfer { payer_seq: b.payer_seq, tx: b.tx.clone() });
        }
        rows.push(Row {
            payer_seq: b.payer_seq,
            log_index: *log_index,
            tool: b.tool.clone(),
            amount: b.amount.clone(),
            outcome: b.outcome.clone(),
            tx: b.tx.clone(),
            signature_ok: signature_ok(r, &keys),
            in_log: in_log.get(log_index).copied(),
            on_chain,
        });
    }
    for (nonce, p) in &payments {
        if !matched.contains(nonce) {
            problems.push(Problem::TransferWithoutReceipt { tx: p.tx.clone(), nonce: nonce.clone() });
        }
    }
    if problems.is_empty() && size > 0 {
        save_state(&req.state_file, &SavedState { tree_size: size, root: root.clone() })?;
    }
    Ok(AuditReport {
        wallet: wallet.to_checksum(None),
        server: req.server.to_owned(),
        receipts: rows,
        checkpoint_size: size,
        checkpoint_root: root,
        previous_checkpoint_size: previous,
        on_chain_payments: payments.len(),
        problems,
    })
}

fn published_keys(listing: &Value) -> anyhow::Result<BTreeMap<String, VerifyingKey>> {
    let mut keys = BTreeMap::new();
    for k in listing["receiptKeys"].as_array().context("listing has no receiptKeys")? {
        let public = k["publicKey"].as_str().and_then(keys::parse_public).context("bad receipt key")?;
        // The key id is derived, never taken on trust.
        keys.insert(keys::key_id(&public), public);
    }
    Ok(keys)
}

/// All of the wallet's receipts, proving control of the wallet with a signed challenge.
async fn fetch_receipts(
    server: &Server<'_>,
    wallet: &PrivateKeySigner,
) -> anyhow::Result<Vec<(u64, SignedReceipt)>> {
    let mut out = Vec::new();
    let mut after_seq = 0;
    loop {
        let challenge =
            server.post("/log/receipts/challenge", &json!({ "wallet": wallet.address() })).await?;
        let text = challenge["challenge"].as_str().context("no challenge")?;
        let signature = wallet.sign_message_sync(text.as_bytes())?;
        let page = server
            .post(
                "/log/receipts",
                &json!({
                    "wallet": wallet.address(),
                    "after_seq": after_seq,
                    "challenge": text,
                    "signature": format!("0x{}", hex::encode(signature.as_bytes())),
                }),
            )
            .await?;
        for item in page["receipts"].as_array().context("no receipts array")? {
            let receipt: SignedReceipt =
                serde_json::from_value(item["receipt"].clone()).context("malformed receipt")?;
            after_seq = after_seq.max(receipt.body.payer_seq);
            out.push((item["log_index"].as_u64().unwrap_or(receipt.body.log_index), receipt));
        }
        if page["more"] != true {
            return Ok(out);
        }
    }
}

fn signature_ok(r: &SignedReceipt, keys: &BTreeMap<String, VerifyingKey>) -> bool {
    keys.get(&r.body.kid).is_some_and(|k| r.verify(k))
}

fn check_chain(
    receipts: &[(u64, SignedReceipt)],
    keys: &BTreeMap<String, VerifyingKey>,
    wallet: Address,
    problems: &mut Vec<Problem>,
) {
    let mut expected_seq = 1;
    let mut prev_hash = String::new();
    let mut seen = std::collections::HashSet::new();
    for (_, r) in receipts {
        let b = &r.body;
        if !keys.contains_key(&b.kid) {
            problems.push(Problem::UnknownKey { payer_seq: b.payer_seq, kid: b.kid.clone() });
        } else if !signature_ok(r, keys) {
            problems.push(Problem::BadSignature { payer_seq: b.payer_seq });
        }
        if b.payer.parse::<Address>().ok() != Some(wallet) {
            problems.push(Problem::NotOurWallet { payer_seq: b.payer_seq });
        }
        if !seen.insert(b.payer_seq) {
            problems.push(Problem::SeqFork { payer_seq: b.payer_seq });
            continue;
        }
        if b.payer_seq != expected_seq {
            problems.push(Problem::SeqGap { expected: expected_seq, found: b.payer_seq });
        } else if b.prev != prev_hash {
            problems.push(Problem::PrevMismatch { payer_seq: b.payer_seq });
        }
        expected_seq = b.payer_seq + 1;
        prev_hash = hex::encode(r.leaf_hash());
    }
}

async fn fetch_checkpoint(
    server: &Server<'_>,
    keys: &BTreeMap<String, VerifyingKey>,
    problems: &mut Vec<Problem>,
) -> anyhow::Result<Option<SignedCheckpoint>> {
    let response = server.http.get(format!("{}/log/checkpoint", server.base)).send().await?;
    if response.status() == reqwest::StatusCode::NOT_FOUND {
        return Ok(None);
    }
    let checkpoint: SignedCheckpoint = response.json().await.context("malformed checkpoint")?;
    match keys.get(&checkpoint.body.kid) {
        Some(key) if checkpoint.verify(key) => Ok(Some(checkpoint)),
        Some(_) => {
            problems.push(Problem::BadCheckpoint { reason: "invalid signature".into() });
            Ok(None)
        }
        None => {
            problems.push(Problem::BadCheckpoint { reason: format!("unknown key {}", checkpoint.body.kid) });
            Ok(None)
        }
    }
}

fn hash_from_hex(s: &str) -> Option<merkle::Hash> {
    hex::decode(s).ok()?.try_into().ok()
}

fn proof_from(value: &Value) -> Vec<merkle::Hash> {
    value
        .as_array()
        .map(|a| a.iter().filter_map(|h| h.as_str().and_then(hash_from_hex)).collect())
        .unwrap_or_default()
}

async fn prove_inclusion(
    server: &Server<'_>,
    index: u64,
    size: u64,
    r: &SignedReceipt,
    root: &str,
) -> anyhow::Result<bool> {
    let answer = server.get(&format!("/log/inclusion?index={index}&tree_size={size}")).await?;
    let Some(root) = hash_from_hex(root) else { return Ok(false) };
    // The leaf is recomputed from the receipt itself, not taken from the server's answer.
    Ok(merkle::verify_inclusion(index, size, &r.leaf_hash(), &proof_from(&answer["proof"]), &root))
}

/// Checks the new checkpoint extends the saved one; returns the saved size.
async fn check_consistency(
    server: &Server<'_>,
    state_file: &PathBuf,
    size: u64,
    root: &str,
    problems: &mut Vec<Problem>,
) -> anyhow::Result<Option<u64>> {
    let Some(saved) = load_state(state_file)? else { return Ok(None) };
    let rewritten = Problem::LogRewritten { previous_size: saved.tree_size, size };
    if size < saved.tree_size {
        problems.push(rewritten);
        return Ok(Some(saved.tree_size));
    }
    let (Some(old_root), Some(new_root)) = (hash_from_hex(&saved.root), hash_from_hex(root)) else {
        problems.push(rewritten);
        return Ok(Some(saved.tree_size));
    };
    let proof = if size == saved.tree_size {
        Vec::new()
    } else {
        let answer = server.get(&format!("/log/consistency?first={}&second={size}", saved.tree_size)).await?;
        proof_from(&answer["proof"])
    };
    if !merkle::verify_consistency(saved.tree_size, size, &proof, &old_root, &new_root) {
        problems.push(rewritten);
    }
    Ok(Some(saved.tree_size))
}

fn load_state(path: &PathBuf) -> anyhow::Result<Option<SavedState>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(serde_json::from_str(&text).with_context(|| format!("{}", path.display()))?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("{}", path.display())),
    }
}

fn save_state(path: &PathBuf, state: &SavedState) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(state)?)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// The human-readable report.
pub fn render(report: &AuditReport) -> String {
    use std::fmt::Write;
    let mark = |ok: bool| if ok { "ok" } else { "FAIL" };
    let mut out = String::new();
    let _ = writeln!(out, "audit of {} at {}", report.wallet, report.server);
    let _ = writeln!(
        out,
        "{:>5} {:>6}  {:<18} {:>12}  {:<10} {:<14} {:<4} {:<7} {:<5}",
        "seq", "log", "tool", "amount", "outcome", "tx", "sig", "log", "chain"
    );
    for r in &report.receipts {
        let tx = if r.tx.len() > 12 {
            format!("{}…{}", &r.tx[..8], &r.tx[r.tx.len() - 4..])
        } else {
            r.tx.clone()
        };
        let log = match r.in_log {
            Some(true) => "ok",
            Some(false) => "FAIL",
            None => "pending",
        };
        let _ = writeln!(
            out,
            "{:>5} {:>6}  {:<18} {:>12}  {:<10} {:<14} {:<4} {:<7} {:<5}",
            r.payer_seq,
            r.log_index,
            r.tool,
            r.amount,
            r.outcome,
            tx,
            mark(r.signature_ok),
            log,
            mark(r.on_chain)
        );
    }
    let _ = writeln!(out, "log checkpoint: size {} root {}", report.checkpoint_size, report.checkpoint_root);
    if let Some(previous) = report.previous_checkpoint_size {
        let _ = writeln!(out, "previous audit: size {previous}");
    }
    let _ = writeln!(out, "on-chain payments from this wallet to payTo: {}", report.on_chain_payments);
    if report.ok() {
        let _ = writeln!(
            out,
            "verdict: OK — {} receipts verified, logged and matched on chain",
            report.receipts.len()
        );
    } else {
        let _ = writeln!(out, "verdict: FAILED — {} problem(s):", report.problems.len());
        for p in &report.problems {
            let _ = writeln!(out, "  - {p}");
        }
    }
    out
}
