//! Money is integers: USDC amounts in atomic units (6 decimals), never floats.

use std::fmt;

/// USDC has 6 decimals: 1 USDC = 1_000_000 atomic units.
pub const USDC_DECIMALS: u32 = 6;

/// An amount of USDC in atomic units. `u64` holds more than the whole USDC supply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct UsdcAmount(u64);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    #[error("amount must be a whole number of atomic units (digits only), got {0:?}")]
    NotAnInteger(String),
    #[error("amount {0:?} is too large")]
    TooLarge(String),
}

impl UsdcAmount {
    pub const ZERO: UsdcAmount = UsdcAmount(0);

    pub const fn from_atomic(units: u64) -> Self {
        UsdcAmount(units)
    }

    /// Parses a decimal string of atomic units, as x402 writes amounts ("10000" = 0.01 USDC).
    pub fn parse(s: &str) -> Result<Self, AmountError> {
        if s.is_empty() || s.len() > 39 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(AmountError::NotAnInteger(s.chars().take(40).collect()));
        }
        s.parse::<u64>().map(UsdcAmount).map_err(|_| AmountError::TooLarge(s.to_owned()))
    }

    pub const fn atomic(self) -> u64 {
        self.0
    }

    pub const fn is_zero(self) -> bool {
        self.0 == 0
    }

    /// Human form for logs and CLI output, exact: "0.0025 USDC".
    pub fn display_usdc(self) -> String {
        let scale = 10u64.pow(USDC_DECIMALS);
        let frac = format!("{:06}", self.0 % scale);
        let frac = frac.trim_end_matches('0');
        if frac.is_empty() {
            format!("{} USDC", self.0 / scale)
        } else {
            format!("{}.{frac} USDC", self.0 / scale)
        }
    }
}

impl fmt::Display for UsdcAmount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl std::str::FromStr for UsdcAmount {
    type Err = AmountError;
    fn from_str(s: &str) -> Result<Self, AmountError> {
        UsdcAmount::parse(s)
    }
}

/// Written as x402 writes amounts: a decimal string of atomic units.
impl serde::Serialize for UsdcAmount {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Read from a decimal string ("2500"), as config files and x402 write amounts, or from a
/// plain integer (as an environment variable's value arrives).
impl<'de> serde::Deserialize<'de> for UsdcAmount {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Number(u64),
        }
        match Raw::deserialize(d)? {
            Raw::Text(s) => UsdcAmount::parse(&s).map_err(serde::de::Error::custom),
            Raw::Number(n) => Ok(UsdcAmount(n)),
        }
    }
}

impl From<UsdcAmount> for alloy::primitives::U256 {
    fn from(a: UsdcAmount) -> Self {
        alloy::primitives::U256::from(a.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_only_whole_atomic_units() {
        assert_eq!(UsdcAmount::parse("10000").unwrap().atomic(), 10_000);
        assert_eq!(UsdcAmount::parse("0").unwrap(), UsdcAmount::ZERO);
        for bad in ["", "1.5", "-1", "+1", "1e6", " 1", "0x10"] {
            assert!(UsdcAmount::parse(bad).is_err(), "{bad:?} must be rejected");
        }
        assert!(matches!(UsdcAmount::parse("18446744073709551616"), Err(AmountError::TooLarge(_))));
    }

    #[test]
    fn displays_exact_decimal_usdc() {
        assert_eq!(UsdcAmount::from_atomic(2500).display_usdc(), "0.0025 USDC");
        assert_eq!(UsdcAmount::from_atomic(100_000_000).display_usdc(), "100 USDC");
        assert_eq!(UsdcAmount::from_atomic(1_000_001).display_usdc(), "1.000001 USDC");
    }
}
