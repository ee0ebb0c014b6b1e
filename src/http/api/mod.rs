//! The Lago-compatible API (`/api/v1`), authenticated by a service's API key.
//!
//! Every identifier a request carries — codes, external ids and lago_ids —
//! is resolved inside the calling service: aggregate ids are scoped by the
//! service code and every projection query filters on it. Another service's
//! resources are therefore indistinguishable from missing ones (404).

mod billable_metrics;
mod customers;
mod events;
mod invoices;
mod plans;
mod subscriptions;
mod taxes;
mod webhook_endpoints;

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::{Json, Router};
use cqrs_es::Aggregate;
use serde_json::Value;
use sqlx::{Postgres, QueryBuilder};

use super::error::{ApiError, ApiResult};
use super::extract::RequestContext;
use super::pagination::{Page, PageMeta};
use super::AppState;
use crate::access::{self, keys, Caller};
use crate::event_log::store::{self, Actor, CommandHandler, CommandMetadata};
use crate::http::error::Refusal;

/// The Lago-compatible API under `/api/v1`.
pub fn router() -> Router<AppState> {
    Router::new()
        .merge(billable_metrics::router())
        .merge(taxes::router())
        .merge(plans::router())
        .merge(customers::router())
        .merge(subscriptions::router())
        .merge(events::router())
        .merge(invoices::router())
        .merge(webhook_endpoints::router())
}

/// The service a request acts for, proven by an active API key of an active
/// service. Revoked keys and deactivated services get Lago's 401.
#[derive(Debug, Clone)]
pub struct Tenant {
    /// The service's code.
    pub service: String,
    /// The key's id.
    pub key_id: String,
}

impl Tenant {
    /// The aggregate id of this service's resource `key`.
    pub fn scoped(&self, key: &str) -> String {
        aggregates::scoped_id(&self.service, key)
    }

    /// Metadata for a command this service issues in `request`.
    pub fn metadata(&self, request: &RequestContext) -> CommandMetadata {
        CommandMetadata {
            api_key_id: Some(self.key_id.clone()),
            ..request.metadata(Actor::Service(self.service.clone()))
        }
    }
}

/// The digest of the bearer key a request presents, not yet checked (the
/// usage endpoints check it together with their directory lookup).
pub struct PresentedKey(pub String);

impl<S: Send + Sync> FromRequestParts<S> for PresentedKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let presented = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|key| !key.is_empty())
            .ok_or(ApiError::Unauthorized)?;
        Ok(PresentedKey(keys::digest(presented)))
    }
}

impl FromRequestParts<AppState> for Tenant {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let PresentedKey(digest) = PresentedKey::from_request_parts(parts, state).await?;
        match access::authenticate(&state.pool, &digest).await? {
            Some(Caller { service, key_id }) => {
                tracing::Span::current().record("service", service.as_str());
                Ok(Tenant { service, key_id })
            }
            None => Err(ApiError::Unauthorized),
        }
    }
}

/// A resource of the Lago API: its name (the response's root key, and
/// `<name>_not_found`) and the query reading it by (service, key).
pub(super) struct Resource<'a> {
    pub name: &'static str,
    pub select: &'a str,
}

/// Run a command on the calling service's aggregate `key`, wait until the
/// projections show it, and answer with the resource exactly as a GET would.
async fn write_then_read<A>(
    state: &AppState,
    tenant: &Tenant,
    request: &RequestContext,
    handler: &CommandHandler<A>,
    key: &str,
    command: A::Command,
    resource: &Resource<'_>,
) -> ApiResult<Json<Value>>
where
    A: Aggregate,
    A::Command: Clone,
    A::Error: Refusal,
{
    let id = tenant.scoped(key);
    store::execute(handler, &id, command, tenant.metadata(request)).await?;
    state.await_projected(A::TYPE, &id).await?;
    read(state, tenant, key, resource).await
}

/// The calling service's resource `key`, in its root key.
async fn read(
    state: &AppState,
    tenant: &Tenant,
    key: &str,
    resource: &Resource<'_>,
) -> ApiResult<Json<Value>> {
    let found = find_resource(state, resource.select, tenant, key, resource.name).await?;
    Ok(Json(serde_json::json!({ resource.name: found })))
}

/// One resource of the calling service from a projection table, by key.
async fn find_resource(
    state: &AppState,
    select: &str,
    tenant: &Tenant,
    key: &str,
    resource: &'static str,
) -> ApiResult<Value> {
    let found: Option<Value> = sqlx::query_scalar(select)
        .bind(&tenant.service)
        .bind(key)
        .fetch_optional(&state.pool)
        .await?;
    found.ok_or(ApiError::NotFound(resource))
}

/// A page of a service's resources. `filter` appends `AND …` conditions to
/// a query that already restricts to the service; it is applied to the
/// count and to the page alike.
async fn list_resources(
    state: &AppState,
    resource_sql: &str,
    table: &str,
    tenant: &Tenant,
    page: Page,
    filter: impl Fn(&mut QueryBuilder<'_, Postgres>),
) -> ApiResult<(Vec<Value>, PageMeta)> {
    let mut count = QueryBuilder::new(format!(
        "SELECT count(*) FROM {table} WHERE service_code = "
    ));
    count.push_bind(&tenant.service);
    filter(&mut count);
    let total: i64 = count.build_query_scalar().fetch_one(&state.pool).await?;

    let mut select = QueryBuilder::new(format!(
        "SELECT {resource_sql} FROM {table} WHERE service_code = "
    ));
    select.push_bind(&tenant.service);
    filter(&mut select);
    select.push(" ORDER BY created_at, lago_id LIMIT ");
    select.push_bind(page.per_page);
    select.push(" OFFSET ");
    select.push_bind(page.offset());
    let items: Vec<Value> = select.build_query_scalar().fetch_all(&state.pool).await?;
    Ok((items, page.meta(total)))
}

/// Tax codes among `codes` that the service has not created.
async fn unknown_tax_codes(
    state: &AppState,
    tenant: &Tenant,
    codes: Option<&Vec<String>>,
) -> ApiResult<Vec<String>> {
    Ok(projections::catalog::unknown_tax_codes(&state.pool, &tenant.service, codes).await?)
}
