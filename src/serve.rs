//! `rbdfence serve`: config → Ceph link, engine, metrics → HTTP API, until SIGINT/SIGTERM.

use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::fence::link::CephLink;
use crate::metrics::Metrics;
use crate::service::Service;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Ledger(#[from] crate::fence::ledger::LedgerError),
    #[error("api.token_file {path}: {why}")]
    Token { path: String, why: String },
    #[error("api.listen {addr}: cannot listen: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("http server failed: {0}")]
    Http(std::io::Error),
}

fn read_token(cfg: &Config) -> Result<Option<String>, ServeError> {
    let Some(path) = &cfg.api.token_file else {
        return Ok(None);
    };
    let err = |why: String| ServeError::Token {
        path: path.display().to_string(),
        why,
    };
    let token = std::fs::read_to_string(path)
        .map_err(|e| err(e.to_string()))?
        .trim()
        .to_string();
    if token.len() < 16 || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(err(
            "the token must be at least 16 printable characters".into()
        ));
    }
    Ok(Some(token))
}

/// Builds the service (connecting to Ceph; a failed connection is retried in the
/// background) without serving: for `serve` and for tests.
pub async fn build(cfg: Config) -> Result<Arc<Service>, ServeError> {
    let token = read_token(&cfg)?;
    let metrics = Arc::new(
        Metrics::new().with_blocklist_expire(Duration::from_secs(cfg.fence.blocklist_expire_secs)),
    );
    let m = metrics.clone();
    let call_observer: crate::rbd::client::CallObserver =
        Arc::new(move |op, event| m.ceph_call_event(op, event));
    let m = metrics.clone();
    let on_health: Arc<dyn Fn(bool) + Send + Sync> = Arc::new(move |up| m.set_ceph_connected(up));
    let link = CephLink::connect(cfg.connect_options(), Some(call_observer), Some(on_health)).await;
    metrics.set_ceph_connected(link.is_healthy());
    let m = metrics.clone();
    let ssh_observer: crate::fence::driver::SessionObserver = Arc::new(move |r| m.ssh_session(r));
    let engine =
        crate::app::engine(&cfg, link.clone(), Some(ssh_observer))?.with_observer(metrics.clone());
    Ok(Service::new(engine, link, metrics, cfg, token))
}

/// Serves until SIGINT or SIGTERM; then stops accepting, lets fences in flight finish and be
/// recorded (bounded by the fence deadline), and returns.
pub async fn run(cfg: Config) -> Result<(), ServeError> {
    let listen = cfg.api.listen;
    let health_every = Duration::from_secs(cfg.ceph.health_interval_secs);
    let drain_within = Duration::from_secs(cfg.fence.deadline_secs + 5);
    let lifecycle_every = Duration::from_secs(cfg.fence.lifecycle_interval_secs);
    let svc = build(cfg).await?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| ServeError::Listen {
            addr: listen,
            source,
        })?;
    let listen = listener.local_addr().unwrap_or(listen);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let maintenance = tokio::spawn(svc.link.clone().maintain(health_every, stop_rx.clone()));
    let lifecycle = tokio::spawn(lifecycle(svc.clone(), lifecycle_every, stop_rx));
    tracing::info!(%listen, ceph_connected = svc.link.is_healthy(), hosts = svc.engine.inventory.len(), "rbdfence serving");
    let app = crate::api::router(svc.clone());
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .map_err(ServeError::Http)?;
    tracing::info!(
        in_flight = svc.in_flight(),
        "shutting down: finishing fences in flight"
    );
    if !svc.drain(drain_within).await {
        tracing::error!("fences still running after the drain bound; exiting anyway");
    }
    let _ = stop_tx.send(true);
    let _ = maintenance.await;
    let _ = lifecycle.await;
    Ok(())
}

/// The fence lifecycle: every `every`, the instance holding the lifecycle lease (taken for
/// three periods, at least 10 s, and renewed each period; a dead leader's runs out that soon)
/// runs one round; every instance refreshes its gauges from the ledger.
async fn lifecycle(
    svc: Arc<Service>,
    every: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let lease = (every * 3).max(Duration::from_secs(10));
    loop {
        let leader = svc.lifecycle_leader(lease).await;
        svc.metrics.set_lifecycle_leader(leader);
        let round = if leader {
            svc.lifecycle_tick().await
        } else {
            svc.refresh_gauges().await.map(|_| ())
        };
        if let Err(e) = round {
            tracing::warn!(error = %e, "lifecycle: cannot read the ledger");
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
