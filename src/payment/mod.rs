//! The x402 payment stage: requirements (price → `accepts`), wire types, and — in order —
//! local verification, the atomic claim and settlement.

pub mod requirements;
pub mod wire;
