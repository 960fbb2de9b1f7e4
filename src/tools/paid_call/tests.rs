//! The paid-call state machine, driven through fakes of the chain and the settler over an
//! in-memory SQLite store (the real SQL, no server): each case runs in milliseconds, no anvil.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use alloy::primitives::{Address, B256, Bytes, U256};
use alloy::signers::local::PrivateKeySigner;
use rmcp::model::{CallToolResult, JsonObject};
use serde_json::json;

use super::{CallError, CallSettings, Paid, PaidCall, ToolCall};
use crate::chain::client::{
    AuthEffect, Chain, ChainError, ExpectedTransfer, Head, Spent, SpentQuery, TxStatus,
};
use crate::client::sign::{SignParams, sign_payment};
use crate::clock::{Clock, ManualClock};
use crate::money::UsdcAmount;
use crate::payment::decode::PaymentInput;
use crate::payment::gate::PaymentGate;
use crate::payment::gate::args_hash;
use crate::payment::settle::{SettleError, SettleRequest, Settler, Submitted, TxRecorder};
use crate::payment::{Money, PaymentError};
use crate::receipt::{ReceiptSigner, Receipts};
use crate::store::{
    Claim, NewPayment, PaymentKey, PaymentRecord, PaymentState, RenderAnswer, SignReceipt, SqliteStore,
    Store, StoreError, StoredCheckpoint, StoredReceipt, Transition,
};
use crate::tools::catalog::{Catalog, ToolEntry, ToolHandler};

const PRICE: u64 = 1000;
const NOW: u64 = 1_800_000_000;

/// A chain that answers what the test set: whether the authorization is used, and what each
/// transaction did.
#[derive(Default)]
struct FakeChain {
    used: AtomicBool,
    mined: Mutex<HashMap<B256, TxStatus>>,
    spent_by: Mutex<Option<Spent>>,
}

#[async_trait::async_trait]
impl Chain for FakeChain {
    async fn simulate_token_call(&self, _: alloy::primitives::Bytes) -> Result<Option<String>, ChainError> {
        Ok(None)
    }
    async fn authorization_used(&self, _: Address, _: B256) -> Result<bool, ChainError> {
        Ok(self.used.load(Ordering::SeqCst))
    }
    async fn authorization_used_at(&self, _: Address, _: B256, _: u64) -> Result<bool, ChainError> {
        Ok(self.used.load(Ordering::SeqCst))
    }
    async fn balance_of(&self, _: Address) -> Result<U256, ChainError> {
        Ok(U256::from(PRICE * 100))
    }
    async fn block_number(&self) -> Result<u64, ChainError> {
        Ok(10)
    }
    async fn head(&self) -> Result<Head, ChainError> {
        Ok(Head { number: 10, timestamp: NOW })
    }
    async fn tx_status(&self, tx: B256, _: &ExpectedTransfer) -> Result<TxStatus, ChainError> {
        Ok(self.mined.lock().unwrap().get(&tx).cloned().unwrap_or(TxStatus::NotMined))
    }
    async fn find_spent(&self, _: &SpentQuery) -> Result<Option<Spent>, ChainError> {
        Ok(*self.spent_by.lock().unwrap())
    }
    async fn chain_id(&self) -> Result<u64, ChainError> {
        Ok(31337)
    }
    async fn gas_balance(&self, _: Address) -> Result<U256, ChainError> {
        Ok(U256::MAX)
    }
    // The payers here are EOAs: no code, and no wallet to ask.
    async fn has_code(&self, _: Address) -> Result<bool, ChainError> {
        Ok(false)
    }
    async fn erc1271_valid(&self, _: Address, _: B256, _: Bytes) -> Result<bool, ChainError> {
        Ok(false)
    }
    async fn simulate_deployed_transfer(
        &self,
        _: &crate::chain::wallets::Deployment,
    ) -> Result<Option<String>, ChainError> {
        Ok(Some("no factories here".into()))
    }
}

/// A settler that "broadcasts" a made-up transaction, which the fake chain then shows as
/// paid (`mines = true`) or leaves unmined; or whose answer is lost (`ambiguous`).
struct FakeSettler {
    chain: Arc<FakeChain>,
    mines: bool,
    ambiguous: bool,
}

#[async_trait::async_trait]
impl Settler for FakeSettler {
    async fn submit(
        &self,
        _: &SettleRequest<'_>,
        recorder: Arc<dyn TxRecorder>,
    ) -> Result<Submitted, SettleError> {
        let tx = B256::from(rand::random::<[u8; 32]>());
        recorder.record(tx, 0).await.map_err(|e| SettleError::NotSent(e.to_string()))?;
        if self.mines {
            let paid = TxStatus::Mined {
                block: 10,
                confirmations: 1,
                effect: AuthEffect::Paid,
                sender: Address::ZERO,
            };
            self.chain.mined.lock().unwrap().insert(tx, paid);
            self.chain.used.store(true, Ordering::SeqCst);
        }
        if self.ambiguous { Err(SettleError::Ambiguous { tx: Some(tx) }) } else { Ok(tx.into()) }
    }

    fn kind(&self) -> &'static str {
        "test settler"
    }
}

/// The real store, whose receipt appends fail while `refuse_receipts` is set.
struct Flaky {
    inner: SqliteStore,
    refuse_receipts: AtomicBool,
}

#[async_trait::async_trait]
impl Store for Flaky {
    async fn migrate(&self) -> Result<(), StoreError> {
        self.inner.migrate().await
    }
    async fn pending_migrations(&self) -> Result<Vec<i64>, StoreError> {
        self.inner.pending_migrations().await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
    async fn claim(&self, p: &NewPayment) -> Result<Claim, StoreError> {
        self.inner.claim(p).await
    }
    async fn by_payment_id(&self, id: &str) -> Result<Option<PaymentRecord>, StoreError> {
        self.inner.by_payment_id(id).await
    }
    async fn payment(&self, id: i64) -> Result<Option<PaymentRecord>, StoreError> {
        self.inner.payment(id).await
    }
    async fn by_key(&self, key: &PaymentKey<'_>) -> Result<Option<PaymentRecord>, StoreError> {
        self.inner.by_key(key).await
    }
    async fn transition(
        &self,
        id: i64,
        from: &[PaymentState],
        to: PaymentState,
        t: Transition<'_>,
        now: i64,
    ) -> Result<bool, StoreError> {
        self.inner.transition(id, from, to, t, now).await
    }
    async fn release(&self, id: i64) -> Result<bool, StoreError> {
        self.inner.release(id).await
    }
    async fn start_handler(&self, id: i64, seen: Option<i64>, now: i64) -> Result<bool, StoreError> {
        self.inner.start_handler(id, seen, now).await
    }
    async fn start_unsettled_run(&self, id: i64, now: i64) -> Result<bool, StoreError> {
        self.inner.start_unsettled_run(id, now).await
    }
    async fn release_stale(&self, id: i64, seen: i64) -> Result<bool, StoreError> {
        self.inner.release_stale(id, seen).await
    }
    async fn begin_refund(&self, id: i64) -> Result<bool, StoreError> {
        self.inner.begin_refund(id).await
    }
    async fn end_refund(&self, id: i64, json: &str) -> Result<(), StoreError> {
        self.inner.end_refund(id, json).await
    }
    async fn save_result(&self, id: i64, json: &str, now: i64) -> Result<(), StoreError> {
        self.inner.save_result(id, json, now).await
    }
    async fn unfinished(&self, idle_since: i64, limit: i64) -> Result<Vec<PaymentRecord>, StoreError> {
        self.inner.unfinished(idle_since, limit).await
    }
    async fn unresolved(&self, limit: i64) -> Result<Vec<PaymentRecord>, StoreError> {
        self.inner.unresolved(limit).await
    }
    async fn append_receipt(
        &self,
        row: i64,
        payer: &str,
        now: i64,
        sign: SignReceipt<'_>,
        answer: RenderAnswer<'_>,
    ) -> Result<StoredReceipt, StoreError> {
        if self.refuse_receipts.load(Ordering::SeqCst) {
            return Err(StoreError::Corrupt("receipts refused by the test".into()));
        }
        self.inner.append_receipt(row, payer, now, sign, answer).await
    }
    async fn receipt_count(&self) -> Result<i64, StoreError> {
        self.inner.receipt_count().await
    }
    async fn leaf_hashes(&self, start: i64, end: i64) -> Result<Vec<String>, StoreError> {
        self.inner.leaf_hashes(start, end).await
    }
    async fn receipt_at(&self, i: i64) -> Result<Option<StoredReceipt>, StoreError> {
        self.inner.receipt_at(i).await
    }
    async fn receipts_of(
        &self,
        payer: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<StoredReceipt>, StoreError> {
        self.inner.receipts_of(payer, after, limit).await
    }
    async fn save_checkpoint(&self, c: &StoredCheckpoint) -> Result<(), StoreError> {
        self.inner.save_checkpoint(c).await
    }
    async fn latest_checkpoint(&self) -> Result<Option<StoredCheckpoint>, StoreError> {
        self.inner.latest_checkpoint().await
    }
    async fn try_lead(&self) -> Result<bool, StoreError> {
        self.inner.try_lead().await
    }
}

/// A priced tool that counts its runs and, while `hold` is set, waits to be released.
struct Counted {
    runs: Arc<AtomicUsize>,
    hold: Arc<tokio::sync::Semaphore>,
}

#[async_trait::async_trait]
impl ToolHandler for Counted {
    async fn call(&self, _: JsonObject) -> CallToolResult {
        let n = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        let _go = self.hold.acquire().await;
        CallToolResult::structured(json!({ "run": n }))
    }
}

struct Harness {
    paid: Arc<PaidCall>,
    entry: Arc<ToolEntry>,
    store: Arc<Flaky>,
    chain: Arc<FakeChain>,
    clock: ManualClock,
    runs: Arc<AtomicUsize>,
    hold: Arc<tokio::sync::Semaphore>,
    payer: PrivateKeySigner,
}

async fn harness(settler: impl FnOnce(Arc<FakeChain>) -> FakeSettler) -> Harness {
    let inner = SqliteStore::connect("sqlite::memory:", 1).await.unwrap();
    inner.migrate().await.unwrap();
    let store = Arc::new(Flaky { inner, refuse_receipts: AtomicBool::new(false) });
    let chain = Arc::new(FakeChain::default());
    let clock = ManualClock::new(NOW);
    let terms = crate::payment::requirements::test_terms();
    let network = terms.network.clone();
    let (runs, hold) = (Arc::new(AtomicUsize::new(0)), Arc::new(tokio::sync::Semaphore::new(1)));
    let mut catalog = Catalog::default();
    let handler = Arc::new(Counted { runs: runs.clone(), hold: hold.clone() });
    let schema = json!({ "type": "object" });
    let new = crate::tools::catalog::NewTool {
        origin: "test",
        name: "counted",
        description: "counts",
        input_schema: schema,
        handler,
        source: crate::tools::catalog::PriceSource::Injected,
    };
    let price = crate::tools::catalog::ToolPrice::fixed(UsdcAmount::from_atomic(PRICE));
    catalog.insert(new, &price, &terms).unwrap();
    let gate = Arc::new(PaymentGate {
        allowed_factories: vec![],
        store: store.clone(),
        chain: chain.clone(),
        settler: Arc::new(settler(chain.clone())),
        network,
        clock: Arc::new(clock.clone()),
        confirmations: 1,
        settle_timeout: Duration::from_millis(50),
        log_window: 1000,
    });
    let limits = crate::config::Config::load(None).unwrap().limits;
    let limits = Arc::new(crate::limits::WalletLimits::from_config(&limits).await.unwrap());
    let signer = ReceiptSigner::new(ed25519_dalek::SigningKey::from_bytes(&[7; 32]));
    let receipts = Arc::new(Receipts::new(signer, store.clone(), "test".into()));
    let settings = CallSettings {
        valid_before_margin_secs: 6,
        request_timeout: Duration::from_secs(30),
        tool_timeout: Duration::from_secs(20),
        pay_to: Address::repeat_byte(0xbb),
        failed_attempts: crate::config::FailureBudgetConfig { attempts: 20, window_secs: 60 },
        unpaid_penalty_secs: 60,
        on_success_validity_secs: 96,
    };
    let paid = Arc::new(PaidCall::new(gate, limits, receipts, Arc::new(clock.clone()), settings));
    let entry = catalog.get("counted").unwrap().clone();
    let payer = PrivateKeySigner::random();
    Harness { paid, entry, store, chain, clock, runs, hold, payer }
}

impl Harness {
    /// Claims `payment` (no arguments) and settles it, as steps 7–8 do, leaving the handler
    /// unrun: the state a paid call is in when its request dies right after the settlement.
    async fn claim_and_settle(&self, payment: &PaymentInput) -> PaymentRecord {
        let quote = self.entry.quote.as_ref().unwrap();
        let verified = crate::payment::verify::verify(payment, quote, &self.paid.domain, NOW, 6).unwrap();
        let gate = &self.paid.gate;
        let args = JsonObject::new();
        let claimed = gate.claim(&verified, quote, &args, &args_hash(&args), &Default::default()).await;
        let crate::payment::gate::Claimed::Fresh(row) = claimed.unwrap() else { panic!("fresh claim") };
        let checks = gate.check_chain(&verified).await;
        gate.settle_checked(&row, &verified, quote, checks, crate::payment::gate::Lease::Leave)
            .await
            .unwrap();
        row
    }

    fn payment(&self) -> PaymentInput {
        let requirements = &self.entry.quote.as_ref().unwrap().requirements;
        let params = SignParams::standard(self.clock.now_unix(), 300);
        PaymentInput::Meta(sign_payment(&self.payer, requirements, None, &params).unwrap())
    }

    async fn call(&self, payment: &PaymentInput) -> Result<Paid, CallError> {
        let call = ToolCall {
            arguments: JsonObject::new(),
            payment: Some(payment.clone()),
            agent: "t".into(),
            client: "t".into(),
        };
        self.paid.try_call(&self.entry, call).await
    }

    async fn state(&self) -> PaymentState {
        self.store.unresolved(10).await.unwrap().first().map(|r| r.state).unwrap_or(PaymentState::Settled)
    }
}

fn mines(chain: Arc<FakeChain>) -> FakeSettler {
    FakeSettler { chain, mines: true, ambiguous: false }
}

#[tokio::test]
async fn a_fresh_claim_settles_then_runs_once_with_a_receipt() {
    let h = harness(mines).await;
    let outcome = h.call(&h.payment()).await.unwrap();
    let Paid::Settled(result) = outcome else { panic!("settled: {outcome:?}") };
    assert!(result.meta.unwrap().0.contains_key("tollgate/receipt"));
    assert_eq!((h.runs.load(Ordering::SeqCst), h.store.receipt_count().await.unwrap()), (1, 1));
}

#[tokio::test]
async fn an_already_settled_payment_replays_its_stored_answer_without_a_second_run() {
    let h = harness(mines).await;
    let payment = h.payment();
    let Paid::Settled(first) = h.call(&payment).await.unwrap() else { panic!("settled") };
    let Paid::Replayed(again) = h.call(&payment).await.unwrap() else { panic!("replayed") };
    assert_eq!(again, first);
    assert_eq!(h.runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_ambiguous_settlement_is_pending_and_claims_nothing_about_money() {
    let h = harness(|chain| FakeSettler { chain, mines: false, ambiguous: true }).await;
    let error = h.call(&h.payment()).await.unwrap_err();
    assert!(matches!(error, CallError::Payment(PaymentError::Pending { transaction: Some(_) })), "{error:?}");
    assert_eq!(error.money(), Money::MayHaveMoved);
    assert_eq!(h.state().await, PaymentState::Pending);
    assert_eq!(h.runs.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_retry_while_the_handler_runs_is_in_progress_and_never_runs_it_twice() {
    let h = harness(mines).await;
    let payment = h.payment();
    let held = h.hold.acquire().await.unwrap();
    let first = {
        let (paid, entry, payment) = (h.paid.clone(), h.entry.clone(), payment.clone());
        tokio::spawn(async move {
            let call = ToolCall {
                arguments: JsonObject::new(),
                payment: Some(payment),
                agent: "t".into(),
                client: "t".into(),
            };
            paid.try_call(&entry, call).await
        })
    };
    while h.runs.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    let retry = h.call(&payment).await.unwrap_err();
    assert!(matches!(retry, CallError::Payment(PaymentError::InProgress)), "{retry:?}");
    drop(held);
    assert!(matches!(first.await.unwrap(), Ok(Paid::Settled(_))));
    assert_eq!(h.runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_paid_call_whose_tool_was_withdrawn_ends_in_a_receipt_that_says_so() {
    // Arrange: settled, then its request died before the handler ran.
    let h = harness(mines).await;
    let row = h.claim_and_settle(&h.payment()).await;
    h.clock.advance(31);
    // While an upstream may still bring the tool back (a catalog not yet complete), the call
    // is left alone rather than closed as withdrawn.
    let empty = Arc::new(Catalog::default());
    assert_eq!(h.paid.finish_abandoned(&empty, false).await.unwrap(), 0, "waits for late upstreams");
    assert_eq!(h.store.receipt_count().await.unwrap(), 0);
    // Act: the tool is gone from the complete catalog by the time the server finishes the call.
    let started = h.paid.finish_abandoned(&empty, true).await.unwrap();
    while h.store.receipt_count().await.unwrap() == 0 {
        tokio::task::yield_now().await;
    }
    // Assert
    assert_eq!(started, 1);
    let stored = h.store.payment(row.id).await.unwrap().unwrap().result_json.unwrap();
    assert!(stored.contains("tool_withdrawn") && stored.contains("tollgate/receipt"), "{stored}");
    assert_eq!(h.runs.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_receipt_store_failure_still_serves_the_paid_answer_and_leaves_the_call_unfinished() {
    let h = harness(mines).await;
    h.store.refuse_receipts.store(true, Ordering::SeqCst);
    let Paid::Settled(result) = h.call(&h.payment()).await.unwrap() else { panic!("settled") };
    let meta = result.meta.unwrap();
    assert!(meta.0.contains_key("x402/payment-response") && !meta.0.contains_key("tollgate/receipt"));
    assert_eq!(h.store.receipt_count().await.unwrap(), 0);
    // The call stays on the server's list to finish (its arguments are kept until a receipt).
    let unfinished = h.store.unfinished(i64::MAX, 10).await.unwrap();
    assert_eq!(unfinished.len(), 1, "{unfinished:?}");
    assert_eq!(h.runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_authorization_spent_elsewhere_fails_without_running_the_handler() {
    let h = harness(|chain| FakeSettler { chain, mines: false, ambiguous: false }).await;
    h.chain.used.store(true, Ordering::SeqCst);
    let spender = B256::repeat_byte(9);
    *h.chain.spent_by.lock().unwrap() = Some(Spent::Used(spender));
    let elsewhere = TxStatus::Mined {
        block: 9,
        confirmations: 2,
        effect: AuthEffect::SpentOtherwise,
        sender: Address::ZERO,
    };
    h.chain.mined.lock().unwrap().insert(spender, elsewhere);
    let error = h.call(&h.payment()).await.unwrap_err();
    assert!(error.to_string().contains("spent_elsewhere"), "{error}");
    assert_eq!(error.money(), Money::Unmoved);
    assert_eq!(h.runs.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_replay_between_the_receipt_and_the_stored_answer_is_in_progress() {
    // Arrange: settled, handler leased, receipt stored (which drops the arguments), answer not
    // stored yet: the window a concurrent replay can land in.
    let h = harness(mines).await;
    let payment = h.payment();
    let row = h.claim_and_settle(&payment).await;
    assert!(h.store.start_handler(row.id, None, NOW as i64).await.unwrap());
    let sign = |_: &crate::store::ReceiptSlot| crate::store::NewReceipt {
        body: "{}".into(),
        signature: "00".into(),
        kid: "k".into(),
        leaf_hash: "11".into(),
    };
    h.store.append_receipt(row.id, "0xpayer", NOW as i64, &sign, None).await.unwrap();
    // Act + Assert: in progress while the lease lives; past it, the lost answer is reported.
    let replay = h.call(&payment).await.unwrap_err();
    assert!(matches!(replay, CallError::Payment(PaymentError::InProgress)), "{replay:?}");
    h.clock.advance(31);
    let late = h.call(&payment).await.unwrap_err();
    assert!(matches!(late, CallError::Internal(_)), "{late:?}");
    assert_eq!(h.runs.load(Ordering::SeqCst), 0, "never run again");
}
