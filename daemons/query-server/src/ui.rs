//! The web UI on the SQL port, where Trino's users find one: an overview of the server, its
//! table and its recent queries (updated live), a page per query, and a read-only SQL console.
//! Server-rendered: maud escapes every interpolated string, so SQL text, city names and error
//! messages render as text. No external assets: the one script and stylesheet are served from
//! here, under a Content-Security-Policy that allows nothing else.

use std::time::Duration;

use maud::{DOCTYPE, Markup, html};

use crate::{
    catalog::TableSummary,
    history::Record,
    protocol::State,
    query_info::{HIDDEN, state},
};

/// Every UI response's policy: its own script, stylesheet and endpoints, nothing else.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// Replaces the query list with a fresh one every two seconds, while the page is shown.
pub const SCRIPT: &str = r#""use strict";
const list = document.getElementById("queries");
async function refresh() {
  if (document.hidden || !list) return;
  try {
    const response = await fetch("/ui/queries", { cache: "no-store" });
    if (response.ok) list.innerHTML = await response.text();
  } catch (e) { /* the next tick tries again */ }
}
if (list) setInterval(refresh, 2000);
"#;

pub const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222}\
h1{font-size:1.4rem;margin:0 0 .3rem}h2{font-size:1.1rem;margin:1.4rem 0 .4rem}\
nav a{margin-right:1rem}.sub{color:#666;margin:0 0 1rem}\
table{border-collapse:collapse;width:100%;font-size:.9rem}\
th,td{text-align:left;padding:.25rem .5rem;border-bottom:1px solid #ddd;vertical-align:top}\
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}\
pre{background:#f7f7f7;padding:.6rem;overflow:auto;white-space:pre-wrap;word-break:break-word}\
.stats{display:flex;gap:1.5rem;flex-wrap:wrap}.stat b{display:block;font-size:1.3rem}\
.FAILED{color:#b00020}.FINISHED{color:#1b5e20}.RUNNING{color:#0d47a1}\
table.kv{width:auto}table.kv th{min-width:14rem}\
textarea{width:100%;font-family:monospace;font-size:.95rem}.error{color:#b00020}";

/// What the overview shows.
pub struct Overview<'a> {
    pub version: &'a str,
    pub uptime: Duration,
    pub catalog: &'a str,
    /// The table, or why it could not be read.
    pub table: Result<TableSummary, String>,
    pub records: &'a [Record],
    pub show_sql: bool,
}

fn page(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · query-server" }
                link rel="stylesheet" href="/ui/style.css";
            }
            body {
                nav { a href="/" { "Overview" } a href="/ui/console" { "SQL console" } a href="/v1/query" { "/v1/query" } }
                (body)
                script src="/ui/app.js" {}
            }
        }
    }
}

pub fn overview(o: &Overview<'_>) -> Markup {
    let count = |s: State| o.records.iter().filter(|r| r.state == s).count();
    page(
        "Overview",
        html! {
            h1 { "query-server" }
            p.sub { "SQL on the Iceberg table over Trino's protocol · " (o.version) " · up " (short(o.uptime)) " · catalog " (o.catalog) }
            h2 { "Table" }
            @match &o.table {
                Ok(t) => div.stats {
                    div.stat { b { (t.name) } "table" }
                    div.stat { b #snapshot { (opt(t.snapshot_id)) } "current snapshot" }
                    div.stat { b { (opt(t.files)) } "data files" }
                    div.stat { b { (opt(t.rows)) } "rows" }
                    div.stat { b { (t.last_commit.map_or("-".to_owned(), |t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())) } "last commit" }
                },
                Err(reason) => p.error { "The table could not be read: " (reason) },
            }
            h2 { "Queries" }
            div.stats {
                div.stat { b #running { (count(State::Running)) } "running" }
                div.stat { b { (count(State::Queued)) } "queued" }
                div.stat { b #finished { (count(State::Finished)) } "finished" }
                div.stat { b #failed { (count(State::Failed)) } "failed" }
            }
            p.sub { "The last " (o.records.len()) " kept, newest first; updated every two seconds." }
            div #queries { (queries(o.records, o.show_sql)) }
        },
    )
}

/// The list of queries: the overview's live part.
pub fn queries(records: &[Record], show_sql: bool) -> Markup {
    html! {
        table {
            thead { tr {
                th { "query" } th { "state" } th { "user" } th { "source" } th { "SQL" }
                th { "elapsed" } th { "rows" } th { "files read" } th { "bytes read" }
            } }
            tbody {
                @for r in records {
                    tr {
                        td { a href={ "/ui/query/" (r.id) } { (r.id) } }
                        td class=(state(r.state)) { (state(r.state)) }
                        td { (r.user) }
                        td { (r.source.as_deref().unwrap_or("")) }
                        td { code { (shortened(if show_sql { &r.sql } else { HIDDEN }, 120)) } }
                        td.num { (short(r.elapsed())) }
                        td.num { (r.rows) }
                        td.num { (r.files_scanned) " of " (r.files_total) }
                        td.num { (r.bytes_scanned) }
                    }
                }
            }
        }
    }
}

pub fn query(r: &Record, show_sql: bool) -> Markup {
    page(
        &r.id,
        html! {
            h1 { "Query " (r.id) }
            p.sub {
                span class=(state(r.state)) #state { (state(r.state)) }
                " · user " (r.user)
                @if let Some(source) = &r.source { " · source " (source) }
                " · submitted " (r.created.format("%Y-%m-%d %H:%M:%S%.3f UTC"))
            }
            @if let Some(f) = &r.failure {
                h2 { "Error" }
                p.error #error { b { (f.code.name()) } " (" (f.code.code()) ", " (f.code.error_type()) "): " (f.message) }
            }
            h2 { "SQL" }
            pre #sql { (if show_sql { r.sql.as_str() } else { HIDDEN }) @if r.sql_truncated && show_sql { "\n-- (cut here)" } }
            h2 { "Timings" }
            table.kv { tbody {
                tr { th { "queued" } td.num { (short(Duration::ZERO)) } }
                tr { th { "planning" } td.num { (r.planning.map_or("-".to_owned(), short)) } }
                tr { th { "running" } td.num { (r.running().map_or("-".to_owned(), short)) } }
                tr { th { "total" } td.num { (short(r.elapsed())) } }
            } }
            h2 { "Output and input" }
            table.kv { tbody {
                tr { th { "rows sent" } td.num #rows { (r.rows) } }
                tr { th { "pages sent" } td.num { (r.pages) } }
                tr { th { "columns" } td { (r.columns.join(", ")) } }
                tr { th { "Iceberg data files read" } td.num #files { (r.files_scanned) " of " (r.files_total) } }
                tr { th { "rows and bytes in them" } td.num { (r.rows_scanned) " rows, " (r.bytes_scanned) " bytes" } }
                tr { th { "filter pushed to Iceberg" } td { code { (if show_sql { r.filter.as_deref().unwrap_or("none") } else { "-" }) } } }
            } }
            @if let Some(plan) = r.plan.as_ref().filter(|_| show_sql) {
                h2 { "Plan" }
                pre #plan { (plan) }
            }
        },
    )
}

/// What the console ran.
pub struct Ran {
    pub id: String,
    pub columns: Vec<(String, String)>,
    pub rows: Vec<Vec<String>>,
    /// Rows the query returned, of which `rows` are shown.
    pub total_rows: u64,
    pub elapsed: Duration,
    pub failure: Option<crate::protocol::Failure>,
}

pub fn console(sql: &str, ran: Option<&Ran>) -> Markup {
    page(
        "SQL console",
        html! {
            h1 { "SQL console" }
            p.sub { "Read-only, under the same limits as every client (queue, time, memory, size)." }
            form method="post" action="/ui/console" {
                textarea name="sql" rows="8" spellcheck="false" { (sql) }
                p { button type="submit" { "Run" } }
            }
            @if let Some(ran) = ran {
                p.sub { "Query " a href={ "/ui/query/" (ran.id) } { (ran.id) } " · " (short(ran.elapsed)) }
                @if let Some(f) = &ran.failure {
                    p.error #error { b { (f.code.name()) } ": " (f.message) }
                } @else {
                    p #count { (ran.total_rows) " rows" @if (ran.rows.len() as u64) < ran.total_rows { ", the first " (ran.rows.len()) " shown" } }
                    table #results {
                        thead { tr { @for (name, kind) in &ran.columns { th { (name) br; small { (kind) } } } } }
                        tbody { @for row in &ran.rows { tr { @for value in row { td { (value) } } } } }
                    }
                }
            }
        },
    )
}

fn opt<T: std::fmt::Display>(value: Option<T>) -> String {
    value.map_or("-".to_owned(), |v| v.to_string())
}

/// A duration as a person reads it.
fn short(d: Duration) -> String {
    match d.as_millis() {
        0..1000 => format!("{} ms", d.as_millis()),
        _ => format!("{:.2} s", d.as_secs_f64()),
    }
}

/// The first `max` characters of `text` on one line.
fn shortened(text: &str, max: usize) -> String {
    let line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match line.char_indices().nth(max) {
        Some((end, _)) => format!("{}…", &line[..end]),
        None => line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::History;

    #[test]
    fn hostile_text_renders_as_text() {
        let history = History::new(4, 1000);
        history.begin("q1", "SELECT '<script>alert(1)</script>'", "<b>mallory</b>", None);
        let records = history.list();
        let html = queries(&records, true).into_string() + &query(&records[0], true).into_string();
        assert!(!html.contains("<script>alert"), "{html}");
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(!html.contains("<b>mallory"));
    }

    #[test]
    fn a_peer_not_allowed_to_read_sql_sees_none() {
        let history = History::new(4, 1000);
        history.begin("q1", "SELECT secret FROM t", "alice", None);
        let records = history.list();
        let html = queries(&records, false).into_string() + &query(&records[0], false).into_string();
        assert!(!html.contains("secret"), "{html}");
    }

    #[test]
    fn long_sql_is_shortened_in_the_list() {
        assert_eq!(shortened("SELECT\n  a,\n  b", 100), "SELECT a, b");
        assert_eq!(shortened("SELECT abcdef", 6), "SELECT…");
    }
}
