//! The Python side: moto as S3, and PyIceberg as another reader and writer of the table.

use super::*;

/// An S3-compatible server (moto, from PyPI) with the bucket `warehouse`; any key pair works.
pub struct S3Server {
    pub endpoint: String,
    _child: ChildGuard,
}

impl S3Server {
    pub async fn start() -> anyhow::Result<Self> {
        let binary =
            find_tool("MOTO_SERVER", "moto_server").context("moto_server not found: pip install 'moto[server]'")?;
        let port = free_port();
        let child = ChildGuard::spawn(
            "moto_server",
            Command::new(binary)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )?;
        let addr = format!("127.0.0.1:{port}");
        wait_for_port(&addr, Duration::from_secs(60))?;
        let created = http_request(&addr, "PUT", "/warehouse", b"").await?;
        anyhow::ensure!(
            created.status == 200,
            "creating the bucket: {} {}",
            created.status,
            created.body
        );
        Ok(Self {
            endpoint: format!("http://{addr}"),
            _child: child,
        })
    }
}

/// Runs `tests/pyiceberg_check.py`, an independent reader of the table, and returns what it
/// found (JSON).
pub fn pyiceberg_check(
    catalog_url: &str,
    catalog_name: &str,
    s3_endpoint: &str,
    table: &str,
) -> anyhow::Result<serde_json::Value> {
    pyiceberg_check_with(&[catalog_url, catalog_name, s3_endpoint, table])
}

/// Every row of the table as `(city, temperature)`, read by PyIceberg.
pub fn pyiceberg_readings(
    catalog_url: &str,
    catalog_name: &str,
    s3_endpoint: &str,
    table: &str,
) -> anyhow::Result<Vec<(String, f64)>> {
    let found = pyiceberg_check_with(&[catalog_url, catalog_name, s3_endpoint, table, "--readings"])?;
    Ok(serde_json::from_value(found["readings"].clone())?)
}

/// [`pyiceberg_check`] with the script's arguments as they are, options included.
pub fn pyiceberg_check_with(args: &[&str]) -> anyhow::Result<serde_json::Value> {
    python_json("pyiceberg_check.py", args)
}

/// Another engine writing to the table: PyIceberg runs `operations` on it in order (see
/// `pyiceberg_writer.py`: `append:N:CITY`, `expire-all`).
pub fn pyiceberg_write(
    catalog_url: &str,
    catalog_name: &str,
    s3_endpoint: &str,
    table: &str,
    operations: &[&str],
) -> anyhow::Result<serde_json::Value> {
    let mut args = vec![catalog_url, catalog_name, s3_endpoint, table];
    args.extend(operations);
    python_json("pyiceberg_writer.py", &args)
}

/// Runs one of this crate's Python scripts and parses what it prints as JSON.
fn python_json(script: &str, args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join(script);
    let python = find_tool("PYTHON", "python3").context("python3 not found")?;
    let output = Command::new(python).arg(&script).args(args).output()?;
    anyhow::ensure!(
        output.status.success(),
        "{} failed: {}\n{}",
        script.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(serde_json::from_slice(&output.stdout)?)
}
