//! Fleet buckets in Redis: the GCRA of `gcra.rs`, run for all of a request's buckets in one
//! atomic Lua script (one round trip), so every replica enforces one combined limit.

use redis::Script;
use redis::aio::ConnectionManager;

use super::gcra::{Charge, Verdict};

/// The Lua twin of `gcra::decide` plus the charge. ARGV[1] = now (µs); then per key:
/// increment (µs) and window (µs). Returns {0, tat1, tat2, …} or {index, tat} when refused.
/// Numbers are formatted with %.0f: they are integers below 2^53, exact in Lua's doubles.
const GCRA_LUA: &str = r#"
local now = tonumber(ARGV[1])
local new_tats = {}
for i = 1, #KEYS do
  local inc = tonumber(ARGV[2 * i])
  local window = tonumber(ARGV[2 * i + 1])
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
  if tat < now then tat = now end
  if tat + inc > now + window then
    return {i, string.format('%.0f', tat)}
  end
  new_tats[i] = tat + inc
end
local out = {0}
for i = 1, #KEYS do
  local ttl_ms = math.floor((new_tats[i] - now) / 1000) + 1
  redis.call('SET', KEYS[i], string.format('%.0f', new_tats[i]), 'PX', ttl_ms)
  out[i + 1] = string.format('%.0f', new_tats[i])
end
return out
"#;

/// Gives back one admitted charge: the bucket's TAT moves back by its increment, never below
/// now. ARGV[1] = now (µs), ARGV[2] = increment (µs).
const REFUND_LUA: &str = r#"
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local now = tonumber(ARGV[1])
if tat > now then
  local new = tat - tonumber(ARGV[2])
  if new < now then new = now end
  local ttl_ms = math.floor((new - now) / 1000) + 1
  redis.call('SET', KEYS[1], string.format('%.0f', new), 'PX', ttl_ms)
end
return 0
"#;

/// Moves a "until" mark later, never earlier. ARGV[1] = until, ARGV[2] = TTL (ms).
const EXTEND_LUA: &str = r#"
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > current then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
return 0
"#;

/// Buckets shared through Redis.
#[derive(Clone)]
pub struct RedisBuckets {
    conn: ConnectionManager,
    script: Script,
    prefix: String,
}

impl RedisBuckets {
    /// Connects (reconnecting automatically later). Fails if Redis is unreachable now.
    pub async fn connect(url: &str, prefix: &str) -> redis::RedisResult<RedisBuckets> {
        let client = redis::Client::open(url)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(std::time::Duration::from_secs(2))
            .set_response_timeout(std::time::Duration::from_secs(2))
            .set_number_of_retries(1);
        let conn = ConnectionManager::new_with_config(client, config).await?;
        Ok(RedisBuckets { conn, script: Script::new(GCRA_LUA), prefix: prefix.to_owned() })
    }

    pub async fn check(&self, charges: &[Charge], now_us: u64) -> redis::RedisResult<Verdict> {
        let mut invocation = self.script.prepare_invoke();
        invocation.arg(now_us);
        for c in charges {
            invocation.key(format!("{}:{}", self.prefix, c.key));
            invocation.arg(c.rate.increment_us(c.cost)).arg(c.rate.window_us);
        }
        let reply: Vec<redis::Value> = invocation.invoke_async(&mut self.conn.clone()).await?;
        let num = |v: &redis::Value| -> u64 {
            match v {
                redis::Value::Int(i) => *i as u64,
                redis::Value::BulkString(b) => {
                    std::str::from_utf8(b).ok().and_then(|s| s.parse().ok()).unwrap_or(0)
                }
                _ => 0,
            }
        };
        let index = reply.first().map(num).unwrap_or(0);
        Ok(if index == 0 {
            Verdict::Allowed { tats: reply.iter().skip(1).map(num).collect() }
        } else {
            Verdict::Denied { index: index as usize - 1, tat: reply.get(1).map(num).unwrap_or(now_us) }
        })
    }

    /// The connection, for other state a fleet shares (the result cache).
    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// Gives back what an admitted `charge` took (a call that never used it).
    pub async fn refund(&self, charge: &Charge, now_us: u64) -> redis::RedisResult<()> {
        let script = Script::new(REFUND_LUA);
        script
            .key(format!("{}:{}", self.prefix, charge.key))
            .arg(now_us)
            .arg(charge.rate.increment_us(charge.cost))
            .invoke_async(&mut self.conn.clone())
            .await
    }

    /// Marks `subject` as [`Self::penalize`] does, unless it is already marked until later.
    pub async fn extend_penalty(&self, subject: &str, until_ms: u64, ttl_ms: u64) -> redis::RedisResult<()> {
        let script = Script::new(EXTEND_LUA);
        script
            .key(format!("{}:penalty:{subject}", self.prefix))
            .arg(until_ms)
            .arg(ttl_ms.max(1))
            .invoke_async(&mut self.conn.clone())
            .await
    }

    /// Marks `subject` penalised until `until_ms` (the service clock's time), for every replica.
    pub async fn penalize(&self, subject: &str, until_ms: u64, ttl_ms: u64) -> redis::RedisResult<()> {
        let key = format!("{}:penalty:{subject}", self.prefix);
        redis::cmd("SET")
            .arg(&key)
            .arg(until_ms)
            .arg("PX")
            .arg(ttl_ms.max(1))
            .query_async(&mut self.conn.clone())
            .await
    }

    /// Until when `subject` is penalised, if at all.
    pub async fn penalty(&self, subject: &str) -> redis::RedisResult<Option<u64>> {
        let key = format!("{}:penalty:{subject}", self.prefix);
        redis::cmd("GET").arg(&key).query_async(&mut self.conn.clone()).await
    }

    /// Round-trips a PING: for readiness.
    pub async fn ping(&self) -> redis::RedisResult<()> {
        redis::cmd("PING").query_async::<String>(&mut self.conn.clone()).await.map(|_| ())
    }
}
