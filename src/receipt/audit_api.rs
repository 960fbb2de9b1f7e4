//! Who may list a payer's receipts: only that wallet, by signing (EIP-191) a short-lived
//! challenge the server issued. The challenge carries the server's own ed25519 token, so any
//! replica can check it without shared state.

use alloy::primitives::{Address, Signature};

use super::{ReceiptSigner, verify_detached};

/// How long a challenge may be used.
pub const CHALLENGE_TTL_SECS: u64 = 300;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChallengeError {
    #[error("the challenge is malformed")]
    Malformed,
    #[error("the challenge was not issued by this server")]
    NotOurs,
    #[error("the challenge has expired")]
    Expired,
    #[error("the challenge is for another wallet")]
    WrongWallet,
    #[error("the wallet signature does not recover to the wallet")]
    BadSignature,
}

fn token_message(server: &str, wallet: &Address, expires: u64) -> String {
    format!("tollgate-receipts|{server}|{wallet:#x}|{expires}")
}

/// The text a wallet signs to list its receipts.
pub fn issue(signer: &ReceiptSigner, server: &str, wallet: Address, now: u64) -> String {
    let expires = now + CHALLENGE_TTL_SECS;
    let token = signer.sign(token_message(server, &wallet, expires).as_bytes());
    format!("tollgate receipts\nserver: {server}\nwallet: {wallet:#x}\nexpires: {expires}\ntoken: {token}")
}

/// Checks that `text` is our live challenge for `wallet` and that `wallet` signed it.
pub fn check(
    signer: &ReceiptSigner,
    server: &str,
    wallet: Address,
    text: &str,
    wallet_signature: &str,
    now: u64,
) -> Result<(), ChallengeError> {
    let field =
        |name: &str| text.lines().find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(": ")));
    let (Some(srv), Some(who), Some(expires), Some(token)) =
        (field("server"), field("wallet"), field("expires"), field("token"))
    else {
        return Err(ChallengeError::Malformed);
    };
    let expires: u64 = expires.parse().map_err(|_| ChallengeError::Malformed)?;
    let who: Address = who.parse().map_err(|_| ChallengeError::Malformed)?;
    let ours = signer
        .published()
        .iter()
        .any(|(_, key)| verify_detached(key, token_message(srv, &who, expires).as_bytes(), token));
    if srv != server || !ours {
        return Err(ChallengeError::NotOurs);
    }
    if now > expires {
        return Err(ChallengeError::Expired);
    }
    if who != wallet {
        return Err(ChallengeError::WrongWallet);
    }
    let signature: Signature = wallet_signature.parse().map_err(|_| ChallengeError::BadSignature)?;
    let signer_address =
        signature.recover_address_from_msg(text).map_err(|_| ChallengeError::BadSignature)?;
    if signer_address != wallet {
        return Err(ChallengeError::BadSignature);
    }
    Ok(())
}
