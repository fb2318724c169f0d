//! Where PostgreSQL's server programs are installed, for `pipeline` and the test harness that
//! start a cluster of their own.

use std::path::PathBuf;

/// The `bin` directory of the newest PostgreSQL that Debian's packages installed
/// (`/usr/lib/postgresql/<major>/bin`, with `postgres` in it): Debian keeps `initdb` and
/// `postgres` off `PATH`.
pub fn debian_bin() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin)| bin.join("postgres").is_file())
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}
