//! Signing outgoing webhooks, two ways over the exact bytes sent:
//!
//! - Standard Webhooks (<https://www.standardwebhooks.com>):
//!   `webhook-id` (the message id, stable across retries),
//!   `webhook-timestamp` (this attempt, Unix seconds) and
//!   `webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`,
//!   keyed with the base64-decoded part of the secret after `whsec_`; one
//!   signature per valid secret, space-separated, during a rotation.
//! - Lago's: `X-Lago-Signature` = base64 HMAC-SHA256 of the body keyed
//!   with the secret as shown (`whsec_…`), `X-Lago-Signature-Algorithm:
//!   hmac`, and `X-Lago-Unique-Key` = the message id.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use rand::RngCore;

use crate::payments::stripe::hmac_sha256;

/// A new endpoint secret: `whsec_` + base64 of 32 random bytes.
pub fn generate_secret() -> String {
    let mut key = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut key);
    format!("whsec_{}", STANDARD.encode(key))
}

/// The key a Standard Webhooks secret stands for.
fn key_of(secret: &str) -> Vec<u8> {
    let encoded = secret.strip_prefix("whsec_").unwrap_or(secret);
    STANDARD
        .decode(encoded)
        .unwrap_or_else(|_| secret.as_bytes().to_vec())
}

/// One Standard Webhooks signature (`v1,<base64>`).
pub fn standard_signature(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> String {
    let mac = hmac_sha256(
        &key_of(secret),
        &[
            id.as_bytes(),
            b".",
            timestamp.to_string().as_bytes(),
            b".",
            body,
        ],
    );
    format!("v1,{}", STANDARD.encode(mac))
}

/// Lago's `X-Lago-Signature`.
pub fn lago_signature(secret: &str, body: &[u8]) -> String {
    STANDARD.encode(hmac_sha256(secret.as_bytes(), &[body]))
}

/// Every header of one attempt: `secrets` are the valid ones, the current
/// first (it alone signs Lago's header).
pub fn headers(
    secrets: &[&str],
    id: &str,
    timestamp: i64,
    body: &[u8],
) -> Vec<(&'static str, String)> {
    let signatures: Vec<String> = secrets
        .iter()
        .map(|secret| standard_signature(secret, id, timestamp, body))
        .collect();
    vec![
        ("content-type", "application/json".to_string()),
        ("webhook-id", id.to_string()),
        ("webhook-timestamp", timestamp.to_string()),
        ("webhook-signature", signatures.join(" ")),
        ("x-lago-signature", lago_signature(secrets[0], body)),
        ("x-lago-signature-algorithm", "hmac".to_string()),
        ("x-lago-unique-key", id.to_string()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the Standard Webhooks specification's reference
    /// libraries (their test suites use it).
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const TIMESTAMP: i64 = 1614265330;
    const BODY: &[u8] = br#"{"test": 2432232314}"#;

    #[test]
    fn standard_webhooks_signature_matches_the_reference_vector() {
        assert_eq!(
            standard_signature(SECRET, ID, TIMESTAMP, BODY),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn a_rotation_signs_with_both_secrets_and_a_tampered_body_differs() {
        let previous = generate_secret();
        assert!(previous.starts_with("whsec_") && key_of(&previous).len() == 32);
        let headers = headers(&[SECRET, &previous], ID, TIMESTAMP, BODY);
        let signature = &headers
            .iter()
            .find(|(h, _)| *h == "webhook-signature")
            .unwrap()
            .1;
        let parts: Vec<&str> = signature.split(' ').collect();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0], standard_signature(SECRET, ID, TIMESTAMP, BODY));
        assert_eq!(parts[1], standard_signature(&previous, ID, TIMESTAMP, BODY));
        assert_ne!(
            standard_signature(SECRET, ID, TIMESTAMP, br#"{"test": 2432232315}"#),
            parts[0]
        );
    }

    #[test]
    fn lagos_signature_is_the_base64_hmac_of_the_body() {
        // printf '{"test": 2432232314}' | openssl dgst -sha256 -hmac <secret> -binary | base64
        assert_eq!(lago_signature(SECRET, BODY), LAGO_VECTOR);
    }

    const LAGO_VECTOR: &str = "gOyKic480iEzoQZsrstNBP6nRnZXyFFNcX7ELDilyUw=";
}
