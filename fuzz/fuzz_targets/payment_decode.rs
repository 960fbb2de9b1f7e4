//! Any bytes as `_meta["x402/payment"]` (string and JSON forms) or as the PAYMENT-SIGNATURE
//! header: decoding must return Ok or a named error, never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tollgate::payment::decode::{PaymentInput, decode};

fuzz_target!(|data: &[u8]| {
    let _ = decode(&PaymentInput::Header(data.to_vec()));
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = decode(&PaymentInput::Meta(serde_json::Value::String(text.to_owned())));
        if let Ok(value) = serde_json::from_str::<serde_json::Value>(text) {
            let _ = decode(&PaymentInput::Meta(value));
        }
    }
});
