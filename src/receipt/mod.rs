//! Receipts: an ed25519-signed statement, per settled call, of what was paid for and what came
//! back — appended to a public RFC 6962 transparency log and chained per payer.
//!
//! Guarantees: every settled call that ran gets exactly one receipt (re-issuing returns the
//! stored one); the signature covers the RFC 8785 canonical JSON of the body, so any verifier
//! recomputes the same bytes; `payer_seq` counts 1, 2, 3… per payer and `prev` names the
//! payer's previous receipt, so a dropped or forked receipt shows; checkpoints sign the log's
//! tree head. Does not prove the *content* of a result is correct — only what was returned.

pub mod audit_api;
pub mod keys;
pub mod merkle;
pub mod tree;

use std::sync::Arc;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use rmcp::model::{CallToolResult, JsonObject};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::config::{ReceiptsConfig, secret_opt};
use crate::payment::gate::Settlement;
use crate::payment::price::{CallTerms, PriceRecord};
pub use crate::payment::refund::RefundRecord;
use crate::store::{NewReceipt, ReceiptSlot, Store, StoreError, StoredCheckpoint, StoredReceipt};

/// `_meta` key carrying the receipt on a paid result.
pub const META_RECEIPT: &str = "tollgate/receipt";
/// Receipt format version.
pub const RECEIPT_VERSION: u32 = 1;

/// What a receipt binds. Field names are the wire names; order does not matter (JCS sorts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiptBody {
    pub v: u32,
    pub server: String,
    /// Id of the signing key (see `keys::key_id`).
    pub kid: String,
    pub tool: String,
    /// SHA-256 (hex) of the canonical JSON arguments.
    pub args_sha256: String,
    /// SHA-256 (hex) of the canonical JSON of the result's content, structuredContent, isError.
    pub result_sha256: String,
    /// "ok" or "tool_error": the payer was charged either way (unless `refund` gave it back),
    /// and the receipt says which.
    pub outcome: String,
    pub payer: String,
    pub pay_to: String,
    pub asset: String,
    pub network: String,
    /// USDC atomic units, decimal.
    pub amount: String,
    /// EIP-3009 nonce, 0x-hex.
    pub nonce: String,
    pub tx: String,
    pub block: u64,
    pub time: u64,
    pub log_index: u64,
    pub payer_seq: u64,
    /// Leaf hash (hex) of the payer's previous receipt; "" for the first.
    pub prev: String,
    /// The charge policy ("before_run" or "on_success"); absent on receipts older than it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub charge: Option<String>,
    /// How `amount` was reached: a fixed price, an expression (with the hash of its inputs),
    /// or an earlier offer honoured after a price change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price: Option<PriceRecord>,
    /// A tool error refunded (`refund_on_error`): the refund's transaction, or why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refund: Option<RefundRecord>,
    /// The answer came from the result cache (`cache_ttl_secs`), not a new upstream call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached: Option<bool>,
    /// When the upstream gave the cached answer (unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_at: Option<u64>,
}

/// A body and its detached signature, as returned in `_meta["tollgate/receipt"]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedReceipt {
    pub body: ReceiptBody,
    /// ed25519 signature over the canonical body, hex.
    pub signature: String,
}

pub use crate::canonical::{canonical, sha256_hex};

impl SignedReceipt {
    /// The RFC 6962 leaf hash of this receipt in the log.
    pub fn leaf_hash(&self) -> merkle::Hash {
        merkle::leaf_hash(canonical(&self.body).as_bytes())
    }

    /// Checks the signature with `key`.
    pub fn verify(&self, key: &VerifyingKey) -> bool {
        verify_detached(key, canonical(&self.body).as_bytes(), &self.signature)
    }

    pub fn from_stored(stored: &StoredReceipt) -> Result<SignedReceipt, serde_json::Error> {
        Ok(SignedReceipt { body: serde_json::from_str(&stored.body)?, signature: stored.signature.clone() })
    }
}

/// Verifies a hex ed25519 signature over `message`.
pub fn verify_detached(key: &VerifyingKey, message: &[u8], signature_hex: &str) -> bool {
    let Ok(bytes) = hex::decode(signature_hex) else { return false };
    let Ok(signature) = Signature::from_slice(&bytes) else { return false };
    key.verify(message, &signature).is_ok()
}

/// The hash a receipt binds for a result: its content, structured content and error flag.
pub fn result_sha256(result: &CallToolResult) -> String {
    let view = json!({
        "content": result.content,
        "structuredContent": result.structured_content,
        "isError": result.is_error.unwrap_or(false),
    });
    sha256_hex(canonical(&view).as_bytes())
}

/// The current signing key and every key still published.
pub struct ReceiptSigner {
    key: SigningKey,
    pub kid: String,
    published: Vec<(String, VerifyingKey)>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReceiptError {
    #[error("no receipt signing key configured")]
    NoKey,
    #[error("receipts.key must be a 32-byte hex ed25519 seed (tollgate keygen)")]
    BadKey,
    #[error("receipts.previous_public_keys: {0:?} is not a hex ed25519 public key")]
    BadPreviousKey(String),
    #[error("receipt store: {0}")]
    Store(#[from] StoreError),
}

impl ReceiptSigner {
    pub fn from_config(c: &ReceiptsConfig) -> Result<ReceiptSigner, ReceiptError> {
        let key = secret_opt(&c.key).ok_or(ReceiptError::NoKey)?;
        let mut signer = ReceiptSigner::new(keys::parse_seed(key).ok_or(ReceiptError::BadKey)?);
        for public in &c.previous_public_keys {
            let k = keys::parse_public(public).ok_or_else(|| ReceiptError::BadPreviousKey(public.clone()))?;
            signer.published.push((keys::key_id(&k), k));
        }
        Ok(signer)
    }

    /// The public keys a config publishes, without needing its seed: the current key's when
    /// the seed is there, and every previous one.
    pub fn public_keys(c: &ReceiptsConfig) -> Result<Vec<(String, VerifyingKey)>, ReceiptError> {
        let mut keys = Vec::new();
        if let Some(seed) = secret_opt(&c.key) {
            let public = keys::parse_seed(seed).ok_or(ReceiptError::BadKey)?.verifying_key();
            keys.push((keys::key_id(&public), public));
        }
        for public in &c.previous_public_keys {
            let k = keys::parse_public(public).ok_or_else(|| ReceiptError::BadPreviousKey(public.clone()))?;
            keys.push((keys::key_id(&k), k));
        }
        Ok(keys)
    }

    pub fn new(key: SigningKey) -> ReceiptSigner {
        let public = key.verifying_key();
        let kid = keys::key_id(&public);
        ReceiptSigner { key, kid: kid.clone(), published: vec![(kid, public)] }
    }

    pub fn sign(&self, message: &[u8]) -> String {
        hex::encode(self.key.sign(message).to_bytes())
    }

    /// The offer tags of challenges (`payment::offer`), keyed from this signing key: every
    /// replica that signs receipts with it honours the others' offers.
    pub fn offers(&self) -> crate::payment::offer::Offers {
        crate::payment::offer::Offers::from_secret(self.key.as_bytes())
    }

    /// Current and retired public keys, for `/.well-known/x402`.
    pub fn published(&self) -> &[(String, VerifyingKey)] {
        &self.published
    }
}

/// What a receipt is about, known once the handler has returned.
pub struct ReceiptInput<'a> {
    pub tool: &'a str,
    pub args: &'a JsonObject,
    pub result: &'a CallToolResult,
    pub settlement: &'a Settlement,
    pub pay_to: alloy::primitives::Address,
    pub now: u64,
    /// How the call was priced and charged (None for rows older than the terms).
    pub terms: Option<&'a CallTerms>,
    pub refund: Option<RefundRecord>,
    /// When the upstream gave the answer served from the result cache; `None` for a live call.
    pub cached_at: Option<u64>,
}

/// Issues receipts and checkpoints the log.
pub struct Receipts {
    pub signer: ReceiptSigner,
    pub store: Arc<dyn Store>,
    pub server_id: String,
    /// The log's tree, cached: proofs and checkpoints without reading every leaf.
    pub tree: tree::LogTree,
}

impl Receipts {
    pub fn new(signer: ReceiptSigner, store: Arc<dyn Store>, server_id: String) -> Receipts {
        Receipts { signer, tree: tree::LogTree::new(store.clone()), store, server_id }
    }

    /// Step 10: signs and appends the receipt of a settled call (idempotent per payment).
    pub async fn issue(&self, input: &ReceiptInput<'_>) -> Result<SignedReceipt, ReceiptError> {
        self.issue_answered(input, None).await
    }

    /// As [`issue`](Self::issue), storing with the receipt, in its transaction, the answer
    /// `answer` renders from it (the JSON served for the call).
    pub async fn issue_answered(
        &self,
        input: &ReceiptInput<'_>,
        answer: Option<&(dyn Fn(&SignedReceipt) -> String + Send + Sync)>,
    ) -> Result<SignedReceipt, ReceiptError> {
        let s = input.settlement;
        let payer_key = format!("{:#x}", s.payer);
        let template = ReceiptBody {
            v: RECEIPT_VERSION,
            server: self.server_id.clone(),
            kid: self.signer.kid.clone(),
            tool: input.tool.to_owned(),
            args_sha256: crate::canonical::hash_of(input.args),
            result_sha256: result_sha256(input.result),
            outcome: if input.result.is_error == Some(true) { "tool_error" } else { "ok" }.to_owned(),
            payer: s.payer.to_checksum(None),
            pay_to: input.pay_to.to_checksum(None),
            asset: s.asset.to_checksum(None),
            network: s.network.clone(),
            amount: s.amount.to_string(),
            nonce: format!("{:#x}", s.nonce),
            tx: format!("{:#x}", s.transaction),
            block: s.block,
            time: input.now,
            log_index: 0,
            payer_seq: 0,
            prev: String::new(),
            charge: input.terms.map(|t| t.charge.as_str().to_owned()),
            price: input.terms.map(|t| t.price.clone()),
            refund: input.refund.clone(),
            cached: input.cached_at.map(|_| true),
            cached_at: input.cached_at,
        };
        let sign = |slot: &ReceiptSlot| {
            let body = ReceiptBody {
                log_index: slot.log_index as u64,
                payer_seq: slot.payer_seq as u64,
                prev: slot.prev_leaf_hash.clone(),
                ..template.clone()
            };
            let text = canonical(&body);
            NewReceipt {
                signature: self.signer.sign(text.as_bytes()),
                kid: self.signer.kid.clone(),
                leaf_hash: hex::encode(merkle::leaf_hash(text.as_bytes())),
                body: text,
            }
        };
        let render = |stored: &crate::store::StoredReceipt| {
            let answer = answer?;
            SignedReceipt::from_stored(stored).ok().map(|receipt| answer(&receipt))
        };
        let render: crate::store::RenderAnswer<'_> = Some(&render);
        let stored = self.store.append_receipt(s.row_id, &payer_key, input.now as i64, &sign, render).await?;
        SignedReceipt::from_stored(&stored).map_err(|e| StoreError::Corrupt(e.to_string()).into())
    }

    /// Integrates new leaves: signs a checkpoint over the whole log if it grew. Runs only in
    /// the replica that holds the leader lock.
    pub async fn checkpoint(&self, now: u64) -> Result<Option<StoredCheckpoint>, ReceiptError> {
        if !self.store.try_lead().await? {
            return Ok(None);
        }
        let size = self.tree.catch_up().await?;
        let latest = self.store.latest_checkpoint().await?;
        if latest.as_ref().is_some_and(|c| c.tree_size as u64 >= size) || size == 0 {
            return Ok(None);
        }
        let root = match self.tree.root(size).await {
            Ok(root) => root,
            Err(tree::TreeError::Store(e)) => return Err(e.into()),
            Err(e @ tree::TreeError::BeyondLog { .. }) => {
                return Err(StoreError::Corrupt(e.to_string()).into());
            }
        };
        let body = CheckpointBody {
            v: RECEIPT_VERSION,
            server: self.server_id.clone(),
            tree_size: size,
            root: hex::encode(root),
            time: now,
            kid: self.signer.kid.clone(),
        };
        let text = canonical(&body);
        let checkpoint = StoredCheckpoint {
            tree_size: size as i64,
            root_hash: body.root.clone(),
            signature: self.signer.sign(text.as_bytes()),
            kid: body.kid.clone(),
            body: text,
            created_at: now as i64,
        };
        self.store.save_checkpoint(&checkpoint).await?;
        tracing::info!(log.size = size, log.root = %body.root, "log checkpoint signed");
        Ok(Some(checkpoint))
    }
}

/// A signed tree head: the log had `tree_size` leaves with this `root` at `time`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointBody {
    pub v: u32,
    pub server: String,
    pub tree_size: u64,
    pub root: String,
    pub time: u64,
    pub kid: String,
}

/// A checkpoint as served: body and detached signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedCheckpoint {
    pub body: CheckpointBody,
    pub signature: String,
}

impl SignedCheckpoint {
    pub fn from_stored(c: &StoredCheckpoint) -> Result<SignedCheckpoint, serde_json::Error> {
        Ok(SignedCheckpoint { body: serde_json::from_str(&c.body)?, signature: c.signature.clone() })
    }

    pub fn verify(&self, key: &VerifyingKey) -> bool {
        verify_detached(key, canonical(&self.body).as_bytes(), &self.signature)
    }
}

/// Runs checkpoints every `every` until cancelled.
pub fn spawn_checkpointer(
    receipts: Arc<Receipts>,
    clock: crate::clock::SharedClock,
    every: std::time::Duration,
    cancel: tokio_util::sync::CancellationToken,
) {
    crate::background::every(every, cancel, move || {
        let (receipts, clock) = (receipts.clone(), clock.clone());
        async move {
            if let Err(e) = receipts.checkpoint(clock.now_unix()).await {
                tracing::warn!(error = %e, "log checkpoint failed; will retry");
            }
        }
    });
}

/// The `_meta` value for a receipt.
pub fn meta_value(receipt: &SignedReceipt) -> Value {
    serde_json::to_value(receipt).expect("receipt serialises")
}
