//! Times and durations on the command line: `--dead-after 2026-12-04T18:00:00Z`,
//! `--dead-before 2h` (two hours ago), `--retry-tiers 100ms,1s,5s`.

use std::time::Duration;

/// A duration: a number and a unit, `ms`, `s`, `m`, `h` or `d` (`90s`,
/// `1.5h`, `250ms`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("`{s}`: give a unit (ms, s, m, h, d)"))?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}`: not a number before the unit"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86_400.0,
        other => return Err(format!("`{s}`: unknown unit `{other}` (ms, s, m, h, d)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("`{s}`: {e}"))
}

/// A point in time, as milliseconds since the Unix epoch: RFC 3339
/// (`2026-12-04T18:00:00Z`, `2026-12-04T19:00:00.5+01:00`), a date
/// (`2026-12-04`, midnight UTC), a duration meaning that long ago (`2h`),
/// or milliseconds since the epoch.
pub fn parse_time(s: &str) -> Result<i64, String> {
    parse_time_at(s, idemq::message::unix_millis_now())
}

fn parse_time_at(s: &str, now_ms: i64) -> Result<i64, String> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse().map_err(|_| format!("`{s}`: out of range"));
    }
    if let Ok(ago) = parse_duration(s) {
        let ago = i64::try_from(ago.as_millis()).unwrap_or(i64::MAX);
        return Ok(now_ms.saturating_sub(ago));
    }
    rfc3339(s).ok_or_else(|| {
        format!("`{s}`: not a time (2026-12-04T18:00:00Z, 2026-12-04, 2h for two hours ago, or ms since the epoch)")
    })
}

fn rfc3339(s: &str) -> Option<i64> {
    let num = |t: &str| -> Option<i64> {
        (!t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
            .then(|| t.parse().ok())
            .flatten()
    };
    let (date, rest) = match s.find(['T', 't', ' ']) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    };
    let mut parts = date.split('-');
    let (y, mo, d) = (
        num(parts.next()?)?,
        num(parts.next()?)?,
        num(parts.next()?)?,
    );
    if parts.next().is_some() || !(1..=12).contains(&mo) || !(1..=31).contains(&d) {
        return None;
    }
    let days = days_from_civil(y, mo, d);
    let Some(rest) = rest else {
        return Some(days * 86_400_000);
    };
    // hh:mm:ss[.frac](Z|±hh:mm)
    let (clock, offset_ms) = if let Some(c) = rest.strip_suffix(['Z', 'z']) {
        (c, 0)
    } else {
        let i = rest.rfind(['+', '-'])?;
        let (c, off) = rest.split_at(i);
        let sign = if off.starts_with('-') { -1 } else { 1 };
        let (oh, om) = off[1..].split_once(':')?;
        (c, sign * (num(oh)? * 3_600_000 + num(om)? * 60_000))
    };
    let (hms, frac) = match clock.split_once('.') {
        Some((hms, frac)) => (hms, frac),
        None => (clock, ""),
    };
    let mut hms = hms.split(':');
    let (h, mi, sec) = (num(hms.next()?)?, num(hms.next()?)?, num(hms.next()?)?);
    if hms.next().is_some() || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let ms = if frac.is_empty() {
        0
    } else {
        let digits: String = frac.chars().chain("000".chars()).take(3).collect();
        num(&digits)?
    };
    Some(days * 86_400_000 + h * 3_600_000 + mi * 60_000 + sec * 1000 + ms - offset_ms)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A short age: `42s`, `3m12s`, `5h03m`, `2d04h`.
pub fn age(ms: i64) -> String {
    let s = (ms / 1000).max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("5y").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn times() {
        let now = 1_764_871_200_000; // 2025-12-04T18:00:00Z
        assert_eq!(parse_time_at("2025-12-04T18:00:00Z", now), Ok(now));
        assert_eq!(parse_time_at("2025-12-04T19:00:00+01:00", now), Ok(now));
        assert_eq!(
            parse_time_at("2025-12-04T18:00:00.250Z", now),
            Ok(now + 250)
        );
        assert_eq!(parse_time_at("2025-12-04", now), Ok(now - 18 * 3_600_000));
        assert_eq!(parse_time_at("1970-01-01T00:00:00Z", now), Ok(0));
        assert_eq!(parse_time_at("2h", now), Ok(now - 7_200_000));
        assert_eq!(parse_time_at("12345", now), Ok(12345));
        assert!(parse_time_at("yesterday", now).is_err());
        assert!(parse_time_at("2025-13-01", now).is_err());
        assert!(parse_time_at("2025-12-04T25:00:00Z", now).is_err());
    }

    #[test]
    fn ages() {
        assert_eq!(age(42_000), "42s");
        assert_eq!(age(192_000), "3m12s");
        assert_eq!(age(5 * 3_600_000 + 180_000), "5h03m");
        assert_eq!(age(2 * 86_400_000 + 4 * 3_600_000), "2d04h");
        assert_eq!(age(-5), "0s");
    }
}
