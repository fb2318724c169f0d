//! What the worker knows of a partition it owns, from its claim until it hands it over.

use std::collections::{BTreeMap, BTreeSet};

use super::record::format_record_id;
use super::store::{Checkpoint, Checkpoints};

/// One owned partition.
#[derive(Debug)]
pub(super) struct Owned {
    /// Position after what was read (applied to the store or dead-lettered). Its
    /// `last_record` is brought up to date from `last_read` only when committing.
    pub(super) read: Checkpoint,
    /// `(offset, hash)` of the last record read since the last commit: kept as numbers to
    /// keep the per-record path free of allocations.
    pub(super) last_read: Option<(i64, u64)>,
    /// Offsets past the claim's checkpoint whose dead letter was sent before the last crash or
    /// handover (see [`DeadLetters::sent_since`](crate::dead_letters::DeadLetters::sent_since)):
    /// not sent again.
    pub(super) dead_lettered: BTreeSet<i64>,
    /// What the store holds.
    pub(super) committed: Checkpoint,
}

impl Owned {
    /// A partition just claimed: the store holds `committed`, reading starts at `read`.
    pub(super) fn claimed(committed: Checkpoint, read: Checkpoint, dead_lettered: BTreeSet<i64>) -> Self {
        Self {
            read,
            last_read: None,
            dead_lettered,
            committed,
        }
    }

    /// Takes the record at `offset`, whose hash is `hash`, as read.
    pub(super) fn advance(&mut self, offset: i64, hash: u64) {
        self.read.next_offset = offset + 1;
        self.last_read = Some((offset, hash));
    }

    /// Names the last record read in `read`, ready to be committed.
    fn settle(&mut self) {
        if let Some((offset, hash)) = self.last_read.take() {
            self.read.last_record = Some(format_record_id(offset, hash));
        }
    }
}

/// The owned partitions, by number.
pub(super) type OwnedPartitions = BTreeMap<i32, Owned>;

/// The checkpoints to commit: each partition's `read`, its last record named.
pub(super) fn to_commit(owned: &mut OwnedPartitions) -> Checkpoints {
    owned
        .iter_mut()
        .map(|(partition, state)| {
            state.settle();
            (*partition, state.read.clone())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_names_the_last_record_read_and_only_that() {
        let mut owned = OwnedPartitions::new();
        owned.insert(
            0,
            Owned::claimed(Checkpoint::start(5), Checkpoint::start(5), BTreeSet::new()),
        );
        owned.insert(
            1,
            Owned::claimed(Checkpoint::start(9), Checkpoint::start(9), BTreeSet::new()),
        );
        owned.get_mut(&0).expect("owned").advance(5, 1);
        owned.get_mut(&0).expect("owned").advance(6, 2);

        let checkpoints = to_commit(&mut owned);
        assert_eq!(checkpoints[&0].next_offset, 7);
        assert_eq!(checkpoints[&0].last_record, Some(format_record_id(6, 2)));
        // Nothing read of partition 1: its checkpoint is the claim's.
        assert_eq!(checkpoints[&1], Checkpoint::start(9));
        // Settled once: a second commit with nothing read since names the same record.
        assert_eq!(to_commit(&mut owned)[&0].last_record, Some(format_record_id(6, 2)));
    }
}
