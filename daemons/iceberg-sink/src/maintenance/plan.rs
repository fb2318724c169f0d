//! What a maintenance run will do, decided from what the table lists and nothing else: which
//! manifests a rewrite lists anew, which partitions it compacts, which snapshots an expiry
//! keeps. Pure and unit-tested; [`super::rewrite`] and [`super::expire`] carry it out, as
//! iceberg-rust separates an action (what to change) from its snapshot producer (writing it).

use std::{
    collections::{BTreeSet, HashMap},
    time::Duration,
};

use iceberg::spec::{ManifestContentType, ManifestFile};

use crate::manifests::{file_count, hour_of, newest_hour, single_partition};

/// How much history the table keeps, and how much it lets pile up before maintenance.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Snapshots older than this are expired...
    pub snapshot_retention: Duration,
    /// ...except the newest this many.
    pub min_snapshots: usize,
    /// Beyond this many, the oldest are expired whatever their age, so that the metadata's size
    /// does not grow with the commit rate.
    pub max_snapshots: usize,
    /// Manifests written by appends are merged once more than this many wait.
    pub max_unmerged_manifests: usize,
    /// A closed `hour(ts)` partition (older than the newest) with more data files than this
    /// is compacted into files near the target size.
    pub max_files_per_partition: usize,
    /// Size compacted files roll over at.
    pub target_file_size: usize,
    /// Unreferenced files older than this are orphans, deleted by the sweep.
    pub orphan_age: Duration,
    /// A rewrite waits this long after its plan, before it writes and commits: zero but in
    /// tests of a slow maintenance (`--maintenance-delay`).
    pub delay: Duration,
}

/// Partitions by key, as [`crate::manifests::partition_key`] encodes an hour; `None` stands
/// for a file whose partition is not an hour.
pub type Partitions = BTreeSet<Option<Vec<u8>>>;

/// A manifest as a plan sees it: what the manifest list says of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub path: String,
    /// Lists data files (not deletes).
    pub data: bool,
    /// The one partition it lists files of; `None` for several, or another layout.
    pub partition: Option<Vec<u8>>,
    /// The newest hour it lists files of.
    pub newest_hour: Option<i32>,
    /// Live files it lists.
    pub files: usize,
}

impl Manifest {
    pub fn of(manifest: &ManifestFile) -> Self {
        Self {
            path: manifest.manifest_path.clone(),
            data: manifest.content == ManifestContentType::Data,
            partition: single_partition(manifest),
            newest_hour: newest_hour(manifest),
            files: file_count(manifest),
        }
    }
}

/// A manifest rewrite to make: each partition listed by one manifest of its own, the closed
/// partitions with too many files compacted.
#[derive(Debug, PartialEq, Eq)]
pub struct RewritePlan {
    /// The manifests whose entries the rewrite lists first: those appends wrote that wait to be
    /// merged, and those of crowded partitions.
    pub first: Vec<String>,
    /// The newest hour listed: the partitions before it are closed (take almost no more
    /// readings; a late one lands there as a file of its own, compacted again later).
    newest: Option<i32>,
    /// Partitions another engine's row-level deletes apply to.
    deleted: Partitions,
    max_files_per_partition: usize,
}

impl RewritePlan {
    /// Plans a rewrite of the snapshot listing `manifests`, whose delete files apply to
    /// `deleted`; `None` when merging can wait: no more than `max_unmerged_manifests` wait and
    /// no closed partition holds more than `max_files_per_partition` files.
    pub fn new(manifests: &[Manifest], deleted: Partitions, policy: &Policy) -> Option<Self> {
        let mut per_partition: HashMap<&[u8], usize> = HashMap::new();
        for key in manifests.iter().filter_map(|m| m.partition.as_deref()) {
            *per_partition.entry(key).or_default() += 1;
        }
        let mut plan = Self {
            first: Vec::new(),
            newest: manifests.iter().filter_map(|m| m.newest_hour).max(),
            deleted,
            max_files_per_partition: policy.max_files_per_partition,
        };
        // Settled: a data manifest that alone lists its partition.
        let settled = |m: &Manifest| m.data && m.partition.as_deref().is_some_and(|k| per_partition[k] == 1);
        let unsettled: Vec<&Manifest> = manifests.iter().filter(|m| m.data && !settled(m)).collect();
        let crowded: Vec<&Manifest> = manifests
            .iter()
            .filter(|m| {
                settled(m)
                    && m.partition.as_deref().is_some_and(|k| plan.compactable(k))
                    && m.files > policy.max_files_per_partition
            })
            .collect();
        if unsettled.len() <= policy.max_unmerged_manifests && crowded.is_empty() {
            return None;
        }
        plan.first = unsettled.into_iter().chain(crowded).map(|m| m.path.clone()).collect();
        Some(plan)
    }

    /// The data manifests of `manifests` not read yet that list one of `partitions`, the
    /// partitions the rewrite lists: read too, so that each partition ends in one manifest.
    /// Delete manifests stay as they are.
    pub fn touched<'a>(&self, manifests: &'a [Manifest], partitions: &Partitions) -> Vec<&'a str> {
        manifests
            .iter()
            .filter(|m| m.data && !self.first.contains(&m.path))
            .filter(|m| {
                m.partition
                    .as_ref()
                    .is_some_and(|k| partitions.contains(&Some(k.clone())))
            })
            .map(|m| m.path.as_str())
            .collect()
    }

    /// The hour to compact partition `key`, which has `files` live files, into; `None` to list
    /// its files as they are.
    pub fn compaction(&self, key: Option<&[u8]>, files: usize) -> Option<i32> {
        key.filter(|k| self.compactable(k) && files > self.max_files_per_partition)
            .and_then(hour_of)
    }

    /// A closed hour without row-level deletes. Another engine's deletes (Trino's and Spark's
    /// merge-on-read) apply to data files of lower sequence numbers: a compacted file would get
    /// a higher one and bring the deleted rows back (merging keeps sequence numbers).
    fn compactable(&self, key: &[u8]) -> bool {
        let closed = hour_of(key)
            .zip(self.newest)
            .is_some_and(|(hour, newest)| hour < newest);
        closed && !self.deleted.contains(&None) && !self.deleted.contains(&Some(key.to_vec()))
    }
}

/// Which snapshots an expiry keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keep {
    /// Younger than this: kept, up to `most`.
    pub retention: Duration,
    /// The newest this many ancestors of the current snapshot, whatever their age and `most`.
    pub newest: usize,
    /// Kept at most, as long as `newest` allows.
    pub most: usize,
}

impl Keep {
    /// `policy`'s limits, with the newest `lineage` snapshots kept: the line back to the
    /// snapshot that records the Kafka checkpoints, which the next commit walks.
    pub fn of(policy: &Policy, lineage: usize) -> Self {
        Self {
            retention: policy.snapshot_retention,
            newest: policy.min_snapshots.max(lineage).max(1),
            most: policy.max_snapshots,
        }
    }

    /// What to give iceberg's expiry for a table of `snapshots`: the cutoff age and how many of
    /// the current snapshot's ancestors to keep regardless. `None`: nothing to expire.
    pub fn plan(&self, snapshots: usize, expirable_by_age: usize) -> Option<(Option<Duration>, usize)> {
        if snapshots <= self.newest {
            return None;
        }
        if snapshots > self.most.max(self.newest) {
            // Over the count: everything but the newest `most` (or `newest`, if more) goes.
            return Some((None, self.most.max(self.newest)));
        }
        (expirable_by_age > 0).then_some((Some(self.retention), self.newest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            snapshot_retention: Duration::from_secs(3600),
            min_snapshots: 10,
            max_snapshots: 500,
            max_unmerged_manifests: 2,
            max_files_per_partition: 4,
            target_file_size: 1 << 20,
            orphan_age: Duration::from_secs(86400),
            delay: Duration::ZERO,
        }
    }

    fn key(hour: i32) -> Vec<u8> {
        hour.to_le_bytes().to_vec()
    }

    /// A data manifest of `files` files in `hour`.
    fn of_hour(path: &str, hour: i32, files: usize) -> Manifest {
        Manifest {
            path: path.into(),
            data: true,
            partition: Some(key(hour)),
            newest_hour: Some(hour),
            files,
        }
    }

    /// A data manifest an append wrote over the hours `from..=to`.
    fn append(path: &str, from: i32, to: i32) -> Manifest {
        Manifest {
            partition: (from == to).then(|| key(from)),
            newest_hour: Some(to),
            ..of_hour(path, from, 1)
        }
    }

    #[test]
    fn merging_waits_until_more_manifests_than_the_limit_wait() {
        let settled = [of_hour("m10", 10, 1), of_hour("m11", 11, 1)];
        assert_eq!(RewritePlan::new(&settled, Partitions::new(), &policy()), None);
        let two = [settled.to_vec(), vec![append("a1", 11, 12), append("a2", 12, 12)]].concat();
        assert_eq!(
            RewritePlan::new(&two, Partitions::new(), &policy()),
            None,
            "two wait: the limit"
        );
        let three = [two, vec![append("a3", 12, 12)]].concat();
        let plan = RewritePlan::new(&three, Partitions::new(), &policy()).expect("three wait");
        assert_eq!(plan.first, ["a1", "a2", "a3"]);
        // a1 reaches into hour 11: its merged manifest is listed anew too, hour 10's is not.
        let read: Partitions = [Some(key(11)), Some(key(12))].into();
        assert_eq!(plan.touched(&three, &read), ["m11"]);
    }

    #[test]
    fn two_manifests_of_one_hour_are_both_unsettled() {
        let manifests = [of_hour("m10", 10, 1), of_hour("n10", 10, 1), append("a", 10, 11)];
        let plan = RewritePlan::new(
            &manifests,
            Partitions::new(),
            &Policy {
                max_unmerged_manifests: 2,
                ..policy()
            },
        )
        .expect("three unsettled");
        assert_eq!(plan.first, ["m10", "n10", "a"]);
    }

    #[test]
    fn a_closed_crowded_hour_is_compacted_and_the_newest_hour_is_not() {
        let manifests = [of_hour("m10", 10, 5), of_hour("m11", 11, 9)];
        let plan = RewritePlan::new(&manifests, Partitions::new(), &policy()).expect("hour 10 is crowded");
        assert_eq!(plan.first, ["m10"]);
        assert_eq!(plan.compaction(Some(&key(10)), 5), Some(10));
        assert_eq!(plan.compaction(Some(&key(10)), 4), None, "not more than the limit");
        assert_eq!(plan.compaction(Some(&key(11)), 9), None, "hour 11 is still open");
        assert_eq!(plan.compaction(None, 9), None, "not an hour");
    }

    #[test]
    fn hours_with_row_level_deletes_are_merged_but_never_compacted() {
        let manifests = [of_hour("m10", 10, 5), of_hour("m11", 11, 1)];
        let deleted: Partitions = [Some(key(10))].into();
        assert_eq!(RewritePlan::new(&manifests, deleted.clone(), &policy()), None);
        let waiting = [
            manifests.to_vec(),
            vec![append("a1", 9, 10), append("a2", 11, 11), append("a3", 11, 11)],
        ]
        .concat();
        let plan = RewritePlan::new(&waiting, deleted, &policy()).expect("three wait");
        assert_eq!(plan.compaction(Some(&key(10)), 6), None);
        assert_eq!(plan.compaction(Some(&key(9)), 6), Some(9));
        // A delete file of no hour may apply anywhere: nothing is compacted.
        let plan = RewritePlan::new(&waiting, [None].into(), &policy()).expect("three wait");
        assert_eq!(plan.compaction(Some(&key(9)), 6), None);
    }

    #[test]
    fn delete_manifests_are_neither_merged_nor_read() {
        let deletes = Manifest {
            data: false,
            ..of_hour("d10", 10, 1)
        };
        let manifests = [deletes.clone(), deletes, of_hour("m11", 11, 1)];
        assert_eq!(RewritePlan::new(&manifests, Partitions::new(), &policy()), None);
    }

    fn keep(newest: usize, most: usize) -> Keep {
        Keep {
            retention: Duration::from_secs(3600),
            newest,
            most,
        }
    }

    #[test]
    fn expiry_by_age_keeps_the_newest() {
        assert_eq!(keep(10, 500).plan(100, 30), Some((Some(Duration::from_secs(3600)), 10)));
        assert_eq!(keep(10, 500).plan(100, 0), None, "nothing old enough");
        assert_eq!(keep(10, 500).plan(10, 10), None, "no more than the newest kept");
    }

    #[test]
    fn too_many_snapshots_are_expired_whatever_their_age() {
        assert_eq!(keep(10, 500).plan(501, 0), Some((None, 500)));
        assert_eq!(keep(10, 500).plan(500, 0), None);
    }

    #[test]
    fn the_line_to_the_recorded_checkpoints_is_kept_beyond_every_limit() {
        let deep = Keep::of(&policy(), 700);
        assert_eq!(deep.newest, 700);
        assert_eq!(deep.plan(800, 800), Some((None, 700)));
        assert_eq!(deep.plan(700, 700), None);
        assert_eq!(Keep::of(&policy(), 2).newest, 10);
    }
}
