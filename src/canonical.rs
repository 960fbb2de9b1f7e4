//! Canonical JSON and its hash: the bytes that are signed, hashed and compared.
//!
//! RFC 8785 (JCS) makes one JSON value one byte string, whatever the key order or number
//! spelling it arrived with. Receipts sign it, the log hashes it, and the payment stage uses
//! its hash to tell "the same call" (same tool, same arguments) from another one.

use serde::Serialize;
use sha2::{Digest, Sha256};

/// RFC 8785 canonical JSON: the exact bytes that are signed and hashed.
pub fn canonical<T: Serialize>(value: &T) -> String {
    serde_json_canonicalizer::to_string(value).expect("serialisable value canonicalises")
}

/// SHA-256 of `bytes`, lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// SHA-256 (hex) of a value's canonical JSON.
pub fn hash_of<T: Serialize>(value: &T) -> String {
    sha256_hex(canonical(value).as_bytes())
}
