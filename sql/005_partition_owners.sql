-- Several aggregators share the topic's partitions. Each takes a partition over by raising its
-- owner epoch; a commit stores a partition only while the epoch is still the one its instance
-- claimed, so an instance that lost the partition (paused, cut off) stores nothing for it.
ALTER TABLE aggregator_offsets ADD COLUMN IF NOT EXISTS owner_epoch BIGINT NOT NULL DEFAULT 0;
