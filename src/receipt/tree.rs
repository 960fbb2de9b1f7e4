//! The log's Merkle tree, kept in memory as the hashes of its complete subtrees of 64 leaves
//! and up, so a proof costs O(log n) hashing plus at most three reads of 64 leaf hashes, not a
//! read of every leaf. At a million leaves the cache holds about 31,000 hashes (1 MB).
//!
//! The log is append-only and its leaf hashes never change, so each replica extends its own
//! cache from the store, in order, and needs no coordination. A proof for a tree size the cache
//! has not reached yet first reads the new leaves (one indexed query per page).

use std::collections::BTreeMap;
use std::sync::Arc;

use super::merkle::{self, Hash, Subtrees};
use crate::store::{Store, StoreError};

/// Subtrees below 2^CHUNK_BITS leaves are recomputed from their leaves on demand.
const CHUNK_BITS: u32 = 6;
const CHUNK: u64 = 1 << CHUNK_BITS;
/// Leaves read from the store per query while catching up.
const PAGE: i64 = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("tree size must be 1..={size}")]
    BeyondLog { size: u64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Default)]
struct Levels {
    /// Leaves integrated.
    size: u64,
    /// `levels[j][i]`: the root of the complete subtree of `CHUNK << j` leaves starting at leaf
    /// `i * (CHUNK << j)`.
    levels: Vec<Vec<Hash>>,
    /// Leaves after the last complete chunk (fewer than `CHUNK`).
    tail: Vec<Hash>,
}

impl Levels {
    fn push(&mut self, leaf: Hash) {
        self.size += 1;
        self.tail.push(leaf);
        if self.tail.len() as u64 != CHUNK {
            return;
        }
        let mut carry = merkle::root(&self.tail);
        self.tail.clear();
        for j in 0.. {
            if self.levels.len() == j {
                self.levels.push(Vec::new());
            }
            let level = &mut self.levels[j];
            level.push(carry);
            let n = level.len();
            if n % 2 == 1 {
                break;
            }
            carry = merkle::node_hash(&level[n - 2], &level[n - 1]);
        }
    }

    fn cached_hashes(&self) -> usize {
        self.levels.iter().map(Vec::len).sum::<usize>() + self.tail.len()
    }
}

/// A view of the tree for one proof: the cached levels plus the few chunks of leaves it needs.
struct View<'a> {
    levels: &'a Levels,
    chunks: BTreeMap<u64, Vec<Hash>>,
}

impl View<'_> {
    /// The root of the aligned complete subtree of 2^bits leaves starting at `start`.
    fn complete(&self, start: u64, bits: u32) -> Hash {
        debug_assert_eq!(start % (1 << bits), 0, "RFC 6962 subtrees are aligned");
        if bits >= CHUNK_BITS {
            return self.levels.levels[(bits - CHUNK_BITS) as usize][(start >> bits) as usize];
        }
        let leaves = &self.chunks[&(start >> CHUNK_BITS)];
        let offset = (start % CHUNK) as usize;
        merkle::root(&leaves[offset..offset + (1 << bits)])
    }
}

impl Subtrees for View<'_> {
    fn range_root(&self, lo: u64, hi: u64) -> Hash {
        let n = hi - lo;
        if n.is_power_of_two() {
            return self.complete(lo, n.trailing_zeros());
        }
        let k = merkle::split(n);
        merkle::node_hash(&self.complete(lo, k.trailing_zeros()), &self.range_root(lo + k, hi))
    }
}

pub struct LogTree {
    store: Arc<dyn Store>,
    levels: tokio::sync::RwLock<Levels>,
    /// One catch-up at a time; the others wait for it and then find the cache current.
    catching_up: tokio::sync::Mutex<()>,
}

impl LogTree {
    pub fn new(store: Arc<dyn Store>) -> LogTree {
        LogTree { store, levels: Default::default(), catching_up: Default::default() }
    }

    /// Leaves known to the cache.
    pub async fn size(&self) -> u64 {
        self.levels.read().await.size
    }

    /// Hashes held in memory (the cache's footprint is this × 32 bytes).
    pub async fn cached_hashes(&self) -> usize {
        self.levels.read().await.cached_hashes()
    }

    /// Reads leaves appended since the last catch-up; returns the log's size.
    pub async fn catch_up(&self) -> Result<u64, StoreError> {
        let _one = self.catching_up.lock().await;
        loop {
            let from = self.size().await;
            let page = self.store.leaf_hashes(from as i64, from as i64 + PAGE).await?;
            let leaves = page.iter().map(|h| decode(h)).collect::<Result<Vec<_>, _>>()?;
            let mut levels = self.levels.write().await;
            for leaf in &leaves {
                levels.push(*leaf);
            }
            if (leaves.len() as i64) < PAGE {
                return Ok(levels.size);
            }
        }
    }

    /// Caught up far enough for a tree of `size` leaves, or the log is smaller.
    async fn reach(&self, size: u64) -> Result<(), TreeError> {
        if size == 0 {
            return Err(TreeError::BeyondLog { size: self.size().await });
        }
        if size > self.size().await {
            let now = self.catch_up().await?;
            if size > now {
                return Err(TreeError::BeyondLog { size: now });
            }
        }
        Ok(())
    }

    /// Runs `prove` over a view that holds the chunks of leaves containing `edges`.
    async fn with_view<R>(&self, edges: &[u64], prove: impl FnOnce(&View<'_>) -> R) -> Result<R, TreeError> {
        let mut chunks = BTreeMap::new();
        for chunk in edges.iter().map(|e| e >> CHUNK_BITS) {
            if chunks.contains_key(&chunk) {
                continue;
            }
            let start = (chunk * CHUNK) as i64;
            let page = self.store.leaf_hashes(start, start + CHUNK as i64).await?;
            chunks.insert(chunk, page.iter().map(|h| decode(h)).collect::<Result<Vec<_>, _>>()?);
        }
        let levels = self.levels.read().await;
        Ok(prove(&View { levels: &levels, chunks }))
    }

    /// The root of the first `size` leaves.
    pub async fn root(&self, size: u64) -> Result<Hash, TreeError> {
        self.reach(size).await?;
        self.with_view(&[size - 1], |view| view.range_root(0, size)).await
    }

    /// Leaf hash and audit path of leaf `index` in the tree of `size` leaves.
    pub async fn inclusion(&self, index: u64, size: u64) -> Result<Option<(Hash, Vec<Hash>)>, TreeError> {
        self.reach(size).await?;
        if index >= size {
            return Ok(None);
        }
        self.with_view(&[index, size - 1], |view| {
            Some((view.complete(index, 0), merkle::inclusion_proof_in(view, index, size)))
        })
        .await
    }

    /// The consistency proof from the tree of `first` leaves to the tree of `second`.
    pub async fn consistency(&self, first: u64, second: u64) -> Result<Vec<Hash>, TreeError> {
        self.reach(second).await?;
        self.with_view(&[first.max(1) - 1, second - 1], |view| {
            merkle::consistency_proof_in(view, first, second)
        })
        .await
    }
}

fn decode(hex_hash: &str) -> Result<Hash, StoreError> {
    hex::decode(hex_hash)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| StoreError::Corrupt(format!("leaf hash {hex_hash:?} is not 32 bytes of hex")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaves(n: u32) -> Vec<Hash> {
        (0..n).map(|i| merkle::leaf_hash(&i.to_be_bytes())).collect()
    }

    fn levels_of(all: &[Hash]) -> Levels {
        let mut levels = Levels::default();
        for leaf in all {
            levels.push(*leaf);
        }
        levels
    }

    /// A view holding only the chunks `LogTree` would read for these edges.
    fn view<'a>(levels: &'a Levels, all: &[Hash], edges: &[u64]) -> View<'a> {
        let chunks = edges
            .iter()
            .map(|e| {
                let c = e >> CHUNK_BITS;
                let end = ((c + 1) * CHUNK).min(all.len() as u64);
                (c, all[(c * CHUNK) as usize..end as usize].to_vec())
            })
            .collect();
        View { levels, chunks }
    }

    #[test]
    fn cached_proofs_equal_the_proofs_over_every_leaf_for_every_shape() {
        // Past several chunks and levels; every index and prefix, for sizes around the edges,
        // each from only the chunks of leaves the server reads for it.
        let all = leaves(300);
        let levels = levels_of(&all);
        for n in [1u64, 2, 3, 63, 64, 65, 127, 128, 129, 191, 200, 255, 256, 257, 299, 300] {
            let tree = &all[..n as usize];
            assert_eq!(view(&levels, &all, &[n - 1]).range_root(0, n), merkle::root(tree), "root of {n}");
            for i in 0..n {
                let proof = merkle::inclusion_proof_in(&view(&levels, &all, &[i, n - 1]), i, n);
                assert_eq!(proof, merkle::inclusion_proof(i as usize, tree), "leaf {i} of {n}");
            }
            for m in 1..=n {
                let proof = merkle::consistency_proof_in(&view(&levels, &all, &[m - 1, n - 1]), m, n);
                assert_eq!(proof, merkle::consistency_proof(m as usize, tree), "{m} -> {n}");
            }
        }
    }

    #[test]
    fn the_cache_holds_about_two_hashes_per_chunk() {
        let levels = levels_of(&leaves(64 * 100 + 5));
        assert_eq!(levels.size, 6405);
        // 100 chunk roots + 50 + 25 + 12 + 6 + 3 + 1 above them, and the 5 tail leaves.
        assert_eq!(levels.cached_hashes(), 100 + 50 + 25 + 12 + 6 + 3 + 1 + 5);
    }
}
