//! A daemon started once its binary has been built. On a first `scripts/run` the iceberg-sink
//! and the query-server, the slowest daemons to compile (Arrow, Parquet, iceberg, DataFusion),
//! are built after the others, so that the dashboard does not wait for them: `--when-built`
//! starts each when its binary appears next to `pipeline`.

use std::{path::Path, time::Duration};

use tokio_util::sync::CancellationToken;

use crate::supervisor::{Spec, Supervised};

/// How often the binary is looked for.
const POLL: Duration = Duration::from_secs(2);

/// Waits until `spec.program` is built (or `shutdown`), then starts it; the child, or `None`
/// when stopped first or when it did not start (logged: everything else keeps running).
pub async fn start(
    spec: Spec,
    notify_dir: &Path,
    ready_timeout: Duration,
    shutdown: &CancellationToken,
) -> Option<Supervised> {
    tracing::info!(
        "{} starts once {} is built (scripts/run builds it after the others)",
        spec.name,
        spec.program.display()
    );
    tokio::select! {
        biased;
        () = shutdown.cancelled() => return None,
        () = built(&spec.program) => {}
    }
    // Not cancelled half way: a child spawned here is either kept and stopped with the others,
    // or has failed its start.
    let name = spec.name;
    match Supervised::start(spec, notify_dir, ready_timeout).await {
        Ok(child) => {
            tracing::info!("{name} ready");
            Some(child)
        }
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "{name} did not start; everything else keeps running");
            None
        }
    }
}

/// Returns once `program` is a file whose size and modification time held still over one poll:
/// cargo links it under another name and then links it here, but a copy being written must not
/// be started half written.
async fn built(program: &Path) {
    let mut last = None;
    loop {
        let now = std::fs::metadata(program)
            .ok()
            .filter(std::fs::Metadata::is_file)
            .map(|m| (m.len(), m.modified().ok()));
        if now.is_some() && now == last {
            return;
        }
        last = now;
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_binary_counts_as_built_once_it_exists_and_holds_still() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let program = dir.path().join("query-server");
        let waiting = tokio::spawn({
            let program = program.clone();
            async move { built(&program).await }
        });
        tokio::time::sleep(3 * POLL).await;
        assert!(!waiting.is_finished(), "taken for built while absent");
        std::fs::write(&program, b"#!/bin/sh\n").expect("written");
        tokio::time::timeout(4 * POLL, waiting)
            .await
            .expect("seen within two polls")
            .expect("no panic");
    }
}
