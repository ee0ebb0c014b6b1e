//! The projection runner over the real projections: fold, status, rebuild.

use aggregates::ServiceCommand;
use ledger::access::services;
use ledger::event_log::projection_runner::{self, ProjectionRunner};
use ledger::event_log::store::{self, CommandBus, CommandMetadata};
use projections::ServiceDirectory;
use sqlx::PgPool;

use crate::helpers::spawn_app;

async fn directory_rows(pool: &PgPool) -> Vec<(String, String, String, i64)> {
    sqlx::query_as("SELECT code, name, status, last_position FROM service_directory ORDER BY code")
        .fetch_all(pool)
        .await
        .unwrap()
}

#[sqlx::test]
async fn status_reports_checkpoint_and_lag(pool: PgPool) {
    let bus = CommandBus::new(&pool);
    for code in ["nexacloud", "nexadesk"] {
        services::register(&bus, code, &code.to_uppercase(), CommandMetadata::cli())
            .await
            .unwrap();
    }
    store::execute(
        &bus.services,
        "nexadesk",
        ServiceCommand::Deactivate,
        CommandMetadata::cli(),
    )
    .await
    .unwrap();

    let before = projection_runner::status(&pool).await.unwrap();
    let summary: Vec<(&str, i64, i64)> = before
        .iter()
        .map(|s| (s.name.as_str(), s.last_position, s.lag))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("catalog", 0, 3),
            ("imports", 0, 3),
            ("invoices", 0, 3),
            ("reconciliation", 0, 3),
            ("service_directory", 0, 3),
            ("usage", 0, 3),
            ("webhooks", 0, 3)
        ]
    );
    assert_eq!(before[0].updated_at, None, "never run yet");

    let runner = ProjectionRunner::for_all(pool.clone()).await.unwrap();
    assert_eq!(
        runner.catch_up().await.unwrap(),
        21,
        "3 events into 7 projections"
    );
    let after = projection_runner::status(&pool).await.unwrap();
    let summary: Vec<(&str, i64, i64, i64)> = after
        .iter()
        .map(|s| (s.name.as_str(), s.last_position, s.events_applied, s.lag))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("catalog", 3, 3, 0),
            ("imports", 3, 3, 0),
            ("invoices", 3, 3, 0),
            ("reconciliation", 3, 3, 0),
            ("service_directory", 3, 3, 0),
            ("usage", 3, 3, 0),
            ("webhooks", 3, 3, 0)
        ]
    );
    assert_eq!(
        directory_rows(&pool).await,
        vec![
            ("nexacloud".into(), "NEXACLOUD".into(), "active".into(), 1),
            ("nexadesk".into(), "NEXADESK".into(), "inactive".into(), 3),
        ]
    );
}

#[sqlx::test]
async fn a_rebuild_replays_the_log_into_identical_rows(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    for code in ["nexacloud", "nexadesk", "nexamaps"] {
        app.register_service(code, &code.to_uppercase()).await;
    }
    app.post_admin("/admin/v1/services/nexamaps/deactivate", "{}")
        .await;
    app.post_admin("/admin/v1/services/nexamaps/reactivate", "{}")
        .await;
    app.post_admin("/admin/v1/services/nexacloud/deactivate", "{}")
        .await;
    app.catch_up().await;
    let live: Vec<(String, String, String, String, String, i64)> = sqlx::query_as(
        "SELECT code, name, status, registered_at::text, updated_at::text, last_position \
         FROM service_directory ORDER BY code",
    )
    .fetch_all(&pool)
    .await
    .unwrap();

    projection_runner::reset(&pool, &ServiceDirectory)
        .await
        .unwrap();
    assert_eq!(directory_rows(&pool).await, vec![]);
    assert_eq!(
        ProjectionRunner::new(pool.clone(), vec![Box::new(ServiceDirectory)])
            .await
            .unwrap()
            .catch_up()
            .await
            .unwrap(),
        6
    );

    let rebuilt: Vec<(String, String, String, String, String, i64)> = sqlx::query_as(
        "SELECT code, name, status, registered_at::text, updated_at::text, last_position \
         FROM service_directory ORDER BY code",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(rebuilt, live);
    assert_eq!(live.len(), 3);
    assert_eq!(live[0].2, "inactive");
    assert_eq!(live[2].2, "active");
}
