//! Ordered catch-up reads under concurrency: a projection consuming while
//! many writers commit out of order (some holding their transaction open,
//! some taking their transaction id long before writing, some rolling back)
//! sees every committed event exactly once, in the order of a full re-read;
//! one that reads only some aggregate types sees exactly those.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use ledger::event_log::projection_runner::{BatchOutcome, ProjectionRunner};
use projections::log::Window;
use projections::{LogEvent, Projection, ProjectionError};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgConnection, PgPool};

const WRITERS: u64 = 10;
const ROUNDS: u64 = 25;

/// Records the order in which it was handed events. The unique position
/// makes a second application of one event fail loudly.
struct OrderingProbe;

#[async_trait]
impl Projection for OrderingProbe {
    fn name(&self) -> &'static str {
        "ordering_probe"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["ordering_probe"]
    }

    async fn apply(
        &self,
        conn: &mut PgConnection,
        event: &LogEvent,
    ) -> Result<(), ProjectionError> {
        sqlx::query("INSERT INTO ordering_probe (position) VALUES ($1)")
            .bind(event.position)
            .execute(conn)
            .await?;
        Ok(())
    }
}

/// Records only `Probe` events: the log ships it nothing else but each
/// window's last event (which it skips, as every fold skips what it does
/// not read).
struct SelectiveProbe;

#[async_trait]
impl Projection for SelectiveProbe {
    fn name(&self) -> &'static str {
        "selective_probe"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["ordering_probe"]
    }

    fn reads(&self) -> projections::log::Reads<'static> {
        projections::log::Reads {
            payloads: Some(&["Probe"]),
            usage_facts: false,
        }
    }

    async fn apply(
        &self,
        conn: &mut PgConnection,
        event: &LogEvent,
    ) -> Result<(), ProjectionError> {
        if event.aggregate_type == "Probe" {
            assert_eq!(event.payload, r#"{"probe":true}"#);
            OrderingProbe.apply(conn, event).await?;
        } else {
            assert_eq!(event.payload, "null");
        }
        Ok(())
    }
}

/// A small deterministic generator, so every run exercises the same mix.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % bound
    }
}

#[derive(Default)]
struct WriteStats {
    committed_events: AtomicUsize,
    committed_noise: AtomicUsize,
    rolled_back: AtomicUsize,
    held_open: AtomicUsize,
    early_xid: AtomicUsize,
}

async fn write_concurrently(pool: &PgPool, stats: &Arc<WriteStats>) {
    let writers: Vec<_> = (0..WRITERS)
        .map(|writer| {
            let pool = pool.clone();
            let stats = stats.clone();
            tokio::spawn(async move {
                let mut rng = XorShift(0x9E37_79B9_7F4A_7C15 ^ ((writer + 1) * 0x2545_F491));
                for round in 0..ROUNDS {
                    let mut tx = pool.begin().await.unwrap();
                    let style = rng.next(4);
                    if style == 0 {
                        // Take a transaction id now, write much later: the
                        // events get a low xid but commit after later xids.
                        sqlx::query("SELECT pg_current_xact_id()")
                            .execute(&mut *tx)
                            .await
                            .unwrap();
                        stats.early_xid.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(rng.next(40))).await;
                    }
                    let count = 1 + rng.next(3) as usize;
                    // Every third round writes events only the full probe reads.
                    let kind = if round % 3 == 2 { "Noise" } else { "Probe" };
                    for sequence in 1..=count {
                        sqlx::query(
                            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, \
                             event_version, payload, metadata) \
                             VALUES ($3, $1, $2, 'ProbeWritten', '1.0', '{\"probe\":true}', '{}')",
                        )
                        .bind(format!("writer-{writer}-round-{round}"))
                        .bind(sequence as i64)
                        .bind(kind)
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                    }
                    if style == 1 {
                        // Hold positions that later transactions overtake.
                        stats.held_open.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(50 + rng.next(100))).await;
                    }
                    if rng.next(5) == 0 {
                        tx.rollback().await.unwrap();
                        stats.rolled_back.fetch_add(1, Ordering::Relaxed);
                    } else {
                        tx.commit().await.unwrap();
                        stats.committed_events.fetch_add(count, Ordering::Relaxed);
                        if kind == "Noise" {
                            stats.committed_noise.fetch_add(count, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
}

async fn probe_setup(connect: PgConnectOptions) -> PgPool {
    let pool = PgPoolOptions::new()
        .max_connections(WRITERS as u32 + 6)
        .connect_with(connect)
        .await
        .unwrap();
    sqlx::query(
        "CREATE TABLE ordering_probe (applied_order bigserial PRIMARY KEY, position bigint NOT NULL UNIQUE)",
    )
    .execute(&pool)
    .await
    .unwrap();
    pool
}

/// Runs batches until told to stop; returns the events it applied.
fn consume(
    runner: Arc<ProjectionRunner>,
    writers_done: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<usize> {
    consume_with(runner, writers_done, &OrderingProbe)
}

fn consume_with(
    runner: Arc<ProjectionRunner>,
    writers_done: Arc<AtomicBool>,
    probe: &'static (dyn Projection + Sync),
) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let mut applied = 0;
        while !writers_done.load(Ordering::Relaxed) {
            match runner.run_batch(probe).await.expect("batch") {
                BatchOutcome::Applied { events, .. } => applied += events,
                BatchOutcome::CaughtUp | BatchOutcome::HeldBack | BatchOutcome::Busy => {
                    tokio::time::sleep(Duration::from_millis(3)).await
                }
            }
        }
        applied
    })
}

async fn assert_probe_matches_log(pool: &PgPool, stats: &WriteStats) {
    let applied: Vec<i64> =
        sqlx::query_scalar("SELECT position FROM ordering_probe ORDER BY applied_order")
            .fetch_all(pool)
            .await
            .unwrap();
    let reread: Vec<i64> =
        sqlx::query_scalar("SELECT position FROM events ORDER BY transaction_id, position")
            .fetch_all(pool)
            .await
            .unwrap();
    assert_eq!(
        applied.len(),
        stats.committed_events.load(Ordering::Relaxed)
    );
    assert_eq!(applied, reread);
    // The scenario really happened.
    assert!(stats.rolled_back.load(Ordering::Relaxed) > 0);
    assert!(stats.held_open.load(Ordering::Relaxed) > 0);
    assert!(stats.early_xid.load(Ordering::Relaxed) > 0);
}

#[sqlx::test]
async fn a_projection_sees_every_committed_event_once_in_log_order(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = probe_setup(connect).await;
    let runner = Arc::new(
        ProjectionRunner::new(pool.clone(), vec![Box::new(OrderingProbe)])
            .await
            .unwrap(),
    );
    let stats = Arc::new(WriteStats::default());
    let writers_done = Arc::new(AtomicBool::new(false));
    let reader = consume(runner.clone(), writers_done.clone());

    write_concurrently(&pool, &stats).await;
    writers_done.store(true, Ordering::Relaxed);
    let applied_during_writes = reader.await.unwrap();
    runner.catch_up().await.unwrap();

    assert!(
        applied_during_writes > 0,
        "the projection consumed during the writes"
    );
    assert_probe_matches_log(&pool, &stats).await;
}

#[sqlx::test]
async fn two_runners_on_one_projection_never_apply_an_event_twice(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let pool = probe_setup(connect.clone()).await;
    // Two runners with their own pools, as two `ledger serve` processes.
    let other_pool = PgPoolOptions::new()
        .max_connections(2)
        .connect_with(connect)
        .await
        .unwrap();
    let first = Arc::new(
        ProjectionRunner::new(pool.clone(), vec![Box::new(OrderingProbe)])
            .await
            .unwrap(),
    );
    let second = Arc::new(
        ProjectionRunner::new(other_pool, vec![Box::new(OrderingProbe)])
            .await
            .unwrap(),
    );
    let stats = Arc::new(WriteStats::default());
    let writers_done = Arc::new(AtomicBool::new(false));
    let first_reader = consume(first.clone(), writers_done.clone());
    let second_reader = consume(second.clone(), writers_done.clone());

    write_concurrently(&pool, &stats).await;
    writers_done.store(true, Ordering::Relaxed);
    let by_first = first_reader.await.unwrap();
    let by_second = second_reader.await.unwrap();
    let remaining = first.catch_up().await.unwrap();

    assert_eq!(
        by_first + by_second + remaining,
        stats.committed_events.load(Ordering::Relaxed)
    );
    assert_probe_matches_log(&pool, &stats).await;
}

#[sqlx::test]
async fn a_projection_reading_some_types_sees_exactly_those_once_in_log_order(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    // Windows of a few events: most end on an event the probe does not read.
    let window = Window {
        walk: 4,
        ship: 4,
        step: 4,
    };
    selective_reads_under_concurrent_writes(connect, window).await;
}

#[sqlx::test]
async fn a_window_cut_short_by_what_it_ships_loses_and_repeats_nothing(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    // Two thirds of the events are read: most windows stop at their third
    // shipped event, long before their ninth walked one, each read in
    // statements of two.
    let window = Window {
        walk: 9,
        ship: 3,
        step: 2,
    };
    selective_reads_under_concurrent_writes(connect, window).await;
}

async fn selective_reads_under_concurrent_writes(connect: PgConnectOptions, window: Window) {
    let pool = probe_setup(connect).await;
    let runner = Arc::new(
        ProjectionRunner::new(pool.clone(), vec![Box::new(SelectiveProbe)])
            .await
            .unwrap()
            .with_window(window),
    );
    let stats = Arc::new(WriteStats::default());
    let writers_done = Arc::new(AtomicBool::new(false));
    let reader = consume_with(runner.clone(), writers_done.clone(), &SelectiveProbe);

    write_concurrently(&pool, &stats).await;
    writers_done.store(true, Ordering::Relaxed);
    let walked_during_writes = reader.await.unwrap();
    let walked_after = runner.catch_up().await.unwrap();

    let applied: Vec<i64> =
        sqlx::query_scalar("SELECT position FROM ordering_probe ORDER BY applied_order")
            .fetch_all(&pool)
            .await
            .unwrap();
    let reread: Vec<i64> = sqlx::query_scalar(
        "SELECT position FROM events WHERE aggregate_type = 'Probe' \
         ORDER BY transaction_id, position",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let committed = stats.committed_events.load(Ordering::Relaxed);
    let noise = stats.committed_noise.load(Ordering::Relaxed);
    assert!(walked_during_writes > 0 && noise > 0);
    assert_eq!(applied.len(), committed - noise);
    assert_eq!(applied, reread);
    // Every event is walked (and counted) once, read or not.
    assert_eq!(walked_during_writes + walked_after, committed);
    let events_applied: i64 = sqlx::query_scalar(
        "SELECT events_applied FROM projection_checkpoints WHERE projection = 'selective_probe'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(events_applied, committed as i64);
}

#[sqlx::test]
async fn a_window_ends_at_its_walk_or_at_its_last_shipped_event_whichever_comes_first(
    _: PgPoolOptions,
    connect: PgConnectOptions,
) {
    use projections::log::{read_after, LogPosition, Reads};
    let pool = probe_setup(connect).await;
    // Positions 1..=9: P N P P N N N P N (P read, N not).
    for (sequence, kind) in "PNPPNNNPN".chars().enumerate() {
        let kind = if kind == 'P' { "Probe" } else { "Noise" };
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, \
             event_version, payload, metadata) \
             VALUES ($1, 'window', $2, 'ProbeWritten', '1.0', '{\"probe\":true}', '{}')",
        )
        .bind(kind)
        .bind(sequence as i64 + 1)
        .execute(&pool)
        .await
        .unwrap();
    }
    let reads = Reads {
        payloads: Some(&["Probe"]),
        usage_facts: false,
    };
    // Other tests' transactions in the cluster may hold the horizon below
    // these events for a moment; the windows are exact once it passed them.
    while !sqlx::query_scalar::<_, bool>(
        "SELECT bool_and(transaction_id < pg_snapshot_xmin(pg_current_snapshot())) FROM events",
    )
    .fetch_one(&pool)
    .await
    .unwrap()
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut conn = pool.acquire().await.unwrap();
    let mut cursor = LogPosition::START;
    let mut windows = Vec::new();
    loop {
        // Two events per statement: the same windows as one statement reads.
        let window = Window {
            walk: 5,
            ship: 2,
            step: 2,
        };
        let batch = read_after(&mut conn, cursor, window, reads).await.unwrap();
        let Some(end) = batch.end() else { break };
        let shipped: Vec<(i64, bool)> = batch
            .events
            .iter()
            .map(|e| (e.position, e.payload != "null"))
            .collect();
        windows.push((shipped, batch.walked, batch.full));
        cursor = end;
    }
    assert_eq!(
        windows,
        vec![
            // Cut at its second shipped event (position 3): 3 walked.
            (vec![(1, true), (3, true)], 3, true),
            // Position 4, then walked to its fifth (8, read).
            (vec![(4, true), (8, true)], 5, true),
            // The tail: position 9 only moves the cursor.
            (vec![(9, false)], 1, false),
        ]
    );
}
