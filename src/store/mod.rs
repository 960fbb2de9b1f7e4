//! Persistence: the payment claim, its lifecycle, and stored results.
//!
//! Guarantees: `claim` is one atomic insert on the UNIQUE (network, asset, payer, nonce) key,
//! so across every replica sharing a database exactly one caller wins an authorization. State
//! changes are compare-and-set (`from` states), so two workers (a request and the reconciler)
//! cannot both move a payment forward. Does not check: signatures, amounts or chain state —
//! callers store only what the payment stage verified.
//!
//! `SqliteStore` and `PgStore` run the same SQL (see `sql.rs`); only migrations differ.

mod sql;

use std::str::FromStr;
use std::sync::Arc;

use secrecy::ExposeSecret;

use alloy::primitives::{Address, B256, TxHash};

use crate::config::DatabaseConfig;
use crate::money::UsdcAmount;

pub use sql::{PgStore, SqliteStore};

/// Where a payment is in its life. Only `settled` may ever serve a paid result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PaymentState {
    /// Claimed by one request; nothing has been sent on chain yet.
    Claimed,
    /// A settlement transaction is being submitted or awaited.
    Settling,
    /// Submitted but not confirmed in time: the reconciler will resolve it from chain state.
    Pending,
    /// Confirmed on chain: the money moved.
    Settled,
    /// Will never settle (reverted, refused, expired unsubmitted). Nothing was charged.
    Failed,
}

impl PaymentState {
    pub fn as_str(self) -> &'static str {
        match self {
            PaymentState::Claimed => "claimed",
            PaymentState::Settling => "settling",
            PaymentState::Pending => "pending",
            PaymentState::Settled => "settled",
            PaymentState::Failed => "failed",
        }
    }

    /// States the reconciler must eventually resolve.
    pub const UNRESOLVED: [PaymentState; 3] =
        [PaymentState::Claimed, PaymentState::Settling, PaymentState::Pending];
}

impl FromStr for PaymentState {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self, StoreError> {
        Ok(match s {
            "claimed" => PaymentState::Claimed,
            "settling" => PaymentState::Settling,
            "pending" => PaymentState::Pending,
            "settled" => PaymentState::Settled,
            "failed" => PaymentState::Failed,
            other => {
                return Err(StoreError::Corrupt(format!("unknown payment state {other:?}")));
            }
        })
    }
}

/// A verified payment about to be claimed. Addresses and hashes are typed here and stored as
/// lower-case hex, so the claim key never depends on checksum casing.
#[derive(Debug, Clone)]
pub struct NewPayment {
    pub network: String,
    pub asset: Address,
    pub payer: Address,
    pub nonce: B256,
    pub payload_hash: String,
    pub payment_id: Option<String>,
    pub tool: String,
    pub amount: UsdcAmount,
    pub valid_before: i64,
    pub payload_json: String,
    /// The paid call's arguments (JSON), so the server can finish the call if its request dies.
    pub args_json: Option<String>,
    /// SHA-256 (hex) of the canonical arguments: a replay must be the very same call.
    pub args_hash: String,
    /// How the call was priced and is charged (JSON), for its receipt.
    pub price_terms: Option<String>,
    pub now: i64,
}

/// The claim key of an authorization.
#[derive(Debug, Clone, Copy)]
pub struct PaymentKey<'a> {
    pub network: &'a str,
    pub asset: Address,
    pub payer: Address,
    pub nonce: B256,
}

/// The key under which a result kept while its `on_success` settlement is unconfirmed is
/// stored (`{"unsettled": <result>}`): it is never served as it is.
pub const UNSETTLED_KEY: &str = "unsettled";

/// A row of `payments`, with its stored result when there is one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentRecord {
    pub id: i64,
    pub network: String,
    pub asset: Address,
    pub payer: Address,
    pub nonce: B256,
    pub payload_hash: String,
    pub payment_id: Option<String>,
    pub tool: String,
    pub amount: UsdcAmount,
    pub state: PaymentState,
    pub tx_hash: Option<TxHash>,
    pub block_number: Option<i64>,
    pub error: Option<String>,
    pub handler_started_at: Option<i64>,
    pub valid_before: i64,
    pub payload_json: String,
    /// Set from the claim until the receipt is stored: the call is not finished yet.
    pub args_json: Option<String>,
    /// SHA-256 (hex) of the canonical arguments paid for (None on rows older than it).
    pub args_hash: Option<String>,
    /// The chain head when the payment was checked before settlement: log searches start here.
    pub from_block: Option<i64>,
    /// The relayer account nonce of our own settlement transaction, once signed.
    pub tx_nonce: Option<i64>,
    /// How the call was priced and is charged (JSON; None on older rows).
    pub price_terms: Option<String>,
    /// Its refund, once one was started (JSON).
    pub refund_json: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    pub result_json: Option<String>,
}

/// The outcome of an atomic claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This caller owns the authorization and must drive it to a final state.
    Won(PaymentRecord),
    /// Someone already claimed it; here is what they stored.
    Taken(PaymentRecord),
}

/// A state transition with what was learned on the way.
#[derive(Debug, Clone, Default)]
pub struct Transition<'a> {
    pub tx_hash: Option<TxHash>,
    pub block_number: Option<i64>,
    pub error: Option<&'a str>,
    pub from_block: Option<i64>,
    pub tx_nonce: Option<i64>,
    /// Takes the handler lease with the move, at this time, where none was taken: a fresh
    /// settlement about to run its handler saves a write of its own.
    pub handler_lease: Option<i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    #[error("store migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    #[error("store holds an unexpected value: {0}")]
    Corrupt(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::Unavailable(e)
    }
}

/// Where a new receipt goes: its log index, its place in the payer's chain, and the hash of
/// the payer's previous receipt ("" for the first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptSlot {
    pub log_index: i64,
    pub payer_seq: i64,
    pub prev_leaf_hash: String,
}

/// A receipt ready to store: canonical body, signature, key id and leaf hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewReceipt {
    pub body: String,
    pub signature: String,
    pub kid: String,
    pub leaf_hash: String,
}

/// A stored receipt (a leaf of the transparency log).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct StoredReceipt {
    pub log_index: i64,
    pub payment_row: i64,
    pub payer: String,
    pub payer_seq: i64,
    pub body: String,
    pub signature: String,
    pub kid: String,
    pub leaf_hash: String,
    pub created_at: i64,
}

/// A signed tree head.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct StoredCheckpoint {
    pub tree_size: i64,
    pub root_hash: String,
    pub body: String,
    pub signature: String,
    pub kid: String,
    pub created_at: i64,
}

/// Signs a receipt once its slot is known (called inside the store's append transaction).
pub type SignReceipt<'a> = &'a (dyn Fn(&ReceiptSlot) -> NewReceipt + Send + Sync);

/// Renders the answer served with a receipt (called inside the append transaction, so the
/// receipt and its answer are stored together: a retry never finds one without the other).
pub type RenderAnswer<'a> = Option<&'a (dyn Fn(&StoredReceipt) -> Option<String> + Send + Sync)>;

/// The one storage interface; every backend passes the same test suite.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Applies pending migrations (also run by `tollgate migrate`).
    async fn migrate(&self) -> Result<(), StoreError>;
    /// The versions of this build's migrations the database has not applied (`tollgate doctor`).
    async fn pending_migrations(&self) -> Result<Vec<i64>, StoreError>;
    /// Cheap liveness check for `/readyz`.
    async fn ping(&self) -> Result<(), StoreError>;
    /// Atomically claims (network, asset, payer, nonce). Exactly one caller ever wins.
    async fn claim(&self, p: &NewPayment) -> Result<Claim, StoreError>;
    /// Looks a payment up by its x402 payment-identifier.
    async fn by_payment_id(&self, payment_id: &str) -> Result<Option<PaymentRecord>, StoreError>;
    /// Looks a payment up by row id.
    async fn payment(&self, id: i64) -> Result<Option<PaymentRecord>, StoreError>;
    /// Looks a payment up by its claim key (network, asset, payer, nonce).
    async fn by_key(&self, key: &PaymentKey<'_>) -> Result<Option<PaymentRecord>, StoreError>;
    /// Compare-and-set: moves `id` to `to` only if it is in one of `from`. Returns whether it moved.
    async fn transition(
        &self,
        id: i64,
        from: &[PaymentState],
        to: PaymentState,
        t: Transition<'_>,
        now: i64,
    ) -> Result<bool, StoreError>;
    /// Deletes a claim whose payment cannot move money, so the authorization stays usable.
    /// Only an unresolved row (`claimed`, `settling`, `pending`) can be released; callers
    /// release only when nothing was broadcast, or when the chain proves the authorization
    /// unused and our transaction unable to land.
    async fn release(&self, id: i64) -> Result<bool, StoreError>;
    /// Takes the lease to run the handler of a settled payment. `seen` is the lease the caller
    /// observed (None for a fresh settlement); exactly one caller with a given `seen` wins.
    async fn start_handler(&self, id: i64, seen: Option<i64>, now: i64) -> Result<bool, StoreError>;
    /// Takes the handler lease of a `claimed` payment (`charge = "on_success"` runs before it
    /// settles), refreshing `updated_at` so the reconciler leaves it alone while it runs.
    async fn start_unsettled_run(&self, id: i64, now: i64) -> Result<bool, StoreError>;
    /// Releases a `claimed` row only if it is still as `seen_updated_at` left it: the
    /// reconciler's release of a stale claim can never delete a row that moved on meanwhile.
    async fn release_stale(&self, id: i64, seen_updated_at: i64) -> Result<bool, StoreError>;
    /// Stores the result served for a settled payment. First write wins, except over a result
    /// kept unsettled (`UNSETTLED_KEY`), which the served answer replaces.
    async fn save_result(&self, id: i64, result_json: &str, now: i64) -> Result<(), StoreError>;
    /// Marks a refund as started; false if one already was (one refund per payment).
    async fn begin_refund(&self, id: i64) -> Result<bool, StoreError>;
    /// Records how a started refund ended.
    async fn end_refund(&self, id: i64, refund_json: &str) -> Result<(), StoreError>;
    /// Settled calls without a receipt, untouched (and with no handler lease taken) since
    /// `idle_since`: their requests died; the server finishes them. Oldest first.
    async fn unfinished(&self, idle_since: i64, limit: i64) -> Result<Vec<PaymentRecord>, StoreError>;
    /// Unresolved payments (claimed, settling, pending), oldest first.
    async fn unresolved(&self, limit: i64) -> Result<Vec<PaymentRecord>, StoreError>;

    /// Appends the receipt of `payment_row` at the next log index and the payer's next
    /// `payer_seq`, atomically across replicas; returns the existing one if it was issued. The
    /// `answer` rendered with the receipt is stored in the same transaction, as `save_result`
    /// stores one.
    async fn append_receipt(
        &self,
        payment_row: i64,
        payer: &str,
        now: i64,
        sign: SignReceipt<'_>,
        answer: RenderAnswer<'_>,
    ) -> Result<StoredReceipt, StoreError>;
    /// Number of leaves in the log.
    async fn receipt_count(&self) -> Result<i64, StoreError>;
    /// Leaf hashes (hex) of the receipts with `start <= log_index < end`, in log order.
    async fn leaf_hashes(&self, start: i64, end: i64) -> Result<Vec<String>, StoreError>;
    async fn receipt_at(&self, log_index: i64) -> Result<Option<StoredReceipt>, StoreError>;
    /// A payer's receipts with `payer_seq > after_seq`, in order, at most `limit`.
    async fn receipts_of(
        &self,
        payer: &str,
        after_seq: i64,
        limit: i64,
    ) -> Result<Vec<StoredReceipt>, StoreError>;
    async fn save_checkpoint(&self, c: &StoredCheckpoint) -> Result<(), StoreError>;
    async fn latest_checkpoint(&self) -> Result<Option<StoredCheckpoint>, StoreError>;
    /// True if this process may run fleet-wide singletons (the checkpointer) right now.
    async fn try_lead(&self) -> Result<bool, StoreError>;
}

/// Opens the backend named by the URL scheme and applies migrations.
pub async fn open(config: &DatabaseConfig) -> Result<Arc<dyn Store>, StoreError> {
    let store = connect(config).await?;
    store.migrate().await?;
    Ok(store)
}

/// Connects to the backend named by the URL scheme, migrating nothing.
pub async fn connect(config: &DatabaseConfig) -> Result<Arc<dyn Store>, StoreError> {
    let url = config.url.expose_secret();
    Ok(if url.starts_with("sqlite:") {
        Arc::new(SqliteStore::connect(url, config.max_connections).await?)
    } else {
        Arc::new(PgStore::connect(url, config.max_connections).await?)
    })
}
