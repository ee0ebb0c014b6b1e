//! The running ledger: its assembly (`Application`), the command line and
//! the logs. `Application::build` binds its listener first, so callers
//! (tests, the demo) can start it on port 0 and read the real address.

pub mod cli;
pub mod metrics;
pub mod server;
pub mod supervisor;
pub mod telemetry;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use aggregates::usage::UsageLimits;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::app::supervisor::supervise;
use crate::event_log::projection_runner::ProjectionRunner;
use crate::event_log::tamper::run_sealer;
use crate::http::admin::AdminKey;
use crate::http::{self, AppState};
use crate::invoicing::closer::PeriodCloser;
use crate::webhooks::dispatcher::Dispatcher;

/// Which background tasks run beside the HTTP server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackgroundTasks {
    /// The projection runner (keeps every read model up to date).
    pub projections: bool,
    /// The period closer (drafts and finalizes due invoices).
    pub closer: bool,
    /// The sealer (seals the log every `seal_interval`).
    pub sealer: bool,
    /// The webhook dispatcher (delivers the outbox).
    pub webhooks: bool,
}

impl BackgroundTasks {
    /// Everything `ledger serve` runs.
    pub const ALL: Self = Self {
        projections: true,
        closer: true,
        sealer: true,
        webhooks: true,
    };
    /// The HTTP server alone: the caller drives the projections and the
    /// closer itself (the tests, so that nothing races them).
    pub const NONE: Self = Self {
        projections: false,
        closer: false,
        sealer: false,
        webhooks: false,
    };
    /// The server and the projection runner (the demo and the benchmarks,
    /// which close periods themselves).
    pub const PROJECTIONS: Self = Self {
        projections: true,
        closer: false,
        sealer: false,
        webhooks: false,
    };
}

/// How the ledger runs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// HTTP listen address (port 0: any free port).
    pub listen: SocketAddr,
    /// The operator key for `/admin/v1` (`None`: the admin API refuses all).
    pub admin_key: Option<AdminKey>,
    /// Which usage timestamps are accepted.
    pub usage_limits: UsageLimits,
    /// Usage append statements in flight at once.
    pub usage_appenders: usize,
    /// How often the period closer runs.
    pub close_interval: Duration,
    /// How often the log is sealed.
    pub seal_interval: Duration,
    /// Which background tasks run.
    pub background: BackgroundTasks,
    /// Header-read and idle timeouts of client connections.
    pub connections: server::ConnectionLimits,
    /// Stripe's webhook secrets and where webhooks may go.
    pub providers: http::Providers,
    /// How often the webhook dispatcher looks for due messages when idle.
    pub dispatch_interval: Duration,
    /// A second listen address serving `/metrics` alone, without a key.
    pub metrics_listen: Option<SocketAddr>,
}

impl Settings {
    /// Defaults for a ledger on a free loopback port with the given tasks.
    pub fn local(admin_key: Option<AdminKey>, background: BackgroundTasks) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_key,
            usage_limits: UsageLimits::default(),
            usage_appenders: crate::usage::default_appenders(),
            close_interval: Duration::from_secs(60),
            seal_interval: Duration::from_secs(60),
            background,
            connections: server::ConnectionLimits::default(),
            providers: http::Providers::default(),
            dispatch_interval: Duration::from_millis(100),
            metrics_listen: None,
        }
    }
}

/// The whole ledger, assembled once: what `ledger serve`, the demo, the
/// benchmarks and the tests run.
pub struct Application {
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    state: AppState,
    settings: Settings,
}

impl Application {
    /// Bind the listener and assemble the state (nothing runs yet).
    pub async fn build(pool: PgPool, settings: Settings) -> anyhow::Result<Self> {
        use anyhow::Context;
        let state = AppState::new(
            pool,
            settings.admin_key.clone(),
            settings.usage_limits,
            settings.usage_appenders,
            settings.providers.clone(),
        )
        .await
        .context("cannot register the projections")?;
        let listener = TcpListener::bind(settings.listen)
            .await
            .with_context(|| format!("cannot listen on {}", settings.listen))?;
        let metrics_listener = match settings.metrics_listen {
            Some(address) => Some(
                TcpListener::bind(address)
                    .await
                    .with_context(|| format!("cannot listen on {address} for metrics"))?,
            ),
            None => None,
        };
        Ok(Self {
            listener,
            metrics_listener,
            state,
            settings,
        })
    }

    /// The address the metrics listener is bound to, if there is one.
    pub fn metrics_addr(&self) -> Option<std::io::Result<SocketAddr>> {
        self.metrics_listener.as_ref().map(|l| l.local_addr())
    }

    /// The address the listener is bound to (the real port when asked for 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Start the background tasks chosen in the settings and serve until
    /// `shutdown` completes; then finish in-flight requests and stop the
    /// tasks.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Self {
            listener,
            metrics_listener,
            state,
            settings,
        } = self;
        let pool = state.pool.clone();
        let (stop_tasks, tasks_stopped) = watch::channel(false);
        let mut tasks = Vec::new();
        // A task is stalled when it has not completed a pass for this long.
        let stall = |interval: Duration| interval * 3 + Duration::from_secs(30);
        if settings.background.projections {
            let health = state
                .tasks
                .register("projections", stall(Duration::from_secs(1)));
            let (pool, stopped, appended) = (
                pool.clone(),
                tasks_stopped.clone(),
                state.usage_appended.clone(),
            );
            tasks.push(supervise(health, tasks_stopped.clone(), move |health| {
                let (pool, stopped, appended) = (pool.clone(), stopped.clone(), appended.clone());
                async move {
                    match ProjectionRunner::for_all(pool).await {
                        Ok(runner) => runner.run(stopped, appended, health).await,
                        Err(error) => health.failed(&error),
                    }
                }
            }));
        }
        if settings.background.closer {
            let health = state
                .tasks
                .register("closer", stall(settings.close_interval));
            let (pool, stopped) = (pool.clone(), tasks_stopped.clone());
            let (acceptance_window, interval) = (
                settings.usage_limits.acceptance_window,
                settings.close_interval,
            );
            tasks.push(supervise(health, tasks_stopped.clone(), move |health| {
                let (pool, stopped) = (pool.clone(), stopped.clone());
                async move {
                    match ProjectionRunner::for_all(pool.clone()).await {
                        Ok(runner) => {
                            let closer = PeriodCloser {
                                pool,
                                runner,
                                acceptance_window,
                                interval,
                            };
                            closer.run(stopped, health).await
                        }
                        Err(error) => health.failed(&error),
                    }
                }
            }));
        }
        if settings.background.sealer {
            let health = state
                .tasks
                .register("sealer", stall(settings.seal_interval));
            let (pool, stopped, interval) =
                (pool.clone(), tasks_stopped.clone(), settings.seal_interval);
            tasks.push(supervise(health, tasks_stopped.clone(), move |health| {
                run_sealer(pool.clone(), interval, stopped.clone(), health)
            }));
        }
        if settings.background.webhooks {
            let health = state
                .tasks
                .register("webhooks", stall(settings.dispatch_interval));
            let (pool, stopped, policy, idle) = (
                pool.clone(),
                tasks_stopped.clone(),
                settings.providers.webhook_addresses.clone(),
                settings.dispatch_interval,
            );
            tasks.push(supervise(health, tasks_stopped.clone(), move |health| {
                let dispatcher = Dispatcher::new(pool.clone(), policy.clone());
                dispatcher.run(stopped.clone(), health, idle)
            }));
        }
        if let Some(listener) = metrics_listener {
            let mut stopped = tasks_stopped.clone();
            let router = metrics::router(pool.clone());
            let connections = settings.connections;
            tasks.push(tokio::spawn(async move {
                server::serve(listener, router, connections, async move {
                    let _ = stopped.changed().await;
                })
                .await
            }));
        }
        server::serve(
            listener,
            http::router(state),
            settings.connections,
            shutdown,
        )
        .await;
        let _ = stop_tasks.send(true);
        for task in tasks {
            let _ = task.await;
        }
        Ok(())
    }

    /// Run in the background of this process (the demo, the benchmarks and
    /// the tests): the returned handle knows the address and stops it.
    pub fn spawn(self) -> std::io::Result<RunningLedger> {
        let base_url = format!("http://{}", self.local_addr()?);
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(self.run_until_stopped(async move {
            let _ = stopped.changed().await;
        }));
        Ok(RunningLedger {
            base_url,
            stop,
            task,
        })
    }
}

/// A ledger running inside this process.
pub struct RunningLedger {
    /// `http://127.0.0.1:<port>`.
    pub base_url: String,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl RunningLedger {
    /// Stop serving (in-flight requests finish) and stop its tasks.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Completes on Ctrl-C or SIGTERM. The handlers are installed by the call
/// itself, not when the future is first polled: a signal that arrives in
/// between is caught, never the default action (which kills the process).
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let interrupt = signal(SignalKind::interrupt());
    let terminate = signal(SignalKind::terminate());
    async move {
        let wait = |installed: std::io::Result<tokio::signal::unix::Signal>| async move {
            match installed {
                Ok(mut signal) => {
                    signal.recv().await;
                }
                Err(_) => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = wait(interrupt) => {}
            _ = wait(terminate) => {}
        }
        tracing::info!("shutdown signal received; finishing in-flight requests");
    }
}
