-- Where in the dead-letter topic the letters of records past each partition's checkpoint can
-- be: a claim reads from there to the end, so that a record read again after a crash is not
-- dead-lettered twice. NULL (rows written before): read the dead-letter partition from its start.
ALTER TABLE aggregator_offsets ADD COLUMN IF NOT EXISTS dead_letters_from BIGINT;
