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
