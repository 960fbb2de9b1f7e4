//! Spend controls for the paying client: which assets may be paid, how much per call, and a
//! running total kept in a local file. The same protections the official x402 clients offer
//! (as the official x402 clients' spend controls do), with errors that say which limit refused and why.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::chain::{BASE_SEPOLIA_USDC, BASE_USDC};
use crate::money::UsdcAmount;
use crate::payment::wire::PaymentRequirements;

/// An asset the client agrees to pay with: `(network, token address)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedAsset {
    pub network: String,
    pub asset: String,
}

impl AllowedAsset {
    /// Parses `eip155:N:0xADDRESS`.
    pub fn parse(s: &str) -> Result<AllowedAsset, String> {
        let (network, asset) = s.rsplit_once(':').ok_or("expected NETWORK:ASSET, e.g. eip155:8453:0x…")?;
        if !network.starts_with("eip155:") || asset.parse::<alloy::primitives::Address>().is_err() {
            return Err(format!("{s:?} is not eip155:CHAIN:0xADDRESS"));
        }
        Ok(AllowedAsset { network: network.to_owned(), asset: asset.to_owned() })
    }

    /// USDC on Base and Base Sepolia: allowed without asking.
    pub fn defaults() -> Vec<AllowedAsset> {
        vec![
            AllowedAsset { network: "eip155:8453".into(), asset: BASE_USDC.to_checksum(None) },
            AllowedAsset { network: "eip155:84532".into(), asset: BASE_SEPOLIA_USDC.to_checksum(None) },
        ]
    }

    fn matches(&self, r: &PaymentRequirements) -> bool {
        self.network == r.network && self.asset.eq_ignore_ascii_case(&r.asset)
    }
}

/// The limits one `tollgate call` runs under.
#[derive(Debug, Clone)]
pub struct SpendCaps {
    pub allowed_assets: Vec<AllowedAsset>,
    pub max_per_call: UsdcAmount,
    /// Optional cap on the total ever spent, tracked in `ledger`.
    pub total_cap: Option<(UsdcAmount, PathBuf)>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Ledger {
    /// Atomic units spent (or reserved for a payment in flight), as a decimal string.
    spent: String,
}

impl SpendCaps {
    /// Picks the first requirement these caps allow (servers order `accepts` by preference),
    /// or explains why each was refused.
    pub fn choose<'a>(&self, accepts: &'a [PaymentRequirements]) -> Result<&'a PaymentRequirements, String> {
        let mut reasons = Vec::new();
        for r in accepts {
            match self.check(r) {
                Ok(()) => return Ok(r),
                Err(why) => reasons.push(format!("{} {} on {}: {why}", r.amount, r.asset, r.network)),
            }
        }
        if reasons.is_empty() {
            return Err("the server offered no way to pay".into());
        }
        Err(format!("no acceptable payment option:\n  {}", reasons.join("\n  ")))
    }

    fn check(&self, r: &PaymentRequirements) -> Result<(), String> {
        if r.scheme != "exact" || !r.network.starts_with("eip155:") {
            return Err(format!("scheme {:?} on {:?} is not supported", r.scheme, r.network));
        }
        if !self.allowed_assets.iter().any(|a| a.matches(r)) {
            return Err("asset not allowed (add --allow-asset NETWORK:ASSET to pay with it)".into());
        }
        let amount = UsdcAmount::parse(&r.amount).map_err(|e| e.to_string())?;
        if amount > self.max_per_call {
            return Err(format!(
                "price {} exceeds --max-amount {}",
                amount.display_usdc(),
                self.max_per_call.display_usdc()
            ));
        }
        if let Some((cap, ledger)) = &self.total_cap {
            let spent = read_ledger(ledger)?;
            if spent.atomic().saturating_add(amount.atomic()) > cap.atomic() {
                return Err(format!(
                    "would exceed the total cap {} (already spent {})",
                    cap.display_usdc(),
                    spent.display_usdc()
                ));
            }
        }
        Ok(())
    }

    /// Adds `amount` to the ledger (before paying); `release` takes it back if nothing moved.
    pub fn reserve(&self, amount: UsdcAmount) -> Result<(), String> {
        self.adjust(|spent| spent.saturating_add(amount.atomic()))
    }

    pub fn release(&self, amount: UsdcAmount) -> Result<(), String> {
        self.adjust(|spent| spent.saturating_sub(amount.atomic()))
    }

    fn adjust(&self, f: impl Fn(u64) -> u64) -> Result<(), String> {
        let Some((_, ledger)) = &self.total_cap else { return Ok(()) };
        let spent = UsdcAmount::from_atomic(f(read_ledger(ledger)?.atomic()));
        write_ledger(ledger, spent)
    }
}

fn read_ledger(path: &Path) -> Result<UsdcAmount, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let ledger: Ledger =
                serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
            UsdcAmount::parse(&ledger.spent).map_err(|e| format!("{}: {e}", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(UsdcAmount::ZERO),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Written to a temporary file and renamed, so a crash never leaves a torn ledger.
fn write_ledger(path: &Path, spent: UsdcAmount) -> Result<(), String> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    }
    let tmp = path.with_extension("tmp");
    let body = serde_json::to_string(&Ledger { spent: spent.to_string() }).expect("serialises");
    std::fs::write(&tmp, body).map_err(|e| e.to_string())?;
    std::fs::rename(&tmp, path).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payment::wire::Eip712Extra;

    fn req(amount: &str, asset: &str) -> PaymentRequirements {
        PaymentRequirements {
            scheme: "exact".into(),
            network: "eip155:8453".into(),
            amount: amount.into(),
            asset: asset.into(),
            pay_to: "0x0000000000000000000000000000000000000001".into(),
            max_timeout_seconds: 60,
            extra: Eip712Extra { name: "USD Coin".into(), version: "2".into(), offer: None },
        }
    }

    #[test]
    fn chooses_the_first_allowed_option_and_explains_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = dir.path().join("spend.json");
        let caps = SpendCaps {
            allowed_assets: AllowedAsset::defaults(),
            max_per_call: UsdcAmount::from_atomic(5_000),
            total_cap: Some((UsdcAmount::from_atomic(6_000), ledger.clone())),
        };
        let usdc = BASE_USDC.to_checksum(None);
        let other = "0x0000000000000000000000000000000000000bad";
        let accepts = [req("1000", other), req("9000", &usdc), req("4000", &usdc)];
        assert_eq!(caps.choose(&accepts).unwrap().amount, "4000");
        caps.reserve(UsdcAmount::from_atomic(4_000)).unwrap();
        let err = caps.choose(&accepts[2..]).unwrap_err();
        assert!(err.contains("total cap"), "{err}");
        caps.release(UsdcAmount::from_atomic(4_000)).unwrap();
        assert!(caps.choose(&accepts[2..]).is_ok(), "released reservations free the cap");
        let err = caps.choose(&accepts[..2]).unwrap_err();
        assert!(err.contains("asset not allowed") && err.contains("exceeds --max-amount"), "{err}");
    }

    #[test]
    fn allowed_assets_parse_network_and_address() {
        let a = AllowedAsset::parse("eip155:31337:0x5FbDB2315678afecb367f032d93F642f64180aa3").unwrap();
        assert_eq!(a.network, "eip155:31337");
        assert!(AllowedAsset::parse("eip155:1").is_err());
        assert!(AllowedAsset::parse("solana:x:0x12").is_err());
    }
}
