//! `SqliteStore` and `PgStore`: the same SQL text over two sqlx pools.
//!
//! The statements are written once, in the dialect both engines accept (`$N` parameters,
//! `on conflict do nothing`, `returning`), and a macro stamps out the `Store` impl for each
//! pool type. sqlx's `Any` driver would also share the code, but it cannot give `PgStore` the
//! Postgres-only features later stages need (advisory locks), so the two stay distinct types.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{PgPool, SqlitePool};

use super::{
    Claim, NewPayment, PaymentKey, PaymentRecord, PaymentState, ReceiptSlot, RenderAnswer, SignReceipt,
    Store, StoreError, StoredCheckpoint, StoredReceipt, Transition,
};

/// SQLite, for `tollgate dev` and single-node deployments.
#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    append_lock: std::sync::Arc<tokio::sync::Mutex<()>>,
}

/// PostgreSQL, for fleets: every replica shares the claim table.
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    append_lock: std::sync::Arc<tokio::sync::Mutex<()>>,
    /// The connection holding the checkpointer's advisory lock, while this replica leads.
    leader: std::sync::Arc<tokio::sync::Mutex<Option<sqlx::pool::PoolConnection<sqlx::Postgres>>>>,
}

/// A pooled SQLite connection idle for longer than this is pinged before use.
const PING_IDLE_AFTER: Duration = Duration::from_secs(1);

/// sqlx pings every connection it hands out (`test_before_acquire`): for SQLite, one more hop
/// to the connection's thread and back per statement (on a 2-core machine, a paid call's
/// pooled statements spent ten context switches on it). A SQLite connection lives in this
/// process and no server restart can break it; sqlx also pings every connection given back,
/// so only one idle for over a second is pinged before use.
fn pinged_when_idle(options: SqlitePoolOptions) -> SqlitePoolOptions {
    options.test_before_acquire(false).before_acquire(|conn, meta| {
        Box::pin(async move {
            if meta.idle_for > PING_IDLE_AFTER {
                sqlx::Connection::ping(conn).await?;
            }
            Ok(true)
        })
    })
}

impl SqliteStore {
    pub async fn connect(url: &str, max_connections: u32) -> Result<SqliteStore, StoreError> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            // WAL lets readers proceed during a write; NORMAL sync is durable across process
            // crashes (the failure we design for), and busy_timeout queues concurrent claims.
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10));
        let pool = pinged_when_idle(SqlitePoolOptions::new())
            .max_connections(max_connections)
            .connect_with(options)
            .await?;
        Ok(SqliteStore { pool, append_lock: Default::default() })
    }
}

impl PgStore {
    pub async fn connect(url: &str, max_connections: u32) -> Result<PgStore, StoreError> {
        let options = PgConnectOptions::from_str(url)?;
        Self::connect_with(options, max_connections).await
    }

    /// Connects with every session's `search_path` set to `schema` (created if missing), so
    /// tests and side-by-side deployments can share one database without sharing tables.
    pub async fn connect_in_schema(
        url: &str,
        schema: &str,
        max_connections: u32,
    ) -> Result<PgStore, StoreError> {
        if !schema.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(StoreError::Corrupt(format!("invalid schema name {schema:?}")));
        }
        let base = PgConnectOptions::from_str(url)?;
        let admin = PgPoolOptions::new().max_connections(1).connect_with(base.clone()).await?;
        sqlx::query(&format!("create schema if not exists {schema}")).execute(&admin).await?;
        admin.close().await;
        Self::connect_with(base.options([("search_path", schema)]), max_connections).await
    }

    async fn connect_with(options: PgConnectOptions, max_connections: u32) -> Result<PgStore, StoreError> {
        // Every connection is pinged before use (sqlx's default), a round trip per statement:
        // after a Postgres restart, connections given back in the second before are found out
        // there, and replaced within the acquire timeout, instead of failing a statement each.
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            // Fail fast when Postgres is down: the caller answers 503, it must not hang.
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await?;
        Ok(PgStore { pool, append_lock: Default::default(), leader: Default::default() })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// The columns of `payments` plus the stored result, as both drivers decode them.
#[derive(sqlx::FromRow)]
struct Row {
    id: i64,
    network: String,
    asset: String,
    payer: String,
    nonce: String,
    payload_hash: String,
    payment_id: Option<String>,
    tool: String,
    amount: String,
    state: String,
    tx_hash: Option<String>,
    block_number: Option<i64>,
    error: Option<String>,
    handler_started_at: Option<i64>,
    valid_before: i64,
    payload_json: String,
    args_json: Option<String>,
    args_hash: Option<String>,
    from_block: Option<i64>,
    tx_nonce: Option<i64>,
    price_terms: Option<String>,
    refund_json: Option<String>,
    created_at: i64,
    updated_at: i64,
    result_json: Option<String>,
}

/// Parses a stored column; a value that does not parse is damage, never a default.
fn column<T: std::str::FromStr>(name: &str, value: &str) -> Result<T, StoreError> {
    value.parse().map_err(|_| StoreError::Corrupt(format!("payments.{name} holds {value:?}")))
}

/// The stored (lower-case hex) form of an address or hash.
fn hex_of(value: impl std::fmt::LowerHex) -> String {
    format!("{value:#x}")
}

impl TryFrom<Row> for PaymentRecord {
    type Error = StoreError;
    fn try_from(r: Row) -> Result<Self, StoreError> {
        Ok(PaymentRecord {
            id: r.id,
            network: r.network,
            asset: column("asset", &r.asset)?,
            payer: column("payer", &r.payer)?,
            nonce: column("nonce", &r.nonce)?,
            payload_hash: r.payload_hash,
            payment_id: r.payment_id,
            tool: r.tool,
            amount: column("amount", &r.amount)?,
            state: r.state.parse()?,
            tx_hash: r.tx_hash.as_deref().map(|t| column("tx_hash", t)).transpose()?,
            block_number: r.block_number,
            error: r.error,
            handler_started_at: r.handler_started_at,
            valid_before: r.valid_before,
            payload_json: r.payload_json,
            args_json: r.args_json,
            args_hash: r.args_hash,
            from_block: r.from_block,
            tx_nonce: r.tx_nonce,
            price_terms: r.price_terms,
            refund_json: r.refund_json,
            created_at: r.created_at,
            updated_at: r.updated_at,
            result_json: r.result_json,
        })
    }
}

/// `select <receipt columns> from receipts <rest>`, as a static string.
macro_rules! select_receipts {
    ($rest:literal) => {
        concat!(
            "select log_index, payment_row, payer, payer_seq, body, signature, kid, leaf_hash, created_at ",
            "from receipts ",
            $rest
        )
    };
}

/// `select <all payment columns and the result> … where <clause>`, as a static string.
macro_rules! select_where {
    ($clause:literal) => {
        concat!(
            "select p.id, p.network, p.asset, p.payer, p.nonce, p.payload_hash, p.payment_id, ",
            "p.tool, p.amount, p.state, p.tx_hash, p.block_number, p.error, p.handler_started_at, ",
            "p.valid_before, ",
            "p.payload_json, p.args_json, p.args_hash, p.from_block, p.tx_nonce, p.price_terms, p.refund_json, ",
            "p.created_at, p.updated_at, r.result_json ",
            "from payments p left join results r on r.payment_row = p.id where ",
            $clause
        )
    };
}

const INSERT_CLAIM: &str = "insert into payments (network, asset, payer, nonce, payload_hash, \
     payment_id, tool, amount, state, valid_before, payload_json, args_json, args_hash, price_terms, \
     created_at, updated_at) values ($1, $2, $3, $4, $5, $6, $7, $8, 'claimed', $9, $10, $12, $13, $14, $11, $11) \
     on conflict do nothing returning id, network, asset, payer, nonce, payload_hash, payment_id, tool, amount, \
     state, tx_hash, block_number, error, handler_started_at, valid_before, payload_json, args_json, args_hash, \
     from_block, tx_nonce, price_terms, refund_json, created_at, updated_at, cast(null as text) as result_json";

/// `'a', 'b'` for an IN list. Safe to splice: the values are our own enum names.
fn state_list(states: &[PaymentState]) -> String {
    states.iter().map(|s| format!("'{}'", s.as_str())).collect::<Vec<_>>().join(", ")
}

macro_rules! impl_store {
    ($store:ty, $migrator:expr, $append_lock:expr, $begin_write:expr) => {
        #[async_trait::async_trait]
        impl Store for $store {
            async fn migrate(&self) -> Result<(), StoreError> {
                $migrator.run(&self.pool).await?;
                Ok(())
            }

            async fn pending_migrations(&self) -> Result<Vec<i64>, StoreError> {
                let applied: Vec<i64> =
                    match sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
                        .fetch_all(&self.pool)
                        .await
                    {
                        Ok(applied) => applied,
                        // No bookkeeping table: nothing was ever migrated here.
                        Err(sqlx::Error::Database(_)) => Vec::new(),
                        Err(e) => return Err(e.into()),
                    };
                Ok($migrator.iter().map(|m| m.version).filter(|v| !applied.contains(v)).collect())
            }

            async fn ping(&self) -> Result<(), StoreError> {
                sqlx::query("select 1").execute(&self.pool).await?;
                Ok(())
            }

            async fn claim(&self, p: &NewPayment) -> Result<Claim, StoreError> {
                // The new row comes back with the insert (a fresh claim has no result yet), so
                // winning costs one statement.
                let inserted: Option<Row> = sqlx::query_as(INSERT_CLAIM)
                    .bind(&p.network)
                    .bind(hex_of(p.asset))
                    .bind(hex_of(p.payer))
                    .bind(hex_of(p.nonce))
                    .bind(&p.payload_hash)
                    .bind(&p.payment_id)
                    .bind(&p.tool)
                    .bind(p.amount.to_string())
                    .bind(p.valid_before)
                    .bind(&p.payload_json)
                    .bind(p.now)
                    .bind(&p.args_json)
                    .bind(&p.args_hash)
                    .bind(&p.price_terms)
                    .fetch_optional(&self.pool)
                    .await?;
                if let Some(row) = inserted {
                    return PaymentRecord::try_from(row).map(Claim::Won);
                }
                // Lost: the conflict was on the claim key or on the payment identifier.
                let key = PaymentKey { network: &p.network, asset: p.asset, payer: p.payer, nonce: p.nonce };
                let by_key = self.by_key(&key).await?;
                let existing = match (by_key, &p.payment_id) {
                    (Some(row), _) => Some(row),
                    (None, Some(pid)) => self.by_payment_id(pid).await?,
                    (None, None) => None,
                };
                // A row released between our insert and our read cannot be reported as taken;
                // the error makes the payment stage answer `store_unavailable`, and the client's
                // retry of the same payment finds the authorization claimable again.
                existing
                    .map(Claim::Taken)
                    .ok_or_else(|| StoreError::Corrupt("claim conflicted but no row found".into()))
            }

            async fn by_payment_id(&self, payment_id: &str) -> Result<Option<PaymentRecord>, StoreError> {
                sqlx::query_as::<_, Row>(select_where!("p.payment_id = $1"))
                    .bind(payment_id)
                    .fetch_optional(&self.pool)
                    .await?
                    .map(PaymentRecord::try_from)
                    .transpose()
            }

            async fn by_key(&self, key: &PaymentKey<'_>) -> Result<Option<PaymentRecord>, StoreError> {
                sqlx::query_as::<_, Row>(select_where!(
                    "p.network = $1 and p.asset = $2 and p.payer = $3 and p.nonce = $4"
                ))
                .bind(key.network)
                .bind(hex_of(key.asset))
                .bind(hex_of(key.payer))
                .bind(hex_of(key.nonce))
                .fetch_optional(&self.pool)
                .await?
                .map(PaymentRecord::try_from)
                .transpose()
            }

            async fn payment(&self, id: i64) -> Result<Option<PaymentRecord>, StoreError> {
                sqlx::query_as::<_, Row>(select_where!("p.id = $1"))
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await?
                    .map(PaymentRecord::try_from)
                    .transpose()
            }

            async fn transition(
                &self,
                id: i64,
                from: &[PaymentState],
                to: PaymentState,
                t: Transition<'_>,
                now: i64,
            ) -> Result<bool, StoreError> {
                let sql = format!(
                    "update payments set state = $1, tx_hash = coalesce($2, tx_hash), \
                     block_number = coalesce($3, block_number), error = coalesce($4, error), \
                     from_block = coalesce($7, from_block), tx_nonce = coalesce($8, tx_nonce), \
                     args_json = case when $1 = 'failed' then null else args_json end, \
                     handler_started_at = coalesce(handler_started_at, $9), \
                     updated_at = $5 where id = $6 and state in ({})",
                    state_list(from)
                );
                let done = sqlx::query(&sql)
                    .bind(to.as_str())
                    .bind(t.tx_hash.map(hex_of))
                    .bind(t.block_number)
                    .bind(t.error)
                    .bind(now)
                    .bind(id)
                    .bind(t.from_block)
                    .bind(t.tx_nonce)
                    .bind(t.handler_lease)
                    .execute(&self.pool)
                    .await?;
                Ok(done.rows_affected() == 1)
            }

            async fn release(&self, id: i64) -> Result<bool, StoreError> {
                let done =
                    sqlx::query("delete from payments where id = $1 and state in ('claimed', 'settling', 'pending')")
                        .bind(id)
                        .execute(&self.pool)
                        .await?;
                Ok(done.rows_affected() == 1)
            }

            async fn start_handler(&self, id: i64, seen: Option<i64>, now: i64) -> Result<bool, StoreError> {
                let query = match seen {
                    None => sqlx::query(
                        "update payments set handler_started_at = $1 \
                         where id = $2 and state = 'settled' and handler_started_at is null",
                    )
                    .bind(now)
                    .bind(id),
                    Some(seen) => sqlx::query(
                        "update payments set handler_started_at = $1 \
                         where id = $2 and state = 'settled' and handler_started_at = $3",
                    )
                    .bind(now)
                    .bind(id)
                    .bind(seen),
                };
                Ok(query.execute(&self.pool).await?.rows_affected() == 1)
            }

            async fn start_unsettled_run(&self, id: i64, now: i64) -> Result<bool, StoreError> {
                let done = sqlx::query(
                    "update payments set handler_started_at = $1, updated_at = $1 \
                     where id = $2 and state = 'claimed' and handler_started_at is null",
                )
                .bind(now)
                .bind(id)
                .execute(&self.pool)
                .await?;
                Ok(done.rows_affected() == 1)
            }

            async fn release_stale(&self, id: i64, seen_updated_at: i64) -> Result<bool, StoreError> {
                let done = sqlx::query("delete from payments where id = $1 and state = 'claimed' and updated_at = $2")
                    .bind(id)
                    .bind(seen_updated_at)
                    .execute(&self.pool)
                    .await?;
                Ok(done.rows_affected() == 1)
            }

            async fn begin_refund(&self, id: i64) -> Result<bool, StoreError> {
                let done = sqlx::query(
                    "update payments set refund_json = '{\"status\":\"sending\"}' where id = $1 and refund_json is null",
                )
                .bind(id)
                .execute(&self.pool)
                .await?;
                Ok(done.rows_affected() == 1)
            }

            async fn end_refund(&self, id: i64, refund_json: &str) -> Result<(), StoreError> {
                sqlx::query("update payments set refund_json = $2 where id = $1")
                    .bind(id)
                    .bind(refund_json)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn save_result(&self, id: i64, result_json: &str, now: i64) -> Result<(), StoreError> {
                sqlx::query(SAVE_RESULT).bind(id).bind(result_json).bind(now).execute(&self.pool).await?;
                Ok(())
            }

            async fn unfinished(&self, idle_since: i64, limit: i64) -> Result<Vec<PaymentRecord>, StoreError> {
                let sql = select_where!(
                    "p.args_json is not null and p.state = 'settled' and p.updated_at < $1 \
                     and (p.handler_started_at is null or p.handler_started_at < $1) order by p.id limit $2"
                );
                let rows = sqlx::query_as::<_, Row>(sql).bind(idle_since).bind(limit).fetch_all(&self.pool).await?;
                rows.into_iter().map(PaymentRecord::try_from).collect()
            }

            async fn unresolved(&self, limit: i64) -> Result<Vec<PaymentRecord>, StoreError> {
                let sql =
                    select_where!("p.state in ('claimed', 'settling', 'pending') order by p.id limit $1");
                let rows = sqlx::query_as::<_, Row>(sql).bind(limit).fetch_all(&self.pool).await?;
                rows.into_iter().map(PaymentRecord::try_from).collect()
            }

            async fn append_receipt(
                &self,
                payment_row: i64,
                payer: &str,
                now: i64,
                sign: SignReceipt<'_>,
                answer: RenderAnswer<'_>,
            ) -> Result<StoredReceipt, StoreError> {
                // One appender at a time: in process (SQLite has one writer anyway) and, on
                // Postgres, fleet-wide via a transaction-scoped advisory lock.
                let _serial = self.append_lock.lock().await;
                let mut tx = self.pool.begin_with($begin_write).await?;
                if let Some(lock) = $append_lock {
                    sqlx::query(lock).execute(&mut *tx).await?;
                }
                // The slot, and whether this payment has its receipt already, in one read.
                let (issued, log_index, prev_seq, prev_leaf_hash): (i64, i64, Option<i64>, Option<String>) =
                    sqlx::query_as(
                        "select (select count(*) from receipts where payment_row = $1), \
                         (select coalesce(max(log_index) + 1, 0) from receipts), \
                         (select payer_seq from receipts where payer = $2 order by payer_seq desc limit 1), \
                         (select leaf_hash from receipts where payer = $2 order by payer_seq desc limit 1)",
                    )
                    .bind(payment_row)
                    .bind(payer)
                    .fetch_one(&mut *tx)
                    .await?;
                let stored = if issued > 0 {
                    sqlx::query_as::<_, StoredReceipt>(select_receipts!("where payment_row = $1"))
                        .bind(payment_row)
                        .fetch_one(&mut *tx)
                        .await?
                } else {
                    let slot = ReceiptSlot {
                        log_index,
                        payer_seq: prev_seq.unwrap_or(0) + 1,
                        prev_leaf_hash: prev_leaf_hash.unwrap_or_default(),
                    };
                    let new = sign(&slot);
                    let stored = StoredReceipt {
                        log_index,
                        payment_row,
                        payer: payer.to_owned(),
                        payer_seq: slot.payer_seq,
                        body: new.body,
                        signature: new.signature,
                        kid: new.kid,
                        leaf_hash: new.leaf_hash,
                        created_at: now,
                    };
                    sqlx::query(
                        "insert into receipts (log_index, payment_row, payer, payer_seq, body, signature, kid, \
                         leaf_hash, created_at) values ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                    )
                    .bind(stored.log_index)
                    .bind(stored.payment_row)
                    .bind(&stored.payer)
                    .bind(stored.payer_seq)
                    .bind(&stored.body)
                    .bind(&stored.signature)
                    .bind(&stored.kid)
                    .bind(&stored.leaf_hash)
                    .bind(stored.created_at)
                    .execute(&mut *tx)
                    .await?;
                    // With its receipt, the call is finished: its arguments are no longer needed.
                    sqlx::query("update payments set args_json = null where id = $1")
                        .bind(payment_row)
                        .execute(&mut *tx)
                        .await?;
                    stored
                };
                if let Some(json) = answer.and_then(|render| render(&stored)) {
                    sqlx::query(SAVE_RESULT).bind(payment_row).bind(json).bind(now).execute(&mut *tx).await?;
                }
                tx.commit().await?;
                Ok(stored)
            }

            async fn receipt_count(&self) -> Result<i64, StoreError> {
                let (n,): (i64,) = sqlx::query_as("select count(*) from receipts").fetch_one(&self.pool).await?;
                Ok(n)
            }

            async fn leaf_hashes(&self, start: i64, end: i64) -> Result<Vec<String>, StoreError> {
                let rows: Vec<(String,)> = sqlx::query_as(
                    "select leaf_hash from receipts where log_index >= $1 and log_index < $2 order by log_index",
                )
                .bind(start)
                .bind(end)
                .fetch_all(&self.pool)
                .await?;
                Ok(rows.into_iter().map(|(h,)| h).collect())
            }

            async fn receipt_at(&self, log_index: i64) -> Result<Option<StoredReceipt>, StoreError> {
                Ok(sqlx::query_as(select_receipts!("where log_index = $1"))
                    .bind(log_index)
                    .fetch_optional(&self.pool)
                    .await?)
            }

            async fn receipts_of(&self, payer: &str, after_seq: i64, limit: i64) -> Result<Vec<StoredReceipt>, StoreError> {
                Ok(sqlx::query_as(select_receipts!("where payer = $1 and payer_seq > $2 order by payer_seq limit $3"))
                .bind(payer)
                .bind(after_seq)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?)
            }

            async fn save_checkpoint(&self, c: &StoredCheckpoint) -> Result<(), StoreError> {
                sqlx::query(
                    "insert into log_checkpoints (tree_size, root_hash, body, signature, kid, created_at) \
                     values ($1, $2, $3, $4, $5, $6) on conflict do nothing",
                )
                .bind(c.tree_size)
                .bind(&c.root_hash)
                .bind(&c.body)
                .bind(&c.signature)
                .bind(&c.kid)
                .bind(c.created_at)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn latest_checkpoint(&self) -> Result<Option<StoredCheckpoint>, StoreError> {
                Ok(sqlx::query_as(
                    "select tree_size, root_hash, body, signature, kid, created_at from log_checkpoints \
                     order by tree_size desc limit 1",
                )
                .fetch_optional(&self.pool)
                .await?)
            }

            async fn try_lead(&self) -> Result<bool, StoreError> {
                self.lead().await
            }
        }
    };
}

/// Stores a served answer: first write wins, except over a result kept unsettled, which the
/// served answer replaces.
const SAVE_RESULT: &str = "insert into results (payment_row, result_json, created_at) values ($1, $2, $3) \
     on conflict (payment_row) do update set result_json = excluded.result_json \
     where results.result_json like '{\"unsettled\":%'";

/// Postgres advisory locks, by purpose (ids are bigints no other program on the database uses;
/// 6962 is the log's RFC). The receipt append lock (id 6962001) is held for each append's
/// transaction, so log indices are dense fleet-wide; the checkpointer's leader holds
/// `LEADER_LOCK` for as long as its connection lives.
const APPEND_LOCK_SQL: &str = "select pg_advisory_xact_lock(6962001)";
const LEADER_LOCK: i64 = 6_962_002;

// SQLite: BEGIN IMMEDIATE takes the write lock up front (waiting out busy_timeout); a deferred
// transaction that reads then writes fails at once with SQLITE_BUSY when another connection
// is writing, which under load dropped receipts.
impl_store!(SqliteStore, sqlx::migrate!("migrations/sqlite"), None::<&str>, "BEGIN IMMEDIATE");
impl_store!(PgStore, sqlx::migrate!("migrations/postgres"), Some(APPEND_LOCK_SQL), "BEGIN");

impl SqliteStore {
    /// SQLite serves one process: it always leads.
    async fn lead(&self) -> Result<bool, StoreError> {
        Ok(true)
    }
}

impl PgStore {
    /// Session-level advisory lock on a connection this store keeps: held until the process
    /// (or its connection) dies, when another replica takes over.
    async fn lead(&self) -> Result<bool, StoreError> {
        let mut leader = self.leader.lock().await;
        if let Some(conn) = leader.as_mut() {
            if sqlx::query("select 1").execute(&mut **conn).await.is_ok() {
                return Ok(true);
            }
            *leader = None;
        }
        let mut conn = self.pool.acquire().await?;
        let (won,): (bool,) =
            sqlx::query_as("select pg_try_advisory_lock($1)").bind(LEADER_LOCK).fetch_one(&mut *conn).await?;
        if won {
            *leader = Some(conn);
        }
        Ok(won)
    }
}
