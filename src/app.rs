//! Application assembly: config → store, chain, catalog → a bound listener, then serving until
//! a shutdown signal, with a deadline for in-flight work.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use secrecy::SecretString;

use crate::ceiling::Ceiling;
use crate::limits::WalletLimits;
use crate::limits::redis::RedisBuckets;
use crate::receipt::{ReceiptSigner, Receipts};

use crate::cdp_auth::CdpAuth;
use crate::chain::client::ChainClient;
use crate::chain::{Network, parse_private_key};
use crate::clock::{SharedClock, SystemClock};
use crate::config::{ChargePolicy, Config, PriceSetting, SettlerKind, UpstreamConfig, secret_opt};
use crate::money::UsdcAmount;
use crate::payment::gate::PaymentGate;
use crate::payment::reconcile::Reconciler;
use crate::payment::refund::Refunder;
use crate::payment::requirements::PayTerms;
use crate::payment::settle::{Batching, FacilitatorAuth, FacilitatorSettler, SelfSettler, Settler};
use crate::protect::Protection;
use crate::store::{self, Store};
use crate::tools::builtin::{self, Builtin};
use crate::tools::catalog::{Catalog, CatalogError, LiveCatalog, NewTool, PriceSource, ToolPrice};
use crate::tools::paid_call::{CallSettings, PaidCall};
use crate::tools::upstream::{Upstream, UpstreamTool};

pub use crate::state::AppState;

/// What tests and embedders may inject; production uses the defaults.
pub struct Deps {
    pub clock: SharedClock,
    /// Tools added beside the built-ins, each with its price (its charge policy, unless the
    /// price sets one, is `tools.charge`).
    pub extra_tools: Vec<(Builtin, PriceSetting)>,
    /// The `--config` file the config came from: prices reload from it (SIGHUP, or a change
    /// when `tools.watch_config`).
    pub config_file: Option<PathBuf>,
}

impl Default for Deps {
    fn default() -> Self {
        Deps { clock: Arc::new(SystemClock), extra_tools: Vec::new(), config_file: None }
    }
}

/// A bound, not yet serving, tollgate.
pub struct App {
    listener: TcpListener,
    /// `server.metrics_bind`: /metrics on an address of its own.
    metrics_listener: Option<TcpListener>,
    state: Arc<AppState>,
    /// Upstreams that did not answer at start, and the terms their tools are sold on.
    late_upstreams: Vec<LateUpstream>,
    terms: PayTerms,
    /// When the config file was last changed as the server was built: a later change reloads.
    config_seen: Option<std::time::SystemTime>,
}

impl App {
    pub async fn build(config: Config) -> anyhow::Result<App> {
        Self::build_with(config, Deps::default()).await
    }

    /// As `build`, with injected dependencies (tests move a clock instead of sleeping).
    pub async fn build_with(config: Config, deps: Deps) -> anyhow::Result<App> {
        config.validate_for_serving()?;
        let clock = deps.clock;
        let network = Network::from_config(&config.network)?;
        let terms = pay_terms(&config, &network)?;
        let store = store::open(&config.database).await.context("opening the store")?;
        let mut catalog = builtin_catalog(&config, &terms, clock.clone())?;
        let late_upstreams = upstream_tools(&config, &terms, &mut catalog).await?;
        for (tool, setting) in deps.extra_tools {
            let price = ToolPrice { setting, default_charge: config.tools.charge };
            catalog.insert(new_tool("an injected tool", tool, PriceSource::Injected), &price, &terms)?;
        }
        let gate = Arc::new(payment_gate(&config, &network, store.clone(), clock.clone())?);
        gate.settler.preflight(&network.caip2).await.context("payment settler")?;
        let listener = TcpListener::bind(config.server.bind)
            .await
            .with_context(|| format!("binding {}", config.server.bind))?;
        let metrics_listener = match config.server.metrics_bind {
            Some(addr) => {
                Some(TcpListener::bind(addr).await.with_context(|| format!("binding metrics on {addr}"))?)
            }
            None => None,
        };
        // The recorder first, so every component registers its metrics with it.
        let metrics = crate::telemetry::metrics();
        let limits = WalletLimits::from_config(&config.limits).await.context("wallet limits")?;
        let shared = match config.ceiling.shared {
            true => {
                let url = secret_opt(&config.limits.redis_url).context("limits.redis_url")?;
                Some((RedisBuckets::connect(url, &config.limits.key_prefix).await?, clock.clone()))
            }
            false => None,
        };
        let ceiling = Arc::new(Ceiling::from_config(&config.ceiling, shared));
        let signer = ReceiptSigner::from_config(&config.receipts).context("receipts.key")?;
        let receipts = Arc::new(Receipts::new(signer, store.clone(), config.server.server_id.clone()));
        let limits = Arc::new(limits);
        let settings = CallSettings {
            valid_before_margin_secs: config.payment.valid_before_margin_secs,
            request_timeout: Duration::from_secs(config.server.request_timeout_secs),
            tool_timeout: Duration::from_secs(config.tools.timeout_secs),
            pay_to: terms.pay_to,
            failed_attempts: config.limits.failed_attempts,
            unpaid_penalty_secs: config.tools.unpaid_penalty_secs,
            on_success_validity_secs: config.on_success_validity_secs(),
        };
        let refunder = match secret_opt(&config.tools.refund_key) {
            Some(key) => {
                let key = parse_private_key(key).context("tools.refund_key")?;
                Some(Arc::new(Refunder::new(key, &config.network.rpc_endpoints(), network.asset)?))
            }
            None => None,
        };
        let paid = PaidCall::new(gate.clone(), limits.clone(), receipts.clone(), clock.clone(), settings);
        let protection =
            Arc::new(Protection::from_config(&config, clock.clone()).await.context("upstream protection")?);
        let paid = Arc::new(paid.with_refunder(refunder).with_protection(protection.clone()));
        let catalog = Arc::new(LiveCatalog::new(catalog, late_upstreams.len()));
        let state = Arc::new(AppState {
            config,
            network,
            catalog,
            store,
            clock,
            gate,
            limits,
            ceiling,
            metrics,
            receipts,
            paid,
            protection,
            terms: terms.clone(),
            config_file: deps.config_file,
        });
        let config_seen = modified(&state.config_file);
        Ok(App { listener, metrics_listener, state, late_upstreams, terms, config_seen })
    }

    pub fn port(&self) -> u16 {
        self.local_addr().port()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener has an address")
    }

    /// Where `/metrics` is served when it has an address of its own.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn state(&self) -> Arc<AppState> {
        self.state.clone()
    }

    /// Serves until `shutdown` resolves, then gives in-flight requests (and the settlements
    /// inside them) `server.shutdown_grace_secs` to finish before returning.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        let cancel = CancellationToken::new();
        let grace = Duration::from_secs(self.state.config.server.shutdown_grace_secs);
        let router = crate::router::router(self.state.clone(), cancel.child_token());
        let reconciler = Reconciler::new(self.state.gate.clone(), self.stale_after());
        recover(reconciler, self.state.clone(), cancel.child_token());
        join_late_upstreams(self.state.clone(), self.late_upstreams, self.terms, cancel.child_token());
        crate::ceiling::spawn_sweeper(self.state.ceiling.clone(), SWEEP_INTERVAL, cancel.child_token());
        spawn_price_reloader(self.state.clone(), self.config_seen, cancel.child_token());
        let every = Duration::from_secs(self.state.config.receipts.checkpoint_interval_secs);
        let (receipts, clock) = (self.state.receipts.clone(), self.state.clock.clone());
        crate::receipt::spawn_checkpointer(receipts, clock, every, cancel.child_token());
        if let Some(listener) = self.metrics_listener {
            let (scrape, stopped) = (crate::router::metrics_router(self.state.clone()), cancel.clone());
            tokio::spawn(async move {
                let served =
                    axum::serve(listener, scrape).with_graceful_shutdown(stopped.cancelled_owned()).await;
                if let Err(e) = served {
                    tracing::error!(error = %e, "the metrics listener failed");
                }
            });
        }
        let stop = cancel.clone();
        let serve = axum::serve(self.listener, router).with_graceful_shutdown(async move {
            shutdown.await;
            tracing::info!("shutting down: finishing in-flight requests");
            stop.cancel();
        });
        tokio::select! {
            served = serve => served.context("serving")?,
            () = async { cancel.cancelled().await; tokio::time::sleep(grace).await } => {
                tracing::warn!(grace_secs = grace.as_secs(), "shutdown deadline passed; dropping remaining requests");
            }
        }
        Ok(())
    }
}

/// Resolves unresolved payments from chain state, then finishes settled calls whose requests
/// died, every `RECONCILE_INTERVAL`; the first pass runs at once, so work left by a crash
/// resumes as soon as the server is back.
fn recover(reconciler: Reconciler, state: Arc<AppState>, cancel: CancellationToken) {
    let reconciler = Arc::new(reconciler);
    crate::background::every(RECONCILE_INTERVAL, cancel, move || {
        let (reconciler, state) = (reconciler.clone(), state.clone());
        async move {
            if let Err(e) = reconciler.tick().await {
                tracing::warn!(error = %e, "reconciler pass failed; will retry");
            }
            let complete = state.catalog.is_complete();
            if let Err(e) = state.paid.finish_abandoned(&state.catalog.current(), complete).await {
                tracing::warn!(error = %e, "finishing abandoned calls failed; will retry");
            }
        }
    });
}

/// How often idle rate-limit keys are forgotten.
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

/// How often unresolved payments are re-examined.
const RECONCILE_INTERVAL: Duration = Duration::from_secs(2);

impl App {
    /// A claimed or settling payment untouched this long has lost its request.
    fn stale_after(&self) -> Duration {
        Duration::from_secs(self.state.config.server.request_timeout_secs)
    }
}

fn payment_gate(
    config: &Config,
    network: &Network,
    store: Arc<dyn Store>,
    clock: SharedClock,
) -> anyhow::Result<PaymentGate> {
    let rpc_urls = config.network.rpc_endpoints();
    let p = &config.payment;
    let settle_timeout = Duration::from_secs(p.settle_timeout_secs);
    let settler: Arc<dyn Settler> = match p.settler {
        SettlerKind::SelfRelay => {
            let key = secret_opt(&p.relayer_key).context("payment.relayer_key")?;
            let batching = Batching { max: p.batch_max, hold: Duration::from_millis(p.batch_hold_ms) };
            Arc::new(SelfSettler::new(&rpc_urls, parse_private_key(key)?, network.asset, batching)?)
        }
        SettlerKind::Facilitator => Arc::new(facilitator_settler(config)?),
    };
    Ok(PaymentGate {
        store,
        chain: Arc::new(ChainClient::connect_any(&rpc_urls, network.asset)?),
        settler,
        network: network.clone(),
        clock,
        confirmations: p.confirmations,
        settle_timeout,
        log_window: config.network.max_log_range.max(1),
        allowed_factories: p.eip6492_allowed_factories.clone(),
    })
}

/// The configured facilitator, with the credentials it takes.
pub fn facilitator_settler(config: &Config) -> anyhow::Result<FacilitatorSettler> {
    let f = &config.payment.facilitator;
    let auth = match (secret_opt(&f.auth_header), secret_opt(&f.cdp_key_secret)) {
        (_, Some(_)) => FacilitatorAuth::Cdp(
            CdpAuth::new(&f.cdp_key_id, &f.cdp_key_secret).context("payment.facilitator.cdp_key_secret")?,
        ),
        (Some(header), None) => FacilitatorAuth::Header(SecretString::from(header.to_owned())),
        (None, None) => FacilitatorAuth::None,
    };
    FacilitatorSettler::new(&f.url, auth, Duration::from_secs(config.payment.settle_timeout_secs))
}

/// Where tollgate is paid: payTo, network and the offer's validity.
fn pay_terms(config: &Config, network: &Network) -> anyhow::Result<PayTerms> {
    Ok(PayTerms {
        network: network.clone(),
        pay_to: config.payment.pay_to.context("payment.pay_to is required")?,
        max_timeout_seconds: config.payment.max_timeout_seconds,
    })
}

/// The catalog as public config describes it (built-ins and the upstreams that answer), for
/// `tollgate listing`: no store, chain or keys.
pub async fn public_catalog(config: &Config) -> anyhow::Result<(Network, Catalog)> {
    let network = Network::from_config(&config.network)?;
    let terms = pay_terms(config, &network)?;
    let mut catalog = builtin_catalog(config, &terms, Arc::new(SystemClock))?;
    let late = upstream_tools(config, &terms, &mut catalog).await?;
    for l in &late {
        tracing::warn!(upstream = %l.config.name, "upstream did not answer: its tools are not in this listing");
    }
    Ok((network, catalog))
}

/// An upstream that did not answer at start: its tools join the catalog when it does.
struct LateUpstream {
    config: UpstreamConfig,
    tools_charge: ChargePolicy,
    upstream: Arc<Upstream>,
}

/// Connects every configured upstream and adds its (non-hidden) tools, priced. One that does
/// not answer does not stop the server: it is returned, to be retried in the background.
async fn upstream_tools(
    config: &Config,
    terms: &PayTerms,
    catalog: &mut Catalog,
) -> anyhow::Result<Vec<LateUpstream>> {
    let mut late = Vec::new();
    for c in &config.upstream {
        let upstream = Arc::new(Upstream::new(c));
        match upstream.list_tools().await {
            Ok(tools) => add_upstream_tools(catalog, c, config.tools.charge, &upstream, tools, terms)?,
            Err(e) => {
                let why = crate::redact::urls(&format!("{e:#}"));
                tracing::warn!(upstream = %c.name, error = %why, "upstream unavailable at start; its tools join when it answers");
                late.push(LateUpstream { config: c.clone(), tools_charge: config.tools.charge, upstream });
            }
        }
    }
    Ok(late)
}

fn add_upstream_tools(
    catalog: &mut Catalog,
    c: &UpstreamConfig,
    tools_charge: ChargePolicy,
    upstream: &Arc<Upstream>,
    tools: Vec<rmcp::model::Tool>,
    terms: &PayTerms,
) -> Result<(), CatalogError> {
    for tool in tools {
        let remote = tool.name.to_string();
        if c.hidden.contains(&remote) {
            continue;
        }
        let price = upstream_price(c, &remote, tools_charge);
        let name = format!("{}{remote}", c.prefix);
        let description = tool.description.as_deref().unwrap_or_default().to_owned();
        let schema = serde_json::Value::Object((*tool.input_schema).clone());
        let source = PriceSource::Upstream { upstream: c.name.clone(), remote: remote.clone() };
        let handler = Arc::new(UpstreamTool { upstream: upstream.clone(), remote });
        let origin = format!("upstream `{}`", c.name);
        let new = NewTool {
            origin: &origin,
            name: &name,
            description: &description,
            input_schema: schema,
            handler,
            source,
        };
        catalog.insert(new, &price, terms)?;
    }
    tracing::info!(upstream = %c.name, "upstream tools listed");
    Ok(())
}

/// Retries each late upstream until it answers, then swaps a catalog with its tools in. The
/// upstream's own reconnect backoff (up to 30 s) paces the attempts; this only polls it.
fn join_late_upstreams(
    state: Arc<AppState>,
    late: Vec<LateUpstream>,
    terms: PayTerms,
    cancel: CancellationToken,
) {
    for LateUpstream { config, tools_charge, upstream } in late {
        let (state, cancel, terms) = (state.clone(), cancel.clone(), terms.clone());
        tokio::spawn(async move {
            loop {
                if let Ok(tools) = upstream.list_tools().await {
                    let added = state
                        .catalog
                        .update(|c| add_upstream_tools(c, &config, tools_charge, &upstream, tools, &terms));
                    if let Err(e) = added {
                        // The start would have failed on this; now the server serves on without it.
                        tracing::error!(upstream = %config.name, error = %e, "upstream tools not added");
                    }
                    state.catalog.source_settled();
                    return;
                }
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(LATE_UPSTREAM_POLL) => {}
                }
            }
        });
    }
}

/// How often a late upstream is asked again (its backoff decides when it is really dialled).
const LATE_UPSTREAM_POLL: Duration = Duration::from_secs(1);

fn builtin_catalog(config: &Config, terms: &PayTerms, clock: SharedClock) -> anyhow::Result<Catalog> {
    let mut catalog = Catalog::default();
    for tool in builtin::all(clock) {
        let price = builtin_price(config, tool.name);
        catalog.insert(new_tool("a built-in", tool, PriceSource::Builtin), &price, terms)?;
    }
    Ok(catalog)
}

fn new_tool(origin: &str, tool: Builtin, source: PriceSource) -> NewTool<'_> {
    let Builtin { name, description, input_schema, handler } = tool;
    NewTool { origin, name, description, input_schema, handler, source }
}

/// A built-in's price in `[tools.prices]` (not listed: free).
fn builtin_price(config: &Config, name: &str) -> ToolPrice {
    let setting = config.tools.prices.get(name).cloned().unwrap_or(PriceSetting::Fixed(UsdcAmount::ZERO));
    ToolPrice { setting, default_charge: config.tools.charge }
}

/// An upstream tool's price: free if listed so, else its own entry, else the upstream's default.
fn upstream_price(c: &UpstreamConfig, remote: &str, tools_charge: ChargePolicy) -> ToolPrice {
    let setting = match (c.free.iter().any(|f| f == remote), c.prices.get(remote)) {
        (true, _) => PriceSetting::Fixed(UsdcAmount::ZERO),
        (false, Some(setting)) => setting.clone(),
        (false, None) => PriceSetting::Fixed(c.default_price),
    };
    ToolPrice { setting, default_charge: c.charge.unwrap_or(tools_charge) }
}

/// How often the config file is looked at when `tools.watch_config` is on.
const WATCH_INTERVAL: Duration = Duration::from_secs(2);

/// Reloads prices on SIGHUP and, with `tools.watch_config`, when the config file changes.
fn spawn_price_reloader(
    state: Arc<AppState>,
    mut seen: Option<std::time::SystemTime>,
    cancel: CancellationToken,
) {
    let mut hangups = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; prices reload only on file change");
            None
        }
    };
    let file = state.config_file.clone();
    let watch = state.config.tools.watch_config && file.is_some();
    tokio::spawn(async move {
        loop {
            let hangup = async {
                match hangups.as_mut() {
                    Some(signal) => signal.recv().await,
                    None => std::future::pending().await,
                }
            };
            let reload = tokio::select! {
                () = cancel.cancelled() => return,
                _ = hangup => true,
                () = tokio::time::sleep(WATCH_INTERVAL), if watch => {
                    let now = modified(&file);
                    std::mem::replace(&mut seen, now) != now
                }
            };
            if reload {
                // A failed reload keeps the table in service; it is logged, never fatal.
                let _ = reload_prices(&state, state.config_file.as_deref());
            }
        }
    });
}

fn modified(file: &Option<PathBuf>) -> Option<std::time::SystemTime> {
    std::fs::metadata(file.as_ref()?).and_then(|m| m.modified()).ok()
}

/// Reads the config again (`file` and the environment) and re-prices the catalog from it. A
/// config that does not validate, or a price that does not check, keeps the old table and says
/// why.
pub fn reload_prices(state: &AppState, file: Option<&std::path::Path>) -> anyhow::Result<Vec<String>> {
    let reloaded = Config::load(file).map_err(anyhow::Error::from).and_then(|config| {
        // The refund wallet is built at start: a reload cannot promise refunds without one.
        if config.refunds_on_error() && !state.paid.can_refund() {
            anyhow::bail!("refund_on_error needs a refund wallet (tools.refund_key) configured at start; restart to add one");
        }
        reprice(state, &config, &state.terms).map_err(anyhow::Error::from)
    });
    match &reloaded {
        Ok(changed) => {
            metrics::counter!("tollgate_price_reloads_total", "outcome" => "applied").increment(1);
            tracing::info!(changed = ?changed, "prices reloaded");
        }
        Err(e) => {
            metrics::counter!("tollgate_price_reloads_total", "outcome" => "refused").increment(1);
            tracing::error!(error = %format!("{e:#}"), "price reload refused; the previous prices stay in service");
        }
    }
    reloaded
}

/// Re-prices the catalog in service from `config` (a reload): built-ins from `[tools.prices]`,
/// upstream tools from their `[[upstream]]`. All or nothing: a price that does not check keeps
/// the old table. Returns the tools whose price or policy changed.
pub fn reprice(state: &AppState, config: &Config, terms: &PayTerms) -> Result<Vec<String>, CatalogError> {
    state.catalog.update(|catalog| {
        catalog.reprice(terms, |name, source| match source {
            PriceSource::Builtin => Some(builtin_price(config, name)),
            PriceSource::Upstream { upstream, remote } => {
                let c = config.upstream.iter().find(|u| &u.name == upstream)?;
                Some(upstream_price(c, remote, config.tools.charge))
            }
            PriceSource::Injected => None,
        })
    })
}
