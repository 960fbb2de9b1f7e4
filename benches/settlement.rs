//! Settlement that scales (prints figures; not a test): one tollgate on anvil mining a block every
//! 2 seconds, paid by many concurrent payers, run twice in one process: batched (payments that
//! arrive while a settlement is in flight share the next Multicall3 transaction) and one
//! transaction per payment (`payment.batch_max = 1`). For each it prints the paid calls settled
//! per block, the relayer's gas per paid call, and what that gas costs in USDC at a stated gas
//! price; then checks every paid answer has exactly one transfer and one receipt.
//!
//! Run: `cargo bench --bench settlement` (SETTLE_PAYERS, default 500; SETTLE_ROUNDS, default 3).

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use alloy::providers::Provider;
use alloy::sol_types::SolEvent;
use serde_json::{Value, json};
use tollgate::chain::usdc::Usdc;
use tollgate::client::sign::{SignParams, sign_payment};
use tollgate::clock::{Clock, SystemClock};
use tollgate::config::Config;
use tollgate::payment::wire::PaymentRequirements;

const PRICE: u64 = 1000;
const BLOCK_SECS: u64 = 2;
/// The stated price the USDC cost is computed at: 0.01 gwei per gas (Base's execution gas price
/// is usually below it) and 3,000 USDC per ETH. L2 execution only: Base adds an L1 data fee
/// for the calldata, which batching does not reduce per payment.
const GAS_PRICE_WEI: u128 = 10_000_000;
const USDC_PER_ETH: u128 = 3_000;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// What one mode measured.
struct Figures {
    paid: usize,
    blocks: Vec<(u64, usize)>,
    gas: u128,
    relayer_txs: usize,
    seconds: f64,
    holds: bool,
}

async fn run(batch_max: usize, payers: usize, rounds: usize) -> Figures {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::load(None).unwrap();
    config.receipts.key = "44".repeat(32).into();
    config.payment.batch_max = batch_max;
    // Every payer comes from one loopback address: the ceiling and limits are not measured here.
    config.limits.rules.clear();
    config.ceiling.burst = 1_000_000;
    config.ceiling.per_second = 1_000_000;
    let served = common::serve_counted(config, dir.path(), PRICE).await;
    // Payers funded while anvil still mines every transaction at once; then a block every 2 s.
    let signers = served.funded_payers(payers, PRICE * rounds as u64).await;
    let common::Served { url, state, chain, runs, minter: provider } = served;
    let relayer = tollgate::chain::parse_private_key(chain.relayer_key).unwrap().address();
    let http = reqwest::Client::new();
    let call = |meta: Option<Value>| {
        let mut params = json!({ "name": "counted", "arguments": {} });
        if let Some(meta) = meta {
            params["_meta"] = meta;
        }
        json!({ "jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params })
    };
    let challenge: Value = http
        .post(&url)
        .header("accept", "application/json, text/event-stream")
        .json(&call(None))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let requirements: PaymentRequirements =
        serde_json::from_value(challenge["result"]["structuredContent"]["accepts"][0].clone()).unwrap();
    let first_block = provider.get_block_number().await.unwrap() + 1;
    let interval =
        json!({ "jsonrpc": "2.0", "id": 1, "method": "evm_setIntervalMining", "params": [BLOCK_SECS] });
    http.post(chain.anvil.endpoint()).json(&interval).send().await.unwrap();

    // Every payer pays `rounds` times, each call after the last one's answer.
    let started = Instant::now();
    let workers: Vec<_> = signers
        .into_iter()
        .map(|payer| {
            let (http, url, req, call) = (http.clone(), url.clone(), requirements.clone(), call);
            tokio::spawn(async move {
                let mut paid = 0;
                for _ in 0..rounds {
                    let params = SignParams::standard(SystemClock.now_unix(), req.max_timeout_seconds);
                    let payload = sign_payment(&payer, &req, None, &params).unwrap();
                    let answer: Value = match http
                        .post(&url)
                        .header("accept", "application/json, text/event-stream")
                        .json(&call(Some(json!({ "x402/payment": payload }))))
                        .send()
                        .await
                    {
                        Ok(r) => r.json().await.unwrap_or(Value::Null),
                        Err(_) => Value::Null,
                    };
                    if answer["result"]["isError"] == json!(false) {
                        paid += 1;
                    }
                }
                paid
            })
        })
        .collect();
    let mut paid = 0;
    for w in workers {
        paid += w.await.unwrap();
    }
    let seconds = started.elapsed().as_secs_f64();

    // Per block: payments settled (AuthorizationUsed logs) and the relayer's gas.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let head = provider.get_block_number().await.unwrap();
    let (mut blocks, mut gas, mut relayer_txs, mut transfers) = (Vec::new(), 0u128, 0, 0);
    for number in first_block..=head {
        let receipts = provider.get_block_receipts(number.into()).await.unwrap().unwrap_or_default();
        let mut settled = 0;
        for r in receipts.iter().filter(|r| r.from == relayer) {
            relayer_txs += 1;
            gas += r.gas_used as u128;
            settled += r
                .inner
                .logs()
                .iter()
                .filter(|l| l.topic0() == Some(&Usdc::AuthorizationUsed::SIGNATURE_HASH))
                .count();
        }
        if settled > 0 {
            blocks.push((number, settled));
        }
        transfers += settled;
    }
    let receipts = state.store.receipt_count().await.unwrap() as usize;
    let handler_runs = runs.load(Ordering::SeqCst);
    let holds = transfers == paid && receipts == paid && handler_runs == paid && paid == payers * rounds;
    if !holds {
        println!(
            "settlement: batch_max {batch_max}: transfers {transfers} receipts {receipts} runs {handler_runs} paid answers {paid} of {}",
            payers * rounds
        );
    }
    chain.anvil.stop().await;
    Figures { paid, blocks, gas, relayer_txs, seconds, holds }
}

/// Atomic USDC (6 decimals) that `gas` costs at the stated price, in integers.
fn usdc_atomic(gas: u128) -> u128 {
    gas * GAS_PRICE_WEI * USDC_PER_ETH * 1_000_000 / 1_000_000_000_000_000_000
}

fn report(label: &str, f: &Figures) -> u128 {
    let settled: Vec<usize> = f.blocks.iter().map(|b| b.1).collect();
    let busiest = settled.iter().max().copied().unwrap_or(0);
    let mean = settled.iter().sum::<usize>() as f64 / settled.len().max(1) as f64;
    let per_call = f.gas / f.paid.max(1) as u128;
    println!(
        "settlement: {label:<26} {:>5} paid calls in {:>5.1} s | {:>3} blocks with settlements, per block: busiest {:>4}, mean {:>6.1} | {:>4} relayer txs | gas per paid call {:>6} = {} atomic USDC",
        f.paid,
        f.seconds,
        settled.len(),
        busiest,
        mean,
        f.relayer_txs,
        per_call,
        usdc_atomic(per_call),
    );
    per_call
}

#[tokio::main]
async fn main() {
    let payers = env("SETTLE_PAYERS", 500);
    let rounds = env("SETTLE_ROUNDS", 3);
    println!(
        "settlement: {payers} concurrent payers x {rounds} paid calls each, anvil --block-time {BLOCK_SECS}; cost at {} gwei and {USDC_PER_ETH} USDC/ETH (L2 execution gas)",
        GAS_PRICE_WEI as f64 / 1e9
    );
    let batched = run(200, payers, rounds).await;
    let single = run(1, payers, rounds).await;
    let per_batched = report("batched (batch_max 200)", &batched);
    let per_single = report("one tx per payment", &single);
    println!(
        "settlement: batched gas per paid call = {:.2}x one-per-payment; busiest block {} vs {} payments",
        per_batched as f64 / per_single.max(1) as f64,
        batched.blocks.iter().map(|b| b.1).max().unwrap_or(0),
        single.blocks.iter().map(|b| b.1).max().unwrap_or(0),
    );
    let holds = batched.holds && single.holds;
    println!(
        "settlement: transfers = receipts = handler runs = paid answers {}",
        if holds { "HOLD" } else { "VIOLATED" }
    );
    if !holds {
        std::process::exit(1);
    }
}
