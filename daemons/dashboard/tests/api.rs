//! The dashboard against a private PostgreSQL cluster with known rows.

mod common;

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use common::{database, insert, recent, start_dashboard, start_dashboard_with};
use weather_testkit::{Postgres, http_get, http_request};

#[tokio::test(flavor = "multi_thread")]
async fn api_returns_exact_rows_filters_by_since_and_refuses_bad_input() {
    let postgres = Postgres::start().expect("PostgreSQL");
    let (url, client) = database(&postgres).await;
    let t0 = recent(60);
    insert(&client, "Boston", t0, 50.5, 3).await;
    insert(&client, "Boston", t0 + TimeDelta::seconds(5), 51.25, 2).await;
    insert(&client, "Miami", t0 + TimeDelta::seconds(5), 80.0, 1).await;
    // Outside the one-hour history: not returned.
    insert(&client, "Miami", t0 - TimeDelta::hours(2), 1.0, 1).await;

    let dashboard = start_dashboard(&url).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let response = http_get(&dashboard.addr, "/api/weather").await.expect("api");
    assert_eq!(response.status, 200, "{}", response.body);
    let ts = |t: DateTime<Utc>| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string();
    let expected = serde_json::json!({
        "cities": ["Boston", "Miami"],
        "data": {
            "Boston": [
                {"time": ts(t0), "temperature": 50.5},
                {"time": ts(t0 + TimeDelta::seconds(5)), "temperature": 51.25},
            ],
            "Miami": [{"time": ts(t0 + TimeDelta::seconds(5)), "temperature": 80.0}],
        }
    });
    assert_eq!(response.json(), expected);

    let since = http_get(&dashboard.addr, &format!("/api/weather/latest?since={}", ts(t0)))
        .await
        .expect("latest");
    assert_eq!(since.status, 200);
    assert_eq!(
        since.json(),
        serde_json::json!({
            "cities": ["Boston", "Miami"],
            "data": {
                "Boston": [{"time": ts(t0 + TimeDelta::seconds(5)), "temperature": 51.25}],
                "Miami": [{"time": ts(t0 + TimeDelta::seconds(5)), "temperature": 80.0}],
            }
        })
    );
    let none = http_get(
        &dashboard.addr,
        &format!("/api/weather/latest?since={}", ts(t0 + TimeDelta::seconds(5))),
    )
    .await
    .expect("latest");
    assert_eq!(none.json(), serde_json::json!({"cities": [], "data": {}}));

    for bad in [
        "/api/weather/latest",
        "/api/weather/latest?since=yesterday",
        "/api/weather/latest?since=2026-13-01T00:00:00Z",
    ] {
        let response = http_get(&dashboard.addr, bad).await.expect("request");
        assert_eq!(response.status, 400, "{bad}");
        assert!(
            response.json()["message"]
                .as_str()
                .unwrap_or_default()
                .contains("since"),
            "{bad}"
        );
    }
    assert_eq!(
        http_get(&dashboard.addr, "/health").await.expect("health").json()["status"],
        "healthy"
    );
    assert_eq!(http_get(&dashboard.addr, "/nope").await.expect("404").status, 404);
    assert_eq!(
        http_request(&dashboard.addr, "POST", "/api/weather", b"")
            .await
            .expect("405")
            .status,
        405
    );

    let page = http_get(&dashboard.addr, "/").await.expect("page");
    assert_eq!(page.status, 200);
    assert_eq!(
        page.body.matches("<figure").count(),
        10,
        "the ten demo cities, Boston and Miami among them"
    );
    assert!(
        !page.body.contains("http://") && !page.body.contains("https://"),
        "nothing loaded from elsewhere"
    );
    dashboard.shutdown.cancel();
    dashboard.task.await.expect("join").expect("clean exit");
}

#[tokio::test(flavor = "multi_thread")]
async fn malicious_city_names_render_as_text() {
    let postgres = Postgres::start().expect("PostgreSQL");
    let (url, client) = database(&postgres).await;
    let evil = "<script>alert(1)</script>";
    insert(&client, evil, recent(30), 70.0, 1).await;
    let dashboard = start_dashboard(&url).await;
    let mut page = String::new();
    for _ in 0..50 {
        page = http_get(&dashboard.addr, "/").await.expect("page").body;
        if page.contains("&lt;script&gt;") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "escaped in the page"
    );
    assert!(!page.contains(evil), "never raw");
    // And were one to slip through, the browser would not run it: only the page's own script
    // and style, by hash, and nothing sniffed into another type.
    let response = http_get(&dashboard.addr, "/").await.expect("page");
    let policy = response.header("content-security-policy").expect("CSP").to_owned();
    assert!(policy.contains("default-src 'none'"), "{policy}");
    assert!(policy.contains("script-src 'sha256-"), "{policy}");
    assert!(!policy.contains("unsafe-inline"), "{policy}");
    let api = http_get(&dashboard.addr, "/api/weather").await.expect("api");
    assert_eq!(api.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(api.header("referrer-policy"), Some("no-referrer"));
    let fragments = http_get(&dashboard.addr, "/fragments").await.expect("fragments").json();
    assert!(
        !fragments["charts"].as_str().unwrap_or_default().contains(evil),
        "escaped in pushed updates"
    );
    assert_eq!(
        http_get(&dashboard.addr, "/api/weather").await.expect("api").json()["cities"][0],
        evil,
        "JSON keeps the name"
    );
    dashboard.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread")]
async fn starts_on_an_empty_database_before_the_aggregator() {
    let postgres = Postgres::start().expect("PostgreSQL");
    let url = postgres.create_database("weather").await.expect("create database");
    let dashboard = start_dashboard(&url).await;
    let response = http_get(&dashboard.addr, "/api/weather").await.expect("api");
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(response.json(), serde_json::json!({"cities": [], "data": {}}));
    dashboard.shutdown.cancel();
    dashboard.task.await.expect("join").expect("clean exit");
}

/// A PostgreSQL that stops answering (connections open, nothing said) gives the API a 503
/// within the query timeout, never a hang, and the page keeps serving its last data; once the
/// database answers again, so does the API.
#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_database_gives_a_fast_503() {
    let postgres = Postgres::start().expect("PostgreSQL");
    let (url, client) = database(&postgres).await;
    insert(&client, "Boston", recent(30), 50.0, 1).await;
    let dashboard = start_dashboard_with(&url, &["--query-timeout", "1s"]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        http_get(&dashboard.addr, "/api/weather").await.expect("api").status,
        200
    );

    postgres.freeze().expect("freeze");
    let started = std::time::Instant::now();
    let answer = tokio::time::timeout(Duration::from_secs(10), http_get(&dashboard.addr, "/api/weather")).await;
    let page = tokio::time::timeout(Duration::from_secs(10), http_get(&dashboard.addr, "/")).await;
    let elapsed = started.elapsed();
    postgres.thaw().expect("thaw");
    let answer = answer.expect("the API answered").expect("response");
    assert_eq!(answer.status, 503, "{}", answer.body);
    assert!(elapsed < Duration::from_secs(3), "answered in {elapsed:?}");
    let page = page.expect("the page answered").expect("response");
    assert_eq!(page.status, 200);
    assert!(page.body.contains("Boston"), "the page shows what it had");

    let mut recovered = false;
    for _ in 0..50 {
        if http_get(&dashboard.addr, "/api/weather")
            .await
            .is_ok_and(|r| r.status == 200)
        {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(recovered, "the API answers again once PostgreSQL does");
    drop(client);
}
