//! How many live files a snapshot has: what a snapshot summary records as `total-data-files`
//! and `total-delete-files` (optional in the Iceberg spec, written by Spark, Trino and
//! PyIceberg), counted from its manifest list when a writer left them out.

use std::collections::HashMap;

use iceberg::spec::{ManifestContentType, ManifestFile};

pub const TOTAL_DATA_FILES: &str = "total-data-files";
pub const TOTAL_DELETE_FILES: &str = "total-delete-files";

/// The live (added or existing) data and delete files a manifest list lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileTotals {
    pub data_files: u64,
    pub delete_files: u64,
}

impl FileTotals {
    /// Counted from `manifests`' per-manifest counts; `None` if one of them has none (they are
    /// optional in format v1).
    pub fn counted<'a>(manifests: impl IntoIterator<Item = &'a ManifestFile>) -> Option<Self> {
        let mut totals = Self {
            data_files: 0,
            delete_files: 0,
        };
        for manifest in manifests {
            let live = u64::from(manifest.added_files_count?) + u64::from(manifest.existing_files_count?);
            match manifest.content {
                ManifestContentType::Data => totals.data_files += live,
                ManifestContentType::Deletes => totals.delete_files += live,
            }
        }
        Some(totals)
    }

    /// The summary properties that record them.
    pub fn properties(&self) -> HashMap<String, String> {
        HashMap::from([
            (TOTAL_DATA_FILES.to_owned(), self.data_files.to_string()),
            (TOTAL_DELETE_FILES.to_owned(), self.delete_files.to_string()),
        ])
    }
}

/// The data files a snapshot summary says its snapshot has, if it says it.
pub fn recorded_data_files(summary: &HashMap<String, String>) -> Option<u64> {
    summary.get(TOTAL_DATA_FILES)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(content: ManifestContentType, added: Option<u32>, existing: u32, deleted: u32) -> ManifestFile {
        ManifestFile {
            manifest_path: "m.avro".into(),
            manifest_length: 1,
            partition_spec_id: 0,
            content,
            sequence_number: 1,
            min_sequence_number: 1,
            added_snapshot_id: 1,
            added_files_count: added,
            existing_files_count: Some(existing),
            deleted_files_count: Some(deleted),
            added_rows_count: None,
            existing_rows_count: None,
            deleted_rows_count: None,
            partitions: None,
            key_metadata: None,
            first_row_id: None,
        }
    }

    #[test]
    fn live_files_are_counted_by_content_and_deleted_entries_are_not() {
        let list = [
            manifest(ManifestContentType::Data, Some(3), 4, 7),
            manifest(ManifestContentType::Data, Some(0), 2, 0),
            manifest(ManifestContentType::Deletes, Some(1), 0, 5),
        ];
        let totals = FileTotals::counted(&list).expect("counted");
        assert_eq!(
            totals,
            FileTotals {
                data_files: 9,
                delete_files: 1
            }
        );
        assert_eq!(recorded_data_files(&totals.properties()), Some(9));
        assert_eq!(totals.properties()[TOTAL_DELETE_FILES], "1");
    }

    #[test]
    fn a_manifest_without_counts_leaves_the_totals_unknown() {
        let list = [
            manifest(ManifestContentType::Data, Some(3), 4, 0),
            manifest(ManifestContentType::Data, None, 2, 0),
        ];
        assert_eq!(FileTotals::counted(&list), None);
        assert_eq!(
            FileTotals::counted(&[]),
            Some(FileTotals {
                data_files: 0,
                delete_files: 0
            })
        );
        assert_eq!(
            recorded_data_files(&HashMap::from([(TOTAL_DATA_FILES.into(), "x".into())])),
            None
        );
    }
}
