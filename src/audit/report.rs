//! What the audit found, and how it reads: the findings that fail it (`Problem`), the ones that
//! only inform (`Warning`), one row per receipt, and the text report.

use serde::Serialize;

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
    // The unsigned wrapper names another log index than the signed body.
    LogIndexMismatch { payer_seq: u64, signed: u64, served: String },
    NotInLog { payer_seq: u64, log_index: u64 },
    // Left out of the latest checkpoint for longer than the holder's grace.
    Withheld { payer_seq: u64, log_index: u64, tree_size: u64, age_secs: u64, grace_secs: u64 },
    // Dated so far ahead that it would stay "not yet checkpointed" for as long as the server likes.
    FutureDated { payer_seq: u64, ahead_secs: u64 },
    NoCheckpoint { reason: String },
    BadCheckpoint { reason: String },
    LogRewritten { previous_size: u64, size: u64 },
    // Signed for a chain other than the one `--rpc` serves, so it cannot be reconciled.
    OtherNetwork { payer_seq: u64, network: String, rpc_network: String },
    NoTransfer { payer_seq: u64, tx: String },
    TransferWithoutReceipt { tx: String, nonce: String, to: String },
    // A receipt says its failed call was refunded, but that transaction did not send it back.
    RefundNotFound { payer_seq: u64, tx: String },
    // A receipt records a refund that failed: the server owes the amount.
    RefundOwed { payer_seq: u64, amount: String, reason: String },
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
            Problem::LogIndexMismatch { payer_seq, signed, served } => write!(
                f,
                "receipt #{payer_seq} was served with log index {served}, but its signed body says {signed}"
            ),
            Problem::NotInLog { payer_seq, log_index } => write!(
                f,
                "receipt #{payer_seq} (log index {log_index}) is not included in the signed checkpoint"
            ),
            Problem::Withheld { payer_seq, log_index, tree_size, age_secs, grace_secs } => write!(
                f,
                "receipt #{payer_seq} (log index {log_index}) is missing from the latest checkpoint (size \
                 {tree_size}) although it is {age_secs}s old, past the {grace_secs}s grace: the log is \
                 withholding it"
            ),
            Problem::FutureDated { payer_seq, ahead_secs } => write!(
                f,
                "receipt #{payer_seq} is dated {ahead_secs}s in the future, which would keep it out of the \
                 log unchecked"
            ),
            Problem::NoCheckpoint { reason } => write!(
                f,
                "the log's signed checkpoint is missing ({reason}): no receipt can be proven to be in the log"
            ),
            Problem::BadCheckpoint { reason } => write!(f, "checkpoint rejected: {reason}"),
            Problem::LogRewritten { previous_size, size } => write!(
                f,
                "the log rewrote history: the checkpoint of size {size} does not extend the one of size \
                 {previous_size} saved by the previous audit"
            ),
            Problem::OtherNetwork { payer_seq, network, rpc_network } => write!(
                f,
                "receipt #{payer_seq} is for network {network}, but --rpc serves {rpc_network}: audit it \
                 with an RPC of that chain"
            ),
            Problem::NoTransfer { payer_seq, tx } => {
                write!(f, "receipt #{payer_seq} has no matching transfer on chain (tx {tx})")
            }
            Problem::TransferWithoutReceipt { tx, nonce, to } => {
                write!(f, "on-chain transfer {tx} (nonce {nonce}) from this wallet to {to} has no receipt")
            }
            Problem::RefundNotFound { payer_seq, tx } => write!(
                f,
                "receipt #{payer_seq} records a refund in {tx}, but that transaction did not pay it back"
            ),
            Problem::RefundOwed { payer_seq, amount, reason } => {
                write!(f, "receipt #{payer_seq}: the refund of {amount} failed ({reason}); it is owed")
            }
        }
    }
}

/// A finding worth showing that does not fail the audit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Warning {
    // Newer than the latest checkpoint and still within the grace: the next audit checks it.
    NotYetCheckpointed { payer_seq: u64, log_index: u64, grace_secs: u64 },
}

impl std::fmt::Display for Warning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Warning::NotYetCheckpointed { payer_seq, log_index, grace_secs } => write!(
                f,
                "receipt #{payer_seq} (log index {log_index}) is not yet checkpointed: it is newer than the \
                 latest checkpoint, and must be in one within {grace_secs}s of being issued"
            ),
        }
    }
}

/// One receipt's line in the report.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub payer_seq: u64,
    /// From the signed body.
    pub log_index: u64,
    pub tool: String,
    pub amount: String,
    pub outcome: String,
    pub tx: String,
    pub signature_ok: bool,
    /// `Some(true)` included, `Some(false)` not, `None` not yet checkpointed (within the grace).
    pub in_log: Option<bool>,
    pub on_chain: bool,
    /// Who sent the settling transaction: "server" (a signer the server publishes: its relayer
    /// or its facilitator's), or another address.
    pub settled_by: Option<String>,
    /// For a refunded failure: "ok" (the refund is on chain), "FAIL" (not found), "owed" (failed).
    pub refund: Option<String>,
}

/// Everything the audit saw; it passes when there is no problem.
#[derive(Debug, Clone, Serialize)]
pub struct AuditReport {
    pub wallet: String,
    pub server: String,
    /// The chain `--rpc` serves, as CAIP-2.
    pub network: String,
    /// Every recipient the chain was scanned for: the receipts' payTo, `--pay-to`, the listing's.
    pub pay_to: Vec<String>,
    pub receipts: Vec<Row>,
    pub checkpoint_size: u64,
    pub checkpoint_root: String,
    pub checkpoint_grace_secs: u64,
    pub previous_checkpoint_size: Option<u64>,
    pub on_chain_payments: usize,
    pub problems: Vec<Problem>,
    pub warnings: Vec<Warning>,
}

impl AuditReport {
    /// Warnings do not fail the audit.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// The human-readable report.
pub fn render(report: &AuditReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "audit of {} at {} on {}", report.wallet, report.server, report.network);
    let _ = writeln!(
        out,
        "{:>5} {:>6}  {:<18} {:>12}  {:<10} {:<14} {:<4} {:<7} {:<5} {:<7} settled by",
        "seq", "log", "tool", "amount", "outcome", "tx", "sig", "log", "chain", "refund"
    );
    for r in &report.receipts {
        let _ = writeln!(out, "{}", row_line(r));
    }
    let _ = writeln!(out, "log checkpoint: size {} root {}", report.checkpoint_size, report.checkpoint_root);
    if let Some(previous) = report.previous_checkpoint_size {
        let _ = writeln!(out, "previous audit: size {previous}");
    }
    let _ = writeln!(
        out,
        "on-chain payments from this wallet to payTo {}: {}",
        report.pay_to.join(", "),
        report.on_chain_payments
    );
    for w in &report.warnings {
        let _ = writeln!(out, "note: {w}");
    }
    if report.ok() {
        let _ = writeln!(
            out,
            "verdict: OK — {} receipts verified, logged and matched on chain ({} not yet checkpointed)",
            report.receipts.len(),
            report.receipts.iter().filter(|r| r.in_log.is_none()).count()
        );
    } else {
        let _ = writeln!(out, "verdict: FAILED — {} problem(s):", report.problems.len());
        for p in &report.problems {
            let _ = writeln!(out, "  - {p}");
        }
    }
    out
}

fn row_line(r: &Row) -> String {
    let mark = |ok: bool| if ok { "ok" } else { "FAIL" };
    // Byte slicing is safe only on ASCII; the server chose this string.
    let tx = if r.tx.len() > 12 && r.tx.is_ascii() {
        format!("{}…{}", &r.tx[..8], &r.tx[r.tx.len() - 4..])
    } else {
        r.tx.clone()
    };
    let log = match r.in_log {
        Some(true) => "ok",
        Some(false) => "FAIL",
        None => "pending",
    };
    format!(
        "{:>5} {:>6}  {:<18} {:>12}  {:<10} {:<14} {:<4} {:<7} {:<5} {:<7} {}",
        r.payer_seq,
        r.log_index,
        r.tool,
        r.amount,
        r.outcome,
        tx,
        mark(r.signature_ok),
        log,
        mark(r.on_chain),
        r.refund.as_deref().unwrap_or("-"),
        r.settled_by.as_deref().unwrap_or("-")
    )
}
