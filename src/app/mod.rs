//! The running ledger: its assembly (`Application`), the command line and
//! the logs. `Application::build` binds its listener first, so callers
//! (tests, the demo) can start it on port 0 and read the real address.

pub mod cli;
pub mod telemetry;

use std::future::Future;
use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::event_log::projection_runner::ProjectionRunner;
use crate::http::{self, AppState};

pub struct Application {
    listener: TcpListener,
    state: AppState,
}

impl Application {
    pub async fn build(state: AppState, listen: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(listen).await?;
        Ok(Self { listener, state })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serve until `shutdown` completes, then finish in-flight requests.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let app = http::router(self.state).into_make_service_with_connect_info::<SocketAddr>();
        axum::serve(self.listener, app)
            .with_graceful_shutdown(shutdown)
            .await
    }
}

/// The whole ledger running inside this process on a free loopback port,
/// with its projection runner (the demo and the benchmarks use it).
pub struct LocalLedger {
    /// `http://127.0.0.1:<port>`.
    pub base_url: String,
    stop: watch::Sender<bool>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    runner: tokio::task::JoinHandle<()>,
}

impl LocalLedger {
    pub async fn start(state: AppState) -> anyhow::Result<Self> {
        let pool = state.pool.clone();
        let appended = state.usage_appended.clone();
        let app = Application::build(state, SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let base_url = format!("http://{}", app.local_addr()?);
        let (stop, stopped) = watch::channel(false);
        let mut server_stopped = stopped.clone();
        let server = tokio::spawn(app.run_until_stopped(async move {
            let _ = server_stopped.changed().await;
        }));
        let runner = tokio::spawn(
            ProjectionRunner::for_all(pool)
                .await?
                .run(stopped, appended),
        );
        Ok(Self {
            base_url,
            stop,
            server,
            runner,
        })
    }

    /// Stop serving (in-flight requests finish) and stop the runner.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.server.await;
        let _ = self.runner.await;
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
