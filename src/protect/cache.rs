//! The result cache of read tools (`[upstream.tools.X] cache_ttl_secs`): one upstream call
//! answers every identical call (same tool, same canonical arguments) for a while.
//!
//! Guarantees: only results that are not errors are kept; in memory the cache is bounded in
//! entries and bytes (least recently used go first), in Redis every entry expires by itself
//! and its size is bounded per entry; an answer's age is judged on the service clock, from
//! the time the upstream gave it. Does not decide who gets a cached answer or at what price:
//! `Protection::serve` does.

use std::sync::{Arc, Mutex};

use lru::LruCache;
use redis::aio::ConnectionManager;
use rmcp::model::CallToolResult;
use serde::{Deserialize, Serialize};

/// An answer the upstream gave at `at` (unix seconds, service clock).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CachedAnswer {
    pub at: u64,
    pub result: CallToolResult,
}

/// Bounds of the in-memory cache.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub max_entries: usize,
    pub max_bytes: usize,
}

pub struct ResultCache {
    store: Store,
    /// One answer may take at most a quarter of the byte bound, in memory and in Redis alike
    /// (where maxmemory bounds the whole): one huge answer never crowds out the rest.
    max_entry_bytes: usize,
}

enum Store {
    Memory(Mutex<Memory>),
    /// Shared by a fleet: `SET key json PX ttl`.
    Redis {
        conn: ConnectionManager,
        prefix: String,
    },
}

struct Memory {
    entries: LruCache<String, Entry>,
    bytes: usize,
    bounds: Bounds,
}

struct Entry {
    answer: Arc<CachedAnswer>,
    bytes: usize,
    /// Forgotten after this (unix seconds): the TTL plus how long an offer at the cached price
    /// stays payable.
    keep_until: u64,
}

impl ResultCache {
    pub fn memory(bounds: Bounds) -> ResultCache {
        let memory = Memory { entries: LruCache::unbounded(), bytes: 0, bounds };
        ResultCache { store: Store::Memory(Mutex::new(memory)), max_entry_bytes: bounds.max_bytes / 4 }
    }

    pub fn redis(conn: ConnectionManager, prefix: &str, bounds: Bounds) -> ResultCache {
        let store = Store::Redis { conn, prefix: prefix.to_owned() };
        ResultCache { store, max_entry_bytes: bounds.max_bytes / 4 }
    }

    /// The answer kept under `key` if it is at most `max_age` seconds old at `now`.
    pub async fn get(&self, key: &str, now: u64, max_age: u64) -> Option<Arc<CachedAnswer>> {
        let young = |a: &CachedAnswer| now <= a.at.saturating_add(max_age);
        match &self.store {
            Store::Memory(m) => {
                let mut m = m.lock().expect("cache lock");
                let entry = m.entries.get(key)?;
                if entry.keep_until < now {
                    m.remove(key);
                    return None;
                }
                Some(entry.answer.clone()).filter(|a| young(a))
            }
            Store::Redis { conn, prefix } => {
                let mut conn = conn.clone();
                let cmd = redis::cmd("GET").arg(format!("{prefix}:cache:{key}")).clone();
                let json: Option<String> = match cmd.query_async(&mut conn).await {
                    Ok(json) => json,
                    Err(e) => {
                        // A cache that cannot answer is a miss: the call goes to the upstream.
                        tracing::warn!(error = %e, "result cache (redis) unavailable");
                        return None;
                    }
                };
                let answer: CachedAnswer = serde_json::from_str(&json?).ok()?;
                Some(Arc::new(answer)).filter(|a| young(a))
            }
        }
    }

    /// Keeps `answer` under `key` for `keep_secs` from its time. Errors are never kept; neither
    /// is an answer larger than the cache may hold.
    pub async fn put(&self, key: &str, answer: CachedAnswer, keep_secs: u64) {
        if answer.result.is_error == Some(true) {
            return;
        }
        let json = serde_json::to_string(&answer).expect("a tool result serialises");
        if json.len() > self.max_entry_bytes {
            return;
        }
        match &self.store {
            Store::Memory(m) => {
                let keep_until = answer.at.saturating_add(keep_secs);
                let entry = Entry { answer: Arc::new(answer), bytes: json.len(), keep_until };
                m.lock().expect("cache lock").insert(key, entry);
            }
            Store::Redis { conn, prefix } => {
                let mut conn = conn.clone();
                let set = redis::cmd("SET")
                    .arg(format!("{prefix}:cache:{key}"))
                    .arg(json)
                    .arg("PX")
                    .arg(keep_secs.max(1) * 1000)
                    .query_async::<()>(&mut conn)
                    .await;
                if let Err(e) = set {
                    tracing::warn!(error = %e, "result cache (redis) could not keep an answer");
                }
            }
        }
    }

    /// Entries and bytes held in memory (zero in Redis, which keeps its own).
    pub fn size(&self) -> (usize, usize) {
        match &self.store {
            Store::Memory(m) => {
                let m = m.lock().expect("cache lock");
                (m.entries.len(), m.bytes)
            }
            Store::Redis { .. } => (0, 0),
        }
    }
}

impl Memory {
    fn insert(&mut self, key: &str, entry: Entry) {
        self.remove(key);
        while self.entries.len() >= self.bounds.max_entries
            || self.bytes + entry.bytes > self.bounds.max_bytes
        {
            let Some((_, old)) = self.entries.pop_lru() else { break };
            self.bytes -= old.bytes;
        }
        self.bytes += entry.bytes;
        self.entries.put(key.to_owned(), entry);
    }

    fn remove(&mut self, key: &str) {
        if let Some(old) = self.entries.pop(key) {
            self.bytes -= old.bytes;
        }
    }
}

#[cfg(test)]
mod tests {
    use rmcp::model::ContentBlock;

    use super::*;

    fn answer(at: u64, text: &str) -> CachedAnswer {
        CachedAnswer { at, result: CallToolResult::success(vec![ContentBlock::text(text)]) }
    }

    fn text(a: &CachedAnswer) -> String {
        a.result.content[0].as_text().unwrap().text.clone()
    }

    #[tokio::test]
    async fn an_answer_is_served_while_young_enough_and_errors_are_never_kept() {
        let cache = ResultCache::memory(Bounds { max_entries: 10, max_bytes: 1 << 20 });
        cache.put("t:a", answer(100, "A"), 60).await;
        assert_eq!(cache.get("t:a", 130, 30).await.as_deref().map(text), Some("A".into()));
        assert!(cache.get("t:a", 131, 30).await.is_none(), "older than the asked age");
        assert!(cache.get("t:a", 150, 60).await.is_some(), "a longer age (an offer's grace) still finds it");
        assert!(cache.get("t:a", 161, 1000).await.is_none(), "past what it was kept for");
        assert_eq!(cache.size().0, 0, "an expired entry is dropped when found");
        let error = CachedAnswer { at: 100, result: CallToolResult::error(vec![ContentBlock::text("no")]) };
        cache.put("t:e", error, 60).await;
        assert!(cache.get("t:e", 100, 60).await.is_none());
    }

    #[tokio::test]
    async fn memory_is_bounded_in_entries_and_bytes_dropping_the_least_recently_used() {
        let cache = ResultCache::memory(Bounds { max_entries: 3, max_bytes: 1 << 20 });
        for key in ["a", "b", "c"] {
            cache.put(key, answer(0, key), 60).await;
        }
        assert!(cache.get("a", 0, 60).await.is_some(), "a is now the most recently used");
        cache.put("d", answer(0, "d"), 60).await;
        assert!(cache.get("b", 0, 60).await.is_none(), "the least recently used went");
        assert_eq!(cache.size().0, 3);
        let bytes = serde_json::to_string(&answer(0, &"x".repeat(1000))).unwrap().len();
        let cache = ResultCache::memory(Bounds { max_entries: 100, max_bytes: bytes * 4 + 10 });
        for i in 0..10 {
            cache.put(&i.to_string(), answer(0, &"x".repeat(1000)), 60).await;
        }
        let (entries, held) = cache.size();
        assert!(held <= bytes * 4 + 10 && entries == 4, "{entries} entries, {held} bytes");
        cache.put("huge", answer(0, &"x".repeat(bytes * 2)), 60).await;
        assert!(cache.get("huge", 0, 60).await.is_none(), "one answer may not take over the cache");
    }
}
