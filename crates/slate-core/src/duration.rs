//! Human durations and sizes in config ("90s", "2h", "4GiB").

use std::time::Duration;

/// Parse "500ms", "30s", "5m", "2h", "1d", or a combination like "1h30m".
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if t.is_empty() {
        return Err(
            "expected a duration like \"30s\", \"5m\" or \"2h\", found an empty string".into(),
        );
    }
    let mut total = Duration::ZERO;
    let mut rest = t;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!(
                "expected a duration like \"30s\", \"5m\" or \"2h\", found {text:?}"
            ));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("number too large in duration {text:?}"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let too_large = || format!("duration {text:?} is too large");
        let secs = |mult: u64| {
            n.checked_mul(mult)
                .map(Duration::from_secs)
                .ok_or_else(too_large)
        };
        let d = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => secs(60)?,
            "h" => secs(3600)?,
            "d" => secs(86400)?,
            _ => {
                return Err(format!(
                    "unknown unit {unit:?} in duration {text:?}: expected ms, s, m, h or d"
                ))
            }
        };
        total = total.checked_add(d).ok_or_else(too_large)?;
    }
    Ok(total)
}

/// Parse "512MiB", "4GiB", "1G", "1000000" (bytes).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    if digits == 0 {
        return Err(format!(
            "expected a size like \"512MiB\" or \"4GiB\", found {text:?}"
        ));
    }
    let n: u64 = t[..digits]
        .parse()
        .map_err(|_| format!("number too large in size {text:?}"))?;
    let mult: u64 = match t[digits..].trim() {
        "" | "B" => 1,
        "K" | "KB" => 1000,
        "KiB" => 1 << 10,
        "M" | "MB" => 1000 * 1000,
        "MiB" => 1 << 20,
        "G" | "GB" => 1000 * 1000 * 1000,
        "GiB" => 1 << 30,
        "T" | "TB" => 1000u64.pow(4),
        "TiB" => 1 << 40,
        u => {
            return Err(format!(
                "unknown unit {u:?} in size {text:?}: expected B, KiB, MiB, GiB or TiB"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("2 hours").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4GiB").unwrap(), 4 << 30);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("100").unwrap(), 100);
        assert!(parse_size("4 gigs").is_err());
        assert!(parse_size("GiB").is_err());
    }
}
