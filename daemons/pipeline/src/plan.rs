//! Which daemons a run starts, with which flags and environment: decided from the run's
//! settings alone, so that it is unit-tested without starting anything.

use std::{path::PathBuf, time::Duration};

use crate::supervisor::Spec;

/// The weather-client's settings, when a run starts it.
#[derive(Debug, Clone, Copy)]
pub struct Client {
    pub rate: Option<f64>,
    /// Stop after this many batches (then it is not restarted).
    pub batches: Option<u64>,
}

/// What a run's daemons are told.
#[derive(Debug)]
pub struct Daemons<'a> {
    pub logging: &'a str,
    pub dashboard: &'a str,
    /// The query-server's address; `None` when Trino serves SQL instead.
    pub query: Option<&'a str>,
    /// Each consumer instance's name and admin address.
    pub aggregators: &'a [(&'static str, String)],
    pub sinks: &'a [(&'static str, String)],
    pub brokers: &'a str,
    pub partitions: i32,
    pub catalog_url: &'a str,
    pub warehouse: &'a str,
    pub s3_endpoint: Option<&'a str>,
    /// The local S3 server's credentials file.
    pub s3_credentials: Option<String>,
    pub database_url: &'a str,
    pub commit_interval: Duration,
    pub client: Option<Client>,
}

/// The daemons' specs, each with the binary `program` finds for its instance name. Database
/// URLs, which hold the password, go by environment, never on a command line.
pub fn specs(d: &Daemons, program: impl Fn(&'static str) -> anyhow::Result<PathBuf>) -> anyhow::Result<Vec<Spec>> {
    let spec = |name: &'static str, args: Vec<String>, env: Vec<(String, String)>| -> anyhow::Result<Spec> {
        Ok(Spec::daemon(name, program(name)?, args, env))
    };
    let kafka_env = vec![
        ("KAFKA_BROKERS".to_owned(), d.brokers.to_owned()),
        ("KAFKA_TOPIC_PARTITIONS".to_owned(), d.partitions.to_string()),
    ];
    // Where the table is, for the sink that writes it and the query-server that reads it.
    let mut catalog_env = vec![
        ("CATALOG_URL".to_owned(), d.catalog_url.to_owned()),
        ("WAREHOUSE".to_owned(), d.warehouse.to_owned()),
    ];
    if let Some(endpoint) = d.s3_endpoint {
        catalog_env.push(("S3_ENDPOINT".to_owned(), endpoint.to_owned()));
    }
    if let Some(file) = &d.s3_credentials {
        catalog_env.push(("S3_CREDENTIALS_FILE".to_owned(), file.clone()));
    }
    let database_env = ("DATABASE_URL".to_owned(), d.database_url.to_owned());
    let listen = |addr: &str| vec!["--listen".to_owned(), addr.to_owned()];
    let mut specs = vec![
        spec("logging-server", listen(d.logging), kafka_env.clone())?,
        spec(
            "dashboard",
            [
                listen(d.dashboard),
                d.query
                    .map(|query| vec!["--sql-url".to_owned(), format!("http://{query}/")])
                    .unwrap_or_default(),
            ]
            .concat(),
            vec![database_env.clone()],
        )?,
    ];
    for (name, admin) in d.aggregators {
        specs.push(spec(
            name,
            listen(admin),
            [kafka_env.clone(), vec![database_env.clone()]].concat(),
        )?);
    }
    for (name, admin) in d.sinks {
        let mut args = listen(admin);
        args.extend([
            "--commit-interval".to_owned(),
            format!("{}ms", d.commit_interval.as_millis()),
        ]);
        specs.push(spec(name, args, [kafka_env.clone(), catalog_env.clone()].concat())?);
    }
    if let Some(query) = d.query {
        specs.push(spec("query-server", listen(query), catalog_env)?);
    }
    if let Some(client) = d.client {
        let mut args = vec!["--server-url".to_owned(), format!("http://{}", d.logging)];
        if let Some(rate) = client.rate {
            args.extend(["--rate".to_owned(), rate.to_string()]);
        }
        if let Some(batches) = client.batches {
            args.extend(["--batches".to_owned(), batches.to_string()]);
        }
        let mut spec = spec("weather-client", args, vec![])?;
        spec.restart = client.batches.is_none();
        specs.push(spec);
    }
    Ok(specs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn daemons<'a>(aggregators: &'a [(&'static str, String)], sinks: &'a [(&'static str, String)]) -> Daemons<'a> {
        Daemons {
            logging: "127.0.0.1:9998",
            dashboard: "127.0.0.1:3000",
            query: Some("127.0.0.1:8080"),
            aggregators,
            sinks,
            brokers: "127.0.0.1:9092",
            partitions: 6,
            catalog_url: "postgresql://postgres:secret@127.0.0.1:5432/iceberg",
            warehouse: "s3://warehouse/",
            s3_endpoint: Some("http://127.0.0.1:9000"),
            s3_credentials: Some("/state/s3/credentials".into()),
            database_url: "postgresql://postgres:secret@127.0.0.1:5432/weather",
            commit_interval: Duration::from_secs(10),
            client: Some(Client {
                rate: None,
                batches: None,
            }),
        }
    }

    fn env<'a>(spec: &'a Spec, name: &str) -> Option<&'a str> {
        spec.env.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    #[test]
    fn every_instance_is_told_where_everything_is_and_no_password_is_on_a_command_line() {
        let aggregators = [
            ("window-aggregator@0", "127.0.0.1:7001".to_owned()),
            ("window-aggregator@1", "127.0.0.1:7002".to_owned()),
        ];
        let sinks = [("iceberg-sink", "127.0.0.1:7003".to_owned())];
        let plan = daemons(&aggregators, &sinks);
        let specs = specs(&plan, |name| Ok(PathBuf::from(format!("/bin/{name}")))).expect("specs");
        let names: Vec<&str> = specs.iter().map(|s| s.name).collect();
        assert_eq!(
            names,
            [
                "logging-server",
                "dashboard",
                "window-aggregator@0",
                "window-aggregator@1",
                "iceberg-sink",
                "query-server",
                "weather-client"
            ]
        );
        for spec in &specs {
            assert!(
                !spec.args.iter().any(|a| a.contains("secret")),
                "{}: {:?}",
                spec.name,
                spec.args
            );
        }
        let by_name = |name: &str| specs.iter().find(|s| s.name == name).expect(name);
        let aggregator = by_name("window-aggregator@1");
        assert_eq!(aggregator.args, ["--listen", "127.0.0.1:7002"]);
        assert_eq!(env(aggregator, "DATABASE_URL"), Some(plan.database_url));
        assert_eq!(env(aggregator, "KAFKA_TOPIC_PARTITIONS"), Some("6"));
        let sink = by_name("iceberg-sink");
        assert_eq!(
            sink.args,
            ["--listen", "127.0.0.1:7003", "--commit-interval", "10000ms"]
        );
        assert_eq!(env(sink, "S3_CREDENTIALS_FILE"), Some("/state/s3/credentials"));
        assert_eq!(env(sink, "DATABASE_URL"), None);
        assert_eq!(env(by_name("query-server"), "CATALOG_URL"), Some(plan.catalog_url));
        assert_eq!(env(by_name("dashboard"), "KAFKA_BROKERS"), None);
        assert_eq!(
            by_name("dashboard").args,
            ["--listen", "127.0.0.1:3000", "--sql-url", "http://127.0.0.1:8080/"]
        );
        let client = by_name("weather-client");
        assert_eq!(client.args, ["--server-url", "http://127.0.0.1:9998"]);
        assert!(client.restart);
    }

    #[test]
    fn trino_replaces_the_query_server_and_a_counted_client_is_not_restarted() {
        let plan = Daemons {
            query: None,
            client: Some(Client {
                rate: Some(2.5),
                batches: Some(3),
            }),
            ..daemons(&[], &[])
        };
        let started = specs(&plan, |name| Ok(PathBuf::from(name))).expect("specs");
        assert!(started.iter().all(|s| s.name != "query-server"));
        let dashboard = started.iter().find(|s| s.name == "dashboard").expect("dashboard");
        assert_eq!(
            dashboard.args,
            ["--listen", "127.0.0.1:3000"],
            "no link to a UI not started yet"
        );
        let client = started.last().expect("the client");
        assert_eq!(
            client.args,
            [
                "--server-url",
                "http://127.0.0.1:9998",
                "--rate",
                "2.5",
                "--batches",
                "3"
            ]
        );
        assert!(!client.restart);
        let none = specs(
            &Daemons {
                client: None,
                ..daemons(&[], &[])
            },
            |name| Ok(PathBuf::from(name)),
        )
        .expect("specs");
        assert!(none.iter().all(|s| s.name != "weather-client"));
    }
}
