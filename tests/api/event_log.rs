//! The event log: schema, append-only guard, and commands through cqrs-es.

use aggregates::{ServiceCommand, ServiceError};
use cqrs_es::AggregateError;
use ledger::event_log::store::{self, Actor, CommandBus, CommandMetadata};
use ledger::postgres::MIGRATOR;
use serde_json::json;
use sqlx::PgPool;

#[sqlx::test]
async fn migrations_apply_twice_without_error(pool: PgPool) {
    // #[sqlx::test] applied them once already.
    MIGRATOR.run(&pool).await.expect("second run");
    MIGRATOR.run(&pool).await.expect("third run");
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(applied, MIGRATOR.iter().count() as i64);
}

async fn register(pool: &PgPool, code: &str) -> Result<(), AggregateError<ServiceError>> {
    let bus = CommandBus::new(pool);
    let metadata = CommandMetadata {
        actor: Actor::Operator,
        request_id: "req-42".into(),
        recorded_at: "2026-11-21T10:00:00Z".parse().unwrap(),
        client_ip: Some("10.1.2.3".into()),
        api_key_id: None,
    };
    store::execute(
        &bus.services,
        code,
        ServiceCommand::Register {
            code: code.into(),
            name: "NexaCloud hosting".into(),
        },
        metadata,
    )
    .await
}

#[sqlx::test]
async fn a_command_records_its_event_with_metadata_position_and_time(pool: PgPool) {
    register(&pool, "nexacloud").await.unwrap();

    let (aggregate_type, aggregate_id, sequence, event_type, version, payload, metadata, position, recorded_recently): (
        String, String, i64, String, String, serde_json::Value, serde_json::Value, i64, bool,
    ) = sqlx::query_as(
        "SELECT aggregate_type, aggregate_id, sequence, event_type, event_version, payload::jsonb, \
         metadata::jsonb, position, recorded_at > now() - interval '1 minute' FROM events",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(aggregate_type, "Service");
    assert_eq!(aggregate_id, "nexacloud");
    assert_eq!(sequence, 1);
    assert_eq!(event_type, "ServiceRegistered");
    assert_eq!(version, "1.0");
    assert_eq!(
        payload,
        json!({"ServiceRegistered": {"code": "nexacloud", "name": "NexaCloud hosting"}})
    );
    assert_eq!(
        metadata,
        json!({"actor": "operator", "request_id": "req-42",
               "recorded_at": "2026-11-21T10:00:00.000000Z", "client_ip": "10.1.2.3"})
    );
    assert_eq!(position, 1);
    assert!(recorded_recently);
}

#[sqlx::test]
async fn a_refused_command_records_nothing(pool: PgPool) {
    register(&pool, "nexacloud").await.unwrap();
    let second = register(&pool, "nexacloud").await;
    assert!(matches!(
        second,
        Err(AggregateError::UserError(
            ServiceError::CodeAlreadyRegistered
        ))
    ));
    let invalid = register(&pool, "Nexa Cloud").await;
    assert!(matches!(
        invalid,
        Err(AggregateError::UserError(ServiceError::InvalidCode(_)))
    ));
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(events, 1);
}

#[sqlx::test]
async fn racing_registrations_of_one_code_record_one_event(pool: PgPool) {
    let racers: Vec<_> = (0..8)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { register(&pool, "nexadesk").await })
        })
        .collect();
    let mut results = Vec::new();
    for racer in racers {
        results.push(racer.await.unwrap());
    }
    let succeeded = results.iter().filter(|r| r.is_ok()).count();
    let refused = results
        .iter()
        .filter(|r| {
            matches!(
                r,
                Err(AggregateError::UserError(
                    ServiceError::CodeAlreadyRegistered
                ))
            )
        })
        .count();
    assert_eq!((succeeded, refused), (1, 7), "{results:?}");
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(events, 1);
}

#[sqlx::test]
async fn the_database_refuses_to_rewrite_the_log(pool: PgPool) {
    register(&pool, "nexacloud").await.unwrap();
    for statement in [
        "UPDATE events SET payload = '{}'",
        "DELETE FROM events",
        "TRUNCATE events",
    ] {
        let error = sqlx::query(statement).execute(&pool).await.unwrap_err();
        let db_error = error.as_database_error().expect("a database error");
        assert_eq!(db_error.code().as_deref(), Some("42501"), "{statement}");
        assert!(
            db_error
                .message()
                .starts_with("the event log is append-only"),
            "{statement}: {}",
            db_error.message()
        );
    }
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(events, 1);
}
