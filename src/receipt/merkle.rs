//! RFC 6962 / RFC 9162 Merkle tree hashing, audit paths and consistency proofs.
//!
//! Hand-written (about a hundred lines) because the tree lives in our store as a list of leaf
//! hashes shared by every replica; the Merkle crates we looked at keep their own in-memory
//! tree. Checked against the Certificate Transparency reference vectors below, and the
//! verifiers are the RFC 9162 §2.1.3.2 / §2.1.4.2 algorithms, independent of the provers.

use sha2::{Digest, Sha256};

pub type Hash = [u8; 32];

/// SHA-256(0x00 || data): a leaf can never be confused with an interior node.
pub fn leaf_hash(data: &[u8]) -> Hash {
    Sha256::new().chain_update([0u8]).chain_update(data).finalize().into()
}

/// SHA-256(0x01 || left || right).
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    Sha256::new().chain_update([1u8]).chain_update(left).chain_update(right).finalize().into()
}

/// The largest power of two strictly smaller than `n` (n ≥ 2).
pub fn split(n: u64) -> u64 {
    debug_assert!(n >= 2);
    1 << (u64::BITS - 1 - (n - 1).leading_zeros())
}

/// MTH(D[n]); the empty tree's hash is SHA-256 of the empty string.
pub fn root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => Sha256::digest([]).into(),
        1 => leaves[0],
        n => {
            let k = split(n as u64) as usize;
            node_hash(&root(&leaves[..k]), &root(&leaves[k..]))
        }
    }
}

/// Where proofs get the hash of a range of leaves `[lo, hi)`. A slice hashes its leaves; the
/// log's cached tree (`receipt::tree`) looks up stored subtrees. Every range a proof asks for
/// is one of the RFC 6962 recursion, so its left part is always an aligned complete subtree.
pub trait Subtrees {
    fn range_root(&self, lo: u64, hi: u64) -> Hash;
}

impl Subtrees for [Hash] {
    fn range_root(&self, lo: u64, hi: u64) -> Hash {
        root(&self[lo as usize..hi as usize])
    }
}

/// PATH(m, D[n]): the audit path of leaf `index` in the tree of `leaves`.
pub fn inclusion_proof(index: usize, leaves: &[Hash]) -> Vec<Hash> {
    inclusion_proof_in(leaves, index as u64, leaves.len() as u64)
}

/// PATH(index, D[size]) over any source of subtree hashes.
pub fn inclusion_proof_in<T: Subtrees + ?Sized>(tree: &T, index: u64, size: u64) -> Vec<Hash> {
    if size <= 1 || index >= size {
        return Vec::new();
    }
    path(tree, index, 0, size)
}

fn path<T: Subtrees + ?Sized>(tree: &T, index: u64, lo: u64, hi: u64) -> Vec<Hash> {
    if hi - lo <= 1 {
        return Vec::new();
    }
    let k = split(hi - lo);
    let (mut path, sibling) = if index < lo + k {
        (path(tree, index, lo, lo + k), tree.range_root(lo + k, hi))
    } else {
        (path(tree, index, lo + k, hi), tree.range_root(lo, lo + k))
    };
    path.push(sibling);
    path
}

/// PROOF(m, D[n]): proves the tree of the first `first` leaves is a prefix of `leaves`.
pub fn consistency_proof(first: usize, leaves: &[Hash]) -> Vec<Hash> {
    consistency_proof_in(leaves, first as u64, leaves.len() as u64)
}

/// PROOF(first, D[size]) over any source of subtree hashes.
pub fn consistency_proof_in<T: Subtrees + ?Sized>(tree: &T, first: u64, size: u64) -> Vec<Hash> {
    if first == 0 || first >= size {
        return Vec::new();
    }
    subproof(tree, first, 0, size, true)
}

fn subproof<T: Subtrees + ?Sized>(tree: &T, m: u64, lo: u64, hi: u64, complete: bool) -> Vec<Hash> {
    let n = hi - lo;
    if m == n {
        return if complete { Vec::new() } else { vec![tree.range_root(lo, hi)] };
    }
    let k = split(n);
    let (mut proof, other) = if m <= k {
        (subproof(tree, m, lo, lo + k, complete), tree.range_root(lo + k, hi))
    } else {
        (subproof(tree, m - k, lo + k, hi, false), tree.range_root(lo, lo + k))
    };
    proof.push(other);
    proof
}

/// RFC 9162 §2.1.3.2: does `proof` place `leaf` at `index` in a tree of `size` with `root`?
pub fn verify_inclusion(index: u64, size: u64, leaf: &Hash, proof: &[Hash], expected_root: &Hash) -> bool {
    if index >= size {
        return false;
    }
    let (mut f, mut s, mut r) = (index, size - 1, *leaf);
    for p in proof {
        if s == 0 {
            return false;
        }
        if f & 1 == 1 || f == s {
            r = node_hash(p, &r);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        f >>= 1;
        s >>= 1;
    }
    s == 0 && r == *expected_root
}

/// RFC 9162 §2.1.4.2: is the tree (`first`, `first_root`) a prefix of (`second`, `second_root`)?
pub fn verify_consistency(
    first: u64,
    second: u64,
    proof: &[Hash],
    first_root: &Hash,
    second_root: &Hash,
) -> bool {
    if first == 0 || first > second {
        return false;
    }
    if first == second {
        return proof.is_empty() && first_root == second_root;
    }
    let mut path = proof.to_vec();
    if first.is_power_of_two() {
        path.insert(0, *first_root);
    }
    let Some((seed, rest)) = path.split_first() else { return false };
    let (mut f, mut s) = (first - 1, second - 1);
    while f & 1 == 1 {
        f >>= 1;
        s >>= 1;
    }
    let (mut fr, mut sr) = (*seed, *seed);
    for c in rest {
        if s == 0 {
            return false;
        }
        if f & 1 == 1 || f == s {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            sr = node_hash(&sr, c);
        }
        f >>= 1;
        s >>= 1;
    }
    fr == *first_root && sr == *second_root && s == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Certificate Transparency's reference leaves and tree heads (RFC 6962 test data).
    const LEAVES: [&str; 8] =
        ["", "00", "10", "2021", "3031", "40414243", "5051525354555657", "606162636465666768696a6b6c6d6e6f"];
    const ROOTS: [&str; 9] = [
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ];
    /// (leaf index, tree size, audit path).
    const INCLUSION: [(usize, usize, &[&str]); 4] = [
        (
            0,
            8,
            &[
                "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
            ],
        ),
        (
            5,
            8,
            &[
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ],
        ),
        (2, 3, &["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
        (
            1,
            5,
            &[
                "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            ],
        ),
    ];
    /// (first size, second size, consistency proof).
    const CONSISTENCY: [(usize, usize, &[&str]); 4] = [
        (1, 1, &[]),
        (
            1,
            8,
            &[
                "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
            ],
        ),
        (
            6,
            8,
            &[
                "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ],
        ),
        (
            2,
            5,
            &[
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            ],
        ),
    ];

    fn h(s: &str) -> Hash {
        hex::decode(s).unwrap().try_into().unwrap()
    }

    fn leaves() -> Vec<Hash> {
        LEAVES.iter().map(|l| leaf_hash(&hex::decode(l).unwrap())).collect()
    }

    #[test]
    fn roots_match_the_reference_tree_heads() {
        let leaves = leaves();
        for (n, expected) in ROOTS.iter().enumerate() {
            assert_eq!(hex::encode(root(&leaves[..n])), *expected, "size {n}");
        }
    }

    #[test]
    fn inclusion_proofs_match_the_reference_and_verify() {
        let leaves = leaves();
        for (index, size, expected) in INCLUSION {
            let proof = inclusion_proof(index, &leaves[..size]);
            let shown: Vec<String> = proof.iter().map(hex::encode).collect();
            assert_eq!(shown, expected, "leaf {index} of {size}");
            let tree_root = h(ROOTS[size]);
            assert!(verify_inclusion(index as u64, size as u64, &leaves[index], &proof, &tree_root));
            assert!(!verify_inclusion(index as u64, size as u64, &leaves[index], &proof, &h(ROOTS[0])));
            let other = (index + 1) % size;
            assert!(!verify_inclusion(index as u64, size as u64, &leaves[other], &proof, &tree_root));
        }
    }

    #[test]
    fn consistency_proofs_match_the_reference_and_verify() {
        let leaves = leaves();
        for (first, second, expected) in CONSISTENCY {
            let proof = consistency_proof(first, &leaves[..second]);
            let shown: Vec<String> = proof.iter().map(hex::encode).collect();
            assert_eq!(shown, expected, "{first} -> {second}");
            let (a, b) = (h(ROOTS[first]), h(ROOTS[second]));
            assert!(verify_consistency(first as u64, second as u64, &proof, &a, &b));
            assert!(!verify_consistency(first as u64, second as u64, &proof, &b, &b) || first == second);
        }
    }

    #[test]
    fn every_proof_of_every_tree_shape_verifies_and_a_rewritten_history_does_not() {
        let leaves: Vec<Hash> = (0u32..40).map(|i| leaf_hash(&i.to_be_bytes())).collect();
        for n in 1..=leaves.len() {
            let tree = &leaves[..n];
            let r = root(tree);
            for i in 0..n {
                assert!(
                    verify_inclusion(i as u64, n as u64, &tree[i], &inclusion_proof(i, tree), &r),
                    "{i}/{n}"
                );
            }
            for m in 1..=n {
                let proof = consistency_proof(m, tree);
                assert!(verify_consistency(m as u64, n as u64, &proof, &root(&tree[..m]), &r), "{m}->{n}");
            }
        }
        // Rewrite leaf 3, then extend: the old head is no prefix of the new tree.
        let mut rewritten = leaves.clone();
        rewritten[3] = leaf_hash(b"rewritten");
        let old_root = root(&leaves[..10]);
        let proof = consistency_proof(10, &rewritten[..20]);
        assert!(!verify_consistency(10, 20, &proof, &old_root, &root(&rewritten[..20])));
    }
}
