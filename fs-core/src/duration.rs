//! Durations given on command lines and in mount options: `500ms`, `30s`, `5m`, `1h`, `2d`,
//! or a plain number of seconds; fractions are allowed (`1.5m`). Each caller bounds the value
//! and words its own error (naming its flag and an example).

use std::time::Duration;

/// The duration `s` spells, or `None` when it is not one (no number, an unknown unit, a
/// negative or non-finite value, more than 100 years).
pub fn parse(s: &str) -> Option<Duration> {
    let t = s.trim();
    let (num, unit) = match t.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let mul = match unit.trim() {
        "ms" => 0.001,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3_600.0,
        "d" => 86_400.0,
        _ => return None,
    };
    let v = num.parse::<f64>().ok()? * mul;
    if !v.is_finite() || !(0.0..=100.0 * 365.0 * 86_400.0).contains(&v) {
        return None;
    }
    Some(Duration::from_secs_f64(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_fractions_and_plain_seconds() {
        assert_eq!(parse("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse(" 90 "), Some(Duration::from_secs(90)));
        assert_eq!(parse("1.5m"), Some(Duration::from_secs(90)));
        assert_eq!(parse("2h"), Some(Duration::from_secs(7_200)));
        assert_eq!(parse("7d"), Some(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse("0"), Some(Duration::ZERO));
        assert_eq!(parse("1.5"), Some(Duration::from_millis(1_500)));
    }

    #[test]
    fn rejects_what_is_not_a_duration() {
        for s in [
            "",
            "soon",
            "-1",
            "5 minutes",
            "1e3",
            "1..2s",
            "s",
            "10y",
            "NaN",
        ] {
            assert_eq!(parse(s), None, "{s:?}");
        }
    }
}
