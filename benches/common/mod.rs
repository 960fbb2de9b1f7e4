//! What the load and settlement benches share: tollgate on a fresh dev chain, serving a priced
//! `counted` tool whose handler counts its runs, and payers funded on that chain.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use alloy::network::EthereumWallet;
use alloy::primitives::U256;
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::signers::local::PrivateKeySigner;
use rmcp::model::{CallToolResult, JsonObject};
use serde_json::json;
use tollgate::app::{App, Deps};
use tollgate::chain::anvil::DEV_KEYS;
use tollgate::chain::usdc::Usdc;
use tollgate::clock::SystemClock;
use tollgate::config::{Config, PriceSetting};
use tollgate::dev::DevChain;
use tollgate::money::UsdcAmount;
use tollgate::state::AppState;
use tollgate::tools::builtin::Builtin;
use tollgate::tools::catalog::ToolHandler;

struct Counted(Arc<AtomicUsize>);

#[async_trait::async_trait]
impl ToolHandler for Counted {
    async fn call(&self, _args: JsonObject) -> CallToolResult {
        self.0.fetch_add(1, Ordering::SeqCst);
        CallToolResult::structured(json!({ "ok": true }))
    }
}

/// A running tollgate and its chain.
pub struct Served {
    pub url: String,
    pub state: Arc<AppState>,
    pub chain: DevChain,
    /// How many times `counted` ran.
    pub runs: Arc<AtomicUsize>,
    /// The chain's minter (anvil account 0), which funds payers.
    pub minter: DynProvider,
}

/// Starts a dev chain (installing anvil when missing) and tollgate on it with `config`,
/// `counted` priced at `price`, its files in `dir`.
pub async fn serve_counted(mut config: Config, dir: &Path, price: u64) -> Served {
    config.server.bind = "127.0.0.1:0".parse().unwrap();
    config.dev.state_dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".tollgate");
    config.database.url = format!("sqlite://{}", dir.join("bench.db").display()).into();
    tollgate::chain::anvil::find_or_install(&config.dev.state_dir).await.unwrap();
    let chain = DevChain::start(&config, &dir.join("payer.key")).await.unwrap();
    chain.apply(&mut config);
    let runs = Arc::new(AtomicUsize::new(0));
    let tool = Builtin {
        name: "counted",
        description: "counts",
        input_schema: json!({ "type": "object" }),
        handler: Arc::new(Counted(runs.clone())),
    };
    let deps = Deps {
        clock: Arc::new(SystemClock),
        extra_tools: vec![(tool, PriceSetting::Fixed(UsdcAmount::from_atomic(price)))],
        config_file: None,
    };
    let app = App::build_with(config, deps).await.unwrap();
    let url = format!("http://{}/mcp", app.local_addr());
    let state = app.state();
    tokio::spawn(app.run_until(std::future::pending()));
    let minter = ProviderBuilder::new()
        .wallet(EthereumWallet::from(tollgate::chain::parse_private_key(DEV_KEYS[0]).unwrap()))
        .connect_http(chain.anvil.endpoint().parse().unwrap())
        .erased();
    Served { url, state, chain, runs, minter }
}

impl Served {
    /// `AuthorizationUsed` events on the token: one per settled payment.
    #[allow(dead_code)] // every bench compiles this module; not every one reads these
    pub async fn authorizations_used(&self) -> usize {
        use alloy::sol_types::SolEvent;
        let filter = alloy::rpc::types::Filter::new()
            .address(self.chain.token)
            .event_signature(Usdc::AuthorizationUsed::SIGNATURE_HASH)
            .from_block(0);
        self.minter.get_logs(&filter).await.unwrap().len()
    }

    /// What `payTo` holds of the token.
    #[allow(dead_code)]
    pub async fn payee_balance(&self) -> U256 {
        Usdc::new(self.chain.token, &self.minter).balanceOf(self.chain.pay_to).call().await.unwrap()
    }

    /// `n` fresh payers holding `amount` of the token each.
    pub async fn funded_payers(&self, n: usize, amount: u64) -> Vec<PrivateKeySigner> {
        let payers: Vec<PrivateKeySigner> = (0..n).map(|_| PrivateKeySigner::random()).collect();
        for p in &payers {
            tollgate::chain::usdc::mint(&self.minter, self.chain.token, p.address(), U256::from(amount))
                .await
                .unwrap();
        }
        payers
    }
}
