//! `tollgate audit`: a wallet-holder's independent check of a tollgate server, built so the
//! server cannot blind it.
//!
//! Guarantees, trusting nothing the server says without checking it:
//! - every receipt of the wallet is signed by a published key and names the wallet;
//! - `payer_seq` runs 1, 2, 3… with no gap or fork, and each `prev` is the previous leaf hash;
//! - every receipt is in the log at the index its *signed* body names, proven against the latest
//!   signed checkpoint; one the checkpoint does not cover yet passes only within the holder's
//!   grace, and an unsigned `log_index` served beside it must agree with the signed one;
//! - a missing or unverifiable checkpoint fails the audit, since then nothing is proven logged;
//! - the checkpoint extends the one saved by the previous audit (the log did not rewrite history);
//! - receipts match on-chain `AuthorizationUsed`+`Transfer` one to one, both ways, on the chain
//!   `--rpc` serves, for every payTo and token the signed receipts name, plus those the holder
//!   names (`--pay-to`, `--asset`) and those the listing names. The listing can only widen
//!   that set: it cannot drop or replace a payTo or token a receipt names.
//!
//! Does not check: that a result's content is right (only what was returned); that the price
//! matches the listing; payments that are not EIP-3009 authorizations, or that go to a payTo or
//! in a token that no receipt, flag or listing names; receipts signed for another chain than
//! `--rpc`'s (they fail as unverifiable there). Which keys are the server's is the listing's
//! word; a log rewritten under a new key still fails the consistency check.

mod chain;
mod log;
mod report;
mod server;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use alloy::primitives::Address;
use alloy::signers::local::PrivateKeySigner;
use ed25519_dalek::VerifyingKey;
use serde_json::Value;

pub use self::report::{AuditReport, Problem, Row, Warning, render};

use self::chain::{PaymentKey, Payments};
use self::server::Server;
use crate::clock::{SharedClock, SystemClock};
use crate::receipt::{ReceiptBody, SignedReceipt};

/// How long a receipt may stay out of the signed checkpoint unless the holder says otherwise.
/// The server does not publish its checkpoint interval, so this covers any sane interval plus
/// clock skew between the holder and the server.
pub const DEFAULT_CHECKPOINT_GRACE_SECS: u64 = 600;

/// What to audit, and where to remember the last checkpoint.
pub struct AuditRequest<'a> {
    pub wallet: &'a PrivateKeySigner,
    /// Base URL of the server (e.g. http://127.0.0.1:8402).
    pub server: &'a str,
    pub rpc: &'a str,
    pub state_file: PathBuf,
}

/// What the holder adds to an audit. None of it comes from the server.
#[derive(Clone)]
pub struct AuditOptions {
    /// Recipients the wallet paid, besides those its receipts name (`--pay-to`).
    pub pay_to: Vec<Address>,
    /// Tokens the wallet paid with, besides those its receipts name (`--asset`).
    pub assets: Vec<Address>,
    /// How long a receipt may stay out of the signed checkpoint (`--checkpoint-grace-secs`).
    pub checkpoint_grace_secs: u64,
    /// The holder's clock, which judges how old a receipt is.
    pub clock: SharedClock,
}

impl Default for AuditOptions {
    fn default() -> Self {
        AuditOptions {
            pay_to: Vec::new(),
            assets: Vec::new(),
            checkpoint_grace_secs: DEFAULT_CHECKPOINT_GRACE_SECS,
            clock: Arc::new(SystemClock),
        }
    }
}

/// [`audit_with`] the default options.
pub async fn audit(req: &AuditRequest<'_>) -> anyhow::Result<AuditReport> {
    audit_with(req, &AuditOptions::default()).await
}

/// Audits the wallet's receipts: their signatures and chain, the log, then the chain both ways.
pub async fn audit_with(req: &AuditRequest<'_>, options: &AuditOptions) -> anyhow::Result<AuditReport> {
    let server = Server::new(req.server);
    let wallet = req.wallet.address();
    let listing = server.get("/.well-known/x402").await?;
    let keys = server::published_keys(&listing)?;
    let (mut problems, mut warnings) = (Vec::new(), Vec::new());
    let receipts = server::fetch_receipts(&server, req.wallet, &mut problems).await?;
    check_payer_chain(&receipts, &keys, wallet, &mut problems);

    // The log: inclusion at the signed index, then consistency with the previous audit.
    let deadline = log::Deadline { grace_secs: options.checkpoint_grace_secs, now: options.clock.now_unix() };
    let checkpoint = log::fetch_checkpoint(&server, &keys, &mut problems).await;
    let head = checkpoint.as_ref();
    let in_log =
        log::check_inclusion(&server, &receipts, head, &deadline, &mut problems, &mut warnings).await?;
    let previous = match head {
        Some(c) => log::check_consistency(&server, &req.state_file, c, &mut problems).await?,
        None => None,
    };

    // Both ways against the chain, for every recipient and token the receipts name.
    let chain = chain::Chain::connect(req.rpc)?;
    let network = chain.network().await?;
    let scan = scan_of(wallet, &receipts, &listing, options);
    let payments = chain.payments(&scan).await?;
    let settlers = published_settlers(&listing);
    let mut rows = reconcile(&receipts, &keys, &in_log, &payments, &network, &mut problems);
    name_settlers(&mut rows, &payments, &settlers);
    check_refunds(&receipts, &chain, wallet, &mut rows, &mut problems).await?;

    if let Some(c) = head.filter(|_| problems.is_empty()) {
        log::save_state(&req.state_file, c)?;
    }
    Ok(AuditReport {
        wallet: wallet.to_checksum(None),
        server: req.server.to_owned(),
        network,
        pay_to: scan.pay_to.iter().map(|a| a.to_checksum(None)).collect(),
        receipts: rows,
        checkpoint_size: head.map_or(0, |c| c.tree_size),
        checkpoint_root: head.map(|c| c.root.clone()).unwrap_or_default(),
        checkpoint_grace_secs: options.checkpoint_grace_secs,
        previous_checkpoint_size: previous,
        on_chain_payments: payments.len(),
        problems,
        warnings,
    })
}

/// The addresses the server publishes as its settlement signers (its relayer, or its
/// facilitator's signers from `/supported`).
fn published_settlers(listing: &Value) -> Vec<Address> {
    let signers = listing["settlement"]["signers"].as_array();
    signers.into_iter().flatten().filter_map(|a| a.as_str()?.parse().ok()).collect()
}

/// Names who sent each matched payment's transaction: "server" for a published signer, else
/// the sender's address (a third party redeemed the authorization, which tollgate honours).
fn name_settlers(rows: &mut [Row], payments: &Payments, settlers: &[Address]) {
    for row in rows.iter_mut().filter(|r| r.on_chain) {
        let sender = payments.values().find(|p| p.tx.eq_ignore_ascii_case(&row.tx)).map(|p| p.sender);
        row.settled_by = sender.map(|s| match settlers.contains(&s) {
            true => "server".to_owned(),
            false => s.to_checksum(None),
        });
    }
}

/// Reconciles refunds: a receipt that says "sent" must name a transaction whose own
/// `Transfer(refund wallet → this wallet, amount)` log is on chain, one transaction per refund;
/// one that says "failed" is an amount the server owes, and fails the audit until paid.
async fn check_refunds(
    receipts: &[SignedReceipt],
    chain: &chain::Chain,
    wallet: Address,
    rows: &mut [Row],
    problems: &mut Vec<Problem>,
) -> anyhow::Result<()> {
    let mut seen = HashSet::new();
    for (r, row) in receipts.iter().zip(rows.iter_mut()) {
        let (b, Some(refund)) = (&r.body, &r.body.refund) else { continue };
        let verdict = match (refund.status.as_str(), &refund.tx) {
            // A refund of less than was paid is not the refund the receipt promises.
            ("sent", Some(tx)) if refund.amount != b.amount => {
                problems.push(Problem::RefundNotFound { payer_seq: b.payer_seq, tx: tx.clone() });
                "FAIL"
            }
            ("sent", Some(tx)) => {
                let (asset, from) = (b.asset.parse::<Address>(), refund.from.parse::<Address>());
                let paid = match (asset, from, tx.parse()) {
                    (Ok(asset), Ok(from), Ok(hash)) if seen.insert(tx.to_ascii_lowercase()) => {
                        chain.transferred(asset, hash, from, wallet, &refund.amount).await?
                    }
                    _ => false,
                };
                if !paid {
                    problems.push(Problem::RefundNotFound { payer_seq: b.payer_seq, tx: tx.clone() });
                }
                if paid { "ok" } else { "FAIL" }
            }
            _ => {
                let reason = refund.reason.clone().unwrap_or_else(|| refund.status.clone());
                let amount = refund.amount.clone();
                problems.push(Problem::RefundOwed { payer_seq: b.payer_seq, amount, reason });
                "owed"
            }
        };
        row.refund = Some(verdict.to_owned());
    }
    Ok(())
}

fn signature_ok(r: &SignedReceipt, keys: &BTreeMap<String, VerifyingKey>) -> bool {
    keys.get(&r.body.kid).is_some_and(|k| r.verify(k))
}

/// Signatures, the payer, and the per-payer chain of `payer_seq` and `prev`.
fn check_payer_chain(
    receipts: &[SignedReceipt],
    keys: &BTreeMap<String, VerifyingKey>,
    wallet: Address,
    problems: &mut Vec<Problem>,
) {
    let mut expected_seq = 1;
    let mut prev_hash = String::new();
    let mut seen = HashSet::new();
    for r in receipts {
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

/// Whom and with what the chain is scanned for. A union: what the listing and the flags name
/// is added to what the receipts name, so neither can drop or replace a receipt's payTo.
fn scan_of(
    wallet: Address,
    receipts: &[SignedReceipt],
    listing: &Value,
    options: &AuditOptions,
) -> chain::Scan {
    let mut pay_to: BTreeSet<Address> = options.pay_to.iter().copied().collect();
    let mut assets: BTreeSet<Address> = options.assets.iter().copied().collect();
    for r in receipts {
        pay_to.extend(r.body.pay_to.parse::<Address>().ok());
        assets.extend(r.body.asset.parse::<Address>().ok());
    }
    // The listing matters only for payments that have no receipt at all.
    pay_to.extend(listing["payTo"].as_str().and_then(|a| a.parse::<Address>().ok()));
    assets.extend(listing["asset"].as_str().and_then(|a| a.parse::<Address>().ok()));
    chain::Scan { wallet, assets, pay_to }
}

/// Matches receipts to on-chain payments one to one, both ways; returns the report's rows.
fn reconcile(
    receipts: &[SignedReceipt],
    keys: &BTreeMap<String, VerifyingKey>,
    in_log: &[Option<bool>],
    payments: &Payments,
    network: &str,
    problems: &mut Vec<Problem>,
) -> Vec<Row> {
    let mut matched = HashSet::new();
    let mut rows = Vec::with_capacity(receipts.len());
    for (r, in_log) in receipts.iter().zip(in_log) {
        let on_chain = match match_payment(&r.body, payments, network) {
            Ok(key) => {
                // One to one: a second receipt for the same payment has no transfer of its own.
                let first = matched.insert(key);
                if !first {
                    problems.push(no_transfer(&r.body));
                }
                first
            }
            Err(problem) => {
                problems.push(problem);
                false
            }
        };
        rows.push(row(r, keys, *in_log, on_chain));
    }
    for ((_, nonce), p) in payments.iter().filter(|(key, _)| !matched.contains(*key)) {
        let to = p.to.to_checksum(None);
        problems.push(Problem::TransferWithoutReceipt { tx: p.tx.clone(), nonce: nonce.clone(), to });
    }
    rows
}

/// The on-chain payment a receipt stands for: same token, nonce, tx, amount and recipient.
fn match_payment(b: &ReceiptBody, payments: &Payments, network: &str) -> Result<PaymentKey, Problem> {
    if b.network != network {
        let (network, rpc_network) = (b.network.clone(), network.to_owned());
        return Err(Problem::OtherNetwork { payer_seq: b.payer_seq, network, rpc_network });
    }
    let asset: Address = b.asset.parse().map_err(|_| no_transfer(b))?;
    let key = (asset, b.nonce.to_ascii_lowercase());
    let p = payments.get(&key).ok_or_else(|| no_transfer(b))?;
    let same = p.tx.eq_ignore_ascii_case(&b.tx)
        && p.amount.to_string() == b.amount
        && b.pay_to.parse::<Address>().ok() == Some(p.to);
    if same { Ok(key) } else { Err(no_transfer(b)) }
}

fn no_transfer(b: &ReceiptBody) -> Problem {
    Problem::NoTransfer { payer_seq: b.payer_seq, tx: b.tx.clone() }
}

fn row(
    r: &SignedReceipt,
    keys: &BTreeMap<String, VerifyingKey>,
    in_log: Option<bool>,
    on_chain: bool,
) -> Row {
    let b = &r.body;
    Row {
        payer_seq: b.payer_seq,
        log_index: b.log_index,
        tool: b.tool.clone(),
        amount: b.amount.clone(),
        outcome: b.outcome.clone(),
        tx: b.tx.clone(),
        signature_ok: signature_ok(r, keys),
        in_log,
        on_chain,
        settled_by: None,
        refund: None,
    }
}
