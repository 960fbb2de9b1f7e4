//! Any TOML over the defaults: loading must yield a validated config or an error naming a key,
//! never a panic.
#![no_main]
use figment::providers::{Format, Toml};
use libfuzzer_sys::fuzz_target;
use tollgate::config::{Config, DEFAULT_TOML};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let figment = figment::Figment::from(Toml::string(DEFAULT_TOML)).merge(Toml::string(text));
    if let Ok(config) = Config::from_figment(figment) {
        let _ = config.validate_for_serving();
    }
});
