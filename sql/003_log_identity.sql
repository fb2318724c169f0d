-- Which Kafka log the stored offsets belong to: the identity of the record before each
-- partition's next offset (see weather_common::consumer::record_id). A broker that lost its
-- log starts its offsets again at 0; comparing this record tells such a log apart.
ALTER TABLE aggregator_offsets ADD COLUMN IF NOT EXISTS last_record TEXT;
