//! Batched settlement (#15 item 5): payments that arrive while a settlement is in flight share
//! the next transaction, each confirmed by its own logs, and one that goes bad fails alone.
//! Mining is switched off so that "in flight" lasts as long as each test needs.

use alloy::network::{EthereumWallet, TransactionBuilder};
use alloy::primitives::{Address, B256, U256};
use alloy::providers::{Provider, ProviderBuilder};
use alloy::rpc::types::TransactionRequest;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::SolEvent;
use serde_json::{Value, json};
use std::time::Duration;
use tokio::task::JoinHandle;
use tollgate::chain::anvil::DEV_KEYS;
use tollgate::chain::usdc::Usdc;
use tollgate::chain::wallets::MULTICALL3;
use tollgate::payment::wire::PaymentRequirements;

use crate::attacks::{attacker, authorization_call, pay_later, until_submitted};
use crate::audit::{checkpoint, run_audit};
use crate::helpers::{COUNTED_PRICE, TestApp, spawn_app, spawn_app_with};

/// Waits (bounded) until `n` payments wait for a round behind the transaction in flight.
async fn until_waiting(app: &TestApp, n: usize) {
    let waiting = async {
        while app.state.gate.settler.waiting() < n {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(30), waiting)
        .await
        .expect("payments waiting for a round");
}

/// tollgate whose next round waits for a lone payment in flight until it is mined (the hold
/// outlasts every test), so what the test queues behind it goes in one round however slowly
/// the machine delivers it.
async fn spawn_holding_app() -> TestApp {
    spawn_app_with(|c| c.payment.batch_hold_ms = 20_000).await
}

/// Waits (bounded) until the payment with `nonce` has its settlement transaction recorded, and
/// returns it. (Counting recorded rows is not enough: a batch records its rows one by one, and
/// the earlier transaction's row may still be counted.)
async fn until_recorded(app: &TestApp, nonce: B256) -> B256 {
    let recorded = async {
        loop {
            let rows = app.state.store.unresolved(100).await.unwrap();
            if let Some(tx) = rows.iter().find(|r| r.nonce == nonce).and_then(|r| r.tx_hash) {
                return tx;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(30), recorded).await.expect("transaction recorded")
}

/// Stops mining, then pays once and waits until that settlement is in the mempool: the
/// transaction in flight that the next payments queue behind.
async fn one_in_flight(
    app: &TestApp,
    payer: &PrivateKeySigner,
    requirements: &PaymentRequirements,
) -> JoinHandle<Value> {
    app.anvil_rpc("evm_setAutomine", json!([false])).await;
    let first = pay_signed(app, payer, requirements);
    until_submitted(app, 1).await;
    first
}

/// Pays `counted` from a task of its own with a fresh authorization signed by `payer`.
fn pay_signed(
    app: &TestApp,
    payer: &PrivateKeySigner,
    requirements: &PaymentRequirements,
) -> JoinHandle<Value> {
    pay_later(app, json!({}), &app.sign(payer, requirements))
}

fn nonce_of(payload: &Value) -> B256 {
    payload["payload"]["authorization"]["nonce"].as_str().unwrap().parse().unwrap()
}

/// A fresh payer holding `amount` of the test token.
async fn funded_payer(app: &TestApp, amount: u64) -> PrivateKeySigner {
    let payer = PrivateKeySigner::random();
    let minter = tollgate::chain::parse_private_key(DEV_KEYS[0]).unwrap();
    let provider = ProviderBuilder::new()
        .wallet(EthereumWallet::from(minter))
        .connect_http(app.chain.anvil.endpoint().parse().unwrap());
    tollgate::chain::usdc::mint(&provider, app.chain.token, payer.address(), U256::from(amount))
        .await
        .unwrap();
    payer
}

/// Puts in the mempool, ahead of anything tollgate sent (a far higher tip), a transfer of all of
/// `payer`'s tokens to a stranger, with an authorization `payer` signs for it.
async fn drain_ahead(app: &TestApp, payer: &PrivateKeySigner, requirements: &PaymentRequirements) {
    let all = app.balance(payer.address()).await;
    let mut elsewhere = requirements.clone();
    elsewhere.pay_to = Address::repeat_byte(0x5e).to_checksum(None);
    elsewhere.amount = all.to_string();
    let drain = app.sign(payer, &elsewhere);
    let tx = TransactionRequest::default()
        .with_to(app.chain.token)
        .with_input(authorization_call(&drain))
        .with_gas_limit(200_000)
        .with_max_fee_per_gas(1_000_000_000_000)
        .with_max_priority_fee_per_gas(500_000_000_000);
    let _in_mempool = attacker(app).send_transaction(tx).await.unwrap();
}

fn served(result: &Value) -> bool {
    result["isError"] == json!(false) && result["_meta"]["x402/payment-response"]["success"] == json!(true)
}

/// An answer that names no settlement: nothing was paid for it.
fn no_settlement(answer: &Value) -> bool {
    answer.get("_meta").and_then(|m| m.get("x402/payment-response")).is_none()
}

#[tokio::test]
async fn payments_that_arrive_while_one_is_in_flight_share_the_next_transaction_each_paid_by_its_own_logs() {
    // Arrange: a first payment's settlement waits in the mempool.
    let app = spawn_holding_app().await;
    let payer = app.payer();
    let pay_to: Address = app.state.config.payment.pay_to.unwrap();
    let requirements = app.requirements("counted", json!({})).await;
    let before = app.balance(payer.address()).await;
    let first = one_in_flight(&app, &payer, &requirements).await;
    let lone = app.state.store.unresolved(10).await.unwrap()[0].tx_hash.unwrap();
    // Act: four more payments by the same payer arrive meanwhile; the first is mined, then
    // the next round.
    let later: Vec<Value> = (0..4).map(|_| app.sign(&payer, &requirements)).collect();
    let calls: Vec<_> = later.iter().map(|payload| pay_later(&app, json!({}), payload)).collect();
    until_waiting(&app, 4).await;
    app.anvil_rpc("evm_mine", json!([])).await;
    let mut shared = Vec::new();
    for payload in &later {
        shared.push(Some(until_recorded(&app, nonce_of(payload)).await));
    }
    app.anvil_rpc("evm_mine", json!([])).await;
    app.anvil_rpc("evm_setAutomine", json!([true])).await;
    // Assert: every call served, charged once.
    assert!(served(&first.await.unwrap()), "the lone payment");
    for call in calls {
        let result = call.await.unwrap();
        assert!(served(&result), "{result}");
    }
    assert_eq!(app.runs(), 5);
    assert_eq!(before - app.balance(payer.address()).await, U256::from(5 * COUNTED_PRICE));
    assert_eq!(app.balance(pay_to).await, U256::from(5 * COUNTED_PRICE));
    // The lone payment went alone, as a plain token call; the four shared one Multicall3
    // transaction, which carries four paired authorization logs.
    let provider = app.chain().provider().clone();
    let lone_tx = provider.get_transaction_by_hash(lone).await.unwrap().unwrap();
    assert_eq!(alloy::consensus::Transaction::to(&lone_tx), Some(app.chain.token));
    let batch = shared[0].expect("recorded");
    assert!(shared.iter().all(|tx| *tx == Some(batch)), "one transaction for the four: {shared:?}");
    let batch_tx = provider.get_transaction_by_hash(batch).await.unwrap().unwrap();
    assert_eq!(alloy::consensus::Transaction::to(&batch_tx), Some(MULTICALL3));
    let receipt = provider.get_transaction_receipt(batch).await.unwrap().unwrap();
    let used =
        receipt.inner.logs().iter().filter(|l| l.topic0() == Some(&Usdc::AuthorizationUsed::SIGNATURE_HASH));
    assert_eq!(used.count(), 4);
    // The audit matches each of the five receipts to its own transfer.
    checkpoint(&app).await;
    let report = run_audit(&app, &app.base_url(), &app.dir.path().join("audit.json")).await;
    assert!(report.ok(), "{}", tollgate::audit::render(&report));
    assert_eq!(report.receipts.len(), 5);
    app.shutdown().await;
}

#[tokio::test]
async fn a_payer_who_empties_their_wallet_before_the_round_is_refused_alone_and_charged_nothing() {
    // Arrange: a payment in flight; an honest payment and a drainer's wait for the next round.
    let app = spawn_holding_app().await;
    let honest = app.payer();
    let drainer = funded_payer(&app, 3 * COUNTED_PRICE).await;
    let pay_to: Address = app.state.config.payment.pay_to.unwrap();
    let requirements = app.requirements("counted", json!({})).await;
    let first = one_in_flight(&app, &honest, &requirements).await;
    let second = pay_signed(&app, &honest, &requirements);
    let drained = pay_signed(&app, &drainer, &requirements);
    until_waiting(&app, 2).await;
    // Act: the drainer empties the wallet, mined with the first settlement.
    drain_ahead(&app, &drainer, &requirements).await;
    app.anvil_rpc("evm_mine", json!([])).await;
    until_submitted(&app, 1).await;
    app.anvil_rpc("evm_mine", json!([])).await;
    app.anvil_rpc("evm_setAutomine", json!([true])).await;
    // Assert: the honest payments are served; the drainer's is refused with the token's reason.
    assert!(served(&first.await.unwrap()));
    assert!(served(&second.await.unwrap()));
    let refused = drained.await.unwrap();
    assert_eq!(refused["structuredContent"]["error"], "invalid_exact_evm_insufficient_balance", "{refused}");
    assert!(no_settlement(&refused), "{refused}");
    assert_eq!(app.runs(), 2);
    assert_eq!(app.balance(pay_to).await, U256::from(2 * COUNTED_PRICE), "the drainer paid nothing to us");
    app.shutdown().await;
}

#[tokio::test]
async fn a_payment_spoiled_after_its_batch_was_simulated_fails_alone_and_says_why() {
    // Arrange: a round of two (an honest payment and a drainer's) is in the mempool.
    let app = spawn_holding_app().await;
    let honest = app.payer();
    let drainer = funded_payer(&app, 3 * COUNTED_PRICE).await;
    let pay_to: Address = app.state.config.payment.pay_to.unwrap();
    let requirements = app.requirements("counted", json!({})).await;
    let first = one_in_flight(&app, &honest, &requirements).await;
    let second = pay_signed(&app, &honest, &requirements);
    let spoiled = app.sign(&drainer, &requirements);
    let third = pay_later(&app, json!({}), &spoiled);
    until_waiting(&app, 2).await;
    app.anvil_rpc("evm_mine", json!([])).await;
    let batch = until_recorded(&app, nonce_of(&spoiled)).await;
    // Act: the drainer empties the wallet ahead of the batch, in the same block.
    drain_ahead(&app, &drainer, &requirements).await;
    app.anvil_rpc("evm_mine", json!([])).await;
    app.anvil_rpc("evm_setAutomine", json!([true])).await;
    // Assert: the batch went through; the honest payment in it is served.
    assert!(served(&first.await.unwrap()));
    let second = second.await.unwrap();
    assert!(served(&second));
    assert_eq!(second["_meta"]["x402/payment-response"]["transaction"], batch.to_string(), "one batch");
    let receipt = app.chain().provider().get_transaction_receipt(batch).await.unwrap().unwrap();
    assert!(receipt.status(), "the batch itself succeeded");
    // Tried again alone, its own simulation names the reason: nothing moved, nothing ran.
    let unpaid = third.await.unwrap();
    assert_eq!(unpaid["structuredContent"]["error"], "invalid_exact_evm_insufficient_balance", "{unpaid}");
    assert!(no_settlement(&unpaid), "{unpaid}");
    assert_eq!(app.runs(), 2);
    assert_eq!(app.balance(pay_to).await, U256::from(2 * COUNTED_PRICE));
    app.shutdown().await;
}

#[tokio::test]
async fn a_payer_whose_code_burns_the_gas_of_a_mined_batch_sinks_only_their_own_payment() {
    // Arrange: a round of three is in the mempool: first a payer who will have code (as an
    // EIP-7702 delegation gives an EOA), then two honest payments.
    let app = spawn_holding_app().await;
    let honest = app.payer();
    let burner = funded_payer(&app, 3 * COUNTED_PRICE).await;
    let pay_to: Address = app.state.config.payment.pay_to.unwrap();
    let requirements = app.requirements("counted", json!({})).await;
    let first = one_in_flight(&app, &honest, &requirements).await;
    let burnt = pay_signed(&app, &burner, &requirements);
    until_waiting(&app, 1).await;
    let others: Vec<_> = (0..2).map(|_| pay_signed(&app, &honest, &requirements)).collect();
    until_waiting(&app, 3).await;
    app.anvil_rpc("evm_mine", json!([])).await;
    until_submitted(&app, 3).await;
    // Act: before the batch is mined, the burner's address gets code that loops until it runs
    // out of gas, which the token calls to check the signature (ERC-1271) with all gas left.
    let burn_forever = "0x5b600056"; // JUMPDEST PUSH1 0 JUMP
    app.anvil_rpc("anvil_setCode", json!([burner.address(), burn_forever])).await;
    app.anvil_rpc("evm_mine", json!([])).await;
    app.anvil_rpc("evm_setAutomine", json!([true])).await;
    // Assert: the honest payments are served all the same (tried again alone); the burner's is
    // refused, charged nothing.
    assert!(served(&first.await.unwrap()));
    for call in others {
        let result = call.await.unwrap();
        assert!(served(&result), "{result}");
    }
    let refused = burnt.await.unwrap();
    assert_eq!(refused["isError"], true, "{refused}");
    assert!(no_settlement(&refused), "{refused}");
    assert_eq!(app.runs(), 3);
    assert_eq!(app.balance(pay_to).await, U256::from(3 * COUNTED_PRICE));
    assert_eq!(app.balance(burner.address()).await, U256::from(3 * COUNTED_PRICE), "the burner paid nothing");
    app.shutdown().await;
}

/// A payer funded with `amount` whose address holds `code` (runtime bytecode, hex), as an
/// EIP-7702 delegation makes it.
async fn payer_with_code(app: &TestApp, amount: u64, code: &str) -> PrivateKeySigner {
    let payer = funded_payer(app, amount).await;
    app.anvil_rpc("anvil_setCode", json!([payer.address(), code])).await;
    payer
}

/// The relayer's transactions so far (its nonce): what tollgate broadcast, mined or not.
async fn relayer_sent(app: &TestApp) -> u64 {
    let relayer = app.state.gate.settler.relayer().expect("self-relayed");
    app.chain().provider().get_transaction_count(relayer).pending().await.unwrap()
}

#[tokio::test]
async fn a_payer_whose_code_needs_more_gas_than_the_cap_is_refused_before_anything_is_broadcast() {
    // Arrange: a payer whose address holds code (an EIP-7702 delegation, say) that vouches for
    // any signature after burning ~430k gas: enough gas and the transfer succeeds, but more than
    // a plain payment's cap. A simulation ahead of time without the cap would pass it.
    let app = spawn_app().await;
    // PUSH2 0x4000; loop: JUMPDEST PUSH1 1 SWAP1 SUB DUP1 PUSH1 3 JUMPI; POP;
    // mstore(0, 0x1626ba7e << 224); return(0, 32)
    let burn_then_vouch = "0x6140005b600190038060035750631626ba7e60e01b60005260206000f3";
    let heavy = payer_with_code(&app, 3 * COUNTED_PRICE, burn_then_vouch).await;
    let requirements = app.requirements("counted", json!({})).await;
    let sent_before = relayer_sent(&app).await;
    // Act: it pays alone, with nothing in flight.
    let refused = app.pay("counted", json!({}), &app.sign(&heavy, &requirements)).await;
    // Assert: refused for the cap, uncharged, and no transaction of ours went out to revert.
    assert_eq!(refused["structuredContent"]["error"], "settlement_gas_exceeds_cap", "{refused}");
    assert!(no_settlement(&refused), "{refused}");
    assert_eq!(relayer_sent(&app).await, sent_before, "nothing broadcast");
    assert_eq!(app.runs(), 0);
    assert_eq!(app.balance(heavy.address()).await, U256::from(3 * COUNTED_PRICE));
    app.shutdown().await;
}

#[tokio::test]
async fn a_payer_whose_code_vouches_only_in_simulations_burns_no_more_of_our_gas_than_an_estimate_allows() {
    // Arrange: a payer whose code (an EIP-7702 delegation) vouches for any signature when the
    // gas price is zero, as in every simulation (`eth_call`, `eth_estimateGas`), and burns all
    // the gas it is given in a real transaction. No simulation can catch it; what it costs us is
    // the transaction's gas limit.
    let app = spawn_app().await;
    // GASPRICE; PUSH1 0x14; JUMPI; mstore(0, 0x1626ba7e << 224); return(0, 32);
    // 0x14: JUMPDEST PUSH1 0x14 JUMP (loop until out of gas)
    let vouch_only_when_free = "0x3a601457631626ba7e60e01b60005260206000f35b601456";
    let tricky = payer_with_code(&app, 3 * COUNTED_PRICE, vouch_only_when_free).await;
    let requirements = app.requirements("counted", json!({})).await;
    // Act
    let answer = app.pay("counted", json!({}), &app.sign(&tricky, &requirements)).await;
    // Assert: nothing ran, nothing moved; our transaction carried the estimate's limit, not the
    // 300k cap a simulation ahead of time would have let it take (its simulation is not trusted
    // for a payer with code).
    assert!(no_settlement(&answer), "{answer}");
    assert_eq!(app.runs(), 0);
    assert_eq!(app.balance(tricky.address()).await, U256::from(3 * COUNTED_PRICE));
    let tx: B256 =
        answer["structuredContent"]["transaction"].as_str().expect("our transaction").parse().unwrap();
    let sent = app.chain().provider().get_transaction_by_hash(tx).await.unwrap().unwrap();
    let limit = alloy::consensus::Transaction::gas_limit(&sent);
    assert!(limit < 150_000, "gas limit {limit}: the estimate's, not the cap");
    app.shutdown().await;
}

#[tokio::test]
async fn an_on_success_payment_parked_by_the_reconciler_while_it_waits_for_a_round_still_settles_once() {
    // Arrange: calls charged on success; a first payment in flight, and a second whose handler
    // has run and whose settlement waits for the next round.
    let app = spawn_app_with(|c| {
        c.payment.batch_hold_ms = 20_000;
        c.tools.charge = tollgate::config::ChargePolicy::OnSuccess;
    })
    .await;
    let payer = app.payer();
    let pay_to: Address = app.state.config.payment.pay_to.unwrap();
    let requirements = app.requirements("counted", json!({})).await;
    let first = one_in_flight(&app, &payer, &requirements).await;
    let second = app.sign(&payer, &requirements);
    let waiting = pay_later(&app, json!({}), &second);
    until_waiting(&app, 1).await;
    // Act: the wait outlasts the stale time, and the reconciler parks the waiting payment (no
    // transaction yet) as pending; then the first is mined, and the round goes.
    let stale = app.state.config.server.request_timeout_secs;
    app.clock.advance(stale + 1);
    let reconciler =
        tollgate::payment::reconcile::Reconciler::new(app.state.gate.clone(), Duration::from_secs(stale));
    assert_eq!(reconciler.tick().await.unwrap().still_pending, 2, "both parked as pending");
    app.anvil_rpc("evm_setAutomine", json!([true])).await;
    app.anvil_rpc("evm_mine", json!([])).await;
    // Assert: both are served, each ran once and was charged once; the parked payment was not
    // dropped (its payer would have been asked to pay again, and its handler run again).
    assert!(served(&first.await.unwrap()));
    let result = waiting.await.unwrap();
    assert!(served(&result), "{result}");
    assert_eq!(app.runs(), 2);
    assert_eq!(app.balance(pay_to).await, U256::from(2 * COUNTED_PRICE));
    app.shutdown().await;
}
