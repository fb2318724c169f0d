//! The services the daemons stand on: PostgreSQL, a Kafka-protocol broker and object storage.
//! Each is used when given, started from what this machine has otherwise ([`crate::postgres`],
//! [`crate::broker`], [`crate::s3_server`]), and stopped after the daemons.

use std::path::Path;

use anyhow::Context;

use crate::{broker::Kafka, postgres::LocalPostgres, s3_server::LocalS3, supervisor};

/// What the operator gave; the rest is started.
pub struct Given {
    pub database_url: Option<String>,
    pub catalog_url: Option<String>,
    pub kafka_brokers: Option<String>,
    pub in_memory_broker: bool,
    pub partitions: i32,
    pub s3_endpoint: Option<String>,
    pub warehouse: Option<String>,
}

/// The running backbone and where the daemons find it.
pub struct Backbone {
    pub postgres: Option<LocalPostgres>,
    pub kafka: Kafka,
    pub s3: Option<LocalS3>,
    pub database_url: String,
    pub catalog_url: String,
    pub brokers: String,
    /// The warehouse's S3 endpoint, when it is on S3.
    pub s3_endpoint: Option<String>,
    pub warehouse: String,
}

impl Backbone {
    /// Starts what `given` lacks, its data under `state_dir`, readiness sockets in `notify_dir`.
    pub async fn start(given: Given, state_dir: &Path, notify_dir: &Path) -> anyhow::Result<Self> {
        let postgres = match &given.database_url {
            Some(_) => None,
            None => Some(LocalPostgres::start(&state_dir.join("postgres"), notify_dir).await?),
        };
        let database_url = given
            .database_url
            .or_else(|| postgres.as_ref().map(|p| p.url("weather")))
            .context("no database")?;
        let catalog_url = given
            .catalog_url
            .or_else(|| postgres.as_ref().map(|p| p.url("iceberg")))
            .context("--catalog-url is needed with --database-url")?;
        let kafka = Kafka::start(
            given.kafka_brokers,
            &state_dir.join("kafka"),
            notify_dir,
            given.in_memory_broker,
            given.partitions,
        )
        .await?;
        let brokers = kafka.brokers();
        let s3 = match &given.s3_endpoint {
            Some(_) => None,
            None => crate::s3_server::start(&state_dir.join("s3"), notify_dir).await?,
        };
        let s3_endpoint = given.s3_endpoint.or_else(|| s3.as_ref().map(|s3| s3.endpoint.clone()));
        let warehouse = match (given.warehouse, &s3_endpoint) {
            (Some(w), _) => w,
            (None, Some(_)) => format!("s3://{}/", crate::s3_server::BUCKET),
            (None, None) => {
                let dir = state_dir.join("warehouse");
                std::fs::create_dir_all(&dir)?;
                format!("file://{}", dir.display())
            }
        };
        Ok(Self {
            postgres,
            kafka,
            s3,
            database_url,
            catalog_url,
            brokers,
            s3_endpoint,
            warehouse,
        })
    }

    /// What a person sees of a URL: the local server's password stays in its file.
    pub fn shown(&self, url: &str) -> String {
        self.postgres.as_ref().map_or_else(|| url.to_owned(), |p| p.shown(url))
    }

    /// Stops the broker (cleanly stopped, Apache Kafka needs no log recovery next time), object
    /// storage and PostgreSQL, in that order. Whether all stopped cleanly.
    pub async fn stop(self) -> bool {
        let servers = self
            .kafka
            .into_server()
            .into_iter()
            .chain(self.s3.map(|s3| s3.server))
            .chain(self.postgres.map(|p| p.server));
        supervisor::stop_in_order(servers).await
    }
}
