//! logging-server in-process against librdkafka's mock cluster (real Kafka protocol on a port).

use std::time::Duration;

use logging_server::Args;
use rdkafka::Message;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use weather_common::WeatherReading;
use weather_testkit::{MockKafka, consume, http_get, http_request, payloads};

struct Running {
    addr: String,
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    async fn start(args: Args) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(logging_server::run(args, listener, shutdown.clone()));
        Self { addr, shutdown, task }
    }

    async fn wait_ready(&self) {
        for _ in 0..100 {
            if http_get(&self.addr, "/ready").await.is_ok_and(|r| r.status == 200) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("logging-server never became ready");
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.expect("join").expect("clean exit");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn valid_reading_lands_once_with_city_key() {
    let kafka = MockKafka::start(&["weather"]);
    let server = Running::start(Args::with_brokers(&kafka.brokers())).await;
    server.wait_ready().await;

    let response = http_get(&server.addr, "/log?city=San%20Francisco&temperature=71.25")
        .await
        .expect("request");
    assert_eq!(response.status, 200, "{}", response.body);
    let body = response.json();
    assert_eq!(body["status"], "success");
    assert_eq!(body["message"], "Weather data logged");
    assert_eq!(body["data"]["city"], "San Francisco");
    assert_eq!(body["data"]["temperature"], 71.25);

    let messages = tokio::task::spawn_blocking({
        let brokers = kafka.brokers();
        move || consume(&brokers, "weather", 1, Duration::from_secs(10))
    })
    .await
    .expect("join")
    .expect("consume");
    assert_eq!(messages.len(), 1, "exactly one record: {:?}", payloads(&messages));
    assert_eq!(messages[0].key(), Some(&b"San Francisco"[..]));
    let stored = WeatherReading::from_json(messages[0].payload().expect("payload")).expect("valid JSON");
    assert_eq!(stored.city, "San Francisco");
    assert_eq!(stored.temperature, 71.25);
    assert_eq!(
        serde_json::to_value(&stored).expect("json"),
        body["data"],
        "answer matches the record"
    );
    assert_eq!(
        body["kafka"],
        serde_json::json!({"topic": "weather", "partition": messages[0].partition(), "offset": messages[0].offset()}),
        "answer says where the record is"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_input_gets_400_naming_the_field_and_produces_nothing() {
    let kafka = MockKafka::start(&["weather"]);
    let server = Running::start(Args::with_brokers(&kafka.brokers())).await;
    server.wait_ready().await;

    let long_city = "x".repeat(256);
    let cases: Vec<(String, &str)> = vec![
        ("/log".into(), "city"),
        ("/log?temperature=10".into(), "city"),
        ("/log?city=&temperature=10".into(), "city"),
        ("/log?city=%20%20&temperature=10".into(), "city"),
        (format!("/log?city={long_city}&temperature=10"), "city"),
        ("/log?city=Bos%0Aton&temperature=10".into(), "city"),
        // Invisible and text-direction characters: "Bos\u{200b}ton" would show as "Boston".
        ("/log?city=Bos%E2%80%8Bton&temperature=10".into(), "city"),
        ("/log?city=%EF%BB%BFBoston&temperature=10".into(), "city"),
        ("/log?city=Boston%E2%80%AE&temperature=10".into(), "city"),
        ("/log?city=A&city=B&temperature=10".into(), "city"),
        ("/log?city=Boston".into(), "temperature"),
        ("/log?city=Boston&temperature=".into(), "temperature"),
        ("/log?city=Boston&temperature=warm".into(), "temperature"),
        ("/log?city=Boston&temperature=NaN".into(), "temperature"),
        ("/log?city=Boston&temperature=inf".into(), "temperature"),
        ("/log?city=Boston&temperature=1e400".into(), "temperature"),
        ("/log?city=Boston&temperature=200.5".into(), "temperature"),
        ("/log?city=Boston&temperature=-151".into(), "temperature"),
        ("/log?city=Boston&temperature=1&temperature=2".into(), "temperature"),
    ];
    for (target, field) in &cases {
        let response = http_get(&server.addr, target).await.expect("request");
        assert_eq!(response.status, 400, "{target}: {}", response.body);
        let body = response.json();
        assert_eq!(body["status"], "error", "{target}");
        let message = body["message"].as_str().expect("message");
        assert!(message.contains(field), "{target}: {message:?} should name {field}");
    }

    let bodies: [(&str, &[u8], &str); 5] = [
        ("/log", b"{\"city\":\"Boston\"}", "temperature"),
        ("/log", b"{\"city\":\"Boston\",\"temperature\":\"hot\"}", "temperature"),
        ("/log", b"not json", "JSON"),
        (
            "/logs",
            b"{\"city\":\"A\",\"temperature\":1}\n{\"city\":\"B\"}\n",
            "line 2",
        ),
        ("/logs", b"\n\n", "no readings"),
    ];
    for (path, body, expect) in bodies {
        let response = http_request(&server.addr, "POST", path, body).await.expect("request");
        assert_eq!(response.status, 400, "{path} {:?}", String::from_utf8_lossy(body));
        assert!(
            response.json()["message"].as_str().unwrap_or_default().contains(expect),
            "{}",
            response.body
        );
    }

    assert_eq!(http_get(&server.addr, "/nope").await.expect("request").status, 404);
    assert_eq!(
        http_request(&server.addr, "DELETE", "/log", b"")
            .await
            .expect("request")
            .status,
        405
    );

    // A valid reading afterwards proves the topic was readable: only it is there.
    let ok = http_get(&server.addr, "/log?city=Denver&temperature=50")
        .await
        .expect("request");
    assert_eq!(ok.status, 200);
    let messages = tokio::task::spawn_blocking({
        let brokers = kafka.brokers();
        move || consume(&brokers, "weather", 1, Duration::from_secs(10))
    })
    .await
    .expect("join")
    .expect("consume");
    assert_eq!(payloads(&messages).len(), 1, "{:?}", payloads(&messages));
    assert_eq!(messages[0].key(), Some(&b"Denver"[..]));

    let metrics = http_get(&server.addr, "/metrics").await.expect("metrics");
    assert!(
        metrics.body.contains("logging_server_records_produced_total 1"),
        "{}",
        metrics.body
    );
    assert!(
        metrics
            .body
            .contains(r#"logging_server_http_requests_total{path="/log",status="400"}"#),
        "{}",
        metrics.body
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn batch_endpoints_store_every_line() {
    let kafka = MockKafka::start(&["weather"]);
    let server = Running::start(Args::with_brokers(&kafka.brokers())).await;
    server.wait_ready().await;

    let single = http_request(&server.addr, "POST", "/log", br#"{"city":"Miami","temperature":88.5}"#)
        .await
        .expect("post");
    assert_eq!(single.status, 200, "{}", single.body);
    assert_eq!(single.json()["data"]["city"], "Miami");

    let ndjson: String = (0..500)
        .map(|i| format!("{{\"city\":\"City {}\",\"temperature\":{}.5}}\r\n", i % 7, i % 100))
        .collect();
    let batch = http_request(&server.addr, "POST", "/logs", ndjson.as_bytes())
        .await
        .expect("post");
    assert_eq!(batch.status, 200, "{}", batch.body);
    assert_eq!(batch.json()["count"], 500);

    let messages = tokio::task::spawn_blocking({
        let brokers = kafka.brokers();
        move || consume(&brokers, "weather", 501, Duration::from_secs(20))
    })
    .await
    .expect("join")
    .expect("consume");
    assert_eq!(messages.len(), 501);
    for message in &messages {
        let reading = WeatherReading::from_json(message.payload().expect("payload")).expect("valid");
        assert_eq!(message.key(), Some(reading.city.as_bytes()), "key is the city");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn batches_over_the_limit_get_413_and_store_nothing() {
    let kafka = MockKafka::start(&["weather"]);
    let mut args = Args::with_brokers(&kafka.brokers());
    args.max_batch_readings = 100;
    let server = Running::start(args).await;
    server.wait_ready().await;
    let lines = |n: usize| -> String {
        (0..n)
            .map(|i| format!("{{\"city\":\"Oslo\",\"temperature\":{i}}}\n"))
            .collect()
    };
    let refused = http_request(&server.addr, "POST", "/logs", lines(101).as_bytes())
        .await
        .expect("post");
    assert_eq!(refused.status, 413, "{}", refused.body);
    assert!(
        refused.json()["message"]
            .as_str()
            .unwrap_or_default()
            .contains("at most 100")
    );
    let accepted = http_request(&server.addr, "POST", "/logs", lines(100).as_bytes())
        .await
        .expect("post");
    assert_eq!(accepted.status, 200, "{}", accepted.body);
    let brokers = kafka.brokers();
    let messages = tokio::task::spawn_blocking(move || consume(&brokers, "weather", 100, Duration::from_secs(20)))
        .await
        .expect("join")
        .expect("consume");
    assert_eq!(messages.len(), 100, "only the accepted batch reached Kafka");
    server.stop().await;
}

/// One broker of three down: the readings of its partition time out, the others are stored.
/// The 503 names the stored lines; sending the rest again stores every line exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_failing_part_way_names_the_stored_lines() {
    let cluster = rdkafka::mocking::MockCluster::new(3).expect("mock cluster");
    cluster.create_topic("weather", 3, 1).expect("topic");
    for partition in 0..3 {
        cluster
            .partition_leader("weather", partition, Some(partition + 1))
            .expect("leader");
    }
    let mut args = Args::with_brokers(&cluster.bootstrap_servers());
    args.produce_timeout = Duration::from_secs(2);
    let server = Running::start(args).await;
    server.wait_ready().await;
    let lines: Vec<String> = (0..60)
        .map(|i| format!("{{\"city\":\"City {}\",\"temperature\":{i}}}", i % 20))
        .collect();
    cluster.broker_down(2).expect("broker down");
    let partial = http_request(&server.addr, "POST", "/logs", lines.join("\n").as_bytes())
        .await
        .expect("post");
    assert_eq!(partial.status, 503, "{}", partial.body);
    let stored: Vec<usize> = serde_json::from_value(partial.json()["stored_lines"].clone()).expect("stored_lines");
    assert!(
        !stored.is_empty() && stored.len() < lines.len(),
        "some lines stored, not all: {stored:?}"
    );
    cluster.broker_up(2).expect("broker up");
    let rest: Vec<&str> = (1..=lines.len())
        .filter(|n| !stored.contains(n))
        .map(|n| lines[n - 1].as_str())
        .collect();
    let mut answered = None;
    for _ in 0..30 {
        let retry = http_request(&server.addr, "POST", "/logs", rest.join("\n").as_bytes())
            .await
            .expect("post");
        if retry.status == 200 {
            answered = Some(retry);
            break;
        }
        // A 503 here stored nothing new only if it says so; keep the test honest.
        let again: Vec<usize> = serde_json::from_value(retry.json()["stored_lines"].clone()).unwrap_or_default();
        assert!(again.is_empty(), "retry partly stored: {}", retry.body);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(answered.is_some(), "the rest is stored once the broker is back");
    let brokers = cluster.bootstrap_servers();
    let messages = tokio::task::spawn_blocking(move || consume(&brokers, "weather", 60, Duration::from_secs(20)))
        .await
        .expect("join")
        .expect("consume");
    let mut temperatures: Vec<i64> = messages
        .iter()
        .map(|m| {
            WeatherReading::from_json(m.payload().expect("payload"))
                .expect("valid")
                .temperature as i64
        })
        .collect();
    temperatures.sort_unstable();
    assert_eq!(temperatures, (0..60).collect::<Vec<_>>(), "every line exactly once");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_broker_gives_503_never_200() {
    // Nothing listens there: the server starts, is not ready, and refuses to pretend.
    let port = weather_testkit::free_port();
    let server = Running::start(Args::with_brokers(&format!("127.0.0.1:{port}"))).await;
    let response = http_get(&server.addr, "/log?city=Boston&temperature=50")
        .await
        .expect("request");
    assert_eq!(response.status, 503, "{}", response.body);
    assert_eq!(response.header("retry-after"), Some("1"));
    assert_eq!(http_get(&server.addr, "/ready").await.expect("ready").status, 503);
    assert_eq!(http_get(&server.addr, "/health").await.expect("health").status, 200);
    server.stop().await;

    // A broker that goes away after start-up: the delivery times out and the client hears 503.
    let kafka = MockKafka::start(&["weather"]);
    let mut args = Args::with_brokers(&kafka.brokers());
    args.produce_timeout = Duration::from_secs(1);
    let server = Running::start(args).await;
    server.wait_ready().await;
    kafka.cluster.broker_down(1).expect("broker down");
    let response = http_get(&server.addr, "/log?city=Boston&temperature=50")
        .await
        .expect("request");
    assert_eq!(response.status, 503, "{}", response.body);
    assert!(
        response.json()["message"]
            .as_str()
            .unwrap_or_default()
            .contains("not stored")
    );

    kafka.cluster.broker_up(1).expect("broker up");
    let mut recovered = false;
    for _ in 0..50 {
        if http_get(&server.addr, "/log?city=Boston&temperature=51")
            .await
            .expect("request")
            .status
            == 200
        {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(recovered, "logging-server recovers once the broker is back");
    server.stop().await;
}

/// Deterministic pseudo-random numbers (splitmix64): a failing case can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

/// A query string or body fragment: valid pieces, hostile values and random bytes mixed.
fn fuzz_value(rng: &mut Rng) -> String {
    const VALUES: &[&str] = &[
        "Boston",
        "San%20Francisco",
        "%E6%9D%B1%E4%BA%AC",
        "%F0%9F%8C%A7",
        "%00",
        "%0A",
        "%FF%FE",
        "%",
        "%zz",
        "<script>alert(1)</script>",
        "72.5",
        "-150",
        "200",
        "200.0001",
        "NaN",
        "-inf",
        "infinity",
        "1e308",
        "1e-320",
        "0x10",
        "+5",
        "--5",
        "",
        " ",
        "%20",
        "\u{7f}",
        "null",
        "[]",
        "{}",
    ];
    match rng.below(4) {
        0 => rng.pick(VALUES).to_owned(),
        1 => "9".repeat(1 + rng.below(400)),
        2 => (0..rng.below(24)).map(|_| format!("%{:02X}", rng.below(256))).collect(),
        _ => format!("{}{}", rng.pick(VALUES), rng.pick(VALUES)),
    }
}

/// Random query strings and bodies, including repeated and unknown parameters, NaN/inf, huge
/// numbers, broken percent-encoding and invalid UTF-8: every answer is 200, 400, 404, 405 or
/// 413 (503 only with the broker away, which it is not here), the server never falls over,
/// and exactly the readings answered 200 reach the topic.
#[tokio::test(flavor = "multi_thread")]
async fn fuzzed_requests_get_clear_answers_and_only_accepted_readings_are_stored() {
    let kafka = MockKafka::start(&["weather"]);
    let server = Running::start(Args::with_brokers(&kafka.brokers())).await;
    server.wait_ready().await;
    let mut rng = Rng(0x005E_ED0F_u64);
    let mut stored = 0usize;
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    for case in 0..1500 {
        let (method, target, body) = match rng.below(4) {
            0 | 1 => {
                let params: Vec<String> = (0..rng.below(5))
                    .map(|_| {
                        let name = rng.pick(&["city", "temperature", "city", "temperature", "x", "", "city[]"]);
                        format!("{name}={}", fuzz_value(&mut rng))
                    })
                    .collect();
                // Characters a URI cannot hold are escaped as any client would (raw, they break
                // the request line, which hyper refuses before our handler runs); broken `%`
                // escapes stay.
                let query: String = params
                    .join(rng.pick(&["&", "&&", ";", "&="]))
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || "-._~%&=;+!$'()*,/:@?".contains(c) {
                            c.to_string()
                        } else {
                            c.to_string().bytes().map(|b| format!("%{b:02X}")).collect()
                        }
                    })
                    .collect();
                ("GET", format!("/log?{query}"), Vec::new())
            }
            2 => {
                let body = format!(
                    "{{\"city\":\"{}\",\"temperature\":{}}}",
                    fuzz_value(&mut rng),
                    fuzz_value(&mut rng)
                );
                let bytes = if rng.below(4) == 0 {
                    (0..rng.below(64)).map(|_| rng.next() as u8).collect()
                } else {
                    body.into_bytes()
                };
                ("POST", "/log".to_owned(), bytes)
            }
            _ => {
                let lines: Vec<String> = (0..1 + rng.below(4))
                    .map(|_| {
                        let temperature = if rng.below(2) == 0 {
                            format!("{}", rng.below(100))
                        } else {
                            fuzz_value(&mut rng)
                        };
                        format!("{{\"city\":\"City {}\",\"temperature\":{temperature}}}", rng.below(10))
                    })
                    .collect();
                ("POST", "/logs".to_owned(), lines.join("\n").into_bytes())
            }
        };
        let response = http_request(&server.addr, method, &target, &body)
            .await
            .unwrap_or_else(|e| panic!("case {case}: {method} {target}: no answer: {e}"));
        let answer = || -> serde_json::Value {
            serde_json::from_str(&response.body).unwrap_or_else(|e| {
                panic!(
                    "case {case}: {method} {target:?}: {} is not JSON ({e}): {:?}",
                    response.status, response.body
                )
            })
        };
        *statuses.entry(response.status).or_default() += 1;
        match response.status {
            200 => {
                let answer = answer();
                stored += answer["count"].as_u64().map_or(1, |n| n as usize);
            }
            400 | 404 | 405 | 413 => {
                let answer = answer();
                assert_eq!(answer["status"], "error", "case {case}");
                assert!(
                    answer["message"].as_str().is_some_and(|m| !m.is_empty()),
                    "case {case}: a reason is given"
                );
            }
            status => panic!(
                "case {case}: {method} {target} {:?} got {status}: {}",
                String::from_utf8_lossy(&body),
                response.body
            ),
        }
    }
    eprintln!("answers by status: {statuses:?}; {stored} readings accepted");
    assert!(stored > 0, "some fuzzed readings were valid");
    assert_eq!(http_get(&server.addr, "/health").await.expect("health").status, 200);

    let messages = tokio::task::spawn_blocking({
        let brokers = kafka.brokers();
        move || consume(&brokers, "weather", stored, Duration::from_secs(20))
    })
    .await
    .expect("join")
    .expect("consume");
    assert_eq!(messages.len(), stored, "exactly the accepted readings were produced");
    for message in &messages {
        WeatherReading::from_json(message.payload().expect("payload")).expect("every stored record is valid");
    }
    server.stop().await;
}

/// Reads from `stream` until the server closes it (or `limit` passes); what it sent.
async fn read_until_closed(stream: &mut tokio::net::TcpStream, limit: Duration) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut received = Vec::new();
    tokio::time::timeout(limit, stream.read_to_end(&mut received))
        .await
        .ok()?
        .ok()?;
    Some(String::from_utf8_lossy(&received).into_owned())
}

/// A client trickling its headers (slowloris), an idle connection and a stalled upload are
/// each closed within their timeout, instead of holding the server for ever.
#[tokio::test(flavor = "multi_thread")]
async fn slow_and_idle_clients_are_cut_off() {
    use tokio::io::AsyncWriteExt;
    let kafka = MockKafka::start(&["weather"]);
    let mut args = Args::with_brokers(&kafka.brokers());
    args.limits.header_read_timeout = Duration::from_secs(1);
    args.body_read_timeout = Duration::from_secs(1);
    let server = Running::start(args).await;
    server.wait_ready().await;

    let started = std::time::Instant::now();
    let mut slow = tokio::net::TcpStream::connect(&server.addr).await.expect("connect");
    slow.write_all(b"GET /log?city=Bo").await.expect("write");
    let mut idle = tokio::net::TcpStream::connect(&server.addr).await.expect("connect");
    let mut upload = tokio::net::TcpStream::connect(&server.addr).await.expect("connect");
    upload
        .write_all(b"POST /logs HTTP/1.1\r\nHost: test\r\nContent-Length: 1000\r\n\r\n{\"city\":")
        .await
        .expect("write");
    for _ in 0..3 {
        // Keep trickling: each byte comes well within a second of the last.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let _ = slow.write_all(b"s").await;
    }
    assert!(
        read_until_closed(&mut slow, Duration::from_secs(5)).await.is_some(),
        "slowloris closed"
    );
    assert!(
        read_until_closed(&mut idle, Duration::from_secs(5)).await.is_some(),
        "idle closed"
    );
    let answer = read_until_closed(&mut upload, Duration::from_secs(5))
        .await
        .expect("upload closed");
    assert!(answer.starts_with("HTTP/1.1 408"), "stalled upload: {answer}");
    assert!(started.elapsed() < Duration::from_secs(4), "all within their timeouts");

    // The server still serves.
    let response = http_get(&server.addr, "/log?city=Boston&temperature=1")
        .await
        .expect("request");
    assert_eq!(response.status, 200, "{}", response.body);
    server.stop().await;
}

/// Beyond --max-connections a client is told 503 at once, and served again once others left.
#[tokio::test(flavor = "multi_thread")]
async fn connections_beyond_the_cap_get_503() {
    let kafka = MockKafka::start(&["weather"]);
    let mut args = Args::with_brokers(&kafka.brokers());
    args.limits.max_connections = 2;
    let server = Running::start(args).await;
    server.wait_ready().await;
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(tokio::net::TcpStream::connect(&server.addr).await.expect("connect"));
    }
    // Let the server take both before the third arrives.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut surplus = tokio::net::TcpStream::connect(&server.addr).await.expect("connect");
    let answer = read_until_closed(&mut surplus, Duration::from_secs(5))
        .await
        .expect("answered");
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("too many connections"), "{answer}");
    drop(held);
    let mut served = false;
    for _ in 0..20 {
        if http_get(&server.addr, "/health").await.is_ok_and(|r| r.status == 200) {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served, "served again once the held connections closed");
    server.stop().await;
}
