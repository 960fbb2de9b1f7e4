//! A local anvil chain for `tollgate dev` and the tests: found or installed, started, stopped.
//!
//! anvil ships as the npm package `@foundry-rs/anvil-linux-amd64` (a real binary inside a
//! registry package), so it is installed with npm into a project-local tools directory when it
//! is not on PATH. The child is killed when [`Anvil`] is dropped, so Ctrl-C stops the chain too.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The npm package that carries the anvil binary, pinned so every machine runs the same chain.
pub const ANVIL_NPM_PACKAGE: &str = "@foundry-rs/anvil-linux-amd64@1.7.1";

/// anvil's well-known development keys (from its default mnemonic "test test … junk"). They are
/// public test fixtures, funded with ETH only on anvil; never use them on a real network.
pub const DEV_KEYS: [&str; 7] = [
    "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80",
    "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d",
    "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a",
    "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6",
    "0x47e179ec197488593b187f80a00eb0da91f1b9d0b13f8733639f19c30a34926a",
    "0x8b3a350cf5c34c9194ca85829a2df0ec3153be0318b5e2d3348e872092edffba",
    "0x92db14e403b83dfe3df233f83dfa3a0d7096f21ca9b0d6d6b8d88b2b4ec1564e",
];

/// A running anvil process.
pub struct Anvil {
    child: Child,
    port: u16,
}

impl Anvil {
    /// Starts anvil on `port` (0 = any free port) and waits until it listens.
    pub async fn start(binary: &Path, port: u16, extra_args: &[&str]) -> anyhow::Result<Anvil> {
        let mut child = Command::new(binary)
            .args(["--port", &port.to_string(), "--host", "127.0.0.1"])
            .args(extra_args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let stdout = child.stdout.take().context("anvil stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let port = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await? {
                if let Some(addr) = line.trim().strip_prefix("Listening on ") {
                    let port = addr.rsplit(':').next().unwrap_or_default().parse::<u16>()?;
                    return anyhow::Ok(port);
                }
            }
            anyhow::bail!("anvil exited before listening")
        })
        .await
        .context("anvil did not start within 30s")??;
        // Keep draining stdout so anvil never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Anvil { child, port })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Stops the chain and waits for the process to exit.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// Finds anvil on PATH or in `<state_dir>/tools`, installing it there with npm if needed.
pub async fn find_or_install(state_dir: &Path) -> anyhow::Result<PathBuf> {
    if let Some(found) = find(state_dir) {
        return Ok(found);
    }
    let tools = state_dir.join("tools");
    tokio::fs::create_dir_all(&tools).await?;
    tracing::info!(package = ANVIL_NPM_PACKAGE, dir = %tools.display(), "installing anvil with npm");
    let status = Command::new("npm")
        .args(["install", "--no-audit", "--no-fund", "--silent", "--prefix"])
        .arg(&tools)
        .arg(ANVIL_NPM_PACKAGE)
        .stdin(Stdio::null())
        .status()
        .await
        .context("running npm (is Node.js installed?)")?;
    anyhow::ensure!(status.success(), "npm install {ANVIL_NPM_PACKAGE} failed: {status}");
    find(state_dir).context("anvil still not found after npm install")
}

fn find(state_dir: &Path) -> Option<PathBuf> {
    let local = state_dir.join("tools/node_modules/.bin/anvil");
    if local.is_file() {
        return Some(local);
    }
    std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|dir| dir.join("anvil")).find(|p| p.is_file()))
}
