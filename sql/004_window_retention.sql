-- The dashboard reads the windows of the last hour across cities (and those after `since`),
-- and the aggregator deletes windows past their retention: both by window_start alone, which
-- the primary key (city, window_start) does not serve.
CREATE INDEX IF NOT EXISTS weather_window_start ON weather (window_start);
