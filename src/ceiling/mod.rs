//! The ceiling: a generous token bucket per MCP session or client key, checked before the
//! request body is read, so floods are refused for the price of a hash lookup.
//!
//! Guarantees: a key gets at most `burst` requests at once and `per_second` sustained; memory is
//! bounded by `max_tracked_keys` (idle keys are swept; when every slot is busy, unknown keys
//! share one overflow bucket); `X-Forwarded-For` is believed only from configured trusted
//! proxies; API keys are tracked by hash, never verbatim; a session id or API key earns its own
//! bucket only if this server issued it (a live session) or the operator configured it, and
//! an IPv6 client is keyed by its /64. Does not check: who pays (wallet limits do that on the
//! recovered payer), nor how many sessions one client opens (each `initialize` costs it one
//! request of its own bucket, but each session then has a bucket of its own).

pub mod guard;
mod sessions;
mod store;

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock as GovernorClock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::{Quota, RateLimiter};
use http::HeaderMap;
use sha2::{Digest, Sha256};

use crate::clock::SharedClock;
use crate::config::CeilingConfig;
use crate::limits::gcra::{Charge, Rate, Verdict};
use crate::limits::redis::RedisBuckets;
pub use sessions::{LiveSessions, SessionRefusal};
pub use store::BoundedStore;

/// Who a request is, for the ceiling (and for the `agent` wallet-limit axis).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ClientKey {
    Session(String),
    /// First 16 bytes of SHA-256 of the API key, hex: the key itself is a secret.
    ApiKey(String),
    Ip(IpAddr),
}

impl ClientKey {
    pub fn kind(&self) -> &'static str {
        match self {
            ClientKey::Session(_) => "session",
            ClientKey::ApiKey(_) => "api_key",
            ClientKey::Ip(_) => "ip",
        }
    }
}

impl std::fmt::Display for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientKey::Session(s) => write!(f, "session:{s}"),
            ClientKey::ApiKey(h) => write!(f, "api_key:{h}"),
            ClientKey::Ip(ip) => write!(f, "ip:{ip}"),
        }
    }
}

/// Who a request comes from whatever its session: its configured API key, else its IP block.
/// Budgets a client must not multiply by opening sessions are keyed on it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClientIdentity(pub ClientKey);

/// Admitted, with what is left for the `RateLimit` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    pub remaining: u32,
    /// Seconds until the bucket is full again.
    pub reset_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CeilingError {
    #[error("too many requests for this {key_kind}; retry in {retry_after_secs}s")]
    Exceeded { key_kind: &'static str, retry_after_secs: u64 },
}

type Limiter<C> = RateLimiter<u64, BoundedStore, C, StateInformationMiddleware>;

/// An API-key tier: its keys share this quota's shape, each key with a bucket of its own.
struct Tier<C: GovernorClock> {
    limiter: Limiter<C>,
    burst: u32,
    per_second: u32,
}

/// The parts of a request that key it, borrowed from its headers.
enum KeyParts<'a> {
    Session(&'a str),
    /// First 16 bytes of SHA-256 of the API key, as 32 hex characters, and its tier (0: the
    /// default quota, i: `tiers[i - 1]`).
    ApiKey([u8; 32], u8),
    Ip(IpAddr),
}

impl KeyParts<'_> {
    fn kind(&self) -> &'static str {
        match self {
            KeyParts::Session(_) => "session",
            KeyParts::ApiKey(..) => "api_key",
            KeyParts::Ip(_) => "ip",
        }
    }

    fn owned(&self) -> ClientKey {
        match self {
            KeyParts::Session(s) => ClientKey::Session((*s).to_owned()),
            KeyParts::ApiKey(hex, _) => ClientKey::ApiKey(String::from_utf8_lossy(hex).into_owned()),
            KeyParts::Ip(ip) => ClientKey::Ip(*ip),
        }
    }
}

pub struct Ceiling<C: GovernorClock = DefaultClock> {
    limiter: Limiter<C>,
    clock: C,
    pub burst: u32,
    pub per_second: u32,
    /// The public endpoints' bucket, keyed by client identity (never a session), per process.
    public: Limiter<C>,
    api_key_header: Option<http::HeaderName>,
    /// The first 16 bytes of the SHA-256 of each API key the operator configured, with its
    /// tier (0: the default quota, i: `tiers[i - 1]`).
    known_api_keys: std::collections::HashMap<[u8; 16], u8>,
    /// Quotas of their own for the API keys of each configured tier.
    tiers: Vec<Tier<C>>,
    /// Session ids this server issued and has not closed: only they earn their own bucket.
    pub sessions: Arc<LiveSessions>,
    trusted: Vec<ipnet::IpNet>,
    /// Fleet mode: the shared bucket in Redis, and the clock it is measured with.
    shared: Option<(RedisBuckets, SharedClock)>,
    /// Keys the in-process table by a hash with a per-process random seed (aHash: fast, and
    /// keyed so nobody can aim keys at one slot); the hot path allocates nothing.
    hasher: ahash::RandomState,
    /// Refusal counters per key kind, registered once (the hot path only adds).
    refusals: [metrics::Counter; 3],
}

impl Ceiling<DefaultClock> {
    pub fn from_config(c: &CeilingConfig, shared: Option<(RedisBuckets, SharedClock)>) -> Self {
        Ceiling::with_clock(c, DefaultClock::default(), shared)
    }
}

impl<C: GovernorClock + Clone> Ceiling<C> {
    pub fn with_clock(c: &CeilingConfig, clock: C, shared: Option<(RedisBuckets, SharedClock)>) -> Self {
        let limiter = Self::limiter(c.burst, c.per_second, c.max_tracked_keys, &clock);
        let public = Self::limiter(c.public_burst, c.public_per_second, c.max_tracked_keys, &clock);
        let trusted = c
            .trusted_proxies
            .iter()
            .filter_map(|p| {
                p.parse::<ipnet::IpNet>().ok().or_else(|| p.parse::<IpAddr>().ok().map(ipnet::IpNet::from))
            })
            .collect();
        let api_key_header =
            Some(c.api_key_header.trim()).filter(|h| !h.is_empty()).and_then(|h| h.parse().ok());
        let refusals = ["session", "api_key", "ip"]
            .map(|kind| metrics::counter!("tollgate_ceiling_refusals_total", "key_kind" => kind));
        // Tolerates `sha256sum`'s own output ("HEX  -"): the first word is the digest.
        let prefix = |h: &String| {
            hex::decode(h.split_whitespace().next().unwrap_or(""))
                .ok()
                .and_then(|d| d.get(..16).and_then(|p| <[u8; 16]>::try_from(p).ok()))
        };
        let mut known_api_keys: std::collections::HashMap<[u8; 16], u8> =
            c.api_keys_sha256.iter().filter_map(prefix).map(|p| (p, 0)).collect();
        let mut tiers = Vec::new();
        for (i, tier) in c.api_key_tiers.values().enumerate() {
            let index = u8::try_from(i + 1).expect("validated: at most 255 tiers");
            known_api_keys.extend(tier.keys_sha256.iter().filter_map(prefix).map(|p| (p, index)));
            let limiter = Self::limiter(tier.burst, tier.per_second, c.max_tracked_keys, &clock);
            tiers.push(Tier { limiter, burst: tier.burst, per_second: tier.per_second });
        }
        Ceiling {
            limiter,
            clock,
            burst: c.burst,
            per_second: c.per_second,
            public,
            api_key_header,
            known_api_keys,
            tiers,
            sessions: Arc::new(LiveSessions::new(c.max_tracked_keys, c.max_sessions_per_client)),
            trusted,
            shared,
            hasher: ahash::RandomState::new(),
            refusals,
        }
    }

    fn limiter(burst: u32, per_second: u32, max_keys: usize, clock: &C) -> Limiter<C> {
        let per_second = NonZeroU32::new(per_second).expect("validated positive");
        let burst = NonZeroU32::new(burst).expect("validated positive");
        let quota = Quota::per_second(per_second).allow_burst(burst);
        let limiter: RateLimiter<_, _, _, governor::middleware::NoOpMiddleware<C::Instant>> =
            RateLimiter::new(quota, BoundedStore::new(max_keys), clock.clone());
        limiter.with_middleware::<StateInformationMiddleware>()
    }

    /// Counts one request to a public endpoint against the client's identity (a session
    /// earns nothing here). In process only: a fleet allows each replica's budget.
    pub fn check_public(&self, headers: &HeaderMap, peer: IpAddr) -> Result<(), u64> {
        let parts = self.identity_parts(headers, peer);
        self.public.check_key(&self.hash_parts(&parts)).map(|_| ()).map_err(|not_until| {
            metrics::counter!("tollgate_public_refusals_total").increment(1);
            retry_after_secs(not_until.wait_time_from(self.clock.now()))
        })
    }

    /// The key a request is counted under: its MCP session, else its API key, else its IP.
    pub fn client_key(&self, headers: &HeaderMap, peer: IpAddr) -> ClientKey {
        self.key_parts(headers, peer).owned()
    }

    fn key_parts<'a>(&self, headers: &'a HeaderMap, peer: IpAddr) -> KeyParts<'a> {
        static SESSION: http::HeaderName = http::HeaderName::from_static("mcp-session-id");
        let session = headers.get(&SESSION).and_then(|v| v.to_str().ok());
        // Only ids this server issued: anyone can send any value, and a fresh value per request
        // must not be a fresh bucket (nor a new entry in the key table).
        if let Some(session) = session.filter(|s| !s.is_empty() && s.len() <= 128 && self.sessions.is_live(s))
        {
            return KeyParts::Session(session);
        }
        self.identity_parts(headers, peer)
    }

    /// The caller whatever its session: its configured API key, else its IP block.
    pub fn client_identity(&self, headers: &HeaderMap, peer: IpAddr) -> ClientIdentity {
        ClientIdentity(self.identity_parts(headers, peer).owned())
    }

    fn identity_parts<'a>(&self, headers: &'a HeaderMap, peer: IpAddr) -> KeyParts<'a> {
        if let Some(key) = self.api_key_header.as_ref().and_then(|h| headers.get(h)) {
            let digest = Sha256::digest(key.as_bytes());
            let prefix: [u8; 16] = digest[..16].try_into().expect("16 bytes");
            if let Some(&tier) = self.known_api_keys.get(&prefix) {
                let mut hex = [0u8; 32];
                hex::encode_to_slice(prefix, &mut hex).expect("32 hex digits for 16 bytes");
                return KeyParts::ApiKey(hex, tier);
            }
        }
        KeyParts::Ip(Self::client_block(self.real_ip(headers, peer)))
    }

    fn hash_parts(&self, parts: &KeyParts<'_>) -> u64 {
        match parts {
            KeyParts::Session(s) => self.hasher.hash_one((0u8, s.as_bytes())),
            KeyParts::ApiKey(hex, _) => self.hasher.hash_one((1u8, &hex[..])),
            KeyParts::Ip(ip) => self.hasher.hash_one((2u8, ip)),
        }
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|net| net.contains(&ip))
    }

    /// The block a client's address is keyed by: the address itself for IPv4, its /64 for IPv6,
    /// where one host routinely holds a whole /64 and could otherwise be 2^64 clients.
    fn client_block(ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
            IpAddr::V6(v6) => IpAddr::V4(v6.to_ipv4_mapped().expect("checked")),
            v4 => v4,
        }
    }

    /// The client's address: the peer, unless the peer is a trusted proxy, in which case the
    /// right-most untrusted hop of `X-Forwarded-For` (anything left of it could be forged).
    /// Hops may carry a port ("203.0.113.7:4711", "[2001:db8::1]:443"), as some proxies write
    /// them. A hop that is no address at all ends the walk at the last trusted hop: skipping it
    /// would hand the decision to the forgeable hops on its left.
    fn real_ip(&self, headers: &HeaderMap, peer: IpAddr) -> IpAddr {
        if !self.is_trusted(peer) {
            return peer;
        }
        let mut nearest_trusted = peer;
        let values: Vec<&str> =
            headers.get_all("x-forwarded-for").iter().filter_map(|v| v.to_str().ok()).collect();
        for hop in values.iter().rev().flat_map(|v| v.rsplit(',')) {
            let Some(ip) = parse_hop(hop.trim()) else { return nearest_trusted };
            if !self.is_trusted(ip) {
                return ip;
            }
            nearest_trusted = ip;
        }
        nearest_trusted
    }

    /// Counts one request against `key`.
    pub async fn check(&self, key: &ClientKey) -> Result<Admitted, CeilingError> {
        let parts = match key {
            ClientKey::Session(s) => KeyParts::Session(s),
            ClientKey::ApiKey(h) => {
                let mut hex = [0u8; 32];
                let n = h.len().min(32);
                hex[..n].copy_from_slice(&h.as_bytes()[..n]);
                let prefix = hex::decode(h).ok().and_then(|d| <[u8; 16]>::try_from(d).ok());
                let tier = prefix.and_then(|p| self.known_api_keys.get(&p).copied()).unwrap_or(0);
                KeyParts::ApiKey(hex, tier)
            }
            ClientKey::Ip(ip) => KeyParts::Ip(*ip),
        };
        self.check_parts(&parts).await
    }

    /// Counts one request, keyed from its headers and peer (the HTTP hot path).
    pub async fn check_request(&self, headers: &HeaderMap, peer: IpAddr) -> Result<Admitted, CeilingError> {
        self.check_parts(&self.key_parts(headers, peer)).await
    }

    /// The same, synchronously, when the ceiling is in-process (`None` when it is shared and
    /// must ask Redis): lets the HTTP layer refuse without allocating a future.
    pub fn check_request_now(
        &self,
        headers: &HeaderMap,
        peer: IpAddr,
    ) -> Option<Result<Admitted, CeilingError>> {
        self.shared.is_none().then(|| self.check_local(&self.key_parts(headers, peer)))
    }

    async fn check_parts(&self, parts: &KeyParts<'_>) -> Result<Admitted, CeilingError> {
        if let Some((redis, clock)) = &self.shared {
            match self.check_shared(redis, clock, parts).await {
                Ok(decision) => return decision,
                Err(e) => {
                    // A fleet without Redis still has each replica's own ceiling.
                    metrics::counter!("tollgate_limiter_unavailable_total").increment(1);
                    tracing::warn!(error = %e, "shared ceiling unavailable; using the local one");
                }
            }
        }
        self.check_local(parts)
    }

    /// The limiter and quota (burst, per second) a request is counted in: its API key's tier, or
    /// the default.
    fn quota_of(&self, parts: &KeyParts<'_>) -> (&Limiter<C>, u32, u32) {
        match parts {
            KeyParts::ApiKey(_, tier @ 1..) => {
                let t = &self.tiers[usize::from(*tier) - 1];
                (&t.limiter, t.burst, t.per_second)
            }
            _ => (&self.limiter, self.burst, self.per_second),
        }
    }

    fn check_local(&self, parts: &KeyParts<'_>) -> Result<Admitted, CeilingError> {
        let (limiter, burst, per_second) = self.quota_of(parts);
        match limiter.check_key(&self.hash_parts(parts)) {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                let missing = u64::from(burst.saturating_sub(remaining));
                Ok(Admitted { remaining, reset_secs: missing.div_ceil(u64::from(per_second)) })
            }
            Err(not_until) => Err(self.refused(parts.kind(), not_until.wait_time_from(self.clock.now()))),
        }
    }

    async fn check_shared(
        &self,
        redis: &RedisBuckets,
        clock: &SharedClock,
        parts: &KeyParts<'_>,
    ) -> redis::RedisResult<Result<Admitted, CeilingError>> {
        let (_, burst, per_second) = self.quota_of(parts);
        let key = parts.owned();
        let rate =
            Rate { limit: u64::from(burst), window_us: u64::from(burst) * 1_000_000 / u64::from(per_second) };
        let charge = Charge { key: format!("ceiling:{key}"), rate, cost: 1 };
        let now = clock.now_millis() * 1000;
        Ok(match redis.check(std::slice::from_ref(&charge), now).await? {
            Verdict::Allowed { tats } => {
                let remaining = rate.remaining(tats[0], now) as u32;
                let missing = u64::from(burst.saturating_sub(remaining));
                Ok(Admitted { remaining, reset_secs: missing.div_ceil(u64::from(per_second)) })
            }
            Verdict::Denied { tat, .. } => {
                Err(self
                    .refused(key.kind(), Duration::from_micros(Verdict::retry_after_us(&charge, tat, now))))
            }
        })
    }

    fn refused(&self, key_kind: &'static str, wait: Duration) -> CeilingError {
        let slot = match key_kind {
            "session" => 0,
            "api_key" => 1,
            _ => 2,
        };
        self.refusals[slot].increment(1);
        CeilingError::Exceeded { key_kind, retry_after_secs: retry_after_secs(wait) }
    }

    /// Keys currently tracked (the memory bound).
    pub fn tracked_keys(&self) -> usize {
        self.limiter.len()
    }

    /// Forgets keys whose buckets are full again; run periodically.
    pub fn sweep(&self) {
        self.limiter.retain_recent();
        for tier in &self.tiers {
            tier.limiter.retain_recent();
        }
        self.public.retain_recent();
        metrics::gauge!("tollgate_ceiling_tracked_keys").set(self.tracked_keys() as f64);
    }
}

/// Whole seconds for `Retry-After`, rounded up: a client that waits exactly that long must get
/// through.
fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_millis().div_ceil(1000).max(1) as u64
}

/// One `X-Forwarded-For` hop: an address, with or without a port.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    hop.parse::<IpAddr>().ok().or_else(|| hop.parse::<std::net::SocketAddr>().ok().map(|s| s.ip()))
}

/// Runs `sweep` every `every` until the process ends.
pub fn spawn_sweeper(ceiling: Arc<Ceiling>, every: Duration, cancel: tokio_util::sync::CancellationToken) {
    crate::background::every(every, cancel, move || {
        ceiling.sweep();
        std::future::ready(())
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn config(burst: u32, per_second: u32, max_keys: usize) -> CeilingConfig {
        CeilingConfig {
            burst,
            per_second,
            max_tracked_keys: max_keys,
            api_key_header: "x-api-key".into(),
            api_keys_sha256: vec![hex::encode(Sha256::digest(b"secret-key"))],
            api_key_tiers: [(
                "partner".to_owned(),
                crate::config::ApiKeyTier {
                    burst: burst * 10,
                    per_second,
                    keys_sha256: vec![hex::encode(Sha256::digest(b"partner-key"))],
                },
            )]
            .into(),
            max_sessions_per_client: 16,
            public_burst: 5,
            public_per_second: 1,
            trusted_proxies: vec!["10.0.0.0/8".into()],
            shared: false,
        }
    }

    fn ip(s: &str) -> ClientKey {
        ClientKey::Ip(s.parse().unwrap())
    }

    #[tokio::test]
    async fn a_burst_passes_the_next_is_refused_with_retry_after_then_passes_after_it() {
        // Arrange: burst 3, 1 per second, on a clock we move by hand.
        let clock = FakeRelativeClock::default();
        let ceiling = Ceiling::with_clock(&config(3, 1, 100), clock.clone(), None);
        let key = ip("192.0.2.1");
        // Act + Assert
        for i in 0..3 {
            assert!(ceiling.check(&key).await.is_ok(), "burst request {i}");
        }
        let refused = ceiling.check(&key).await.unwrap_err();
        assert_eq!(refused, CeilingError::Exceeded { key_kind: "ip", retry_after_secs: 1 });
        clock.advance(Duration::from_millis(999));
        assert!(ceiling.check(&key).await.is_err(), "not before Retry-After");
        clock.advance(Duration::from_millis(1));
        assert!(ceiling.check(&key).await.is_ok(), "after Retry-After");
        // Other keys were never affected.
        assert!(ceiling.check(&ip("192.0.2.2")).await.is_ok());
    }

    #[tokio::test]
    async fn a_flood_of_distinct_keys_stays_within_the_cap_and_shares_one_overflow_bucket() {
        let clock = FakeRelativeClock::default();
        let ceiling = Ceiling::with_clock(&config(2, 1, 100), clock.clone(), None);
        let mut admitted = 0;
        for i in 0..10_000u32 {
            let key = ClientKey::Session(format!("flood-{i}"));
            admitted += usize::from(ceiling.check(&key).await.is_ok());
        }
        assert!(ceiling.tracked_keys() <= 100, "tracked {}", ceiling.tracked_keys());
        // The first 100 keys got their own buckets (one request each); the other 9,900 shared
        // the overflow bucket, which admitted its burst of 2 and refused the rest.
        assert_eq!(admitted, 100 + 2);
        // Once idle, the table empties and new keys get their own buckets again.
        clock.advance(Duration::from_secs(10));
        ceiling.sweep();
        assert_eq!(ceiling.tracked_keys(), 0);
        assert!(ceiling.check(&ClientKey::Session("late".into())).await.is_ok());
    }

    #[test]
    fn keys_prefer_an_issued_session_then_a_known_api_key_then_ip() {
        let ceiling = Ceiling::from_config(&config(1, 1, 100), None);
        let peer: IpAddr = "192.0.2.9".parse().unwrap();
        let mut headers = HeaderMap::new();
        assert_eq!(ceiling.client_key(&headers, peer), ClientKey::Ip(peer));
        // An API key the operator did not configure earns nothing: the IP.
        headers.insert("x-api-key", "made-up".parse().unwrap());
        assert_eq!(ceiling.client_key(&headers, peer), ClientKey::Ip(peer));
        headers.insert("x-api-key", "secret-key".parse().unwrap());
        let ClientKey::ApiKey(hash) = ceiling.client_key(&headers, peer) else { panic!("api key") };
        assert!(!hash.contains("secret"), "the key is hashed");
        // A session id this server never issued earns nothing either.
        headers.insert("mcp-session-id", "abc".parse().unwrap());
        assert!(matches!(ceiling.client_key(&headers, peer), ClientKey::ApiKey(_)));
        ceiling.sessions.issued("abc");
        assert_eq!(ceiling.client_key(&headers, peer), ClientKey::Session("abc".into()));
        ceiling.sessions.closed("abc");
        assert!(matches!(ceiling.client_key(&headers, peer), ClientKey::ApiKey(_)), "closed");
    }

    #[tokio::test]
    async fn a_tiered_api_key_gets_its_tiers_quota_and_an_unknown_key_the_ips() {
        let ceiling = Ceiling::from_config(&config(2, 1, 100), None);
        let peer: IpAddr = "192.0.2.9".parse().unwrap();
        let admitted = |key: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert("x-api-key", key.parse().unwrap());
            let ceiling = &ceiling;
            async move {
                let mut n = 0;
                while ceiling.check_request(&headers, peer).await.is_ok() && n < 1000 {
                    n += 1;
                }
                n
            }
        };
        assert_eq!(admitted("partner-key").await, 20, "the partner tier's burst");
        assert_eq!(admitted("secret-key").await, 2, "a plain configured key: the default burst");
        assert_eq!(admitted("made-up").await, 2, "an unknown key: the IP's own bucket");
        assert_eq!(admitted("made-up-too").await, 0, "which it shares with every unknown key");
    }

    #[test]
    fn an_ipv6_client_is_keyed_by_its_64_block() {
        let ceiling = Ceiling::from_config(&config(1, 1, 100), None);
        let headers = HeaderMap::new();
        let (a, b): (IpAddr, IpAddr) =
            ("2001:db8:1:2::1".parse().unwrap(), "2001:db8:1:2:ffff::9".parse().unwrap());
        assert_eq!(ceiling.client_key(&headers, a), ceiling.client_key(&headers, b), "one /64, one key");
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_ne!(ceiling.client_key(&headers, a), ceiling.client_key(&headers, other));
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(ceiling.client_key(&headers, v4), ClientKey::Ip(v4));
    }

    #[test]
    fn forwarded_hops_with_ports_count_and_garbage_never_hands_the_key_to_forgeable_hops() {
        let ceiling = Ceiling::from_config(&config(1, 1, 100), None);
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let key = |xff: &str| {
            let mut headers = HeaderMap::new();
            headers.insert("x-forwarded-for", xff.parse().unwrap());
            ceiling.client_key(&headers, proxy)
        };
        assert_eq!(key("198.51.100.9, 203.0.113.7:4711"), ip("203.0.113.7"), "IPv4 with a port");
        assert_eq!(key("[2001:db8:1:2::1]:443"), ip("2001:db8:1:2::"), "IPv6 with a port, by its /64");
        assert_eq!(key("198.51.100.9, 10.2.2.2:80"), ip("198.51.100.9"), "a trusted hop with a port");
        // An unreadable hop stops the walk: the forged hop left of it is not believed.
        assert_eq!(key("198.51.100.66, not-an-ip, 10.2.2.2"), ip("10.2.2.2"));
        assert_eq!(key("198.51.100.66, unknown"), ClientKey::Ip(proxy));
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let ceiling = Ceiling::from_config(&config(1, 1, 100), None);
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", "203.0.113.7, 198.51.100.1, 10.1.1.1".parse().unwrap());
        let untrusted: IpAddr = "192.0.2.50".parse().unwrap();
        assert_eq!(
            ceiling.client_key(&headers, untrusted),
            ClientKey::Ip(untrusted),
            "forged header ignored"
        );
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(
            ceiling.client_key(&headers, proxy),
            ip("198.51.100.1"),
            "right-most untrusted hop; anything left of it could be forged"
        );
    }
}
