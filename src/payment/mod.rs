//! The x402 payment stage, in pipeline order: decode and verify (local), claim, settle,
//! reconcile. `requirements` turns prices into `accepts`; `wire` holds the x402 v2 types.

pub mod decode;
pub mod error;
pub mod gate;
pub mod offer;
pub mod price;
pub mod reconcile;
pub mod refund;
pub mod requirements;
mod resolve;
pub mod settle;
pub mod verify;
pub mod wallet;
pub mod wire;

pub use error::{Money, PaymentError};
