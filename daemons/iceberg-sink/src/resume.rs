//! Where the sink resumes when the table no longer says where the Kafka partitions stand (its
//! line of snapshots is broken, [`crate::table::BrokenLineage`]): only an operator can say,
//! since every guess loses or doubles readings.

use std::str::FromStr;

/// `--resume-from`: consulted only when the line of snapshots is broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResumeFrom {
    /// The offsets the sink's consumer group committed. They follow each commit to the table,
    /// so they are at most one commit behind it: that commit's readings are written again.
    Group,
    /// A snapshot still in the table that records the checkpoints (`kafka.offsets.<topic>`);
    /// what was committed after it is written again.
    Snapshot(i64),
    /// Every partition from its beginning: for a table the sink never wrote to (made and
    /// written by another engine, its first snapshots expired since).
    Start,
}

impl FromStr for ResumeFrom {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim() {
            "group" => Ok(Self::Group),
            "start" => Ok(Self::Start),
            id => id
                .parse()
                .map(Self::Snapshot)
                .map_err(|_| format!("{text:?} is not `group`, `start` or a snapshot id")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_group_or_a_snapshot() {
        assert_eq!("group".parse(), Ok(ResumeFrom::Group));
        assert_eq!("start".parse(), Ok(ResumeFrom::Start));
        assert_eq!("-4242".parse(), Ok(ResumeFrom::Snapshot(-4242)));
        assert_eq!(" 7 ".parse(), Ok(ResumeFrom::Snapshot(7)));
        assert!("latest".parse::<ResumeFrom>().is_err());
        assert!("".parse::<ResumeFrom>().is_err());
    }
}
