//! One shape for every background task: do the work, wait, repeat, until cancelled.
//!
//! The reconciler, the ceiling's sweeper and the log checkpointer all run this way; the first
//! pass runs at once, so work left by a crash resumes as soon as the server is back.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Spawns `tick` every `interval` (after each pass finishes) until `cancel` fires.
pub fn every<F, Fut>(interval: Duration, cancel: CancellationToken, mut tick: F)
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        loop {
            tick().await;
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
        }
    });
}
