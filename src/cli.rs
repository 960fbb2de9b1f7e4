//! The command line: `serve`, `dev`, `keygen`, `migrate`, `print-default-config`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::app::App;
use crate::config::{Config, DEFAULT_TOML};

#[derive(Debug, Parser)]
#[command(name = "tollgate", version, about = "Sell MCP tool calls for USDC on Base, per call, over x402")]
pub struct Cli {
    /// Config file layered over the embedded defaults (env TOLLGATE_* overrides both).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve MCP over Streamable HTTP at /mcp with the configured chain, store and prices.
    Serve,
    /// Local demo: start anvil, deploy test USDC, fund a demo payer, and serve.
    Dev,
    /// Write a new ed25519 receipt signing key to a file (mode 0600).
    Keygen {
        /// Where to write the key.
        #[arg(long, default_value = "receipt-signing.key")]
        out: PathBuf,
        /// Replace an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Apply database migrations and exit.
    Migrate,
    /// Print the embedded default configuration, with every key documented.
    PrintDefaultConfig,
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::PrintDefaultConfig => {
            print!("{DEFAULT_TOML}");
        }
        Command::Keygen { out, force } => {
            let public = crate::receipt::keys::generate_to(&out, force)?;
            println!("wrote {}", out.display());
            println!("key id:     {}", crate::receipt::keys::key_id(&public));
            println!("public key: {}", hex::encode(public.as_bytes()));
        }
        Command::Migrate => {
            let config = Config::load(cli.config.as_deref())?;
            crate::telemetry::init(&config.log, false);
            crate::store::open(&config.database).await.context("migrating")?;
            println!("migrations applied");
        }
        Command::Serve => {
            let config = Config::load(cli.config.as_deref())?;
            crate::telemetry::init(&config.log, false);
            let app = App::build(config).await?;
            tracing::info!(addr = %app.local_addr(), "serving");
            app.run_until(shutdown_signal()).await?;
        }
        Command::Dev => {
            let config = Config::load(cli.config.as_deref())?;
            crate::telemetry::init(&config.log, true);
            crate::dev::run(config, shutdown_signal()).await?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Ctrl-C or SIGTERM (what container runtimes send).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}
