//! `tollgate doctor` (#18 item 5): a good dev setup passes; each broken setting fails its check,
//! by name, and the command exits non-zero.

use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};
use tollgate::config::{Config, LimitBackend, SettlerKind, secret_opt};
use tollgate::doctor::{Report, Status};

use crate::helpers::{TestApp, serve_on_loopback, spawn_app};

fn status(report: &Report, check: &str) -> Status {
    report.check(check).unwrap_or_else(|| panic!("no check {check}: {report:?}")).status
}

/// A facilitator that settles our network and takes one bearer token: `/verify` refuses
/// anything else with 401, and judges an unsigned payload as invalid (400).
async fn facilitator_wanting(token: &'static str) -> String {
    let verify = axum::routing::post(move |headers: HeaderMap| async move {
        match headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(token) {
            true => (
                StatusCode::BAD_REQUEST,
                axum::Json(json!({ "isValid": false, "invalidReason": "invalid_payload" })),
            ),
            false => (StatusCode::UNAUTHORIZED, axum::Json(json!({ "errorMessage": "unauthorized" }))),
        }
    });
    let supported = axum::routing::get(|| async {
        axum::Json(
            json!({ "kinds": [{ "x402Version": 2, "scheme": "exact", "network": "eip155:31337" }], "signers": {} }),
        )
    });
    serve_on_loopback(axum::Router::new().route("/verify", verify).route("/supported", supported)).await
}

/// A change that breaks one setting.
type Breaks = Box<dyn Fn(&mut Config)>;

fn good(app: &TestApp) -> Config {
    let mut config = app.state.config.clone();
    // Redis runs on every machine here: check it too.
    config.limits.backend = LimitBackend::Redis;
    config
}

#[tokio::test]
async fn doctor_passes_a_good_setup_and_fails_each_broken_setting_by_name() {
    let app = spawn_app().await;
    let report = tollgate::doctor::run(&good(&app)).await;
    println!("{}", report.render());
    assert!(report.ok, "{}", report.render());
    assert!(report.checks.iter().all(|c| c.status != Status::Fail));
    assert_eq!(status(&report, "eip712_domain"), Status::Ok);
    assert!(report.check("eip712_domain").unwrap().detail.contains("EIP-5267"), "{}", report.render());
    // Each broken setting, and the check that must catch it.
    let relayer =
        tollgate::chain::parse_private_key(secret_opt(&app.state.config.payment.relayer_key).unwrap())
            .unwrap()
            .address();
    let fresh_db = format!("sqlite://{}", app.dir.path().join("never-migrated.db").display());
    let broken: Vec<(&str, Breaks)> = vec![
        ("chain_id", Box::new(|c| c.network.chain_id = 8453)),
        ("eip712_domain", Box::new(|c| c.network.eip712_name = "USDC".into())),
        ("eip712_domain", Box::new(|c| c.network.eip712_version = "1".into())),
        ("pay_to", Box::new(|c| c.payment.pay_to = Some(alloy::primitives::Address::ZERO))),
        ("pay_to", Box::new(move |c| c.payment.pay_to = Some(relayer))),
        ("relayer_gas", Box::new(|c| c.payment.min_relayer_balance_wei = u128::MAX)),
        ("migrations", Box::new(move |c| c.database.url = fresh_db.clone().into())),
        ("redis", Box::new(|c| c.limits.redis_url = "redis://127.0.0.1:1".to_owned().into())),
    ];
    for (check, breaks) in broken {
        let mut config = good(&app);
        breaks(&mut config);
        let report = tollgate::doctor::run(&config).await;
        assert!(!report.ok, "{check}: {}", report.render());
        assert_eq!(status(&report, check), Status::Fail, "{check}: {}", report.render());
    }
    // A facilitator: /supported is checked, and credentials it refuses fail the auth check,
    // while the right ones pass (its 400 is about the unsigned probe, not about us).
    let url = facilitator_wanting("Bearer right").await;
    for (header, auth) in [("Bearer right", Status::Ok), ("Bearer wrong", Status::Fail)] {
        let mut config = good(&app);
        config.payment.settler = SettlerKind::Facilitator;
        config.payment.facilitator.url = url.clone();
        config.payment.facilitator.auth_header = header.to_owned().into();
        let report = tollgate::doctor::run(&config).await;
        assert_eq!(status(&report, "facilitator_supported"), Status::Ok, "{}", report.render());
        assert_eq!(status(&report, "facilitator_auth"), auth, "{}", report.render());
        assert_eq!(status(&report, "relayer_gas"), Status::Skip);
    }
    app.shutdown().await;
}

#[tokio::test]
async fn the_doctor_command_prints_a_table_or_json_and_exits_non_zero_on_a_failure() {
    let app = spawn_app().await;
    let c = &app.state.config;
    let env = [
        ("TOLLGATE_NETWORK__RPC_URL", secret_opt(&c.network.rpc_url).unwrap().to_owned()),
        ("TOLLGATE_NETWORK__ASSET", c.network.asset.unwrap().to_string()),
        ("TOLLGATE_PAYMENT__PAY_TO", c.payment.pay_to.unwrap().to_string()),
        ("TOLLGATE_PAYMENT__RELAYER_KEY", secret_opt(&c.payment.relayer_key).unwrap().to_owned()),
        ("TOLLGATE_DATABASE__URL", secret_opt(&c.database.url).unwrap().to_owned()),
        ("TOLLGATE_RECEIPTS__KEY", secret_opt(&c.receipts.key).unwrap().to_owned()),
    ];
    let doctor = |extra: &[(&str, &str)], json: bool| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tollgate"));
        cmd.arg("doctor").envs(env.iter().map(|(k, v)| (*k, v.as_str()))).envs(extra.iter().copied());
        if json {
            cmd.arg("--json");
        }
        cmd.output()
    };
    let out = doctor(&[], true).await.unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(out.status.success(), "{report}");
    assert_eq!(report["ok"], true);
    let out = doctor(&[("TOLLGATE_NETWORK__EIP712_NAME", "USDC")], false).await.unwrap();
    let table = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "{table}");
    let line = table.lines().find(|l| l.starts_with("eip712_domain")).unwrap();
    assert!(line.contains("FAIL") && line.contains("every payment would fail verification"), "{table}");
    assert!(!table.contains(secret_opt(&c.payment.relayer_key).unwrap()), "no secret in the report");
    app.shutdown().await;
}
