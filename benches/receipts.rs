//! Benchmark for receipts and the transparency log (prints figures; not a test).
//!
//! 1. Receipts signed and appended per second (SQLite and Postgres), against a baseline of
//!    bare ed25519 signatures over the same canonical bodies, measured in the same run.
//! 2. Checkpoint integration for 100,000 leaves: loading the leaf hashes from the store and
//!    computing the RFC 6962 root, against a baseline of hashing the same bytes once.
//! 3. Proof requests at 100k and 1M leaves (10k in an unoptimised smoke run): latency and peak
//!    memory of one inclusion proof the old way (count, read every leaf, hash O(n)) beside the
//!    cached tree (`receipt::tree`), from the same SQLite store in the same run.
//!
//! Run: `cargo bench --bench receipts` (Postgres at 127.0.0.1:5432, database `test`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use ed25519_dalek::SigningKey;
use sha2::{Digest, Sha256};
use tollgate::payment::gate::Settlement;
use tollgate::receipt::tree::LogTree;
use tollgate::receipt::{ReceiptInput, ReceiptSigner, Receipts, merkle};
use tollgate::store::{Claim, NewPayment, PgStore, SqliteStore, Store};

const RECEIPTS: usize = 2_000;
const LEAVES: usize = 100_000;

/// Counts live heap bytes and their peak, for the memory of one proof request.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f`, returning its output, the time it took and the peak heap it added.
async fn measured<T>(f: impl std::future::Future<Output = T>) -> (T, f64, usize) {
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let start = Instant::now();
    let out = f.await;
    let ms = start.elapsed().as_secs_f64() * 1e3;
    (out, ms, PEAK.load(Ordering::Relaxed).saturating_sub(base))
}

/// A SQLite log of `n` leaves, bulk-loaded (the bench skips the payments rows receipts reference).
async fn log_of(dir: &std::path::Path, n: usize) -> (Arc<dyn Store>, Vec<merkle::Hash>) {
    let leaves: Vec<merkle::Hash> = (0..n as u32).map(|i| merkle::leaf_hash(&i.to_be_bytes())).collect();
    static LOGS: AtomicUsize = AtomicUsize::new(0);
    let file = format!("log{n}-{}.db", LOGS.fetch_add(1, Ordering::Relaxed));
    let url = format!("sqlite://{}", dir.join(file).display());
    let store = SqliteStore::connect(&url, 2).await.unwrap();
    store.migrate().await.unwrap();
    let options = <sqlx::sqlite::SqliteConnectOptions as std::str::FromStr>::from_str(&url)
        .unwrap()
        .foreign_keys(false);
    let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    for (i, leaf) in leaves.iter().enumerate() {
        sqlx::query("insert into receipts values ($1, $1, 'p', $1, '{}', 's', 'k', $2, 0)")
            .bind(i as i64)
            .bind(hex::encode(leaf))
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    (Arc::new(store), leaves)
}

/// One `/log/inclusion` request as it was served before the cached tree: count the log, read
/// every leaf hash, hash the whole tree for the path.
async fn proof_reading_every_leaf(store: &dyn Store, index: usize, size: usize) -> Vec<merkle::Hash> {
    let count = store.receipt_count().await.unwrap() as usize;
    assert!(size <= count);
    let hashes = store.leaf_hashes(0, size as i64).await.unwrap();
    let leaves: Vec<merkle::Hash> =
        hashes.iter().map(|h| hex::decode(h).unwrap().try_into().unwrap()).collect();
    merkle::inclusion_proof(index, &leaves)
}

async fn proofs_at(dir: &std::path::Path, n: usize) {
    let (store, leaves) = log_of(dir, n).await;
    let root = merkle::root(&leaves);
    let picks: Vec<usize> = (0..200).map(|i| (i * 7919 + 13) % n).collect();
    // Before: a few requests (each reads the whole log).
    let mut before = (0.0, 0usize);
    for &i in picks.iter().take(3) {
        let (proof, ms, peak) = measured(proof_reading_every_leaf(store.as_ref(), i, n)).await;
        assert!(merkle::verify_inclusion(i as u64, n as u64, &leaves[i], &proof, &root));
        before = (before.0 + ms / 3.0, before.1.max(peak));
    }
    // After: the cached tree, caught up once, then many requests.
    let tree = LogTree::new(store.clone());
    let (_, catch_up_ms, _) = measured(tree.catch_up()).await;
    let cache_bytes = tree.cached_hashes().await * 32;
    let mut after = (0.0, 0usize);
    for &i in &picks {
        let (found, ms, peak) = measured(tree.inclusion(i as u64, n as u64)).await;
        let (leaf, proof) = found.unwrap().unwrap();
        assert_eq!(leaf, leaves[i]);
        assert!(merkle::verify_inclusion(i as u64, n as u64, &leaf, &proof, &root));
        after = (after.0 + ms / picks.len() as f64, after.1.max(peak));
    }
    let label = format!("{}k", n / 1000);
    println!(
        "log: inclusion proof at {label:>5} leaves, every leaf read {:>9.3} ms, peak {:>7} KiB (before)",
        before.0,
        before.1 / 1024
    );
    println!(
        "log: inclusion proof at {label:>5} leaves, cached tree     {:>9.3} ms, peak {:>7} KiB ({:.0}x faster, {:.0}x less memory)",
        after.0,
        after.1 / 1024,
        before.0 / after.0,
        before.1 as f64 / after.1.max(1) as f64
    );
    println!(
        "log: cached tree at {label:>5} leaves: {:>7} KiB held, first catch-up {:.1} ms",
        cache_bytes / 1024,
        catch_up_ms
    );
}

async fn appends_per_second(store: Arc<dyn Store>) -> f64 {
    store.migrate().await.unwrap();
    let signer = ReceiptSigner::new(SigningKey::from_bytes(&[9; 32]));
    let receipts = Receipts::new(signer, store.clone(), "bench".into());
    let mut rows = Vec::with_capacity(RECEIPTS);
    for i in 0..RECEIPTS {
        let p = NewPayment {
            network: "eip155:8453".into(),
            asset: tollgate::chain::BASE_USDC,
            payer: alloy::primitives::Address::with_last_byte((i % 20) as u8),
            nonce: alloy::primitives::B256::from(alloy::primitives::U256::from(i)),
            payload_hash: format!("h{i}"),
            payment_id: None,
            tool: "sha256".into(),
            amount: tollgate::money::UsdcAmount::from_atomic(1000),
            valid_before: 0,
            payload_json: "{}".into(),
            args_json: Some("{}".into()),
            args_hash: String::new(),
            price_terms: None,
            now: 0,
        };
        let Claim::Won(row) = store.claim(&p).await.unwrap() else { panic!("fresh store") };
        rows.push(row);
    }
    let result = rmcp::model::CallToolResult::structured(serde_json::json!({ "sha256": "00" }));
    let args = serde_json::Map::new();
    let start = Instant::now();
    for row in &rows {
        let settlement = Settlement {
            row_id: row.id,
            transaction: alloy::primitives::B256::from(alloy::primitives::U256::from(row.id)),
            block: 1,
            payer: row.payer,
            network: row.network.clone(),
            asset: row.asset,
            amount: row.amount,
            nonce: row.nonce,
            leased: false,
        };
        let input = ReceiptInput {
            tool: "sha256",
            args: &args,
            result: &result,
            settlement: &settlement,
            pay_to: alloy::primitives::Address::with_last_byte(1),
            now: 1,
            terms: None,
            refund: None,
            cached_at: None,
        };
        receipts.issue(&input).await.unwrap();
    }
    RECEIPTS as f64 / start.elapsed().as_secs_f64()
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    // Baseline: bare signatures over comparable canonical bodies.
    let signer = ReceiptSigner::new(SigningKey::from_bytes(&[9; 32]));
    let body = "x".repeat(600);
    let start = Instant::now();
    for i in 0..RECEIPTS {
        std::hint::black_box(signer.sign(format!("{body}{i}").as_bytes()));
    }
    let sign_rate = RECEIPTS as f64 / start.elapsed().as_secs_f64();
    println!("receipts: bare ed25519 signs        {sign_rate:>10.0} /s (baseline)");

    let dir = tempfile::tempdir().unwrap();
    let sqlite =
        SqliteStore::connect(&format!("sqlite://{}", dir.path().join("b.db").display()), 4).await.unwrap();
    let rate = appends_per_second(Arc::new(sqlite)).await;
    println!(
        "receipts: signed + appended, SQLite {rate:>10.0} /s ({:.3}x of bare signing)",
        rate / sign_rate
    );
    let schema = format!("bench_{}", std::process::id());
    match PgStore::connect_in_schema("postgres://postgres@127.0.0.1:5432/test", &schema, 4).await {
        Ok(pg) => {
            let rate = appends_per_second(Arc::new(pg)).await;
            println!(
                "receipts: signed + appended, Postgres {rate:>8.0} /s ({:.3}x of bare signing)",
                rate / sign_rate
            );
        }
        Err(e) => println!("receipts: Postgres unavailable ({e}); skipped"),
    }

    // Checkpoint integration for 100k leaves.
    let leaves: Vec<merkle::Hash> = (0..LEAVES as u32).map(|i| merkle::leaf_hash(&i.to_be_bytes())).collect();
    let start = Instant::now();
    let mut hasher = Sha256::new();
    for leaf in &leaves {
        hasher.update(leaf);
    }
    std::hint::black_box(hasher.finalize());
    let baseline = start.elapsed();
    let start = Instant::now();
    let root = merkle::root(&leaves);
    let integrate = start.elapsed();
    let start = Instant::now();
    let proof = merkle::inclusion_proof(LEAVES / 3, &leaves);
    let prove = start.elapsed();
    assert!(merkle::verify_inclusion((LEAVES / 3) as u64, LEAVES as u64, &leaves[LEAVES / 3], &proof, &root));
    println!("log: hash 100k leaves once          {:>10.2} ms (baseline)", baseline.as_secs_f64() * 1e3);
    println!(
        "log: root of 100k leaves            {:>10.2} ms ({:.2}x baseline)",
        integrate.as_secs_f64() * 1e3,
        integrate.as_secs_f64() / baseline.as_secs_f64()
    );
    println!("log: one inclusion proof (100k)     {:>10.2} ms", prove.as_secs_f64() * 1e3);

    // The same, through the store: bulk-load 100k leaves, then read them back and integrate.
    let (store, stored) = log_of(dir.path(), LEAVES).await;
    assert_eq!(stored, leaves);
    let start = Instant::now();
    let hashes = store.leaf_hashes(0, LEAVES as i64).await.unwrap();
    let decoded: Vec<merkle::Hash> =
        hashes.iter().map(|h| hex::decode(h).unwrap().try_into().unwrap()).collect();
    let stored_root = merkle::root(&decoded);
    let total = start.elapsed();
    assert_eq!(stored_root, root);
    println!("log: checkpoint 100k leaves (load + root) {:>6.2} ms", total.as_secs_f64() * 1e3);

    // Proof requests at scale, before and after the cached tree.
    let sizes: &[usize] = if cfg!(debug_assertions) { &[10_000] } else { &[100_000, 1_000_000] };
    for &n in sizes {
        proofs_at(dir.path(), n).await;
    }
}
