//! `logging-server`: accepts weather readings over HTTP, validates them, produces them to the
//! Kafka topic `weather` (key = city) and answers 200 only once the broker acknowledged them.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use http_body_util::{BodyExt, Limited};
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};
use rdkafka::{
    error::{KafkaError, RDKafkaErrorCode},
    producer::{
        FutureProducer, FutureRecord, Producer,
        future_producer::{Delivery, DeliveryFuture, OwnedDeliveryResult},
    },
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use weather_common::{
    WeatherReading,
    http::{self, Body},
    kafka::{KafkaArgs, WEATHER_TOPIC, topic_available},
    runtime,
};

#[derive(clap::Parser, Debug, Clone)]
#[command(version, about)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, env = "LISTEN", default_value = "127.0.0.1:9998")]
    pub listen: SocketAddr,

    #[command(flatten)]
    pub kafka: KafkaArgs,

    /// Topic readings are produced to.
    #[arg(long, env = "KAFKA_TOPIC", default_value = WEATHER_TOPIC)]
    pub topic: String,

    /// How long the broker may take to acknowledge a reading before the request gets 503.
    #[arg(long, env = "PRODUCE_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub produce_timeout: Duration,

    /// Most readings one `POST /logs` may carry; more get 413 before any is produced.
    #[arg(long, env = "MAX_BATCH_READINGS", default_value_t = 10_000)]
    pub max_batch_readings: usize,

    /// How long a reading that arrives while other requests are producing waits for more to
    /// share its produce request with. A request alone never waits; 0 turns batching off.
    #[arg(long, env = "BATCH_LINGER", default_value = "1ms", value_parser = humantime::parse_duration)]
    pub batch_linger: Duration,

    /// Largest accepted request body (POST /log, POST /logs), in bytes.
    #[arg(long, env = "MAX_BODY_BYTES", default_value_t = 16 << 20)]
    pub max_body_bytes: usize,

    /// Largest single reading: a `POST /log` body, or one line of `POST /logs`, in bytes.
    /// `POST /logs` is read line by line, so a request holds at most one line of this size
    /// plus the readings parsed so far (at most `--max-batch-readings`).
    #[arg(long, env = "MAX_READING_BYTES", default_value_t = 64 << 10)]
    pub max_reading_bytes: usize,

    /// How long requests in flight at shutdown may take to finish.
    #[arg(long, env = "DRAIN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    /// Time a client has to send a request body (POST /log, POST /logs); then 408.
    #[arg(long, env = "BODY_READ_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub body_read_timeout: Duration,

    #[command(flatten)]
    pub limits: http::Limits,
}

impl Args {
    /// Defaults with the given brokers, for embedding and tests.
    pub fn with_brokers(brokers: &str) -> Self {
        <Self as clap::Parser>::parse_from(["logging-server", "--kafka-brokers", brokers])
    }
}

/// Serves `listener` until `shutdown` is cancelled; every request accepted by then is answered.
pub async fn run(args: Args, listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
    // A request alone is sent at once; requests that arrive while others are producing wait a
    // moment for company, so that under load a broker round trip carries many readings.
    let prompt = producer(&args, Duration::ZERO)?;
    let batching = if args.batch_linger.is_zero() {
        prompt.clone()
    } else {
        producer(&args, args.batch_linger)?
    };
    let server = Arc::new(Server {
        prompt,
        batching,
        producing: AtomicUsize::new(0),
        topic: args.topic.clone(),
        max_body_bytes: args.max_body_bytes,
        max_reading_bytes: args.max_reading_bytes,
        max_batch_readings: args.max_batch_readings,
        body_read_timeout: args.body_read_timeout,
        broker_ready: AtomicBool::new(false),
        metrics: Metrics::new(),
    });
    tracing::info!(listen = %listener.local_addr()?, brokers = %args.kafka.kafka_brokers, topic = %args.topic, "logging-server starting");

    tokio::spawn(wait_until_ready(server.clone(), args.kafka.clone(), shutdown.clone()));
    let handler = {
        let server = server.clone();
        move |request| {
            let server = server.clone();
            async move { server.handle(request).await }
        }
    };
    http::serve(listener, handler, shutdown, args.drain_timeout, &args.limits).await;

    // Every answered request was acknowledged already; this only waits for stray retries.
    let producers = [server.prompt.clone(), server.batching.clone()];
    tokio::task::spawn_blocking(move || producers.iter().try_for_each(|p| p.flush(Duration::from_secs(10))))
        .await?
        .context("flushing the producer")?;
    tracing::info!("logging-server stopped");
    Ok(())
}

/// The server's producer: every reading acknowledged by all in-sync replicas, retried without
/// duplicates, given up after `--produce-timeout`, sent after waiting `linger` for company.
pub fn producer(args: &Args, linger: Duration) -> anyhow::Result<FutureProducer> {
    args.kafka
        .client_config_with(&[
            ("acks", "all"),
            ("enable.idempotence", "true"),
            ("linger.ms", &(linger.as_secs_f64() * 1e3).to_string()),
            ("message.timeout.ms", &args.produce_timeout.as_millis().to_string()),
        ])
        .create()
        .context("creating the Kafka producer")
}

/// Sends READY=1 once the broker answers and the topic exists (creating it if missing).
async fn wait_until_ready(server: Arc<Server>, kafka: KafkaArgs, shutdown: CancellationToken) {
    let mut delay = Duration::from_millis(100);
    loop {
        if let Err(e) = kafka.ensure_topics(&[&server.topic]).await {
            tracing::debug!(error = %e, "could not create the topic");
        }
        match server.check_broker().await {
            Ok(()) => break,
            Err(e) => tracing::warn!(error = %e, "waiting for the Kafka broker"),
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {},
            () = shutdown.cancelled() => return,
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
    server.broker_ready.store(true, Ordering::Relaxed);
    tracing::info!("broker reachable, ready");
    runtime::notify_ready();
}

struct Server {
    /// Sends at once: for a request while no other is producing.
    prompt: FutureProducer,
    /// Lingers `--batch-linger`: for requests while others are producing.
    batching: FutureProducer,
    /// Requests producing now.
    producing: AtomicUsize,
    topic: String,
    max_body_bytes: usize,
    max_reading_bytes: usize,
    max_batch_readings: usize,
    body_read_timeout: Duration,
    broker_ready: AtomicBool,
    metrics: Metrics,
}

/// One request producing, counted in `Server::producing` while it lives.
struct Producing<'a> {
    count: &'a AtomicUsize,
    /// No other request was producing when this one started.
    alone: bool,
}

impl<'a> Producing<'a> {
    fn enter(count: &'a AtomicUsize) -> Self {
        let alone = count.fetch_add(1, Ordering::Relaxed) == 0;
        Self { count, alone }
    }
}

impl Drop for Producing<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A `POST /logs` body as read so far.
struct Batch {
    /// Receipt time, for readings without `ts`.
    ts: chrono::DateTime<chrono::Utc>,
    readings: Vec<WeatherReading>,
    /// The request line (1-based) of each reading.
    lines: Vec<usize>,
    /// The line being received.
    line: Vec<u8>,
    /// Lines completed so far.
    number: usize,
}

/// Why readings were not stored; becomes a non-200 response.
struct Refused {
    status: StatusCode,
    message: String,
    /// Of a batch that failed part-way: the indices of the readings the broker did store.
    stored: Option<Vec<usize>>,
}

impl Refused {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            stored: None,
        }
    }

    fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
    }

    /// `stored_lines` names the request lines (1-based) that were stored, so a client sends
    /// again only the others.
    fn into_response(self, lines: &[usize]) -> Response<Body> {
        let mut response = match &self.stored {
            Some(stored) => {
                let stored_lines: Vec<usize> = stored.iter().filter_map(|&i| lines.get(i).copied()).collect();
                http::json(
                    self.status,
                    &serde_json::json!({"status": "error", "message": self.message, "stored_lines": stored_lines}),
                )
            }
            None => http::error(self.status, self.message),
        };
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        response
    }
}

/// Most deliveries one request waits for at once: a large batch is handed to the producer as
/// acknowledgements come back, so no reading waits long in the local queue (its
/// `--produce-timeout` runs from the moment it is handed over).
const MAX_IN_FLIGHT: usize = 1_000;

impl Server {
    async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Response<Body> {
        let route = Route::of(request.uri().path());
        let response = match (request.method(), route) {
            (&Method::GET, Route::Log) => self.log_query(request.uri().query().unwrap_or("")).await,
            (&Method::POST, Route::Log) => self.log_body(request).await,
            (&Method::POST, Route::Logs) => self.log_lines(request).await,
            (&Method::GET, Route::Health) => http::health(),
            (&Method::GET, Route::Ready) => self.ready().await,
            (&Method::GET, Route::Metrics) => http::metrics(&self.metrics.registry),
            (_, Route::Other) => http::not_routed(true),
            _ => http::not_routed(false),
        };
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                path: route.label(),
                status: response.status().as_u16(),
            })
            .inc();
        response
    }

    async fn log_query(&self, query: &str) -> Response<Body> {
        let reading = match WeatherReading::from_query(query, WeatherReading::now()) {
            Ok(reading) => reading,
            Err(e) => return http::error(StatusCode::BAD_REQUEST, e),
        };
        match self.produce(std::slice::from_ref(&reading)).await {
            Ok(stored) => self.logged(&reading, stored),
            Err(refused) => refused.into_response(&[]),
        }
    }

    /// `POST /log`: one JSON object.
    async fn log_body(&self, request: Request<Incoming>) -> Response<Body> {
        let limit = self.max_body_bytes.min(self.max_reading_bytes);
        let collected = tokio::time::timeout(
            self.body_read_timeout,
            Limited::new(request.into_body(), limit).collect(),
        )
        .await;
        let Ok(collected) = collected else {
            return self.body_timeout();
        };
        let body = match collected {
            Ok(collected) => collected.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return http::error(StatusCode::PAYLOAD_TOO_LARGE, format!("body larger than {limit} bytes"));
            }
            Err(e) => return http::error(StatusCode::BAD_REQUEST, format!("reading body: {e}")),
        };
        match WeatherReading::from_request_json(&body, WeatherReading::now()) {
            Ok(reading) => match self.produce(std::slice::from_ref(&reading)).await {
                Ok(stored) => self.logged(&reading, stored),
                Err(refused) => refused.into_response(&[]),
            },
            Err(e) => http::error(StatusCode::BAD_REQUEST, e),
        }
    }

    fn body_timeout(&self) -> Response<Body> {
        let message = format!("body not received within {:?}", self.body_read_timeout);
        http::error(StatusCode::REQUEST_TIMEOUT, message)
    }

    /// `POST /logs`: NDJSON, all or nothing. Read and parsed line by line as it arrives, so a
    /// request holds one partial line and the readings so far, never the whole body; every
    /// line is checked before any reading is produced.
    async fn log_lines(&self, request: Request<Incoming>) -> Response<Body> {
        let deadline = tokio::time::Instant::now() + self.body_read_timeout;
        let mut batch = Batch {
            ts: WeatherReading::now(),
            readings: Vec::new(),
            lines: Vec::new(),
            line: Vec::new(),
            number: 0,
        };
        let mut body = request.into_body();
        let mut received = 0;
        loop {
            let data = match tokio::time::timeout_at(deadline, body.frame()).await {
                Err(_) => return self.body_timeout(),
                Ok(None) => break,
                Ok(Some(Err(e))) => return http::error(StatusCode::BAD_REQUEST, format!("reading body: {e}")),
                Ok(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => data,
                    Err(_) => continue, // trailers
                },
            };
            received += data.len();
            if received > self.max_body_bytes {
                let message = format!("body larger than {} bytes", self.max_body_bytes);
                return http::error(StatusCode::PAYLOAD_TOO_LARGE, message);
            }
            let mut rest = &data[..];
            while let Some(end) = rest.iter().position(|&b| b == b'\n') {
                batch.line.extend_from_slice(&rest[..end]);
                rest = &rest[end + 1..];
                if let Err(refused) = self.take_line(&mut batch) {
                    return refused.into_response(&[]);
                }
            }
            batch.line.extend_from_slice(rest);
            if batch.line.len() > self.max_reading_bytes {
                return self.line_too_long(batch.number + 1).into_response(&[]);
            }
        }
        if !batch.line.is_empty() {
            if let Err(refused) = self.take_line(&mut batch) {
                return refused.into_response(&[]);
            }
        }
        if batch.readings.is_empty() {
            return http::error(StatusCode::BAD_REQUEST, "body holds no readings");
        }
        match self.produce(&batch.readings).await {
            Ok(_) => http::json(
                StatusCode::OK,
                &serde_json::json!({"status": "success", "message": "Weather data logged", "count": batch.readings.len()}),
            ),
            Err(refused) => refused.into_response(&batch.lines),
        }
    }

    /// Line `number` (1-based) of a `POST /logs` is over `--max-reading-bytes`.
    fn line_too_long(&self, number: usize) -> Refused {
        let message = format!("line {number}: longer than {} bytes", self.max_reading_bytes);
        Refused::new(StatusCode::PAYLOAD_TOO_LARGE, message)
    }

    /// Parses the complete line in `batch.line` into the batch, or says why the request fails.
    fn take_line(&self, batch: &mut Batch) -> Result<(), Refused> {
        batch.number += 1;
        let line = batch.line.strip_suffix(b"\r").unwrap_or(&batch.line);
        if line.len() > self.max_reading_bytes {
            return Err(self.line_too_long(batch.number));
        }
        if !line.iter().all(u8::is_ascii_whitespace) {
            match WeatherReading::from_request_json(line, batch.ts) {
                Ok(reading) => {
                    batch.readings.push(reading);
                    batch.lines.push(batch.number);
                }
                Err(e) => {
                    let message = format!("line {}: {e}", batch.number);
                    return Err(Refused::new(StatusCode::BAD_REQUEST, message));
                }
            }
            if batch.readings.len() > self.max_batch_readings {
                let message = format!(
                    "more than {} readings in one request; at most {} (split the batch)",
                    self.max_batch_readings, self.max_batch_readings
                );
                return Err(Refused::new(StatusCode::PAYLOAD_TOO_LARGE, message));
            }
        }
        batch.line.clear();
        Ok(())
    }

    /// Produces every reading and waits for the broker's acknowledgement of each; returns
    /// where the last one was stored, or which ones were stored when not all were.
    async fn produce(&self, readings: &[WeatherReading]) -> Result<Delivery, Refused> {
        if !self.broker_ready.load(Ordering::Relaxed) {
            return Err(Refused::unavailable("Kafka broker not reachable yet"));
        }
        let started = Instant::now();
        let producing = Producing::enter(&self.producing);
        let producer = if producing.alone { &self.prompt } else { &self.batching };
        let mut pending: VecDeque<(usize, DeliveryFuture)> = VecDeque::new();
        let mut outcome = Outcome::default();
        for (index, reading) in readings.iter().enumerate() {
            if pending.len() >= MAX_IN_FLIGHT {
                if let Some((i, delivery)) = pending.pop_front() {
                    outcome.settle(i, delivery.await);
                }
            }
            let payload = reading.to_json();
            loop {
                let record = FutureRecord::to(&self.topic)
                    .key(reading.city.as_bytes())
                    .payload(&payload);
                match producer.send_result(record) {
                    Ok(delivery) => {
                        pending.push_back((index, delivery));
                        break;
                    }
                    // The local queue is full: wait for the oldest delivery, retry.
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) if !pending.is_empty() => {
                        if let Some((i, delivery)) = pending.pop_front() {
                            outcome.settle(i, delivery.await);
                        }
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                        outcome.failure = Some("producer queue full".to_owned());
                        break;
                    }
                    Err((e, _)) => {
                        outcome.failure = Some(e.to_string());
                        break;
                    }
                }
            }
            if outcome.failure.is_some() {
                break;
            }
        }
        for (i, delivery) in pending {
            outcome.settle(i, delivery.await);
        }
        self.metrics.produce_latency.observe(started.elapsed().as_secs_f64());
        self.metrics.produced.inc_by(outcome.stored.len() as u64);
        match outcome {
            Outcome {
                failure: None,
                last: Some(stored),
                ..
            } => Ok(stored),
            Outcome { failure: None, .. } => Err(Refused::unavailable("nothing was acknowledged")),
            Outcome {
                failure: Some(reason), ..
            } if readings.len() == 1 => {
                tracing::warn!(%reason, "reading not stored");
                Err(Refused::unavailable(format!("not stored: {reason}")))
            }
            Outcome {
                failure: Some(reason),
                mut stored,
                ..
            } => {
                tracing::warn!(%reason, stored = stored.len(), total = readings.len(), "batch partly stored");
                stored.sort_unstable();
                let mut refused = Refused::unavailable(format!(
                    "{} of {} readings stored before the broker failed ({reason}); send again only the lines not in \
                     stored_lines",
                    stored.len(),
                    readings.len()
                ));
                refused.stored = Some(stored);
                Err(refused)
            }
        }
    }

    /// The seed's success answer, plus where the reading was stored so a client can follow it
    /// downstream (the consumers report the offsets they committed).
    fn logged(&self, reading: &WeatherReading, stored: Delivery) -> Response<Body> {
        let kafka = serde_json::json!({"topic": self.topic, "partition": stored.partition, "offset": stored.offset});
        http::json(
            StatusCode::OK,
            &serde_json::json!({"status": "success", "message": "Weather data logged", "data": reading, "kafka": kafka}),
        )
    }

    async fn ready(&self) -> Response<Body> {
        match self.check_broker().await {
            Ok(()) => {
                self.broker_ready.store(true, Ordering::Relaxed);
                http::json(StatusCode::OK, &serde_json::json!({"status": "ready"}))
            }
            Err(e) => Refused::unavailable(e).into_response(&[]),
        }
    }

    /// Whether the broker answers both producers and knows the topic. Asking through each
    /// also connects it, so that neither meets the broker for the first time with a request
    /// waiting on it.
    async fn check_broker(&self) -> Result<(), String> {
        let producers = [self.prompt.clone(), self.batching.clone()];
        let topic = self.topic.clone();
        tokio::task::spawn_blocking(move || {
            producers
                .iter()
                .try_for_each(|p| topic_available(p.client(), &topic, Duration::from_secs(2)))
        })
        .await
        .map_err(|e| e.to_string())?
    }
}

/// What the broker said of a request's readings.
#[derive(Default)]
struct Outcome {
    /// Indices of the readings it stored.
    stored: Vec<usize>,
    /// Where the last one went.
    last: Option<Delivery>,
    failure: Option<String>,
}

impl Outcome {
    fn settle<Canceled>(&mut self, index: usize, result: Result<OwnedDeliveryResult, Canceled>) {
        match delivered(result) {
            Ok(stored) => {
                self.stored.push(index);
                self.last = Some(stored);
            }
            Err(e) => {
                self.failure.get_or_insert(e);
            }
        }
    }
}

/// The outcome of one delivery; the outer error means the producer was dropped.
fn delivered<Canceled>(result: Result<OwnedDeliveryResult, Canceled>) -> Result<Delivery, String> {
    match result {
        Ok(Ok(stored)) => Ok(stored),
        Ok(Err((e, _))) => Err(e.to_string()),
        Err(_) => Err("producer shut down".to_owned()),
    }
}

#[derive(Clone, Copy)]
enum Route {
    Log,
    Logs,
    Health,
    Ready,
    Metrics,
    Other,
}

impl Route {
    fn of(path: &str) -> Self {
        match path {
            "/log" => Self::Log,
            "/logs" => Self::Logs,
            "/health" => Self::Health,
            "/ready" => Self::Ready,
            "/metrics" => Self::Metrics,
            _ => Self::Other,
        }
    }

    /// Bounded label values: arbitrary request paths must not grow the metric families.
    fn label(self) -> &'static str {
        match self {
            Self::Log => "/log",
            Self::Logs => "/logs",
            Self::Health => "/health",
            Self::Ready => "/ready",
            Self::Metrics => "/metrics",
            Self::Other => "other",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    path: &'static str,
    status: u16,
}

struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    produce_latency: Histogram,
    produced: Counter,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("logging_server");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("http_requests", "HTTP requests by path and status", requests.clone());
        let produce_latency = Histogram::new([0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]);
        registry.register(
            "produce_duration_seconds",
            "Time from produce to broker acknowledgement, per request",
            produce_latency.clone(),
        );
        let produced = Counter::default();
        registry.register(
            "records_produced",
            "Readings acknowledged by the broker",
            produced.clone(),
        );
        Self {
            registry,
            requests,
            produce_latency,
            produced,
        }
    }
}
