//! Faults: slow and silent clients, and PostgreSQL restarting under load
//! (the test stops and starts the cluster it runs on).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use ledger::app::server::ConnectionLimits;
use ledger::app::{BackgroundTasks, Settings};
use ledger::http::admin::AdminKey;
use ledger::postgres::embedded::{ClusterSettings, EmbeddedPostgres};
use ledger::postgres::{pool_options, MIGRATOR};
use reqwest::StatusCode;
use serde_json::json;
use sqlx::PgPool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{spawn_app_with_settings, ADMIN_KEY};

/// Whether the server closes `stream` within `within` (reading until EOF).
async fn closed_within(mut stream: TcpStream, within: Duration) -> bool {
    let mut buffer = [0u8; 1024];
    tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

#[sqlx::test]
async fn silent_slow_and_idle_connections_are_closed(pool: PgPool) {
    let limits = ConnectionLimits {
        header_read_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(2),
    };
    let app = spawn_app_with_settings(
        pool,
        Settings {
            connections: limits,
            ..Settings::local(Some(AdminKey::new(ADMIN_KEY)), BackgroundTasks::NONE)
        },
    )
    .await;
    let address = app.address.trim_start_matches("http://").to_string();
    let mut silent = Vec::new();
    let mut mid_header = Vec::new();
    for _ in 0..100 {
        silent.push(TcpStream::connect(&address).await.unwrap());
        let mut stream = TcpStream::connect(&address).await.unwrap();
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: ledger\r\nX-Slow: ")
            .await
            .unwrap();
        mid_header.push(stream);
    }
    // A keep-alive connection that completed a request, then went quiet.
    let mut idle = TcpStream::connect(&address).await.unwrap();
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: ledger\r\n\r\n")
        .await
        .unwrap();
    let mut response = [0u8; 512];
    let read = idle.read(&mut response).await.unwrap();
    assert!(response[..read].starts_with(b"HTTP/1.1 200"));

    let started = Instant::now();
    let closes = silent
        .into_iter()
        .chain(mid_header)
        .chain([idle])
        .map(|stream| closed_within(stream, Duration::from_secs(6)));
    let closed = futures_util::future::join_all(closes).await;
    assert_eq!(closed.iter().filter(|c| **c).count(), 201);
    assert!(started.elapsed() < Duration::from_secs(6));
    // The server still serves new connections.
    let (status, _) = app.get("/health", None).await;
    assert_eq!(status, StatusCode::OK);
}

/// What the load saw: (seconds since the start when sent, what, status).
type Seen = Arc<Mutex<Vec<(f64, &'static str, u16)>>>;

#[tokio::test]
async fn after_postgres_restarts_under_load_every_path_and_task_recovers_by_itself() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("ledger=error")
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = EmbeddedPostgres::open(dir.path(), ClusterSettings::default())
        .await
        .unwrap();
    cluster.start().await.unwrap();
    let pool = pool_options(8)
        .connect_with(cluster.connect_options())
        .await
        .unwrap();
    MIGRATOR.run(&pool).await.unwrap();
    let app = spawn_app_with_settings(
        pool.clone(),
        Settings {
            close_interval: Duration::from_secs(1),
            seal_interval: Duration::from_secs(1),
            ..Settings::local(Some(AdminKey::new(ADMIN_KEY)), BackgroundTasks::ALL)
        },
    )
    .await;
    let svc = app.service("nexacloud").await;
    svc.nexacloud_catalog().await;
    svc.created(
        "/subscriptions",
        json!({"subscription": {"external_customer_id": "cus_ada", "plan_code": "starter",
               "external_id": "dep_1",
               "subscription_at": (Utc::now() - chrono::Duration::hours(1)).to_rfc3339()}}),
    )
    .await;
    let key = svc.key.clone();

    let started = Instant::now();
    let seen: Seen = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(load(
        app.address.clone(),
        key.clone(),
        seen.clone(),
        stop.clone(),
        started,
    ));
    tokio::time::sleep(Duration::from_secs(2)).await;

    let outage_began = started.elapsed().as_secs_f64();
    cluster.stop().await.unwrap();
    // During the outage: a prompt 503 with Retry-After, and /ready is 503.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let asked = Instant::now();
    let response = app
        .client
        .get(format!(
            "{}/api/v1/customers/cus_ada/current_usage?external_subscription_id=dep_1",
            app.address
        ))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()["retry-after"], "1");
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "{:?}",
        asked.elapsed()
    );
    let (status, _) = app.get("/ready", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    tokio::time::sleep(Duration::from_secs(2)).await;

    cluster.start().await.unwrap();
    let restarted = Utc::now();
    let restarted_at = started.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = app.get("/ready", None).await;
        let recovered = |task: &str| {
            body["tasks"].as_array().is_some_and(|tasks| {
                tasks.iter().any(|t| {
                    t["name"] == task
                        && t["status"] == "running"
                        && t["last_success_at"]
                            .as_str()
                            .and_then(|at| at.parse::<chrono::DateTime<Utc>>().ok())
                            .is_some_and(|at| at > restarted)
                })
            })
        };
        if status == StatusCode::OK
            && ["projections", "closer", "sealer"]
                .iter()
                .all(|t| recovered(t))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not recovered within 10 s: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Writes and current usage answer again (the load keeps going a while).
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    load.await.unwrap();
    let seen = seen.lock().unwrap().clone();
    let recovered_by = restarted_at + 10.0;
    for what in ["customer", "event", "current_usage"] {
        let before: Vec<u16> = seen
            .iter()
            .filter(|(at, w, _)| *w == what && *at < outage_began - 0.5)
            .map(|(_, _, s)| *s)
            .collect();
        assert!(
            !before.is_empty() && before.iter().all(|s| *s == 200),
            "{what}: {before:?}"
        );
        let after: Vec<u16> = seen
            .iter()
            .filter(|(at, w, _)| *w == what && *at > recovered_by - 8.0)
            .map(|(_, _, s)| *s)
            .collect();
        assert!(
            after.last() == Some(&200),
            "{what} after the restart: {after:?}"
        );
    }
    // Never a 500: during the outage every refusal is a 503.
    let statuses: std::collections::BTreeSet<u16> = seen.iter().map(|(_, _, s)| *s).collect();
    assert!(statuses.is_subset(&[200, 503].into()), "{statuses:?}");
    cluster.stop().await.unwrap();
}

async fn load(address: String, key: String, seen: Seen, stop: Arc<AtomicBool>, started: Instant) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        let requests = [
            (
                "customer",
                client
                    .post(format!("{address}/api/v1/customers"))
                    .json(&json!({"customer": {"external_id": "cus_ada", "name": format!("Ada {n}"),
                                  "currency": "CAD", "timezone": "America/Toronto",
                                  "tax_codes": ["hst_on"]}})),
            ),
            (
                "event",
                client
                    .post(format!("{address}/api/v1/events"))
                    .json(&json!({"event": {"transaction_id": format!("load-{n}"),
                        "external_subscription_id": "dep_1", "code": "cpu_seconds",
                        "timestamp": Utc::now().timestamp(), "properties": {"cpu_seconds": "1"}}})),
            ),
            (
                "current_usage",
                client.get(format!(
                    "{address}/api/v1/customers/cus_ada/current_usage?external_subscription_id=dep_1"
                )),
            ),
        ];
        for (what, request) in requests {
            let sent_at = started.elapsed().as_secs_f64();
            let status = match request.bearer_auth(&key).send().await {
                Ok(response) => response.status().as_u16(),
                Err(_) => 0,
            };
            seen.lock().unwrap().push((sent_at, what, status));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[sqlx::test]
async fn ready_is_503_while_a_background_task_fails_and_200_once_it_recovers(pool: PgPool) {
    let app = spawn_app_with_settings(
        pool.clone(),
        Settings {
            seal_interval: Duration::from_millis(200),
            ..Settings::local(Some(AdminKey::new(ADMIN_KEY)), BackgroundTasks::ALL)
        },
    )
    .await;
    // Every seal the sealer tries is refused by the database.
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_seals() RETURNS trigger LANGUAGE plpgsql AS \
           $$ BEGIN RAISE EXCEPTION 'seals refused for the test'; END $$; \
         CREATE TRIGGER refuse_seals BEFORE INSERT ON events FOR EACH ROW \
           WHEN (NEW.aggregate_type = 'LogSeal') EXECUTE FUNCTION refuse_seals();",
    )
    .execute(&pool)
    .await
    .unwrap();
    app.service("nexacloud").await;
    let sealer = |body: &serde_json::Value| {
        body["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == "sealer")
            .cloned()
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let failing = loop {
        let (status, body) = app.get("/ready", None).await;
        if status == StatusCode::SERVICE_UNAVAILABLE {
            break body;
        }
        assert!(Instant::now() < deadline, "never not ready: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(failing["status"], "not_ready");
    assert_eq!(failing["database"], "reachable");
    let task = sealer(&failing);
    assert_eq!(task["status"], "failing");
    assert!(
        task["last_error"]
            .as_str()
            .unwrap()
            .contains("seals refused for the test"),
        "{task}"
    );

    sqlx::raw_sql("DROP TRIGGER refuse_seals ON events")
        .execute(&pool)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = app.get("/ready", None).await;
        if status == StatusCode::OK {
            assert_eq!(sealer(&body)["status"], "running");
            assert_eq!(sealer(&body)["consecutive_failures"], 0);
            break;
        }
        assert!(Instant::now() < deadline, "never ready again: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
