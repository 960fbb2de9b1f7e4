//! Receipts and log proofs from an untrusted server: parsing a receipt, checking its signature,
//! and verifying inclusion and consistency proofs must never panic on hostile input.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tollgate::receipt::{SignedReceipt, keys, merkle};

fuzz_target!(|data: &[u8]| {
    if let Ok(receipt) = serde_json::from_slice::<SignedReceipt>(data) {
        let key = keys::parse_public(&"ab".repeat(32));
        if let Some(key) = key {
            let _ = receipt.verify(&key);
        }
        let _ = receipt.leaf_hash();
    }
    if data.len() >= 16 {
        let (head, rest) = data.split_at(16);
        let a = u64::from_le_bytes(head[..8].try_into().unwrap()) % 1_000_000;
        let b = u64::from_le_bytes(head[8..].try_into().unwrap()) % 1_000_000;
        let proof: Vec<merkle::Hash> = rest.chunks_exact(32).map(|c| c.try_into().unwrap()).collect();
        let leaf = merkle::leaf_hash(rest);
        let _ = merkle::verify_inclusion(a, b, &leaf, &proof, &leaf);
        let _ = merkle::verify_consistency(a, b, &proof, &leaf, &leaf);
    }
});
