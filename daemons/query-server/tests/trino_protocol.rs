//! The query-server against real clients: Trino's own Python client runs the plan's statements
//! over a table the iceberg-sink's table code wrote to S3 (moto) through a PostgreSQL catalog,
//! and its answers are compared with PyIceberg's; then the protocol's edge cases over raw HTTP.

use std::{collections::HashMap, process::Command, time::Duration};

use chrono::{DateTime, TimeDelta, Utc};
use iceberg::{
    TableIdent,
    spec::{PrimitiveType, Type},
    transaction::{AddColumn, ApplyTransactionAction, Transaction},
};
use iceberg_sink::table::WeatherTable;
use serde_json::Value;
use weather_common::{
    WeatherReading,
    consumer::{Checkpoint, Checkpoints},
    lakehouse::CatalogConfig,
    reading::DEMO_CITIES,
};
use weather_testkit::{
    ChildGuard, Postgres, S3Server, find_tool, free_port, http_get, http_request_with, metric, trino_path,
    trino_rows as rows, trino_statement, trino_submit,
};

/// 2026-01-08 13:00 UTC: the data covers 13:00–16:00 of that day and 14:00 of the next.
const START: i64 = 1_767_877_200;
const COMMITS: usize = 8;
const READINGS_PER_COMMIT: usize = 3_000;

struct Harness {
    _postgres: Postgres,
    s3: S3Server,
    config: CatalogConfig,
    table: WeatherTable,
    committed: Checkpoints,
    offset: i64,
}

impl Harness {
    async fn start() -> Self {
        let postgres = Postgres::start().expect("postgres");
        let catalog_url = postgres.create_database("iceberg").await.expect("catalog database");
        let s3 = S3Server::start().await.expect("moto");
        let config = CatalogConfig {
            url: catalog_url,
            name: "weather".into(),
            warehouse: "s3://warehouse/".into(),
            storage: HashMap::from([
                ("s3.endpoint".to_owned(), s3.endpoint.clone()),
                ("s3.region".to_owned(), "us-east-1".to_owned()),
                ("s3.path-style-access".to_owned(), "true".to_owned()),
                ("s3.access-key-id".to_owned(), "test".to_owned()),
                ("s3.secret-access-key".to_owned(), "test".to_owned()),
            ]),
        };
        let table = WeatherTable::open(&config, "default", "weather", 128 << 20)
            .await
            .expect("table");
        Self {
            _postgres: postgres,
            s3,
            config,
            table,
            committed: Checkpoints::new(),
            offset: 0,
        }
    }

    /// One commit, as the sink makes it: readings spread over the four hours, so every
    /// commit adds one file to each hour.
    async fn commit(&mut self, seed: usize, count: usize) {
        let hours = [0, 1, 2, 25];
        let start = DateTime::<Utc>::from_timestamp(START, 0).expect("start");
        let readings: Vec<WeatherReading> = (0..count)
            .map(|i| {
                let n = seed * count + i;
                WeatherReading {
                    city: DEMO_CITIES[n % DEMO_CITIES.len()].to_owned(),
                    temperature: ((n * 37) % 1_000) as f64 / 10.0 - 20.0,
                    ts: start
                        + TimeDelta::hours(hours[n % hours.len()])
                        + TimeDelta::milliseconds((n as i64 * 7_919) % 3_600_000),
                }
            })
            .collect();
        self.offset += count as i64;
        let next = Checkpoints::from([(0, Checkpoint::start(self.offset))]);
        let files = self.table.write(&readings).await.expect("write");
        self.table
            .commit("weather", files, &self.committed, &next, &Default::default())
            .await
            .expect("commit");
        self.committed = next;
    }

    fn server(&self, extra: &[&str]) -> (ChildGuard, String) {
        let addr = format!("127.0.0.1:{}", free_port());
        let server = ChildGuard::spawn_ready(
            "query-server",
            Command::new(env!("CARGO_BIN_EXE_query-server"))
                .args([
                    "--listen",
                    &addr,
                    "--warehouse",
                    "s3://warehouse/",
                    "--s3-endpoint",
                    &self.s3.endpoint,
                ])
                .args(extra)
                .env("CATALOG_URL", &self.config.url)
                .env("AWS_ACCESS_KEY_ID", "test")
                .env("AWS_SECRET_ACCESS_KEY", "test"),
            Duration::from_secs(60),
        )
        .expect("query-server");
        (server, addr)
    }
}

async fn statement(addr: &str, sql: &str) -> Vec<Value> {
    trino_statement(addr, sql).await.expect("statement")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trinos_python_client_gets_what_pyiceberg_reads() {
    let mut harness = Harness::start().await;
    for seed in 0..COMMITS {
        harness.commit(seed, READINGS_PER_COMMIT).await;
    }
    let (_server, addr) = harness.server(&["--page-rows", "1000"]);

    let python = find_tool("PYTHON", "python3").expect("python3");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/trino_check.py");
    let output = Command::new(python)
        .args([
            script,
            &format!("http://{addr}"),
            &harness.config.url,
            &harness.s3.endpoint,
            "2026-01-08",
            "14",
        ])
        .output()
        .expect("trino_check.py");
    assert!(
        output.status.success(),
        "trino_check.py: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_slice(&output.stdout).expect("report");
    eprintln!("trino_check.py: {report:#}");
    let total = COMMITS * READINGS_PER_COMMIT;
    assert_eq!(report["rows"], total);
    // hour(ts) = 14 is that hour on both days: half the readings; the range is one of them.
    assert_eq!(report["hour_rows"], total / 2);
    assert_eq!(report["range_rows"], total / 4);
    assert_eq!(report["files"], COMMITS * 4);
    assert_eq!(report["cities"], DEMO_CITIES.len());
    // The range query plans one hour's files only.
    let plan = report["range_plan"].to_string();
    assert!(
        plan.contains(&format!("files={COMMITS} of {}", COMMITS * 4)),
        "the range scan is not pruned to one hour: {plan}"
    );
    // Grouped by the city's Parquet dictionary keys (`grouping.rs`), and finished by DataFusion.
    let grouped = report["grouped_plan"].to_string();
    assert!(
        grouped.contains("DictionaryAggregate: mode=Partial, gby=[city]")
            && grouped.contains("AggregateExec: mode=Final"),
        "{grouped}"
    );
    let filtered = report["filtered_grouped_plan"].to_string();
    assert!(filtered.contains("filter=temperature@1 > 15"), "{filtered}");
    let errors = &report["errors"];
    assert_eq!(errors["SELECT nosuch FROM iceberg.default.weather"], "COLUMN_NOT_FOUND");
    assert_eq!(errors["SELECT * FROM iceberg.default.nosuch"], "TABLE_NOT_FOUND");
    assert_eq!(errors["SELEC * FROM iceberg.default.weather"], "SYNTAX_ERROR");
    assert_eq!(errors["DROP TABLE iceberg.default.weather"], "NOT_SUPPORTED");
    assert_eq!(errors["CREATE TABLE t AS SELECT 1"], "NOT_SUPPORTED");

    let metrics = http_get(&addr, "/metrics").await.expect("metrics").body;
    let skipped = metric(&metrics, "query_server_files_skipped_total").expect("files skipped");
    assert!(skipped >= (COMMITS * 3) as f64, "{metrics}");

    // `hour(ts) = 14` reads the files of the two hours 14:00 only, by their partitions.
    let hour_plan = rows(
        &statement(
            &addr,
            "EXPLAIN SELECT * FROM iceberg.default.weather WHERE hour(ts) = 14",
        )
        .await,
    );
    assert!(
        serde_json::to_string(&hour_plan)
            .expect("plan")
            .contains(&format!("files={} of {}", COMMITS * 2, COMMITS * 4)),
        "{hour_plan:?}"
    );

    // A commit after the server has read (and cached) the table is seen by the next statement,
    // whether it is answered from the manifests (count(*)), read with a filter, or pruned.
    harness.commit(COMMITS, 10).await;
    for (sql, expected) in [
        ("SELECT count(*) FROM iceberg.default.weather", total + 10),
        (
            "SELECT count(*) FROM iceberg.default.weather WHERE temperature > -1000",
            total + 10,
        ),
        (
            "SELECT count(*) FROM iceberg.default.weather WHERE hour(ts) = 14",
            total / 2 + 5,
        ),
    ] {
        assert_eq!(
            rows(&statement(&addr, sql).await),
            vec![serde_json::json!([expected])],
            "{sql}"
        );
    }

    // A column added after the files were written: they are read by iceberg's reader, which
    // gives it as nulls, rather than straight from Parquet (`files.rs`), as before it was added.
    let catalog = harness.config.connect().await.expect("catalog");
    let table = catalog
        .load_table(&TableIdent::from_strs(["default", "weather"]).expect("ident"))
        .await
        .expect("table");
    let tx = Transaction::new(&table);
    let tx = tx
        .update_schema()
        .add_column(AddColumn::optional("station", Type::Primitive(PrimitiveType::String)))
        .apply(tx)
        .expect("add column");
    tx.commit(catalog.as_ref()).await.expect("schema commit");
    // The sink goes on appending; its snapshot has the new schema (a scan reads its snapshot's).
    harness.commit(COMMITS + 1, 10).await;
    assert_eq!(
        rows(
            &statement(
                &addr,
                "SELECT station, count(*) FROM iceberg.default.weather GROUP BY station"
            )
            .await
        ),
        vec![serde_json::json!([null, total + 20])]
    );
    let cities = rows(
        &statement(
            &addr,
            "SELECT city, count(*) FROM iceberg.default.weather GROUP BY city ORDER BY city",
        )
        .await,
    );
    assert_eq!(cities.len(), DEMO_CITIES.len(), "{cities:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_cancel_and_errors_follow_trinos_protocol() {
    let mut harness = Harness::start().await;
    for seed in 0..2 {
        harness.commit(seed, READINGS_PER_COMMIT).await;
    }
    let total = 2 * READINGS_PER_COMMIT;
    let (_server, addr) = harness.server(&["--page-rows", "500", "--body-read-timeout", "1s"]);
    let info = http_get(&addr, "/v1/info").await.expect("info").json();
    assert_eq!(info["starting"], false);

    // A result of many pages, each with the columns, the last without nextUri.
    let responses = statement(&addr, "SELECT city, temperature, ts FROM iceberg.default.weather").await;
    assert_eq!(rows(&responses).len(), total);
    let pages = responses.iter().filter(|r| r["data"].is_array()).count();
    assert!(pages >= total / 500, "{pages} pages");
    assert!(
        responses
            .iter()
            .filter(|r| r["data"].is_array())
            .all(|r| r["columns"].is_array())
    );
    let last = responses.last().expect("responses");
    assert_eq!(last["stats"]["state"], "FINISHED");
    assert!(last.get("nextUri").is_none());
    assert_eq!(last["columns"][2]["type"], "timestamp(6) with time zone");

    // The response to a short statement holds its rows: one round trip.
    let one = trino_submit(&addr, "SELECT 1").await.expect("POST");
    assert_eq!(one["data"], serde_json::json!([[1]]), "{one}");
    assert!(one.get("nextUri").is_none(), "{one}");

    // Fetching a page again (a client's retry) gives the same page; skipping ahead is refused.
    let first = trino_submit(&addr, "SELECT * FROM iceberg.default.weather")
        .await
        .expect("POST");
    let next = first["nextUri"].as_str().expect("nextUri");
    let path = trino_path(&addr, next).expect("own address").to_owned();
    let page = http_get(&addr, &path).await.expect("page 1");
    let again = http_get(&addr, &path).await.expect("page 1 again");
    assert_eq!(page.body, again.body);
    let (before, token) = path.rsplit_once('/').expect("a token");
    let skipped = format!("{before}/{}", token.parse::<u64>().expect("token") + 4);
    assert_eq!(http_get(&addr, &skipped).await.expect("page 5").status, 404);
    // DELETE cancels: the query is gone, and counted.
    let cancel = http_request_with(&addr, "DELETE", &path, &[], b"")
        .await
        .expect("DELETE");
    assert_eq!(cancel.status, 204);
    assert_eq!(http_get(&addr, &path).await.expect("after cancel").status, 404);
    let metrics = http_get(&addr, "/metrics").await.expect("metrics").body;
    assert_eq!(metric(&metrics, "query_server_canceled_queries_total"), Some(1.0));
    assert_eq!(metric(&metrics, "query_server_running_queries"), Some(0.0));

    // An error after rows were sent: the pages so far, then FAILED with Trino's error.
    // 30,000 numbered rows leave the window in batches of 8,192: the third one fails.
    let failing = "SELECT CAST(CASE WHEN n < 20000 THEN '1' ELSE 'x' END AS INTEGER) FROM \
                   (SELECT row_number() OVER (ORDER BY a.ts, b.ts) AS n FROM iceberg.default.weather a \
                   CROSS JOIN (SELECT ts FROM iceberg.default.weather LIMIT 5) b)";
    let responses = statement(&addr, failing).await;
    let last = responses.last().expect("responses");
    assert_eq!(last["stats"]["state"], "FAILED", "{last}");
    assert!(
        last["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("Cannot cast")),
        "{last}"
    );
    assert_eq!(last["error"]["errorName"], "INVALID_CAST_ARGUMENT");
    assert_eq!(last["error"]["errorType"], "USER_ERROR");
    assert!(!rows(&responses).is_empty(), "no rows before the error");

    // A statement whose text never arrives whole is answered 408 when its time is up.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(&addr).await.expect("connect");
        let head = "POST /v1/statement HTTP/1.1\r\nHost: x\r\nX-Trino-User: test\r\nContent-Length: 100\r\n\r\nSELECT";
        stream.write_all(head.as_bytes()).await.expect("write");
        let started = std::time::Instant::now();
        let mut answer = vec![0; 256];
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut answer))
            .await
            .expect("answered within the timeout")
            .expect("read");
        assert!(String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 408"));
        assert!(started.elapsed() >= Duration::from_millis(900));
    }

    // No user, no query; a write is refused as Trino refuses one, and nothing changed.
    let anonymous = http_request_with(&addr, "POST", "/v1/statement", &[], b"SELECT 1")
        .await
        .expect("POST");
    assert_eq!(anonymous.status, 400);
    let delete = statement(&addr, "DELETE FROM iceberg.default.weather").await;
    assert_eq!(delete.last().expect("response")["error"]["errorName"], "NOT_SUPPORTED");
    let count = rows(&statement(&addr, "SELECT count(*) FROM iceberg.default.weather").await);
    assert_eq!(count, vec![serde_json::json!([total])]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_over_their_time_or_memory_fail_and_sigterm_drains() {
    let mut harness = Harness::start().await;
    harness.commit(0, READINGS_PER_COMMIT).await;
    let (server, addr) = harness.server(&["--query-timeout", "1ms"]);
    let responses = statement(&addr, "SELECT count(*) FROM iceberg.default.weather").await;
    let last = responses.last().expect("responses");
    assert_eq!(last["error"]["errorName"], "EXCEEDED_TIME_LIMIT", "{last}");
    assert_eq!(last["error"]["errorType"], "INSUFFICIENT_RESOURCES");

    // A grouping over more memory than a query may hold fails, and the server goes on.
    drop(server);
    let (server, addr) = harness.server(&["--query-memory-limit", "65536"]);
    let grouped = "SELECT city, ts, count(*) FROM iceberg.default.weather GROUP BY city, ts ORDER BY ts";
    let last = statement(&addr, grouped).await.pop().expect("responses");
    assert_eq!(last["error"]["errorName"], "EXCEEDED_LOCAL_MEMORY_LIMIT", "{last}");
    let count = rows(&statement(&addr, "SELECT count(*) FROM iceberg.default.weather").await);
    assert_eq!(count, vec![serde_json::json!([READINGS_PER_COMMIT])]);
    // Grouping by the city on the dictionary's keys holds a few groups per partition: it fits.
    let cities = rows(
        &statement(
            &addr,
            "SELECT city, count(*) FROM iceberg.default.weather GROUP BY city",
        )
        .await,
    );
    let counted: u64 = cities.iter().map(|r| r[1].as_u64().expect("a count")).sum();
    assert_eq!(counted, READINGS_PER_COMMIT as u64, "{cities:?}");

    // SIGTERM with a query open: new statements are refused, the open one still pages to its
    // end, then the server exits.
    drop(server);
    let (mut server2, addr) = harness.server(&["--page-rows", "100"]);
    let first = trino_submit(&addr, "SELECT * FROM iceberg.default.weather")
        .await
        .expect("POST");
    server2.sigterm();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let refused = trino_submit(&addr, "SELECT 1").await.expect("POST while draining");
    assert_eq!(refused["error"]["errorName"], "SERVER_SHUTTING_DOWN");
    let mut next = first["nextUri"].as_str().map(str::to_owned);
    // The response to the statement may hold its first page.
    let mut fetched = first["data"].as_array().map_or(0, Vec::len);
    while let Some(uri) = next {
        let page = http_get(&addr, trino_path(&addr, &uri).expect("own address"))
            .await
            .expect("page while draining")
            .json();
        fetched += page["data"].as_array().map_or(0, Vec::len);
        next = page["nextUri"].as_str().map(str::to_owned);
    }
    assert_eq!(fetched, READINGS_PER_COMMIT);
    let status = server2.wait(Duration::from_secs(10)).expect("exits after the drain");
    assert!(status.success(), "{status}");
}

/// Trino's REST view of queries, `GET /v1/query` and `GET /v1/query/{id}`, with the field names
/// of Trino's `BasicQueryInfo`, `SessionRepresentation`, `BasicQueryStats` and `ErrorCode`
/// (`io.trino.server`, `io.trino.spi`), for the tools that poll them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rest_view_of_queries_has_trinos_field_names() {
    let mut harness = Harness::start().await;
    harness.commit(0, 300).await;
    let (_server, addr) = harness.server(&[]);
    statement(&addr, "SELECT count(*) FROM iceberg.default.weather").await;
    statement(&addr, "SELECT no_such_column FROM iceberg.default.weather").await;

    let list = http_get(&addr, "/v1/query").await.expect("/v1/query");
    assert_eq!(list.status, 200, "{}", list.body);
    let list = list.json();
    let list = list.as_array().expect("a list");
    assert_eq!(list.len(), 2, "{list:?}");
    let keys = |value: &Value| -> Vec<String> {
        let mut keys: Vec<String> = value.as_object().expect("an object").keys().cloned().collect();
        keys.sort();
        keys
    };
    let sorted = |names: &[&str]| -> Vec<String> {
        let mut names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        names.sort();
        names
    };
    // Every field of Trino's BasicQueryInfo but preparedQuery and updateType (absent there too
    // when empty).
    let basic = sorted(&[
        "queryId",
        "session",
        "resourceGroupId",
        "state",
        "scheduled",
        "self",
        "query",
        "queryStats",
        "errorType",
        "errorCode",
        "queryType",
        "retryPolicy",
    ]);
    let (failed, finished) = (&list[0], &list[1]);
    assert_eq!(keys(finished), basic);
    assert_eq!(finished["state"], "FINISHED");
    assert_eq!(finished["query"], "SELECT count(*) FROM iceberg.default.weather");
    assert_eq!(finished["session"]["user"], "test");
    assert_eq!(
        finished["self"],
        format!("http://{addr}/v1/query/{}", finished["queryId"].as_str().expect("id"))
    );
    for field in [
        "createTime",
        "endTime",
        "queuedTime",
        "elapsedTime",
        "executionTime",
        "totalDrivers",
        "queuedDrivers",
        "runningDrivers",
        "completedDrivers",
        "rawInputDataSize",
        "rawInputPositions",
        "physicalInputDataSize",
        "totalCpuTime",
        "totalScheduledTime",
        "fullyBlocked",
        "blockedReasons",
        "progressPercentage",
    ] {
        assert!(
            finished["queryStats"].get(field).is_some(),
            "queryStats.{field} missing"
        );
    }
    let elapsed = finished["queryStats"]["elapsedTime"].as_str().expect("a duration");
    assert!(
        elapsed.ends_with("ms") || elapsed.ends_with('s'),
        "airlift's form, as 1.50s: {elapsed}"
    );
    assert!(
        finished["queryStats"]["rawInputPositions"].as_u64() > Some(0),
        "{finished}"
    );
    assert_eq!(failed["state"], "FAILED");
    assert_eq!(failed["errorType"], "USER_ERROR");
    assert_eq!(
        failed["errorCode"],
        serde_json::json!({ "code": 47, "name": "COLUMN_NOT_FOUND", "type": "USER_ERROR" })
    );

    let id = failed["queryId"].as_str().expect("id");
    let info = http_get(&addr, &format!("/v1/query/{id}"))
        .await
        .expect("one query")
        .json();
    for field in ["fieldNames", "failureInfo", "finalQueryInfo", "warnings"] {
        assert!(info.get(field).is_some(), "QueryInfo.{field} missing: {info}");
    }
    assert_eq!(info["finalQueryInfo"], true);
    assert_eq!(http_get(&addr, "/v1/query/nope").await.expect("404").status, 404);
}

/// The web UI as a person uses it, in headless Chromium: the overview lists a query Trino's
/// Python client ran, its page shows the plan and what it read, the console runs statements
/// and names a failure as Trino does, and hostile text stays text. With `UI_SCREENSHOTS` set
/// to a directory, the overview and a query page are saved there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_ui_lists_queries_shows_them_and_runs_the_console() {
    let mut harness = Harness::start().await;
    for seed in 0..3 {
        harness.commit(seed, 1_000).await;
    }
    let (_server, addr) = harness.server(&[]);
    let python = find_tool("PYTHON", "python3").expect("python3");
    let ran = Command::new(python)
        .args([
            "-c",
            "import sys, trino\n\
             c = trino.dbapi.connect(host=sys.argv[1], port=int(sys.argv[2]), user='analyst', catalog='iceberg', schema='default').cursor()\n\
             c.execute(\"SELECT city, count(*) FROM weather WHERE city <> '<b>x</b>' GROUP BY city\")\n\
             print(len(c.fetchall()))",
        ])
        .args(addr.split(':'))
        .output()
        .expect("trino client");
    assert!(ran.status.success(), "{}", String::from_utf8_lossy(&ran.stderr));

    let browser = weather_testkit::Browser::start().await.expect("browser");
    let until = async |script: &str| {
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_secs(15) {
            if browser.eval(script).await.expect("eval") == Value::Bool(true) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    };
    browser.goto(&format!("http://{addr}/")).await.expect("overview");
    assert!(
        until("return [...document.querySelectorAll('#queries td')].some(td => td.textContent === 'analyst')").await,
        "the client's query is listed"
    );
    let overview = browser.eval("return document.body.innerText").await.expect("text");
    let overview = overview.as_str().expect("text");
    assert!(overview.contains("trino-python-client"), "{overview}");
    assert!(overview.contains("<b>x</b>"), "the SQL as text: {overview}");
    assert_eq!(
        browser
            .eval("return document.querySelectorAll('#queries b').length")
            .await
            .expect("eval"),
        0
    );
    // A query run while the page is open appears in the list without a reload.
    browser
        .eval("window.__kept = true; return true")
        .await
        .expect("mark the page");
    statement(&addr, "SELECT 4242 AS later").await;
    assert!(
        until(
            "return window.__kept === true && document.getElementById('queries').textContent.includes('SELECT 4242')"
        )
        .await,
        "the list updates live"
    );
    let screenshots = std::env::var_os("UI_SCREENSHOTS").map(std::path::PathBuf::from);
    if let Some(dir) = &screenshots {
        browser
            .screenshot(&dir.join("query-server-overview.png"))
            .await
            .expect("screenshot");
    }

    // Its page: what it read and how it ran.
    browser
        .eval(
            "[...document.querySelectorAll('#queries tr')].find(tr => tr.textContent.includes('analyst')).querySelector('a').click(); return true",
        )
        .await
        .expect("click");
    assert!(until("return document.getElementById('state')?.textContent === 'FINISHED'").await);
    let page = browser.eval("return document.body.innerText").await.expect("text");
    let page = page.as_str().expect("text");
    assert!(page.contains("IcebergScan"), "the plan: {page}");
    let files = browser
        .eval("return document.getElementById('files').textContent")
        .await
        .expect("files");
    let files: Vec<u64> = files
        .as_str()
        .unwrap_or_default()
        .split(" of ")
        .filter_map(|n| n.trim().parse().ok())
        .collect();
    // Three commits, each a file in each of four hours; the filter keeps every city.
    assert_eq!(files, [12, 12], "data files read of the table's: {page}");
    if let Some(dir) = &screenshots {
        browser
            .screenshot(&dir.join("query-server-query.png"))
            .await
            .expect("screenshot");
    }

    // The console: rows with their types, a failure by Trino's name, hostile text as text.
    let run = async |sql: &str| {
        browser
            .goto(&format!("http://{addr}/ui/console"))
            .await
            .expect("console");
        let set = format!(
            "document.querySelector('textarea').value = {}; document.querySelector('form').submit(); return true",
            serde_json::to_string(sql).expect("json")
        );
        browser.eval(&set).await.expect("submit");
        assert!(
            until("return document.getElementById('count') !== null || document.getElementById('error') !== null")
                .await
        );
        browser
            .eval("return document.body.innerText")
            .await
            .expect("text")
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    let shown = run("SELECT city, count(*) AS n FROM iceberg.default.weather GROUP BY city ORDER BY city").await;
    assert!(shown.contains(&format!("{} rows", DEMO_CITIES.len())), "{shown}");
    assert!(
        shown.contains("bigint") && shown.contains("varchar"),
        "column types: {shown}"
    );
    let shown = run("SELECT nope FROM iceberg.default.weather").await;
    assert!(shown.contains("COLUMN_NOT_FOUND"), "{shown}");
    let shown = run("SELECT '<img src=x onerror=alert(1)>' AS hostile").await;
    assert!(shown.contains("<img src=x onerror=alert(1)>"), "{shown}");
    assert_eq!(
        browser
            .eval("return document.querySelectorAll('#results img').length")
            .await
            .expect("eval"),
        0
    );
}
