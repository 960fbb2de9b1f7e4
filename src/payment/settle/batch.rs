//! Batched settlement for the relayer.
//!
//! While a settlement transaction is in flight, plain payments that arrive queue; when it is
//! mined, the next round takes all of them at once, in Multicall3 `aggregate3` transactions of
//! at most `batch_max` payments each. So:
//!
//! - a lone payment waits for nothing: with nothing in flight it goes at once, as a plain
//!   `transferWithAuthorization`, exactly as without batching;
//! - a bad authorization fails only itself: every payment is simulated in one `eth_call` first
//!   (those that would revert are refused with the token's own reason and leave the batch), and
//!   each call in the transaction is allowed to fail, so one spent or drained in between
//!   reverts alone;
//! - each payment is still confirmed by the gate from its own paired `AuthorizationUsed` +
//!   `Transfer` logs in the shared receipt, as if it had been sent alone.
//!
//! One task owns the rounds, so a round can never interleave with the next; the relayer's
//! nonce lock orders the transactions within a round.

use std::sync::Arc;

use alloy::primitives::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::relayer::{GasCap, IN_FLIGHT_MAX, Relayer, SendFailure};
use super::{SettleError, Submitted, TxRecorder};

/// A payment waiting for its round.
struct Queued {
    /// The token's `transferWithAuthorization` call.
    call: Bytes,
    recorder: Arc<dyn TxRecorder>,
    reply: oneshot::Sender<Result<Submitted, SettleError>>,
}

impl Queued {
    fn answer(self, outcome: Result<Submitted, SettleError>) {
        // The caller may be gone (its request was abandoned); its row holds the transaction.
        let _ = self.reply.send(outcome);
    }
}

/// Where plain payments wait for their round.
pub(super) struct Batcher {
    queue: mpsc::Sender<Queued>,
}

/// Payments that may wait at once. Each is a paid call in progress, so the server's own
/// request limits bound it well below this; a full queue makes the next caller wait.
const QUEUE: usize = 16_384;
/// Transactions per round: a burst beyond `batch_max` × this waits for the next round.
const ROUND_TXS: usize = 4;

impl Batcher {
    pub(super) fn start(relayer: Arc<Relayer>, batch_max: usize) -> Batcher {
        let (queue, incoming) = mpsc::channel(QUEUE);
        tokio::spawn(rounds(relayer, incoming, batch_max));
        Batcher { queue }
    }

    /// Settles one plain payment in the next round: its transaction, mined when the answer
    /// came in time.
    pub(super) async fn submit(
        &self,
        call: Bytes,
        recorder: Arc<dyn TxRecorder>,
    ) -> Result<Submitted, SettleError> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Queued { call, recorder, reply })
            .await
            .map_err(|_| SettleError::NotSent("the settlement queue is closed".into()))?;
        // Dropped without an answer (the task died mid-round): it may have been broadcast, and
        // its row says which transaction; the gate resolves it from the chain.
        answer.await.unwrap_or(Err(SettleError::Ambiguous { tx: None }))
    }
}

async fn rounds(relayer: Arc<Relayer>, mut incoming: mpsc::Receiver<Queued>, batch_max: usize) {
    let mut round = Vec::new();
    while incoming.recv_many(&mut round, batch_max * ROUND_TXS).await > 0 {
        metrics::histogram!("tollgate_settlement_round_payments").record(round.len() as f64);
        let mut batches = Vec::new();
        while !round.is_empty() {
            let rest = round.split_off(round.len().min(batch_max));
            batches.push(std::mem::replace(&mut round, rest));
        }
        futures_util::future::join_all(batches.into_iter().map(|batch| settle(&relayer, batch))).await;
    }
}

/// Settles one transaction's worth of payments and answers each of them.
async fn settle(relayer: &Relayer, batch: Vec<Queued>) {
    let batch = match batch.len() {
        // Alone, the broadcast's own simulation (gas estimation) says why it would fail.
        1 => batch,
        _ => simulated(relayer, batch).await,
    };
    if let Some(refused) = send(relayer, batch).await {
        // The batch as a whole was refused before broadcast: each payment goes alone, so that
        // only one that cannot settle fails.
        tracing::warn!(batch.size = refused.len(), "batch refused; settling its payments one by one");
        futures_util::future::join_all(refused.into_iter().map(|q| send(relayer, vec![q]))).await;
    }
}

/// The payments whose simulation succeeds; the others are answered with the token's reason.
async fn simulated(relayer: &Relayer, batch: Vec<Queued>) -> Vec<Queued> {
    let calls: Vec<Bytes> = batch.iter().map(|q| q.call.clone()).collect();
    let verdicts = match relayer.simulate_each(&calls).await {
        Ok(verdicts) => verdicts,
        Err(e) => {
            for q in batch {
                q.answer(Err(e.clone()));
            }
            return Vec::new();
        }
    };
    let mut passing = Vec::with_capacity(batch.len());
    for (q, verdict) in batch.into_iter().zip(verdicts) {
        match verdict {
            None => passing.push(q),
            Some(refusal) => q.answer(Err(SettleError::Refused(refusal))),
        }
    }
    passing
}

/// Sends the batch as one transaction and answers every payment in it, waiting until it is
/// mined (the round is in flight until then). Hands the batch back when several payments
/// were refused together before broadcast.
async fn send(relayer: &Relayer, mut batch: Vec<Queued>) -> Option<Vec<Queued>> {
    loop {
        let calls: Vec<Bytes> = batch.iter().map(|q| q.call.clone()).collect();
        let tx = match calls.as_slice() {
            [] => return None,
            [call] => relayer.single(call.clone()),
            _ => relayer.aggregate(&calls),
        };
        let recorders: Vec<Arc<dyn TxRecorder>> = batch.iter().map(|q| q.recorder.clone()).collect();
        let started = tokio::time::Instant::now();
        match relayer.send(tx, &GasCap::TRANSFER.times(batch.len()), &recorders).await {
            Ok(submitted) => {
                metrics::histogram!("tollgate_settlement_batch_payments").record(batch.len() as f64);
                let submitted = relayer.until_mined(submitted, started + IN_FLIGHT_MAX).await;
                for q in batch {
                    q.answer(Ok(submitted.clone()));
                }
                return None;
            }
            // Rows the reconciler took over meanwhile: nothing was sent; the rest go without them.
            Err(SendFailure::Unrecorded(failed)) => {
                for i in failed.into_iter().rev() {
                    batch.remove(i).answer(Err(SettleError::NotSent("cannot record the transaction".into())));
                }
            }
            Err(SendFailure::Settle(SettleError::Refused(_))) if batch.len() > 1 => return Some(batch),
            Err(SendFailure::Settle(e)) => {
                for q in batch {
                    q.answer(Err(e.clone()));
                }
                return None;
            }
        }
    }
}
