//! Supervised background tasks: the projection runner, the period closer
//! and the sealer. Each reports every pass to its [`TaskHealth`]; a failed
//! pass is logged with its cause and retried with a doubling backoff; a task
//! that panics or ends on its own is logged and started again (after the
//! same backoff). `/ready` reads the [`TaskRegistry`]: it is never 200 while
//! a task is failing, restarting or has not completed a pass for longer than
//! it should.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The longest wait between retries of a failing task.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What `/ready` shows of one task.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TaskState {
    /// The task's name.
    pub name: &'static str,
    /// `starting`, `running`, `failing` or `restarting`.
    pub status: &'static str,
    /// When its last pass succeeded.
    pub last_success_at: Option<DateTime<Utc>>,
    /// The cause of its last failure, while it keeps failing.
    pub last_error: Option<String>,
    /// Passes failed in a row.
    pub consecutive_failures: u32,
    /// Times it was started again after a panic or an unexpected end.
    pub restarts: u32,
    /// A task without a successful pass for this long is stalled.
    #[serde(skip)]
    pub stall_after: Duration,
    #[serde(skip)]
    started_at: DateTime<Utc>,
}

impl TaskState {
    /// Whether billing can rely on it now: running, with a recent pass.
    pub fn healthy(&self, now: DateTime<Utc>) -> bool {
        let stall = chrono::Duration::from_std(self.stall_after).unwrap_or(chrono::Duration::MAX);
        let recent = now - self.last_success_at.unwrap_or(self.started_at) <= stall;
        matches!(self.status, "running" | "starting") && recent
    }
}

/// Every supervised task of the process.
#[derive(Debug, Default)]
pub struct TaskRegistry {
    tasks: Mutex<Vec<Arc<Mutex<TaskState>>>>,
}

impl TaskRegistry {
    /// A task's health handle (registered as `starting`).
    pub fn register(&self, name: &'static str, stall_after: Duration) -> TaskHealth {
        let state = Arc::new(Mutex::new(TaskState {
            name,
            status: "starting",
            last_success_at: None,
            last_error: None,
            consecutive_failures: 0,
            restarts: 0,
            stall_after,
            started_at: Utc::now(),
        }));
        lock(&self.tasks).push(state.clone());
        TaskHealth { state }
    }

    /// Every task's state now.
    pub fn snapshot(&self) -> Vec<TaskState> {
        lock(&self.tasks).iter().map(|t| lock(t).clone()).collect()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind: keep using it.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// How a task reports its passes.
#[derive(Debug, Clone)]
pub struct TaskHealth {
    state: Arc<Mutex<TaskState>>,
}

impl TaskHealth {
    /// A pass succeeded.
    pub fn succeeded(&self) {
        let mut state = lock(&self.state);
        state.status = "running";
        state.last_success_at = Some(Utc::now());
        state.last_error = None;
        state.consecutive_failures = 0;
    }

    /// A pass failed: logged with its cause.
    pub fn failed(&self, error: &dyn std::fmt::Display) {
        let mut state = lock(&self.state);
        state.status = "failing";
        state.consecutive_failures += 1;
        state.last_error = Some(error.to_string());
        tracing::error!(
            task = state.name,
            error = %error,
            consecutive_failures = state.consecutive_failures,
            "background task pass failed; retrying"
        );
    }

    fn restarting(&self, cause: &str) {
        let mut state = lock(&self.state);
        state.status = "restarting";
        state.restarts += 1;
        state.consecutive_failures += 1;
        state.last_error = Some(cause.to_string());
        tracing::error!(
            task = state.name,
            cause,
            restarts = state.restarts,
            "background task stopped unexpectedly; starting it again"
        );
    }

    /// How long to wait before the next pass: `interval` after a success;
    /// after failures, 1 s doubling per failure, up to `interval` (and at
    /// most [`MAX_BACKOFF`]).
    pub fn next_wait(&self, interval: Duration) -> Duration {
        let failures = lock(&self.state).consecutive_failures;
        if failures == 0 {
            return interval;
        }
        let backoff = Duration::from_secs(1u64 << (failures - 1).min(5));
        backoff
            .min(interval.max(Duration::from_secs(1)))
            .min(MAX_BACKOFF)
    }
}

/// Run the task `start` makes, and start it again whenever it panics or
/// ends before `shutdown` turns true.
pub fn supervise<F, Fut>(
    health: TaskHealth,
    mut shutdown: watch::Receiver<bool>,
    start: F,
) -> JoinHandle<()>
where
    F: Fn(TaskHealth) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            let outcome = tokio::spawn(start(health.clone())).await;
            if *shutdown.borrow() {
                return;
            }
            let cause = match outcome {
                Ok(()) => "the task ended on its own".to_string(),
                Err(error) if error.is_panic() => {
                    format!("panicked: {}", panic_message(error.into_panic().as_ref()))
                }
                Err(error) => error.to_string(),
            };
            health.restarting(&cause);
            tokio::select! {
                _ = tokio::time::sleep(health.next_wait(MAX_BACKOFF)) => {}
                _ = shutdown.changed() => return,
            }
        }
    })
}

/// The message a panic carried (`panic!` with a literal or a format).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn a_task_that_panics_is_started_again_and_reported() {
        let registry = TaskRegistry::default();
        let health = registry.register("flaky", Duration::from_secs(60));
        let (stop, stopped) = watch::channel(false);
        let starts = Arc::new(AtomicU32::new(0));
        let counted = starts.clone();
        let task = supervise(health, stopped, move |health| {
            let starts = counted.clone();
            async move {
                if starts.fetch_add(1, Ordering::SeqCst) == 0 {
                    panic!("first start fails");
                }
                health.succeeded();
                std::future::pending::<()>().await
            }
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while registry.snapshot()[0].status != "running" {
            assert!(tokio::time::Instant::now() < deadline, "not restarted");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let state = registry.snapshot().remove(0);
        assert_eq!(starts.load(Ordering::SeqCst), 2);
        assert_eq!(state.restarts, 1);
        assert_eq!(state.consecutive_failures, 0);
        assert!(state.healthy(Utc::now()));
        stop.send(true).unwrap();
        task.abort();
    }

    #[test]
    fn failures_back_off_doubling_up_to_the_interval() {
        let registry = TaskRegistry::default();
        let health = registry.register("closer", Duration::from_secs(60));
        assert_eq!(
            health.next_wait(Duration::from_secs(60)),
            Duration::from_secs(60)
        );
        let waits: Vec<u64> = (0..7)
            .map(|_| {
                health.failed(&"database unreachable");
                health.next_wait(Duration::from_secs(60)).as_secs()
            })
            .collect();
        assert_eq!(waits, vec![1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(
            health.next_wait(Duration::from_secs(3)),
            Duration::from_secs(3)
        );
        let state = registry.snapshot().remove(0);
        assert_eq!((state.status, state.consecutive_failures), ("failing", 7));
        assert!(!state.healthy(Utc::now()));
        health.succeeded();
        assert_eq!(
            health.next_wait(Duration::from_secs(60)),
            Duration::from_secs(60)
        );
        assert!(registry.snapshot()[0].healthy(Utc::now()));
    }

    #[test]
    fn a_task_without_a_pass_for_longer_than_it_should_is_stalled() {
        let registry = TaskRegistry::default();
        let health = registry.register("closer", Duration::from_secs(90));
        let now = Utc::now();
        assert!(registry.snapshot()[0].healthy(now), "just started");
        assert!(
            !registry.snapshot()[0].healthy(now + chrono::Duration::seconds(91)),
            "never completed a pass"
        );
        health.succeeded();
        let state = registry.snapshot().remove(0);
        let last = state.last_success_at.unwrap();
        assert!(state.healthy(last + chrono::Duration::seconds(90)));
        assert!(!state.healthy(last + chrono::Duration::seconds(91)));
    }
}
