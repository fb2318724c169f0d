//! The contract between the consumer and a daemon's store: checkpoints committed with the
//! data, claims that fence a partition's previous owner, and the errors a caller decides on.

use std::{collections::BTreeMap, future::Future};

use tokio_util::sync::CancellationToken;

use crate::WeatherReading;

/// Where a partition's reading stands, as committed with the data it accounts for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The next offset to read.
    pub next_offset: i64,
    /// [`record_id`](super::record_id) of the record at `next_offset - 1`: which log the offset belongs to.
    /// `None` before any record was read, and in state written by older versions.
    pub last_record: Option<String>,
    /// Offset of the dead-letter topic from which the letters of records at or past
    /// `next_offset` can be (see [`crate::dead_letters`]); `None` when unknown.
    pub dead_letters_from: Option<i64>,
}

impl Checkpoint {
    /// The beginning of a partition.
    pub fn start(offset: i64) -> Self {
        Self {
            next_offset: offset,
            last_record: None,
            dead_letters_from: None,
        }
    }
}

/// Checkpoints by partition.
pub type Checkpoints = BTreeMap<i32, Checkpoint>;

/// Owner epoch by partition: raised by each claim of the partition (see [`Store::claim`]).
pub type Epochs = BTreeMap<i32, i64>;

/// What a store holds of the partitions it claimed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Claim {
    /// Their committed checkpoints (none for a partition never committed).
    pub checkpoints: Checkpoints,
    /// The owner epochs the claim gave them: this instance's.
    pub epochs: Epochs,
}

/// What a daemon does with the readings; [`run`](super::run()) does the rest.
///
/// Partitions are owned one instance at a time: the consumer group assigns them, and the store
/// fences each one when an instance takes it over ([`Store::claim`]), so that a commit by an
/// instance that lost the partition meanwhile (a "zombie") stores nothing ([`Fenced`]).
pub trait Store: Send {
    /// (Re)connects and drops whatever was applied but not committed, and every partition's
    /// state. Called at start and after every failure. `Ok(false)` on shutdown.
    fn open(&mut self, shutdown: &CancellationToken) -> impl Future<Output = anyhow::Result<bool>> + Send;

    /// Takes over `partitions`, which the group assigned to this instance: raises their owner
    /// epochs, which fences their previous owner out of the store, and loads their state.
    fn claim(&mut self, partitions: &[i32]) -> impl Future<Output = anyhow::Result<Claim>> + Send;

    /// Forgets `partitions`: handed to another instance after their last commit, or lost.
    fn release(&mut self, partitions: &[i32]);

    /// One valid reading, at `offset` of `partition`.
    fn apply(&mut self, partition: i32, offset: i64, reading: WeatherReading);

    /// Periodic work between records; true when it made something worth committing.
    fn tick(&mut self) -> bool {
        false
    }

    /// Commits everything applied since the last commit together with `checkpoints` (those of
    /// the partitions this instance owns), in one atomic step, or nothing: fails with
    /// [`Fenced`] when another instance took over one of them. `Ok(false)`: there was nothing
    /// to commit and nothing was stored.
    fn commit(&mut self, checkpoints: &Checkpoints) -> impl Future<Output = anyhow::Result<bool>> + Send;
}

/// A commit refused because other instances took these partitions over: nothing was stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("partitions {partitions:?} were taken over by another instance")]
pub struct Fenced {
    pub partitions: Vec<i32>,
}

/// The store cannot say where its partitions stand, and any guess would lose or double
/// records: [`run`](super::run()) stops with this error instead of resuming, for an operator to decide.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Unresumable {
    pub reason: String,
}

pub(super) fn offsets(checkpoints: &Checkpoints) -> BTreeMap<i32, i64> {
    checkpoints.iter().map(|(p, c)| (*p, c.next_offset)).collect()
}
