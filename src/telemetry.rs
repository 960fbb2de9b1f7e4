//! Logging: pretty for people (`dev`), JSON for machines (`serve`).

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Targets whose debug output would carry credentials (full URLs).
const QUIET_TARGETS: [&str; 4] =
    ["alloy_transport_http=warn", "alloy_transport=warn", "reqwest=warn", "alloy_rpc_client=warn"];

/// Installs the global subscriber once; later calls (tests) are no-ops. `dev` logs are for a
/// person: pretty, and without rmcp's INFO line per request unless RUST_LOG asks for it.
pub fn init(config: &LogConfig, dev: bool) {
    let from_env = EnvFilter::try_from_default_env().ok();
    let quiet_rmcp = dev && from_env.is_none();
    let mut filter = from_env.unwrap_or_else(|| EnvFilter::new(&config.filter));
    if quiet_rmcp {
        filter = filter.add_directive("rmcp=warn".parse().expect("static directive"));
    }
    // Below WARN these libraries record whole request URLs, and an RPC or facilitator URL
    // carries its API key: capped whatever RUST_LOG asks (added last, so they win).
    for quiet in QUIET_TARGETS {
        filter = filter.add_directive(quiet.parse().expect("static directive"));
    }
    let json = match config.format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !dev,
    };
    // Every line is redacted on its way out: libraries log errors (and whole URLs) on their
    // own, at levels no filter here can be sure to cover.
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(crate::redact::RedactingStderr);
    let _ = if json { builder.json().flatten_event(true).try_init() } else { builder.compact().try_init() };
}

/// The process-wide Prometheus recorder, installed on first use (tests build many apps).
pub fn metrics() -> metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (an embedding program); ours still renders.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}
