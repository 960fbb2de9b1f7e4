//! `AppState`: everything a request needs, shared read-only across the server.
//!
//! It sits above the stages (it holds them) and below everything that serves requests
//! (`transport`, `router`, `public_api`, `listing`), so those depend on it and it on none of
//! them; `app` only assembles it and runs the server.

use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;

use crate::ceiling::Ceiling;
use crate::chain::Network;
use crate::clock::SharedClock;
use crate::config::Config;
use crate::limits::WalletLimits;
use crate::payment::gate::PaymentGate;
use crate::payment::requirements::PayTerms;
use crate::receipt::Receipts;
use crate::store::Store;
use crate::tools::catalog::LiveCatalog;
use crate::tools::paid_call::PaidCall;

pub struct AppState {
    pub config: Config,
    pub network: Network,
    pub catalog: Arc<LiveCatalog>,
    pub store: Arc<dyn Store>,
    pub clock: SharedClock,
    pub gate: Arc<PaymentGate>,
    pub limits: Arc<WalletLimits>,
    pub ceiling: Arc<Ceiling>,
    pub metrics: PrometheusHandle,
    pub receipts: Arc<Receipts>,
    /// Steps 3–10 of every `tools/call`.
    pub paid: Arc<PaidCall>,
    /// Upstreams' budgets and pauses (what `tools/list` and `/.well-known/x402` show as paused).
    pub protection: Arc<crate::protect::Protection>,
    /// Where every quote is paid (the part of the price table a reload cannot change).
    pub terms: PayTerms,
    /// The `--config` file, read again when prices reload.
    pub config_file: Option<std::path::PathBuf>,
}
