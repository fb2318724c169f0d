//! The page in a real browser (headless Chromium): ten charts, live updates pushed within two
//! seconds of a NOTIFY, and a hostile city name that stays text.

mod common;

use std::time::{Duration, Instant};

use chrono::TimeDelta;
use weather_common::reading::DEMO_CITIES;
use weather_testkit::{Browser, Postgres};

use common::{database, insert, recent, start_dashboard};

async fn wait_until(browser: &Browser, script: &str, timeout: Duration) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < timeout {
        if browser.eval(script).await.expect("eval") == serde_json::Value::Bool(true) {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread")]
async fn page_shows_ten_charts_and_updates_live_without_reload() {
    let postgres = Postgres::start().expect("PostgreSQL");
    let (url, client) = database(&postgres).await;
    let t0 = recent(120);
    for (i, city) in DEMO_CITIES.iter().enumerate() {
        for w in 0..6 {
            insert(
                &client,
                city,
                t0 + TimeDelta::seconds(5 * w),
                40.0 + i as f64 * 5.0 + w as f64,
                10,
            )
            .await;
        }
    }
    let dashboard = start_dashboard(&url).await;
    let browser = Browser::start().await.expect("browser");
    browser
        .goto(&format!("http://{}/", dashboard.addr))
        .await
        .expect("open page");

    let charts = "return document.querySelectorAll('figure.chart svg polyline').length === 10";
    assert!(
        wait_until(&browser, charts, Duration::from_secs(10)).await.is_some(),
        "10 charts with lines"
    );
    browser
        .eval("window.__loaded = true; return true")
        .await
        .expect("mark page");

    // A new window for Boston plus the aggregator's notification.
    insert(&client, "Boston", t0 + TimeDelta::seconds(30), 99.5, 4).await;
    client.batch_execute("NOTIFY weather_updates").await.expect("notify");
    let updated = "return document.querySelector('figure[data-city=\"Boston\"] .last').textContent.includes('99.5')";
    let took = wait_until(&browser, updated, Duration::from_secs(2)).await;
    assert!(took.is_some(), "page updated within 2 s of NOTIFY");
    assert_eq!(
        browser.eval("return window.__loaded === true").await.expect("eval"),
        true,
        "no reload happened"
    );
    eprintln!("live update visible after {took:?}");

    // A hostile name arrives through the live path too: it must show as text, run nothing.
    let evil = "<img src=x onerror=\"window.__xss=1\">";
    insert(&client, evil, t0 + TimeDelta::seconds(30), 70.0, 1).await;
    client.batch_execute("NOTIFY weather_updates").await.expect("notify");
    let shown = "return document.querySelectorAll('figure.chart').length === 11";
    assert!(
        wait_until(&browser, shown, Duration::from_secs(2)).await.is_some(),
        "new city appears"
    );
    let caption = browser
        .eval("return [...document.querySelectorAll('figure.chart .city')].map(e => e.textContent)")
        .await
        .expect("eval");
    assert!(
        caption.as_array().is_some_and(|c| c.iter().any(|n| n == evil)),
        "{caption}"
    );
    assert_eq!(
        browser.eval("return window.__xss === undefined").await.expect("eval"),
        true,
        "no script ran"
    );

    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    browser.screenshot(&shot).await.expect("screenshot");
    eprintln!("screenshot: {}", shot.display());
    dashboard.shutdown.cancel();
}
