-- A rebuild of the windows from the Iceberg table (`window-aggregator rebuild`) takes every
-- partition over as a claim does and records the owner epoch it set: an aggregator fenced by it
-- (owner_epoch = rebuilt_epoch) claims the partition again at once, from the rebuild's
-- checkpoints, where after an owner change it would leave the partition to the new owner.
ALTER TABLE aggregator_offsets ADD COLUMN IF NOT EXISTS rebuilt_epoch BIGINT;
