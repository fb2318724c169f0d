//! What every weather-pipeline daemon does the same way: the [`WeatherReading`] record and its
//! validation, tracing setup (journald or stderr), sd-notify, shutdown on SIGTERM, and a small
//! HTTP server with graceful drain.

#[cfg(feature = "kafka")]
pub mod consumer;
#[cfg(feature = "kafka")]
pub mod dead_letters;
#[cfg(feature = "iceberg")]
pub mod file_totals;
pub mod http;
#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "iceberg")]
pub mod lakehouse;
pub mod postgres_install;
pub mod reading;
pub mod runtime;
#[cfg(feature = "postgres")]
pub mod schema;
#[cfg(all(feature = "iceberg", feature = "kafka"))]
pub mod snapshot_summary;

pub use reading::{ReadingError, WeatherReading};
