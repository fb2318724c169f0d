-- The sum beside the average lets a late reading merge into its window exactly
-- (avg = sum / count), whatever order the upserts come in.
ALTER TABLE weather ADD COLUMN IF NOT EXISTS temperature_sum DOUBLE PRECISION;
UPDATE weather SET temperature_sum = avg_temperature * record_count WHERE temperature_sum IS NULL;

-- The dashboard reads the most recent windows of every city.
CREATE INDEX IF NOT EXISTS weather_window_start ON weather (window_start);

-- Exactly once: the next Kafka offset to read per partition, written in the same transaction
-- as the window rows it accounts for, with the partition's event-time high mark so late
-- readings are judged the same way after a restart.
CREATE TABLE IF NOT EXISTS aggregator_offsets (
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    next_offset BIGINT NOT NULL,
    max_event_time TIMESTAMPTZ,
    PRIMARY KEY (topic, partition)
);

-- Windows still open at the last commit: their partial sums resume after a restart.
CREATE TABLE IF NOT EXISTS aggregator_open_windows (
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    city VARCHAR(255) NOT NULL,
    window_start TIMESTAMP NOT NULL,
    window_end TIMESTAMP NOT NULL,
    temperature_sum DOUBLE PRECISION NOT NULL,
    record_count BIGINT NOT NULL,
    PRIMARY KEY (topic, partition, city, window_start)
);
