//! The log side of the audit: the latest signed checkpoint, each receipt's inclusion in it at
//! the log index its signed body names, and the checkpoint's consistency with the one saved by
//! the previous audit.
//!
//! A log without a checkpoint proves nothing, so a missing or unverifiable checkpoint fails the
//! audit. A receipt the checkpoint does not cover yet is accepted only while it is young: once
//! the later of the holder's clock and the checkpoint's time is past the receipt's signed time
//! plus the holder's grace, the log is withholding it. Does not check how often the server
//! checkpoints, nor that the checkpoint's `server` field names this server.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::report::{Problem, Warning};
use super::server::Server;
use crate::receipt::{CheckpointBody, SignedCheckpoint, SignedReceipt, merkle};

/// How long a receipt may stay out of the checkpoint, and the holder's time to judge it by.
pub struct Deadline {
    pub grace_secs: u64,
    pub now: u64,
}

/// Where a receipt stands against the latest checkpoint, before any proof is fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LogStatus {
    // Below the tree size: its inclusion can be proven now.
    Covered,
    // Newer than the checkpoint and within the grace.
    Pending,
    Withheld { age_secs: u64 },
    FutureDated { ahead_secs: u64 },
}

impl Deadline {
    fn status(&self, log_index: u64, time: u64, checkpoint: &CheckpointBody) -> LogStatus {
        if log_index < checkpoint.tree_size {
            return LogStatus::Covered;
        }
        // The receipt's time is signed, but the server chose it: dated far enough ahead, it
        // would stay "pending" forever.
        if time > self.now.saturating_add(self.grace_secs) {
            return LogStatus::FutureDated { ahead_secs: time - self.now };
        }
        // Either clock shows the log had time to integrate it: a checkpoint signed long after
        // the receipt, or a holder auditing long after it.
        let age_secs = self.now.max(checkpoint.time).saturating_sub(time);
        if age_secs > self.grace_secs { LogStatus::Withheld { age_secs } } else { LogStatus::Pending }
    }
}

/// The latest checkpoint, if the server serves one signed by a published key.
pub async fn fetch_checkpoint(
    server: &Server<'_>,
    keys: &BTreeMap<String, VerifyingKey>,
    problems: &mut Vec<Problem>,
) -> Option<CheckpointBody> {
    let value = match server.get("/log/checkpoint").await {
        Ok(value) => value,
        Err(e) => {
            problems.push(Problem::NoCheckpoint { reason: format!("{e:#}") });
            return None;
        }
    };
    let Ok(checkpoint) = serde_json::from_value::<SignedCheckpoint>(value) else {
        problems.push(Problem::BadCheckpoint { reason: "malformed".into() });
        return None;
    };
    let rejected = match keys.get(&checkpoint.body.kid) {
        Some(key) if checkpoint.verify(key) => return Some(checkpoint.body),
        Some(_) => "invalid signature".to_owned(),
        None => format!("unknown key {}", checkpoint.body.kid),
    };
    problems.push(Problem::BadCheckpoint { reason: rejected });
    None
}

/// Per receipt: `Some(true)` proven included, `Some(false)` not, `None` not yet checkpointed
/// and still within the grace. Without a checkpoint nothing is proven.
pub async fn check_inclusion(
    server: &Server<'_>,
    receipts: &[SignedReceipt],
    checkpoint: Option<&CheckpointBody>,
    deadline: &Deadline,
    problems: &mut Vec<Problem>,
    warnings: &mut Vec<Warning>,
) -> anyhow::Result<Vec<Option<bool>>> {
    let Some(checkpoint) = checkpoint else { return Ok(vec![Some(false); receipts.len()]) };
    let mut out = Vec::with_capacity(receipts.len());
    for r in receipts {
        let (payer_seq, log_index) = (r.body.payer_seq, r.body.log_index);
        let in_log = match deadline.status(log_index, r.body.time, checkpoint) {
            LogStatus::Covered => {
                let included = prove_inclusion(server, r, checkpoint).await?;
                if !included {
                    problems.push(Problem::NotInLog { payer_seq, log_index });
                }
                Some(included)
            }
            LogStatus::Pending => {
                let grace_secs = deadline.grace_secs;
                warnings.push(Warning::NotYetCheckpointed { payer_seq, log_index, grace_secs });
                None
            }
            LogStatus::Withheld { age_secs } => {
                let (tree_size, grace_secs) = (checkpoint.tree_size, deadline.grace_secs);
                problems.push(Problem::Withheld { payer_seq, log_index, tree_size, age_secs, grace_secs });
                Some(false)
            }
            LogStatus::FutureDated { ahead_secs } => {
                problems.push(Problem::FutureDated { payer_seq, ahead_secs });
                Some(false)
            }
        };
        out.push(in_log);
    }
    Ok(out)
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
    r: &SignedReceipt,
    checkpoint: &CheckpointBody,
) -> anyhow::Result<bool> {
    // The index is the signed one, and the leaf is recomputed from the receipt itself: nothing
    // the server answers beside the proof is used.
    let (index, size) = (r.body.log_index, checkpoint.tree_size);
    let answer = server.get(&format!("/log/inclusion?index={index}&tree_size={size}")).await?;
    let Some(root) = hash_from_hex(&checkpoint.root) else { return Ok(false) };
    Ok(merkle::verify_inclusion(index, size, &r.leaf_hash(), &proof_from(&answer["proof"]), &root))
}

/// The checkpoint remembered between audits of one server by one wallet.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SavedState {
    tree_size: u64,
    root: String,
}

/// Checks the checkpoint extends the saved one; returns the saved size.
pub async fn check_consistency(
    server: &Server<'_>,
    state_file: &Path,
    checkpoint: &CheckpointBody,
    problems: &mut Vec<Problem>,
) -> anyhow::Result<Option<u64>> {
    let Some(saved) = load_state(state_file)? else { return Ok(None) };
    let size = checkpoint.tree_size;
    let rewritten = Problem::LogRewritten { previous_size: saved.tree_size, size };
    if size < saved.tree_size {
        problems.push(rewritten);
        return Ok(Some(saved.tree_size));
    }
    let (Some(old_root), Some(new_root)) = (hash_from_hex(&saved.root), hash_from_hex(&checkpoint.root))
    else {
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

fn load_state(path: &Path) -> anyhow::Result<Option<SavedState>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(serde_json::from_str(&text).with_context(|| format!("{}", path.display()))?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("{}", path.display())),
    }
}

/// Remembers `checkpoint` for the next audit to check consistency against.
pub fn save_state(path: &Path, checkpoint: &CheckpointBody) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let state = SavedState { tree_size: checkpoint.tree_size, root: checkpoint.root.clone() };
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&state)?)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_receipt_may_stay_out_of_the_checkpoint_only_while_it_is_young() {
        // Arrange: the holder audits at t=1000 with a 60s grace; the checkpoint has 5 leaves.
        let deadline = Deadline { grace_secs: 60, now: 1000 };
        let head = |time| CheckpointBody {
            v: 1,
            server: "s".into(),
            tree_size: 5,
            root: "".into(),
            time,
            kid: "k".into(),
        };
        // (why, signed log index, signed receipt time, checkpoint time, expected)
        let cases = [
            ("covered: provable now", 4, 100, 1000, LogStatus::Covered),
            ("newer, within the grace", 5, 990, 1000, LogStatus::Pending),
            ("issued exactly a grace ago", 5, 940, 1000, LogStatus::Pending),
            ("older than the grace", 5, 939, 1000, LogStatus::Withheld { age_secs: 61 }),
            // The checkpoint was signed long after the receipt, whatever the holder's clock says.
            ("left out by a later checkpoint", 9, 900, 2000, LogStatus::Withheld { age_secs: 1100 }),
            ("an absurd signed index, old", u64::MAX, 0, 1000, LogStatus::Withheld { age_secs: 1000 }),
            ("dated ahead, within the grace", 5, 1060, 1000, LogStatus::Pending),
            ("dated ahead, beyond the grace", 5, 1061, 1000, LogStatus::FutureDated { ahead_secs: 61 }),
        ];
        for (why, index, time, signed_at, expected) in cases {
            // Act
            let status = deadline.status(index, time, &head(signed_at));
            // Assert
            assert_eq!(status, expected, "{why}");
        }
    }
}
