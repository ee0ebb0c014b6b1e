//! `/subscriptions`: create, get, list with filters, terminate (DELETE), and
//! the ledger's extensions: suspend, restore and an explicit plan change.

use aggregates::plan::PlanRef;
use aggregates::subscription::{SubscriptionCommand, SubscriptionInput};
use aggregates::{Customer, Plan};
use axum::extract::{Path, RawQuery, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::Utc;
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use super::{list_resources, read, write_then_read, Resource, Tenant};
use crate::event_log::store;
use crate::http::error::{ApiError, ApiResult};
use crate::http::extract::{LagoJson, RequestContext};
use crate::http::pagination::PageRequest;
use crate::http::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/subscriptions", post(create).get(list))
        .route("/subscriptions/{external_id}", get(find).delete(terminate))
        .route("/subscriptions/{external_id}/suspend", post(suspend))
        .route("/subscriptions/{external_id}/restore", post(restore))
        .route(
            "/subscriptions/{external_id}/change_plan",
            post(change_plan),
        )
}

/// The resource with its status as of now (the rule lives in the
/// `subscription_status` SQL function).
const RESOURCE: &str =
    "resource || jsonb_build_object('status', subscription_status(subscription_at, suspended_at, terminated_at, now()))";

fn select() -> String {
    format!("SELECT {RESOURCE} FROM subscriptions WHERE service_code = $1 AND external_id = $2")
}

#[derive(Deserialize)]
struct CreateBody {
    subscription: SubscriptionInput,
}

async fn current_plan(
    state: &AppState,
    tenant: &Tenant,
    code: Option<&str>,
) -> ApiResult<Option<PlanRef>> {
    let Some(code) = code.filter(|c| !c.trim().is_empty()) else {
        return Ok(None);
    };
    let plan: Plan = store::load(&state.pool, &tenant.scoped(code)).await?;
    Ok(plan.current().map(PlanRef::from))
}

async fn create(
    tenant: Tenant,
    State(state): State<AppState>,
    request: RequestContext,
    LagoJson(body): LagoJson<CreateBody>,
) -> ApiResult<Json<Value>> {
    let mut input = body.subscription;
    let external_id = input.external_id.clone().unwrap_or_default();
    if let Some(customer_id) = input
        .external_customer_id
        .as_deref()
        .filter(|c| !c.trim().is_empty())
    {
        let customer: Customer = store::load(&state.pool, &tenant.scoped(customer_id)).await?;
        input.customer = customer.reference();
    }
    input.plan = current_plan(&state, &tenant, input.plan_code.as_deref()).await?;
    let command = SubscriptionCommand::Create {
        lago_id: Uuid::new_v4(),
        input: Box::new(input),
        now: Utc::now(),
    };
    run(&state, &tenant, &request, &external_id, command).await
}

async fn run(
    state: &AppState,
    tenant: &Tenant,
    request: &RequestContext,
    external_id: &str,
    command: SubscriptionCommand,
) -> ApiResult<Json<Value>> {
    let select = select();
    let resource = Resource {
        name: "subscription",
        select: &select,
    };
    let handler = &state.commands.subscriptions;
    write_then_read(
        state,
        tenant,
        request,
        handler,
        external_id,
        command,
        &resource,
    )
    .await
}

async fn find(
    tenant: Tenant,
    State(state): State<AppState>,
    Path(external_id): Path<String>,
) -> ApiResult<Json<Value>> {
    let select = select();
    let resource = Resource {
        name: "subscription",
        select: &select,
    };
    read(&state, &tenant, &external_id, &resource).await
}

async fn terminate(
    tenant: Tenant,
    State(state): State<AppState>,
    request: RequestContext,
    Path(external_id): Path<String>,
) -> ApiResult<Json<Value>> {
    let command = SubscriptionCommand::Terminate { at: Utc::now() };
    run(&state, &tenant, &request, &external_id, command).await
}

async fn suspend(
    tenant: Tenant,
    State(state): State<AppState>,
    request: RequestContext,
    Path(external_id): Path<String>,
) -> ApiResult<Json<Value>> {
    let command = SubscriptionCommand::Suspend { at: Utc::now() };
    run(&state, &tenant, &request, &external_id, command).await
}

async fn restore(
    tenant: Tenant,
    State(state): State<AppState>,
    request: RequestContext,
    Path(external_id): Path<String>,
) -> ApiResult<Json<Value>> {
    let command = SubscriptionCommand::Restore { at: Utc::now() };
    run(&state, &tenant, &request, &external_id, command).await
}

#[derive(Deserialize)]
struct ChangePlanBody {
    subscription: ChangePlan,
}

#[derive(Deserialize)]
struct ChangePlan {
    plan_code: Option<String>,
}

/// Move a subscription to another plan, or to the latest version of its own
/// plan: the only way its plan version ever changes.
async fn change_plan(
    tenant: Tenant,
    State(state): State<AppState>,
    request: RequestContext,
    Path(external_id): Path<String>,
    LagoJson(body): LagoJson<ChangePlanBody>,
) -> ApiResult<Json<Value>> {
    let Some(code) = body.subscription.plan_code.filter(|c| !c.trim().is_empty()) else {
        return Err(ApiError::invalid("plan_code", "value_is_mandatory"));
    };
    let plan = current_plan(&state, &tenant, Some(&code)).await?;
    let command = SubscriptionCommand::ChangePlan {
        plan,
        at: Utc::now(),
    };
    run(&state, &tenant, &request, &external_id, command).await
}

const STATUSES: [&str; 4] = ["active", "pending", "suspended", "terminated"];

/// Lago's list filters: `external_customer_id`, `plan_code`, `status[]`
/// (repeatable; only active subscriptions when absent), plus paging.
async fn list(
    tenant: Tenant,
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
) -> ApiResult<Json<Value>> {
    let mut page = PageRequest {
        page: None,
        per_page: None,
    };
    let (mut customer, mut plan, mut statuses) = (None, None, Vec::new());
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        let number = |field: &str| {
            value
                .parse::<i64>()
                .map_err(|_| ApiError::invalid(field, "value_is_invalid"))
        };
        match key.as_ref() {
            "page" => page.page = Some(number("page")?),
            "per_page" => page.per_page = Some(number("per_page")?),
            "external_customer_id" => customer = Some(value.into_owned()),
            "plan_code" => plan = Some(value.into_owned()),
            "status[]" | "status" => {
                if !STATUSES.contains(&value.as_ref()) {
                    return Err(ApiError::invalid("status", "value_is_invalid"));
                }
                statuses.push(value.into_owned());
            }
            _ => {}
        }
    }
    if statuses.is_empty() {
        statuses.push("active".to_string());
    }
    let (subscriptions, meta) = list_resources(&state, RESOURCE, "subscriptions", &tenant, page.validate()?, |sql| {
        if let Some(customer) = &customer {
            sql.push(" AND external_customer_id = ").push_bind(customer.clone());
        }
        if let Some(plan) = &plan {
            sql.push(" AND plan_code = ").push_bind(plan.clone());
        }
        sql.push(" AND subscription_status(subscription_at, suspended_at, terminated_at, now()) = ANY(")
            .push_bind(statuses.clone())
            .push(")");
    })
    .await?;
    Ok(Json(
        json!({ "subscriptions": subscriptions, "meta": meta }),
    ))
}
