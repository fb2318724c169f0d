//! HTTP as the tests speak it: byte-level requests, and Trino's protocol on top.

use super::*;

/// A response read by [`http_request`].
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`), read to the end. Kept
/// byte-level on purpose: tests send malformed input a client library would refuse to build.
pub async fn http_request(addr: &str, method: &str, target: &str, body: &[u8]) -> anyhow::Result<HttpResponse> {
    http_request_with(addr, method, target, &[], body).await
}

/// [`http_request`] with extra request headers.
pub async fn http_request_with(
    addr: &str,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> anyhow::Result<HttpResponse> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    let head = format!(
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{extra}Content-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    // Read the head, then exactly Content-Length bytes (some servers keep the connection open
    // despite `Connection: close`), or to the end when no length is given.
    let mut raw = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = stream.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "connection closed before the end of the response head");
        raw.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .context("no status line")?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut body = raw.split_off(head_end + 4);
    let length = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok());
    match length {
        Some(length) => {
            while body.len() < length {
                let n = stream.read(&mut chunk).await?;
                anyhow::ensure!(n > 0, "connection closed before the end of the body");
                body.extend_from_slice(&chunk[..n]);
            }
        }
        None => {
            stream.read_to_end(&mut body).await?;
        }
    }
    let body = String::from_utf8_lossy(&body).into_owned();
    Ok(HttpResponse { status, headers, body })
}

/// `POST /v1/statement` of Trino's protocol as user `test`: the first response.
pub async fn trino_submit(addr: &str, sql: &str) -> anyhow::Result<serde_json::Value> {
    let response = http_request_with(
        addr,
        "POST",
        "/v1/statement",
        &[("X-Trino-User", "test")],
        sql.as_bytes(),
    )
    .await?;
    anyhow::ensure!(
        response.status == 200,
        "POST /v1/statement: {} {}",
        response.status,
        response.body
    );
    Ok(response.json())
}

/// Runs `sql` over Trino's protocol on `addr` (the query-server), following each `nextUri`
/// to the end: every response, the last one finished or failed.
pub async fn trino_statement(addr: &str, sql: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut responses = vec![trino_submit(addr, sql).await?];
    while let Some(next) = responses.last().and_then(|r| r["nextUri"].as_str()).map(str::to_owned) {
        let page = http_get(addr, trino_path(addr, &next)?).await?;
        anyhow::ensure!(page.status == 200, "GET {next}: {} {}", page.status, page.body);
        responses.push(page.json());
    }
    Ok(responses)
}

/// The path of a `nextUri` that names `addr`.
pub fn trino_path<'a>(addr: &str, uri: &'a str) -> anyhow::Result<&'a str> {
    Ok(uri
        .split_once(addr)
        .with_context(|| format!("{uri} is not on {addr}"))?
        .1)
}

/// The rows of all the responses of a statement.
pub fn trino_rows(responses: &[serde_json::Value]) -> Vec<serde_json::Value> {
    responses
        .iter()
        .filter_map(|r| r["data"].as_array())
        .flatten()
        .cloned()
        .collect()
}

/// GET shorthand for [`http_request`].
pub async fn http_get(addr: &str, target: &str) -> anyhow::Result<HttpResponse> {
    http_request(addr, "GET", target, b"").await
}
