-- Window averages per city, written by window-aggregator and read by the dashboard.
-- Column for column the schema of the original Flink job's sink table.
CREATE TABLE IF NOT EXISTS weather (
    city VARCHAR(255) NOT NULL,
    avg_temperature DOUBLE PRECISION,
    window_start TIMESTAMP,
    window_end TIMESTAMP,
    record_count BIGINT,
    last_updated TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (city, window_start)
);
