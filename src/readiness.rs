//! Readiness: whether everything a paid call needs answers — the store, the chain, Redis (when
//! used) and, with our own relayer, enough gas to settle.
//!
//! Probed in the background every `server.readiness_refresh_ms`, and `/readyz` answers from the
//! last report: a load balancer probing it, or a flood hitting it, costs no RPC, database or
//! Redis call, so it cannot burn the RPC quota settlement needs.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::state::AppState;

/// One probe's outcome: ready or not, and each check's "ok" or reason (URLs redacted).
#[derive(Debug, Clone)]
pub struct Report {
    pub ready: bool,
    pub checks: Map<String, Value>,
}

/// The last report, shared by the prober and `/readyz`.
pub struct Readiness {
    latest: watch::Sender<Option<Arc<Report>>>,
}

impl Default for Readiness {
    fn default() -> Self {
        Readiness { latest: watch::Sender::new(None) }
    }
}

impl Readiness {
    /// The last report; waits (bounded) for the first probe of a server that just started.
    pub async fn latest(&self) -> Option<Arc<Report>> {
        let mut rx = self.latest.subscribe();
        let first = tokio::time::timeout(Duration::from_secs(5), rx.wait_for(Option::is_some)).await;
        match first {
            Ok(Ok(report)) => report.clone(),
            _ => None,
        }
    }
}

/// Probes every `every` until cancelled; the first probe runs at once.
pub fn spawn_prober(state: Arc<AppState>, every: Duration, cancel: CancellationToken) -> Arc<Readiness> {
    let readiness = Arc::new(Readiness::default());
    let shared = readiness.clone();
    crate::background::every(every, cancel, move || {
        let (state, readiness) = (state.clone(), shared.clone());
        async move {
            let report = probe(&state).await;
            if !report.ready {
                tracing::warn!(checks = ?report.checks, "not ready");
            }
            readiness.latest.send_replace(Some(Arc::new(report)));
        }
    });
    readiness
}

/// Asks each dependency, each bounded by a short timeout.
pub async fn probe(app: &AppState) -> Report {
    let timeout = Duration::from_secs(3);
    let mut checks = Map::new();
    let mut ready = true;
    let mut check = |name: &str, outcome: Result<(), String>| {
        ready &= outcome.is_ok();
        checks.insert(name.to_owned(), outcome.err().unwrap_or_else(|| "ok".to_owned()).into());
    };
    let store = tokio::time::timeout(timeout, app.store.ping()).await;
    let store = store
        .map_err(|_| "timeout".to_owned())
        .and_then(|r| r.map_err(|e| crate::redact::urls(&e.to_string())));
    check("store", store);
    let limiter = tokio::time::timeout(timeout, app.limits.ping()).await.unwrap_or(false);
    check("limiter", if limiter { Ok(()) } else { Err("redis unavailable".into()) });
    let chain = tokio::time::timeout(timeout, app.gate.chain.chain_id()).await;
    let chain = match chain {
        Ok(Ok(id)) => chain_id_is(id, app.network.chain_id),
        Ok(Err(e)) => Err(crate::redact::urls(&e.to_string())),
        Err(_) => Err("timeout".into()),
    };
    check("chain", chain);
    if let Some(facilitator) = tokio::time::timeout(timeout, app.gate.settler.ready(&app.network.caip2))
        .await
        .unwrap_or_else(|_| Some(Err("timeout".into())))
    {
        check("facilitator", facilitator);
    }
    if let Some(relayer) = app.gate.settler.relayer() {
        let floor = app.config.payment.min_relayer_balance_wei;
        let balance = tokio::time::timeout(timeout, app.gate.chain.gas_balance(relayer)).await;
        let outcome = match balance {
            Ok(Ok(wei)) => {
                metrics::gauge!("tollgate_relayer_balance_wei").set(f64::from(wei));
                gas_enough(wei, floor)
            }
            Ok(Err(e)) => Err(crate::redact::urls(&e.to_string())),
            Err(_) => Err("timeout".into()),
        };
        check("relayer_gas", outcome);
    }
    Report { ready, checks }
}

/// The RPC's chain against the configured one (readiness and `tollgate doctor`).
pub fn chain_id_is(found: u64, expected: u64) -> Result<(), String> {
    match found == expected {
        true => Ok(()),
        false => Err(format!("RPC is on chain {found}, expected {expected}")),
    }
}

/// The relayer's gas money against `payment.min_relayer_balance_wei`.
pub fn gas_enough(wei: alloy::primitives::U256, floor: u128) -> Result<(), String> {
    match wei >= alloy::primitives::U256::from(floor) {
        true => Ok(()),
        false => Err(format!("relayer balance {wei} wei is below payment.min_relayer_balance_wei = {floor}")),
    }
}
