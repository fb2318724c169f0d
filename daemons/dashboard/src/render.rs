//! Server-side HTML and SVG. No external scripts, fonts or styles: the page works offline.
//! maud escapes every interpolated string, so city names from the database render as text.

use chrono::{DateTime, Utc};
use maud::{DOCTYPE, Markup, PreEscaped, html};

use weather_common::reading::DEMO_CITIES;

use crate::db::{Point, Snapshot};

/// Charts on one page at most; the rest are summarised in a line.
pub const MAX_CHARTS: usize = 60;

const WIDTH: f64 = 600.0;
const HEIGHT: f64 = 220.0;
const LEFT: f64 = 60.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 14.0;
const BOTTOM: f64 = 36.0;

/// The page; `sql_url`: the SQL web UI it links to.
pub fn page(snapshot: &Snapshot, stale_after_ms: u64, sql_url: Option<&str>) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { "Weather dashboard" }
                style { (PreEscaped(STYLE)) }
            }
            body data-last-update=(last_update_ms(snapshot)) data-stale-ms=(stale_after_ms) {
                header {
                    h1 { "Weather dashboard" }
                    p.sub {
                        "Average temperature per city in 5-second windows, live from PostgreSQL"
                        @if let Some(url) = sql_url { " · " a href=(url) { "SQL on the lakehouse" } }
                    }
                }
                div #banner role="status" hidden {}
                section #stats { (stats(snapshot)) }
                main #charts { (charts(snapshot)) }
                script { (PreEscaped(SCRIPT)) }
            }
        }
    }
}

/// The page's Content-Security-Policy: nothing but its own inline script and style (allowed by
/// their hashes, so an injected one would not run) and its own endpoints.
pub fn content_security_policy() -> &'static str {
    static POLICY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    POLICY.get_or_init(|| {
        use base64::Engine;
        use sha2::{Digest, Sha256};
        let hash = |text: &str| base64::engine::general_purpose::STANDARD.encode(Sha256::digest(text.as_bytes()));
        format!(
            "default-src 'none'; script-src 'sha256-{}'; style-src 'sha256-{}'; connect-src 'self'; \
             img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            hash(SCRIPT),
            hash(STYLE)
        )
    })
}

pub fn last_update_ms(snapshot: &Snapshot) -> i64 {
    snapshot.last_updated.map_or(0, |t| t.timestamp_millis())
}

pub fn stats(snapshot: &Snapshot) -> Markup {
    html! {
        div.stat { span.value #stat-cities { (snapshot.cities.len()) } span.label { "cities" } }
        div.stat { span.value #stat-points { (snapshot.points()) } span.label { "data points" } }
        div.stat { span.value #stat-readings { (snapshot.readings()) } span.label { "readings" } }
        div.stat {
            span.value #stat-average { @match snapshot.average() { Some(avg) => (format!("{avg:.1} °F")), None => "–" } }
            span.label { "average temperature" }
        }
        div.stat {
            span.value #stat-updated { @match snapshot.last_updated { Some(t) => (t.format("%H:%M:%S UTC")), None => "never" } }
            span.label { "last update" }
        }
    }
}

/// The demo cities first (even without data yet), then every other city by name.
pub fn charts(snapshot: &Snapshot) -> Markup {
    let others = snapshot.cities.keys().filter(|c| !DEMO_CITIES.contains(&c.as_str()));
    let order: Vec<&str> = DEMO_CITIES.iter().copied().chain(others.map(String::as_str)).collect();
    let hidden = order.len().saturating_sub(MAX_CHARTS);
    html! {
        @for city in order.iter().take(MAX_CHARTS) {
            (chart(city, snapshot.cities.get(*city).map_or(&[][..], Vec::as_slice)))
        }
        @if hidden > 0 {
            p.more { (hidden) " more cities not shown; see /api/weather" }
        }
    }
}

fn chart(city: &str, points: &[Point]) -> Markup {
    html! {
        figure.chart data-city=(city) {
            figcaption {
                span.city { (city) }
                @if let Some(last) = points.last() {
                    span.last { (format!("{:.1} °F", last.temperature)) }
                }
            }
            @if points.is_empty() {
                p.empty { "no data yet" }
            } @else {
                (svg(points))
            }
        }
    }
}

fn svg(points: &[Point]) -> Markup {
    let (t0, t1) = (points[0].time, points[points.len() - 1].time);
    let (mut lo, mut hi) = points.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| {
        (lo.min(p.temperature), hi.max(p.temperature))
    });
    if hi - lo < 1.0 {
        lo -= 0.5;
        hi += 0.5;
    }
    let span_ms = (t1 - t0).num_milliseconds().max(1) as f64;
    let x = |t: DateTime<Utc>| LEFT + (t - t0).num_milliseconds() as f64 / span_ms * (WIDTH - LEFT - RIGHT);
    let y = |v: f64| TOP + (hi - v) / (hi - lo) * (HEIGHT - TOP - BOTTOM);
    let line: String = points
        .iter()
        .map(|p| {
            format!(
                "{:.1},{:.1}",
                if points.len() == 1 { WIDTH / 2.0 } else { x(p.time) },
                y(p.temperature)
            )
        })
        .collect::<Vec<_>>()
        .join(" ");
    let y_ticks: Vec<f64> = (0..=3).map(|i| lo + (hi - lo) * f64::from(i) / 3.0).collect();
    let prec = if hi - lo < 6.0 { 1 } else { 0 };
    let x_ticks: Vec<DateTime<Utc>> = if points.len() == 1 {
        vec![t0]
    } else {
        (0..=3).map(|i| t0 + (t1 - t0) * i / 3).collect()
    };
    let last = &points[points.len() - 1];
    let last_x = if points.len() == 1 { WIDTH / 2.0 } else { x(last.time) };
    html! {
        svg viewBox=(format!("0 0 {WIDTH} {HEIGHT}")) role="img" aria-label="temperature over time" {
            @for v in &y_ticks {
                line.grid x1=(LEFT) x2=(WIDTH - RIGHT) y1=(format!("{:.1}", y(*v))) y2=(format!("{:.1}", y(*v))) {}
                text.axis x=(LEFT - 8.0) y=(format!("{:.1}", y(*v) + 6.0)) text-anchor="end" { (format!("{v:.prec$}")) }
            }
            @for (i, t) in x_ticks.iter().enumerate() {
                @let tx = if points.len() == 1 { WIDTH / 2.0 } else { x(*t) };
                // Outer labels hug the plot's edges instead of overflowing them.
                @let anchor = if x_ticks.len() == 1 { "middle" } else if i == 0 { "start" } else if i + 1 == x_ticks.len() { "end" } else { "middle" };
                text.axis x=(format!("{tx:.1}")) y=(HEIGHT - 8.0) text-anchor=(anchor) { (t.format("%H:%M:%S")) }
            }
            polyline.series points=(line) {}
            circle.lastpoint cx=(format!("{last_x:.1}")) cy=(format!("{:.1}", y(last.temperature))) r="4" {}
        }
    }
}

const STYLE: &str = r#"
:root { color-scheme: dark; --bg: #0f1419; --panel: #1a2129; --text: #e6e9ec; --muted: #8b96a3; --accent: #4fc3f7; --warn: #ffb74d; }
* { box-sizing: border-box; }
body { margin: 0; padding: 1rem; background: var(--bg); color: var(--text); font: 15px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; }
header h1 { margin: 0; font-size: 1.5rem; }
.sub { margin: .2rem 0 1rem; color: var(--muted); }
#banner { margin-bottom: 1rem; padding: .6rem .8rem; border-radius: 6px; background: #4a3513; color: var(--warn); }
#stats { display: flex; flex-wrap: wrap; gap: .75rem; margin-bottom: 1rem; }
.stat { flex: 1 1 8rem; background: var(--panel); border-radius: 8px; padding: .6rem .8rem; }
.stat .value { display: block; font-size: 1.3rem; font-weight: 600; }
.stat .label { color: var(--muted); font-size: .85rem; }
#charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: .75rem; }
.chart { margin: 0; background: var(--panel); border-radius: 8px; padding: .6rem; }
.chart figcaption { display: flex; justify-content: space-between; margin-bottom: .3rem; }
.chart .city { font-weight: 600; overflow-wrap: anywhere; }
.chart .last { color: var(--accent); }
.chart svg { width: 100%; height: auto; display: block; }
.chart .empty { color: var(--muted); margin: 2rem 0; text-align: center; }
.grid { stroke: #2c3742; stroke-width: 1; }
.axis { fill: var(--muted); font-size: 18px; }
.series { fill: none; stroke: var(--accent); stroke-width: 2; }
.lastpoint { fill: var(--accent); }
.more { color: var(--muted); }
"#;

/// Swaps the server-rendered fragments on each pushed update; falls back to polling while the
/// event stream is down; shows when the data is stale.
const SCRIPT: &str = r#"
(function () {
  var charts = document.getElementById('charts'), stats = document.getElementById('stats');
  var banner = document.getElementById('banner');
  var last = Number(document.body.dataset.lastUpdate) || 0, staleMs = Number(document.body.dataset.staleMs);
  var connected = true, poll = null;
  function apply(u) { charts.innerHTML = u.charts; stats.innerHTML = u.stats; last = u.last_update_ms || last; render(); }
  function render() {
    var text = '';
    if (!connected) text = 'Live connection lost, retrying (polling meanwhile)';
    else if (last && Date.now() - last > staleMs) text = 'Data is stale: no update for ' + Math.round((Date.now() - last) / 1000) + ' s';
    banner.textContent = text; banner.hidden = !text;
  }
  function setConnected(ok) {
    connected = ok;
    if (!ok && !poll) poll = setInterval(function () { fetch('/fragments').then(function (r) { return r.json(); }).then(apply).catch(function () {}); }, 5000);
    if (ok && poll) { clearInterval(poll); poll = null; }
    render();
  }
  var events = new EventSource('/events');
  events.addEventListener('update', function (e) { setConnected(true); apply(JSON.parse(e.data)); });
  events.onopen = function () { setConnected(true); };
  events.onerror = function () { setConnected(false); };
  setInterval(render, 1000);
  render();
})();
"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(cities: &[(&str, &[f64])]) -> Snapshot {
        let base = DateTime::from_timestamp(1_800_000_000, 0).expect("ts");
        let mut snapshot = Snapshot::default();
        for (city, temperatures) in cities {
            let points = temperatures
                .iter()
                .enumerate()
                .map(|(i, t)| Point {
                    time: base + chrono::TimeDelta::seconds(5 * i as i64),
                    temperature: *t,
                    count: 2,
                })
                .collect();
            snapshot.cities.insert((*city).to_owned(), points);
        }
        snapshot.last_updated = Some(base);
        snapshot
    }

    #[test]
    fn city_names_are_escaped() {
        let html = page(
            &snapshot(&[("<script>alert(1)</script>", &[50.0, 60.0])]),
            15_000,
            Some("http://127.0.0.1:8080/"),
        )
        .into_string();
        assert!(html.contains(r#"<a href="http://127.0.0.1:8080/">SQL on the lakehouse</a>"#));
        assert!(!html.contains("<script>alert(1)</script>"));
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    }

    #[test]
    fn demo_cities_always_have_a_chart_and_others_follow() {
        let html = charts(&snapshot(&[("Boston", &[50.0]), ("Albany", &[40.0, 41.0])])).into_string();
        assert_eq!(html.matches("<figure").count(), 11);
        let boston = html.find("data-city=\"Boston\"").expect("Boston");
        let albany = html.find("data-city=\"Albany\"").expect("Albany");
        assert!(boston < albany, "demo cities first");
        assert_eq!(html.matches("<svg").count(), 2, "charts only where there is data");
    }

    #[test]
    fn stats_summarise_the_snapshot() {
        let s = snapshot(&[("Boston", &[50.0, 70.0]), ("Miami", &[90.0])]);
        assert_eq!((s.points(), s.readings()), (3, 6));
        assert_eq!(s.average(), Some(70.0));
        let html = stats(&s).into_string();
        assert!(html.contains("70.0 °F"), "{html}");
    }
}
