//! The one record that flows through the pipeline, its JSON form on the `weather` topic, and the
//! validation every entry point applies.

use chrono::{DateTime, SecondsFormat, SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use unicode_normalization::UnicodeNormalization;

/// The cities of the original demo: what the client sends by default and the dashboard
/// always charts.
pub const DEMO_CITIES: [&str; 10] = [
    "San Francisco",
    "New York",
    "Los Angeles",
    "Chicago",
    "Houston",
    "Phoenix",
    "Seattle",
    "Denver",
    "Miami",
    "Boston",
];

/// Longest accepted city name, in characters (the PostgreSQL column is `VARCHAR(255)`).
pub const CITY_MAX_CHARS: usize = 255;
/// Accepted temperature range, inclusive.
pub const TEMPERATURE_RANGE: std::ops::RangeInclusive<f64> = -150.0..=200.0;

/// One weather reading. On the wire (Kafka value) it is
/// `{"city":"Boston","temperature":71.25,"ts":"2026-11-24T03:34:15.123Z"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeatherReading {
    pub city: String,
    pub temperature: f64,
    #[serde(with = "ts_millis")]
    pub ts: DateTime<Utc>,
}

/// Why a reading was refused. The message names the offending field so a client can fix it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ReadingError {
    #[error("city is required")]
    MissingCity,
    #[error("city must not be empty")]
    EmptyCity,
    #[error("city must be at most {CITY_MAX_CHARS} characters, got {0}")]
    CityTooLong(usize),
    #[error("city must not contain control characters")]
    CityControlCharacter,
    #[error("city must not contain invisible or text-direction characters (found U+{0:04X})")]
    CityInvisibleCharacter(u32),
    #[error("temperature is required")]
    MissingTemperature,
    #[error("temperature must be a number, got {0:?}")]
    TemperatureNotANumber(String),
    #[error("temperature must be a finite number")]
    TemperatureNotFinite,
    #[error("temperature must be between -150 and 200, got {0}")]
    TemperatureOutOfRange(f64),
    #[error("ts is required")]
    MissingTimestamp,
    #[error("ts must be an RFC 3339 timestamp: {0}")]
    InvalidTimestamp(String),
    #[error("{0} must be given once")]
    Repeated(&'static str),
    #[error("invalid JSON: {0}")]
    Json(String),
}

impl WeatherReading {
    /// Validates `city` (trimmed) and `temperature` and stamps the reading with `ts`.
    pub fn new(city: &str, temperature: f64, ts: DateTime<Utc>) -> Result<Self, ReadingError> {
        Ok(Self {
            city: validate_city(city)?,
            temperature: validate_temperature(temperature)?,
            ts: ts.trunc_subsecs(3),
        })
    }

    /// Parses `city=X&temperature=Y` (the `GET /log` contract). Unknown parameters are ignored,
    /// repeated ones refused: which of two values was meant cannot be guessed.
    pub fn from_query(query: &str, ts: DateTime<Utc>) -> Result<Self, ReadingError> {
        let mut city = None;
        let mut temperature = None;
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            let (slot, name) = match key.as_ref() {
                "city" => (&mut city, "city"),
                "temperature" => (&mut temperature, "temperature"),
                _ => continue,
            };
            if slot.replace(value).is_some() {
                return Err(ReadingError::Repeated(name));
            }
        }
        let city = city.ok_or(ReadingError::MissingCity)?;
        let temperature = parse_temperature(&temperature.ok_or(ReadingError::MissingTemperature)?)?;
        Self::new(&city, temperature, ts)
    }

    /// Parses one `{"city": .., "temperature": ..}` object of a `POST /log` or `/logs` body.
    pub fn from_request_json(json: &[u8], ts: DateTime<Utc>) -> Result<Self, ReadingError> {
        let object = json_object(json)?;
        let city = string_field(&object, "city", ReadingError::MissingCity)?;
        Self::new(city, number_field(&object)?, ts)
    }

    /// Parses and validates a Kafka record value written by the logging server.
    pub fn from_json(json: &[u8]) -> Result<Self, ReadingError> {
        // Fast path for well-formed records; the slow path only finds words for what is wrong.
        let Ok(reading) = serde_json::from_slice::<Self>(json) else {
            return Err(Self::diagnose(json));
        };
        let valid = Self::new(&reading.city, reading.temperature, reading.ts)?;
        // The city as validated differs from what the producer sent: that producer is not ours.
        if valid.city != reading.city {
            return Err(ReadingError::Json(
                "city is not in normal form (trimmed, Unicode NFC)".into(),
            ));
        }
        Ok(valid)
    }

    /// Why `json` is not a reading, naming the field.
    fn diagnose(json: &[u8]) -> ReadingError {
        let object = match json_object(json) {
            Ok(object) => object,
            Err(e) => return e,
        };
        if let Some(unknown) = object
            .keys()
            .find(|k| !["city", "temperature", "ts"].contains(&k.as_str()))
        {
            return ReadingError::Json(format!("unknown field {unknown:?}"));
        }
        let checked = string_field(&object, "city", ReadingError::MissingCity)
            .and_then(|_| number_field(&object))
            .and_then(|_| string_field(&object, "ts", ReadingError::MissingTimestamp))
            .and_then(|ts| DateTime::parse_from_rfc3339(ts).map_err(|e| ReadingError::InvalidTimestamp(e.to_string())));
        match checked {
            Err(e) => e,
            Ok(_) => ReadingError::Json("not a weather reading".into()),
        }
    }

    /// The Kafka record value.
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing a struct of a string, a finite f64 and a timestamp cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The current time at the precision readings carry (milliseconds).
    pub fn now() -> DateTime<Utc> {
        Utc::now().trunc_subsecs(3)
    }
}

fn json_object(json: &[u8]) -> Result<serde_json::Map<String, serde_json::Value>, ReadingError> {
    match serde_json::from_slice(json).map_err(|e| ReadingError::Json(e.to_string()))? {
        serde_json::Value::Object(object) => Ok(object),
        _ => Err(ReadingError::Json("expected a JSON object".into())),
    }
}

fn string_field<'a>(
    object: &'a serde_json::Map<String, serde_json::Value>,
    name: &'static str,
    missing: ReadingError,
) -> Result<&'a str, ReadingError> {
    match object.get(name) {
        None | Some(serde_json::Value::Null) => Err(missing),
        Some(serde_json::Value::String(text)) => Ok(text),
        Some(other) => Err(ReadingError::Json(format!("{name} must be a string, got {other}"))),
    }
}

fn number_field(object: &serde_json::Map<String, serde_json::Value>) -> Result<f64, ReadingError> {
    match object.get("temperature") {
        None | Some(serde_json::Value::Null) => Err(ReadingError::MissingTemperature),
        Some(serde_json::Value::Number(n)) => n
            .as_f64()
            .ok_or_else(|| ReadingError::TemperatureNotANumber(n.to_string())),
        Some(other) => Err(ReadingError::TemperatureNotANumber(other.to_string())),
    }
}

/// Trims `raw`, brings it to Unicode NFC (one spelling per name: "é" typed as one code point
/// or as "e" and a combining accent) and checks it is a usable city name.
pub fn validate_city(raw: &str) -> Result<String, ReadingError> {
    let city: String = raw.trim().nfc().collect();
    if city.is_empty() {
        return Err(ReadingError::EmptyCity);
    }
    let chars = city.chars().count();
    if chars > CITY_MAX_CHARS {
        return Err(ReadingError::CityTooLong(chars));
    }
    if city.chars().any(char::is_control) {
        return Err(ReadingError::CityControlCharacter);
    }
    if let Some(c) = city.chars().find(|&c| is_invisible(c)) {
        return Err(ReadingError::CityInvisibleCharacter(c.into()));
    }
    Ok(city)
}

/// Characters that render as nothing or reorder the text around them: a city holding one can
/// look exactly like another ("Bos\u{200b}ton" shows as "Boston"). Unicode's format characters
/// (bidi controls, zero-width joiners and spaces, the BOM, tags), fillers, variation selectors
/// and line and paragraph separators.
fn is_invisible(c: char) -> bool {
    matches!(
        u32::from(c),
        0x00AD
            | 0x034F
            | 0x061C
            | 0x115F..=0x1160
            | 0x17B4..=0x17B5
            | 0x180B..=0x180F
            | 0x200B..=0x200F
            | 0x2028..=0x202E
            | 0x2060..=0x206F
            | 0x3164
            | 0xFE00..=0xFE0F
            | 0xFEFF
            | 0xFFA0
            | 0xFFF0..=0xFFFB
            | 0x1D173..=0x1D17A
            | 0xE0000..=0xE0FFF
    )
}

/// Parses a temperature given as text and checks its range.
pub fn parse_temperature(raw: &str) -> Result<f64, ReadingError> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Err(ReadingError::MissingTemperature);
    }
    let value: f64 = raw
        .parse()
        .map_err(|_| ReadingError::TemperatureNotANumber(raw.chars().take(40).collect()))?;
    validate_temperature(value)
}

/// Checks a temperature is finite and within [`TEMPERATURE_RANGE`].
pub fn validate_temperature(value: f64) -> Result<f64, ReadingError> {
    if !value.is_finite() {
        return Err(ReadingError::TemperatureNotFinite);
    }
    if !TEMPERATURE_RANGE.contains(&value) {
        return Err(ReadingError::TemperatureOutOfRange(value));
    }
    Ok(value)
}

/// RFC 3339, UTC, millisecond precision: `2026-11-24T03:34:15.123Z`.
pub mod ts_millis {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(ts: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_ts(ts))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        DateTime::parse_from_rfc3339(&text)
            .map(|ts| ts.with_timezone(&Utc))
            .map_err(|e| D::Error::custom(format!("ts {text:?} is not RFC 3339: {e}")))
    }
}

/// Formats a timestamp the way the pipeline writes it everywhere.
pub fn format_ts(ts: &DateTime<Utc>) -> String {
    ts.to_rfc3339_opts(SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-24T03:34:15.123456Z")
            .map(|t| t.with_timezone(&Utc))
            .expect("valid test timestamp")
    }

    #[test]
    fn query_roundtrips_through_kafka_json() {
        let reading = WeatherReading::from_query("city=San%20Francisco&temperature=71.25", ts()).expect("valid query");
        assert_eq!(reading.city, "San Francisco");
        assert_eq!(reading.temperature, 71.25);
        let json = String::from_utf8(reading.to_json()).expect("utf8");
        assert_eq!(
            json,
            r#"{"city":"San Francisco","temperature":71.25,"ts":"2026-11-24T03:34:15.123Z"}"#
        );
        assert_eq!(WeatherReading::from_json(json.as_bytes()), Ok(reading));
    }

    #[test]
    fn city_is_trimmed_and_checked() {
        assert_eq!(validate_city("  Boston "), Ok("Boston".into()));
        assert_eq!(validate_city("   "), Err(ReadingError::EmptyCity));
        assert_eq!(validate_city("Bo\u{7}ston"), Err(ReadingError::CityControlCharacter));
        assert_eq!(validate_city(&"é".repeat(255)).map(|c| c.chars().count()), Ok(255));
        assert_eq!(validate_city(&"x".repeat(256)), Err(ReadingError::CityTooLong(256)));
    }

    #[test]
    fn cities_that_look_like_others_are_refused_or_normalised() {
        for (city, code) in [
            ("Bos\u{200b}ton", 0x200B),
            ("\u{feff}Boston", 0xFEFF),
            ("Boston\u{202e}notsoB", 0x202E),
            ("Bos\u{2066}ton\u{2069}", 0x2066),
            ("Bost\u{ad}on", 0x00AD),
            ("Boston\u{e0041}", 0xE0041),
            ("Bos\u{2028}ton", 0x2028),
        ] {
            assert_eq!(
                validate_city(city),
                Err(ReadingError::CityInvisibleCharacter(code)),
                "{city:?}"
            );
        }
        let message = ReadingError::CityInvisibleCharacter(0x200B).to_string();
        assert!(message.contains("U+200B"), "{message}");
        // Decomposed and composed spellings are one city.
        assert_eq!(validate_city("Bogota\u{301}"), Ok("Bogotá".into()));
        assert_eq!(validate_city("São Paulo"), Ok("São Paulo".into()));
        // A producer that is not ours sending a decomposed name is caught at the consumers.
        let decomposed = br#"{"city":"Bogota\u0301","temperature":1.0,"ts":"2027-01-15T08:00:00.000Z"}"#;
        assert!(WeatherReading::from_json(decomposed).is_err());
    }

    #[test]
    fn temperature_must_be_a_finite_number_in_range() {
        assert_eq!(parse_temperature("-150"), Ok(-150.0));
        assert_eq!(parse_temperature("200"), Ok(200.0));
        assert_eq!(
            parse_temperature("200.01"),
            Err(ReadingError::TemperatureOutOfRange(200.01))
        );
        assert_eq!(parse_temperature("NaN"), Err(ReadingError::TemperatureNotFinite));
        assert_eq!(parse_temperature("inf"), Err(ReadingError::TemperatureNotFinite));
        assert_eq!(parse_temperature(""), Err(ReadingError::MissingTemperature));
        assert!(matches!(
            parse_temperature("warm"),
            Err(ReadingError::TemperatureNotANumber(_))
        ));
    }

    #[test]
    fn query_errors_name_the_field() {
        let err = |q| WeatherReading::from_query(q, ts()).expect_err(q).to_string();
        assert_eq!(err("temperature=1"), "city is required");
        assert_eq!(err("city=Boston"), "temperature is required");
        assert_eq!(err("city=A&city=B&temperature=1"), "city must be given once");
        assert!(err("city=Boston&temperature=abc").starts_with("temperature must be a number"));
    }

    #[test]
    fn request_json_accepts_numbers_only() {
        let ok = WeatherReading::from_request_json(br#"{"city":"Miami","temperature":80}"#, ts());
        assert_eq!(ok.map(|r| r.temperature), Ok(80.0));
        let err = WeatherReading::from_request_json(br#"{"city":"Miami","temperature":"80"}"#, ts());
        assert!(matches!(err, Err(ReadingError::TemperatureNotANumber(_))));
        let err = WeatherReading::from_request_json(b"{not json", ts());
        assert!(matches!(err, Err(ReadingError::Json(_))));
    }

    #[test]
    fn kafka_json_errors_name_the_field() {
        let err = |json: &str| WeatherReading::from_json(json.as_bytes()).expect_err(json).to_string();
        assert!(err(r#"{"city":"A","temperature":"warm","ts":"2026-11-24T03:34:15.123Z"}"#).contains("temperature"));
        assert!(err(r#"{"city":1,"temperature":1,"ts":"2026-11-24T03:34:15.123Z"}"#).contains("city"));
        assert_eq!(err(r#"{"city":"A","temperature":1}"#), "ts is required");
        assert!(err(r#"{"city":"A","temperature":1,"ts":"noon"}"#).starts_with("ts must be"));
        assert!(err(r#"{"city":"A","temperature":1,"ts":"2026-11-24T03:34:15Z","x":1}"#).contains("\"x\""));
        assert!(err("[1]").contains("object"));
    }

    #[test]
    fn kafka_json_is_strict() {
        for bad in [
            &br#"{"city":"Miami","temperature":80}"#[..],
            br#"{"city":"Miami","temperature":80,"ts":"yesterday"}"#,
            br#"{"city":" Miami","temperature":80,"ts":"2026-11-24T03:34:15.123Z"}"#,
            br#"{"city":"Miami","temperature":999,"ts":"2026-11-24T03:34:15.123Z"}"#,
            b"\xff\xfe",
        ] {
            assert!(
                WeatherReading::from_json(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
