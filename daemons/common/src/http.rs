//! A small HTTP/1 server with graceful drain, and the response shapes every daemon uses.

use std::{convert::Infallible, fmt::Display, future::Future, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{Request, Response, StatusCode, body::Incoming, header};
use hyper_util::{rt::TokioIo, server::graceful::GracefulShutdown};
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Response body type of every handler: a full buffer or a stream (server-sent events).
pub type Body = BoxBody<Bytes, Infallible>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

/// A streaming body fed by a channel (server-sent events); ends when the sender is dropped.
pub fn channel_body(receiver: tokio::sync::mpsc::Receiver<Bytes>) -> Body {
    struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);
    impl hyper::body::Body for ChannelBody {
        type Data = Bytes;
        type Error = Infallible;
        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
            self.0
                .poll_recv(cx)
                .map(|chunk| chunk.map(|bytes| Ok(hyper::body::Frame::data(bytes))))
        }
    }
    BodyExt::boxed(ChannelBody(receiver))
}

/// A JSON response.
pub fn json<T: Serialize + ?Sized>(status: StatusCode, value: &T) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(body) => with_type(status, "application/json", body),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("encoding response: {e}")),
    }
}

/// `{"status":"error","message":...}`, the error shape of every JSON endpoint.
pub fn error(status: StatusCode, message: impl Display) -> Response<Body> {
    let body = serde_json::json!({ "status": "error", "message": message.to_string() });
    with_type(status, "application/json", body.to_string())
}

/// A response with a body of the given content type.
pub fn with_type(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    response
}

/// `{"status":"healthy"}`: the process is alive and serving.
pub fn health() -> Response<Body> {
    json(StatusCode::OK, &serde_json::json!({ "status": "healthy" }))
}

/// Prometheus text exposition of `registry`.
pub fn metrics(registry: &Registry) -> Response<Body> {
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, registry) {
        Ok(()) => with_type(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            text,
        ),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("encoding metrics: {e}")),
    }
}

/// 404 or 405 for a request no route took.
pub fn not_routed(method_allowed: bool) -> Response<Body> {
    if method_allowed {
        error(StatusCode::NOT_FOUND, "not found")
    } else {
        error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
    }
}

/// Limits every server applies to its clients, so that slow or many clients cannot hold it.
#[derive(clap::Args, Debug, Clone)]
pub struct Limits {
    /// Connections served at once; more are answered 503 and closed.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,

    /// Time a client has to send a request's headers, and to start its next request on a
    /// kept-alive connection; then the connection is closed.
    #[arg(long, env = "HEADER_READ_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_read_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            header_read_timeout: Duration::from_secs(10),
        }
    }
}

/// The address a request came from: in every request's extensions, for a handler that decides
/// by it (the query-server shows other clients' SQL to its own host only).
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub std::net::SocketAddr);

/// Serves HTTP/1 connections from `listener` until `shutdown` is cancelled, then stops
/// accepting, lets every request already received finish (up to `drain`), and returns.
/// Applies `limits` to every connection.
pub async fn serve<H, F>(
    listener: TcpListener,
    handler: H,
    shutdown: CancellationToken,
    drain: Duration,
    limits: &Limits,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tokio::spawn(refuse(stream));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
            request.extensions_mut().insert(Peer(peer));
            let response = handler(request);
            async move { Ok::<_, Infallible>(response.await) }
        });
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => tracing::debug!("all connections drained"),
        () = tokio::time::sleep(drain) => tracing::warn!(?drain, "drain timed out, closing the remaining connections"),
    }
}

/// Answers a connection over the limit with 503 and closes it, without reading its request.
async fn refuse(mut stream: tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt;
    let body = r#"{"status":"error","message":"too many connections"}"#;
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(response.as_bytes())).await;
}

/// Handler of a consumer daemon's small HTTP port: `/health` and `/metrics`.
pub fn admin_handler(
    registry: std::sync::Arc<Registry>,
) -> impl Fn(Request<Incoming>) -> std::future::Ready<Response<Body>> + Clone + Send + Sync + 'static {
    move |request| {
        std::future::ready(match (request.method(), request.uri().path()) {
            (&hyper::Method::GET, "/health") => health(),
            (&hyper::Method::GET, "/metrics") => metrics(&registry),
            (_, "/health" | "/metrics") => not_routed(false),
            _ => not_routed(true),
        })
    }
}

/// Metric label of per-partition gauges such as lag.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct PartitionLabel {
    pub partition: i32,
}

/// Binds `addr` and serves [`admin_handler`] there until `shutdown`.
pub async fn spawn_admin(
    addr: std::net::SocketAddr,
    registry: std::sync::Arc<Registry>,
    shutdown: CancellationToken,
) -> std::io::Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let limits = Limits {
        max_connections: 64,
        ..Limits::default()
    };
    let task = tokio::spawn(async move {
        serve(
            listener,
            admin_handler(registry),
            shutdown,
            Duration::from_secs(5),
            &limits,
        )
        .await
    });
    Ok((local, task))
}
