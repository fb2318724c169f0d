//! `query-server`: SQL on the Iceberg table over Trino's client protocol, so that the Trino
//! CLI, the `trino` Python client, JDBC and BI tools query the lakehouse without a JVM. Apache
//! DataFusion plans and runs the queries; the table is read through the same SQL catalog the
//! iceberg-sink commits to, so a query sees every committed snapshot and nothing else.
//!
//! The protocol: `POST /v1/statement` with the SQL as body starts a query and answers with its
//! first page (its rows, if they are ready at once) and a `nextUri`; each `GET` of it gives the
//! next page of rows and the next `nextUri`, until the last page has none; `DELETE` of a `nextUri` cancels. `GET /v1/info` says whether the server
//! has started, as Trino's does.
//!
//! Beside the protocol, as on Trino's port: a web UI (`/`, [`ui`]) with the recent queries
//! ([`history`]), and Trino's `/v1/query` REST view of them ([`query_info`]).

pub mod catalog;
pub mod engine;
pub mod errors;
pub mod files;
pub mod functions;
pub mod grouping;
pub mod history;
pub mod protocol;
pub mod queries;
pub mod query_info;
pub mod scan;
pub mod statements;
pub mod tables;
pub mod ui;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header::HeaderValue};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use weather_common::{
    http::{self, Body},
    lakehouse::{CatalogArgs, CatalogRows},
    runtime::{self, Backoff},
};

use crate::{
    engine::{Engine, Session},
    history::History,
    protocol::{ErrorCode, Failure},
    queries::{Limits, Page, Queries},
    tables::Tables,
};

#[derive(clap::Parser, Debug, Clone)]
#[command(version, about)]
pub struct Args {
    /// Address to listen on (Trino's port).
    #[arg(long, env = "LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// The URL clients reach this server at, for the `nextUri` of each response (default:
    /// http:// and the Host the client asked for, as Trino does).
    #[arg(long, env = "PUBLIC_URL")]
    pub public_url: Option<String>,

    #[command(flatten)]
    pub catalog: CatalogArgs,

    /// Queries running at once; more are refused with QUERY_QUEUE_FULL.
    #[arg(long, env = "MAX_QUERIES", default_value_t = 8)]
    pub max_queries: usize,

    /// The longest a query may run; then it fails with EXCEEDED_TIME_LIMIT.
    #[arg(long, env = "QUERY_TIMEOUT", default_value = "5m", value_parser = humantime::parse_duration)]
    pub query_timeout: Duration,

    /// Memory one query's joins, aggregations and sorts may hold, in bytes; beyond it the query
    /// fails with EXCEEDED_LOCAL_MEMORY_LIMIT.
    #[arg(long, env = "QUERY_MEMORY_LIMIT", default_value_t = 1 << 30)]
    pub query_memory_limit: usize,

    /// A query whose client has not fetched for this long is abandoned and stopped.
    #[arg(long, env = "CLIENT_TIMEOUT", default_value = "5m", value_parser = humantime::parse_duration)]
    pub client_timeout: Duration,

    /// Rows per page of results.
    #[arg(long, env = "PAGE_ROWS", default_value_t = 8192)]
    pub page_rows: usize,

    /// The largest SQL text accepted, in bytes.
    #[arg(long, env = "MAX_QUERY_BYTES", default_value_t = 1 << 20)]
    pub max_query_bytes: usize,

    /// A statement's body not received by then gets 408.
    #[arg(long, env = "BODY_READ_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub body_read_timeout: Duration,

    /// Threads a query's scan and operators are spread over (default: the cores).
    #[arg(long, env = "QUERY_PARALLELISM")]
    pub parallelism: Option<usize>,

    /// Queries the web UI and `/v1/query` remember, the newest; their SQL and plans are kept up
    /// to 16 KiB each.
    #[arg(long, env = "QUERY_HISTORY", default_value_t = 200)]
    pub query_history: usize,

    /// Show every client's SQL in the web UI and `/v1/query` to peers that are not on this
    /// host too (by default they see the queries but not their text). Clients are not
    /// authenticated: give this only where every peer that can reach the port may read every
    /// query.
    #[arg(long, env = "UI_REMOTE_SQL")]
    pub ui_remote_sql: bool,

    /// How long a stop waits for running queries to finish before cancelling them.
    #[arg(long, env = "DRAIN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    #[command(flatten)]
    pub limits: http::Limits,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

pub struct Metrics {
    registry: Registry,
    running: Gauge,
    queries: Family<StateLabel, Counter>,
    canceled: Counter,
    abandoned: Counter,
    duration: Histogram,
    rows: Counter,
    files_scanned: Counter,
    files_skipped: Counter,
}

impl Metrics {
    fn new() -> Self {
        let running = Gauge::default();
        let queries = Family::default();
        let duration = Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
            0.001, 4.0, 10,
        ));
        let [canceled, abandoned, rows, files_scanned, files_skipped] = std::array::from_fn(|_| Counter::default());
        let mut registry = Registry::with_prefix("query_server");
        registry.register("running_queries", "Queries started and not finished", running.clone());
        registry.register("queries", "Queries ended, by state", queries.clone());
        registry.register(
            "query_duration_seconds",
            "Time from submission to the last page",
            duration.clone(),
        );
        for (name, help, counter) in [
            ("canceled_queries", "Queries cancelled by their client", &canceled),
            (
                "abandoned_queries",
                "Queries stopped because no client fetched their results",
                &abandoned,
            ),
            ("rows_returned", "Rows sent to clients", &rows),
            ("files_scanned", "Data files read by table scans", &files_scanned),
            (
                "files_skipped",
                "Data files of the snapshot that scans skipped by partition and column bounds",
                &files_skipped,
            ),
        ] {
            registry.register(name, help, counter.clone());
        }
        Self {
            registry,
            running,
            queries,
            canceled,
            abandoned,
            duration,
            rows,
            files_scanned,
            files_skipped,
        }
    }

    fn finished(&self, state: protocol::State) {
        let state = match state {
            protocol::State::Failed => "failed",
            _ => "finished",
        };
        self.queries.get_or_create(&StateLabel { state }).inc();
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

struct App {
    queries: tokio::sync::OnceCell<Queries>,
    metrics: Arc<Metrics>,
    draining: CancellationToken,
    max_query_bytes: usize,
    body_read_timeout: Duration,
    started: std::time::Instant,
    public_url: Option<String>,
    local: SocketAddr,
    history: Arc<History>,
    ui_remote_sql: bool,
    catalog_url: String,
}

/// The table the overview describes: the one the pipeline writes.
const TABLE: [&str; 2] = ["default", "weather"];
/// Largest SQL text and plan kept per query in the history.
const HISTORY_TEXT: usize = 16 << 10;
/// Rows the SQL console shows of a result.
const CONSOLE_ROWS: usize = 1000;

/// Serves `listener` until `shutdown` is cancelled, then lets the running queries finish (up
/// to `--drain-timeout`) while refusing new ones.
pub async fn run(args: Args, listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
    let local = listener.local_addr()?;
    let config = args.catalog.config()?;
    tracing::info!(listen = %local, catalog = %config.shown_url(), "query-server starting");
    let metrics = Arc::new(Metrics::new());
    let app = Arc::new(App {
        queries: tokio::sync::OnceCell::new(),
        metrics: metrics.clone(),
        draining: shutdown.clone(),
        max_query_bytes: args.max_query_bytes,
        body_read_timeout: args.body_read_timeout,
        started: std::time::Instant::now(),
        public_url: args.public_url.as_ref().map(|u| u.trim_end_matches('/').to_owned()),
        local,
        history: Arc::new(History::new(args.query_history, HISTORY_TEXT)),
        ui_remote_sql: args.ui_remote_sql,
        catalog_url: config.shown_url(),
    });
    let serving = CancellationToken::new();
    let handler = {
        let app = app.clone();
        move |request| {
            let app = app.clone();
            async move { app.handle(request).await }
        }
    };
    let server = tokio::spawn({
        let serving = serving.clone();
        let limits = args.limits.clone();
        async move { http::serve(listener, handler, serving, Duration::from_secs(5), &limits).await }
    });

    // Until the catalog answers, /v1/info says "starting" and statements are refused, as
    // Trino does while it starts.
    let mut backoff = Backoff::default();
    let catalog = loop {
        match config.connect().await {
            Ok(catalog) => break Some(catalog),
            Err(e) => {
                tracing::warn!(error = %e, "cannot reach the Iceberg catalog yet");
                if !backoff.wait(&shutdown).await {
                    break None;
                }
            }
        }
    };
    if let Some(catalog) = catalog {
        let rows = CatalogRows::connect(&config.url, &config.name, args.max_queries.clamp(1, 16) as u32)?;
        let engine = Arc::new(Engine {
            tables: Arc::new(Tables::new(catalog.clone(), rows)),
            catalog,
            memory_limit: args.query_memory_limit,
            target_partitions: args
                .parallelism
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
            metrics: metrics.clone(),
        });
        let limits = Limits {
            max_queries: args.max_queries,
            query_timeout: args.query_timeout,
            client_timeout: args.client_timeout,
            page_rows: args.page_rows.max(1),
            max_wait: Duration::from_secs(1),
        };
        let _ = app
            .queries
            .set(Queries::new(engine, limits, metrics, app.history.clone()));
        runtime::notify_ready();
        tracing::info!("catalog reachable, ready");
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if let Some(queries) = app.queries.get() {
                        queries.purge_abandoned();
                    }
                }
                () = shutdown.cancelled() => break,
            }
        }
    }

    if let Some(queries) = app.queries.get() {
        let deadline = tokio::time::Instant::now() + args.drain_timeout;
        while queries.count() > 0 && tokio::time::Instant::now() < deadline {
            queries.purge_abandoned();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if queries.count() > 0 {
            tracing::warn!(
                queries = queries.count(),
                "drain timed out, cancelling the running queries"
            );
            queries.cancel_all();
        }
    }
    serving.cancel();
    server.await?;
    tracing::info!("query-server stopped");
    Ok(())
}

impl App {
    async fn handle(&self, request: Request<Incoming>) -> Response<Body> {
        let path = request.uri().path().to_owned();
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match (request.method(), segments.as_slice()) {
            (&Method::POST, ["v1", "statement"]) => self.submit(request).await,
            (&Method::GET, ["v1", "statement", "executing", id, slug, token]) => {
                let Some(queries) = self.queries.get() else {
                    return http::error(StatusCode::SERVICE_UNAVAILABLE, "starting");
                };
                match token.parse() {
                    Ok(token) => match queries.fetch(id, slug, token).await {
                        Some(page) => respond(&page),
                        None => http::error(StatusCode::NOT_FOUND, format!("no query {id} with page {token}")),
                    },
                    Err(_) => http::error(StatusCode::NOT_FOUND, "bad page token"),
                }
            }
            (&Method::DELETE, ["v1", "statement", "executing", id, slug, _token]) => {
                match self.queries.get().is_some_and(|q| q.cancel(id, slug)) {
                    true => http::with_type(StatusCode::NO_CONTENT, "application/json", Bytes::new()),
                    false => http::error(StatusCode::NOT_FOUND, format!("no query {id}")),
                }
            }
            (&Method::GET, ["v1", "info"]) => http::json(
                StatusCode::OK,
                &serde_json::json!({
                    "nodeVersion": { "version": concat!("query-server-", env!("CARGO_PKG_VERSION")) },
                    "environment": "weather-pipeline",
                    "coordinator": true,
                    "starting": self.queries.get().is_none(),
                    "uptime": humantime::format_duration(Duration::from_secs(self.started.elapsed().as_secs())).to_string(),
                }),
            ),
            (&Method::GET, ["health"]) => match self.queries.get() {
                Some(_) => http::health(),
                None => http::error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the Iceberg catalog is not reachable yet",
                ),
            },
            (&Method::GET, ["metrics"]) => http::metrics(&self.metrics.registry),
            (&Method::GET, ["v1", "query"]) => {
                let (base, show) = (self.base_url(&request), self.show_sql(&request));
                let list: Vec<_> = self
                    .history
                    .list()
                    .iter()
                    .map(|r| query_info::basic(r, &base, show))
                    .collect();
                http::json(StatusCode::OK, &list)
            }
            (&Method::GET, ["v1", "query", id]) => match self.history.get(id) {
                Some(r) => http::json(
                    StatusCode::OK,
                    &query_info::full(&r, &self.base_url(&request), self.show_sql(&request)),
                ),
                None => http::error(StatusCode::NOT_FOUND, format!("no query {id} in the history")),
            },
            (&Method::GET, [""] | ["ui"] | ["ui", ""]) => self.overview(&request).await,
            (&Method::GET, ["ui", "queries"]) => ui_page(
                StatusCode::OK,
                ui::queries(&self.history.list(), self.show_sql(&request)),
            ),
            (&Method::GET, ["ui", "query", id]) => match self.history.get(id) {
                Some(r) => ui_page(StatusCode::OK, ui::query(&r, self.show_sql(&request))),
                None => http::error(StatusCode::NOT_FOUND, format!("no query {id} in the history")),
            },
            // Trino's own address of a query's page, which each response's infoUri names.
            (&Method::GET, ["ui", "query.html"]) => {
                let id = request.uri().query().unwrap_or_default();
                let mut response = http::with_type(StatusCode::SEE_OTHER, "text/plain", Bytes::new());
                if let Ok(location) = HeaderValue::from_str(&format!("/ui/query/{id}")) {
                    response.headers_mut().insert(hyper::header::LOCATION, location);
                }
                response
            }
            (&Method::GET, ["ui", "console"]) => ui_page(StatusCode::OK, ui::console("", None)),
            (&Method::POST, ["ui", "console"]) => self.console(request).await,
            (&Method::GET, ["ui", "app.js"]) => ui_asset("text/javascript; charset=utf-8", ui::SCRIPT),
            (&Method::GET, ["ui", "style.css"]) => ui_asset("text/css; charset=utf-8", ui::STYLE),
            (
                _,
                ["v1", "statement", ..] | ["v1", "info"] | ["v1", "query", ..] | ["health"] | ["metrics"] | ["ui", ..],
            ) => http::not_routed(false),
            _ => http::not_routed(true),
        }
    }

    async fn submit(&self, request: Request<Incoming>) -> Response<Body> {
        let header = |name: &str| {
            request
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
        };
        let Some(user) = header("x-trino-user") else {
            return http::error(StatusCode::BAD_REQUEST, "the X-Trino-User header is required");
        };
        let session = Session {
            user,
            catalog: header("x-trino-catalog"),
            schema: header("x-trino-schema"),
        };
        let source = header("x-trino-source");
        let base_url = self.base_url(&request);
        let body = Limited::new(request.into_body(), self.max_query_bytes).collect();
        let body = match tokio::time::timeout(self.body_read_timeout, body).await {
            Ok(Ok(body)) => body.to_bytes(),
            Ok(Err(e)) => {
                return http::error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("query text over {} bytes or unreadable: {e}", self.max_query_bytes),
                );
            }
            Err(_) => return http::error(StatusCode::REQUEST_TIMEOUT, "the query text did not arrive in time"),
        };
        let Ok(sql) = String::from_utf8(body.to_vec()) else {
            return http::error(StatusCode::BAD_REQUEST, "the query text is not UTF-8");
        };
        let Some(queries) = self.queries.get() else {
            return refuse(
                &base_url,
                Failure::new(
                    ErrorCode::ServerStartingUp,
                    "the server is starting: the Iceberg catalog is not reachable yet",
                ),
            );
        };
        if self.draining.is_cancelled() {
            return refuse(
                &base_url,
                Failure::new(ErrorCode::ServerShuttingDown, "the server is shutting down"),
            );
        }
        tracing::debug!(source = source.as_deref().unwrap_or("-"), "statement received");
        respond(&queries.submit(sql, session, source, base_url).await)
    }

    /// Where the client reached this server: `--public-url`, else http:// and the Host it asked
    /// for, as Trino does.
    fn base_url<B>(&self, request: &Request<B>) -> String {
        self.public_url.clone().unwrap_or_else(|| {
            let host = request
                .headers()
                .get("host")
                .and_then(|v| v.to_str().ok())
                .filter(|h| h.parse::<hyper::http::uri::Authority>().is_ok())
                .map(str::to_owned);
            format!("http://{}", host.unwrap_or_else(|| self.local.to_string()))
        })
    }

    /// Whether the asker may read other clients' SQL: a peer on this host, or any peer when
    /// the operator said so (`--ui-remote-sql`).
    fn show_sql<B>(&self, request: &Request<B>) -> bool {
        self.ui_remote_sql
            || request
                .extensions()
                .get::<http::Peer>()
                .is_some_and(|peer| peer.0.ip().is_loopback())
    }

    async fn overview<B>(&self, request: &Request<B>) -> Response<Body> {
        let table = match self.queries.get() {
            Some(queries) => catalog::summary(queries.engine().catalog.as_ref(), &TABLE)
                .await
                .map_err(|e| e.to_string()),
            None => Err("the Iceberg catalog is not reachable yet".to_owned()),
        };
        let records = self.history.list();
        let overview = ui::Overview {
            version: concat!("query-server ", env!("CARGO_PKG_VERSION")),
            uptime: self.started.elapsed(),
            catalog: &self.catalog_url,
            table,
            records: &records,
            show_sql: self.show_sql(request),
        };
        ui_page(StatusCode::OK, ui::overview(&overview))
    }

    /// The console's Run: the form's `sql`, run as any client's statement, its first rows shown.
    async fn console(&self, request: Request<Incoming>) -> Response<Body> {
        let body = Limited::new(request.into_body(), self.max_query_bytes.saturating_mul(3)).collect();
        let body = match tokio::time::timeout(self.body_read_timeout, body).await {
            Ok(Ok(body)) => body.to_bytes(),
            Ok(Err(_)) => return http::error(StatusCode::PAYLOAD_TOO_LARGE, "the SQL text is too large"),
            Err(_) => return http::error(StatusCode::REQUEST_TIMEOUT, "the SQL text did not arrive in time"),
        };
        let sql = form_urlencoded::parse(&body)
            .find(|(name, _)| name == "sql")
            .map(|(_, sql)| sql.into_owned())
            .unwrap_or_default();
        let Some(queries) = self.queries.get().filter(|_| !self.draining.is_cancelled()) else {
            return http::error(StatusCode::SERVICE_UNAVAILABLE, "the server is starting or stopping");
        };
        let session = Session {
            user: "console".to_owned(),
            catalog: None,
            schema: None,
        };
        let started = std::time::Instant::now();
        let collected = queries.collect(sql.clone(), session, CONSOLE_ROWS).await;
        let ran = ui::Ran {
            id: collected.id,
            columns: collected
                .columns
                .iter()
                .map(|c| (c.name.clone(), c.type_name.clone()))
                .collect(),
            rows: collected
                .rows
                .iter()
                .map(|row| row.iter().map(shown_value).collect())
                .collect(),
            total_rows: collected.total_rows,
            elapsed: started.elapsed(),
            failure: collected.failure,
        };
        ui_page(StatusCode::OK, ui::console(&sql, Some(&ran)))
    }
}

/// A UI page, under the UI's Content-Security-Policy.
fn ui_page(status: StatusCode, markup: maud::Markup) -> Response<Body> {
    ui_headers(http::with_type(
        status,
        "text/html; charset=utf-8",
        markup.into_string(),
    ))
}

fn ui_asset(content_type: &'static str, text: &'static str) -> Response<Body> {
    ui_headers(http::with_type(StatusCode::OK, content_type, text))
}

fn ui_headers(mut response: Response<Body>) -> Response<Body> {
    let headers = response.headers_mut();
    for (name, value) in [
        (hyper::header::CONTENT_SECURITY_POLICY, ui::CONTENT_SECURITY_POLICY),
        (hyper::header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (hyper::header::REFERRER_POLICY, "no-referrer"),
        (hyper::header::CACHE_CONTROL, "no-store"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

/// A value of a result as the console shows it.
fn shown_value(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::Null => "NULL".to_owned(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A query refused before it started: a failed `QueryResults`, as Trino sends it.
fn refuse(base_url: &str, failure: Failure) -> Response<Body> {
    let id = format!("refused_{}", uuid::Uuid::new_v4().simple());
    respond(&queries::failed_page(&id, base_url, &failure))
}

fn respond(page: &Page) -> Response<Body> {
    let mut response = http::json(StatusCode::OK, page.results.as_ref());
    let headers = response.headers_mut();
    for (name, value) in [
        ("x-trino-set-catalog", &page.session.set_catalog),
        ("x-trino-set-schema", &page.session.set_schema),
    ] {
        if let Some(value) = value
            && let Ok(value) = HeaderValue::from_str(value)
        {
            headers.insert(name, value);
        }
    }
    response
}
