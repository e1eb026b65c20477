//! Which of a policy's snapshots to keep. The `keep-last`/`-hourly`/`-daily`/`-weekly`/
//! `-monthly`/`-yearly` options mean what they mean in Proxmox Backup Server's prune: taken in
//! that order, each keeps the newest snapshot of each of its N most recent periods (hours, days,
//! ISO weeks, months, years in the policy's time zone) that no earlier option already covers, so
//! each option reaches further back than the ones before it. `keep-within` keeps everything
//! younger than a duration before the newest snapshot; `retention-days` everything younger than
//! N days before now; `min-count` keeps the newest of the others until that many remain. Held
//! snapshots are always kept and count for nothing else. No option at all keeps everything.

use std::collections::HashSet;

use jiff::civil::DateTime;
use serde::{Deserialize, Serialize};

/// A policy's retention options (all optional).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_last: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_hourly: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_daily: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_weekly: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_monthly: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_yearly: Option<u32>,
    /// Seconds before the newest snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_within: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_days: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_count: Option<u32>,
}

/// A snapshot retention looks at.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub id: String,
    /// Seconds since the epoch.
    pub created: i64,
    pub held: bool,
}

/// Why a snapshot stays, or that it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    Held,
    Within,
    RetentionDays,
    Last,
    Hourly,
    Daily,
    Weekly,
    Monthly,
    Yearly,
    MinCount,
    /// No retention option is set.
    All,
    Remove,
}

impl Verdict {
    pub fn keeps(self) -> bool {
        self != Verdict::Remove
    }
}

impl Retention {
    pub fn is_empty(&self) -> bool {
        *self == Retention::default()
    }

    /// Each candidate's verdict, newest first. `local` gives an instant's civil time in the
    /// policy's zone (the periods); `now` is the tick's time (for `retention-days`).
    pub fn select(
        &self,
        candidates: &[Candidate],
        now: i64,
        local: impl Fn(i64) -> DateTime,
    ) -> Vec<(Candidate, Verdict)> {
        let mut list: Vec<Candidate> = candidates.to_vec();
        list.sort_by(|a, b| b.created.cmp(&a.created).then_with(|| b.id.cmp(&a.id)));
        let mut marks: Vec<Option<Verdict>> = vec![None; list.len()];
        for (m, c) in marks.iter_mut().zip(&list) {
            if c.held {
                *m = Some(Verdict::Held);
            }
        }
        if (Retention { min_count: None, ..self.clone() }).is_empty() {
            // Nothing says what may go.
            return list.into_iter().zip(marks).map(|(c, m)| (c, m.unwrap_or(Verdict::All))).collect();
        }
        let newest = list.iter().map(|c| c.created).max().unwrap_or(now);
        for (m, c) in marks.iter_mut().zip(&list) {
            if m.is_some() {
                continue;
            }
            if self.keep_within.is_some_and(|w| c.created >= newest.saturating_sub(w as i64)) {
                *m = Some(Verdict::Within);
            } else if self.retention_days.is_some_and(|d| c.created >= now.saturating_sub(d as i64 * 86_400)) {
                *m = Some(Verdict::RetentionDays);
            }
        }
        type Period = fn(DateTime) -> String;
        let periods: [(Option<u32>, Verdict, Period); 6] = [
            (self.keep_last, Verdict::Last, |_| String::new()),
            (self.keep_hourly, Verdict::Hourly, |t| format!("{}/{}/{}/{}", t.year(), t.month(), t.day(), t.hour())),
            (self.keep_daily, Verdict::Daily, |t| format!("{}/{}/{}", t.year(), t.month(), t.day())),
            (self.keep_weekly, Verdict::Weekly, |t| {
                let w = t.date().iso_week_date();
                format!("{}/{}", w.year(), w.week())
            }),
            (self.keep_monthly, Verdict::Monthly, |t| format!("{}/{}", t.year(), t.month())),
            (self.keep_yearly, Verdict::Yearly, |t| t.year().to_string()),
        ];
        for (keep, verdict, period) in periods {
            let Some(keep) = keep else { continue };
            // keep-last: every snapshot is a period of its own.
            let key = |i: usize| if verdict == Verdict::Last { i.to_string() } else { period(local(list[i].created)) };
            let covered: HashSet<String> = (0..list.len())
                .filter(|&i| marks[i].is_some_and(|m| m.keeps() && m != Verdict::Held))
                .map(key)
                .collect();
            let mut kept = HashSet::new();
            for (i, mark) in marks.iter_mut().enumerate() {
                if mark.is_some() {
                    continue;
                }
                let k = key(i);
                if covered.contains(&k) {
                    continue;
                }
                if kept.contains(&k) {
                    // An older snapshot of a period this option keeps the newest of.
                    *mark = Some(Verdict::Remove);
                } else if kept.len() < keep as usize {
                    kept.insert(k);
                    *mark = Some(verdict);
                } else {
                    break;
                }
            }
        }
        let mut verdicts: Vec<Verdict> = marks.into_iter().map(|m| m.unwrap_or(Verdict::Remove)).collect();
        if let Some(min) = self.min_count {
            let mut remaining = verdicts.iter().filter(|v| v.keeps()).count();
            for v in verdicts.iter_mut() {
                if remaining >= min as usize {
                    break;
                }
                if *v == Verdict::Remove {
                    *v = Verdict::MinCount;
                    remaining += 1;
                }
            }
        }
        list.into_iter().zip(verdicts).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(t: i64) -> DateTime {
        jiff::tz::TimeZone::UTC.to_datetime(jiff::Timestamp::from_second(t).unwrap())
    }

    fn at(s: &str) -> i64 {
        format!("{s}Z").parse::<jiff::Timestamp>().unwrap().as_second()
    }

    /// Hourly snapshots from `from`, `n` of them; the verdicts as (time, verdict), newest first.
    fn run(r: &Retention, from: &str, every: i64, n: i64) -> Vec<(String, Verdict)> {
        let start = at(from);
        let cands: Vec<Candidate> =
            (0..n).map(|i| Candidate { id: format!("s{i}"), created: start + i * every, held: false }).collect();
        let now = start + (n - 1) * every;
        r.select(&cands, now, utc).into_iter().map(|(c, v)| (utc(c.created).to_string(), v)).collect()
    }

    fn kept(v: &[(String, Verdict)]) -> Vec<(&str, Verdict)> {
        v.iter().filter(|(_, v)| v.keeps()).map(|(t, v)| (t.as_str(), *v)).collect()
    }

    #[test]
    fn keep_last_keeps_the_newest_n() {
        let r = Retention { keep_last: Some(3), ..Default::default() };
        let v = run(&r, "2026-12-01T00:00:00", 3600, 10);
        assert_eq!(
            kept(&v),
            [
                ("2026-12-01T09:00:00", Verdict::Last),
                ("2026-12-01T08:00:00", Verdict::Last),
                ("2026-12-01T07:00:00", Verdict::Last)
            ]
        );
        assert_eq!(v.len(), 10);
    }

    #[test]
    fn each_option_reaches_back_past_the_periods_already_kept() {
        // Every 6 hours for 20 days (Dec 1 Tue .. Dec 20 Sun): keep-last 2, keep-daily 3,
        // keep-weekly 2. By hand: last keeps Dec 20 18:00 and 12:00 (day Dec 20 covered);
        // daily keeps the newest of Dec 19, 18, 17 (18:00); weekly: ISO weeks of Dec 20 (w51:
        // Dec 14-20) and of Dec 17-19 are covered, so it keeps the newest of w50 (Dec 13 18:00)
        // and of w49 (Dec 6 18:00).
        let r = Retention { keep_last: Some(2), keep_daily: Some(3), keep_weekly: Some(2), ..Default::default() };
        let v = run(&r, "2026-12-01T00:00:00", 6 * 3600, 80);
        assert_eq!(
            kept(&v),
            [
                ("2026-12-20T18:00:00", Verdict::Last),
                ("2026-12-20T12:00:00", Verdict::Last),
                ("2026-12-19T18:00:00", Verdict::Daily),
                ("2026-12-18T18:00:00", Verdict::Daily),
                ("2026-12-17T18:00:00", Verdict::Daily),
                ("2026-12-13T18:00:00", Verdict::Weekly),
                ("2026-12-06T18:00:00", Verdict::Weekly),
            ]
        );
    }

    #[test]
    fn monthly_and_yearly_keep_the_newest_of_each_period() {
        // Daily at noon from 2025-11-01 for 70 days: to 2026-01-09.
        let r = Retention { keep_monthly: Some(2), keep_yearly: Some(5), ..Default::default() };
        let v = run(&r, "2025-11-01T12:00:00", 86_400, 70);
        assert_eq!(
            kept(&v),
            [
                ("2026-01-09T12:00:00", Verdict::Monthly),
                ("2025-12-31T12:00:00", Verdict::Monthly),
                // 2026 and 2025 are covered by the monthly ones; no older year exists.
            ]
        );
    }

    #[test]
    fn within_is_relative_to_the_newest_snapshot_and_days_to_now() {
        let cands: Vec<Candidate> = [0i64, 100, 200, 300]
            .iter()
            .map(|t| Candidate { id: t.to_string(), created: 1_000_000 + t, held: false })
            .collect();
        let r = Retention { keep_within: Some(150), ..Default::default() };
        // Long after the newest: still relative to it.
        let v = r.select(&cands, 9_000_000, utc);
        let kept: Vec<&str> = v.iter().filter(|(_, v)| v.keeps()).map(|(c, _)| c.id.as_str()).collect();
        assert_eq!(kept, ["300", "200"]);
        let r = Retention { retention_days: Some(1), ..Default::default() };
        let v = r.select(&cands, 1_000_000 + 86_400 + 150, utc);
        let kept: Vec<&str> = v.iter().filter(|(_, v)| v.keeps()).map(|(c, _)| c.id.as_str()).collect();
        assert_eq!(kept, ["300", "200"]);
    }

    #[test]
    fn min_count_and_holds_are_floors_and_no_option_keeps_all() {
        let mut cands: Vec<Candidate> =
            (0..6).map(|i| Candidate { id: format!("s{i}"), created: 1000 + i, held: false }).collect();
        cands[0].held = true;
        let r = Retention { keep_last: Some(1), min_count: Some(3), ..Default::default() };
        let v = r.select(&cands, 2000, utc);
        let verdicts: Vec<(&str, Verdict)> = v.iter().map(|(c, v)| (c.id.as_str(), *v)).collect();
        assert_eq!(
            verdicts,
            [
                ("s5", Verdict::Last),
                ("s4", Verdict::MinCount),
                ("s3", Verdict::Remove),
                ("s2", Verdict::Remove),
                ("s1", Verdict::Remove),
                ("s0", Verdict::Held),
            ]
        );
        let all = Retention::default().select(&cands, 2000, utc);
        assert!(all.iter().all(|(_, v)| v.keeps()));
        let only_floor = Retention { min_count: Some(1), ..Default::default() }.select(&cands, 2000, utc);
        assert!(only_floor.iter().all(|(_, v)| v.keeps()));
    }
}
