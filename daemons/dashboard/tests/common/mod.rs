//! Shared by the dashboard's tests: a running dashboard and a database with known rows.
#![allow(dead_code)]

use chrono::{DateTime, TimeDelta, Utc};
use dashboard::Args;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use weather_testkit::{Postgres, connect};

pub struct Running {
    pub addr: String,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

pub async fn start_dashboard(database_url: &str) -> Running {
    start_dashboard_with(database_url, &[]).await
}

/// [`start_dashboard`] with further flags.
pub async fn start_dashboard_with(database_url: &str, flags: &[&str]) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let args = <Args as clap::Parser>::parse_from(["dashboard", "--database-url", database_url].iter().chain(flags));
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(dashboard::run(args, listener, shutdown.clone()));
    Running { addr, shutdown, task }
}

/// A database with the schema applied.
pub async fn database(postgres: &Postgres) -> (String, tokio_postgres::Client) {
    let url = postgres.create_database("weather").await.expect("create database");
    let mut client = connect(&url).await.expect("connect");
    weather_common::schema::migrate(&mut client).await.expect("migrate");
    (url, client)
}

pub async fn insert(client: &tokio_postgres::Client, city: &str, start: DateTime<Utc>, avg: f64, count: i64) {
    client
        .execute(
            "INSERT INTO weather (city, avg_temperature, window_start, window_end, record_count, temperature_sum, last_updated)
             VALUES ($1, $2, $3, $4, $5, $6, now() AT TIME ZONE 'UTC')",
            &[&city, &avg, &start.naive_utc(), &(start + TimeDelta::seconds(5)).naive_utc(), &count, &(avg * count as f64)],
        )
        .await
        .expect("insert");
}

/// A recent window start, aligned to 5 s.
pub fn recent(seconds_ago: i64) -> DateTime<Utc> {
    let t = Utc::now().timestamp() - seconds_ago;
    DateTime::from_timestamp(t - t.rem_euclid(5), 0).expect("ts")
}
