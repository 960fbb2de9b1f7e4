//! `LiveSessions`: the MCP session ids this server issued and has not closed.
//!
//! A session id earns its own ceiling bucket only if it is in here. Any other value of the
//! `Mcp-Session-Id` header (a random one per request, or one this replica never issued)
//! counts against the client key: a client cannot mint itself fresh buckets, and minted ids
//! never enter the ceiling's key table. Ids are kept as seeded hashes, bounded in number; past
//! the bound a new session simply counts against its client key.

use dashmap::DashSet;

pub struct LiveSessions {
    ids: DashSet<u64, nohash_hasher::BuildNoHashHasher<u64>>,
    /// Seeded per process, so nobody can aim ids at one slot.
    hasher: ahash::RandomState,
    max: usize,
}

impl LiveSessions {
    pub fn new(max: usize) -> LiveSessions {
        LiveSessions { ids: DashSet::default(), hasher: ahash::RandomState::new(), max }
    }

    /// Records a session this server issued.
    pub fn issued(&self, id: &str) {
        if self.ids.len() < self.max {
            self.ids.insert(self.hasher.hash_one(id.as_bytes()));
        }
    }

    /// Forgets a closed session.
    pub fn closed(&self, id: &str) {
        self.ids.remove(&self.hasher.hash_one(id.as_bytes()));
    }

    pub fn is_live(&self, id: &str) -> bool {
        self.ids.contains(&self.hasher.hash_one(id.as_bytes()))
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}
