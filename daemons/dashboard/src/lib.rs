//! `dashboard`: a live, server-rendered view of the window averages in PostgreSQL, with the
//! JSON API of the original Node.js server. Updates are pushed to the page (server-sent
//! events) as soon as window-aggregator's `NOTIFY weather_updates` arrives.

pub mod db;
pub mod render;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{
    net::TcpListener,
    sync::{Notify, mpsc, watch},
};
use tokio_util::sync::CancellationToken;
use weather_common::{
    http::{self, Body},
    reading::format_ts,
    runtime,
};

use crate::db::{Db, Snapshot};

#[derive(clap::Parser, Debug, Clone)]
#[command(version, about)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, env = "LISTEN", default_value = "127.0.0.1:3000")]
    pub listen: SocketAddr,

    /// PostgreSQL connection URL.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgresql://postgres@localhost/weather"
    )]
    pub database_url: String,

    /// How far back the page and the API reach.
    #[arg(long, env = "HISTORY", default_value = "1h", value_parser = humantime::parse_duration)]
    pub history: Duration,

    /// Window length of the aggregator; the page calls data stale after three windows.
    #[arg(long, env = "WINDOW", default_value = "5s", value_parser = humantime::parse_duration)]
    pub window: Duration,

    /// Fallback re-read of the table, for notifications missed while disconnected.
    #[arg(long, env = "POLL_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub poll_interval: Duration,

    /// The longest a read of PostgreSQL may take; then the API answers 503 and the page shows
    /// its data as stale.
    #[arg(long, env = "QUERY_TIMEOUT", default_value = "3s", value_parser = humantime::parse_duration)]
    pub query_timeout: Duration,

    /// Address of the SQL web UI on the same lakehouse (the query-server's), linked from the
    /// page; http:// or https:// only.
    #[arg(long, env = "SQL_URL", value_parser = web_url)]
    pub sql_url: Option<String>,

    #[command(flatten)]
    pub limits: http::Limits,
}

fn web_url(text: &str) -> Result<String, String> {
    match text.starts_with("http://") || text.starts_with("https://") {
        true => Ok(text.to_owned()),
        false => Err(format!("{text:?} is not an http:// or https:// URL")),
    }
}

/// The latest snapshot and the fragments pushed to pages.
struct Update {
    snapshot: Snapshot,
    fragments: Bytes,
}

impl Update {
    fn new(snapshot: Snapshot) -> Self {
        let fragments = serde_json::json!({
            "charts": render::charts(&snapshot).into_string(),
            "stats": render::stats(&snapshot).into_string(),
            "last_update_ms": render::last_update_ms(&snapshot),
        })
        .to_string()
        .into();
        Self { snapshot, fragments }
    }
}

struct App {
    db: Db,
    history: Duration,
    stale_after: Duration,
    latest: watch::Sender<Arc<Update>>,
    shutdown: CancellationToken,
    metrics: Metrics,
    sql_url: Option<String>,
}

/// Serves `listener` until `shutdown` is cancelled.
pub async fn run(args: Args, listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
    tracing::info!(listen = %listener.local_addr()?, "dashboard starting");
    let (latest, _) = watch::channel(Arc::new(Update::new(Snapshot::default())));
    let app = Arc::new(App {
        db: Db::new(&args.database_url, args.query_timeout),
        history: args.history,
        stale_after: args.window * 3,
        latest,
        shutdown: shutdown.clone(),
        metrics: Metrics::new(),
        sql_url: args.sql_url.clone(),
    });
    let changed = Arc::new(Notify::new());
    tokio::spawn(db::listen(args.database_url.clone(), shutdown.clone(), {
        let changed = changed.clone();
        move || changed.notify_one()
    }));
    tokio::spawn(refresh(app.clone(), changed, args.poll_interval));

    let handler = {
        let app = app.clone();
        move |request| {
            let app = app.clone();
            async move { app.handle(request).await }
        }
    };
    http::serve(listener, handler, shutdown, Duration::from_secs(10), &args.limits).await;
    tracing::info!("dashboard stopped");
    Ok(())
}

/// Re-reads the table on each notification (and every `poll`), publishing what changed.
/// READY=1 goes out after the first successful read.
async fn refresh(app: Arc<App>, changed: Arc<Notify>, poll: Duration) {
    let mut ready = false;
    loop {
        match app.db.snapshot(app.history, None).await {
            Ok(snapshot) => {
                if !ready {
                    ready = true;
                    runtime::notify_ready();
                    tracing::info!("database reachable, ready");
                }
                app.latest.send_if_modified(|current| {
                    let modified = current.snapshot != snapshot;
                    if modified {
                        *current = Arc::new(Update::new(snapshot));
                    }
                    modified
                });
            }
            Err(e) => tracing::warn!(error = %e, "reading the weather table failed"),
        }
        tokio::select! {
            () = changed.notified() => {
                // Let a burst of commits settle into one read.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            () = tokio::time::sleep(poll) => {}
            () = app.shutdown.cancelled() => return,
        }
    }
}

impl App {
    async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Response<Body> {
        let mut response = self.route(request).await;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            header::HeaderValue::from_static(render::content_security_policy()),
        );
        headers.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            header::HeaderValue::from_static("nosniff"),
        );
        headers.insert(header::REFERRER_POLICY, header::HeaderValue::from_static("no-referrer"));
        response
    }

    async fn route(self: &Arc<Self>, request: Request<Incoming>) -> Response<Body> {
        let path = request.uri().path();
        let label = match path {
            "/" | "/fragments" | "/events" | "/api/weather" | "/api/weather/latest" | "/health" | "/metrics" => path,
            _ => "other",
        };
        self.metrics
            .requests
            .get_or_create(&PathLabel { path: label.to_owned() })
            .inc();
        if request.method() != Method::GET {
            return http::not_routed(label == "other");
        }
        match path {
            "/" => {
                let update = self.latest.borrow().clone();
                let page = render::page(
                    &update.snapshot,
                    self.stale_after.as_millis() as u64,
                    self.sql_url.as_deref(),
                );
                http::with_type(StatusCode::OK, "text/html; charset=utf-8", page.into_string())
            }
            "/fragments" => {
                let update = self.latest.borrow().clone();
                http::with_type(StatusCode::OK, "application/json", update.fragments.clone())
            }
            "/events" => self.events(),
            "/api/weather" => self.api(None).await,
            "/api/weather/latest" => match since(request.uri().query().unwrap_or("")) {
                Ok(since) => self.api(Some(since)).await,
                Err(message) => http::error(StatusCode::BAD_REQUEST, message),
            },
            "/health" => http::health(),
            "/metrics" => http::metrics(&self.metrics.registry),
            _ => http::not_routed(true),
        }
    }

    async fn api(&self, since: Option<DateTime<Utc>>) -> Response<Body> {
        match self.db.snapshot(self.history, since).await {
            Ok(snapshot) => http::json(StatusCode::OK, &api_json(&snapshot)),
            Err(e) => {
                tracing::warn!(error = %e, "API query failed");
                let mut response = http::error(StatusCode::SERVICE_UNAVAILABLE, "database unavailable");
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, header::HeaderValue::from_static("5"));
                response
            }
        }
    }

    /// Server-sent events: the current fragments at once, then each change; a comment every
    /// 15 s keeps proxies from closing an idle stream.
    fn events(self: &Arc<Self>) -> Response<Body> {
        let (sender, receiver) = mpsc::channel::<Bytes>(8);
        let mut updates = self.latest.subscribe();
        let app = self.clone();
        tokio::spawn(async move {
            app.metrics.event_streams.inc();
            let mut next = Some(updates.borrow_and_update().clone());
            loop {
                let chunk = match next.take() {
                    Some(update) => {
                        let mut chunk = b"event: update\ndata: ".to_vec();
                        chunk.extend_from_slice(&update.fragments);
                        chunk.extend_from_slice(b"\n\n");
                        Bytes::from(chunk)
                    }
                    None => tokio::select! {
                        changed = updates.changed() => match changed {
                            Ok(()) => {
                                next = Some(updates.borrow_and_update().clone());
                                continue;
                            }
                            Err(_) => break,
                        },
                        () = tokio::time::sleep(Duration::from_secs(15)) => Bytes::from_static(b": keep-alive\n\n"),
                        () = app.shutdown.cancelled() => break,
                    },
                };
                if sender.send(chunk).await.is_err() {
                    break;
                }
            }
            app.metrics.event_streams.dec();
        });
        let mut response = Response::new(http::channel_body(receiver));
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/event-stream"),
        );
        headers.insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-cache"));
        response
    }
}

/// The seed's API shape: `{"cities":[..],"data":{"City":[{"time":..,"temperature":..}]}}`.
pub fn api_json(snapshot: &Snapshot) -> serde_json::Value {
    let data: serde_json::Map<String, serde_json::Value> = snapshot
        .cities
        .iter()
        .map(|(city, points)| {
            let points = points
                .iter()
                .map(|p| serde_json::json!({ "time": format_ts(&p.time), "temperature": p.temperature }))
                .collect();
            (city.clone(), serde_json::Value::Array(points))
        })
        .collect();
    serde_json::json!({ "cities": snapshot.cities.keys().collect::<Vec<_>>(), "data": data })
}

/// Parses `since=<ISO-8601>` from a query string.
fn since(query: &str) -> Result<DateTime<Utc>, String> {
    let mut values = form_urlencoded::parse(query.as_bytes())
        .filter(|(k, _)| k == "since")
        .map(|(_, v)| v);
    let (Some(value), None) = (values.next(), values.next()) else {
        return Err("since is required once, e.g. since=2026-11-24T03:34:15Z".into());
    };
    DateTime::parse_from_rfc3339(value.trim())
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("since must be an ISO-8601 timestamp with a zone, e.g. 2026-11-24T03:34:15Z: {e}"))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PathLabel {
    path: String,
}

struct Metrics {
    registry: Registry,
    requests: Family<PathLabel, Counter>,
    event_streams: Gauge,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("dashboard");
        let requests = Family::<PathLabel, Counter>::default();
        registry.register("http_requests", "HTTP requests by path", requests.clone());
        let event_streams = Gauge::default();
        registry.register(
            "event_streams",
            "Pages connected for live updates",
            event_streams.clone(),
        );
        Self {
            registry,
            requests,
            event_streams,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_must_be_one_timestamp_with_a_zone() {
        assert!(since("since=2026-11-24T03:34:15Z").is_ok());
        assert!(since("since=2026-11-24T03:34:15.5%2B01:00").is_ok());
        assert!(since("").is_err());
        assert!(since("since=yesterday").is_err());
        assert!(since("since=2026-11-24T03:34:15").is_err(), "no zone is ambiguous");
        assert!(since("since=2026-11-24T03:34:15Z&since=2026-11-24T03:34:16Z").is_err());
    }
}
