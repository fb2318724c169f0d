//! A small HTTP/1.0 client for what the pipeline asks its components and servers: health,
//! metrics, readiness and the bucket's creation.

use std::time::Duration;

use anyhow::Context;

/// The answer to [`http_request`].
pub struct HttpAnswer {
    pub status: u16,
    pub status_line: String,
    pub body: String,
}

/// A small request over plain HTTP, for `status`, readiness checks and bucket creation.
/// HTTP/1.0 so that no server answers in chunks.
pub async fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<HttpAnswer> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr)).await??;
    let mut request = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response)).await??;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n").context("malformed response")?;
    let status_line = head.lines().next().unwrap_or_default().to_owned();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("malformed status line {status_line:?}"))?;
    Ok(HttpAnswer {
        status,
        status_line,
        body: body.to_owned(),
    })
}

/// The body of `GET path`, when the answer is 200.
pub async fn get(addr: &str, path: &str) -> anyhow::Result<String> {
    let answer = http_request(addr, "GET", path, &[]).await?;
    anyhow::ensure!(answer.status == 200, "{}", answer.status_line);
    Ok(answer.body)
}
