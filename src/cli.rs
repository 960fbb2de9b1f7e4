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
    /// Call a tool on any x402 MCP server, paying if asked (within spend caps).
    Call(CallArgs),
    /// Audit a server as a wallet-holder: receipts, log and chain, both ways.
    Audit(AuditArgs),
    /// Offline receipt tools.
    #[command(subcommand)]
    Receipts(ReceiptsCommand),
    /// Print the MCP registry server.json and the x402 discovery entry for this server.
    Listing,
    /// Local chains only: deploy the test USDC with anvil's first dev account and fund a payer.
    DeployTestToken {
        #[arg(long)]
        rpc: String,
        #[arg(long, default_value = "USD Coin")]
        name: String,
        #[arg(long, default_value = "2")]
        version: String,
        /// Mint test USDC to this address.
        #[arg(long)]
        mint_to: Option<String>,
        /// Atomic units to mint (default 100 USDC).
        #[arg(long, default_value = "100000000")]
        amount: String,
    },
    /// Apply database migrations and exit.
    Migrate,
    /// Preflight before going live: chain id, the token's EIP-712 domain, payTo, relayer gas,
    /// the facilitator's /supported and credentials, migrations, Redis. Exits 1 on any failure.
    Doctor {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the embedded default configuration, with every key documented.
    PrintDefaultConfig,
}

#[derive(Debug, clap::Args)]
pub struct CallArgs {
    /// The server's MCP endpoint, e.g. http://127.0.0.1:8402/mcp
    #[arg(long)]
    pub url: String,
    /// Tool name.
    #[arg(long)]
    pub tool: String,
    /// Tool arguments as a JSON object.
    #[arg(long, default_value = "{}")]
    pub args: String,
    /// File with the payer's hex private key (else env TOLLGATE_PAYER_KEY).
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// Largest price to pay for this call, in USDC atomic units (default 0.10 USDC).
    #[arg(long, default_value = "100000")]
    pub max_amount: String,
    /// Optional cap on the total spent across calls, in atomic units, tracked in --spend-file.
    #[arg(long)]
    pub total_cap: Option<String>,
    /// Where the running total for --total-cap is kept.
    #[arg(long, default_value = ".tollgate/spend.json")]
    pub spend_file: PathBuf,
    /// Also pay with this token (NETWORK:ADDRESS, e.g. eip155:31337:0x…). USDC on Base and
    /// Base Sepolia is always allowed.
    #[arg(long = "allow-asset", value_name = "NETWORK:ADDRESS")]
    pub allow_asset: Vec<String>,
    /// How long to keep resending the same payment while its settlement is pending.
    #[arg(long, default_value = "60")]
    pub pending_patience_secs: u64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct AuditArgs {
    /// The wallet whose receipts are audited (must match the key).
    #[arg(long)]
    pub wallet: String,
    /// The server's base URL, e.g. http://127.0.0.1:8402
    #[arg(long)]
    pub server: String,
    /// A JSON-RPC endpoint of the chain, to reconcile with on-chain transfers.
    #[arg(long)]
    pub rpc: String,
    /// File with the wallet's hex private key, to prove the receipts are yours (else env
    /// TOLLGATE_PAYER_KEY). It signs a short-lived challenge only.
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Where the checkpoint of the previous audit is kept (default under .tollgate/audit/).
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// A payTo address the wallet paid (repeatable). Transfers to it are reconciled even if no
    /// receipt or listing names it; the payTo of every receipt always is.
    #[arg(long, value_name = "ADDRESS")]
    pub pay_to: Vec<String>,
    /// A token the wallet paid with (repeatable), besides those its receipts name.
    #[arg(long, value_name = "ADDRESS")]
    pub asset: Vec<String>,
    /// Seconds a receipt may stay out of the log's signed checkpoint before the audit fails.
    #[arg(long, value_name = "SECS", default_value_t = crate::audit::DEFAULT_CHECKPOINT_GRACE_SECS)]
    pub checkpoint_grace_secs: u64,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum ReceiptsCommand {
    /// Verify one receipt offline: a JSON file with `body` and `signature` (the value of
    /// `_meta["tollgate/receipt"]`, or a whole tool result carrying it).
    Verify {
        file: PathBuf,
        /// The server's receipt public key, hex (from /.well-known/x402).
        #[arg(long)]
        public_key: String,
    },
}

/// The async runtime's worker threads for this command: for the server, its setting (read
/// before the runtime exists; a config that does not load gets the default, and `run` reports
/// why); for the other commands, the default.
pub fn worker_threads(cli: &Cli) -> usize {
    let default = crate::config::ServerConfig::default_workers;
    match cli.command {
        Command::Serve | Command::Dev => {
            Config::load(cli.config.as_deref()).map_or_else(|_| default(), |c| c.server.workers())
        }
        _ => default(),
    }
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Audit(args) => return audit(args).await,
        Command::Receipts(ReceiptsCommand::Verify { file, public_key }) => {
            return verify_receipt(&file, &public_key);
        }
        Command::Call(args) => return call(args).await,
        Command::PrintDefaultConfig => {
            print!("{DEFAULT_TOML}");
        }
        Command::Keygen { out, force } => {
            let public = crate::receipt::keys::generate_to(&out, force)?;
            println!("wrote {}", out.display());
            println!("key id:     {}", crate::receipt::keys::key_id(&public));
            println!("public key: {}", hex::encode(public.as_bytes()));
        }
        Command::Listing => {
            // Public config only: the catalog (with upstream tools), payTo, network, public URL
            // and the receipt public keys; no relayer key, store or chain.
            let config = Config::load(cli.config.as_deref())?;
            let (network, catalog) = crate::app::public_catalog(&config).await?;
            let receipt_keys = crate::receipt::ReceiptSigner::public_keys(&config.receipts)?;
            let input = crate::listing::ListingInput {
                config: &config,
                network: &network,
                catalog: &catalog,
                receipt_keys,
            };
            let now = crate::clock::Clock::now_unix(&crate::clock::SystemClock);
            println!("{}", serde_json::to_string_pretty(&crate::listing::documents(&input, now))?);
        }
        Command::DeployTestToken { rpc, name, version, mint_to, amount } => {
            use alloy::providers::ProviderBuilder;
            let deployer = crate::chain::parse_private_key(crate::chain::anvil::DEV_KEYS[0])?;
            let provider = ProviderBuilder::new()
                .wallet(alloy::network::EthereumWallet::from(deployer))
                .connect_http(rpc.parse().context("--rpc")?);
            let token = crate::chain::usdc::deploy_test_usdc(&provider, &name, &version).await?;
            if let Some(to) = mint_to {
                let amount = crate::money::UsdcAmount::parse(&amount)?;
                crate::chain::usdc::mint(&provider, token, to.parse().context("--mint-to")?, amount.into())
                    .await?;
            }
            println!("{token}");
        }
        Command::Doctor { json } => {
            let config = Config::load(cli.config.as_deref())?;
            let report = crate::doctor::run(&config).await;
            match json {
                true => println!("{}", serde_json::to_string(&report)?),
                false => print!("{}", report.render()),
            }
            if !report.ok {
                std::process::exit(1);
            }
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
            let config_workers = config.server.workers();
            let deps = crate::app::Deps { config_file: cli.config.clone(), ..Default::default() };
            let app = App::build_with(config, deps).await?;
            tracing::info!(addr = %app.local_addr(), workers = config_workers, "serving");
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

/// `tollgate call`: exit 0 on a result, 1 on a tool error or refusal, 3 while a payment's outcome
/// is still unknown (pending, in progress, or unanswered).
async fn call(a: CallArgs) -> anyhow::Result<ExitCode> {
    use crate::client::caps::{AllowedAsset, SpendCaps};
    use crate::money::UsdcAmount;

    let key = match &a.key_file {
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
        None => std::env::var("TOLLGATE_PAYER_KEY").context("pass --key-file or set TOLLGATE_PAYER_KEY")?,
    };
    let signer = crate::chain::parse_private_key(&key)?;
    let mut allowed_assets = AllowedAsset::defaults();
    for asset in &a.allow_asset {
        allowed_assets.push(AllowedAsset::parse(asset).map_err(anyhow::Error::msg)?);
    }
    let total_cap = match &a.total_cap {
        Some(cap) => Some((UsdcAmount::parse(cap).context("--total-cap")?, a.spend_file.clone())),
        None => None,
    };
    let caps = SpendCaps {
        allowed_assets,
        max_per_call: UsdcAmount::parse(&a.max_amount).context("--max-amount")?,
        total_cap,
    };
    let args: serde_json::Value = serde_json::from_str(&a.args).context("--args must be a JSON object")?;
    let outcome = crate::client::call(crate::client::CallRequest {
        url: &a.url,
        tool: &a.tool,
        args,
        signer: &signer,
        caps: &caps,
        pending_patience: std::time::Duration::from_secs(a.pending_patience_secs),
    })
    .await?;
    let result = &outcome.result;
    let status = result.pointer("/structuredContent/error").and_then(|e| e.as_str()).unwrap_or_default();
    let code = match (result.get("isError").and_then(|e| e.as_bool()), status) {
        // Paid but its outcome not yet known: the same payment must be resent, never a new one.
        (Some(true), _)
            if outcome.paid.is_some()
                && outcome.payment_response.is_none()
                && !crate::client::proves_uncharged(result) =>
        {
            3
        }
        (Some(true), _) => 1,
        _ => 0,
    };
    if a.json {
        let paid = outcome.paid.as_ref().map(|(amount, r)| {
            serde_json::json!({ "amount": amount.to_string(), "asset": r.asset, "network": r.network, "payTo": r.pay_to })
        });
        let out = serde_json::json!({ "result": result, "paymentResponse": outcome.payment_response, "paid": paid });
        println!("{out}");
    } else {
        let shown = result.get("structuredContent").cloned().unwrap_or_else(|| result["content"].clone());
        println!("result: {}", serde_json::to_string_pretty(&shown)?);
        if let Some((amount, r)) = &outcome.paid {
            println!("offered: {} ({amount} atomic) to {} on {}", amount.display_usdc(), r.pay_to, r.network);
        }
        if let Some(response) = &outcome.payment_response {
            println!("payment-response: {response}");
        }
    }
    Ok(ExitCode::from(code))
}

fn read_key(file: Option<&PathBuf>) -> anyhow::Result<alloy::signers::local::PrivateKeySigner> {
    let key = match file {
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
        None => std::env::var("TOLLGATE_PAYER_KEY").context("pass --key FILE or set TOLLGATE_PAYER_KEY")?,
    };
    Ok(crate::chain::parse_private_key(&key)?)
}

/// `tollgate audit`: exit 0 when everything checks out, 1 on any mismatch.
async fn audit(a: AuditArgs) -> anyhow::Result<ExitCode> {
    use alloy::primitives::Address;

    let signer = read_key(a.key.as_ref())?;
    let wallet: Address = a.wallet.parse().context("--wallet")?;
    anyhow::ensure!(signer.address() == wallet, "the key is not the key of --wallet {wallet}");
    let state_file = a.state.unwrap_or_else(|| {
        let server = hex::encode(&<sha2::Sha256 as sha2::Digest>::digest(a.server.as_bytes())[..8]);
        PathBuf::from(format!(".tollgate/audit/{server}-{wallet:#x}.json"))
    });
    let addresses = |flag: &str, values: &[String]| -> anyhow::Result<Vec<Address>> {
        values.iter().map(|v| v.parse::<Address>().with_context(|| format!("{flag} {v}"))).collect()
    };
    let options = crate::audit::AuditOptions {
        pay_to: addresses("--pay-to", &a.pay_to)?,
        assets: addresses("--asset", &a.asset)?,
        checkpoint_grace_secs: a.checkpoint_grace_secs,
        ..Default::default()
    };
    let request = crate::audit::AuditRequest { wallet: &signer, server: &a.server, rpc: &a.rpc, state_file };
    let report = crate::audit::audit_with(&request, &options).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", crate::audit::render(&report));
    }
    Ok(if report.ok() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// `tollgate receipts verify`: exit 0 for a valid signature, 1 otherwise.
fn verify_receipt(file: &std::path::Path, public_key: &str) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let value: serde_json::Value = serde_json::from_str(&text).context("not JSON")?;
    let value = value.pointer("/_meta/tollgate~1receipt").cloned().unwrap_or(value);
    let receipt: crate::receipt::SignedReceipt =
        serde_json::from_value(value).context("not a tollgate receipt")?;
    let key =
        crate::receipt::keys::parse_public(public_key).context("--public-key is not a hex ed25519 key")?;
    let b = &receipt.body;
    println!(
        "receipt #{} of {} (log index {}): {} for {} atomic units, tx {}",
        b.payer_seq, b.payer, b.log_index, b.tool, b.amount, b.tx
    );
    if crate::receipt::keys::key_id(&key) != b.kid {
        println!(
            "INVALID: signed by key {}, not by the key given ({})",
            b.kid,
            crate::receipt::keys::key_id(&key)
        );
        return Ok(ExitCode::FAILURE);
    }
    if receipt.verify(&key) {
        println!("valid: signature by {} over the canonical body", b.kid);
        Ok(ExitCode::SUCCESS)
    } else {
        println!("INVALID: the signature does not match the body (it was altered or forged)");
        Ok(ExitCode::FAILURE)
    }
}
