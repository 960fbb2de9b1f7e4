//! Prices operators need (#16, items 1, 2 and 4): a price computed from the arguments, and
//! price changes that honour the offers already made — on a real anvil chain and store, with
//! balances checked.

use std::path::Path;

use alloy::primitives::U256;
use serde_json::{Value, json};
use tollgate::config::{Config, PriceRule, PriceSetting};
use tollgate::money::UsdcAmount;

use crate::helpers::{TestApp, pg_behind_relay, spawn_app_reading, spawn_app_with};

const EXPRESSION: &str = "1000 + 2 * size(args.text)";

fn priced_by_expression(c: &mut Config, expression: &str, max: u64) {
    let rule = PriceRule {
        price: expression.into(),
        min_price: None,
        max_price: Some(UsdcAmount::from_atomic(max)),
        charge: None,
        refund_on_error: false,
    };
    c.tools.prices.insert("sha256".into(), PriceSetting::Rule(rule));
}

async fn receipt_count(app: &TestApp) -> i64 {
    app.state.store.receipt_count().await.unwrap()
}

#[tokio::test]
async fn a_price_computed_from_the_arguments_is_quoted_listed_charged_and_receipted() {
    // Arrange
    let app = spawn_app_with(|c| priced_by_expression(c, EXPRESSION, 100_000)).await;
    let payer = app.payer();
    let before = app.balance(payer.address()).await;
    // Act
    let requirements = app.requirements("sha256", json!({ "text": "hello" })).await;
    let tools = app.sessionless().list_tools().await;
    let listing: Value =
        reqwest::get(format!("{}/.well-known/x402", app.base_url())).await.unwrap().json().await.unwrap();
    let paid = app.pay("sha256", json!({ "text": "hello" }), &app.sign(&payer, &requirements)).await;
    // Assert: the challenge carries the amount for these arguments (1000 + 2 × 5).
    assert_eq!(requirements.amount, "1010");
    // tools/list and /.well-known/x402 show the expression and its bounds.
    let listed = &tools.iter().find(|t| t["name"] == "sha256").unwrap()["_meta"]["x402/price"];
    assert_eq!(listed["expression"], EXPRESSION);
    assert_eq!((&listed["minAmount"], &listed["maxAmount"]), (&json!("1"), &json!("100000")));
    assert_eq!(listed["charge"], "before_run");
    let known = listing["tools"].as_array().unwrap().iter().find(|t| t["name"] == "sha256").unwrap();
    assert_eq!(known["price"]["expression"], EXPRESSION);
    // Charged exactly the computed price, and the receipt says how it was reached.
    assert_ne!(paid["isError"], true, "{paid}");
    assert_eq!(before - app.balance(payer.address()).await, U256::from(1010));
    let body = &paid["_meta"]["tollgate/receipt"]["body"];
    assert_eq!(body["amount"], "1010");
    assert_eq!(body["charge"], "before_run");
    assert_eq!(body["price"]["basis"], "expression");
    assert_eq!(body["price"]["expression"], EXPRESSION);
    assert_eq!(body["price"]["inputs_sha256"], body["args_sha256"], "the inputs the expression saw");
    app.shutdown().await;
}

#[tokio::test]
async fn a_payment_signed_for_cheap_arguments_cannot_pay_for_expensive_ones() {
    // Arrange: a payment signed against the challenge for a one-letter text (1002).
    let app = spawn_app_with(|c| priced_by_expression(c, EXPRESSION, 100_000)).await;
    let payer = app.payer();
    let cheap = app.requirements("sha256", json!({ "text": "a" })).await;
    let payload = app.sign(&payer, &cheap);
    let before = app.balance(payer.address()).await;
    // Act: the same payment for a 2,000-letter text (5000).
    let expensive = app.pay("sha256", json!({ "text": "x".repeat(2000) }), &payload).await;
    // Assert: refused with a fresh challenge at the right price, nothing charged.
    let refusal = &expensive["structuredContent"];
    assert_eq!(refusal["error"], "invalid_payment_requirements", "{expensive}");
    assert_eq!(refusal["accepts"][0]["amount"], "5000");
    assert_eq!(app.balance(payer.address()).await, before);
    assert_eq!(receipt_count(&app).await, 0);
    // The payment still buys the call it was signed for.
    let honest = app.pay("sha256", json!({ "text": "a" }), &payload).await;
    assert_eq!(honest["_meta"]["x402/payment-response"]["success"], true, "{honest}");
    assert_eq!(before - app.balance(payer.address()).await, U256::from(1002));
    app.shutdown().await;
}

#[tokio::test]
async fn a_price_expression_that_fails_for_these_arguments_refuses_the_call_uncharged() {
    // Arrange: the expression divides by zero for a three-letter text.
    let app = spawn_app_with(|c| priced_by_expression(c, "1000 / (size(args.text) - 3)", 10_000)).await;
    let payer = app.payer();
    let payload = app.sign(&payer, &app.requirements("sha256", json!({ "text": "a" })).await);
    let before = app.balance(payer.address()).await;
    // Act
    let unpaid = app.sessionless().call_tool("sha256", json!({ "text": "abc" }), None).await;
    let paid = app.pay("sha256", json!({ "text": "abc" }), &payload).await;
    // Assert: a clear tool error, no price, nothing charged.
    for answer in [&unpaid, &paid] {
        let body = &answer["structuredContent"];
        assert_eq!(body["error"], "price_unavailable", "{answer}");
        assert!(body["message"].as_str().unwrap().contains("sha256"));
        assert_eq!(body["charged"], false);
        assert!(body.get("accepts").is_none(), "never a price");
    }
    assert_eq!(app.balance(payer.address()).await, before);
    app.shutdown().await;
}

#[tokio::test]
async fn a_price_expression_that_does_not_check_stops_the_start_naming_the_tool_and_the_problem() {
    let mut config = Config::load(None).unwrap();
    config.payment.pay_to = Some(alloy::primitives::Address::repeat_byte(0xbb));
    config.network.asset = Some(alloy::primitives::Address::repeat_byte(0xcc));
    priced_by_expression(&mut config, "args.txt * 2", 10_000);
    let error = tollgate::app::public_catalog(&config).await.err().expect("refused");
    let message = format!("{error:#}");
    assert!(message.contains("`sha256`") && message.contains("txt"), "{message}");
}

fn write_prices(path: &Path, sha256: &str) {
    std::fs::write(path, format!("[tools.prices]\nsha256 = {sha256}\n")).unwrap();
}

/// A server whose config file (`prices.toml` in the returned dir) sets sha256 at 1000.
async fn reloadable() -> (TestApp, tempfile::TempDir) {
    reloadable_with(|_| {}).await
}

async fn reloadable_with(tweak: impl FnOnce(&mut Config)) -> (TestApp, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    write_prices(&dir.path().join("prices.toml"), "\"1000\"");
    let app = spawn_app_reading(Some(dir.path().join("prices.toml")), tweak).await;
    (app, dir)
}

/// `sha256` paid at 1000 by a client that does not echo `extra.offer`, then repriced at 3000:
/// the payer, the arguments, the payment and its answer.
async fn paid_then_repriced(
    app: &TestApp,
    dir: &tempfile::TempDir,
) -> (alloy::signers::local::PrivateKeySigner, Value, Value, Value) {
    let payer = app.payer();
    let args = json!({ "text": "a" });
    let mut requirements = app.requirements("sha256", args.clone()).await;
    requirements.extra.offer = None;
    let payload = app.sign(&payer, &requirements);
    let paid = app.pay("sha256", args.clone(), &payload).await;
    assert_eq!(paid["_meta"]["x402/payment-response"]["success"], true, "{paid}");
    write_prices(&dir.path().join("prices.toml"), "\"3000\"");
    reload(app, dir).unwrap();
    (payer, args, payload, paid)
}

fn reload(app: &TestApp, dir: &tempfile::TempDir) -> anyhow::Result<Vec<String>> {
    tollgate::app::reload_prices(&app.state, Some(&dir.path().join("prices.toml")))
}

#[tokio::test]
async fn a_price_raised_or_lowered_after_a_challenge_honours_the_offer_and_quotes_the_new_price() {
    // Arrange: a challenge at 1000, then the price is raised to 3000.
    let (app, dir) = reloadable().await;
    let payer = app.payer();
    let args = json!({ "text": "a" });
    let offered = app.requirements("sha256", args.clone()).await;
    write_prices(&dir.path().join("prices.toml"), "\"3000\"");
    assert_eq!(reload(&app, &dir).unwrap(), ["sha256"]);
    let before = app.balance(payer.address()).await;
    // Act
    let raised = app.pay("sha256", args.clone(), &app.sign(&payer, &offered)).await;
    let quoted = app.requirements("sha256", args.clone()).await;
    // Assert: paid at the offered price, recorded as an honoured offer; new challenges at 3000.
    assert_eq!(raised["_meta"]["x402/payment-response"]["success"], true, "{raised}");
    assert_eq!(before - app.balance(payer.address()).await, U256::from(1000));
    let body = &raised["_meta"]["tollgate/receipt"]["body"];
    assert_eq!((&body["amount"], &body["price"]["basis"]), (&json!("1000"), &json!("offer")));
    assert_eq!(quoted.amount, "3000");
    // Lowered: the offer at 3000 is honoured at 3000 (what the payer signed), new ones at 500.
    write_prices(&dir.path().join("prices.toml"), "\"500\"");
    reload(&app, &dir).unwrap();
    let before = app.balance(payer.address()).await;
    let lowered = app.pay("sha256", args.clone(), &app.sign(&payer, &quoted)).await;
    assert_eq!(lowered["_meta"]["x402/payment-response"]["success"], true, "{lowered}");
    assert_eq!(before - app.balance(payer.address()).await, U256::from(3000));
    assert_eq!(app.requirements("sha256", args).await.amount, "500");
    app.shutdown().await;
}

#[tokio::test]
async fn an_offer_past_its_window_or_one_never_made_is_refused_uncharged() {
    // Arrange: a challenge at 1000, then the price is raised to 3000.
    let (app, dir) = reloadable().await;
    let payer = app.payer();
    let args = json!({ "text": "a" });
    let offered = app.requirements("sha256", args.clone()).await;
    write_prices(&dir.path().join("prices.toml"), "\"3000\"");
    reload(&app, &dir).unwrap();
    let before = app.balance(payer.address()).await;
    // Act 1: a price never offered (the offer token, another amount), and no offer at all.
    let mut forged = offered.clone();
    forged.amount = "1".into();
    let forged = app.pay("sha256", args.clone(), &app.sign(&payer, &forged)).await;
    let mut bare = offered.clone();
    bare.extra.offer = None;
    let bare = app.pay("sha256", args.clone(), &app.sign(&payer, &bare)).await;
    // Act 2: the genuine offer, paid after its maxTimeoutSeconds (300 s) ran out.
    app.advance_time(301).await;
    let late = app.pay("sha256", args, &app.sign(&payer, &offered)).await;
    // Assert: each refused with today's price, nothing charged.
    for (answer, code) in [
        (&forged, "invalid_payment_requirements"),
        (&bare, "invalid_payment_requirements"),
        (&late, "offer_expired"),
    ] {
        assert_eq!(answer["structuredContent"]["error"], code, "{answer}");
        assert_eq!(answer["structuredContent"]["accepts"][0]["amount"], "3000");
    }
    assert_eq!(app.balance(payer.address()).await, before);
    assert_eq!(receipt_count(&app).await, 0);
    app.shutdown().await;
}

#[tokio::test]
async fn a_reload_that_does_not_validate_keeps_the_prices_in_service_and_says_why() {
    let (app, dir) = reloadable().await;
    let file = dir.path().join("prices.toml");
    // An expression that does not check against the tool's schema.
    write_prices(&file, "{ price = \"args.nope * 2\", max_price = \"9000\" }");
    let refused = reload(&app, &dir).unwrap_err();
    assert!(format!("{refused:#}").contains("`sha256`"), "{refused:#}");
    // A file that does not parse.
    std::fs::write(&file, "[tools.prices\nsha256 = ").unwrap();
    assert!(reload(&app, &dir).is_err());
    // An unknown tool.
    std::fs::write(&file, "[tools.prices]\nsha265 = \"1\"\n").unwrap();
    assert!(format!("{:#}", reload(&app, &dir).unwrap_err()).contains("sha265"));
    assert_eq!(app.requirements("sha256", json!({ "text": "a" })).await.amount, "1000", "old prices serve");
    app.shutdown().await;
}

#[tokio::test]
async fn prices_reload_when_the_watched_config_file_changes() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("prices.toml");
    write_prices(&file, "\"1000\"");
    let app = spawn_app_reading(Some(file.clone()), |c| c.tools.watch_config = true).await;
    write_prices(&file, "{ price = \"2000 + size(args.text)\", max_price = \"9000\" }");
    // The watcher looks every 2 s: wait for the new quote, bounded.
    let quoted = async {
        loop {
            let amount = app.requirements("sha256", json!({ "text": "abc" })).await.amount;
            if amount != "1000" {
                return amount;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    };
    let amount = tokio::time::timeout(std::time::Duration::from_secs(20), quoted).await.expect("reloaded");
    assert_eq!(amount, "2003");
    app.shutdown().await;
}

#[tokio::test]
async fn sighup_reloads_the_prices_of_a_running_tollgate_serve() {
    // Arrange: `tollgate serve --config prices.toml` as its own process, on the test's chain.
    let app = spawn_app_with(|_| {}).await;
    let file = app.dir.path().join("prices.toml");
    write_prices(&file, "\"1000\"");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let database = format!("sqlite://{}", app.dir.path().join("served.db").display());
    let mut served = tokio::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["--config", &file.display().to_string(), "serve"])
        .env("TOLLGATE_SERVER__BIND", format!("127.0.0.1:{port}"))
        .env("TOLLGATE_NETWORK__RPC_URL", app.chain.anvil.endpoint())
        .env("TOLLGATE_NETWORK__ASSET", app.chain.token.to_checksum(None))
        .env("TOLLGATE_PAYMENT__PAY_TO", app.chain.pay_to.to_checksum(None))
        .env("TOLLGATE_PAYMENT__RELAYER_KEY", tollgate::chain::anvil::DEV_KEYS[1])
        .env("TOLLGATE_DATABASE__URL", database)
        .env("TOLLGATE_RECEIPTS__KEY", "22".repeat(32))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    crate::helpers::wait_listening(port).await;
    let mcp = crate::helpers::Mcp::sessionless(&format!("http://127.0.0.1:{port}/mcp"));
    let quote = |mcp: crate::helpers::Mcp| async move {
        let challenge = mcp.call_tool("sha256", json!({ "text": "a" }), None).await;
        challenge["structuredContent"]["accepts"][0]["amount"].as_str().unwrap().to_owned()
    };
    assert_eq!(quote(mcp.clone()).await, "1000");
    // Act: a new price in the file, then SIGHUP.
    write_prices(&file, "\"4200\"");
    let pid = served.id().unwrap().to_string();
    assert!(std::process::Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    // Assert: the process lives on and quotes the new price.
    let reloaded = async {
        loop {
            if quote(mcp.clone()).await == "4200" {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(20), reloaded).await.expect("reloaded on SIGHUP");
    assert!(served.try_wait().unwrap().is_none(), "SIGHUP did not stop the server");
    served.start_kill().unwrap();
    app.shutdown().await;
}

#[tokio::test]
async fn a_settled_payment_resent_after_a_price_change_while_the_store_is_down_is_not_challenged() {
    // Arrange: paid at 1000 on Postgres, reached through a relay that can be cut; then the price
    // changes, so only the store can say the resent payment is held.
    let (relay, url) = pg_behind_relay().await;
    let (app, dir) = reloadable_with(|c| c.database.url = url.into()).await;
    let (payer, args, payload, _) = paid_then_repriced(&app, &dir).await;
    relay.up.store(false, std::sync::atomic::Ordering::SeqCst);
    while relay.live.load(std::sync::atomic::Ordering::SeqCst) > 0 {
        tokio::task::yield_now().await;
    }
    let before = app.balance(payer.address()).await;
    // Act: the client resends the same payment while the store cannot be read.
    let resent = app.pay("sha256", args, &payload).await;
    // Assert: told the store is unavailable (retry later), never quoted the new price, which
    // would invite a second payment for a call already paid.
    assert!(resent["structuredContent"].get("accepts").is_none(), "{resent}");
    assert_eq!(resent["structuredContent"]["error"], "store_unavailable", "{resent}");
    assert_eq!(app.balance(payer.address()).await, before);
    app.shutdown().await;
}

#[tokio::test]
async fn a_settled_payment_resent_after_a_price_change_gets_its_answer_not_a_new_price() {
    // Arrange: paid at 1000 by a client that does not echo `extra.offer`; then the price changes.
    let (app, dir) = reloadable().await;
    let (payer, args, payload, paid) = paid_then_repriced(&app, &dir).await;
    let before = app.balance(payer.address()).await;
    // Act: the client resends the same payment (it lost the first answer).
    let resent = app.pay("sha256", args, &payload).await;
    // Assert: the stored answer, never a challenge that would invite a second payment.
    assert!(resent["structuredContent"].get("accepts").is_none(), "{resent}");
    assert_eq!(resent["structuredContent"], paid["structuredContent"]);
    assert_eq!(app.balance(payer.address()).await, before);
    app.shutdown().await;
}
