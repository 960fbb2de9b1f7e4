//! One store suite, run against SQLite and Postgres alike.

use std::sync::Arc;

use alloy::primitives::{Address, B256};
use tollgate::money::UsdcAmount;
use tollgate::store::{Claim, NewPayment, PaymentState, PgStore, SqliteStore, Store, Transition};

use crate::helpers::{PG_URL, fresh_schema};

/// Both backends, each fresh: a temp SQLite file and a new Postgres schema.
async fn backends() -> Vec<(&'static str, Arc<dyn Store>, tempfile::TempDir)> {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("s.db").display());
    let sqlite: Arc<dyn Store> = Arc::new(SqliteStore::connect(&url, 8).await.unwrap());
    let pg: Arc<dyn Store> = Arc::new(PgStore::connect_in_schema(PG_URL, &fresh_schema(), 8).await.unwrap());
    for store in [&sqlite, &pg] {
        store.migrate().await.unwrap();
        store.migrate().await.expect("migrations are idempotent");
    }
    vec![("sqlite", sqlite, tempfile::tempdir().unwrap()), ("postgres", pg, dir)]
}

fn payment(nonce: &str) -> NewPayment {
    NewPayment {
        network: "eip155:31337".into(),
        asset: Address::repeat_byte(0xaa),
        payer: Address::repeat_byte(0xbb),
        nonce: B256::left_padding_from(&hex::decode(nonce.trim_start_matches("0x")).unwrap()),
        payload_hash: format!("hash-{nonce}"),
        payment_id: None,
        tool: "sha256".into(),
        amount: UsdcAmount::from_atomic(1000),
        valid_before: 2_000_000_000,
        payload_json: "{}".into(),
        args_json: None,
        args_hash: String::new(),
        price_terms: None,
        now: 1_700_000_000,
    }
}

#[tokio::test]
async fn an_authorization_is_claimed_exactly_once_even_under_concurrency() {
    for (backend, store, _dir) in backends().await {
        // Arrange: 20 concurrent claims of one nonce.
        let attempts = (0..20).map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.claim(&payment("0x01")).await })
        });
        // Act
        let outcomes: Vec<Claim> =
            futures_join(attempts).await.into_iter().map(|r| r.unwrap().unwrap()).collect();
        // Assert
        let won: Vec<_> = outcomes.iter().filter(|c| matches!(c, Claim::Won(_))).collect();
        assert_eq!(won.len(), 1, "{backend}: exactly one winner");
        let Claim::Won(row) = won[0] else { unreachable!() };
        assert_eq!(row.state, PaymentState::Claimed, "{backend}");
        for outcome in &outcomes {
            if let Claim::Taken(taken) = outcome {
                assert_eq!(taken.id, row.id, "{backend}: losers see the winner's row");
            }
        }
        // A different nonce of the same payer is a different claim.
        assert!(matches!(store.claim(&payment("0x02")).await.unwrap(), Claim::Won(_)), "{backend}");
    }
}

async fn futures_join<T>(
    handles: impl Iterator<Item = tokio::task::JoinHandle<T>>,
) -> Vec<Result<T, tokio::task::JoinError>> {
    let mut out = Vec::new();
    for h in handles.collect::<Vec<_>>() {
        out.push(h.await);
    }
    out
}

#[tokio::test]
async fn transitions_are_compare_and_set() {
    for (backend, store, _dir) in backends().await {
        let Claim::Won(row) = store.claim(&payment("0x03")).await.unwrap() else { panic!("{backend}") };
        let settling = [PaymentState::Claimed];
        // Act: two workers race to move claimed → settling; only one may.
        let first = store
            .transition(row.id, &settling, PaymentState::Settling, Transition::default(), 1)
            .await
            .unwrap();
        let second = store
            .transition(row.id, &settling, PaymentState::Settling, Transition::default(), 1)
            .await
            .unwrap();
        assert!(first && !second, "{backend}: CAS lets exactly one through");
        let t = Transition {
            tx_hash: Some(B256::repeat_byte(0x7a)),
            block_number: Some(12),
            error: None,
            ..Transition::default()
        };
        assert!(
            store.transition(row.id, &[PaymentState::Settling], PaymentState::Settled, t, 2).await.unwrap()
        );
        let stored = store.payment(row.id).await.unwrap().unwrap();
        assert_eq!(stored.state, PaymentState::Settled, "{backend}");
        assert_eq!(stored.tx_hash, Some(B256::repeat_byte(0x7a)), "{backend}");
        assert_eq!(stored.block_number, Some(12), "{backend}");
        assert_eq!(stored.updated_at, 2, "{backend}");
        // A settled payment can never be released (its authorization is spent).
        assert!(!store.release(row.id).await.unwrap(), "{backend}");
    }
}

#[tokio::test]
async fn a_released_claim_can_be_claimed_again() {
    for (backend, store, _dir) in backends().await {
        let Claim::Won(row) = store.claim(&payment("0x04")).await.unwrap() else { panic!("{backend}") };
        assert!(store.release(row.id).await.unwrap(), "{backend}: claimed rows release");
        assert!(store.payment(row.id).await.unwrap().is_none(), "{backend}");
        assert!(matches!(store.claim(&payment("0x04")).await.unwrap(), Claim::Won(_)), "{backend}");
    }
}

#[tokio::test]
async fn results_are_stored_once_and_returned_with_the_payment() {
    for (backend, store, _dir) in backends().await {
        let Claim::Won(row) = store.claim(&payment("0x05")).await.unwrap() else { panic!("{backend}") };
        store.save_result(row.id, r#"{"first":true}"#, 5).await.unwrap();
        store.save_result(row.id, r#"{"second":true}"#, 6).await.unwrap();
        let Claim::Taken(again) = store.claim(&payment("0x05")).await.unwrap() else { panic!("{backend}") };
        assert_eq!(again.result_json.as_deref(), Some(r#"{"first":true}"#), "{backend}: first write wins");
    }
}

#[tokio::test]
async fn payment_identifier_finds_the_payment_and_is_unique() {
    for (backend, store, _dir) in backends().await {
        let mut first = payment("0x06");
        first.payment_id = Some("pay_abcdefghijklmnop".into());
        let Claim::Won(row) = store.claim(&first).await.unwrap() else { panic!("{backend}") };
        let found = store.by_payment_id("pay_abcdefghijklmnop").await.unwrap().unwrap();
        assert_eq!(found.id, row.id, "{backend}");
        // Another nonce under the same payment id conflicts on the id: it is taken.
        let mut reuse = payment("0x07");
        reuse.payment_id = first.payment_id.clone();
        let Claim::Taken(taken) = store.claim(&reuse).await.unwrap() else { panic!("{backend}") };
        assert_eq!(taken.id, row.id, "{backend}");
        assert!(store.by_payment_id("pay_unknown_unknown").await.unwrap().is_none(), "{backend}");
    }
}

#[tokio::test]
async fn unresolved_lists_only_payments_still_in_flight() {
    for (backend, store, _dir) in backends().await {
        let mut ids = Vec::new();
        for (nonce, state) in [
            ("0x10", PaymentState::Claimed),
            ("0x11", PaymentState::Settling),
            ("0x12", PaymentState::Pending),
            ("0x13", PaymentState::Settled),
            ("0x14", PaymentState::Failed),
        ] {
            let Claim::Won(row) = store.claim(&payment(nonce)).await.unwrap() else { panic!("{backend}") };
            if state != PaymentState::Claimed {
                let any = [PaymentState::Claimed];
                store.transition(row.id, &any, state, Transition::default(), 3).await.unwrap();
            }
            ids.push((row.id, state));
        }
        let unresolved: Vec<_> = store.unresolved(100).await.unwrap().into_iter().map(|p| p.state).collect();
        assert_eq!(
            unresolved,
            vec![PaymentState::Claimed, PaymentState::Settling, PaymentState::Pending],
            "{backend}"
        );
    }
}

#[tokio::test]
async fn a_settled_call_is_unfinished_until_its_receipt_is_stored() {
    for (backend, store, _dir) in backends().await {
        let mut new = payment("0x07");
        new.args_json = Some(r#"{"text":"x"}"#.into());
        let Claim::Won(row) = store.claim(&new).await.unwrap() else { panic!("{backend}") };
        assert_eq!(row.args_json.as_deref(), Some(r#"{"text":"x"}"#), "{backend}: arguments are kept");
        let unfinished = |idle_since| {
            let store = store.clone();
            async move { store.unfinished(idle_since, 10).await.unwrap().iter().map(|r| r.id).collect::<Vec<_>>() }
        };
        assert!(unfinished(100).await.is_empty(), "{backend}: not settled yet");
        let t = Transition {
            tx_hash: Some(B256::repeat_byte(0x7a)),
            block_number: Some(3),
            ..Transition::default()
        };
        store.transition(row.id, &[PaymentState::Claimed], PaymentState::Settled, t, 10).await.unwrap();
        assert!(unfinished(10).await.is_empty(), "{backend}: its request may still be running");
        assert_eq!(unfinished(11).await, [row.id], "{backend}: idle since settlement");
        assert!(store.start_handler(row.id, None, 20).await.unwrap());
        assert!(unfinished(15).await.is_empty(), "{backend}: a live handler lease");
        assert_eq!(unfinished(21).await, [row.id], "{backend}: an expired lease");
        let sign = |_: &tollgate::store::ReceiptSlot| tollgate::store::NewReceipt {
            body: "{}".into(),
            signature: "00".into(),
            kid: "k".into(),
            leaf_hash: "11".into(),
        };
        store.append_receipt(row.id, &format!("{:#x}", row.payer), 22, &sign, None).await.unwrap();
        assert!(unfinished(100).await.is_empty(), "{backend}: finished with its receipt");
        let stored = store.payment(row.id).await.unwrap().unwrap();
        assert_eq!(stored.args_json, None, "{backend}: arguments are dropped once finished");
        // A payment that fails keeps no arguments either: nothing will ever run.
        let mut other = payment("0x08");
        other.args_json = Some("{}".into());
        let Claim::Won(row) = store.claim(&other).await.unwrap() else { panic!("{backend}") };
        let t = Transition { error: Some("expired"), ..Transition::default() };
        store.transition(row.id, &[PaymentState::Claimed], PaymentState::Failed, t, 30).await.unwrap();
        assert_eq!(store.payment(row.id).await.unwrap().unwrap().args_json, None, "{backend}");
    }
}

#[tokio::test]
async fn a_stale_claim_is_released_only_as_the_reconciler_saw_it() {
    for (backend, store, _dir) in backends().await {
        let Claim::Won(row) = store.claim(&payment("0x31")).await.unwrap() else { panic!("{backend}") };
        // Its request wakes up and moves it on (an on_success run takes its lease).
        assert!(store.start_unsettled_run(row.id, row.updated_at + 5).await.unwrap(), "{backend}");
        assert!(!store.release_stale(row.id, row.updated_at).await.unwrap(), "{backend}: moved on, kept");
        assert!(store.payment(row.id).await.unwrap().is_some(), "{backend}");
        // A settling row is never released this way, whatever it was seen as.
        let now = row.updated_at + 5;
        let t = Transition::default();
        store.transition(row.id, &[PaymentState::Claimed], PaymentState::Settling, t, now).await.unwrap();
        assert!(!store.release_stale(row.id, now).await.unwrap(), "{backend}: settling rows are kept");
        let Claim::Won(idle) = store.claim(&payment("0x32")).await.unwrap() else { panic!("{backend}") };
        assert!(store.release_stale(idle.id, idle.updated_at).await.unwrap(), "{backend}: stale claims go");
    }
}

#[tokio::test]
async fn a_refund_is_started_once_per_payment() {
    for (backend, store, _dir) in backends().await {
        let Claim::Won(row) = store.claim(&payment("0x33")).await.unwrap() else { panic!("{backend}") };
        let (first, second) = tokio::join!(store.begin_refund(row.id), store.begin_refund(row.id));
        assert!(first.unwrap() ^ second.unwrap(), "{backend}: exactly one run may send the refund");
        store.end_refund(row.id, r#"{"status":"sent"}"#).await.unwrap();
        assert!(!store.begin_refund(row.id).await.unwrap(), "{backend}");
        let kept = store.payment(row.id).await.unwrap().unwrap().refund_json;
        assert_eq!(kept.as_deref(), Some(r#"{"status":"sent"}"#), "{backend}");
    }
}
