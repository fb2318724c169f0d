//! What the group assigned to this instance, as pure data the worker reads.

use std::collections::{BTreeMap, BTreeSet};

use super::group::Rebalanced;

/// The partitions the group assigned to this instance, kept across recoveries, less those held
/// back after another instance took them over.
#[derive(Debug, Default)]
pub(super) struct Assignment {
    assigned: BTreeSet<i32>,
    held: BTreeSet<i32>,
}

impl Assignment {
    fn assign(&mut self, partitions: &[i32]) {
        for partition in partitions {
            self.assigned.insert(*partition);
            self.held.remove(partition);
        }
    }

    fn revoke(&mut self, partitions: &[i32]) {
        for partition in partitions {
            self.assigned.remove(partition);
            self.held.remove(partition);
        }
    }

    fn contains(&self, partition: i32) -> bool {
        self.assigned.contains(&partition)
    }

    /// Applies the group's `events`, in order, and returns the partitions of `owned` to hand
    /// over: each one revoked, also when a later event assigned it again (the revocation took
    /// its fetch position; assigned again, it is claimed and positioned anew).
    pub(super) fn apply<T>(&mut self, events: Vec<Rebalanced>, owned: &BTreeMap<i32, T>) -> Vec<i32> {
        let mut revoked = BTreeSet::new();
        for event in events {
            match event {
                Rebalanced::Assigned(partitions) => {
                    tracing::info!(?partitions, "the group assigned partitions");
                    self.assign(&partitions);
                }
                Rebalanced::Revoked(partitions) => {
                    tracing::info!(?partitions, "the group revoked partitions");
                    self.revoke(&partitions);
                    revoked.extend(partitions);
                }
            }
        }
        owned
            .keys()
            .filter(|p| revoked.contains(p) || !self.contains(**p))
            .copied()
            .collect()
    }

    /// Leaves `partitions`, whose commit was fenced, to the instance that claimed them. That
    /// instance was assigned them in a later generation of the group, so the group revokes them
    /// here (or this instance finds its membership lost) next; should it assign them here again
    /// instead, they are claimed again.
    pub(super) fn hold(&mut self, partitions: &[i32]) {
        for partition in partitions {
            if self.assigned.contains(partition) {
                self.held.insert(*partition);
            }
        }
    }

    /// The assigned partitions to claim: neither owned yet (`owned`) nor held.
    pub(super) fn claimable<T>(&self, owned: &BTreeMap<i32, T>) -> Vec<i32> {
        self.assigned
            .iter()
            .filter(|p| !owned.contains_key(p) && !self.held.contains(p))
            .copied()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consumer::store::{Checkpoint, Checkpoints};

    #[test]
    fn a_fenced_partition_is_held_back_until_the_group_revokes_it_or_assigns_it_again() {
        let owned =
            |partitions: &[i32]| -> Checkpoints { partitions.iter().map(|p| (*p, Checkpoint::start(0))).collect() };
        let mut assignment = Assignment::default();
        assignment.assign(&[0, 1, 2]);
        assert_eq!(assignment.claimable(&owned(&[])), [0, 1, 2]);
        assert_eq!(assignment.claimable(&owned(&[0])), [1, 2]);

        // Fenced on 1 and 2: held back, still assigned, for as long as the group says nothing.
        assignment.hold(&[1, 2]);
        assert!(assignment.contains(1));
        assert_eq!(assignment.claimable(&owned(&[0])), Vec::<i32>::new());
        // The group revokes 1: gone, hold and all.
        assignment.revoke(&[1]);
        assert!(!assignment.contains(1));
        assert_eq!(assignment.claimable(&owned(&[0])), Vec::<i32>::new());
        // The group assigns 2 here again: claimed at once.
        assignment.assign(&[2]);
        assert_eq!(assignment.claimable(&owned(&[0])), [2]);
        // So is 1, revoked and then assigned again.
        assignment.assign(&[1]);
        assert_eq!(assignment.claimable(&owned(&[0])), [1, 2]);
        // A partition not assigned is not held.
        assignment.hold(&[7]);
        assignment.assign(&[7]);
        assert_eq!(assignment.claimable(&owned(&[0])), [1, 2, 7]);
    }

    /// A revocation and a new assignment of the same partition, queued before the worker looks:
    /// the partition is handed over (its fetch position went with the revocation) and then
    /// claimed again, not left owned and never read.
    #[test]
    fn a_partition_revoked_and_assigned_again_between_two_looks_is_handed_over_and_claimed_again() {
        let owned: Checkpoints = [0, 1].into_iter().map(|p| (p, Checkpoint::start(0))).collect();
        let mut assignment = Assignment::default();
        assignment.assign(&[0, 1]);
        let events = vec![Rebalanced::Revoked(vec![1]), Rebalanced::Assigned(vec![1, 2])];
        assert_eq!(assignment.apply(events, &owned), [1]);
        let kept: Checkpoints = owned.into_iter().filter(|(p, _)| *p == 0).collect();
        assert_eq!(assignment.claimable(&kept), [1, 2]);

        // Assigned, then revoked: handed over, not claimed.
        let events = vec![Rebalanced::Assigned(vec![3]), Rebalanced::Revoked(vec![3, 0])];
        assert_eq!(assignment.apply(events, &kept), [0]);
        assert_eq!(assignment.claimable(&Checkpoints::new()), [1, 2]);
    }
}
