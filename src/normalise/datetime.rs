//! Small, dependency-free date-time handling for mappings: vendor timestamps become FHIR
//! `dateTime` values with an explicit offset.
//!
//! Accepted inputs: ISO 8601 / RFC 3339 (`2025-03-14T13:05:22+01:00`, `…Z`, `…+01`, `…+0100`,
//! fractional seconds, missing seconds, a space instead of `T`), local times without an offset
//! (interpreted in the mapping's time zone), dates alone, and epoch seconds / milliseconds.

use std::fmt::Write as _;

/// A time zone for local (offset-less) vendor times and for rendering epoch values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Zone {
    Utc,
    /// Fixed offset in minutes east of UTC.
    Fixed(i32),
    /// Europe/Oslo: CET (+01:00), CEST (+02:00) from the last Sunday of March 01:00 UTC to the
    /// last Sunday of October 01:00 UTC (EU rules, in force since 1996).
    EuropeOslo,
}

impl Zone {
    pub fn parse(s: &str) -> Option<Zone> {
        match s {
            "UTC" | "Z" | "Etc/UTC" => Some(Zone::Utc),
            "Europe/Oslo" => Some(Zone::EuropeOslo),
            other => parse_offset(other).map(Zone::Fixed),
        }
    }

    /// Offset (minutes) in effect at the UTC instant `utc_ms`.
    fn offset_at_utc(self, utc_ms: i64) -> i32 {
        match self {
            Zone::Utc => 0,
            Zone::Fixed(m) => m,
            Zone::EuropeOslo => {
                let (y, _, _) = civil_from_days(utc_ms.div_euclid(86_400_000));
                let start = eu_dst_boundary(y, 3);
                let end = eu_dst_boundary(y, 10);
                if utc_ms >= start && utc_ms < end {
                    120
                } else {
                    60
                }
            }
        }
    }

    /// Offset for a local wall-clock time (ms since epoch as if it were UTC). In the repeated
    /// autumn hour the standard-time reading wins; a skipped spring time gets the summer offset.
    fn offset_for_local(self, local_ms: i64) -> i32 {
        match self {
            Zone::EuropeOslo => {
                let as_summer = self.offset_at_utc(local_ms - 120 * 60_000);
                let as_winter = self.offset_at_utc(local_ms - 60 * 60_000);
                if as_winter == 60 { 60 } else { as_summer }
            }
            other => other.offset_at_utc(local_ms),
        }
    }
}

/// Last Sunday of `month` (3 or 10) at 01:00 UTC, in ms.
fn eu_dst_boundary(year: i64, month: u32) -> i64 {
    let last = days_from_civil(year, month, 31);
    // 1970-01-01 was a Thursday; weekday 0 = Sunday.
    let weekday = (last + 4).rem_euclid(7);
    (last - weekday) * 86_400_000 + 3_600_000
}

/// How a mapping says a timestamp is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeFormat {
    /// ISO 8601; local times use the mapping's zone.
    Iso,
    EpochMs,
    EpochS,
}

/// A parsed instant (or a bare date), ready to print as FHIR `dateTime`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DateTime {
    /// Milliseconds since the epoch (UTC); for a bare date, its midnight in UTC.
    pub epoch_ms: i64,
    /// FHIR text.
    pub text: String,
}

pub fn parse(input: &str, format: TimeFormat, zone: Zone) -> Result<DateTime, String> {
    let s = input.trim();
    match format {
        TimeFormat::EpochMs | TimeFormat::EpochS => {
            let n: i64 = s
                .parse()
                .map_err(|_| format!("{s:?} is not an integer epoch time"))?;
            let ms = if format == TimeFormat::EpochS {
                n.checked_mul(1000)
            } else {
                Some(n)
            }
            .filter(|ms| (0..=253_402_300_799_999).contains(ms))
            .ok_or_else(|| format!("epoch time {s} is out of range"))?;
            let off = zone.offset_at_utc(ms);
            Ok(DateTime {
                epoch_ms: ms,
                text: render(ms, off, ms % 1000 != 0),
            })
        }
        TimeFormat::Iso => parse_iso(s, zone),
    }
}

fn parse_iso(s: &str, zone: Zone) -> Result<DateTime, String> {
    let bad = || format!("{s:?} is not an ISO 8601 date-time");
    let b = s.as_bytes();
    if b.len() < 10 || b[4] != b'-' || b[7] != b'-' {
        return Err(bad());
    }
    let year = digits(&b[0..4]).ok_or_else(bad)?;
    let month = digits(&b[5..7]).ok_or_else(bad)?;
    let day = digits(&b[8..10]).ok_or_else(bad)?;
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month as u32) {
        return Err(format!("{s:?} is not a valid calendar date"));
    }
    if year < 1900 {
        return Err(format!("{s:?} is before 1900"));
    }
    let days = days_from_civil(year, month as u32, day as u32);
    if b.len() == 10 {
        return Ok(DateTime {
            epoch_ms: days * 86_400_000,
            text: s.to_string(),
        });
    }
    if b[10] != b'T' && b[10] != b' ' && b[10] != b't' {
        return Err(bad());
    }
    let rest = &s[11..];
    let rb = rest.as_bytes();
    if rb.len() < 5 || rb[2] != b':' {
        return Err(bad());
    }
    let hour = digits(&rb[0..2]).ok_or_else(bad)?;
    let minute = digits(&rb[3..5]).ok_or_else(bad)?;
    let mut i = 5;
    let mut second = 0;
    let mut millis = 0i64;
    let mut has_fraction = false;
    if rb.len() > i && rb[i] == b':' {
        if rb.len() < i + 3 {
            return Err(bad());
        }
        second = digits(&rb[i + 1..i + 3]).ok_or_else(bad)?;
        i += 3;
        if rb.len() > i && (rb[i] == b'.' || rb[i] == b',') {
            let start = i + 1;
            let mut end = start;
            while end < rb.len() && rb[end].is_ascii_digit() {
                end += 1;
            }
            if end == start || end - start > 9 {
                return Err(bad());
            }
            let frac = &rest[start..end];
            let padded = format!("{frac:0<3}");
            millis = padded[..3].parse().map_err(|_| bad())?;
            has_fraction = true;
            i = end;
        }
    }
    if hour > 23 || minute > 59 || second > 60 {
        return Err(format!("{s:?} has an invalid time of day"));
    }
    let second = second.min(59);
    let local_ms = days * 86_400_000 + (hour * 3600 + minute * 60 + second) * 1000 + millis;
    let zone_part = &rest[i..];
    let offset = if zone_part.is_empty() {
        zone.offset_for_local(local_ms)
    } else if zone_part == "Z" || zone_part == "z" {
        0
    } else {
        parse_offset(zone_part).ok_or_else(|| format!("{s:?} has an invalid UTC offset"))?
    };
    let utc = local_ms - i64::from(offset) * 60_000;
    Ok(DateTime {
        epoch_ms: utc,
        text: render(utc, offset, has_fraction && millis != 0),
    })
}

/// `+01:00`, `+0100`, `+01`, `-05:30` → minutes.
fn parse_offset(s: &str) -> Option<i32> {
    let b = s.as_bytes();
    let sign = match b.first()? {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let body = &s[1..];
    if !body.is_ascii() {
        return None;
    }
    let (h, m) = match body.len() {
        2 => (body, "00"),
        4 => (&body[..2], &body[2..]),
        5 if body.as_bytes()[2] == b':' => (&body[..2], &body[3..]),
        _ => return None,
    };
    let h = digits(h.as_bytes())?;
    let m = digits(m.as_bytes())?;
    if h > 14 || m > 59 {
        return None;
    }
    Some(sign * (h * 60 + m) as i32)
}

fn digits(b: &[u8]) -> Option<i64> {
    if b.is_empty() || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(b).ok()?.parse().ok()
}

/// `YYYY-MM-DDThh:mm:ss[.mmm]±hh:mm` (or `Z` for a zero offset in UTC zone).
pub fn render(utc_ms: i64, offset_min: i32, with_millis: bool) -> String {
    let local = utc_ms + i64::from(offset_min) * 60_000;
    let days = local.div_euclid(86_400_000);
    let ms_of_day = local.rem_euclid(86_400_000);
    let (y, mo, d) = civil_from_days(days);
    let secs = ms_of_day / 1000;
    let mut out = format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    );
    if with_millis {
        let _ = write!(out, ".{:03}", ms_of_day % 1000);
    }
    if offset_min == 0 {
        out.push('Z');
    } else {
        let sign = if offset_min < 0 { '-' } else { '+' };
        let a = offset_min.abs();
        let _ = write!(out, "{sign}{:02}:{:02}", a / 60, a % 60);
    }
    out
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: u32) -> i64 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if is_leap(y) => 29,
        _ => 28,
    }
}

/// Days since 1970-01-01 for a proleptic Gregorian date (era-based algorithm).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iso(s: &str) -> String {
        parse(s, TimeFormat::Iso, Zone::EuropeOslo).expect(s).text
    }

    #[test]
    fn civil_round_trip() {
        for days in [-1000, 0, 1, 365, 19_000, 20_162, 60_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
    }

    #[test]
    fn offsets_and_local_times() {
        assert_eq!(
            iso("2025-03-14T13:05:22+01:00"),
            "2025-03-14T13:05:22+01:00"
        );
        assert_eq!(iso("2025-03-14T13:05:22+01"), "2025-03-14T13:05:22+01:00");
        assert_eq!(iso("2025-03-14T12:05:22Z"), "2025-03-14T12:05:22Z");
        assert_eq!(iso("2025-03-14 13:05"), "2025-03-14T13:05:00+01:00");
        assert_eq!(iso("2025-07-01T08:00:00"), "2025-07-01T08:00:00+02:00");
        assert_eq!(
            iso("2025-03-14T13:05:22.410+0100"),
            "2025-03-14T13:05:22.410+01:00"
        );
        // DST starts 2025-03-30 01:00 UTC.
        assert_eq!(iso("2025-03-30T01:59:00"), "2025-03-30T01:59:00+01:00");
        assert_eq!(iso("2025-03-30T03:00:00"), "2025-03-30T03:00:00+02:00");
        // Repeated hour on 2025-10-26 resolves to standard time.
        assert_eq!(iso("2025-10-26T02:30:00"), "2025-10-26T02:30:00+01:00");
        assert!(parse("2025-02-29T10:00:00Z", TimeFormat::Iso, Zone::Utc).is_err());
        assert!(parse("14.03.2025", TimeFormat::Iso, Zone::Utc).is_err());
        assert!(parse("2025-03-14T25:00:00Z", TimeFormat::Iso, Zone::Utc).is_err());
        assert!(parse("2025-03-14T10:00:00+1é1", TimeFormat::Iso, Zone::Utc).is_err());
        assert!(parse("2025-03-14T10:00é", TimeFormat::Iso, Zone::Utc).is_err());
    }

    #[test]
    fn epoch() {
        let d = parse("1710417922000", TimeFormat::EpochMs, Zone::EuropeOslo).expect("ms");
        assert_eq!(d.text, "2024-03-14T13:05:22+01:00");
        let d = parse("1710417922", TimeFormat::EpochS, Zone::Utc).expect("s");
        assert_eq!(d.text, "2024-03-14T12:05:22Z");
        let d = parse("1710417922123", TimeFormat::EpochMs, Zone::Utc).expect("ms");
        assert_eq!(d.text, "2024-03-14T12:05:22.123Z");
        assert!(parse("abc", TimeFormat::EpochMs, Zone::Utc).is_err());
        assert!(parse("-5", TimeFormat::EpochMs, Zone::Utc).is_err());
    }
}
