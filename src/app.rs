//! Wiring: validated config → built components → running server and dispatchers.

use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::config::{Storage, ValidConfig};
use crate::deliver::{Dispatcher, Wakers};
use crate::ingest::IngestLimits;
use crate::journal::{Journal, PgOptions, PostgresJournal, SqliteJournal};
use crate::normalise::VendorRegistry;
use crate::route::Router as EventRouter;

/// Shared by every request handler.
pub struct AppState {
    pub journal: Arc<dyn Journal>,
    pub vendors: VendorRegistry,
    pub router: EventRouter,
    pub wakers: Wakers,
    pub ingest: IngestLimits,
    /// Configured destination names, so admin views list idle ones too.
    pub destinations: Vec<String>,
    /// Metric instruments and the `/metrics` exporter.
    pub telemetry: Arc<crate::telemetry::Telemetry>,
    /// Token validation for `[auth]`; `None` = open API (loopback only).
    pub auth: Option<Arc<crate::auth::Authenticator>>,
    /// Escalation and deactivation settings and metrics (`alarm`).
    pub alarm: Arc<crate::alarm::AlarmState>,
}

pub fn http_router(state: Arc<AppState>) -> Router {
    crate::ingest::router()
        .merge(crate::admin::router())
        .merge(crate::alarm::admin::router())
        .merge(crate::telemetry::router())
        .merge(crate::fhir::router())
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            crate::auth::require,
        ))
        .with_state(state)
}

/// Builds everything from config and serves until SIGINT/SIGTERM.
pub async fn serve(config: ValidConfig, vendors: VendorRegistry) -> anyhow::Result<()> {
    let journal = open_journal(&config).await?;
    let telemetry = Arc::new(
        crate::telemetry::Telemetry::prometheus_and_otlp(&config.ops)
            .context("building the metrics exporter")?,
    );
    let wakers = Wakers::new(config.destinations.iter().map(|d| d.name.clone()));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut dispatchers = Vec::new();
    for dest in &config.destinations {
        let d = Dispatcher::new(dest.clone(), Arc::clone(&journal), &wakers)
            .with_context(|| format!("building HTTP client for destination {}", dest.name))?
            .with_telemetry(Arc::clone(&telemetry));
        dispatchers.push(tokio::spawn(d.run(stop_rx.clone(), config.shutdown_grace)));
    }
    let snapshot = tokio::spawn(Arc::clone(&telemetry.snapshot).run(
        Arc::clone(&journal),
        config.destinations.iter().map(|d| d.name.clone()).collect(),
        stop_rx.clone(),
    ));
    let auth = match config.auth.clone() {
        Some(a) => Some(Arc::new(crate::auth::Authenticator::build(a).await?)),
        None => {
            tracing::warn!("admin/API open without authentication");
            None
        }
    };
    let dest_names: Vec<String> = config.destinations.iter().map(|d| d.name.clone()).collect();
    let alarm = Arc::new(crate::alarm::AlarmState {
        config: config.alarm.clone(),
        metrics: crate::alarm::metrics::AlarmMetrics::new(&telemetry.meter(), &dest_names),
        active: Default::default(),
    });
    let watcher = crate::alarm::Watcher::new(
        &config,
        Arc::clone(&journal),
        wakers.clone(),
        Arc::clone(&alarm),
    )
    .context("building the escalation HTTP client")?;
    let watcher = tokio::spawn(watcher.run(stop_rx.clone()));
    let notifier = tokio::spawn(crate::fhir::notify::run(
        Arc::clone(&journal),
        Arc::clone(&telemetry),
        stop_rx.clone(),
    ));
    let retention = tokio::spawn(crate::journal::retention::run(
        Arc::clone(&journal),
        config.ops.retention,
        config.ops.retention_interval,
        stop_rx.clone(),
    ));
    let state = Arc::new(AppState {
        auth,
        alarm,
        telemetry: Arc::clone(&telemetry),
        journal,
        vendors,
        router: EventRouter::new(config.routes.clone()),
        wakers,
        destinations: config.destinations.iter().map(|d| d.name.clone()).collect(),
        ingest: IngestLimits {
            max_body_bytes: config.max_body_bytes,
            retry_after_s: config.retry_after_s,
            request_timeout: config.request_timeout,
            max_json_depth: config.max_json_depth,
            in_flight: Semaphore::new(config.max_in_flight),
            max_xml_depth: config.max_xml_depth,
            per_vendor: crate::ingest::limits::build(
                &config.vendor_limits,
                std::time::Instant::now(),
            ),
        },
    });
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr()?;
    let tls = match &config.tls {
        Some(t) => Some(crate::ingest::tls::TlsListeners::bind(t).await?),
        None => {
            tracing::warn!(
                %addr,
                "listening on plain HTTP (no TLS): for local development only; vendors should reach knutepunkt through TLS"
            );
            None
        }
    };
    tracing::info!(
        vendors = ?state.vendors.names(),
        destinations = config.destinations.len(),
        routes = config.routes.len(),
        storage = storage_label(&config.storage),
        worker_threads = tokio::runtime::Handle::current().metrics().num_workers(),
        "knutepunkt ready"
    );
    // The port line is machine-readable: tests and scripts that bind port 0 read it.
    println!("knutepunkt listening on {addr}");
    match tls {
        Some(tls) => {
            if let Some(v) = tls.vendor_addr() {
                println!("knutepunkt vendor port listening on {v}");
            }
            tls.serve(listener, state, shutdown_signal(), config.shutdown_grace)
                .await?
        }
        None => axum::serve(listener, http_router(state))
            .with_graceful_shutdown(shutdown_signal())
            .await
            .context("HTTP server")?,
    }
    tracing::info!("draining deliveries");
    let _ = stop_tx.send(true);
    for d in dispatchers {
        let _ = d.await;
    }
    let _ = snapshot.await;
    let _ = watcher.await;
    let _ = notifier.await;
    let _ = retention.await;
    telemetry.shutdown();
    Ok(())
}

async fn open_journal(config: &ValidConfig) -> anyhow::Result<Arc<dyn Journal>> {
    Ok(match &config.storage {
        Storage::Sqlite { data_dir } => Arc::new(
            SqliteJournal::open(data_dir, config.max_batch, config.queue_capacity)
                .with_context(|| format!("opening journal in {}", data_dir.display()))?,
        ),
        Storage::Postgres {
            url,
            tls_ca_file,
            pool_size,
            writers,
            lease,
        } => {
            let opts = PgOptions {
                pool_size: *pool_size,
                lease: *lease,
                max_batch: config.max_batch,
                queue_capacity: config.queue_capacity,
                writers: *writers,
            };
            let url = url.resolve().map_err(anyhow::Error::msg)?;
            Arc::new(
                PostgresJournal::open_with(&url, tls_ca_file.as_deref(), opts)
                    .await
                    .context("opening the PostgreSQL journal")?,
            )
        }
    })
}

/// Where the journal lives, for the start-up log line (never the connection string: it may
/// hold a password).
fn storage_label(s: &Storage) -> String {
    match s {
        Storage::Sqlite { data_dir } => format!("sqlite:{}", data_dir.display()),
        Storage::Postgres { .. } => "postgres".to_string(),
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutdown requested");
}
