//! Batched settlement for the relayer.
//!
//! While a settlement transaction is in flight, plain payments that arrive queue; when it is
//! mined, the next round takes all of them at once, in Multicall3 `aggregate3` transactions of
//! at most `batch_max` payments each. So:
//!
//! - a lone payment waits for nothing: with nothing in flight it goes at once, as a plain
//!   `transferWithAuthorization`, exactly as without batching. It holds the next round only
//!   briefly ([`Batching::hold`]), long enough for a burst right behind it to gather into one
//!   transaction that still lands in the same block, never for a whole block;
//! - a bad authorization fails only itself: every payment is simulated in one `eth_call` first
//!   (those the token refuses are answered with its reason and leave the batch; those that fail
//!   without one, such as a payer whose EIP-7702 code burns the gas, go alone), and each call in
//!   the transaction is allowed to fail. A payment the mined batch did not settle (drained,
//!   spent or starved of gas in between) is sent again alone, where its own simulation decides;
//! - no payer fills a round: at most [`PER_PAYER`] of one payer's payments go per round, the
//!   rest wait for the next;
//! - each payment is still confirmed by the gate from its own paired `AuthorizationUsed` +
//!   `Transfer` logs in the shared receipt, as if it had been sent alone.
//!
//! One task starts the rounds, each in a task of its own (a panic there drops its payments'
//! replies, which the gate treats as possibly sent, and the next round still runs); the
//! relayer's nonce lock orders the transactions.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use alloy::primitives::{Address, B256, Bytes};
use alloy::rpc::types::TransactionReceipt;
use alloy::sol_types::SolEvent;
use tokio::sync::{mpsc, oneshot};

use super::relayer::{GasCap, IN_FLIGHT_MAX, Relayer, SendFailure, Verdict};
use super::{Prepared, SettleError, Submitted, TxRecorder};
use crate::chain::usdc::Usdc;

/// A payment waiting for its round.
pub(super) struct Queued {
    pub payer: Address,
    pub nonce: B256,
    /// The token's `transferWithAuthorization` call.
    pub call: Bytes,
    /// Its simulation ahead of the claim: it stands for the estimate only while it is current
    /// ([`Flights::current`]), for a payment going alone.
    pub prepared: Option<Prepared>,
    pub recorder: Arc<dyn TxRecorder>,
    reply: oneshot::Sender<Result<Submitted, SettleError>>,
}

impl Queued {
    fn answer(self, outcome: Result<Submitted, SettleError>) {
        // The caller may be gone (its request was abandoned); its row holds the transaction.
        let _ = self.reply.send(outcome);
    }

    /// Whether `receipt` spent this payment's authorization.
    fn settled_in(&self, receipt: &TransactionReceipt) -> bool {
        receipt.inner.logs().iter().any(|log| {
            Usdc::AuthorizationUsed::decode_log(&log.inner)
                .is_ok_and(|e| e.data.authorizer == self.payer && e.data.nonce == self.nonce)
        })
    }
}

/// Where plain payments wait for their round.
pub(super) struct Batcher {
    queue: mpsc::Sender<Queued>,
    /// Payments the rounds hold over for a later round (those still in the queue are counted
    /// from it).
    held_over: Arc<AtomicUsize>,
}

/// Payments that may wait at once. Each is a paid call in progress, so the server's own
/// request limits bound it well below this; a full queue makes the next caller wait.
const QUEUE: usize = 16_384;
/// Transactions per round: a burst beyond `batch_max` × this waits for the next round.
const ROUND_TXS: usize = 4;
/// Most payments of one payer per round: a payer who signs a flood of authorizations (each
/// passing the balance check alone) cannot crowd everyone else out of a round.
const PER_PAYER: usize = 32;
/// How payments are batched (`payment.batch_max`, `payment.batch_hold_ms`).
#[derive(Debug, Clone, Copy)]
pub struct Batching {
    /// Most payments one transaction carries; below 2, each goes alone.
    pub max: usize,
    /// How long a round of one payment holds the next round: payments that arrive right behind
    /// a lone one (a burst of agents answered by the same block) gather for this long, then go
    /// in one transaction, in the same block as the lone one on a chain with 2-second blocks.
    /// On an instant-mining chain the lone payment is mined sooner, and the hold ends with it.
    pub hold: Duration,
}

impl Batcher {
    pub(super) fn start(relayer: Arc<Relayer>, batching: Batching) -> Batcher {
        let (queue, incoming) = mpsc::channel(QUEUE);
        let held_over = Arc::new(AtomicUsize::new(0));
        tokio::spawn(rounds(relayer, incoming, batching, held_over.clone()));
        Batcher { queue, held_over }
    }

    /// Payments waiting for a round: queued behind a transaction in flight, or held over from
    /// a burst larger than one round.
    pub(super) fn waiting(&self) -> usize {
        let queued = self.queue.max_capacity() - self.queue.capacity();
        queued + self.held_over.load(Ordering::SeqCst)
    }

    /// Settles one plain payment in the next round: its transaction, mined when the answer
    /// came in time.
    pub(super) async fn submit(
        &self,
        payer: Address,
        nonce: B256,
        call: Bytes,
        prepared: Option<Prepared>,
        recorder: Arc<dyn TxRecorder>,
    ) -> Result<Submitted, SettleError> {
        let (reply, answer) = oneshot::channel();
        if self.queue.send(Queued { payer, nonce, call, prepared, recorder, reply }).await.is_err() {
            return Err(SettleError::NotSent("the settlement queue is closed".into()));
        }
        metrics::gauge!("tollgate_settlement_waiting").set(self.waiting() as f64);
        // Dropped without an answer (its round's task died): it may have been broadcast, and
        // its row says which transaction (none recorded, it is still claimed); the gate
        // resolves it from the chain.
        answer.await.unwrap_or(Err(SettleError::Ambiguous { tx: None }))
    }
}

/// What the rounds know of their own transactions, so a payment's simulation ahead of time
/// ([`Prepared`]) is trusted only while it describes the chain our next transaction meets.
#[derive(Default)]
struct Flights {
    /// Rounds whose transactions are not mined yet (nor given up on).
    in_flight: AtomicUsize,
    /// When the last round ended: its transactions mined, the chain moved.
    last_landed: Mutex<Option<Instant>>,
}

impl Flights {
    /// Whether a simulation asked at `at` saw the chain after every transaction of ours: none
    /// is in flight, and none landed since.
    fn current(&self, at: Instant) -> bool {
        let landed = *self.last_landed.lock().expect("not poisoned");
        self.in_flight.load(Ordering::SeqCst) == 0 && landed.is_none_or(|landed| at > landed)
    }

    fn take_off(self: &Arc<Self>) -> Flight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        Flight(self.clone())
    }
}

/// One round in flight; dropped when it ends, however it ends (a panic too).
struct Flight(Arc<Flights>);

impl Drop for Flight {
    fn drop(&mut self) {
        *self.0.last_landed.lock().expect("not poisoned") = Some(Instant::now());
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn rounds(
    relayer: Arc<Relayer>,
    mut incoming: mpsc::Receiver<Queued>,
    batching: Batching,
    held_over: Arc<AtomicUsize>,
) {
    let Batching { max: batch_max, hold } = batching;
    let limit = batch_max * ROUND_TXS;
    let flights = Arc::new(Flights::default());
    let mut waiting: VecDeque<Queued> = VecDeque::new();
    let mut arrived = Vec::new();
    loop {
        // Wait for work only when nothing was held over from the last round.
        if waiting.is_empty() {
            if incoming.recv_many(&mut arrived, limit).await == 0 {
                return;
            }
        } else {
            while let Ok(q) = incoming.try_recv() {
                arrived.push(q);
                if arrived.len() >= limit {
                    break;
                }
            }
        }
        waiting.extend(arrived.drain(..));
        let mut round = take_round(&mut waiting, limit);
        held_over.store(waiting.len(), Ordering::SeqCst);
        metrics::gauge!("tollgate_settlement_waiting").set((incoming.len() + waiting.len()) as f64);
        metrics::histogram!("tollgate_settlement_round_payments").record(round.len() as f64);
        let lone = round.len() == 1;
        // A simulation ahead of time stands for the estimate only for a payment that goes
        // alone, and saw the chain after our last transaction: payments in a batch are simulated
        // together, and one that waited behind ours may find the chain moved by it (its payer's
        // balance spent by the payment before).
        let current = lone && round[0].prepared.is_some_and(|p| flights.current(p.simulated_at));
        if !current {
            round.iter_mut().for_each(|q| q.prepared = None);
        }
        let flight = flights.take_off();
        let relayer = relayer.clone();
        let work = tokio::spawn(async move {
            let _flight = flight;
            let batches = split(round, batch_max);
            futures_util::future::join_all(batches.into_iter().map(|batch| settle(&relayer, batch))).await;
        });
        // Until mined: what arrives meanwhile is the next round. (A failed round's payments
        // were answered, or their replies dropped; either way the next round goes.)
        match lone {
            true => drop(tokio::time::timeout(hold, work).await),
            false => drop(work.await),
        }
    }
}

/// The next round: up to `limit` payments in arrival order, at most [`PER_PAYER`] per payer;
/// the others stay first in line for the round after.
fn take_round(waiting: &mut VecDeque<Queued>, limit: usize) -> Vec<Queued> {
    let mut per_payer: HashMap<Address, usize> = HashMap::new();
    let mut round = Vec::new();
    let mut held = VecDeque::new();
    while let Some(q) = waiting.pop_front() {
        if round.len() >= limit {
            held.push_back(q);
            continue;
        }
        let count = per_payer.entry(q.payer).or_default();
        if *count < PER_PAYER {
            *count += 1;
            round.push(q);
        } else {
            held.push_back(q);
        }
    }
    *waiting = held;
    round
}

fn split(mut round: Vec<Queued>, batch_max: usize) -> Vec<Vec<Queued>> {
    let mut batches = Vec::new();
    while !round.is_empty() {
        let rest = round.split_off(round.len().min(batch_max));
        batches.push(std::mem::replace(&mut round, rest));
    }
    batches
}

/// Settles one transaction's worth of payments and answers each of them.
async fn settle(relayer: &Relayer, batch: Vec<Queued>) {
    let (batch, mut alone) = match batch.len() {
        // Alone, the broadcast's own simulation (gas estimation) says why it would fail.
        1 => (batch, Vec::new()),
        _ => simulated(relayer, batch).await,
    };
    alone.extend(send(relayer, batch).await);
    // Each on its own transaction, with its own simulation and gas cap: only a payment that
    // cannot settle fails.
    futures_util::future::join_all(alone.into_iter().map(|q| send(relayer, vec![q]))).await;
}

/// Splits a batch by its simulation: the payments that would settle, and those to try alone.
/// Those the token refuses are answered with its reason.
async fn simulated(relayer: &Relayer, batch: Vec<Queued>) -> (Vec<Queued>, Vec<Queued>) {
    let calls: Vec<Bytes> = batch.iter().map(|q| q.call.clone()).collect();
    let verdicts = match relayer.simulate_each(&calls).await {
        Ok(verdicts) => verdicts,
        Err(e) => {
            for q in batch {
                q.answer(Err(e.clone()));
            }
            return (Vec::new(), Vec::new());
        }
    };
    let (mut passing, mut alone) = (Vec::with_capacity(batch.len()), Vec::new());
    for (q, verdict) in batch.into_iter().zip(verdicts) {
        match verdict {
            Verdict::Settles => passing.push(q),
            Verdict::Refused(refusal) => q.answer(Err(SettleError::Refused(refusal))),
            Verdict::Unclear => alone.push(q),
        }
    }
    if !alone.is_empty() {
        tracing::warn!(
            payments = alone.len(),
            "batch simulation failed without the token's reason; trying those alone"
        );
    }
    (passing, alone)
}

/// Sends the batch as one transaction and answers every payment in it, waiting until it is
/// mined (the round is in flight until then). Returns, unanswered, the payments to try alone:
/// all of them when several were refused together before broadcast, and those the mined
/// transaction did not settle. A batch of one is always answered.
async fn send(relayer: &Relayer, mut batch: Vec<Queued>) -> Vec<Queued> {
    loop {
        let calls: Vec<Bytes> = batch.iter().map(|q| q.call.clone()).collect();
        let tx = match calls.as_slice() {
            [] => return Vec::new(),
            [call] => relayer.single(call.clone()),
            _ => relayer.aggregate(&calls),
        };
        let recorders: Vec<Arc<dyn TxRecorder>> = batch.iter().map(|q| q.recorder.clone()).collect();
        let prepared = match batch.as_slice() {
            [lone] => lone.prepared,
            _ => None,
        };
        let started = tokio::time::Instant::now();
        match relayer.send(tx, &GasCap::TRANSFER.times(batch.len()), prepared, &recorders).await {
            Ok(submitted) => {
                metrics::histogram!("tollgate_settlement_batch_payments").record(batch.len() as f64);
                let submitted = relayer.until_mined(submitted, started + IN_FLIGHT_MAX).await;
                let mut again = Vec::new();
                for q in batch.drain(..) {
                    match &submitted.receipt {
                        // Mined without settling it: its authorization is unspent by us, and
                        // its own transaction says why (or settles it).
                        Some(receipt) if calls.len() > 1 && !q.settled_in(receipt) => again.push(q),
                        _ => q.answer(Ok(submitted.clone())),
                    }
                }
                if !again.is_empty() {
                    tracing::warn!(payment.tx = %submitted.tx, payments = again.len(), "a batch left payments unsettled; sending them alone");
                }
                return again;
            }
            // Rows the reconciler released or took over meanwhile: nothing was sent; the rest go
            // without them.
            Err(SendFailure::Unrecorded(failed)) => {
                for i in failed.into_iter().rev() {
                    batch.remove(i).answer(Err(SettleError::NotSent("cannot record the transaction".into())));
                }
            }
            Err(SendFailure::Settle(SettleError::Refused(_))) if batch.len() > 1 => return batch,
            Err(SendFailure::Settle(e)) => {
                for q in batch {
                    q.answer(Err(e.clone()));
                }
                return Vec::new();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_simulation_is_current_only_if_asked_after_our_last_transaction_landed_with_none_in_flight() {
        // Arrange
        let flights = Arc::new(Flights::default());
        let before_any = Instant::now();
        // Act + Assert: nothing of ours ever went: current.
        assert!(flights.current(before_any), "no transaction of ours yet");
        // One in flight: nothing asked before it lands is current, whenever it was asked.
        let flight = flights.take_off();
        let during = Instant::now();
        assert!(!flights.current(before_any), "asked before ours went");
        assert!(!flights.current(during), "asked while ours was in flight");
        drop(flight);
        // Landed: what was asked before it is stale; what is asked after it is current.
        assert!(!flights.current(during), "asked before ours landed");
        let after = Instant::now();
        assert!(flights.current(after), "asked after ours landed, none in flight");
    }
}
