//! `PaymentError`: every way a payment can be refused, named by its reason.
//!
//! Each variant knows its x402 reason code and whether it is a *challenge* (the payment was not
//! accepted: pay again, properly — answered with PaymentRequired) or a *status* (the payment
//! was accepted or is being processed — never answered with a fresh price, so a client does
//! not sign a second authorization and pay twice).

/// Why a payment did not (yet) buy a result.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PaymentError {
    // ---- decoding: nothing was charged ----
    #[error("payment payload is malformed: {0}")]
    Malformed(String),
    #[error("payment payload exceeds {limit} bytes")]
    TooLarge { limit: usize },
    #[error("x402Version {0} is not supported (expected 2)")]
    UnsupportedVersion(u64),

    // ---- local verification: nothing was charged ----
    #[error("accepted.{field} does not match this tool's payment requirements")]
    RequirementsMismatch { field: &'static str },
    #[error(
        "the EIP-712 signature is not authorization.from's (neither its ECDSA nor its wallet's ERC-1271)"
    )]
    BadSignature,
    #[error("the smart wallet's ERC-6492 factory is not one this server accepts")]
    FactoryNotAllowed,
    #[error("the smart wallet could not be deployed through its factory")]
    WalletDeploymentFailed,
    #[error("authorization.to is not this server's payTo address")]
    RecipientMismatch,
    #[error("authorization expires too soon (validBefore must be at least {margin_secs}s in the future)")]
    Expired { margin_secs: u64 },
    #[error("authorization is not valid yet (validAfter is in the future)")]
    NotYetValid,
    #[error(
        "authorization stays valid too long (validBefore may be at most maxTimeoutSeconds = {max_secs}s away)"
    )]
    TooLong { max_secs: u64 },
    #[error("authorization.value must equal the price exactly")]
    WrongAmount,
    #[error("the payment-identifier is malformed (16-128 characters of [A-Za-z0-9_-])")]
    BadPaymentIdentifier,
    #[error(
        "the offer this payment answers has expired (offers last maxTimeoutSeconds); pay the current price"
    )]
    OfferExpired,

    // ---- claim and chain state: nothing was charged ----
    #[error("this authorization's nonce was already used")]
    NonceReused,
    #[error("this payment-identifier was already used with a different payment")]
    IdentifierConflict,
    #[error("the payer's USDC balance is below the price")]
    InsufficientBalance,
    #[error("the settlement was refused: {reason}")]
    SettlementFailed { reason: String },
    #[error(
        "a simulated transferWithAuthorization of this payment fails ({reason}); nothing was run or charged"
    )]
    SimulationFailed { reason: String },
    #[error(
        "the tool ran, but its payment could not be settled ({reason}): the result is withheld and \
         nothing was charged"
    )]
    Withheld { reason: String },
    #[error(
        "this authorization already paid for another call (a different tool or other arguments); \
         nothing was charged for this request"
    )]
    AlreadyUsed,

    // ---- statuses: the payment is accepted or in flight; do not pay again ----
    #[error(
        "the settlement was submitted but is not confirmed yet; resend the same payment to get the result"
    )]
    Pending { transaction: Option<String> },
    #[error("this payment is being processed by another request; resend the same payment to get the result")]
    InProgress,
    #[error(
        "the payment may have been charged, but the server could not record its outcome; resend the \
         same payment (never a new one) to get its result"
    )]
    OutcomeUnknown { transaction: Option<String> },
    #[error("the server holds a damaged record of this payment; resend the same payment later")]
    Corrupt(String),

    // ---- our side is down: nothing was charged, the authorization stays usable ----
    #[error("the chain is unreachable; nothing was charged, retry later with the same payment")]
    ChainUnavailable,
    #[error("the payment store is unavailable; retry later with the same payment (never a new one)")]
    StoreUnavailable,
}

impl PaymentError {
    /// The x402 reason code (the x402 exact EVM scheme's codes; SDKs spell some differently), or tollgate's own for statuses.
    pub fn code(&self) -> &str {
        match self {
            PaymentError::Malformed(_) | PaymentError::TooLarge { .. } => "invalid_payload",
            PaymentError::UnsupportedVersion(_) => "invalid_x402_version",
            PaymentError::RequirementsMismatch { field: "scheme" } => "invalid_exact_evm_scheme",
            PaymentError::RequirementsMismatch { field: "network" } => "invalid_exact_evm_network_mismatch",
            PaymentError::RequirementsMismatch { .. } => "invalid_payment_requirements",
            PaymentError::BadSignature => "invalid_exact_evm_signature",
            PaymentError::FactoryNotAllowed => "eip6492_factory_not_allowed",
            PaymentError::WalletDeploymentFailed => "smart_wallet_deployment_failed",
            PaymentError::RecipientMismatch => "invalid_exact_evm_recipient_mismatch",
            PaymentError::Expired { .. } => "invalid_exact_evm_payload_authorization_valid_before",
            PaymentError::NotYetValid => "invalid_exact_evm_payload_authorization_valid_after",
            PaymentError::TooLong { .. } => "invalid_exact_evm_payload_authorization_valid_before",
            PaymentError::WrongAmount => "invalid_exact_evm_authorization_value",
            PaymentError::BadPaymentIdentifier => "invalid_payment_identifier",
            PaymentError::OfferExpired => "offer_expired",
            PaymentError::SimulationFailed { .. } => "invalid_exact_evm_transaction_simulation_failed",
            PaymentError::Withheld { .. } => "settlement_failed_result_withheld",
            PaymentError::NonceReused => "invalid_exact_evm_nonce_already_used",
            PaymentError::IdentifierConflict => "payment_identifier_conflict",
            PaymentError::InsufficientBalance => "invalid_exact_evm_insufficient_balance",
            PaymentError::SettlementFailed { reason } => reason,
            PaymentError::AlreadyUsed => "payment_already_used",
            PaymentError::OutcomeUnknown { .. } => "payment_outcome_unknown",
            PaymentError::Corrupt(_) => "internal_error",
            PaymentError::Pending { .. } => "payment_confirmation_pending",
            PaymentError::InProgress => "payment_in_progress",
            PaymentError::ChainUnavailable => "chain_unavailable",
            PaymentError::StoreUnavailable => "store_unavailable",
        }
    }

    /// Whether the right answer is a fresh PaymentRequired (the payment was not accepted).
    pub fn is_challenge(&self) -> bool {
        !matches!(
            self,
            PaymentError::Pending { .. }
                | PaymentError::InProgress
                | PaymentError::OutcomeUnknown { .. }
                | PaymentError::Corrupt(_)
                | PaymentError::AlreadyUsed
                | PaymentError::IdentifierConflict
                | PaymentError::ChainUnavailable
                | PaymentError::StoreUnavailable
                | PaymentError::Withheld { .. }
        )
    }

    /// Whether this refusal keeps the unit the attempt took from the client's failed-attempt
    /// budget. Every refused payment does, including those our chain could not check (a flood
    /// that exhausts the RPC must not stop paying for itself), except the statuses of a
    /// payment already in flight, which the protocol tells the client to resend.
    pub fn spends_failure_budget(&self) -> bool {
        match self {
            PaymentError::Malformed(_)
            | PaymentError::TooLarge { .. }
            | PaymentError::UnsupportedVersion(_)
            | PaymentError::RequirementsMismatch { .. }
            | PaymentError::BadSignature
            | PaymentError::FactoryNotAllowed
            | PaymentError::WalletDeploymentFailed
            | PaymentError::RecipientMismatch
            | PaymentError::Expired { .. }
            | PaymentError::NotYetValid
            | PaymentError::TooLong { .. }
            | PaymentError::WrongAmount
            | PaymentError::BadPaymentIdentifier
            | PaymentError::OfferExpired
            | PaymentError::SimulationFailed { .. }
            | PaymentError::Withheld { .. }
            | PaymentError::NonceReused
            | PaymentError::IdentifierConflict
            | PaymentError::InsufficientBalance
            | PaymentError::SettlementFailed { .. }
            | PaymentError::AlreadyUsed
            | PaymentError::ChainUnavailable
            | PaymentError::StoreUnavailable => true,
            PaymentError::Pending { .. }
            | PaymentError::InProgress
            | PaymentError::OutcomeUnknown { .. }
            | PaymentError::Corrupt(_) => false,
        }
    }

    /// What this refusal can prove about money. Once a transaction may exist, the answer must
    /// not claim that nothing was charged.
    pub fn money(&self) -> Money {
        match self {
            PaymentError::Pending { .. }
            | PaymentError::InProgress
            | PaymentError::OutcomeUnknown { .. }
            | PaymentError::Corrupt(_)
            | PaymentError::StoreUnavailable => Money::MayHaveMoved,
            _ => Money::Unmoved,
        }
    }
}

/// What a refusal can prove about the payer's money, for this request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Money {
    /// Nothing moved, provably: the answer says `charged: false`.
    Unmoved,
    /// A transaction may exist: the answer makes no claim either way.
    MayHaveMoved,
}
