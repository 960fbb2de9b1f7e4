//! Authentication to the Coinbase Developer Platform (CDP) facilitator: a fresh, short-lived
//! JWT on every request, signed with the operator's CDP API key.
//!
//! The token follows Coinbase's own SDK (`coinbase/cdp-sdk`, `typescript/src/auth/utils/jwt.ts`,
//! `generateJwt`; the Rust SDK's `rust/src/auth.rs` builds the same claims):
//! - header: `alg` (`EdDSA` for an Ed25519 key, `ES256` for an EC P-256 key), `kid` = the key
//!   id, `typ` = `JWT`, and `nonce` = 16 random bytes in hex;
//! - claims: `sub` = the key id, `iss` = `cdp`, `aud` = `["cdp_service"]`, `iat` = `nbf` = now,
//!   `exp` = now + 120 s, and `uris` = `["<METHOD> <host><path>"]`, which binds the token to one
//!   endpoint.
//!
//! Key formats, as the CDP portal issues them: an Ed25519 secret is base64 of 64 bytes (the
//! 32-byte seed, then the public key); an EC secret is a PEM `EC PRIVATE KEY` (SEC1) or
//! `PRIVATE KEY` (PKCS#8). Signing is `jsonwebtoken`'s (RustCrypto backend); `p256` and
//! `ed25519-dalek` only convert the keys to the PKCS#8 DER it takes.

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use p256::pkcs8::{DecodePrivateKey as _, EncodePrivateKey as _};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;

/// How long a token lives, as Coinbase's SDKs default it.
pub const TOKEN_LIFETIME_SECS: u64 = 120;

/// Why a CDP key secret cannot be used. Never carries any part of the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CdpKeyError {
    #[error("is neither an EC key in PEM nor an Ed25519 key in base64 (64 bytes)")]
    UnknownFormat,
    #[error("is a PEM that does not hold a P-256 private key")]
    NotP256,
    #[error("is an Ed25519 key whose public half does not match its seed")]
    MismatchedEd25519,
}

/// A parsed CDP API key secret, ready to sign.
pub struct CdpKey {
    algorithm: Algorithm,
    key: EncodingKey,
}

impl CdpKey {
    pub fn parse(secret: &SecretString) -> Result<CdpKey, CdpKeyError> {
        // PEM pasted into an environment variable often arrives with literal "\n" escapes.
        let text = secret.expose_secret().trim().replace("\\n", "\n");
        if text.contains("-----BEGIN") {
            let key = p256::SecretKey::from_sec1_pem(&text)
                .or_else(|_| p256::SecretKey::from_pkcs8_pem(&text))
                .map_err(|_| CdpKeyError::NotP256)?;
            let der = key.to_pkcs8_der().map_err(|_| CdpKeyError::NotP256)?;
            return Ok(CdpKey { algorithm: Algorithm::ES256, key: EncodingKey::from_ec_der(der.as_bytes()) });
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.as_bytes())
            .map_err(|_| CdpKeyError::UnknownFormat)?;
        if bytes.len() != 64 {
            return Err(CdpKeyError::UnknownFormat);
        }
        let (seed, public) = bytes.split_at(32);
        let seed: [u8; 32] = seed.try_into().map_err(|_| CdpKeyError::UnknownFormat)?;
        let signing = ed25519_dalek::SigningKey::from_bytes(&seed);
        if signing.verifying_key().as_bytes() != public {
            return Err(CdpKeyError::MismatchedEd25519);
        }
        let der = signing.to_pkcs8_der().map_err(|_| CdpKeyError::UnknownFormat)?;
        Ok(CdpKey { algorithm: Algorithm::EdDSA, key: EncodingKey::from_ed_der(der.as_bytes()) })
    }
}

/// Signs a bearer token per request.
pub struct CdpAuth {
    key_id: String,
    key: CdpKey,
}

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    iss: &'static str,
    aud: [&'static str; 1],
    iat: u64,
    nbf: u64,
    exp: u64,
    uris: [String; 1],
}

impl CdpAuth {
    pub fn new(key_id: &str, secret: &SecretString) -> Result<CdpAuth, CdpKeyError> {
        Ok(CdpAuth { key_id: key_id.trim().to_owned(), key: CdpKey::parse(secret)? })
    }

    /// The `Authorization` header value for one request to `url`, issued now (wall clock: the
    /// facilitator checks the token against its own).
    pub fn header_for(
        &self,
        method: &str,
        url: &reqwest::Url,
    ) -> Result<String, jsonwebtoken::errors::Error> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        self.header_at(method, url, now.as_secs())
    }

    pub fn header_at(
        &self,
        method: &str,
        url: &reqwest::Url,
        now: u64,
    ) -> Result<String, jsonwebtoken::errors::Error> {
        let mut header = Header::new(self.key.algorithm);
        header.kid = Some(self.key_id.clone());
        header.typ = Some("JWT".to_owned());
        header.nonce = Some(hex::encode(rand::random::<[u8; 16]>()));
        let claims = Claims {
            sub: &self.key_id,
            iss: "cdp",
            aud: ["cdp_service"],
            iat: now,
            nbf: now,
            exp: now + TOKEN_LIFETIME_SECS,
            uris: [format!("{method} {}{}", url.host_str().unwrap_or_default(), url.path())],
        };
        let token = jsonwebtoken::encode(&header, &claims, &self.key.key)?;
        Ok(format!("Bearer {token}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation};
    use p256::elliptic_curve::sec1::ToEncodedPoint as _;
    use p256::pkcs8::LineEnding;

    fn ed25519_secret(seed: [u8; 32]) -> (SecretString, [u8; 32]) {
        let key = ed25519_dalek::SigningKey::from_bytes(&seed);
        let public = key.verifying_key().to_bytes();
        let both = [seed.as_slice(), public.as_slice()].concat();
        (base64::engine::general_purpose::STANDARD.encode(both).into(), public)
    }

    fn decode(token: &str, key: &DecodingKey, alg: Algorithm) -> serde_json::Value {
        let mut validation = Validation::new(alg);
        validation.set_audience(&["cdp_service"]);
        validation.set_issuer(&["cdp"]);
        validation.set_required_spec_claims(&["exp", "nbf", "sub", "aud", "iss"]);
        jsonwebtoken::decode::<serde_json::Value>(token, key, &validation).expect("valid").claims
    }

    #[test]
    fn an_ed25519_key_signs_tokens_bound_to_one_endpoint_with_fresh_nonces() {
        let (secret, public) = ed25519_secret([7; 32]);
        let auth = CdpAuth::new("key-1", &secret).unwrap();
        let url: reqwest::Url = "https://api.cdp.coinbase.com/platform/v2/x402/verify".parse().unwrap();
        let first = auth.header_for("POST", &url).unwrap();
        let second = auth.header_for("POST", &url).unwrap();
        let token = first.strip_prefix("Bearer ").unwrap();
        let header = jsonwebtoken::decode_header(token).unwrap();
        let nonce = |h: &Header| h.nonce.clone().unwrap();
        assert_eq!((header.alg, header.kid.as_deref()), (Algorithm::EdDSA, Some("key-1")));
        assert_eq!(nonce(&header).len(), 32);
        let again = jsonwebtoken::decode_header(second.strip_prefix("Bearer ").unwrap()).unwrap();
        assert_ne!(nonce(&header), nonce(&again), "every token has its own nonce");
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(public);
        let key = DecodingKey::from_ed_components(&b64).unwrap();
        let claims = decode(token, &key, Algorithm::EdDSA);
        assert_eq!(claims["sub"], "key-1");
        assert_eq!(claims["uris"], serde_json::json!(["POST api.cdp.coinbase.com/platform/v2/x402/verify"]));
        let lifetime = claims["exp"].as_u64().unwrap() - claims["nbf"].as_u64().unwrap();
        assert_eq!(lifetime, TOKEN_LIFETIME_SECS);
    }

    #[test]
    fn an_ec_key_in_sec1_or_pkcs8_pem_signs_es256() {
        let key = p256::SecretKey::from_slice(&[9; 32]).unwrap();
        let point = key.public_key().to_encoded_point(false);
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let decoding =
            DecodingKey::from_ec_components(&b64(point.x().unwrap()), &b64(point.y().unwrap())).unwrap();
        let sec1 = key.to_sec1_pem(LineEnding::LF).unwrap().to_string();
        let pkcs8 = key.to_pkcs8_pem(LineEnding::LF).unwrap().to_string();
        // As pasted into an environment variable: one line with "\n" escapes.
        let escaped = sec1.replace('\n', "\\n");
        let url: reqwest::Url = "https://api.cdp.coinbase.com/platform/v2/x402/supported".parse().unwrap();
        for pem in [sec1, pkcs8, escaped] {
            let auth = CdpAuth::new("org/key", &SecretString::from(pem)).unwrap();
            let header = auth.header_for("GET", &url).unwrap();
            let claims = decode(header.strip_prefix("Bearer ").unwrap(), &decoding, Algorithm::ES256);
            assert_eq!(claims["uris"][0], "GET api.cdp.coinbase.com/platform/v2/x402/supported");
        }
    }

    #[test]
    fn bad_secrets_are_refused_without_echoing_them() {
        let (good, _) = ed25519_secret([1; 32]);
        let mut bytes = base64::engine::general_purpose::STANDARD.decode(good.expose_secret()).unwrap();
        bytes[40] ^= 1;
        let mismatched = base64::engine::general_purpose::STANDARD.encode(&bytes);
        let cases = [
            ("c2VjcmV0LXNob3J0", CdpKeyError::UnknownFormat),
            ("not base64 at all!", CdpKeyError::UnknownFormat),
            ("-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----", CdpKeyError::NotP256),
            (mismatched.as_str(), CdpKeyError::MismatchedEd25519),
        ];
        for (secret, expected) in cases {
            let err = CdpKey::parse(&SecretString::from(secret)).err().expect("refused");
            assert_eq!(err, expected);
            assert!(!err.to_string().contains(secret));
        }
    }
}
