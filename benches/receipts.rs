//! Benchmark for receipts and the transparency log (prints figures; not a test).
//!
//! 1. Receipts signed and appended per second (SQLite and Postgres), against a baseline of
//!    bare ed25519 signatures over the same canonical bodies, measured in the same run.
//! 2. Checkpoint integration for 100,000 leaves: loading the leaf hashes from the store and
//!    computing the RFC 6962 root, against a baseline of hashing the same bytes once.
//!
//! Run: `cargo bench --bench receipts` (Postgres at 127.0.0.1:5432, database `test`).

use std::sync::Arc;
use std::time::Instant;

use ed25519_dalek::SigningKey;
use sha2::{Digest, Sha256};
use tollgate::payment::gate::Settlement;
use tollgate::receipt::{ReceiptInput, ReceiptSigner, Receipts, merkle};
use tollgate::store::{Claim, NewPayment, PgStore, SqliteStore, Store};

const RECEIPTS: usize = 2_000;
const LEAVES: usize = 100_000;

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
        };
        let input = ReceiptInput {
            tool: "sha256",
            args: &args,
            result: &result,
            settlement: &settlement,
            pay_to: alloy::primitives::Address::with_last_byte(1),
            now: 1,
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
    let url = format!("sqlite://{}", dir.path().join("leaves.db").display());
    let store = SqliteStore::connect(&url, 1).await.unwrap();
    store.migrate().await.unwrap();
    // Leaves only: the bench skips the payments rows the receipts would reference.
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
    let start = Instant::now();
    let hashes = store.leaf_hashes(0, LEAVES as i64).await.unwrap();
    let decoded: Vec<merkle::Hash> =
        hashes.iter().map(|h| hex::decode(h).unwrap().try_into().unwrap()).collect();
    let stored_root = merkle::root(&decoded);
    let total = start.elapsed();
    assert_eq!(stored_root, root);
    println!("log: checkpoint 100k leaves (load + root) {:>6.2} ms", total.as_secs_f64() * 1e3);
}
