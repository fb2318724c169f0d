//! Where an Iceberg snapshot's summary records the Kafka checkpoints and owner epochs of the
//! data it holds, written by the iceberg-sink and read by it and by the window-aggregator's
//! rebuild. Each is a JSON object of partition → value under a key named after the topic, as the
//! Iceberg Kafka Connect sink keeps its offsets.

use std::collections::{BTreeMap, HashMap};

use iceberg::{spec::TableMetadataRef, util::snapshot::ancestors_of};

use crate::consumer::{Checkpoint, Checkpoints, Epochs};

/// Where the Kafka position is kept: snapshot summary key `kafka.offsets.<topic>`, value a JSON
/// object of partition → next offset to read, as the Iceberg Kafka Connect sink does.
pub fn offsets_key(topic: &str) -> String {
    format!("kafka.offsets.{topic}")
}

/// Where the identity of the log those offsets belong to is kept: snapshot summary key
/// `kafka.records.<topic>`, a JSON object of partition → [`weather_common::consumer::record_id`]
/// of the record before the offset.
pub fn records_key(topic: &str) -> String {
    format!("kafka.records.{topic}")
}

/// Where each partition's dead-letter mark is kept: snapshot summary key
/// `kafka.dead-letters-from.<topic>`, a JSON object of partition →
/// [`weather_common::consumer::Checkpoint::dead_letters_from`].
pub fn dead_letters_key(topic: &str) -> String {
    format!("kafka.dead-letters-from.{topic}")
}

/// Where partition ownership is kept: snapshot summary key `kafka.epochs.<topic>`, a JSON object
/// of partition → owner epoch, raised by each sink instance that takes the partition over.
pub fn epochs_key(topic: &str) -> String {
    format!("kafka.epochs.{topic}")
}

/// The summary properties that record `checkpoints` and `epochs` of `topic`'s partitions.
pub fn encode(topic: &str, checkpoints: &Checkpoints, epochs: &Epochs) -> serde_json::Result<HashMap<String, String>> {
    let offsets: BTreeMap<String, i64> = checkpoints
        .iter()
        .map(|(p, c)| (p.to_string(), c.next_offset))
        .collect();
    let records: BTreeMap<String, &str> = checkpoints
        .iter()
        .filter_map(|(p, c)| Some((p.to_string(), c.last_record.as_deref()?)))
        .collect();
    let dead_letters: BTreeMap<String, i64> = checkpoints
        .iter()
        .filter_map(|(p, c)| Some((p.to_string(), c.dead_letters_from?)))
        .collect();
    let owners: BTreeMap<String, i64> = epochs.iter().map(|(p, e)| (p.to_string(), *e)).collect();
    Ok(HashMap::from([
        (offsets_key(topic), serde_json::to_string(&offsets)?),
        (records_key(topic), serde_json::to_string(&records)?),
        (dead_letters_key(topic), serde_json::to_string(&dead_letters)?),
        (epochs_key(topic), serde_json::to_string(&owners)?),
    ]))
}

/// The checkpoints and owner epochs a snapshot's `summary` records of `topic`, if any.
pub fn decode(summary: &HashMap<String, String>, topic: &str) -> anyhow::Result<Option<(Checkpoints, Epochs)>> {
    let Some(json) = summary.get(&offsets_key(topic)) else {
        return Ok(None);
    };
    let offsets: BTreeMap<String, i64> = serde_json::from_str(json)?;
    let mut records: BTreeMap<String, String> = match summary.get(&records_key(topic)) {
        Some(json) => serde_json::from_str(json)?,
        None => BTreeMap::new(),
    };
    let mut dead_letters: BTreeMap<String, i64> = match summary.get(&dead_letters_key(topic)) {
        Some(json) => serde_json::from_str(json)?,
        None => BTreeMap::new(),
    };
    let epochs: BTreeMap<String, i64> = match summary.get(&epochs_key(topic)) {
        Some(json) => serde_json::from_str(json)?,
        None => BTreeMap::new(),
    };
    let checkpoints = offsets
        .into_iter()
        .map(|(p, next_offset)| {
            let last_record = records.remove(&p);
            let dead_letters_from = dead_letters.remove(&p);
            Ok((
                p.parse()?,
                Checkpoint {
                    next_offset,
                    last_record,
                    dead_letters_from,
                },
            ))
        })
        .collect::<anyhow::Result<Checkpoints>>()?;
    let epochs = epochs
        .into_iter()
        .map(|(p, epoch)| Ok((p.parse()?, epoch)))
        .collect::<anyhow::Result<Epochs>>()?;
    Ok(Some((checkpoints, epochs)))
}

/// What the line of snapshots from one snapshot back says of a topic's partitions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lineage {
    /// `snapshot`, `depth` snapshots back (the first one is 1), is the newest on the line that
    /// records them.
    Recorded {
        snapshot: i64,
        depth: usize,
        checkpoints: Checkpoints,
        epochs: Epochs,
    },
    /// None on the line does, back to the table's first snapshot: no Kafka record is in it.
    Unrecorded,
    /// None does back to `oldest`, whose parent is no longer in the metadata (expired, by the
    /// sink or another engine): where the partitions stand is unknown.
    Broken { oldest: i64 },
}

/// Walks back from snapshot `from` of `metadata` to the newest snapshot recording `topic`'s
/// checkpoints.
pub fn lineage(metadata: &TableMetadataRef, from: i64, topic: &str) -> anyhow::Result<Lineage> {
    let mut oldest = None;
    for (depth, snapshot) in ancestors_of(metadata, from).enumerate() {
        if let Some((checkpoints, epochs)) = decode(&snapshot.summary().additional_properties, topic)? {
            return Ok(Lineage::Recorded {
                snapshot: snapshot.snapshot_id(),
                depth: depth + 1,
                checkpoints,
                epochs,
            });
        }
        oldest = Some(snapshot);
    }
    // The walk ended at a snapshot without a parent in the metadata: the table's first (no
    // parent, sequence number 1 in format v2, 0 in v1), or one whose parent was expired, its id
    // kept or dropped with it (PyIceberg drops it).
    Ok(match oldest {
        Some(oldest) if oldest.parent_snapshot_id().is_some() || oldest.sequence_number() > 1 => Lineage::Broken {
            oldest: oldest.snapshot_id(),
        },
        _ => Lineage::Unrecorded,
    })
}

/// The `kafka.*` properties of `summary` when it records the checkpoints of any topic: what a
/// snapshot made on top (a maintenance rewrite) carries so that it records them too.
pub fn checkpoint_properties(summary: &HashMap<String, String>) -> Option<HashMap<String, String>> {
    summary.keys().any(|k| k.starts_with("kafka.offsets.")).then(|| {
        summary
            .iter()
            .filter(|(k, _)| k.starts_with("kafka."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_and_epochs_read_back_as_written() {
        let checkpoints = Checkpoints::from([
            (
                0,
                Checkpoint {
                    next_offset: 42,
                    last_record: Some("41:00000000000000ff".into()),
                    dead_letters_from: Some(7),
                },
            ),
            (1, Checkpoint::start(0)),
        ]);
        let epochs = Epochs::from([(0, 3), (1, 1)]);
        let mut summary = encode("weather", &checkpoints, &epochs).expect("encode");
        assert_eq!(summary["kafka.offsets.weather"], r#"{"0":42,"1":0}"#);
        assert_eq!(
            decode(&summary, "weather").expect("decode"),
            Some((checkpoints.clone(), epochs))
        );
        assert_eq!(decode(&summary, "other").expect("decode"), None);

        // Written by an older version: offsets alone.
        summary.retain(|k, _| k == "kafka.offsets.weather");
        let (older, epochs) = decode(&summary, "weather").expect("decode").expect("recorded");
        assert_eq!(older[&0], Checkpoint::start(42));
        assert!(epochs.is_empty());

        summary.insert("kafka.offsets.weather".into(), "{\"x\":1}".into());
        assert!(decode(&summary, "weather").is_err(), "a partition that is not a number");
    }

    #[test]
    fn only_a_summary_with_checkpoints_is_carried() {
        let recorded = HashMap::from([
            ("kafka.offsets.weather".to_owned(), "{}".to_owned()),
            ("kafka.epochs.weather".to_owned(), "{}".to_owned()),
            ("added-records".to_owned(), "5".to_owned()),
        ]);
        let carried = checkpoint_properties(&recorded).expect("recorded");
        assert_eq!(carried.len(), 2);
        assert!(carried.keys().all(|k| k.starts_with("kafka.")));
        let theirs = HashMap::from([("added-records".to_owned(), "5".to_owned())]);
        assert_eq!(checkpoint_properties(&theirs), None);
    }
}
