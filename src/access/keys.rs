//! API keys and the operator key: generated here, shown once, stored and
//! compared only as SHA-256 digests (compared in constant time).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// A new secret key: `prefix` + 64 hex digits (244 random bits).
pub fn generate(prefix: &str) -> String {
    format!(
        "{prefix}{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// Hex SHA-256 of a key: what is stored and looked up.
pub fn digest(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Constant-time equality of two digests.
pub fn digests_match(a: &str, b: &str) -> bool {
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

/// The embedded default's operator key: its digest is kept in the data
/// directory. On first start a key is generated, its digest stored, and the
/// key printed once to stdout (never to the log). Returns the digest.
pub fn embedded_operator_key(data_dir: &Path) -> std::io::Result<String> {
    let path = data_dir.join("operator-key.sha256");
    if let Ok(stored) = std::fs::read_to_string(&path) {
        return Ok(stored.trim().to_string());
    }
    let key = generate("ledger_admin_");
    let key_digest = digest(&key);
    std::fs::write(&path, format!("{key_digest}\n"))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    println!(
        "Operator key for /admin/v1 (shown once; only its SHA-256 is kept in {}):\n  {key}",
        path.display()
    );
    Ok(key_digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_distinct_and_digested_to_64_hex() {
        let (a, b) = (generate("k_"), generate("k_"));
        assert_ne!(a, b);
        assert_eq!(a.len(), 2 + 64);
        assert_eq!(digest(&a).len(), 64);
        assert!(digests_match(&digest(&a), &digest(&a)));
        assert!(!digests_match(&digest(&a), &digest(&b)));
        assert_eq!(
            digest("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn the_embedded_operator_key_is_generated_once() {
        let dir = tempfile::tempdir().unwrap();
        let first = embedded_operator_key(dir.path()).unwrap();
        let second = embedded_operator_key(dir.path()).unwrap();
        assert_eq!(first, second);
        let mode = std::fs::metadata(dir.path().join("operator-key.sha256"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
