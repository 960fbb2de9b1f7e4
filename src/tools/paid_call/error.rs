//! `CallError`: every way a `tools/call` ends without the tool's own answer, by stage.
//!
//! Each variant says what is known about money through [`CallError::money`]: the renderer
//! turns `Money::Unmoved` into `charged: false` and makes no claim for `Money::MayHaveMoved`.

use crate::limits::LimitError;
use crate::payment::price::PriceError;
use crate::payment::{Money, PaymentError};
use crate::protect::UpstreamRefusal;

/// The arguments do not match the tool's input schema (checked before any quote).
#[derive(Debug, Clone, thiserror::Error)]
#[error("arguments for `{tool}` do not match its input schema")]
pub struct ArgumentError {
    pub tool: String,
    /// Readable problems, at most ten.
    pub problems: Vec<String>,
}

/// The tool cannot run now (its upstream is down), so no payment is taken for it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct ToolUnavailable(pub String);

#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    #[error(transparent)]
    Arguments(#[from] ArgumentError),
    /// The tool's price expression failed for these arguments.
    #[error(transparent)]
    Price(#[from] PriceError),
    /// A priced tool called without a payment: the challenge.
    #[error("payment required")]
    PaymentRequired,
    #[error(transparent)]
    Payment(#[from] PaymentError),
    #[error(transparent)]
    Limited(#[from] LimitError),
    #[error(transparent)]
    Unavailable(#[from] ToolUnavailable),
    /// The upstream's budget or state refuses the call (quota, in flight, paused).
    #[error(transparent)]
    Upstream(#[from] UpstreamRefusal),
    /// Our side failed after the payment was verified; nothing more is known.
    #[error("internal error: {0}")]
    Internal(String),
}

impl CallError {
    /// Whether the answer is a price: a first challenge, or a payment that was not accepted.
    pub fn is_challenge(&self) -> bool {
        match self {
            CallError::PaymentRequired => true,
            CallError::Payment(e) => e.is_challenge(),
            _ => false,
        }
    }

    pub fn money(&self) -> Money {
        match self {
            CallError::Payment(e) => e.money(),
            CallError::Internal(_) => Money::MayHaveMoved,
            CallError::Arguments(_)
            | CallError::Price(_)
            | CallError::PaymentRequired
            | CallError::Limited(_)
            | CallError::Unavailable(_)
            | CallError::Upstream(_) => Money::Unmoved,
        }
    }
}
