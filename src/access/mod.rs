//! Who may do what: API keys and the operator key (stored as digests),
//! service administration, and the one lookup from a presented key to the
//! service it acts for.

pub mod keys;
pub mod services;

use sqlx::PgPool;

/// The active API key whose SHA-256 is `$1`, with its service: columns
/// `key_id`, `service_code`, `key_sha256`. A revoked key, or a key of a
/// deactivated service, is not found. The usage path embeds it in its
/// directory read (one round trip); [`authenticate`] runs it alone.
pub const ACTIVE_KEY_SELECT: &str =
    "SELECT k.key_id, k.service_code, k.key_sha256 FROM api_keys k \
     JOIN service_directory d ON d.code = k.service_code \
     WHERE k.key_sha256 = $1 AND k.revoked_at IS NULL AND d.status = 'active'";

/// The service an API key acts for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The service's code.
    pub service: String,
    /// The key's id (recorded in the metadata of what it writes).
    pub key_id: String,
}

impl Caller {
    /// The caller of a row of [`ACTIVE_KEY_SELECT`], once the stored digest
    /// is compared with the presented one in constant time.
    pub fn verified(
        key_id: &str,
        service: &str,
        stored_digest: &str,
        presented_digest: &str,
    ) -> Option<Caller> {
        keys::digests_match(stored_digest, presented_digest).then(|| Caller {
            service: service.to_string(),
            key_id: key_id.to_string(),
        })
    }
}

/// The caller presenting a key whose digest is `presented_digest`, if the
/// key is active.
pub async fn authenticate(
    pool: &PgPool,
    presented_digest: &str,
) -> Result<Option<Caller>, sqlx::Error> {
    let row: Option<(String, String, String)> = sqlx::query_as(ACTIVE_KEY_SELECT)
        .bind(presented_digest)
        .fetch_optional(pool)
        .await?;
    Ok(row.and_then(|(key_id, service, stored)| {
        Caller::verified(&key_id, &service, &stored, presented_digest)
    }))
}
