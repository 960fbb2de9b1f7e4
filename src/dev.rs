//! `tollgate dev`: a complete local deployment in one command.
//!
//! Starts anvil (installing it if needed), deploys the test USDC with the configured EIP-712
//! domain, funds a demo payer, and serves with anvil accounts as relayer and payee and a fresh
//! SQLite file. The demo payer's key is written to a 0600 file, never printed.

use std::future::Future;
use std::path::{Path, PathBuf};

use alloy::network::EthereumWallet;
use alloy::network::TransactionBuilder;
use alloy::primitives::{Address, Bytes};
use alloy::providers::{Provider, ProviderBuilder};
use alloy::rpc::types::TransactionRequest;
use alloy::signers::local::PrivateKeySigner;
use anyhow::Context;
use secrecy::SecretString;

use crate::app::App;
use crate::chain::anvil::{self, Anvil, DEV_KEYS};
use crate::chain::{parse_private_key, usdc};
use crate::config::{Config, NetworkPreset};

/// anvil's chain id.
pub const ANVIL_CHAIN_ID: u64 = 31337;

/// A running local chain with the test token deployed and the demo payer funded.
pub struct DevChain {
    pub anvil: Anvil,
    pub token: Address,
    pub relayer_key: &'static str,
    pub pay_to: Address,
    pub payer: Address,
    pub payer_key_file: PathBuf,
}

impl DevChain {
    /// Starts anvil and prepares the token and wallets; the demo payer's key lives in
    /// `payer_key_file` (created on first use).
    pub async fn start(config: &Config, payer_key_file: &Path) -> anyhow::Result<DevChain> {
        let state_dir = &config.dev.state_dir;
        let binary = anvil::find_or_install(state_dir).await?;
        let anvil = Anvil::start(&binary, config.dev.anvil_port, &[]).await?;
        let deployer = parse_private_key(DEV_KEYS[0])?;
        let provider = ProviderBuilder::new()
            .wallet(EthereumWallet::from(deployer))
            .connect_http(anvil.endpoint().parse()?);
        let n = &config.network;
        let token = usdc::deploy_test_usdc(&provider, &n.eip712_name, &n.eip712_version).await?;
        install_multicall3(&provider).await.context("placing Multicall3")?;
        let payer = load_or_create_key(payer_key_file)?.address();
        let funding = config.dev.demo_payer_funding;
        usdc::mint(&provider, token, payer, funding.into()).await?;
        Ok(DevChain {
            anvil,
            token,
            relayer_key: DEV_KEYS[1],
            pay_to: parse_private_key(DEV_KEYS[2])?.address(),
            payer,
            payer_key_file: payer_key_file.to_owned(),
        })
    }

    /// The config a server on this chain needs: RPC, token, payee, relayer.
    pub fn apply(&self, config: &mut Config) {
        config.network.preset = NetworkPreset::Local;
        config.network.chain_id = ANVIL_CHAIN_ID;
        config.network.rpc_url = SecretString::from(self.anvil.endpoint());
        config.network.asset = Some(self.token);
        config.payment.pay_to = Some(self.pay_to);
        config.payment.relayer_key = SecretString::from(self.relayer_key.to_owned());
    }
}

/// Places Multicall3 at its canonical address, as on Base: smart-wallet payments that deploy
/// their wallet are simulated through it. Deployed normally, then its code copied there.
async fn install_multicall3<P: Provider>(provider: &P) -> anyhow::Result<()> {
    let code = hex::decode(include_str!("../contracts-abi/Multicall3.bin").trim())?;
    let tx = TransactionRequest::default().with_deploy_code(Bytes::from(code));
    let receipt = provider.send_transaction(tx).await?.get_receipt().await?;
    let deployed = receipt.contract_address.context("Multicall3 deployment has no address")?;
    let runtime = provider.get_code_at(deployed).await?;
    let _: serde_json::Value =
        provider.raw_request("anvil_setCode".into(), (crate::chain::wallets::MULTICALL3, runtime)).await?;
    Ok(())
}

/// Runs the demo until `shutdown`; anvil stops with it.
pub async fn run(
    mut config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let payer_key_file = config.dev.state_dir.join("dev/payer.key");
    let chain = DevChain::start(&config, &payer_key_file).await.context("starting the local chain")?;
    chain.apply(&mut config);
    if crate::config::secret_opt(&config.database.url) == Some("sqlite://tollgate.db") {
        // The chain is new on every run, so the payments of an old run would not match it.
        let db = config.dev.state_dir.join("dev/tollgate.db");
        remove_sqlite(&db);
        config.database.url = SecretString::from(format!("sqlite://{}", db.display()));
    }
    if crate::config::secret_opt(&config.receipts.key).is_none() {
        // The demo signs receipts with a key kept beside its payer key (created once).
        let path = config.dev.state_dir.join("dev/receipt.key");
        if !path.exists() {
            crate::receipt::keys::generate_to(&path, false)?;
        }
        let seed = std::fs::read_to_string(&path)?;
        config.receipts.key = SecretString::from(seed.trim().to_owned());
    }
    config.validate()?;
    let app = App::build(config).await?;
    let url = format!("http://{}/mcp", app.local_addr());
    let state = app.state();
    println!("tollgate dev: serving {url}");
    println!("  chain       anvil at {} (chain id {ANVIL_CHAIN_ID})", chain.anvil.endpoint());
    println!(
        "  USDC        {} (EIP-712 \"{}\" v{})",
        chain.token, state.network.eip712_name, state.network.eip712_version
    );
    println!("  payTo       {}", chain.pay_to);
    println!(
        "  demo payer  {} funded with {} (key in {})",
        chain.payer,
        state.config.dev.demo_payer_funding.display_usdc(),
        chain.payer_key_file.display()
    );
    for entry in state.catalog.current().entries() {
        let price = entry.quote.as_ref().map_or("free".to_owned(), |q| q.amount.display_usdc());
        println!("  tool        {:<18} {price}", entry.tool.name);
    }
    let exe = std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_else(|_| "tollgate".into());
    println!("Make a paid call (the demo payer signs; USDC moves on the local chain):");
    println!(
        "  {exe} call --url {url} --tool sha256 --args '{{\"text\":\"hello\"}}' --key-file {} --allow-asset {}:{}",
        chain.payer_key_file.display(),
        state.network.caip2,
        chain.token
    );
    println!("Ctrl-C stops the server and the chain.");
    app.run_until(shutdown).await?;
    chain.anvil.stop().await;
    Ok(())
}

fn remove_sqlite(db: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
}

/// The demo payer keeps its key across runs so the printed command stays the same.
fn load_or_create_key(path: &Path) -> anyhow::Result<PrivateKeySigner> {
    if let Ok(text) = std::fs::read_to_string(path) {
        return parse_private_key(&text).with_context(|| format!("{} is not a private key", path.display()));
    }
    let signer = PrivateKeySigner::random();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    use std::io::Write;
    let mut file = options.open(path).with_context(|| format!("creating {}", path.display()))?;
    writeln!(file, "0x{}", hex::encode(signer.to_bytes()))?;
    Ok(signer)
}
