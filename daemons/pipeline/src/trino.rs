//! Trino found on `PATH` (its `launcher`), configured in the state directory to query the
//! table through the same JDBC catalog the sink writes to.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context;

use crate::{
    host::{free_port, on_path},
    http_client::get,
    supervisor::{Spec, Supervised},
};

/// The JVM settings of the `trino/` configuration the compose file uses.
const JVM_CONFIG: &str = include_str!("../../../trino/etc/jvm.config");

pub struct Trino {
    pub url: String,
    pub server: Supervised,
}

/// Trino's launcher: `trino-launcher` (as some packages name it) or the tarball's `launcher`.
pub fn find() -> Option<PathBuf> {
    on_path("trino-launcher").or_else(|| on_path("launcher"))
}

/// Where Trino reads the table from: the catalog database and the warehouse's S3 endpoint.
pub struct Catalog<'a> {
    pub catalog_url: &'a str,
    pub warehouse: &'a str,
    pub s3_endpoint: &'a str,
    /// The S3 keys, when the pipeline made them; otherwise Trino looks in its environment.
    pub s3_keys: Option<(&'a str, &'a str)>,
}

/// Writes the configuration into `dir/etc`, starts `launcher run` and waits until Trino
/// answers queries. Supervised: restarted if it fails.
pub async fn start(launcher: &Path, dir: &Path, notify_dir: &Path, catalog: &Catalog<'_>) -> anyhow::Result<Trino> {
    let port = free_port()?;
    let etc = dir.join("etc");
    std::fs::create_dir_all(etc.join("catalog"))?;
    std::fs::write(etc.join("config.properties"), server_config(port))?;
    std::fs::write(
        etc.join("node.properties"),
        format!(
            "node.environment=weather\nnode.id=weather-pipeline\nnode.data-dir={}\n",
            dir.join("data").display()
        ),
    )?;
    std::fs::write(etc.join("jvm.config"), JVM_CONFIG)?;
    std::fs::write(etc.join("catalog/iceberg.properties"), iceberg_catalog(catalog)?)?;
    let log = dir.join("trino.log");
    let address = format!("127.0.0.1:{port}");
    let args = vec![
        "run".to_owned(),
        format!("--etc-dir={}", etc.display()),
        format!("--data-dir={}", dir.join("data").display()),
    ];
    let spec = Spec::server("Trino", launcher.to_owned(), args, address.clone(), log.clone());
    let server = Supervised::start(spec, notify_dir, Duration::from_secs(120)).await?;
    let trino = Trino {
        url: format!("http://{address}"),
        server,
    };
    // The coordinator listens before it takes queries: /v1/info says when it has started.
    let deadline = Instant::now() + Duration::from_secs(180);
    while Instant::now() < deadline {
        let info = get(&address, "/v1/info").await.ok();
        if info
            .and_then(|body| serde_json::from_str::<serde_json::Value>(&body).ok())
            .is_some_and(|info| info["starting"] == false)
        {
            return Ok(trino);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // Given up on: stopped, not left running (and restarted) beside the pipeline that goes on
    // without it.
    trino.server.stop(Duration::from_secs(30)).await;
    anyhow::bail!("Trino was still starting after 3 minutes; see {}", log.display())
}

fn server_config(port: u16) -> String {
    format!(
        "coordinator=true\nnode-scheduler.include-coordinator=true\nhttp-server.http.port={port}\n\
         discovery.uri=http://127.0.0.1:{port}\n"
    )
}

/// `etc/catalog/iceberg.properties`: the settings of `trino/etc/catalog/iceberg.properties`
/// pointed at this pipeline's catalog database and S3 server.
fn iceberg_catalog(catalog: &Catalog<'_>) -> anyhow::Result<String> {
    let jdbc = Jdbc::from_postgres_url(catalog.catalog_url)?;
    let mut properties = vec![
        ("connector.name", "iceberg".to_owned()),
        ("iceberg.catalog.type", "jdbc".to_owned()),
        ("iceberg.jdbc-catalog.catalog-name", "weather".to_owned()),
        ("iceberg.jdbc-catalog.driver-class", "org.postgresql.Driver".to_owned()),
        ("iceberg.jdbc-catalog.connection-url", jdbc.url),
        ("iceberg.jdbc-catalog.connection-user", jdbc.user),
        (
            "iceberg.jdbc-catalog.default-warehouse-dir",
            catalog.warehouse.to_owned(),
        ),
        ("iceberg.file-format", "PARQUET".to_owned()),
        ("iceberg.compression-codec", "ZSTD".to_owned()),
        ("fs.native-s3.enabled", "true".to_owned()),
        ("s3.endpoint", catalog.s3_endpoint.to_owned()),
        ("s3.region", "us-east-1".to_owned()),
        ("s3.path-style-access", "true".to_owned()),
    ];
    if let Some(password) = jdbc.password {
        properties.push(("iceberg.jdbc-catalog.connection-password", password));
    }
    if let Some((access, secret)) = catalog.s3_keys {
        properties.push(("s3.aws-access-key", access.to_owned()));
        properties.push(("s3.aws-secret-key", secret.to_owned()));
    }
    Ok(properties.iter().map(|(k, v)| format!("{k}={v}\n")).collect())
}

/// A `postgresql://user[:password]@host[:port]/db` URL in JDBC's terms.
#[derive(Debug, PartialEq)]
struct Jdbc {
    url: String,
    user: String,
    password: Option<String>,
}

impl Jdbc {
    fn from_postgres_url(url: &str) -> anyhow::Result<Self> {
        let rest = url
            .strip_prefix("postgresql://")
            .or_else(|| url.strip_prefix("postgres://"))
            .with_context(|| format!("{url} is not a postgresql:// URL"))?;
        let (userinfo, location) = rest.rsplit_once('@').with_context(|| format!("{url} names no user"))?;
        let (user, password) = match userinfo.split_once(':') {
            Some((user, password)) => (user, Some(password.to_owned())),
            None => (userinfo, None),
        };
        Ok(Self {
            url: format!("jdbc:postgresql://{location}"),
            user: user.to_owned(),
            password,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_urls_become_jdbc_settings() {
        assert_eq!(
            Jdbc::from_postgres_url("postgresql://postgres@127.0.0.1:5433/iceberg").expect("parsed"),
            Jdbc {
                url: "jdbc:postgresql://127.0.0.1:5433/iceberg".into(),
                user: "postgres".into(),
                password: None,
            }
        );
        assert_eq!(
            Jdbc::from_postgres_url("postgres://weather:s3cr@t@db/iceberg?sslmode=require").expect("parsed"),
            Jdbc {
                url: "jdbc:postgresql://db/iceberg?sslmode=require".into(),
                user: "weather".into(),
                password: Some("s3cr@t".into()),
            }
        );
        assert!(Jdbc::from_postgres_url("mysql://root@db/iceberg").is_err());
        assert!(Jdbc::from_postgres_url("postgresql://db/iceberg").is_err());
    }

    /// The generated catalog has every key of the checked-in one (the compose file's, which
    /// differs only in where things are), and the pipeline's values.
    #[test]
    fn catalog_matches_the_checked_in_one() {
        let generated = iceberg_catalog(&Catalog {
            catalog_url: "postgresql://postgres:postgres@127.0.0.1:5433/iceberg",
            warehouse: "s3://warehouse/",
            s3_endpoint: "http://127.0.0.1:9000",
            s3_keys: Some(("weather-pipeline", "secret")),
        })
        .expect("catalog");
        let keys = |text: &str| -> std::collections::BTreeSet<String> {
            text.lines()
                .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
                .filter_map(|l| Some(l.split_once('=')?.0.to_owned()))
                .collect()
        };
        let checked_in = include_str!("../../../trino/etc/catalog/iceberg.properties");
        assert_eq!(keys(&generated), keys(checked_in));
        for line in [
            "iceberg.jdbc-catalog.connection-url=jdbc:postgresql://127.0.0.1:5433/iceberg",
            "iceberg.jdbc-catalog.default-warehouse-dir=s3://warehouse/",
            "s3.endpoint=http://127.0.0.1:9000",
            "s3.aws-access-key=weather-pipeline",
        ] {
            assert!(generated.lines().any(|l| l == line), "{line} missing from\n{generated}");
        }
    }
}
