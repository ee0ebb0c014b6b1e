//! The projection runner over the real projections: fold, status, rebuild.

use ledger::projection_runner::{self, ProjectionRunner};
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
    let app = spawn_app(pool.clone()).await;
    app.register_service("nexacloud", "NexaCloud").await;
    app.register_service("nexadesk", "NexaDesk").await;
    app.post_admin("/admin/v1/services/nexadesk/deactivate", "{}")
        .await;

    ProjectionRunner::for_all(pool.clone()).await.unwrap();
    let before = projection_runner::status(&pool).await.unwrap();
    assert_eq!(before.len(), 1);
    assert_eq!(
        (
            before[0].name.as_str(),
            before[0].last_position,
            before[0].lag
        ),
        ("service_directory", 0, 3)
    );

    assert_eq!(app.catch_up().await, 3);
    let after = projection_runner::status(&pool).await.unwrap();
    assert_eq!(
        (
            after[0].last_position,
            after[0].events_applied,
            after[0].lag
        ),
        (3, 3, 0)
    );
    assert_eq!(
        directory_rows(&pool).await,
        vec![
            ("nexacloud".into(), "NexaCloud".into(), "active".into(), 1),
            ("nexadesk".into(), "NexaDesk".into(), "inactive".into(), 3),
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
    assert_eq!(app.catch_up().await, 6);

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
