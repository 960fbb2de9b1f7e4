//! Receipts: ed25519 signing keys for now (`tollgate keygen`); signed receipts and the
//! transparency log build on these.

pub mod keys;
