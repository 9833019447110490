//! A Shared rate across nodes: each node holds its part of the rate in a node-local shared
//! class; the agents report their use, the controller splits the rate by it. Both halves are
//! here, pure and tested in milliseconds: [`split`] (the controller's) and [`Reporter`] (an
//! agent's decision of when to report).
//!
//! The split is max-min fair on demand: a node that used less than its part (not saturated)
//! wants what it used plus [`HEADROOM`]; a saturated node, or one that has not reported yet,
//! wants all it can get. Those wanting less get it; the rest is split evenly among the others.
//! Every node keeps at least [`FLOOR`] of the rate, so an idle node whose pods start sending
//! is not at zero while its report is on its way.
use std::time::{Duration, Instant};

use crate::policy::RuleDemand;

/// The least part of a rate any node keeps: 1%.
pub const FLOOR: f64 = 0.01;
/// What a node that did not fill its part is given beyond its use: 20%.
pub const HEADROOM: f64 = 1.2;
/// A node is saturated when it used this much of its part.
pub const SATURATED: f64 = 0.85;
/// An agent reports a policy at most this often (the bound on API writes per node per
/// policy).
pub const REPORT_EVERY: Duration = Duration::from_secs(10);
/// Seconds of samples before a first report, and after its part changed: a node that just took
/// part is counted as wanting all it can get (an even part) until its flows have ramped up,
/// and flows given a larger part take a moment to fill it.
const WARM_UP: u32 = 3;
/// A change of use worth a report: a tenth of the rate.
const WORTH_REPORTING: f64 = 0.1;
/// The least rate a part may be (the datapath's minimum).
const MIN_BPS: u64 = 1_000;

/// The part of a node that has none yet: [`FLOOR`] of the rate.
pub fn least_part(rate: u64) -> u64 {
    ((rate as f64 * FLOOR) as u64).clamp(MIN_BPS.min(rate), rate)
}

/// Splits `rate` bits/s among nodes by their demand (none: not reported yet); each node's
/// part, in order, summing to `rate` (to rounding).
pub fn split(rate: u64, demands: &[Option<RuleDemand>]) -> Vec<u64> {
    let n = demands.len();
    if n == 0 {
        return Vec::new();
    }
    let rate_f = rate as f64;
    let floor = (rate_f * FLOOR).max(MIN_BPS as f64).min(rate_f / n as f64);
    // What each wants; None: all it can get.
    let wants: Vec<Option<f64>> = demands
        .iter()
        .map(|d| match d {
            Some(d) if !d.saturated => Some((d.bps as f64 * HEADROOM).max(floor)),
            _ => None,
        })
        .collect();
    let mut parts = vec![0.0; n];
    let mut open: Vec<usize> = (0..n).collect();
    let mut left = rate_f;
    // Water-filling: whoever wants less than an even part of what is left gets it.
    loop {
        let even = left / open.len() as f64;
        let (small, rest): (Vec<usize>, Vec<usize>) =
            open.iter().partition(|&&i| wants[i].is_some_and(|w| w <= even));
        if small.is_empty() {
            for &i in &open {
                parts[i] = even;
            }
            break;
        }
        for &i in &small {
            let w = wants[i].unwrap_or(even);
            parts[i] = w;
            left -= w;
        }
        if rest.is_empty() {
            // Everyone has what they want: the remainder goes evenly to all, so nothing of
            // the rate is left unused by the nodes that turn busy first.
            let extra = left / n as f64;
            for p in &mut parts {
                *p += extra;
            }
            break;
        }
        open = rest;
    }
    // At least the datapath's least rate, unless the rate is too small for every node to
    // have it (then the parts may sum past it by at most that least rate each).
    parts.iter().map(|p| (p.round() as u64).max(MIN_BPS)).collect()
}

/// When an agent reports its use of one policy's Shared rules.
#[derive(Debug, Default)]
pub struct Reporter {
    /// Averaged use per rule, bits/s.
    smoothed: Vec<f64>,
    /// Samples since the first one, or since the parts last changed.
    samples: u32,
    parts: Vec<u64>,
    last: Option<(Instant, Vec<RuleDemand>)>,
}

impl Reporter {
    /// Takes this second's measurements (bits/s per rule, and each rule's part and rate);
    /// returns the demand to report now, if one is due.
    pub fn sample(
        &mut self,
        now: Instant,
        used: &[u64],
        parts: &[u64],
        rates: &[u64],
    ) -> Option<Vec<RuleDemand>> {
        if self.smoothed.len() != used.len() {
            self.smoothed = used.iter().map(|u| *u as f64).collect();
        }
        // The datapath measures over 50 ms epochs: average them (half-life of a second).
        for (s, u) in self.smoothed.iter_mut().zip(used) {
            *s = 0.5 * *s + 0.5 * *u as f64;
        }
        let demand: Vec<RuleDemand> = self
            .smoothed
            .iter()
            .zip(parts)
            .map(|(u, part)| RuleDemand {
                bps: u.round() as u64,
                saturated: *u >= SATURATED * *part as f64,
            })
            .collect();
        if self.parts != parts {
            self.parts = parts.to_vec();
            self.samples = 0;
        }
        self.samples = self.samples.saturating_add(1);
        let due = match &self.last {
            _ if self.samples < WARM_UP => false,
            None => true,
            Some((at, _)) if now.duration_since(*at) < REPORT_EVERY => false,
            Some((_, sent)) => {
                sent.len() != demand.len()
                    || sent.iter().zip(&demand).zip(rates).any(|((s, d), rate)| {
                        s.saturated != d.saturated
                            || (s.bps as f64 - d.bps as f64).abs() > WORTH_REPORTING * *rate as f64
                    })
            }
        };
        if !due {
            return None;
        }
        self.last = Some((now, demand.clone()));
        Some(demand)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u64 = 1_000_000;

    fn busy() -> Option<RuleDemand> {
        Some(RuleDemand {
            bps: 15 * M,
            saturated: true,
        })
    }

    fn using(bps: u64) -> Option<RuleDemand> {
        Some(RuleDemand {
            bps,
            saturated: false,
        })
    }

    #[test]
    fn unknown_or_busy_nodes_split_evenly() {
        assert_eq!(split(30 * M, &[None, None]), [15 * M, 15 * M]);
        assert_eq!(split(30 * M, &[busy(), busy(), None]), [10 * M, 10 * M, 10 * M]);
        assert!(split(30 * M, &[]).is_empty());
    }

    #[test]
    fn an_idle_nodes_part_goes_to_the_busy_ones_but_its_floor() {
        let parts = split(30 * M, &[busy(), using(0)]);
        assert_eq!(parts, [29_700_000, 300_000]);
        // A light user keeps what it uses and some headroom; the busy one takes the rest.
        let parts = split(30 * M, &[busy(), using(5 * M), busy()]);
        assert_eq!(parts, [12 * M, 6 * M, 12 * M]);
    }

    #[test]
    fn nobody_busy_leaves_nothing_unused() {
        let parts = split(30 * M, &[using(M), using(2 * M)]);
        assert_eq!(parts.iter().sum::<u64>(), 30 * M);
        assert!(parts[1] > parts[0]);
    }

    #[test]
    fn a_node_reports_once_then_at_most_every_ten_seconds_and_only_news() {
        let mut r = Reporter::default();
        let t0 = Instant::now();
        // Ramping up: not yet.
        assert_eq!(r.sample(t0, &[15 * M], &[15 * M], &[30 * M]), None);
        assert_eq!(r.sample(t0, &[15 * M], &[15 * M], &[30 * M]), None);
        let sent = r
            .sample(t0, &[15 * M], &[15 * M], &[30 * M])
            .expect("first report");
        assert!(sent[0].saturated);
        // Within 10 s: nothing, even if it changed.
        assert_eq!(
            r.sample(t0 + Duration::from_secs(1), &[0], &[15 * M], &[30 * M]),
            None
        );
        // After 10 s, a change is reported (averaged: it went idle).
        let mut t = t0 + Duration::from_secs(10);
        let mut got = None;
        for _ in 0..5 {
            got = got.or(r.sample(t, &[0], &[15 * M], &[30 * M]));
            t += Duration::from_secs(1);
        }
        let idle = got.expect("a report of the change");
        assert!(!idle[0].saturated);
        // Settling (the average still falling) is at most one more report, 10 s later at the
        // earliest; then, steady, none.
        let mut more = Vec::new();
        for _ in 0..20 {
            if r.sample(t, &[0], &[15 * M], &[30 * M]).is_some() {
                more.push(t);
            }
            t += Duration::from_secs(1);
        }
        assert!(more.len() <= 1, "{more:?}");
        // Its part changes (the controller gave it less): no report for the warm-up, then
        // what it uses of the new part.
        assert_eq!(r.sample(t, &[0], &[5 * M], &[30 * M]), None);
        t += Duration::from_secs(1);
        assert_eq!(r.sample(t, &[0], &[5 * M], &[30 * M]), None);
        for _ in 0..30 {
            assert_eq!(r.sample(t, &[0], &[15 * M], &[30 * M]), None);
            t += Duration::from_secs(1);
        }
    }
}
