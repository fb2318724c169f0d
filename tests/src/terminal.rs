//! What a person running `pipeline` reads: its terminal and the broker's own log, and the lines
//! among them that say something is wrong.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::Command,
};

/// `pipeline`'s terminal, written to a file, and the broker's log beside it.
pub struct Terminal {
    terminal: PathBuf,
    broker_log: PathBuf,
    from: (u64, u64),
}

impl Terminal {
    /// Sends `command`'s output (a `pipeline` on `state`) to `STATE/terminal.log`, at the log
    /// level it ships with.
    pub fn capture(state: &Path, command: &mut Command) -> Self {
        let terminal = state.join("terminal.log");
        let output = File::create(&terminal).expect("terminal log");
        command
            .env_remove("RUST_LOG")
            .stdout(output.try_clone().expect("log"))
            .stderr(output);
        Self {
            terminal,
            broker_log: state.join("kafka/nisshi.log"),
            from: (0, 0),
        }
    }

    /// Reads from here on: what came before (starting up) is not looked at.
    pub fn mark(&mut self) {
        self.from = (file_len(&self.terminal), file_len(&self.broker_log));
    }

    /// Fails, listing them, if any ERROR or WARN line came since [`Terminal::mark`]; `during`
    /// says when.
    pub fn assert_quiet(&self, during: &str) {
        let loud = self.loud_lines();
        assert!(
            loud.is_empty(),
            "{} ERROR or WARN lines {during}:\n{}",
            loud.len(),
            loud.join("\n")
        );
    }

    /// The ERROR and WARN lines since [`Terminal::mark`], the broker's marked as its own.
    fn loud_lines(&self) -> Vec<String> {
        loud_lines(&read_from(&self.terminal, self.from.0))
            .into_iter()
            .chain(
                loud_lines(&read_from(&self.broker_log, self.from.1))
                    .into_iter()
                    .map(|l| format!("nisshi.log: {l}")),
            )
            .collect()
    }
}

/// The lines of `log` that a level of ERROR or WARN leads (`tracing`'s format: a timestamp,
/// then the level), colour codes taken out.
fn loud_lines(log: &str) -> Vec<String> {
    log.lines()
        .map(strip_colours)
        .filter(|line| {
            line.split_whitespace()
                .take(3)
                .any(|word| word == "ERROR" || word == "WARN")
        })
        .collect()
}

fn strip_colours(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ ... m
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// What was written to `path` after its first `from` bytes.
fn read_from(path: &Path, from: u64) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    String::from_utf8_lossy(bytes.get(from as usize..).unwrap_or_default()).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loud_lines_are_told_by_their_level() {
        let log = "2026-12-02T17:00:00.000000Z  INFO pipeline: ready\n\
                   2026-12-02T17:00:01.000000Z  WARN librdkafka: REQTMOUT\n\
                   \u{1b}[2m2026-12-02T17:00:02Z\u{1b}[0m \u{1b}[31mERROR\u{1b}[0m nisshi_broker: boom\n\
                   2026-12-02T17:00:03.000000Z  INFO dashboard: a city called WARN\n";
        let loud = loud_lines(log);
        assert_eq!(loud.len(), 2, "{loud:?}");
        assert!(loud[1].contains("ERROR nisshi_broker"), "{loud:?}");
    }
}
