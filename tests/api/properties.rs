//! Property: any interleaving of N concurrent claims over K distinct authorizations yields
//! exactly K winners — on the real SQLite store.

use std::sync::Arc;

use proptest::prelude::*;
use tollgate::store::{Claim, NewPayment, SqliteStore, Store};

fn payment(nonce: usize) -> NewPayment {
    NewPayment {
        network: "eip155:31337".into(),
        asset: alloy::primitives::Address::repeat_byte(0xaa),
        payer: alloy::primitives::Address::repeat_byte(0xbb),
        nonce: alloy::primitives::B256::from(alloy::primitives::U256::from(nonce)),
        payload_hash: format!("h{nonce}"),
        payment_id: None,
        tool: "t".into(),
        amount: tollgate::money::UsdcAmount::from_atomic(1),
        valid_before: 0,
        payload_json: "{}".into(),
        args_json: None,
        args_hash: String::new(),
        price_terms: None,
        now: 0,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn any_interleaving_of_claims_yields_exactly_one_winner_per_authorization(
        order in proptest::collection::vec(0usize..5, 1..40),
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let (winners, distinct) = runtime.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let url = format!("sqlite://{}", dir.path().join("p.db").display());
            let store: Arc<dyn Store> = Arc::new(SqliteStore::connect(&url, 4).await.unwrap());
            store.migrate().await.unwrap();
            let tasks: Vec<_> = order
                .iter()
                .map(|&k| {
                    let store = store.clone();
                    tokio::spawn(async move { (k, store.claim(&payment(k)).await.unwrap()) })
                })
                .collect();
            let mut winners = std::collections::HashMap::new();
            for task in tasks {
                let (k, claim) = task.await.unwrap();
                if matches!(claim, Claim::Won(_)) {
                    *winners.entry(k).or_insert(0) += 1;
                }
            }
            let distinct: std::collections::HashSet<_> = order.iter().copied().collect();
            (winners, distinct)
        });
        prop_assert_eq!(winners.len(), distinct.len(), "every authorization was won");
        prop_assert!(winners.values().all(|&n| n == 1), "and won exactly once: {:?}", winners);
    }
}
