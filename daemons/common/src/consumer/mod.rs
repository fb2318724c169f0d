//! The exactly-once consumer that the iceberg-sink and the window-aggregator are built on.
//!
//! A [`Store`] keeps, in the same atomic commit as its data, a [`Checkpoint`] per Kafka
//! partition: the next offset to read and the identity of the record before it. This module
//! does everything else the same way for both: it waits for the broker and the topic, opens
//! the store, checks that the stored offsets belong to the log it is about to read (a broker
//! that lost its log, or a topic deleted and created again, starts its offsets from 0 again),
//! positions the consumer exactly there, validates records (bad ones go to the dead-letter
//! topic), decides when to commit, and on any failure backs off, reopens the store and
//! resumes from its last commit.
//!
//! Several instances share the work: they join one consumer group, which assigns each
//! partition to one of them and moves partitions when instances come and go. The store fences
//! partitions ([`Store::claim`]): an instance that lost a partition without noticing (paused,
//! cut off) cannot commit it any more, so each record is stored exactly once whoever reads it.
//! The group is trusted as the Kafka protocol defines it: a partition fenced here stays held
//! back until the group revokes it or assigns it here again (`assignment.rs`).
//!
//! One question per file, arrows one way: `store.rs` (the contract a daemon's store keeps),
//! `record.rs` (what a record is), `config.rs` (the flags), `metrics.rs`, `group.rs` (group
//! membership), `assignment.rs` (what the group assigned: pure data), `owned.rs` (what the
//! worker knows of a partition it owns), `position.rs` (where a claimed partition is read
//! from), `worker.rs` (read, apply, commit) and `run.rs` (start, recover, stop).

mod assignment;
mod config;
mod group;
pub mod metrics;
mod owned;
mod position;
mod record;
mod run;
mod store;
mod worker;

pub use config::{Config, ConsumerArgs};
pub use group::{GroupConsumer, GroupContext};
pub use metrics::Metrics;
pub use position::{Positioned, position, wait_for_partitions};
pub use record::{reading_of, record_id};
pub use run::run;
pub use store::{Checkpoint, Checkpoints, Claim, Epochs, Fenced, Store, Unresumable};
