//! Any JSON payment against a real quote: verification must refuse with a reason code (or, for
//! a genuinely valid payment, accept) — never panic, whatever the fields hold.
#![no_main]
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tollgate::chain::Network;
use tollgate::money::UsdcAmount;
use tollgate::payment::decode::PaymentInput;
use tollgate::payment::requirements::{PayTerms, Quote};
use tollgate::payment::verify::verify;

fn quote() -> &'static (Quote, Network) {
    static Q: OnceLock<(Quote, Network)> = OnceLock::new();
    Q.get_or_init(|| {
        let network = Network {
            caip2: "eip155:8453".into(),
            chain_id: 8453,
            asset: tollgate::chain::BASE_USDC,
            eip712_name: "USD Coin".into(),
            eip712_version: "2".into(),
        };
        let terms = PayTerms {
            network: network.clone(),
            pay_to: alloy::primitives::Address::repeat_byte(7),
            max_timeout_seconds: 300,
        };
        let schema = serde_json::Map::new();
        (Quote::new(&terms, "t", "d", &schema, UsdcAmount::from_atomic(1000)), network)
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    let (quote, network) = quote();
    let _ = verify(&PaymentInput::Meta(value), quote, &network.domain(), 1_700_000_000, 6);
});
