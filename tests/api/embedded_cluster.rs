//! The embedded default cluster: start, persistence, exclusivity, and
//! `/ready` following the database down and back up. These tests start
//! their own clusters (no DATABASE_URL needed).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ledger::event_log::store::{self, CommandBus, CommandMetadata};
use ledger::postgres::embedded::{ClusterSettings, EmbeddedError, EmbeddedPostgres};
use ledger::postgres::{pool_options, MIGRATOR};
use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::spawn_app;

async fn started(dir: &std::path::Path) -> EmbeddedPostgres {
    let mut cluster = EmbeddedPostgres::open(dir, ClusterSettings::default())
        .await
        .expect("open cluster");
    cluster.start().await.expect("start cluster");
    cluster
}

#[tokio::test]
async fn the_cluster_keeps_its_data_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = started(dir.path()).await;
    let pool = pool_options(2)
        .connect_with(cluster.connect_options())
        .await
        .unwrap();
    MIGRATOR.run(&pool).await.unwrap();
    store::execute(
        &CommandBus::new(&pool).services,
        "nexacloud",
        aggregates::ServiceCommand::Register {
            code: "nexacloud".into(),
            name: "NexaCloud".into(),
        },
        CommandMetadata::cli(),
    )
    .await
    .unwrap();
    pool.close().await;
    cluster.stop().await.unwrap();
    drop(cluster);

    let cluster = started(dir.path()).await;
    let pool = pool_options(2)
        .connect_with(cluster.connect_options())
        .await
        .unwrap();
    let events: Vec<(String, String)> =
        sqlx::query_as("SELECT aggregate_id, event_type FROM events")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        events,
        vec![("nexacloud".to_string(), "ServiceRegistered".to_string())]
    );
}

#[tokio::test]
async fn a_second_ledger_on_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _first = EmbeddedPostgres::open(dir.path(), ClusterSettings::default())
        .await
        .unwrap();
    let second = EmbeddedPostgres::open(dir.path(), ClusterSettings::default()).await;
    match second {
        Err(error @ EmbeddedError::DirectoryInUse { .. }) => assert_eq!(
            error.to_string(),
            format!(
                "another ledger (pid {}) is already using the data directory {}; stop it, \
                 or give this one its own --data-dir",
                std::process::id(),
                dir.path().canonicalize().unwrap().display()
            )
        ),
        other => panic!("expected DirectoryInUse, got {other:?}"),
    }
}

#[tokio::test]
async fn ledger_serve_refuses_a_second_process_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = env!("CARGO_BIN_EXE_ledger");
    let mut first = Command::new(ledger)
        .args(["--data-dir"])
        .arg(dir.path())
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(first.stderr.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let line = lines.next().expect("ledger exited early").unwrap();
        if line.contains("ledger is serving") {
            break;
        }
        assert!(Instant::now() < deadline, "ledger did not start");
    }

    let second = Command::new(ledger)
        .arg("--data-dir")
        .arg(dir.path())
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains(&format!(
            "error: another ledger (pid {}) is already using the data directory",
            first.id()
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = first.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(
        !dir.path().join("postgres/postmaster.pid").exists(),
        "the embedded server was stopped"
    );
}

#[tokio::test]
async fn ready_follows_the_database_down_and_back_up() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = started(dir.path()).await;
    let pool = pool_options(2)
        .connect_with(cluster.connect_options())
        .await
        .unwrap();
    MIGRATOR.run(&pool).await.unwrap();
    let app = spawn_app(pool).await;
    let (status, body) = app.get("/ready", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "ready");

    cluster.stop().await.unwrap();
    let (status, body) = app.get("/ready", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        body,
        json!({"status": "not_ready", "database": "unreachable", "tasks": []})
    );
    let (status, _) = app.get("/health", None).await;
    assert_eq!(status, StatusCode::OK, "the process itself is alive");

    cluster.start().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, body) = app.get("/ready", None).await;
        if status == StatusCode::OK {
            assert_eq!(body["database"], "reachable");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never became ready again: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `ledger services create` registers a service and prints its first key
/// once; the key works on the API; `revoke-key` stops it.
#[sqlx::test]
async fn the_services_cli_issues_keys_that_the_api_accepts(
    _: sqlx::postgres::PgPoolOptions,
    connect: sqlx::postgres::PgConnectOptions,
) {
    let url = crate::helpers::database_url(&connect);
    let ledger = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_ledger"))
            .args(args)
            .env("DATABASE_URL", &url)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).to_string();
        assert!(
            output.status.success(),
            "{args:?}: {stdout} {}",
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
    };
    let created = ledger(&[
        "services",
        "create",
        "nexacloud",
        "--name",
        "NexaCloud hosting",
    ]);
    let key = created
        .lines()
        .map(str::trim)
        .find(|line| line.starts_with("ledger_nexacloud_"))
        .expect("the key is printed")
        .to_string();
    let key_id = created
        .lines()
        .find_map(|line| {
            line.strip_prefix("API key ")
                .and_then(|rest| rest.split_whitespace().next())
        })
        .unwrap()
        .to_string();
    assert!(
        created.contains("nexacloud    NexaCloud hosting        active"),
        "{created}"
    );

    let pool = pool_options(2).connect_with(connect).await.unwrap();
    let app = spawn_app(pool).await;
    let (status, _) = app.get("/api/v1/plans", Some(&key)).await;
    assert_eq!(status, StatusCode::OK);

    let listed = ledger(&["services", "list"]);
    assert!(!listed.contains(&key), "lists never show a key");
    ledger(&["services", "revoke-key", "nexacloud", &key_id]);
    let (status, body) = app.get("/api/v1/plans", Some(&key)).await;
    assert_eq!(
        (status, body),
        (
            StatusCode::UNAUTHORIZED,
            json!({"status": 401, "error": "Unauthorized"})
        )
    );
}

/// Secrets never reach the log: a `ledger serve` at debug level is given an
/// operator key, issues a service key and serves requests with both; neither
/// key appears anywhere in what it logged.
#[tokio::test]
async fn keys_never_appear_in_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let admin_key = format!("operator-secret-{}", uuid::Uuid::new_v4().simple());
    let mut ledger = Command::new(env!("CARGO_BIN_EXE_ledger"))
        .arg("--data-dir")
        .arg(dir.path())
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env_remove("DATABASE_URL")
        .env("LEDGER_ADMIN_KEY", &admin_key)
        .env("RUST_LOG", "debug")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Drain the log on its own thread so the ledger never blocks writing it.
    let (line_sender, line_receiver) = std::sync::mpsc::channel::<String>();
    let reader = BufReader::new(ledger.stderr.take().unwrap());
    let drain = std::thread::spawn(move || {
        for line in reader.lines().map_while(Result::ok) {
            let _ = line_sender.send(line);
        }
    });
    let mut log = String::new();
    let address = loop {
        let line = line_receiver
            .recv_timeout(Duration::from_secs(60))
            .expect("ledger started");
        log.push_str(&line);
        log.push('\n');
        if line.contains("ledger is serving") {
            let start = line.find("127.0.0.1:").expect("address logged");
            let address: String = line[start..]
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
                .collect();
            break address;
        }
    };
    let base = format!("http://{address}");
    let client = reqwest::Client::new();
    let post = |path: &str, key: &str, body: serde_json::Value| {
        client
            .post(format!("{base}{path}"))
            .bearer_auth(key)
            .json(&body)
            .send()
    };
    post(
        "/admin/v1/services",
        &admin_key,
        json!({"service": {"code": "nexacloud", "name": "N"}}),
    )
    .await
    .unwrap();
    let issued: serde_json::Value = post(
        "/admin/v1/services/nexacloud/api_keys",
        &admin_key,
        json!({}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let service_key = issued["api_key"]["key"].as_str().unwrap().to_string();
    let response = post(
        "/api/v1/billable_metrics",
        &service_key,
        json!({"billable_metric": {"name": "c", "code": "c", "aggregation_type": "count_agg"}}),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let refused = post(
        "/api/v1/events",
        "wrong-secret-key-123",
        json!({"event": {}}),
    )
    .await
    .unwrap();
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(ledger.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(ledger.wait().unwrap().code(), Some(0));
    drain.join().unwrap();
    for line in line_receiver.try_iter() {
        log.push_str(&line);
        log.push('\n');
    }
    assert!(log.contains("POST"), "the requests were logged: {log}");
    for secret in [
        admin_key.as_str(),
        service_key.as_str(),
        "wrong-secret-key-123",
    ] {
        assert!(!log.contains(secret), "a secret reached the log");
    }
}

/// A newcomer in a container is root with a home only root can enter: the
/// cluster (which runs as `ledgerpg` then) keeps its files under
/// `CLUSTER_HOME`, named by the data directory's `postgres.location`, and
/// finds them again on the next start. Run as another user, the cluster
/// stays inside the data directory.
#[tokio::test]
async fn a_data_directory_under_a_home_only_its_owner_can_enter_works() {
    use std::os::unix::fs::PermissionsExt;
    let home = tempfile::tempdir().unwrap();
    std::fs::set_permissions(home.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let data_dir = home.path().join("clone/ledger-data");
    let data_dir_canonical = {
        std::fs::create_dir_all(&data_dir).unwrap();
        data_dir.canonicalize().unwrap()
    };
    let as_root = nix::unistd::Uid::effective().is_root();

    let mut cluster = started(&data_dir).await;
    let root = cluster.cluster_root().to_path_buf();
    let location = std::fs::read_to_string(data_dir.join("postgres.location")).ok();
    if as_root {
        assert!(
            root.starts_with(ledger::postgres::embedded::CLUSTER_HOME),
            "{root:?}"
        );
        assert_eq!(location, Some(format!("{}\n", root.display())));
        assert_eq!(
            std::fs::metadata(home.path()).unwrap().permissions().mode() & 0o777,
            0o700,
            "the home directory's permissions are left alone"
        );
    } else {
        assert_eq!(root, data_dir_canonical);
        assert_eq!(location, None);
    }
    let pool = pool_options(1)
        .connect_with(cluster.connect_options())
        .await
        .unwrap();
    MIGRATOR.run(&pool).await.unwrap();
    sqlx::raw_sql("CREATE TABLE kept (n int); INSERT INTO kept VALUES (7)")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    cluster.stop().await.unwrap();
    drop(cluster);

    let mut cluster = started(&data_dir).await;
    assert_eq!(cluster.cluster_root(), root.as_path());
    let pool = pool_options(1)
        .connect_with(cluster.connect_options())
        .await
        .unwrap();
    let kept: i32 = sqlx::query_scalar("SELECT n FROM kept")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(kept, 7);
    pool.close().await;
    cluster.stop().await.unwrap();
    drop(cluster);
    if as_root {
        std::fs::remove_dir_all(&root).unwrap();
    }
}

/// `ledger demo` narrates on stdout, in order, what a new user should see;
/// the server's log lines go to the data directory's `demo.log`.
#[tokio::test]
async fn the_demo_narrates_on_stdout_and_keeps_the_server_logs_in_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_ledger"))
        .arg("--data-dir")
        .arg(dir.path())
        .arg("demo")
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stdout}\n{stderr}");
    assert_eq!(stderr, "", "nothing but the narration is printed");
    assert!(!stdout.contains(" INFO "), "{stdout}");
    let log = dir.path().canonicalize().unwrap().join("demo.log");
    let sections = [
        "ledger serving at http://127.0.0.1:".to_string(),
        format!("the server's log lines: {}", log.display()),
        "== recording facts through the admin API ==".into(),
        "== NexaCloud's catalog".into(),
        "== usage: NexaCloud reports CPU-seconds per deployment ==".into(),
        "== webhooks: NexaCloud registers an endpoint".into(),
        "== invoicing: last month closes".into(),
        "== webhooks received".into(),
        "== importing NexaCloud's database".into(),
        "== dual run: ledger reconcile".into(),
    ];
    let mut from = 0;
    for section in &sections {
        let at = stdout[from..]
            .find(section.as_str())
            .unwrap_or_else(|| panic!("{section:?} missing or out of order in:\n{stdout}"));
        from += at + section.len();
    }
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("finished processing request"),
        "the server's request log is in demo.log"
    );
    assert!(
        !logged.contains("\u{1b}["),
        "no terminal colours in the file"
    );
}
