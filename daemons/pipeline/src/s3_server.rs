//! A local S3-compatible server found on `PATH` (MinIO, else s3s-fs), with its data and its
//! generated credentials in the state directory, and the warehouse bucket created in it.

use std::{
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::{
    host::{free_port, on_path},
    http_client::{HttpAnswer, http_request},
    supervisor::{Spec, Supervised},
};

/// The bucket the Iceberg warehouse lives in.
pub const BUCKET: &str = "warehouse";
const REGION: &str = "us-east-1";

pub struct LocalS3 {
    pub endpoint: String,
    /// The credentials in the iceberg-sink's `--s3-credentials-file` format.
    pub credentials_file: PathBuf,
    pub access_key: String,
    pub secret_key: String,
    pub server: Supervised,
}

/// Starts the first S3 server found on `PATH`, supervised (restarted if it fails), sockets for
/// its readiness in `notify_dir`; `None` when there is none.
pub async fn start(dir: &Path, notify_dir: &Path) -> anyhow::Result<Option<LocalS3>> {
    let Some((name, program)) = ["minio", "s3s-fs"]
        .into_iter()
        .find_map(|name| Some((name, on_path(name)?)))
    else {
        return Ok(None);
    };
    let data = dir.join("data");
    std::fs::create_dir_all(&data)?;
    let credentials_file = dir.join("credentials");
    let (access_key, secret_key) = credentials(&credentials_file)?;
    let port = free_port()?;
    let address = format!("127.0.0.1:{port}");
    let (args, env) = if name == "minio" {
        let args = vec![
            "server".to_owned(),
            data.display().to_string(),
            "--quiet".into(),
            "--address".into(),
            address.clone(),
            "--console-address".into(),
            format!("127.0.0.1:{}", free_port()?),
        ];
        let env = vec![
            ("MINIO_ROOT_USER".to_owned(), access_key.clone()),
            ("MINIO_ROOT_PASSWORD".to_owned(), secret_key.clone()),
        ];
        (args, env)
    } else {
        tracing::warn!(
            "s3s-fs takes its keys only as arguments, where every local user can read them (ps): anyone on this \
             machine can write to the warehouse. Put MinIO on PATH instead (it gets them by environment), or take \
             s3s-fs off PATH for the directory warehouse"
        );
        let args = vec![
            "--host".to_owned(),
            "127.0.0.1".into(),
            "--port".into(),
            port.to_string(),
            "--access-key".into(),
            access_key.clone(),
            "--secret-key".into(),
            secret_key.clone(),
            data.display().to_string(),
        ];
        (args, Vec::new())
    };
    let log = dir.join(format!("{name}.log"));
    let spec = Spec {
        env,
        ..Spec::server(name, program, args, address.clone(), log)
    };
    let server = Supervised::start(spec, notify_dir, Duration::from_secs(60)).await?;
    let server = LocalS3 {
        endpoint: format!("http://{address}"),
        credentials_file,
        access_key,
        secret_key,
        server,
    };
    // A freshly started server may listen before it serves: retry for a while.
    let mut attempt = 0;
    loop {
        match create_bucket(&address, BUCKET, &server.access_key, &server.secret_key).await {
            Ok(()) => break,
            Err(e) if attempt < 50 => {
                tracing::debug!(error = %format!("{e:#}"), "creating the bucket, retrying");
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e.context(format!("creating bucket {BUCKET} on {name}"))),
        }
    }
    tracing::info!(endpoint = %server.endpoint, "{name} serves the warehouse, its data in {}", data.display());
    Ok(Some(server))
}

/// The server's access and secret key: made up on first use and kept (mode 0600) next to its
/// data, in the iceberg-sink's `--s3-credentials-file` format.
fn credentials(path: &Path) -> anyhow::Result<(String, String)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let value = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .map(str::to_owned)
    };
    if let (Some(access), Some(secret)) = (value("AWS_ACCESS_KEY_ID"), value("AWS_SECRET_ACCESS_KEY")) {
        return Ok((access, secret));
    }
    let mut random = [0u8; 20];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut random))
        .context("reading /dev/urandom")?;
    let (access, secret) = ("weather-pipeline".to_owned(), hex(&random));
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?
        .write_all(format!("AWS_ACCESS_KEY_ID={access}\nAWS_SECRET_ACCESS_KEY={secret}\n").as_bytes())?;
    Ok((access, secret))
}

/// `PUT /bucket`, signed with AWS Signature Version 4; an existing bucket is fine.
async fn create_bucket(address: &str, bucket: &str, access_key: &str, secret_key: &str) -> anyhow::Result<()> {
    let now = Utc::now();
    let path = format!("/{bucket}");
    let authorization = authorization("PUT", address, &path, access_key, secret_key, now);
    let date = now.format("%Y%m%dT%H%M%SZ").to_string();
    let headers = [
        ("x-amz-date", date.as_str()),
        ("x-amz-content-sha256", EMPTY_SHA256),
        ("Authorization", authorization.as_str()),
        ("Content-Length", "0"),
    ];
    bucket_created(&http_request(address, "PUT", &path, &headers).await?)
}

/// Whether the answer to the bucket's `PUT` leaves the bucket there.
fn bucket_created(answer: &HttpAnswer) -> anyhow::Result<()> {
    // The server is private to this state directory, so a bucket that exists is ours from an
    // earlier run: MinIO says BucketAlreadyOwnedByYou, s3s-fs BucketAlreadyExists.
    let exists = [
        "<Code>BucketAlreadyOwnedByYou</Code>",
        "<Code>BucketAlreadyExists</Code>",
    ];
    match answer.status {
        200 => Ok(()),
        409 if exists.iter().any(|code| answer.body.contains(code)) => Ok(()),
        _ => anyhow::bail!("{} {}", answer.status_line, answer.body.trim()),
    }
}

const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// The `Authorization` header of a request with an empty body and no query, signing `host`,
/// `x-amz-content-sha256` and `x-amz-date`.
fn authorization(
    method: &str,
    host: &str,
    path: &str,
    access_key: &str,
    secret_key: &str,
    now: DateTime<Utc>,
) -> String {
    let amz_date = now.format("%Y%m%dT%H%M%SZ").to_string();
    let date = now.format("%Y%m%d").to_string();
    let signed_headers = "host;x-amz-content-sha256;x-amz-date";
    let canonical = format!(
        "{method}\n{path}\n\nhost:{host}\nx-amz-content-sha256:{EMPTY_SHA256}\nx-amz-date:{amz_date}\n\n\
         {signed_headers}\n{EMPTY_SHA256}"
    );
    let scope = format!("{date}/{REGION}/s3/aws4_request");
    let to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        hex(&Sha256::digest(canonical.as_bytes()))
    );
    let signature = hex(&hmac(&signing_key(secret_key, &date, REGION, "s3"), to_sign.as_bytes()));
    format!("AWS4-HMAC-SHA256 Credential={access_key}/{scope}, SignedHeaders={signed_headers}, Signature={signature}")
}

fn signing_key(secret_key: &str, date: &str, region: &str, service: &str) -> Vec<u8> {
    let key = hmac(format!("AWS4{secret_key}").as_bytes(), date.as_bytes());
    let key = hmac(&key, region.as_bytes());
    let key = hmac(&key, service.as_bytes());
    hmac(&key, b"aws4_request")
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The signing-key example of AWS's Signature Version 4 documentation.
    #[test]
    fn signing_key_matches_the_aws_example() {
        let key = signing_key(
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            "20120215",
            "us-east-1",
            "iam",
        );
        assert_eq!(
            hex(&key),
            "f4780e2d9f65fa895f9c67b32ce1baf0b0d8a43505a000a1a9e090d414db404d"
        );
    }

    #[test]
    fn a_bucket_left_from_an_earlier_run_is_fine() {
        let answer = |status, body: &str| HttpAnswer {
            status,
            status_line: format!("HTTP/1.1 {status}"),
            body: body.to_owned(),
        };
        assert!(bucket_created(&answer(200, "")).is_ok());
        for code in ["BucketAlreadyOwnedByYou", "BucketAlreadyExists"] {
            let body = format!("<?xml version=\"1.0\"?><Error><Code>{code}</Code></Error>");
            assert!(bucket_created(&answer(409, &body)).is_ok(), "{code}");
        }
        let refused = "<Error><Code>SignatureDoesNotMatch</Code></Error>";
        let error = bucket_created(&answer(403, refused)).expect_err("refused").to_string();
        assert!(error.contains("SignatureDoesNotMatch"), "{error}");
        assert!(bucket_created(&answer(409, "<Error><Code>OperationAborted</Code></Error>")).is_err());
    }

    #[test]
    fn credentials_are_made_once_and_kept_private() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("credentials");
        let first = credentials(&path).expect("made");
        assert_eq!(first.1.len(), 40);
        assert_eq!(credentials(&path).expect("read back"), first);
        let mode = std::fs::metadata(&path).expect("file").permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);
    }
}
