//! Protecting the API behind the tools: an upstream's quota, its in-flight cap, its pauses
//! when it is throttled, and the result cache, all decided before anyone pays. The upstreams
//! are real: an MCP Streamable HTTP server written here (it can answer 429, hold calls, count
//! them) and the official Python SDK's stdio server; the chain is anvil; balances are checked.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use alloy::primitives::U256;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tollgate::clock::Clock;
use tollgate::config::{ChargePolicy, Config, LimitBackend, QuotaConfig, UpstreamToolConfig};
use tollgate::money::UsdcAmount;

use crate::helpers::{Server, TestApp, spawn_app_with};
use crate::upstream::{PRICE, upstream};

/// An MCP server over Streamable HTTP (plain JSON answers), written for these tests: `search`
/// answers at once, `slow` waits until the test lets it go, `busy` answers a tool error that
/// carries `retry_after_seconds`, `fails` a plain tool error; every `tools/call` is counted, and
/// while `throttled` is set it is answered `429 Too Many Requests` with `Retry-After: 30`, as a
/// SaaS API's gateway does.
#[derive(Clone)]
struct FakeUpstream {
    calls: Arc<AtomicUsize>,
    started_slow: Arc<AtomicUsize>,
    throttled: Arc<AtomicBool>,
    release: Arc<tokio::sync::Semaphore>,
}

impl FakeUpstream {
    async fn start() -> (FakeUpstream, String) {
        let fake = FakeUpstream {
            calls: Default::default(),
            started_slow: Default::default(),
            throttled: Default::default(),
            release: Arc::new(tokio::sync::Semaphore::new(0)),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/mcp", listener.local_addr().unwrap());
        let app = axum::Router::new()
            .route("/mcp", axum::routing::post(rpc).get(|| async { StatusCode::METHOD_NOT_ALLOWED }))
            .with_state(fake.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (fake, url)
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

async fn rpc(
    axum::extract::State(fake): axum::extract::State<FakeUpstream>,
    _headers: HeaderMap,
    axum::Json(message): axum::Json<Value>,
) -> Response {
    let Some(id) = message.get("id").cloned() else { return StatusCode::ACCEPTED.into_response() };
    let answer =
        |result: Value| axum::Json(json!({ "jsonrpc": "2.0", "id": id, "result": result })).into_response();
    let params = &message["params"];
    match message["method"].as_str().unwrap_or_default() {
        "initialize" => answer(json!({
            "protocolVersion": params["protocolVersion"],
            "capabilities": { "tools": {} },
            "serverInfo": { "name": "fake-saas", "version": "1.0.0" },
        })),
        "tools/list" => {
            let schema = json!({ "type": "object", "properties": { "q": { "type": "string" } } });
            let tools: Vec<Value> = ["search", "slow", "busy", "fails"]
                .iter()
                .map(|name| json!({ "name": name, "description": "a SaaS API call", "inputSchema": schema }))
                .collect();
            answer(json!({ "tools": tools }))
        }
        "tools/call" => {
            if fake.throttled.load(Ordering::SeqCst) {
                return (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "30")], "slow down").into_response();
            }
            let n = fake.calls.fetch_add(1, Ordering::SeqCst) + 1;
            let q = params["arguments"]["q"].as_str().unwrap_or_default().to_owned();
            match params["name"].as_str().unwrap_or_default() {
                "slow" => {
                    fake.started_slow.fetch_add(1, Ordering::SeqCst);
                    fake.release.acquire().await.unwrap().forget();
                    answer(json!({ "content": [{ "type": "text", "text": format!("slow {q}") }] }))
                }
                "busy" => answer(json!({
                    "content": [{ "type": "text", "text": "the API is busy" }],
                    "structuredContent": { "error": "busy", "retry_after_seconds": 12 },
                    "isError": true,
                })),
                "fails" => answer(json!({
                    "content": [{ "type": "text", "text": "no results: bad query" }],
                    "isError": true,
                })),
                _ => answer(
                    json!({ "content": [{ "type": "text", "text": format!("results for {q}, call #{n}") }] }),
                ),
            }
        }
        _ => answer(json!({})),
    }
}

/// tollgate selling the fake upstream's tools (as `up_*`, at [`PRICE`]), with `tweak` on its
/// `[[upstream]]` and on the rest of the config.
async fn app_selling(
    url: &str,
    tweak: impl FnOnce(&mut tollgate::config::UpstreamConfig, &mut Config),
) -> TestApp {
    let mut u = upstream("saas");
    u.url = url.to_owned();
    u.free = vec!["busy".into()];
    spawn_app_with(move |c: &mut Config| {
        tweak(&mut u, c);
        c.upstream = vec![u];
    })
    .await
}

/// A payment for `tool` with `args`, signed by the demo payer from the challenge of `url`.
async fn signed(app: &TestApp, url: &str, tool: &str, args: &Value) -> Value {
    let challenge = crate::helpers::Mcp::sessionless(url).call_tool(tool, args.clone(), None).await;
    let requirements = serde_json::from_value(challenge["structuredContent"]["accepts"][0].clone())
        .unwrap_or_else(|_| panic!("a challenge: {challenge}"));
    json!({ "x402/payment": app.sign(&app.payer(), &requirements) })
}

async fn pay_at(url: &str, tool: &str, args: &Value, meta: &Value) -> Value {
    crate::helpers::Mcp::sessionless(url).call_tool(tool, args.clone(), Some(meta.clone())).await
}

/// A call of `tool` at `url`, paid by the demo payer from a challenge asked just before.
async fn pay_afresh(app: &TestApp, url: &str, tool: &str, args: &Value) -> Value {
    pay_at(url, tool, args, &signed(app, url, tool, args).await).await
}

async fn metrics(app: &TestApp) -> String {
    reqwest::get(format!("{}/metrics", app.base_url())).await.unwrap().text().await.unwrap()
}

/// The value of the one series of `name` whose labels include all of `labels`.
fn series(metrics: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let line = metrics
        .lines()
        .find(|l| l.starts_with(&format!("{name}{{")) && labels.iter().all(|label| l.contains(label)))?;
    line.rsplit_once(' ')?.1.parse().ok()
}

/// A paid answer: the tool's own, with its settlement.
fn ran(answer: &Value) -> bool {
    answer["isError"] != true && answer["_meta"]["x402/payment-response"]["success"] == true
}

fn refusal(answer: &Value) -> &Value {
    &answer["structuredContent"]
}

/// A refusal because the upstream is paused, naming `retry_after_seconds`.
#[track_caller]
fn assert_paused(answer: &Value, retry_after_seconds: u64) {
    assert_eq!(refusal(answer)["reason"], "paused", "{answer}");
    assert_eq!(refusal(answer)["retry_after_seconds"], retry_after_seconds, "{answer}");
}

#[tokio::test]
async fn a_429_from_the_upstream_pauses_its_tools_uncharged_until_the_retry_time() {
    // Arrange: charge on success, so the call that meets the 429 is not charged either.
    let (fake, url) = FakeUpstream::start().await;
    let app = app_selling(&url, |u, _| u.charge = Some(ChargePolicy::OnSuccess)).await;
    let payer = app.payer().address();
    let args = json!({ "q": "rust" });
    let first = signed(&app, &app.mcp_url(), "up_search", &args).await;
    let second = signed(&app, &app.mcp_url(), "up_search", &args).await;
    let before = app.balance(payer).await;
    // Act 1: the upstream's gateway says 429, Retry-After: 30.
    fake.throttled.store(true, Ordering::SeqCst);
    let met = pay_at(&app.mcp_url(), "up_search", &args, &first).await;
    fake.throttled.store(false, Ordering::SeqCst);
    let challenge = app.sessionless().call_tool("up_search", args.clone(), None).await;
    let paid_attempt = pay_at(&app.mcp_url(), "up_search", &args, &second).await;
    let listed = app.sessionless().list_tools().await;
    let well_known: Value =
        reqwest::get(format!("{}/.well-known/x402", app.base_url())).await.unwrap().json().await.unwrap();
    // Assert 1: the call that met it was not charged; sales stop before payment, with the time.
    assert_eq!(met["structuredContent"]["error"], "upstream_throttled", "{met}");
    assert_eq!(met["_meta"]["tollgate/charged"], false, "{met}");
    for refused in [&challenge, &paid_attempt] {
        let r = refusal(refused);
        assert_eq!(r["error"], "upstream_limited", "{refused}");
        assert_eq!((r["axis"].as_str(), r["reason"].as_str()), (Some("upstream"), Some("paused")));
        assert_eq!(r["retry_after_seconds"], 30);
        assert_eq!(r["charged"], false);
    }
    assert_eq!(app.balance(payer).await, before, "nothing was charged");
    assert_eq!(fake.calls(), 0, "no call reached the upstream while it was paused (the 429 is not counted)");
    let shown = listed.iter().find(|t| t["name"] == "up_search").unwrap();
    assert_eq!(shown["_meta"]["tollgate/paused"]["retry_after_seconds"], 30, "{shown}");
    let known = well_known["tools"].as_array().unwrap().iter().find(|t| t["name"] == "up_search").unwrap();
    assert_eq!(known["paused"]["upstream"], "saas", "{known}");
    // Act 2: the retry time passes (injected clock).
    app.advance_time(31).await;
    let resumed = pay_at(&app.mcp_url(), "up_search", &args, &second).await;
    // Assert 2: sales resume, and the held-back authorization pays for the call.
    assert!(ran(&resumed), "{resumed}");
    assert_eq!(before - app.balance(payer).await, U256::from(PRICE));
    assert_eq!(fake.calls(), 1);
    let listed = app.sessionless().list_tools().await;
    assert!(listed.iter().all(|t| t["_meta"].get("tollgate/paused").is_none()), "no longer paused");
    app.shutdown().await;
}

#[tokio::test]
async fn a_tool_error_carrying_retry_after_seconds_pauses_the_upstream() {
    let (_fake, url) = FakeUpstream::start().await;
    let app = app_selling(&url, |_, _| {}).await;
    let busy = app.sessionless().call_tool("up_busy", json!({}), None).await;
    let next = app.sessionless().call_tool("up_search", json!({ "q": "x" }), None).await;
    assert_eq!(busy["structuredContent"]["retry_after_seconds"], 12, "{busy}");
    assert_paused(&next, 12);
    app.shutdown().await;
}

#[tokio::test]
async fn five_concurrent_paid_calls_against_max_in_flight_two_run_two_and_refuse_three_uncharged() {
    // Arrange
    let (fake, url) = FakeUpstream::start().await;
    let app = app_selling(&url, |u, _| {
        u.name = "saas-slots".into();
        u.max_in_flight = 2;
    })
    .await;
    let payer = app.payer().address();
    let mut payments = Vec::new();
    for i in 0..5 {
        let args = json!({ "q": format!("job {i}") });
        let payment = signed(&app, &app.mcp_url(), "up_slow", &args).await;
        payments.push((args, payment));
    }
    let before = app.balance(payer).await;
    // Act: five at once; the upstream holds every call until let go.
    let calls: Vec<_> = payments
        .into_iter()
        .map(|(args, payment)| {
            let url = app.mcp_url();
            tokio::spawn(async move { pay_at(&url, "up_slow", &args, &payment).await })
        })
        .collect();
    // Three are refused at once; two settle and wait in the upstream.
    for _ in 0..600 {
        let done = calls.iter().filter(|c| c.is_finished()).count();
        if done == 3 && fake.started_slow.load(Ordering::SeqCst) == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    fake.release.add_permits(2);
    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.await.unwrap());
    }
    // Assert
    let paid: Vec<_> = answers.iter().filter(|a| ran(a)).collect();
    let refused: Vec<_> = answers.iter().filter(|a| refusal(a)["reason"] == "in_flight").collect();
    assert_eq!((paid.len(), refused.len()), (2, 3), "{answers:#?}");
    for r in &refused {
        assert_eq!(refusal(r)["axis"], "upstream");
        assert_eq!(refusal(r)["limit"], 2);
        assert_eq!(refusal(r)["charged"], false);
    }
    assert_eq!(
        before - app.balance(payer).await,
        U256::from(2 * PRICE),
        "only the two that ran were charged"
    );
    assert_eq!(fake.calls(), 2);
    // The slots came back: the next call runs; operators saw it all.
    fake.release.add_permits(1);
    let args = json!({ "q": "after" });
    let later = signed(&app, &app.mcp_url(), "up_slow", &args).await;
    assert!(ran(&pay_at(&app.mcp_url(), "up_slow", &args, &later).await));
    let metrics = metrics(&app).await;
    assert_eq!(
        series(
            &metrics,
            "tollgate_upstream_refusals_total",
            &["upstream=\"saas-slots\"", "reason=\"in_flight\""]
        ),
        Some(3.0)
    );
    assert_eq!(series(&metrics, "tollgate_upstream_in_flight", &["upstream=\"saas-slots\""]), Some(0.0));
    app.shutdown().await;
}

/// A Redis key prefix of this run's own, so runs never share buckets.
fn fresh_prefix() -> String {
    format!("tg-protect-{}", rand::random::<u64>())
}

#[tokio::test]
async fn a_quota_of_three_and_a_pause_are_shared_by_two_replicas_through_redis() {
    // Arrange: two replicas (each with its own relayer), one Redis, one upstream.
    let (fake, url) = FakeUpstream::start().await;
    let app = app_selling(&url, |u, c| {
        u.name = "saas-quota".into();
        u.quota = Some(QuotaConfig { requests: 3, window_secs: 3600 });
        c.limits.backend = LimitBackend::Redis;
        c.limits.redis_url = "redis://127.0.0.1:6379".to_owned().into();
        c.limits.key_prefix = fresh_prefix();
    })
    .await;
    let mut second = app.state.config.clone();
    second.payment.relayer_key = tollgate::chain::anvil::DEV_KEYS[4].to_owned().into();
    let sibling = Server::start(second, app.clock.clone(), app.runs.clone()).await;
    let (a, b) = (app.mcp_url(), sibling.mcp_url());
    let payer = app.payer().address();
    let before = app.balance(payer).await;
    // Act: two calls on one replica, one on the other, then a fourth on each.
    let mut answers = Vec::new();
    for (i, url) in [&a, &a, &b, &b, &a].into_iter().enumerate() {
        let args = json!({ "q": format!("q{i}") });
        let payment = signed(&app, url, "up_search", &args).await;
        answers.push(pay_at(url, "up_search", &args, &payment).await);
    }
    // Assert: three ran; the fourth and fifth were refused uncharged, on either replica.
    for answer in &answers[..3] {
        assert!(ran(answer), "{answer}");
    }
    for answer in &answers[3..] {
        let r = refusal(answer);
        assert_eq!(
            (r["reason"].as_str(), r["limit"].as_u64(), r["remaining"].as_u64()),
            (Some("quota"), Some(3), Some(0)),
            "{answer}"
        );
        assert_eq!(r["window_seconds"], 3600);
        assert!(r["retry_after_seconds"].as_u64().is_some_and(|s| s > 0 && s <= 1200), "{answer}");
        assert_eq!(r["charged"], false);
    }
    assert_eq!(before - app.balance(payer).await, U256::from(3 * PRICE));
    assert_eq!(fake.calls(), 3);
    let metrics = metrics(&app).await;
    let upstream = ["upstream=\"saas-quota\""];
    assert_eq!(series(&metrics, "tollgate_upstream_quota_remaining", &upstream), Some(0.0), "{metrics}");
    let quota = ["upstream=\"saas-quota\"", "reason=\"quota\""];
    assert_eq!(series(&metrics, "tollgate_upstream_refusals_total", &quota), Some(2.0), "{metrics}");
    // Act 2: a third of the window later one unit is back; a throttle seen by one replica
    // then pauses the upstream's sales on the other.
    app.advance_time(1200).await;
    fake.throttled.store(true, Ordering::SeqCst);
    let _ = app.sessionless().call_tool("up_busy", json!({}), None).await;
    let on_sibling =
        crate::helpers::Mcp::sessionless(&b).call_tool("up_search", json!({ "q": "z" }), None).await;
    assert_paused(&on_sibling, 30);
    sibling.shutdown().await;
    app.shutdown().await;
}

#[tokio::test]
async fn two_identical_calls_within_the_ttl_make_one_upstream_call_two_charges_and_two_receipts() {
    // Arrange: `search` answers from the cache for 60 s, at 500 instead of PRICE.
    let (fake, url) = FakeUpstream::start().await;
    let app = app_selling(&url, |u, _| {
        u.name = "saas-cache".into();
        let cached_price = Some(UsdcAmount::from_atomic(500));
        u.tools.insert("search".into(), UpstreamToolConfig { cache_ttl_secs: 60, cached_price });
    })
    .await;
    let payer = app.payer().address();
    let args = json!({ "q": "weather in Lisbon" });
    let before = app.balance(payer).await;
    let answered_at = app.clock.now_unix();
    // Act
    let first_requirements = app.requirements("up_search", args.clone()).await;
    let first = app.pay("up_search", args.clone(), &app.sign(&app.payer(), &first_requirements)).await;
    app.advance_time(10).await;
    let second_requirements = app.requirements("up_search", args.clone()).await;
    let second = app.pay("up_search", args.clone(), &app.sign(&app.payer(), &second_requirements)).await;
    let other = app.requirements("up_search", json!({ "q": "weather in Porto" })).await.amount;
    // Assert: one upstream call, two charges (the second at the cached price), two receipts.
    assert_eq!(first_requirements.amount, PRICE.to_string());
    assert_eq!(second_requirements.amount, "500", "a cached answer is quoted at cached_price");
    assert_eq!(other, PRICE.to_string(), "other arguments are not cached");
    assert!(ran(&first) && ran(&second), "{first} {second}");
    assert_eq!(fake.calls(), 1, "the upstream saw one call");
    assert_eq!(first["content"], second["content"], "the same answer");
    assert_eq!(before - app.balance(payer).await, U256::from(PRICE + 500));
    let (r1, r2) =
        (&first["_meta"]["tollgate/receipt"]["body"], &second["_meta"]["tollgate/receipt"]["body"]);
    assert_eq!(r1.get("cached"), None, "{r1}");
    assert_eq!(r2["cached"], true, "{r2}");
    assert_eq!(r2["cached_at"], answered_at, "the time the upstream gave the answer");
    assert_eq!(r2["price"]["basis"], "cached");
    assert_ne!(r1["tx"], r2["tx"], "each call paid for itself");
    // Act 2: past the TTL, the next call goes to the upstream again at the full price.
    app.advance_time(60).await;
    let third_requirements = app.requirements("up_search", args.clone()).await;
    let third = app.pay("up_search", args.clone(), &app.sign(&app.payer(), &third_requirements)).await;
    assert_eq!(third_requirements.amount, PRICE.to_string());
    assert!(ran(&third), "{third}");
    assert_eq!(fake.calls(), 2);
    let metrics = metrics(&app).await;
    let cache = |outcome: &str| {
        let outcome = format!("outcome=\"{outcome}\"");
        series(&metrics, "tollgate_upstream_cache_total", &["upstream=\"saas-cache\"", &outcome])
    };
    assert_eq!((cache("hit"), cache("miss")), (Some(1.0), Some(2.0)), "{metrics}");
    app.shutdown().await;
}

#[tokio::test]
async fn a_stdio_upstream_error_matching_a_throttle_pattern_pauses_its_tools() {
    // Arrange: the official Python SDK's server, whose `limited` tool fails with "upstream API
    // rate limited: retry after 30s", as an operator's SaaS wrapper does.
    let dir = tempfile::tempdir().unwrap();
    let calls_file = dir.path().join("calls");
    let python = crate::upstream::python().await.display().to_string();
    let mut u = upstream("py-stdio");
    u.command =
        vec![python, crate::upstream::script(), "stdio".into(), "0".into(), calls_file.display().to_string()];
    u.free = vec!["ping".into(), "limited".into()];
    u.throttle_patterns = vec!["(?i)rate limited".into()];
    let app = spawn_app_with(move |c: &mut Config| c.upstream = vec![u]).await;
    let before = app.balance(app.payer().address()).await;
    // Act
    let hit = app.sessionless().call_tool("up_limited", json!({ "text": "a" }), None).await;
    let next = app.sessionless().call_tool("up_reverse", json!({ "text": "b" }), None).await;
    // Assert: the priced tool is refused before anyone is asked to pay, with the named time.
    assert_eq!(hit["isError"], true, "{hit}");
    assert_paused(&next, 30);
    assert_eq!(refusal(&next)["charged"], false);
    assert_eq!(crate::upstream::calls(&calls_file), ["limited"], "reverse never reached the upstream");
    assert_eq!(app.balance(app.payer().address()).await, before);
    app.shutdown().await;
}

#[tokio::test]
async fn a_payment_at_the_cached_price_never_buys_a_live_call_once_the_answer_is_gone() {
    // Arrange: a cache of one entry, so a second set of arguments evicts the first answer.
    let (fake, url) = FakeUpstream::start().await;
    let app = app_selling(&url, |u, c| {
        let cached_price = Some(UsdcAmount::from_atomic(500));
        u.tools.insert("search".into(), UpstreamToolConfig { cache_ttl_secs: 60, cached_price });
        c.tools.cache_max_entries = 1;
    })
    .await;
    let payer = app.payer().address();
    let (lisbon, porto) = (json!({ "q": "Lisbon" }), json!({ "q": "Porto" }));
    let first = signed(&app, &app.mcp_url(), "up_search", &lisbon).await;
    assert!(ran(&pay_at(&app.mcp_url(), "up_search", &lisbon, &first).await));
    let cheap = app.requirements("up_search", lisbon.clone()).await;
    assert_eq!(cheap.amount, "500", "quoted at the cached price while the answer is there");
    let cheap_payment = json!({ "x402/payment": app.sign(&app.payer(), &cheap) });
    let evicting = signed(&app, &app.mcp_url(), "up_search", &porto).await;
    assert!(ran(&pay_at(&app.mcp_url(), "up_search", &porto, &evicting).await));
    let before = app.balance(payer).await;
    // Act: the cheap payment arrives after Lisbon's answer was evicted.
    let answer = pay_at(&app.mcp_url(), "up_search", &lisbon, &cheap_payment).await;
    // Assert: re-quoted at the live price, uncharged, and the upstream was not called for it.
    assert_eq!(answer["structuredContent"]["error"], "offer_expired", "{answer}");
    assert_eq!(answer["structuredContent"]["accepts"][0]["amount"], PRICE.to_string(), "{answer}");
    assert_eq!(app.balance(payer).await, before);
    assert_eq!(fake.calls(), 2);
    app.shutdown().await;
}

#[tokio::test]
async fn a_call_refused_for_the_upstreams_quota_does_not_spend_the_payers_wallet_limit() {
    // Arrange: the upstream takes one call a minute; the payer may make two calls an hour.
    let (fake, url) = FakeUpstream::start().await;
    let app = app_selling(&url, |u, c| {
        u.quota = Some(QuotaConfig { requests: 1, window_secs: 60 });
        c.limits.rules = vec![crate::helpers::wallet_limit(2, 3600)];
    })
    .await;
    let url = app.mcp_url();
    let payer = app.payer().address();
    let before = app.balance(payer).await;
    let call = |i: usize| json!({ "q": format!("q{i}") });
    let first = pay_afresh(&app, &url, "up_search", &call(1)).await;
    // Act: the second call meets the upstream's spent quota; a minute later, a third.
    let second = pay_afresh(&app, &url, "up_search", &call(2)).await;
    app.advance_time(61).await;
    let third = pay_afresh(&app, &url, "up_search", &call(3)).await;
    // Assert: the refusal was the upstream's, uncharged, and left the payer's limit whole, so
    // the third call is the payer's second of the hour and runs.
    assert!(ran(&first), "{first}");
    assert_eq!(refusal(&second)["reason"], "quota", "{second}");
    assert_eq!(refusal(&second)["charged"], false);
    assert!(ran(&third), "the payer's second call of the hour: {third}");
    assert_eq!(before - app.balance(payer).await, U256::from(2 * PRICE));
    assert_eq!(fake.calls(), 2);
    app.shutdown().await;
}

#[tokio::test]
async fn an_upstream_slot_taken_by_a_payment_that_could_not_settle_is_given_back() {
    // Arrange: one call at a time into the upstream; a payer whose wallet holds nothing.
    let (fake, url) = FakeUpstream::start().await;
    let app = app_selling(&url, |u, _| {
        u.name = "saas-one-slot".into();
        u.max_in_flight = 1;
    })
    .await;
    let url = app.mcp_url();
    let args = json!({ "q": "x" });
    let challenge = crate::helpers::Mcp::sessionless(&url).call_tool("up_search", args.clone(), None).await;
    let requirements = serde_json::from_value(challenge["structuredContent"]["accepts"][0].clone()).unwrap();
    let broke = json!({ "x402/payment": app.sign(&alloy::signers::local::PrivateKeySigner::random(), &requirements) });
    // Act: the unfunded payment takes the slot, then fails its settlement checks; then an
    // honest payer calls.
    let refused = pay_at(&url, "up_search", &args, &broke).await;
    let honest = pay_afresh(&app, &url, "up_search", &args).await;
    // Assert: the failure released the slot on its way out, so the honest call ran.
    assert_eq!(refusal(&refused)["error"], "invalid_exact_evm_insufficient_balance", "{refused}");
    assert!(ran(&honest), "the slot was given back: {honest}");
    assert_eq!(fake.calls(), 1);
    app.shutdown().await;
}

#[tokio::test]
async fn a_call_charged_before_it_ran_that_meets_the_throttle_is_receipted_as_a_tool_error() {
    // Arrange: the default policy, charged before the handler runs.
    let (fake, url) = FakeUpstream::start().await;
    let app = app_selling(&url, |u, _| u.name = "saas-before-run".into()).await;
    let payer = app.payer().address();
    let args = json!({ "q": "rust" });
    let payment = signed(&app, &app.mcp_url(), "up_search", &args).await;
    let before = app.balance(payer).await;
    // Act: the upstream's gateway answers 429 to a call that is already paid for.
    fake.throttled.store(true, Ordering::SeqCst);
    let met = pay_at(&app.mcp_url(), "up_search", &args, &payment).await;
    let paused_at_ms = app.clock.now_millis();
    let next = app.sessionless().call_tool("up_search", args.clone(), None).await;
    let metrics = metrics(&app).await;
    // Assert: the payer paid for a call that ran, and its receipt says what the upstream said.
    assert_eq!(met["isError"], true, "{met}");
    assert_eq!(met["structuredContent"]["error"], "upstream_throttled", "{met}");
    assert_eq!(met["_meta"]["x402/payment-response"]["success"], true, "{met}");
    assert_eq!(met["_meta"]["tollgate/receipt"]["body"]["outcome"], "tool_error", "{met}");
    assert_eq!(before - app.balance(payer).await, U256::from(PRICE));
    // Sales stop before payment; operators see until when, and why calls were refused.
    assert_paused(&next, 30);
    let upstream = ["upstream=\"saas-before-run\""];
    let until = series(&metrics, "tollgate_upstream_paused_until_seconds", &upstream);
    assert_eq!(until, Some(((paused_at_ms + 30_000) / 1000) as f64), "{metrics}");
    let paused = ["upstream=\"saas-before-run\"", "reason=\"paused\""];
    assert_eq!(series(&metrics, "tollgate_upstream_refusals_total", &paused), Some(1.0));
    let signals = ["upstream=\"saas-before-run\"", "signal=\"http_status\""];
    assert_eq!(
        series(&metrics, "tollgate_upstream_throttle_signals_total", &signals),
        Some(1.0),
        "{metrics}"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn an_upstream_slot_comes_back_after_an_uncharged_tool_error_and_after_a_tool_timeout() {
    // Arrange: one call at a time into the upstream, charged on success, cut off after 1 s.
    let (fake, url) = FakeUpstream::start().await;
    let app = app_selling(&url, |u, c| {
        u.name = "saas-slot-paths".into();
        u.max_in_flight = 1;
        u.charge = Some(ChargePolicy::OnSuccess);
        c.tools.timeout_secs = 1;
    })
    .await;
    let url = app.mcp_url();
    let payer = app.payer().address();
    let before = app.balance(payer).await;
    let (q1, q2, q3) = (json!({ "q": "1" }), json!({ "q": "2" }), json!({ "q": "3" }));
    // Act: a tool error; a call the upstream never answers; then an ordinary call.
    let failed = pay_afresh(&app, &url, "up_fails", &q1).await;
    let cut = pay_afresh(&app, &url, "up_slow", &q2).await;
    let after = pay_afresh(&app, &url, "up_search", &q3).await;
    // Assert: neither failure was charged, and each gave its slot back, so the third call ran.
    assert_eq!(
        (failed["isError"].clone(), failed["_meta"]["tollgate/charged"].clone()),
        (json!(true), json!(false)),
        "{failed}"
    );
    assert_eq!(
        (cut["isError"].clone(), cut["_meta"]["tollgate/charged"].clone()),
        (json!(true), json!(false)),
        "{cut}"
    );
    assert!(ran(&after), "the slot came back: {after}");
    assert_eq!(before - app.balance(payer).await, U256::from(PRICE), "only the call that worked was charged");
    assert_eq!(fake.calls(), 3);
    let metrics = metrics(&app).await;
    assert_eq!(series(&metrics, "tollgate_upstream_in_flight", &["upstream=\"saas-slot-paths\""]), Some(0.0));
    app.shutdown().await;
}

#[tokio::test]
async fn a_cached_answer_is_shared_by_two_replicas_through_redis() {
    // Arrange: two replicas, one Redis; `search` answers from the cache for 60 s.
    let (fake, url) = FakeUpstream::start().await;
    let app = app_selling(&url, |u, c| {
        u.name = "saas-fleet-cache".into();
        u.tools.insert("search".into(), UpstreamToolConfig { cache_ttl_secs: 60, cached_price: None });
        c.limits.backend = LimitBackend::Redis;
        c.limits.redis_url = "redis://127.0.0.1:6379".to_owned().into();
        c.limits.key_prefix = fresh_prefix();
    })
    .await;
    let mut second = app.state.config.clone();
    second.payment.relayer_key = tollgate::chain::anvil::DEV_KEYS[4].to_owned().into();
    let sibling = Server::start(second, app.clock.clone(), app.runs.clone()).await;
    let (a, b) = (app.mcp_url(), sibling.mcp_url());
    let payer = app.payer().address();
    let args = json!({ "q": "weather in Lisbon" });
    let before = app.balance(payer).await;
    // Act: the first call on one replica, the same call on the other.
    let first = pay_afresh(&app, &a, "up_search", &args).await;
    app.advance_time(10).await;
    let second = pay_afresh(&app, &b, "up_search", &args).await;
    // Assert: one upstream call; both paid; the other replica answered from the shared cache.
    assert!(ran(&first) && ran(&second), "{first} {second}");
    assert_eq!(fake.calls(), 1, "the upstream saw one call");
    assert_eq!(first["content"], second["content"]);
    assert_eq!(second["_meta"]["tollgate/receipt"]["body"]["cached"], true, "{second}");
    assert_eq!(before - app.balance(payer).await, U256::from(2 * PRICE));
    // Act 2: past the TTL on the service clock, the answer is too old for either replica.
    app.advance_time(51).await;
    let third = pay_afresh(&app, &b, "up_search", &args).await;
    assert!(ran(&third), "{third}");
    assert_eq!(third["_meta"]["tollgate/receipt"]["body"].get("cached"), None, "{third}");
    assert_eq!(fake.calls(), 2);
    sibling.shutdown().await;
    app.shutdown().await;
}

#[tokio::test]
async fn while_an_upstream_is_paused_cached_answers_are_still_served_and_live_calls_refused() {
    // Arrange: `search` cached for 60 s; `busy`'s answer pauses the upstream for 12 s.
    let (fake, url) = FakeUpstream::start().await;
    let app = app_selling(&url, |u, _| {
        u.name = "saas-paused-cache".into();
        u.free = vec!["busy".into()];
        u.tools.insert("search".into(), UpstreamToolConfig { cache_ttl_secs: 60, cached_price: None });
    })
    .await;
    let url = app.mcp_url();
    let payer = app.payer().address();
    let (cached, other) = (json!({ "q": "cached" }), json!({ "q": "other" }));
    let first = pay_afresh(&app, &url, "up_search", &cached).await;
    let payment_for_other = signed(&app, &url, "up_search", &other).await;
    let _ = app.sessionless().call_tool("up_busy", json!({}), None).await;
    let calls_before = fake.calls();
    let before = app.balance(payer).await;
    // Act: during the pause, the cached call (challenge, then payment); a live paid call; a
    // free live call.
    let challenge = app.sessionless().call_tool("up_search", cached.clone(), None).await;
    let paid_cached = pay_afresh(&app, &url, "up_search", &cached).await;
    let live = pay_at(&url, "up_search", &other, &payment_for_other).await;
    let free_live = app.sessionless().call_tool("up_busy", json!({}), None).await;
    // Assert: the cached answer is sold (the upstream is not asked); live calls are refused
    // uncharged with the pause's retry time.
    assert!(ran(&first), "{first}");
    assert_eq!(challenge["structuredContent"]["accepts"][0]["amount"], PRICE.to_string(), "{challenge}");
    assert!(ran(&paid_cached), "{paid_cached}");
    assert_eq!(paid_cached["_meta"]["tollgate/receipt"]["body"]["cached"], true);
    for refused in [&live, &free_live] {
        assert_eq!(refusal(refused)["reason"], "paused", "{refused}");
        assert_eq!(refusal(refused)["charged"], false);
    }
    assert_eq!(before - app.balance(payer).await, U256::from(PRICE), "only the cached answer was paid for");
    assert_eq!(fake.calls(), calls_before, "the upstream was asked nothing during the pause");
    let metrics = metrics(&app).await;
    let cache = |outcome: &str| {
        let outcome = format!("outcome=\"{outcome}\"");
        series(&metrics, "tollgate_upstream_cache_total", &["upstream=\"saas-paused-cache\"", &outcome])
    };
    assert_eq!((cache("hit"), cache("miss")), (Some(1.0), Some(1.0)), "a refused call is no miss: {metrics}");
    app.shutdown().await;
}

#[tokio::test]
async fn while_the_fleets_redis_is_down_calls_are_refused_uncharged_and_listings_still_answer() {
    // Arrange: a fleet-mode upstream whose budget lives in a Redis the test can stop.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut redis = crate::limits::OwnRedis::start(port).await;
    let (fake, url) = FakeUpstream::start().await;
    let app = app_selling(&url, |u, c| {
        u.name = "saas-redis-down".into();
        c.limits.backend = LimitBackend::Redis;
        c.limits.redis_url = format!("redis://127.0.0.1:{port}").into();
    })
    .await;
    let args = json!({ "q": "x" });
    let payment = signed(&app, &app.mcp_url(), "up_search", &args).await;
    let before = app.balance(app.payer().address()).await;
    // Act: Redis goes away; an agent lists the tools, reads the manifest, asks, and pays.
    redis.stop().await;
    let listed = app.sessionless().list_tools().await;
    let well_known = reqwest::get(format!("{}/.well-known/x402", app.base_url())).await.unwrap();
    let challenge = app.sessionless().call_tool("up_search", args.clone(), None).await;
    let paid = pay_at(&app.mcp_url(), "up_search", &args, &payment).await;
    // Assert: the calls are refused, uncharged, for a clear reason; listings still answer, and
    // count as no refusal.
    for refused in [&challenge, &paid] {
        assert_eq!(refusal(refused)["reason"], "unavailable", "{refused}");
        assert_eq!(refusal(refused)["charged"], false);
    }
    assert!(listed.iter().any(|t| t["name"] == "up_search"));
    assert_eq!(well_known.status(), StatusCode::OK);
    assert_eq!(app.balance(app.payer().address()).await, before);
    assert_eq!(fake.calls(), 0);
    let metrics = metrics(&app).await;
    let unavailable = ["upstream=\"saas-redis-down\"", "reason=\"unavailable\""];
    assert_eq!(series(&metrics, "tollgate_upstream_refusals_total", &unavailable), Some(2.0), "{metrics}");
    app.shutdown().await;
}

#[tokio::test]
async fn a_call_paid_before_it_ran_still_pauses_sales_when_it_meets_the_throttle() {
    // Arrange: blocks are mined when the test says so; settlement waits 1 s at most.
    let (fake, url) = FakeUpstream::start().await;
    let app = app_selling(&url, |u, c| {
        u.name = "saas-paid-late".into();
        c.payment.settle_timeout_secs = 1;
    })
    .await;
    let args = json!({ "q": "late" });
    let payment = signed(&app, &app.mcp_url(), "up_search", &args).await;
    app.anvil_rpc("evm_setAutomine", json!([false])).await;
    let pending = pay_at(&app.mcp_url(), "up_search", &args, &payment).await;
    assert_eq!(pending["structuredContent"]["error"], "payment_confirmation_pending", "{pending}");
    // Act: the transfer lands; the retry runs what was paid for, and meets a 429.
    app.anvil_rpc("evm_mine", json!([])).await;
    app.anvil_rpc("evm_setAutomine", json!([true])).await;
    fake.throttled.store(true, Ordering::SeqCst);
    let met = pay_at(&app.mcp_url(), "up_search", &args, &payment).await;
    let next = app.sessionless().call_tool("up_search", json!({ "q": "next" }), None).await;
    // Assert: the paid call ran (its money had moved), and the throttle it met stops sales.
    assert_eq!(met["structuredContent"]["error"], "upstream_throttled", "{met}");
    assert_eq!(met["_meta"]["tollgate/receipt"]["body"]["outcome"], "tool_error", "{met}");
    assert_paused(&next, 30);
    app.shutdown().await;
}

#[tokio::test]
async fn a_caller_who_hangs_up_on_a_free_upstream_call_does_not_free_its_slot_while_the_upstream_works() {
    // Arrange: one call at a time into the upstream; its tools free here.
    let (fake, url) = FakeUpstream::start().await;
    let app = app_selling(&url, |u, _| {
        u.name = "saas-hang-up".into();
        u.max_in_flight = 1;
        u.free = vec!["slow".into(), "search".into()];
    })
    .await;
    let body = json!({ "jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": { "name": "up_slow", "arguments": { "q": "x" } } });
    let impatient = reqwest::Client::builder().timeout(Duration::from_millis(500)).build().unwrap();
    // Act: a caller asks for the slow call and hangs up while the upstream works on it; then
    // another caller asks.
    let hung_up = impatient
        .post(app.mcp_url())
        .header("accept", "application/json, text/event-stream")
        .json(&body)
        .send()
        .await;
    assert!(hung_up.is_err(), "the caller gave up: {hung_up:?}");
    assert_eq!(fake.started_slow.load(Ordering::SeqCst), 1, "the upstream has the call");
    let meanwhile = app.sessionless().call_tool("up_search", json!({ "q": "y" }), None).await;
    fake.release.add_permits(1);
    let mut after = Value::Null;
    for _ in 0..100 {
        after = app.sessionless().call_tool("up_search", json!({ "q": "z" }), None).await;
        if refusal(&after)["reason"] != "in_flight" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Assert: the slot stayed taken while the upstream worked, and came back when it answered.
    assert_eq!(refusal(&meanwhile)["reason"], "in_flight", "{meanwhile}");
    assert!(after["content"][0]["text"].as_str().is_some_and(|t| t.starts_with("results for z")), "{after}");
    assert_eq!(fake.calls(), 2, "the slow call and the last one; the refused call never reached it");
    app.shutdown().await;
}
