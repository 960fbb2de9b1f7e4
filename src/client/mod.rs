//! The paying client behind `tollgate call`: signs EIP-3009 authorizations within spend caps.

pub mod sign;
