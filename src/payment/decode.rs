//! Decoding a payment from `_meta["x402/payment"]` (a JSON object or a base64 string of one)
//! or from the `PAYMENT-SIGNATURE` header (base64). Bounded in size; no network, no crypto.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::Value;

use super::error::PaymentError;
use super::wire::PaymentPayload;

/// A real payload is ~1 KiB; anything past this is refused before it is parsed.
pub const MAX_PAYMENT_BYTES: usize = 16 * 1024;

/// The payment as the client sent it, not yet decoded.
#[derive(Debug, Clone)]
pub enum PaymentInput {
    /// `params._meta["x402/payment"]`.
    Meta(Value),
    /// The `PAYMENT-SIGNATURE` HTTP header value.
    Header(Vec<u8>),
}

/// A decoded payload and the JSON it came from (kept for hashing and storage).
#[derive(Debug, Clone)]
pub struct DecodedPayment {
    pub payload: PaymentPayload,
    pub raw: Value,
}

pub fn decode(input: &PaymentInput) -> Result<DecodedPayment, PaymentError> {
    let raw = match input {
        PaymentInput::Meta(value @ Value::Object(_)) => {
            let size = serde_json::to_vec(&value).map(|b| b.len()).unwrap_or(usize::MAX);
            if size > MAX_PAYMENT_BYTES {
                return Err(PaymentError::TooLarge { limit: MAX_PAYMENT_BYTES });
            }
            value.clone()
        }
        PaymentInput::Meta(Value::String(b64)) => from_base64(b64.as_bytes())?,
        PaymentInput::Meta(_) => {
            return Err(PaymentError::Malformed(
                "_meta[\"x402/payment\"] must be a JSON object or a base64 string".into(),
            ));
        }
        PaymentInput::Header(bytes) => from_base64(bytes)?,
    };
    let payload = serde_json::from_value::<PaymentPayload>(raw.clone())
        .map_err(|e| PaymentError::Malformed(format!("not an x402 PaymentPayload: {e}")))?;
    Ok(DecodedPayment { payload, raw })
}

fn from_base64(b64: &[u8]) -> Result<Value, PaymentError> {
    // base64 is 4/3 of the JSON it carries.
    if b64.len() > MAX_PAYMENT_BYTES * 4 / 3 + 4 {
        return Err(PaymentError::TooLarge { limit: MAX_PAYMENT_BYTES });
    }
    let trimmed = b64.trim_ascii();
    let json = STANDARD
        .decode(trimmed)
        .map_err(|_| PaymentError::Malformed("payment is neither a JSON object nor valid base64".into()))?;
    serde_json::from_slice(&json)
        .map_err(|_| PaymentError::Malformed("base64 payment does not hold JSON".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> Value {
        json!({
            "x402Version": 2,
            "accepted": { "scheme": "exact" },
            "payload": {
                "signature": "0x00",
                "authorization": { "from": "0x1", "to": "0x2", "value": "1", "validAfter": "0", "validBefore": "9", "nonce": "0x3" }
            }
        })
    }

    #[test]
    fn object_base64_and_header_forms_decode_alike() {
        let b64 = STANDARD.encode(serde_json::to_vec(&sample()).unwrap());
        let forms = [
            PaymentInput::Meta(sample()),
            PaymentInput::Meta(Value::String(b64.clone())),
            PaymentInput::Header(b64.into_bytes()),
        ];
        for form in forms {
            let decoded = decode(&form).unwrap_or_else(|e| panic!("{form:?}: {e}"));
            assert_eq!(decoded.raw, sample());
            assert_eq!(decoded.payload.x402_version, 2);
        }
    }

    #[test]
    fn malformed_and_oversized_payloads_say_what_is_wrong() {
        let huge = json!({ "x402Version": 2, "pad": "x".repeat(MAX_PAYMENT_BYTES) });
        let cases = [
            (PaymentInput::Meta(json!(42)), "JSON object or a base64"),
            (PaymentInput::Meta(Value::String("%%%".into())), "valid base64"),
            (PaymentInput::Header(STANDARD.encode("nope").into_bytes()), "does not hold JSON"),
            (PaymentInput::Meta(json!({ "x402Version": 2 })), "not an x402 PaymentPayload"),
            (PaymentInput::Meta(huge), "exceeds"),
            (PaymentInput::Header(vec![b'A'; MAX_PAYMENT_BYTES * 2]), "exceeds"),
        ];
        for (input, expected) in cases {
            let err = decode(&input).expect_err(expected).to_string();
            assert!(err.contains(expected), "{err} should contain {expected}");
        }
    }
}
