//! `LiveSessions`: the MCP session ids this server issued and has not closed, and who opened
//! each.
//!
//! A session id earns its own ceiling bucket only if it is in here. Any other value of the
//! `Mcp-Session-Id` header (a random one per request, or one this replica never issued)
//! counts against the client key: a client cannot mint itself fresh buckets, and minted ids
//! never enter the ceiling's key table. Opening real sessions is bounded too: a client key may
//! hold at most `per_client` live sessions (the transport refuses its next `initialize`), so
//! one client multiplies its bucket at most that many times, and the table as a whole holds at
//! most `max` ids. Ids and client keys are kept as seeded hashes.

use dashmap::{DashMap, DashSet};

type NoHash = nohash_hasher::BuildNoHashHasher<u64>;

pub struct LiveSessions {
    ids: DashSet<u64, NoHash>,
    /// Session → the client key that opened it; client key → how many it holds.
    opened_by: DashMap<u64, u64, NoHash>,
    held: DashMap<u64, usize, NoHash>,
    /// Seeded per process, so nobody can aim ids at one slot.
    hasher: ahash::RandomState,
    max: usize,
    per_client: usize,
}

/// Why a client may not open another session now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionRefusal {
    /// This client holds `limit` live sessions already.
    PerClient { limit: usize },
    /// The server holds as many sessions as it tracks.
    Full,
}

impl LiveSessions {
    pub fn new(max: usize, per_client: usize) -> LiveSessions {
        LiveSessions {
            ids: DashSet::default(),
            opened_by: DashMap::default(),
            held: DashMap::default(),
            hasher: ahash::RandomState::new(),
            max,
            per_client: per_client.max(1),
        }
    }

    fn hash(&self, text: &str) -> u64 {
        self.hasher.hash_one(text.as_bytes())
    }

    /// Whether `client` may open a session now.
    pub fn may_open(&self, client: &str) -> Result<(), SessionRefusal> {
        if self.ids.len() >= self.max {
            return Err(SessionRefusal::Full);
        }
        let held = self.held.get(&self.hash(client)).map_or(0, |n| *n);
        if held >= self.per_client {
            return Err(SessionRefusal::PerClient { limit: self.per_client });
        }
        Ok(())
    }

    /// Records a session this server issued.
    pub fn issued(&self, id: &str) {
        if self.ids.len() < self.max {
            self.ids.insert(self.hash(id));
        }
    }

    /// Records which client opened `id` (once its `initialize` answered with it).
    pub fn opened_by(&self, id: &str, client: &str) {
        let (id, client) = (self.hash(id), self.hash(client));
        if self.ids.contains(&id) && self.opened_by.insert(id, client).is_none() {
            *self.held.entry(client).or_insert(0) += 1;
        }
    }

    /// Forgets a closed session, and gives its client the slot back.
    pub fn closed(&self, id: &str) {
        let id = self.hash(id);
        self.ids.remove(&id);
        if let Some((_, client)) = self.opened_by.remove(&id) {
            // The client's count goes with its last session (no sweep over every client).
            self.held.remove_if_mut(&client, |_, held| {
                *held = held.saturating_sub(1);
                *held == 0
            });
        }
    }

    pub fn is_live(&self, id: &str) -> bool {
        self.ids.contains(&self.hash(id))
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}
