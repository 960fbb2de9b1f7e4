//! Application assembly: config → store, chain, catalog → a bound listener, then serving until
//! a shutdown signal, with a deadline for in-flight work.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::chain::Network;
use crate::clock::{SharedClock, SystemClock};
use crate::config::Config;
use crate::money::UsdcAmount;
use crate::payment::requirements::PayTerms;
use crate::store::{self, Store};
use crate::tools::builtin;
use crate::tools::catalog::Catalog;

/// Everything a request needs, shared read-only across the server.
pub struct AppState {
    pub config: Config,
    pub network: Network,
    pub catalog: Catalog,
    pub store: Arc<dyn Store>,
    pub clock: SharedClock,
}

/// A bound, not yet serving, tollgate.
pub struct App {
    listener: TcpListener,
    state: Arc<AppState>,
}

impl App {
    pub async fn build(config: Config) -> anyhow::Result<App> {
        Self::build_with_clock(config, Arc::new(SystemClock)).await
    }

    /// As `build`, with an injected clock (tests move time instead of sleeping).
    pub async fn build_with_clock(config: Config, clock: SharedClock) -> anyhow::Result<App> {
        config.validate_for_serving()?;
        let network = Network::from_config(&config.network)?;
        let store = store::open(&config.database)
            .await
            .context("opening the store")?;
        let terms = PayTerms {
            network: network.clone(),
            pay_to: config.payment.pay_to.parse().context("payment.pay_to")?,
            max_timeout_seconds: config.payment.max_timeout_seconds,
        };
        let catalog = builtin_catalog(&config, &terms, clock.clone())?;
        let listener = TcpListener::bind(config.server.bind)
            .await
            .with_context(|| format!("binding {}", config.server.bind))?;
        let state = Arc::new(AppState {
            config,
            network,
            catalog,
            store,
            clock,
        });
        Ok(App { listener, state })
    }

    pub fn port(&self) -> u16 {
        self.local_addr().port()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("bound listener has an address")
    }

    pub fn state(&self) -> Arc<AppState> {
        self.state.clone()
    }

    /// Serves until `shutdown` resolves, then gives in-flight requests (and the settlements
    /// inside them) `server.shutdown_grace_secs` to finish before returning.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let cancel = CancellationToken::new();
        let grace = Duration::from_secs(self.state.config.server.shutdown_grace_secs);
        let router = crate::router::router(self.state.clone(), cancel.child_token());
        let stop = cancel.clone();
        let serve = axum::serve(
            self.listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move {
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

fn builtin_catalog(
    config: &Config,
    terms: &PayTerms,
    clock: SharedClock,
) -> anyhow::Result<Catalog> {
    let mut catalog = Catalog::default();
    for tool in builtin::all(clock) {
        let price = match config.tools.prices.get(tool.name) {
            Some(p) => UsdcAmount::parse(p)?,
            None => UsdcAmount::ZERO,
        };
        catalog.insert(
            tool.name,
            tool.description,
            tool.input_schema,
            price,
            terms,
            tool.handler,
        )?;
    }
    Ok(catalog)
}
