//! When a policy fires: time points on chosen weekdays (`--at 02:00,14:00 --weekdays mon-fri`),
//! a fixed interval (`--every 4h --start 00:30`), or a 5-field cron expression, in an IANA time
//! zone. Pure: the scheduler asks for the first firing after an instant.
//!
//! Daylight saving time: a local time that does not exist (skipped by a jump forward) fires at
//! the first minute after the jump; one that exists twice (a jump back) fires once, at its
//! first occurrence. An interval is elapsed time, so its local times move with a jump.

use jiff::civil::{Date, DateTime, Time};
use jiff::tz::{AmbiguousOffset, TimeZone};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// How far ahead a schedule is searched: one that does not fire within this (a cron for
/// 30 February) is refused when the policy is created.
const HORIZON_DAYS: i32 = 366 * 5;

/// A policy's schedule, as stored and shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Schedule {
    /// Local times of day (`HH:MM`), on these weekdays (empty: every day).
    At { times: Vec<String>, weekdays: Vec<String> },
    /// Every `every` seconds of elapsed time, from `start` (`HH:MM` local) on the day the
    /// policy was created.
    Every { every: u64, start: String },
    /// `minute hour day-of-month month day-of-week`, as in crontab(5).
    Cron { expr: String },
}

/// A schedule checked and ready to compute firings.
#[derive(Debug, Clone)]
pub struct Compiled {
    tz: TimeZone,
    rule: Rule,
}

#[derive(Debug, Clone)]
enum Rule {
    Civil(CivilRule),
    /// First firing (seconds since the epoch) and the period.
    Every {
        anchor: i64,
        every: i64,
    },
}

/// Days and local times of day, the form both `At` and cron reduce to.
#[derive(Debug, Clone)]
struct CivilRule {
    /// Sorted, distinct `(hour, minute)`.
    times: Vec<(i8, i8)>,
    /// Bit m (1..=12).
    months: u16,
    /// Bit d (1..=31).
    days: u32,
    /// Bit w, 0 = Sunday.
    weekdays: u8,
    /// Cron's rule: when both the day of month and the weekday are restricted, a day
    /// matching either fires.
    days_any: bool,
    weekdays_any: bool,
}

impl CivilRule {
    fn fires_on(&self, d: Date) -> bool {
        if self.months & (1 << d.month()) == 0 {
            return false;
        }
        let day = self.days & (1 << d.day()) != 0;
        let weekday = self.weekdays & (1 << d.weekday().to_sunday_zero_offset()) != 0;
        match (self.days_any, self.weekdays_any) {
            (true, true) => true,
            (true, false) => weekday,
            (false, true) => day,
            (false, false) => day || weekday,
        }
    }
}

/// `HH:MM`, 00:00 to 23:59.
pub fn parse_time(s: &str) -> Result<(i8, i8), String> {
    let bad = || format!("'{s}' is not a time of day; use HH:MM, e.g. 02:00 or 14:30");
    let (h, m) = s.trim().split_once(':').ok_or_else(bad)?;
    let (h, m): (i8, i8) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if !(0..24).contains(&h) || !(0..60).contains(&m) || s.trim().len() > 5 {
        return Err(bad());
    }
    Ok((h, m))
}

const WEEKDAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];
const MONTHS: [&str; 12] = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"];

/// Weekday names and ranges (`mon-fri,sun`) as a bit set, 0 = Sunday.
pub fn parse_weekdays(s: &str) -> Result<u8, String> {
    let mut bits = 0u8;
    for part in s.split(',').map(str::trim) {
        let day = |name: &str| {
            WEEKDAYS.iter().position(|w| name.to_ascii_lowercase().starts_with(w) && name.len() >= 3).ok_or_else(|| {
                format!("'{name}' is not a weekday; use mon, tue, wed, thu, fri, sat, sun and ranges such as mon-fri")
            })
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (day(a)?, day(b)?);
                // A range may wrap (fri-mon).
                let mut d = a;
                loop {
                    bits |= 1 << d;
                    if d == b {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            }
            None => bits |= 1 << day(part)?,
        }
    }
    Ok(bits)
}

/// One cron field as a bit set over `min..=max`. `names` map to `min`, `min + 1`, ...
fn cron_field(field: &str, min: u32, max: u32, names: &[&str], what: &str) -> Result<(u64, bool), String> {
    let value = |s: &str| -> Result<u32, String> {
        let lower = s.to_ascii_lowercase();
        if let Some(i) = names.iter().position(|n| *n == lower) {
            return Ok(min + i as u32);
        }
        let v: u32 = s.parse().map_err(|_| format!("cron {what} field: '{s}' is not a number"))?;
        if v < min || v > max {
            return Err(format!("cron {what} field: {v} is outside {min}-{max}"));
        }
        Ok(v)
    };
    let mut bits = 0u64;
    for part in field.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => {
                let step: u32 = s.parse().map_err(|_| format!("cron {what} field: step '{s}' is not a number"))?;
                if step == 0 {
                    return Err(format!("cron {what} field: a step of 0 never advances"));
                }
                (r, step)
            }
            None => (part, 1),
        };
        let (lo, hi) = match range {
            "*" => (min, max),
            r => match r.split_once('-') {
                Some((a, b)) => (value(a)?, value(b)?),
                // `5/15` means from 5 to the end, every 15.
                None if step > 1 => (value(r)?, max),
                None => {
                    let v = value(r)?;
                    (v, v)
                }
            },
        };
        if lo > hi {
            return Err(format!("cron {what} field: range {lo}-{hi} is backwards"));
        }
        let mut v = lo;
        while v <= hi {
            bits |= 1 << v;
            v += step;
        }
    }
    Ok((bits, field == "*"))
}

impl Schedule {
    /// Checks the schedule in time zone `tz` (an IANA name); `created` anchors an interval.
    pub fn compile(&self, tz: &str, created: u64) -> Result<Compiled, String> {
        let tz = TimeZone::get(tz)
            .map_err(|_| format!("'{tz}' is not a known time zone; use an IANA name such as UTC or Asia/Shanghai"))?;
        let rule = match self {
            Schedule::At { times, weekdays } => {
                if times.is_empty() {
                    return Err("--at needs at least one time of day (HH:MM)".into());
                }
                let mut t = times.iter().map(|s| parse_time(s)).collect::<Result<Vec<_>, _>>()?;
                t.sort_unstable();
                t.dedup();
                let weekdays = if weekdays.is_empty() { 0x7f } else { parse_weekdays(&weekdays.join(","))? };
                Rule::Civil(CivilRule {
                    times: t,
                    months: 0x1ffe,
                    days: u32::MAX,
                    weekdays,
                    days_any: true,
                    weekdays_any: weekdays == 0x7f,
                })
            }
            Schedule::Every { every, start } => {
                if *every == 0 {
                    return Err("--every must be at least 1s".into());
                }
                let (h, m) = parse_time(start)?;
                let day = tz.to_datetime(Timestamp::from_second(created as i64).map_err(|e| e.to_string())?).date();
                let anchor = resolve(&tz, day.to_datetime(Time::constant(h, m, 0, 0)))?;
                Rule::Every { anchor, every: i64::try_from(*every).map_err(|_| "--every is too long".to_string())? }
            }
            Schedule::Cron { expr } => {
                let f: Vec<&str> = expr.split_whitespace().collect();
                let [minute, hour, dom, month, dow] = f[..] else {
                    return Err(format!(
                        "cron expression '{expr}' has {} fields; it needs 5: minute hour day-of-month month day-of-week",
                        f.len()
                    ));
                };
                let (minutes, _) = cron_field(minute, 0, 59, &[], "minute")?;
                let (hours, _) = cron_field(hour, 0, 23, &[], "hour")?;
                let (days, days_any) = cron_field(dom, 1, 31, &[], "day-of-month")?;
                let (months, _) = cron_field(month, 1, 12, &MONTHS, "month")?;
                let (dows, weekdays_any) = cron_field(dow, 0, 7, &WEEKDAYS, "day-of-week")?;
                // 7 is Sunday too.
                let weekdays = ((dows | (dows >> 7)) & 0x7f) as u8;
                let times = (0..24)
                    .filter(|h| hours & (1 << h) != 0)
                    .flat_map(|h| (0..60).filter(move |m| minutes & (1 << m) != 0).map(move |m| (h as i8, m as i8)))
                    .collect();
                Rule::Civil(CivilRule {
                    times,
                    months: months as u16,
                    days: days as u32,
                    weekdays,
                    days_any,
                    weekdays_any,
                })
            }
        };
        let compiled = Compiled { tz, rule };
        if compiled.next_after(created as i64).is_none() {
            return Err("this schedule never fires (within five years); check the day and month".into());
        }
        Ok(compiled)
    }

    /// One line for `policy list`.
    pub fn describe(&self, tz: &str) -> String {
        match self {
            Schedule::At { times, weekdays } if weekdays.is_empty() => format!("at {} {tz}", times.join(",")),
            Schedule::At { times, weekdays } => format!("at {} on {} {tz}", times.join(","), weekdays.join(",")),
            Schedule::Every { every, start } => {
                format!("every {} from {start} {tz}", crate::units::duration_text(*every))
            }
            Schedule::Cron { expr } => format!("cron '{expr}' {tz}"),
        }
    }
}

/// The instant a local time stands for: its first occurrence if it occurs twice, the end of
/// the jump if it falls in one.
fn resolve(tz: &TimeZone, dt: DateTime) -> Result<i64, String> {
    let ambiguous = tz.to_ambiguous_timestamp(dt);
    let ts = match ambiguous.offset() {
        AmbiguousOffset::Unambiguous { .. } | AmbiguousOffset::Fold { .. } => ambiguous.earlier(),
        AmbiguousOffset::Gap { after, .. } => {
            // The jump is the first transition after this time read with the later offset.
            let probe = after.to_timestamp(dt).map_err(|e| e.to_string())?;
            return tz
                .following(probe)
                .next()
                .map(|t| t.timestamp().as_second())
                .ok_or_else(|| format!("no transition after {dt} in {}", tz.iana_name().unwrap_or("?")));
        }
    };
    ts.map(|t| t.as_second()).map_err(|e| e.to_string())
}

impl Compiled {
    /// The first firing strictly after `after` (seconds since the epoch).
    pub fn next_after(&self, after: i64) -> Option<i64> {
        match &self.rule {
            Rule::Every { anchor, every } => {
                let k = if after < *anchor { 0 } else { (after - anchor) / every + 1 };
                Some(anchor + k * every)
            }
            Rule::Civil(rule) => {
                let local = self.tz.to_datetime(Timestamp::from_second(after).ok()?);
                // From the day before: a time of that day may fall after `after` across a jump.
                let mut day = local.date().yesterday().ok()?;
                for _ in 0..HORIZON_DAYS {
                    if rule.fires_on(day) {
                        for &(h, m) in &rule.times {
                            if let Ok(t) = resolve(&self.tz, day.to_datetime(Time::constant(h, m, 0, 0))) {
                                if t > after {
                                    return Some(t);
                                }
                            }
                        }
                    }
                    day = day.tomorrow().ok()?;
                }
                None
            }
        }
    }

    /// The local civil time of an instant, for names and retention periods.
    pub fn local(&self, t: i64) -> DateTime {
        Timestamp::from_second(t).map(|ts| self.tz.to_datetime(ts)).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> i64 {
        s.parse::<Timestamp>().unwrap().as_second()
    }

    fn at(times: &[&str], weekdays: &[&str]) -> Schedule {
        Schedule::At {
            times: times.iter().map(|s| s.to_string()).collect(),
            weekdays: weekdays.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// The next `n` firings after `from`, as RFC 3339 UTC.
    fn firings(s: &Schedule, tz: &str, from: &str, n: usize) -> Vec<String> {
        let c = s.compile(tz, ts(from) as u64).unwrap();
        let mut t = ts(from);
        (0..n)
            .map(|_| {
                t = c.next_after(t).unwrap();
                Timestamp::from_second(t).unwrap().to_string()
            })
            .collect()
    }

    #[test]
    fn time_points_fire_on_the_chosen_weekdays_in_the_policy_time_zone() {
        // 2026-12-04 is a Friday. Shanghai is UTC+8 all year.
        let s = at(&["02:00", "14:00"], &["mon-fri"]);
        assert_eq!(
            firings(&s, "Asia/Shanghai", "2026-12-04T05:00:00Z", 4),
            ["2026-12-04T06:00:00Z", "2026-12-06T18:00:00Z", "2026-12-07T06:00:00Z", "2026-12-07T18:00:00Z"]
        );
        assert_eq!(firings(&at(&["00:00"], &[]), "UTC", "2026-12-31T23:59:59Z", 1), ["2027-01-01T00:00:00Z"]);
        // A weekday range may wrap.
        assert_eq!(parse_weekdays("fri-mon").unwrap(), 0b0110_0011);
    }

    #[test]
    fn an_interval_counts_elapsed_time_from_its_start() {
        let s = Schedule::Every { every: 4 * 3600, start: "00:30".into() };
        assert_eq!(
            firings(&s, "UTC", "2026-12-06T09:00:00Z", 3),
            ["2026-12-06T12:30:00Z", "2026-12-06T16:30:00Z", "2026-12-06T20:30:00Z"]
        );
        let s = Schedule::Every { every: 1, start: "00:00".into() };
        assert_eq!(firings(&s, "UTC", "2026-12-06T09:00:00Z", 2), ["2026-12-06T09:00:01Z", "2026-12-06T09:00:02Z"]);
    }

    #[test]
    fn cron_expressions_follow_crontab() {
        let c = |e: &str| Schedule::Cron { expr: e.into() };
        assert_eq!(
            firings(&c("0 */6 * * *"), "UTC", "2026-12-06T05:00:00Z", 3),
            ["2026-12-06T06:00:00Z", "2026-12-06T12:00:00Z", "2026-12-06T18:00:00Z"]
        );
        // Day of month or weekday, when both are given: the 1st, and every Sunday (Dec 6, 13).
        assert_eq!(
            firings(&c("30 2 1 * sun"), "UTC", "2026-12-05T00:00:00Z", 3),
            ["2026-12-06T02:30:00Z", "2026-12-13T02:30:00Z", "2026-12-20T02:30:00Z"]
        );
        assert_eq!(firings(&c("0 0 29 feb *"), "UTC", "2026-12-05T00:00:00Z", 1), ["2028-02-29T00:00:00Z"]);
        // 7 is Sunday too; 5/20 is 5, 25, 45.
        assert_eq!(
            firings(&c("5/20 9 * * 7"), "UTC", "2026-12-06T00:00:00Z", 4),
            ["2026-12-06T09:05:00Z", "2026-12-06T09:25:00Z", "2026-12-06T09:45:00Z", "2026-12-13T09:05:00Z"]
        );
        for (bad, says) in [
            ("* * * *", "needs 5"),
            ("60 * * * *", "outside 0-59"),
            ("*/0 * * * *", "step of 0"),
            ("0 0 31 feb *", "never fires"),
            ("x * * * *", "not a number"),
        ] {
            let e = c(bad).compile("UTC", 0).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn a_skipped_local_time_fires_after_the_jump_and_a_repeated_one_once() {
        // New York 2026-03-08: 02:00 EST jumps to 03:00 EDT (07:00Z). 02:30 does not exist.
        let s = at(&["02:30"], &[]);
        assert_eq!(
            firings(&s, "America/New_York", "2026-03-07T12:00:00Z", 3),
            ["2026-03-08T07:00:00Z", "2026-03-09T06:30:00Z", "2026-03-10T06:30:00Z"]
        );
        // 2026-11-01: 02:00 EDT goes back to 01:00 EST; 01:30 happens at 05:30Z and 06:30Z.
        let s = at(&["01:30"], &[]);
        assert_eq!(
            firings(&s, "America/New_York", "2026-10-31T12:00:00Z", 2),
            ["2026-11-01T05:30:00Z", "2026-11-02T06:30:00Z"]
        );
        // Asked from inside the repeated hour, after the first 01:30: not again.
        let c = s.compile("America/New_York", 0).unwrap();
        assert_eq!(c.next_after(ts("2026-11-01T06:10:00Z")), Some(ts("2026-11-02T06:30:00Z")));
        // Every minute of cron across the jump forward: 01:59 EST then 03:00 EDT.
        let s = Schedule::Cron { expr: "* * * * *".into() };
        assert_eq!(
            firings(&s, "America/New_York", "2026-03-08T06:58:30Z", 2),
            ["2026-03-08T06:59:00Z", "2026-03-08T07:00:00Z"]
        );
    }

    #[test]
    fn bad_time_zones_and_times_are_refused_with_what_to_use() {
        assert!(at(&["02:00"], &[]).compile("Mars/Olympus", 0).unwrap_err().contains("IANA"));
        assert!(at(&["24:00"], &[]).compile("UTC", 0).unwrap_err().contains("HH:MM"));
        assert!(at(&["02:00"], &["funday"]).compile("UTC", 0).unwrap_err().contains("mon-fri"));
    }
}
