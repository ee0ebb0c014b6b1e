//! Long CLI work (rebuild, replay, seal, verify) shows a progress bar with a
//! rate and an estimate on a terminal (a pseudo-terminal from `script`), and
//! nothing when its output is not a terminal; each ends with its one-line
//! summary either way.

use chrono::{Duration, Utc};
use serde_json::json;
use sqlx::PgPool;

use crate::helpers::{database_url, ledger_cli, spawn_app};

/// `ledger ARGS` on a pseudo-terminal: what the terminal showed.
fn on_a_terminal(pool: &PgPool, args: &[&str]) -> String {
    let command = std::iter::once(env!("CARGO_BIN_EXE_ledger"))
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    let output = std::process::Command::new("script")
        .args(["-q", "-e", "-c", &command, "/dev/null"])
        .env("DATABASE_URL", database_url(&pool.connect_options()))
        .env("RUST_LOG", "warn")
        .output()
        .expect("script (util-linux)");
    assert!(output.status.success(), "{command}: {output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[sqlx::test]
async fn long_commands_show_a_bar_on_a_terminal_only_and_end_with_a_summary(pool: PgPool) {
    let app = spawn_app(pool.clone()).await;
    let svc = app.service("nexacloud").await;
    svc.nexacloud_catalog().await;
    svc.subscribe("dep_1", 3).await;
    let events: Vec<_> = (0..20)
        .map(|i| {
            json!({"transaction_id": format!("tx_{i}"), "external_subscription_id": "dep_1",
                   "code": "cpu_seconds", "timestamp": (Utc::now() - Duration::minutes(i + 1)).timestamp(),
                   "properties": {"cpu_seconds": 60}})
        })
        .collect();
    svc.created("/events/batch", json!({ "events": events }))
        .await;
    app.catch_up().await;

    for (args, summary, bar) in [
        (
            vec!["projections", "rebuild", "--all"],
            " events replayed in ",
            " events ",
        ),
        (
            vec!["projections", "rebuild", "usage", "--into", "copy"],
            "rebuilt usage into schema copy: ",
            " events ",
        ),
        (vec!["seal"], " seal(s) written over ", " events "),
        (vec!["verify"], "the log verifies", " events "),
        (
            vec!["replay", "--period", "2026-01"],
            "replay of 2026-01: 0 invoice(s)",
            "reading the log's invoices",
        ),
    ] {
        let shown = on_a_terminal(&pool, &args);
        assert!(
            shown.contains(bar) && shown.contains(summary),
            "{args:?} on a terminal:\n{shown}"
        );
        if bar == " events " {
            assert!(shown.contains("eta") && shown.contains("/s"), "{shown}");
        }
        let output = ledger_cli(&pool, &args);
        assert!(output.status.success(), "{args:?}: {output:?}");
        let (stdout, stderr) = (
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        );
        assert_eq!(
            stdout.lines().filter(|l| l.contains(summary)).count(),
            1,
            "{args:?}: {stdout}"
        );
        assert!(
            !stdout.contains("eta") && stderr.is_empty(),
            "{args:?} without a terminal: {stdout}{stderr}"
        );
    }
}
