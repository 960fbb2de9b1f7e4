//! Smart-wallet payers (#18): an ERC-1271 wallet deployed on anvil, and an undeployed one that
//! signs with an ERC-6492 wrapper, paying through the same `exact` flow as any EOA.

use alloy::network::{EthereumWallet, TransactionBuilder};
use alloy::primitives::{Address, B256, Bytes, U256};
use alloy::providers::{Provider, ProviderBuilder};
use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::{SolCall, SolStruct, SolValue};
use serde_json::{Value, json};
use tollgate::chain::anvil::DEV_KEYS;
use tollgate::chain::parse_private_key;
use tollgate::chain::usdc::{self, TransferWithAuthorization};
use tollgate::config::secret_opt;
use tollgate::payment::wallet::ERC6492_MAGIC;

use crate::helpers::{COUNTED_PRICE, TestApp, spawn_app_with};

alloy::sol!(
    #[sol(rpc)]
    TestWalletFactory,
    "contracts-abi/TestWalletFactory.abi.json"
);

/// The test's factory, deployed on the app's chain, and a provider that can mint USDC.
struct Wallets {
    factory: Address,
    minter: alloy::providers::DynProvider,
}

impl Wallets {
    async fn deploy(app: &TestApp) -> Wallets {
        let deployer = parse_private_key(DEV_KEYS[0]).unwrap();
        let minter = ProviderBuilder::new()
            .wallet(EthereumWallet::from(deployer))
            .connect_http(app.chain.anvil.endpoint().parse().unwrap())
            .erased();
        let code = hex::decode(include_str!("../../contracts-abi/TestWalletFactory.bin").trim()).unwrap();
        let tx = alloy::rpc::types::TransactionRequest::default().with_deploy_code(Bytes::from(code));
        let receipt = minter.send_transaction(tx).await.unwrap().get_receipt().await.unwrap();
        Wallets { factory: receipt.contract_address.unwrap(), minter }
    }

    /// The address `owner`'s wallet has (or will have) for `salt`, funded with USDC.
    async fn funded(&self, app: &TestApp, owner: Address, salt: B256) -> Address {
        let factory = TestWalletFactory::new(self.factory, &self.minter);
        let wallet = factory.predict(owner, salt).call().await.unwrap();
        usdc::mint(&self.minter, app.chain.token, wallet, U256::from(10 * COUNTED_PRICE)).await.unwrap();
        wallet
    }

    async fn deploy_wallet(&self, owner: Address, salt: B256) {
        let tx = alloy::rpc::types::TransactionRequest::default()
            .with_to(self.factory)
            .with_input(self.deploy_calldata(owner, salt));
        let receipt = self.minter.send_transaction(tx).await.unwrap().get_receipt().await.unwrap();
        assert!(receipt.status());
    }

    fn deploy_calldata(&self, owner: Address, salt: B256) -> Bytes {
        TestWalletFactory::deployCall { owner, salt }.abi_encode().into()
    }
}

/// A payment from `wallet`, its EIP-712 digest signed by `key` (the wallet's owner, or not).
fn wallet_payload(app: &TestApp, requirements: &Value, wallet: Address, key: &PrivateKeySigner) -> Value {
    let requirements = serde_json::from_value(requirements.clone()).unwrap();
    let mut payload = app.sign(key, &requirements);
    let a = &mut payload["payload"]["authorization"];
    a["from"] = json!(wallet.to_checksum(None));
    let num = |v: &Value| U256::from_str_radix(v.as_str().unwrap(), 10).unwrap();
    let authorization = TransferWithAuthorization {
        from: wallet,
        to: a["to"].as_str().unwrap().parse().unwrap(),
        value: num(&a["value"]),
        validAfter: num(&a["validAfter"]),
        validBefore: num(&a["validBefore"]),
        nonce: a["nonce"].as_str().unwrap().parse().unwrap(),
    };
    let digest = authorization.eip712_signing_hash(&app.state.network.domain());
    let signature = key.sign_hash_sync(&digest).unwrap();
    payload["payload"]["signature"] = json!(format!("0x{}", hex::encode(signature.as_bytes())));
    payload
}

/// Wraps the payload's signature for an undeployed wallet (ERC-6492).
fn wrap_6492(payload: &mut Value, factory: Address, calldata: Bytes) {
    let inner: Bytes = payload["payload"]["signature"].as_str().unwrap().parse().unwrap();
    let mut wrapped = (factory, calldata, inner).abi_encode_params();
    wrapped.extend_from_slice(&ERC6492_MAGIC);
    payload["payload"]["signature"] = json!(format!("0x{}", hex::encode(wrapped)));
}

/// tollgate with the test factory deployed and on `payment.eip6492_allowed_factories`.
async fn app_allowing_the_factory() -> (TestApp, Wallets) {
    let mut app = spawn_app_with(|_| {}).await;
    let wallets = Wallets::deploy(&app).await;
    let mut config = app.state.config.clone();
    config.payment.eip6492_allowed_factories = vec![wallets.factory];
    app.replace_server(config).await;
    (app, wallets)
}

async fn requirements(app: &TestApp) -> Value {
    serde_json::to_value(app.requirements("counted", json!({})).await).unwrap()
}

#[tokio::test]
async fn a_deployed_erc1271_wallet_pays_and_is_the_payer() {
    let app = spawn_app_with(|_| {}).await;
    let wallets = Wallets::deploy(&app).await;
    let owner = PrivateKeySigner::random();
    let salt = B256::repeat_byte(1);
    let wallet = wallets.funded(&app, owner.address(), salt).await;
    wallets.deploy_wallet(owner.address(), salt).await;
    let before = app.balance(wallet).await;
    // Act
    let payload = wallet_payload(&app, &requirements(&app).await, wallet, &owner);
    let paid = app.pay("counted", json!({}), &payload).await;
    // Assert: settled through the token's ERC-1271 check; the receipt names the wallet.
    assert_eq!(paid["isError"], false, "{paid}");
    assert_eq!(before - app.balance(wallet).await, U256::from(COUNTED_PRICE));
    let receipt = &paid["_meta"]["tollgate/receipt"]["body"];
    assert_eq!(receipt["payer"].as_str().map(str::to_lowercase), Some(format!("{wallet:#x}")), "{paid}");
    assert_eq!(app.runs(), 1);
    app.shutdown().await;
}

#[tokio::test]
async fn a_counterfactual_wallet_from_an_allowed_factory_is_deployed_then_pays() {
    let (app, wallets) = app_allowing_the_factory().await;
    let owner = PrivateKeySigner::random();
    let salt = B256::repeat_byte(2);
    let wallet = wallets.funded(&app, owner.address(), salt).await;
    assert!(app.chain().provider().get_code_at(wallet).await.unwrap().is_empty(), "not deployed yet");
    // Act: the owner signs for the wallet that does not exist yet.
    let mut payload = wallet_payload(&app, &requirements(&app).await, wallet, &owner);
    wrap_6492(&mut payload, wallets.factory, wallets.deploy_calldata(owner.address(), salt));
    let paid = app.pay("counted", json!({}), &payload).await;
    // Assert: deployed, then charged once, and served.
    assert_eq!(paid["isError"], false, "{paid}");
    assert!(!app.chain().provider().get_code_at(wallet).await.unwrap().is_empty(), "deployed");
    assert_eq!(app.balance(wallet).await, U256::from(9 * COUNTED_PRICE));
    assert_eq!(app.runs(), 1);
    // The same payment again is the same call, not a second charge.
    let again = app.pay("counted", json!({}), &payload).await;
    assert_eq!(again, paid);
    assert_eq!(app.balance(wallet).await, U256::from(9 * COUNTED_PRICE));
    app.shutdown().await;
}

#[tokio::test]
async fn refused_wallet_payments_charge_nothing_and_spend_the_failure_budget() {
    let app = spawn_app_with(|c| c.limits.failed_attempts.attempts = 3).await;
    let wallets = Wallets::deploy(&app).await;
    let owner = PrivateKeySigner::random();
    let requirements = requirements(&app).await;
    let error = |r: &Value| r["structuredContent"]["error"].as_str().unwrap_or_default().to_owned();
    // A factory the operator did not allow (the list is empty): refused, and nothing deployed.
    let undeployed = wallets.funded(&app, owner.address(), B256::repeat_byte(3)).await;
    let mut payload = wallet_payload(&app, &requirements, undeployed, &owner);
    wrap_6492(&mut payload, wallets.factory, wallets.deploy_calldata(owner.address(), B256::repeat_byte(3)));
    let refused = app.pay("counted", json!({}), &payload).await;
    assert_eq!(error(&refused), "eip6492_factory_not_allowed", "{refused}");
    assert!(refused["structuredContent"]["accepts"].is_array(), "re-challenged: nothing was taken");
    assert!(app.chain().provider().get_code_at(undeployed).await.unwrap().is_empty());
    // A deployed wallet, signed by someone other than its owner: the wallet says no.
    let salt = B256::repeat_byte(4);
    let wallet = wallets.funded(&app, owner.address(), salt).await;
    wallets.deploy_wallet(owner.address(), salt).await;
    let stranger = PrivateKeySigner::random();
    let forged = app.pay("counted", json!({}), &wallet_payload(&app, &requirements, wallet, &stranger)).await;
    assert_eq!(error(&forged), "invalid_exact_evm_signature", "{forged}");
    // Garbage that no wallet and no key signed, from an address with no code.
    let mut junk = wallet_payload(&app, &requirements, Address::repeat_byte(0x77), &owner);
    junk["payload"]["signature"] = json!(format!("0x{}", "ab".repeat(97)));
    let junked = app.pay("counted", json!({}), &junk).await;
    assert_eq!(error(&junked), "invalid_exact_evm_signature", "{junked}");
    // Nothing was charged; and the client's failed-attempt budget (3) is spent, so the next
    // wallet payment is turned away before it costs an RPC call.
    assert_eq!(app.balance(wallet).await, U256::from(10 * COUNTED_PRICE));
    assert_eq!(app.balance(undeployed).await, U256::from(10 * COUNTED_PRICE));
    let turned_away =
        app.pay("counted", json!({}), &wallet_payload(&app, &requirements, wallet, &owner)).await;
    assert_eq!(turned_away["structuredContent"]["axis"], "failed_attempts", "{turned_away}");
    assert_eq!(app.runs(), 0);
    app.shutdown().await;
}

#[tokio::test]
async fn an_eoa_cannot_wrap_its_signature_to_make_the_relayer_deploy_someone_elses_wallet() {
    // Arrange: an allowed factory, and a funded EOA payer.
    let (app, wallets) = app_allowing_the_factory().await;
    let relayer =
        tollgate::chain::parse_private_key(secret_opt(&app.state.config.payment.relayer_key).unwrap())
            .unwrap();
    let payer = app.payer();
    let before = app.balance(payer.address()).await;
    let gas_before = app.chain().gas_balance(relayer.address()).await.unwrap();
    // Act: its own valid ECDSA signature, wrapped with deployment info for another wallet.
    let other = PrivateKeySigner::random().address();
    let salt = B256::repeat_byte(9);
    let target =
        TestWalletFactory::new(wallets.factory, &wallets.minter).predict(other, salt).call().await.unwrap();
    let mut payload = app.sign(&payer, &app.requirements("counted", json!({})).await);
    wrap_6492(&mut payload, wallets.factory, wallets.deploy_calldata(other, salt));
    let refused = app.pay("counted", json!({}), &payload).await;
    // Assert: refused as a signature `from` (no wallet) cannot vouch for; nothing deployed,
    // no gas spent, nothing charged.
    let error = refused["structuredContent"]["error"].as_str().unwrap_or_default();
    assert_eq!(error, "invalid_exact_evm_signature", "{refused}");
    assert!(app.chain().provider().get_code_at(target).await.unwrap().is_empty(), "nothing was deployed");
    assert_eq!(app.chain().gas_balance(relayer.address()).await.unwrap(), gas_before, "no gas spent");
    assert_eq!(app.balance(payer.address()).await, before);
    assert_eq!(app.runs(), 0);
    app.shutdown().await;
}

#[tokio::test]
async fn a_settled_wallet_payment_is_served_again_without_asking_the_chain() {
    // Arrange: tollgate reaches the chain through a relay we can cut.
    let mut app = spawn_app_with(|_| {}).await;
    let port: u16 = app.chain.anvil.endpoint().rsplit(':').next().unwrap().parse().unwrap();
    let relay = crate::helpers::Relay::start(port).await;
    let mut config = app.state.config.clone();
    config.network.rpc_url = format!("http://127.0.0.1:{}", relay.port).into();
    app.replace_server(config).await;
    let wallets = Wallets::deploy(&app).await;
    let owner = PrivateKeySigner::random();
    let salt = B256::repeat_byte(5);
    let wallet = wallets.funded(&app, owner.address(), salt).await;
    wallets.deploy_wallet(owner.address(), salt).await;
    let payload = wallet_payload(&app, &requirements(&app).await, wallet, &owner);
    let paid = app.pay("counted", json!({}), &payload).await;
    assert_eq!(paid["isError"], false, "{paid}");
    // Act: the chain becomes unreachable, and the client resends the same payment.
    relay.up.store(false, std::sync::atomic::Ordering::SeqCst);
    let through_relay = format!("http://127.0.0.1:{}", relay.port);
    let cut = tollgate::chain::client::ChainClient::connect(&through_relay, app.chain.token).unwrap();
    while cut.chain_id().await.is_ok() {}
    // Open connections through the relay close on its next 20 ms poll.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let again = app.pay("counted", json!({}), &payload).await;
    // Assert: the stored answer, not "chain unavailable, nothing was charged" (it was).
    assert_eq!(again, paid);
    assert_eq!(app.runs(), 1);
    app.shutdown().await;
}
