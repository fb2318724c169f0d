//! The `weather` table: created or opened through the catalog, its checkpoints found by walking
//! its snapshots, and appends committed with the Kafka offsets they account for (files are
//! written by [`crate::files`], the summary by [`weather_common::snapshot_summary`]).

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use anyhow::Context;
use iceberg::{
    Catalog, ErrorKind, NamespaceIdent, TableCreation, TableIdent,
    spec::{DataFile, NestedField, PrimitiveType, Schema, Transform, Type, UnboundPartitionSpec},
    table::Table,
    transaction::{ApplyTransactionAction, Transaction},
};
use weather_common::{
    WeatherReading,
    consumer::{Checkpoints, Claim, Epochs, Fenced},
    lakehouse::{CatalogConfig, CatalogRows},
    snapshot_summary::{self, Lineage},
};

use crate::{
    catalog::Pinned,
    files,
    maintenance::{Maintenance, Policy, Report},
    manifests::{entry_hour, manifests_of},
};

/// Size of the table's metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Snapshots in the current metadata.
    pub snapshots: usize,
    /// Manifests the current snapshot lists.
    pub manifests: usize,
    /// Size of the current metadata file.
    pub metadata_bytes: u64,
}

/// Next offset to read per Kafka partition.
pub type Offsets = BTreeMap<i32, i64>;

/// What the table records of a topic's partitions (see [`WeatherTable::recorded`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recorded {
    pub checkpoints: Checkpoints,
    pub epochs: Epochs,
    /// Snapshots from the current one back to that one, both included: what expiry must keep
    /// for the next walk to find it.
    pub depth: usize,
}

/// The walk back from the current snapshot met a parent that is no longer in the metadata
/// (expired, by this sink or another engine) before any snapshot that records Kafka
/// checkpoints.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the table's line of snapshots is broken: the parent of snapshot {snapshot} was expired before any snapshot \
     on the way recorded where the Kafka partitions stand, so reading on could write again what the topic still \
     holds. Start the sink once with --resume-from group (the consumer group's committed offsets, which follow \
     each commit to the table: at most the last commit's readings are written twice), --resume-from <snapshot \
     id> (a snapshot still in the table that records kafka.offsets.<topic>), or --resume-from start (every \
     partition from its beginning: for a table this sink never wrote to); keep other engines' expiry from \
     removing the sink's newest snapshot (see README, \"Sharing the table\")"
)]
pub struct BrokenLineage {
    /// The oldest snapshot the walk reached.
    pub snapshot: i64,
}

/// The table schema: the same one Trino's init SQL and PyIceberg see.
pub fn schema() -> iceberg::Result<Schema> {
    Schema::builder()
        .with_schema_id(0)
        .with_fields(vec![
            NestedField::required(1, "city", Type::Primitive(PrimitiveType::String)).into(),
            NestedField::required(2, "temperature", Type::Primitive(PrimitiveType::Double)).into(),
            NestedField::required(3, "ts", Type::Primitive(PrimitiveType::Timestamptz)).into(),
        ])
        .build()
}

pub struct WeatherTable {
    catalog: Arc<dyn Catalog>,
    /// The catalog's row for the table, for maintenance commits.
    row: CatalogRows,
    maintenance: Maintenance,
    /// FileIO properties, for the orphan sweep's listing.
    storage: HashMap<String, String>,
    ident: TableIdent,
    pub table: Table,
    target_file_size: usize,
}

impl WeatherTable {
    /// Connects to the catalog and loads `namespace.table`, creating both when missing.
    pub async fn open(
        config: &CatalogConfig,
        namespace: &str,
        table: &str,
        target_file_size: usize,
    ) -> anyhow::Result<Self> {
        let catalog = config.connect().await?;
        let namespace = NamespaceIdent::new(namespace.to_owned());
        if !catalog.namespace_exists(&namespace).await? {
            match catalog.create_namespace(&namespace, HashMap::new()).await {
                Ok(_) => tracing::info!(namespace = ?namespace, "created namespace"),
                // Another process may have created it meanwhile.
                Err(e) if catalog.namespace_exists(&namespace).await? => {
                    tracing::debug!(error = %e, "namespace appeared")
                }
                Err(e) => return Err(e.into()),
            }
        }
        let ident = TableIdent::new(namespace.clone(), table.to_owned());
        let table = if catalog.table_exists(&ident).await? {
            catalog.load_table(&ident).await?
        } else {
            let spec = UnboundPartitionSpec::builder()
                .add_partition_field(3, "ts_hour", Transform::Hour)?
                .build();
            let creation = TableCreation::builder()
                .name(table.to_owned())
                .schema(schema()?)
                .partition_spec(spec)
                .properties([
                    ("write.format.default".to_owned(), "parquet".to_owned()),
                    ("write.parquet.compression-codec".to_owned(), "zstd".to_owned()),
                    // Metadata versions listed in each metadata file (maintenance deletes the rest).
                    ("write.metadata.previous-versions-max".to_owned(), "20".to_owned()),
                ])
                .build();
            match catalog.create_table(&namespace, creation).await {
                Ok(table) => {
                    tracing::info!(table = %ident, "created table");
                    table
                }
                Err(e) if catalog.table_exists(&ident).await? => {
                    tracing::debug!(error = %e, "table appeared");
                    catalog.load_table(&ident).await?
                }
                Err(e) => return Err(e.into()),
            }
        };
        // Connected on first use: with maintenance off, never.
        let row = CatalogRows::connect(&config.url, &config.name, 1)?;
        let mut maintenance = Maintenance::default();
        maintenance.observe(&table);
        Ok(Self {
            catalog,
            row,
            maintenance,
            storage: config.storage.clone(),
            ident,
            table,
            target_file_size,
        })
    }

    pub async fn reload(&mut self) -> anyhow::Result<()> {
        self.table = self.catalog.load_table(&self.ident).await?;
        Ok(())
    }

    /// What the table records of `topic`'s partitions: the checkpoints and owner epochs of the
    /// newest snapshot on the current snapshot's line of parents that records any.
    ///
    /// Fails with [`BrokenLineage`] when a parent on that line is no longer in the metadata
    /// before such a snapshot is found: where the partitions stand is then unknown, and "none
    /// recorded" would read every partition from its start again.
    pub fn recorded(&self, topic: &str) -> anyhow::Result<Recorded> {
        let metadata = self.table.metadata_ref();
        let Some(current) = metadata.current_snapshot_id() else {
            return Ok(Recorded::default());
        };
        match snapshot_summary::lineage(&metadata, current, topic)? {
            Lineage::Recorded {
                depth,
                checkpoints,
                epochs,
                ..
            } => Ok(Recorded {
                checkpoints,
                epochs,
                depth,
            }),
            Lineage::Unrecorded => Ok(Recorded::default()),
            Lineage::Broken { oldest } => Err(BrokenLineage { snapshot: oldest }.into()),
        }
    }

    /// The checkpoints snapshot `id` records of `topic`'s partitions: where an operator may
    /// resume from when the line of snapshots is broken.
    pub fn checkpoints_at(&self, topic: &str, id: i64) -> anyhow::Result<Checkpoints> {
        let snapshot = self
            .table
            .metadata()
            .snapshot_by_id(id)
            .with_context(|| format!("snapshot {id} is not in the table's metadata"))?;
        let (checkpoints, _) = snapshot_summary::decode(&snapshot.summary().additional_properties, topic)?
            .with_context(|| format!("snapshot {id} records no checkpoints of topic {topic}"))?;
        Ok(checkpoints)
    }

    /// The next offset per partition of [`Self::recorded`].
    pub fn committed_offsets(&self, topic: &str) -> anyhow::Result<Offsets> {
        Ok(self
            .recorded(topic)?
            .checkpoints
            .into_iter()
            .map(|(p, c)| (p, c.next_offset))
            .collect())
    }

    /// One maintenance run (see [`crate::maintenance`]). Expiry keeps the snapshots from the
    /// current one back to the one that records `topic`'s checkpoints.
    pub async fn maintain(&mut self, topic: &str, policy: &Policy) -> anyhow::Result<Report> {
        self.reload().await?;
        // A manifest rewrite may add one snapshot on top before the expiry.
        let lineage = self.recorded(topic)?.depth + 1;
        let (table, report) = self
            .maintenance
            .run(
                self.catalog.as_ref(),
                &self.row,
                self.table.clone(),
                policy,
                lineage,
                &self.storage,
            )
            .await?;
        self.table = table;
        Ok(report)
    }

    /// How big the table's metadata is now.
    pub async fn shape(&self) -> anyhow::Result<Shape> {
        let metadata = self.table.metadata();
        let manifests = match metadata.current_snapshot() {
            Some(snapshot) => manifests_of(&self.table, snapshot).await?.len(),
            None => 0,
        };
        let metadata_bytes = match self.table.metadata_location() {
            Some(location) => self.table.file_io().new_input(location)?.metadata().await?.size,
            None => 0,
        };
        Ok(Shape {
            snapshots: metadata.snapshots().len(),
            manifests,
            metadata_bytes,
        })
    }

    /// Live data files per `hour(ts)` partition in the current snapshot (reads every manifest).
    pub async fn data_files_per_partition(&self) -> anyhow::Result<BTreeMap<i32, usize>> {
        let mut files = BTreeMap::new();
        let Some(snapshot) = self.table.metadata().current_snapshot() else {
            return Ok(files);
        };
        for manifest in manifests_of(&self.table, snapshot).await? {
            let (entries, _) = manifest.load_manifest(self.table.file_io()).await?.into_parts();
            for hour in entries.iter().filter(|e| e.is_alive()).filter_map(entry_hour) {
                *files.entry(hour).or_default() += 1;
            }
        }
        Ok(files)
    }

    pub fn current_snapshot_id(&self) -> Option<i64> {
        self.table.metadata().current_snapshot_id()
    }

    /// Writes `readings` as Parquet, one file per `hour(ts)` partition (rolled at the target
    /// size), and returns the data files, not yet committed.
    pub async fn write(&self, readings: &[WeatherReading]) -> anyhow::Result<Vec<DataFile>> {
        files::write(&self.table, readings, self.target_file_size).await
    }

    /// Takes `partitions` over for a writer: raises their owner epochs in a snapshot of their
    /// own (no files), so that a commit of their previous owner, which checks its epochs, can
    /// no longer land. Returns the partitions' checkpoints and their new epochs.
    ///
    /// `resume` is where the partitions are taken to stand when the table's line of snapshots is
    /// broken ([`BrokenLineage`], which is the error without it): the snapshot records it, and
    /// the line is whole again.
    pub async fn claim(
        &mut self,
        topic: &str,
        partitions: &[i32],
        resume: Option<&Checkpoints>,
    ) -> anyhow::Result<Claim> {
        let none = (Checkpoints::new(), Epochs::new());
        let change = Change {
            expected: &none.0,
            checkpoints: &none.0,
            epochs: &none.1,
            claim: partitions,
            resume,
        };
        let (checkpoints, epochs) = self.append(topic, Vec::new(), &change).await?.1;
        let mine = |p: &i32| partitions.contains(p);
        Ok(Claim {
            checkpoints: checkpoints.into_iter().filter(|(p, _)| mine(p)).collect(),
            epochs: epochs.into_iter().filter(|(p, _)| mine(p)).collect(),
        })
    }

    /// Appends `files` in one snapshot whose summary records `checkpoints` (those of the
    /// partitions this writer owns), merged with the other partitions' checkpoints from the
    /// snapshot it is based on. Each of `checkpoints`' partitions must still be where the
    /// writer last saw it (`expected`) and, where the writer holds an owner epoch (`epochs`),
    /// at that epoch; else another writer took it over: [`Fenced`], and the files are deleted.
    /// Returns how many commits of other writers landed first (each met by checking and
    /// merging again on the new snapshot, with the same files).
    pub async fn commit(
        &mut self,
        topic: &str,
        files: Vec<DataFile>,
        expected: &Checkpoints,
        checkpoints: &Checkpoints,
        epochs: &Epochs,
    ) -> anyhow::Result<usize> {
        let change = Change {
            expected,
            checkpoints,
            epochs,
            claim: &[],
            resume: None,
        };
        Ok(self.append(topic, files, &change).await?.0)
    }

    /// Appends `files` with `change` on the current snapshot, again on each newer one that
    /// another writer commits first. Returns those conflicts, and the checkpoints and epochs
    /// the new snapshot records.
    async fn append(
        &mut self,
        topic: &str,
        files: Vec<DataFile>,
        change: &Change<'_>,
    ) -> anyhow::Result<(usize, (Checkpoints, Epochs))> {
        let mut conflicts = 0;
        loop {
            self.reload().await?;
            let (mut checkpoints, mut epochs) = match (self.recorded(topic), change.resume) {
                (Err(e), Some(resume)) if e.is::<BrokenLineage>() => {
                    // The epochs given out are lost with the line: they start again above any the
                    // table can have given out (each claim is a commit, so none exceeds the last
                    // sequence number), so that no earlier owner's commit can land.
                    let past_any = self.table.metadata().last_sequence_number();
                    let epochs = resume.keys().chain(change.claim).map(|p| (*p, past_any)).collect();
                    (resume.clone(), epochs)
                }
                (recorded, _) => {
                    let recorded = recorded?;
                    (recorded.checkpoints, recorded.epochs)
                }
            };
            let fenced: Vec<i32> = change
                .checkpoints
                .keys()
                .filter(|p| {
                    checkpoints.get(p) != change.expected.get(p)
                        || change
                            .epochs
                            .get(p)
                            .is_some_and(|mine| epochs.get(p).copied().unwrap_or(0) != *mine)
                })
                .copied()
                .collect();
            if !fenced.is_empty() {
                tracing::warn!(
                    ?fenced,
                    found = ?checkpoints,
                    expected = ?change.expected,
                    "the table's Kafka offsets or owner epochs of these partitions moved: another writer owns them now"
                );
                self.delete_files(&files).await;
                return Err(Fenced { partitions: fenced }.into());
            }
            checkpoints.extend(change.checkpoints.iter().map(|(p, c)| (*p, c.clone())));
            for &partition in change.claim {
                *epochs.entry(partition).or_default() += 1;
            }
            let summary = snapshot_summary::encode(topic, &checkpoints, &epochs)?;
            let transaction = Transaction::new(&self.table);
            let action = transaction
                .fast_append()
                // Every file has a new UUID name. The check would read every manifest of the table
                // on every commit: a cost that grows with the table's age.
                .with_check_duplicate(false)
                .add_data_files(files.clone())
                .set_snapshot_properties(summary);
            let transaction = action.apply(transaction)?;
            // Committed on exactly the base the summary was merged from, or not at all.
            let pinned = Pinned {
                inner: self.catalog.clone(),
                base: self.table.clone(),
            };
            match transaction.commit(&pinned).await {
                Ok(table) => {
                    self.table = table;
                    self.maintenance.observe(&self.table);
                    return Ok((conflicts, (checkpoints, epochs)));
                }
                Err(e) if e.kind() == ErrorKind::CatalogCommitConflicts && conflicts < MAX_COMMIT_CONFLICTS => {
                    conflicts += 1;
                    tracing::debug!(error = %e, conflicts, "another commit came first; merging again on it");
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Deletes data files that will never be committed; what fails is left to the orphan sweep.
    async fn delete_files(&self, files: &[DataFile]) {
        for file in files {
            if let Err(e) = self.table.file_io().delete(file.file_path()).await {
                tracing::debug!(error = %e, path = file.file_path(), "could not delete an uncommitted file");
            }
        }
    }
}

/// What one append changes besides adding files.
struct Change<'a> {
    /// The checkpoints the writer last saw of the partitions in `checkpoints`.
    expected: &'a Checkpoints,
    /// The new checkpoints of the writer's partitions.
    checkpoints: &'a Checkpoints,
    /// The writer's owner epochs.
    epochs: &'a Epochs,
    /// Partitions whose owner epoch is raised.
    claim: &'a [i32],
    /// Where the partitions are taken to stand if the table's line of snapshots is broken.
    resume: Option<&'a Checkpoints>,
}

/// Commits in a row the same writers keep winning, before a commit gives up (and its consumer
/// resumes from the last commit).
const MAX_COMMIT_CONFLICTS: usize = 50;
