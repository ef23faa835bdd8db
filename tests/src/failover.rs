//! Measuring failovers: when an address appeared on an interface, seen by
//! `ip -ts monitor address` in the gateway's namespace (the same yardstick
//! for every HA implementation), the wall clock in Unix milliseconds, and
//! min/median/max over runs.
//!
//! The monitor's output is parsed after the run by pure functions, so the
//! timestamp arithmetic is tested without privileges.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};

use crate::netns::Netns;
use crate::process::Process;

/// Unix time in ms, with sub-millisecond precision.
pub fn unix_ms_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// One address event as `ip -ts monitor address` prints it.
#[derive(Debug, Clone, PartialEq)]
pub struct AddrEvent {
    /// When `ip` received it, Unix ms.
    pub at_unix_ms: f64,
    /// Added (`false`) or deleted (`true`).
    pub deleted: bool,
    /// The interface.
    pub ifname: String,
    /// The address with its prefix length, e.g. `198.51.100.100/32`.
    pub cidr: String,
}

/// Parses one first line of an event: `[2026-11-24T02:46:30.788311] 3: d0
/// inet 198.51.100.100/32 scope global d0` (with `Deleted ` before the
/// index for a removal). The timestamp must be UTC (run `ip` with
/// `TZ=UTC`). Continuation lines (`valid_lft ...`) and other families give
/// `None`.
pub fn parse_addr_event(line: &str) -> Option<AddrEvent> {
    let rest = line.strip_prefix('[')?;
    let (stamp, rest) = rest.split_once(']')?;
    let at_unix_ms = parse_utc_ms(stamp)?;
    let mut words = rest.split_whitespace().peekable();
    let deleted = words.next_if_eq(&"Deleted").is_some();
    let index = words.next()?;
    if !index.ends_with(':') || index.len() < 2 {
        return None;
    }
    let ifname = words.next()?.to_owned();
    if words.next()? != "inet" {
        return None;
    }
    let cidr = words.next()?.to_owned();
    Some(AddrEvent {
        at_unix_ms,
        deleted,
        ifname,
        cidr,
    })
}

/// `YYYY-MM-DDTHH:MM:SS[.ffffff]` in UTC as Unix ms.
pub fn parse_utc_ms(stamp: &str) -> Option<f64> {
    let (date, time) = stamp.split_once('T')?;
    let mut date_parts = date.split('-');
    let year: i64 = date_parts.next()?.parse().ok()?;
    let month: u32 = date_parts.next()?.parse().ok()?;
    let day: u32 = date_parts.next()?.parse().ok()?;
    if date_parts.next().is_some() || !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    let (hms, fraction) = time.split_once('.').unwrap_or((time, ""));
    let mut time_parts = hms.split(':');
    let hour: u32 = time_parts.next()?.parse().ok()?;
    let minute: u32 = time_parts.next()?.parse().ok()?;
    let second: u32 = time_parts.next()?.parse().ok()?;
    if time_parts.next().is_some() || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let fraction_secs = if fraction.is_empty() {
        0.0
    } else if fraction.bytes().all(|b| b.is_ascii_digit()) {
        format!("0.{fraction}").parse::<f64>().ok()?
    } else {
        return None;
    };
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + i64::from(hour * 3600 + minute * 60 + second);
    Some((secs as f64 + fraction_secs) * 1000.0)
}

/// Days from 1970-01-01 to the given proleptic Gregorian date (Howard
/// Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month = i64::from(month);
    let day_of_year =
        (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The first time `addr`/32 was added to `ifname` at or after `after_unix_ms`
/// among the events of `log` (the monitor's output).
pub fn first_add_after(log: &str, ifname: &str, addr: Ipv4Addr, after_unix_ms: f64) -> Option<f64> {
    let cidr = format!("{addr}/32");
    log.lines()
        .filter_map(parse_addr_event)
        .find(|e| {
            !e.deleted && e.ifname == ifname && e.cidr == cidr && e.at_unix_ms >= after_unix_ms
        })
        .map(|e| e.at_unix_ms)
}

/// `ip -ts monitor address` running in a namespace, its output in a file.
#[derive(Debug)]
pub struct AddrMonitor {
    process: Process,
}

impl AddrMonitor {
    /// Starts the monitor in `netns`, logging to `log` (UTC timestamps).
    pub fn start(netns: &Netns, log: &Path) -> Result<Self> {
        let mut command = Command::new("ip");
        command
            .args(["-n", netns.name(), "-ts", "monitor", "address"])
            .env("TZ", "UTC");
        let process = Process::spawn("ip monitor address", netns, command, log)?;
        Ok(Self { process })
    }

    /// When `addr`/32 was first added to `ifname` at or after
    /// `after_unix_ms`, if it was.
    pub fn first_add_after(
        &mut self,
        ifname: &str,
        addr: Ipv4Addr,
        after_unix_ms: f64,
    ) -> Result<Option<f64>> {
        self.process.ensure_running()?;
        Ok(first_add_after(
            &self.process.log(),
            ifname,
            addr,
            after_unix_ms,
        ))
    }
}

/// The smallest, middle and largest of a set of samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    pub min: f64,
    /// The middle sample, or the mean of the two middle ones.
    pub median: f64,
    pub max: f64,
    /// How many samples.
    pub count: usize,
}

impl Spread {
    /// The spread of `samples`; an error when there are none or one is
    /// not a number.
    pub fn of(samples: &[f64]) -> Result<Self> {
        if samples.is_empty() {
            bail!("no samples");
        }
        if samples.iter().any(|s| s.is_nan()) {
            bail!("a sample is not a number: {samples:?}");
        }
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            f64::midpoint(sorted[n / 2 - 1], sorted[n / 2])
        };
        Ok(Self {
            min: sorted[0],
            median,
            max: sorted[n - 1],
            count: n,
        })
    }

    /// `"min / median / max"` with `decimals` decimals.
    pub fn show(&self, decimals: usize) -> String {
        format!(
            "{:.*} / {:.*} / {:.*}",
            decimals, self.min, decimals, self.median, decimals, self.max
        )
    }
}

/// A `date +%s%N` time (ns since the epoch) as Unix ms.
pub fn parse_epoch_ns_ms(word: &str) -> Result<f64> {
    let ns: u128 = word
        .parse()
        .with_context(|| format!("{word:?} is not a time in ns"))?;
    Ok(ns as f64 / 1e6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_timestamps_become_unix_ms() {
        // date -u -d 2026-11-24T02:46:30Z +%s -> 1795488390
        let ms = parse_utc_ms("2026-11-24T02:46:30.788311").unwrap();
        assert!((ms - 1_795_488_390_788.311).abs() < 1e-3, "{ms}");
        assert_eq!(parse_utc_ms("1970-01-01T00:00:00"), Some(0.0));
        // A leap day and the day after.
        assert_eq!(
            parse_utc_ms("2024-03-01T00:00:00").unwrap()
                - parse_utc_ms("2024-02-29T00:00:00").unwrap(),
            86_400_000.0
        );
        assert_eq!(parse_utc_ms("2024-13-01T00:00:00"), None);
        assert_eq!(parse_utc_ms("2024-01-01 00:00:00"), None);
        assert_eq!(parse_utc_ms("2024-01-01T00:00:00.1x"), None);
    }

    #[test]
    fn address_events_are_parsed_and_filtered() {
        let log = "\
[2026-11-24T02:46:30.700000] 1: lo    inet 198.51.100.100/32 scope global lo
       valid_lft forever preferred_lft forever
[2026-11-24T02:46:30.788311] 3: tg1g1    inet 198.51.100.100/32 scope global tg1g1
       valid_lft forever preferred_lft forever
[2026-11-24T02:46:31.000000] Deleted 3: tg1g1    inet 198.51.100.100/32 scope global tg1g1
[2026-11-24T02:46:32.000000] 3: tg1g1    inet 198.51.100.100/32 scope global tg1g1
[2026-11-24T02:46:33.000000] 3: tg1g1    inet6 fe80::1/64 scope link
";
        let deleted = parse_addr_event(log.lines().nth(4).unwrap()).unwrap();
        assert!(deleted.deleted);
        assert_eq!(deleted.ifname, "tg1g1");
        assert_eq!(parse_addr_event("       valid_lft forever"), None);
        assert_eq!(parse_addr_event(log.lines().last().unwrap()), None);

        let vip = Ipv4Addr::new(198, 51, 100, 100);
        let base = parse_utc_ms("2026-11-24T02:46:30").unwrap();
        let first = first_add_after(log, "tg1g1", vip, base).unwrap();
        assert!((first - base - 788.311).abs() < 1e-3, "{first}");
        // Only additions after the event count; lo and deletions never.
        let later = first_add_after(log, "tg1g1", vip, base + 800.0).unwrap();
        assert!((later - base - 2000.0).abs() < 1e-3);
        assert_eq!(first_add_after(log, "tg1g1", vip, base + 2500.0), None);
        assert_eq!(first_add_after(log, "tg1g2", vip, base), None);
    }

    #[test]
    fn spread_is_min_median_max() {
        let odd = Spread::of(&[5.0, 1.0, 3.0]).unwrap();
        assert_eq!(
            (odd.min, odd.median, odd.max, odd.count),
            (1.0, 3.0, 5.0, 3)
        );
        let even = Spread::of(&[4.0, 1.0, 2.0, 10.0]).unwrap();
        assert_eq!((even.min, even.median, even.max), (1.0, 3.0, 10.0));
        assert_eq!(Spread::of(&[7.0]).unwrap().median, 7.0);
        assert!(Spread::of(&[]).is_err());
        assert!(Spread::of(&[1.0, f64::NAN]).is_err());
        assert_eq!(even.show(1), "1.0 / 3.0 / 10.0");
    }

    #[test]
    fn epoch_ns_become_ms() {
        let ms = parse_epoch_ns_ms("1795401990788311000").unwrap();
        assert!((ms - 1_795_401_990_788.311).abs() < 1e-3, "{ms}");
        assert!(parse_epoch_ns_ms("12:00").is_err());
    }
}
