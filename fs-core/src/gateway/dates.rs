//! The date formats of S3: ISO 8601 in XML (`2024-01-02T03:04:05.000Z`), IMF-fixdate in HTTP
//! headers (`Tue, 02 Jan 2024 03:04:05 GMT`) and the SigV4 basic format (`20240102T030405Z`).

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// (year, month, day) of a day count since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

struct Parts {
    year: i64,
    month: u32,
    day: u32,
    hour: i64,
    min: i64,
    sec: i64,
    millis: i64,
    weekday: usize,
}

fn parts(ns: i64) -> Parts {
    let secs = ns.div_euclid(1_000_000_000);
    let millis = ns.rem_euclid(1_000_000_000) / 1_000_000;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    Parts {
        year,
        month,
        day,
        hour: rem / 3600,
        min: rem % 3600 / 60,
        sec: rem % 60,
        millis,
        // 1970-01-01 was a Thursday.
        weekday: (days + 4).rem_euclid(7) as usize,
    }
}

const DAYS: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// `2024-01-02T03:04:05.000Z` (nanoseconds since the epoch, in milliseconds).
pub fn iso8601(ns: i64) -> String {
    let p = parts(ns);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        p.year, p.month, p.day, p.hour, p.min, p.sec, p.millis
    )
}

/// `Tue, 02 Jan 2024 03:04:05 GMT` (whole seconds).
pub fn http_date(ns: i64) -> String {
    let p = parts(ns);
    format!(
        "{}, {:02} {} {:04} {:02}:{:02}:{:02} GMT",
        DAYS[p.weekday],
        p.day,
        MONTHS[p.month as usize - 1],
        p.year,
        p.hour,
        p.min,
        p.sec
    )
}

fn num(s: &str) -> Option<i64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn to_secs(y: i64, mo: i64, d: i64, h: i64, mi: i64, s: i64) -> Option<i64> {
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    Some(days_from_civil(y, mo as u32, d as u32) * 86_400 + h * 3600 + mi * 60 + s)
}

/// Seconds since the epoch of `20240102T030405Z`.
pub fn parse_amz_date(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    to_secs(
        num(&s[0..4])?,
        num(&s[4..6])?,
        num(&s[6..8])?,
        num(&s[9..11])?,
        num(&s[11..13])?,
        num(&s[13..15])?,
    )
}

/// Seconds since the epoch of an IMF-fixdate (`Tue, 02 Jan 2024 03:04:05 GMT`).
pub fn parse_http_date(s: &str) -> Option<i64> {
    let f: Vec<&str> = s.split_whitespace().collect();
    if f.len() != 6 || f[5] != "GMT" {
        return None;
    }
    let month = MONTHS.iter().position(|m| *m == f[2])? as i64 + 1;
    let t: Vec<&str> = f[4].split(':').collect();
    if t.len() != 3 {
        return None;
    }
    to_secs(
        num(f[3])?,
        month,
        num(f[1])?,
        num(t[0])?,
        num(t[1])?,
        num(t[2])?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_match_known_instants() {
        // 2013-05-24T00:00:00Z, the date of the SigV4 examples.
        let ns = 1_369_353_600_000_000_000;
        assert_eq!(iso8601(ns), "2013-05-24T00:00:00.000Z");
        assert_eq!(http_date(ns), "Fri, 24 May 2013 00:00:00 GMT");
        assert_eq!(parse_amz_date("20130524T000000Z"), Some(ns / 1_000_000_000));
        assert_eq!(iso8601(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(http_date(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        // A leap day with milliseconds.
        let leap = 1_709_164_800_123_456_789; // 2024-02-29T00:00:00.123456789Z
        assert_eq!(iso8601(leap), "2024-02-29T00:00:00.123Z");
        assert_eq!(http_date(leap), "Thu, 29 Feb 2024 00:00:00 GMT");
    }

    #[test]
    fn parsing_round_trips_and_rejects_garbage() {
        for secs in [
            0i64,
            951_782_400,
            1_369_353_600,
            1_709_164_800,
            4_102_444_799,
        ] {
            let ns = secs * 1_000_000_000;
            assert_eq!(parse_http_date(&http_date(ns)), Some(secs));
            let iso = iso8601(ns);
            let basic = format!(
                "{}{}{}T{}{}{}Z",
                &iso[0..4],
                &iso[5..7],
                &iso[8..10],
                &iso[11..13],
                &iso[14..16],
                &iso[17..19]
            );
            assert_eq!(parse_amz_date(&basic), Some(secs), "{basic}");
        }
        for bad in [
            "",
            "20130524T000000",
            "2013-05-24T00:00:00Z",
            "20131324T000000Z",
        ] {
            assert_eq!(parse_amz_date(bad), None, "{bad}");
        }
        assert_eq!(parse_http_date("Fri, 24 Foo 2013 00:00:00 GMT"), None);
        assert_eq!(parse_http_date("yesterday"), None);
    }
}
