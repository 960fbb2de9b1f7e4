//! The binary: config errors, print-default-config, keygen, and `tollgate dev` end to end.

use std::process::Stdio;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::helpers::{Mcp, anvil_ready, repo_root};

fn tollgate() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate"));
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    cmd
}

#[tokio::test]
async fn print_default_config_prints_every_section() {
    let out = tollgate().arg("print-default-config").output().await.unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for section in [
        "[server]",
        "[network]",
        "[payment]",
        "[payment.facilitator]",
        "[database]",
        "[tools.prices]",
        "[dev]",
    ] {
        assert!(text.contains(section), "missing {section}");
    }
}

#[tokio::test]
async fn a_bad_config_value_fails_at_start_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[payment]\nmax_timeout_seconds = 5\n").unwrap();
    let out = tollgate().arg("--config").arg(&file).arg("serve").output().await.unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("payment.max_timeout_seconds"), "{err}");
    // From the environment too.
    let out = tollgate().env("TOLLGATE_SERVER__BIND", "nope").arg("serve").output().await.unwrap();
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(!out.status.success() && err.to_lowercase().contains("server.bind"), "{err}");
}

#[tokio::test]
async fn serve_without_a_payee_says_which_key_is_missing() {
    let out = tollgate().arg("serve").output().await.unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8(out.stderr).unwrap().contains("payment.pay_to"));
}

#[tokio::test]
async fn keygen_prints_the_public_key_but_never_the_private_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.key");
    let out = tollgate().arg("keygen").arg("--out").arg(&path).output().await.unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    let seed = std::fs::read_to_string(&path).unwrap();
    assert!(stdout.contains("key id:     ed25519:"));
    assert!(!stdout.contains(seed.trim()), "the private key must not be printed");
}

#[tokio::test]
async fn tollgate_dev_serves_tools_and_challenges_then_stops_anvil_on_signal() {
    // Arrange: the real binary, its own state dir, anvil from the repo's tools dir on PATH.
    anvil_ready().await;
    let dir = tempfile::tempdir().unwrap();
    let anvil_bin = repo_root().join(".tollgate/tools/node_modules/.bin");
    let path = format!("{}:{}", anvil_bin.display(), std::env::var("PATH").unwrap_or_default());
    let mut child = tollgate()
        .arg("dev")
        .env("PATH", path)
        .env("TOLLGATE_SERVER__BIND", "127.0.0.1:0")
        .env("TOLLGATE_DEV__STATE_DIR", dir.path())
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut log_lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let logs = tokio::spawn(async move {
        let mut all = Vec::new();
        while let Ok(Some(line)) = log_lines.next_line().await {
            all.push(line);
        }
        all
    });
    // Act: wait for "serving", then use it like a client would.
    let mut banner = Vec::new();
    let url = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let line = lines.next_line().await.unwrap().expect("dev exited early");
            banner.push(line.clone());
            if let Some(url) = line.strip_prefix("tollgate dev: serving ") {
                return url.to_owned();
            }
        }
    })
    .await
    .expect("dev reaches serving");
    loop {
        let line = lines.next_line().await.unwrap().expect("banner");
        banner.push(line.clone());
        if line.starts_with("Ctrl-C") {
            break;
        }
    }
    let mcp = Mcp::sessionless(&url);
    let tools = mcp.list_tools().await;
    let challenge = mcp.call_tool("quote_of_the_day", json!({}), None).await;
    // Assert
    assert_eq!(tools.len(), 3);
    assert_eq!(challenge["structuredContent"]["accepts"][0]["amount"], "2500");
    let banner = banner.join("\n");
    assert!(banner.contains("demo payer"), "{banner}");
    let key = std::fs::read_to_string(dir.path().join("dev/payer.key")).unwrap();
    assert!(!banner.contains(key.trim().trim_start_matches("0x")), "the payer key is never printed");
    let chain_port: u16 = banner
        .lines()
        .find_map(|l| l.trim().strip_prefix("chain       anvil at http://127.0.0.1:"))
        .and_then(|rest| rest.split(' ').next())
        .and_then(|p| p.parse().ok())
        .expect("banner names the chain");
    // The printed paid-call command works as printed.
    let command =
        banner.lines().find(|l| l.contains(" call --url ")).expect("a call command").trim().to_owned();
    let paid = Command::new("sh").arg("-c").arg(&command).current_dir(dir.path()).output().await.unwrap();
    let stdout = String::from_utf8_lossy(&paid.stdout);
    assert!(paid.status.success(), "{command}\n{stdout}\n{}", String::from_utf8_lossy(&paid.stderr));
    assert!(stdout.contains("\"success\":true") && stdout.contains("\"sha256\""), "{stdout}");
    // Ctrl-C (SIGINT) stops the server and the chain with it.
    let pid = child.id().unwrap().to_string();
    Command::new("kill").args(["-INT", &pid]).status().await.unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "dev exits cleanly: {status}");
    let chain_alive = tokio::net::TcpStream::connect(("127.0.0.1", chain_port)).await.is_ok();
    assert!(!chain_alive, "anvil must stop with tollgate dev");
    // Its logs are for a person: no JSON, and no rmcp line per request at the default filter.
    let logs = logs.await.unwrap();
    assert!(logs.iter().any(|l| l.contains("INFO")), "dev logs something: {logs:?}");
    assert!(!logs.iter().any(|l| l.trim_start().starts_with('{')), "dev logs are not JSON: {logs:?}");
    assert!(!logs.iter().any(|l| l.contains("rmcp")), "no rmcp request lines: {logs:?}");
}

#[tokio::test]
async fn the_shipped_production_and_compose_configs_load_and_validate() {
    for file in ["deploy/production.toml", "deploy/compose.toml"] {
        let path = repo_root().join(file);
        let mut config =
            tollgate::config::Config::load(Some(&path)).unwrap_or_else(|e| panic!("{file}: {e}"));
        // Secrets come from the environment in production; stand-ins here.
        config.network.rpc_url = "http://127.0.0.1:8545".to_owned().into();
        config.receipts.key = "11".repeat(32).into();
        config.payment.relayer_key = tollgate::chain::anvil::DEV_KEYS[1].to_owned().into();
        if config.payment.pay_to.is_none() {
            // production.toml leaves the payee for the operator to fill in; serve refuses without.
            assert!(config.validate_for_serving().unwrap_err().to_string().contains("payment.pay_to"));
            config.payment.pay_to = Some("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC".parse().unwrap());
        }
        config.validate().unwrap_or_else(|e| panic!("{file}: {e}"));
        config.validate_for_serving().unwrap_or_else(|e| panic!("{file}: {e}"));
    }
}

#[tokio::test]
async fn deploy_test_token_deploys_and_funds_on_a_local_chain() {
    anvil_ready().await;
    let binary = tollgate::chain::anvil::find_or_install(&repo_root().join(".tollgate")).await.unwrap();
    let anvil = tollgate::chain::anvil::Anvil::start(&binary, 0, &[]).await.unwrap();
    let payer = "0x90F79bf6EB2c4f870365E785982E1f101E93b906";
    let out = tollgate()
        .args(["deploy-test-token", "--rpc", &anvil.endpoint(), "--mint-to", payer])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token: alloy::primitives::Address = String::from_utf8(out.stdout).unwrap().trim().parse().unwrap();
    let chain = tollgate::chain::client::ChainClient::connect(&anvil.endpoint(), token).unwrap();
    assert_eq!(
        chain.balance_of(payer.parse().unwrap()).await.unwrap(),
        alloy::primitives::U256::from(100_000_000u64)
    );
    anvil.stop().await;
}

#[tokio::test]
async fn listing_runs_from_public_config_alone_without_the_relayer_key() {
    // Arrange: payTo, network and public URL; the receipt *public* key of a retired seed; no
    // relayer key, no receipt seed, no database, and a chain that is not there.
    let dir = tempfile::tempdir().unwrap();
    let public = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";
    let out = tollgate()
        .arg("listing")
        .current_dir(dir.path())
        .env("TOLLGATE_PAYMENT__PAY_TO", "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC")
        .env("TOLLGATE_NETWORK__ASSET", "0x5FbDB2315678afecb367f032d93F642f64180aa3")
        .env("TOLLGATE_NETWORK__RPC_URL", "http://127.0.0.1:1/")
        .env("TOLLGATE_SERVER__PUBLIC_URL", "https://tools.example.com/mcp")
        .env("TOLLGATE_RECEIPTS__PREVIOUS_PUBLIC_KEYS", format!("[\"{public}\"]"))
        .env_remove("TOLLGATE_PAYMENT__RELAYER_KEY")
        .env_remove("TOLLGATE_RECEIPTS__KEY")
        .output()
        .await
        .unwrap();
    // Assert
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "listing failed: {stderr}");
    let docs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let server = &docs["server.json"];
    assert_eq!(server["remotes"][0]["url"], "https://tools.example.com/mcp");
    let x402 = &server["_meta"]["io.modelcontextprotocol.registry/publisher-provided"]["x402"];
    assert_eq!(x402["payTo"], "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC");
    assert_eq!(x402["receiptKeys"][0]["publicKey"], public);
    assert!(
        x402["tools"].as_array().unwrap().iter().any(|t| t["name"] == "sha256" && t["price"].is_object())
    );
    assert!(!docs["x402_discovery"]["accepts"].as_array().unwrap().is_empty());
}
