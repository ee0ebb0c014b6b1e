//! The HTTP server's accept loop: hyper serving the router, with the limits
//! a server facing many clients needs. A connection that does not finish
//! sending a request's headers within `header_read_timeout` is closed
//! (slow or silent clients hold no file descriptor for long); one with no
//! request in flight for `idle_timeout` — including one that never sent a
//! byte — is shut down gracefully, then closed. On shutdown, in-flight
//! requests finish (up to [`SHUTDOWN_GRACE`]) and idle connections close.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tower::ServiceExt;

/// How long a connection may take to finish closing before it is dropped.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// The server's per-connection limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// The longest a client may take to send a request's headers.
    pub header_read_timeout: Duration,
    /// The longest a connection may stay open with no request in flight.
    pub idle_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Serve `router` on `listener` until `shutdown` completes, then let
/// in-flight requests finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder.http2().timer(TokioTimer::new());
    let (stop, stopping) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        while connections.try_join_next().is_some() {}
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, or a connection reset before
                    // it was accepted: keep serving the others.
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        connections.spawn(connection(
            builder.clone(),
            TokioIo::new(stream),
            remote,
            router.clone(),
            limits,
            stopping.clone(),
        ));
    }
    drop(listener);
    let _ = stop.send(true);
    while connections.join_next().await.is_some() {}
}

/// When a connection last had a request in flight, and how many it has.
struct Activity {
    opened: Instant,
    last_millis: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    fn touch(&self) {
        let millis = self.opened.elapsed().as_millis() as u64;
        self.last_millis.store(millis, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let last = Duration::from_millis(self.last_millis.load(Ordering::Relaxed));
        Some(self.opened.elapsed().saturating_sub(last))
    }
}

async fn connection(
    builder: Builder<TokioExecutor>,
    io: TokioIo<tokio::net::TcpStream>,
    remote: SocketAddr,
    router: Router,
    limits: ConnectionLimits,
    mut stopping: watch::Receiver<bool>,
) {
    let activity = Arc::new(Activity {
        opened: Instant::now(),
        last_millis: AtomicU64::new(0),
        in_flight: AtomicUsize::new(0),
    });
    let tracked = activity.clone();
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(remote));
        let activity = tracked.clone();
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
        let response = router.clone().oneshot(request);
        async move {
            let response = response.await;
            activity.touch();
            activity.in_flight.fetch_sub(1, Ordering::Relaxed);
            response
        }
    });
    let served = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(served);
    let check_every =
        (limits.idle_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut ticks = tokio::time::interval(check_every);
    let mut closing_since: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = served.as_mut() => return,
            _ = stopping.wait_for(|stop| *stop), if closing_since.is_none() => {
                served.as_mut().graceful_shutdown();
                closing_since = Some(Instant::now());
            }
            _ = ticks.tick() => match closing_since {
                Some(since) if since.elapsed() >= SHUTDOWN_GRACE.min(limits.idle_timeout * 2) => return,
                Some(_) => {}
                None => {
                    if activity.idle_for().is_some_and(|idle| idle >= limits.idle_timeout) {
                        served.as_mut().graceful_shutdown();
                        closing_since = Some(Instant::now());
                    }
                }
            },
        }
    }
}
