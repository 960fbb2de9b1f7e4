//! Offers: what a challenge quoted, made checkable later without storage, so a payment signed
//! against an offer is honoured at the offered price after the price table changed.
//!
//! A challenge's `accepts[0].extra.offer` carries `"<expires>.<tag>"`, where the tag is an
//! HMAC-SHA256 (truncated to 128 bits) over the tool, the hash of the arguments, the amount,
//! the network, asset and payee, and the expiry (the offer's time plus its
//! `maxTimeoutSeconds`). Clients echo `accepted` verbatim, `extra` included, so the paid retry
//! brings the offer back. Chosen over a table of recent offers because a fleet then needs
//! nothing shared but the key (every replica derives it from the receipt key it already
//! shares), challenges cost no store write (a flood of challenges cannot fill a table), and
//! any replica can honour an offer another made.
//!
//! Guarantees: an amount other than today's price is accepted only with a tag this server made
//! for this very tool, arguments, amount and terms, before its expiry. Does not: honour an
//! offer after its expiry, or one whose client dropped `extra.offer` (it pays today's price).

use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::error::PaymentError;
use super::requirements::Quote;
use crate::money::UsdcAmount;

/// The key under `extra` that carries the offer.
pub const EXTRA_OFFER: &str = "offer";

/// Makes and checks offer tags.
#[derive(Clone)]
pub struct Offers {
    /// Keyed once: each tag clones it, instead of hashing the key's pads again per challenge.
    mac: Hmac<Sha256>,
}

/// An earlier offer that the payment proved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Honoured {
    pub amount: UsdcAmount,
    pub expires: u64,
}

impl Offers {
    /// Derives the offer key from a secret (the receipt signing seed), domain-separated so the
    /// tag can never be mistaken for anything else the secret signs.
    pub fn from_secret(secret: &[u8]) -> Offers {
        let mut h = Sha256::new();
        h.update(b"tollgate/offer-tag/v1\0");
        h.update(secret);
        let key: [u8; 32] = h.finalize().into();
        Offers { mac: Hmac::<Sha256>::new_from_slice(&key).expect("HMAC takes any key length") }
    }

    /// The offer for `quote` at these arguments, valid until `expires`.
    pub fn token(&self, quote: &Quote, args_hash: &str, expires: u64) -> String {
        format!("{expires}.{}", self.tag(quote, &quote.amount.to_string(), args_hash, expires))
    }

    /// An amount other than `current`'s, proven offered by the offer `accepted` brings back.
    /// `None` when the payment asks today's price (no offer needed).
    pub fn honour(
        &self,
        current: &Quote,
        accepted: &Value,
        args_hash: &str,
        now: u64,
    ) -> Result<Option<Honoured>, PaymentError> {
        let mismatch = || PaymentError::RequirementsMismatch { field: "amount" };
        let Some(amount) = accepted.get("amount").and_then(Value::as_str) else { return Ok(None) };
        if amount == current.requirements.amount {
            return Ok(None);
        }
        let offer = accepted
            .pointer(&format!("/extra/{EXTRA_OFFER}"))
            .and_then(Value::as_str)
            .ok_or_else(mismatch)?;
        let (expires, tag) = offer.split_once('.').ok_or_else(mismatch)?;
        let expires: u64 = expires.parse().map_err(|_| mismatch())?;
        let parsed = UsdcAmount::parse(amount).map_err(|_| mismatch())?;
        let expected = self.tag(current, amount, args_hash, expires);
        // Constant-time: the tag is a secret's output.
        let proven = hmac_eq(expected.as_bytes(), tag.as_bytes());
        if !proven || parsed.is_zero() {
            return Err(mismatch());
        }
        if now > expires {
            return Err(PaymentError::OfferExpired);
        }
        Ok(Some(Honoured { amount: parsed, expires }))
    }

    fn tag(&self, quote: &Quote, amount: &str, args_hash: &str, expires: u64) -> String {
        let r = &quote.requirements;
        let mut mac = self.mac.clone();
        for part in [
            quote.tool.as_str(),
            args_hash,
            amount,
            &r.network,
            &r.asset.to_ascii_lowercase(),
            &r.pay_to.to_ascii_lowercase(),
            &expires.to_string(),
        ] {
            mac.update(part.as_bytes());
            mac.update(b"\0");
        }
        hex::encode(&mac.finalize().into_bytes()[..16])
    }
}

fn hmac_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
