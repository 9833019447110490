//! What the agent does for one pod, decided from what it knows and without acting: the rules
//! the Kubernetes tests check end to end (terminating and finished pods, a cgroup that is not
//! there or went, malformed annotations, the maximum, drift), tested here in milliseconds.
//! reconcile.rs gathers the inputs, calls these and carries out the answer.
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use podshaper_api::Limits;

use crate::annotations::{AnnotationError, Parsed};

/// Failed lookups of a pod's cgroup before the agent says so in an Event. With the backoff
/// below that is about 15 s: long enough for a starting pod's sandbox to appear.
pub const REPORT_MISSING_AFTER: u32 = 5;
const FIRST_RETRY: Duration = Duration::from_millis(500);
const MAX_RETRY: Duration = Duration::from_secs(30);

/// What the agent wants in force for one pod: the limits of its annotations and the peer
/// rules of the BandwidthPolicies that select it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Wanted {
    pub limits: Limits,
    /// The rules to bind, sorted. None: leave the bindings in force as they are (the policies
    /// are not listed yet after a start, or more rules select the pod than it holds).
    pub rules: Option<Vec<String>>,
}

impl Wanted {
    /// Nothing to put in force: no limit, and no rule to bind (or none known yet).
    pub fn is_none(&self) -> bool {
        self.limits.is_none() && self.rules.as_ref().is_none_or(Vec::is_empty)
    }
}

/// What the agent knows of one pod when it looks at it.
#[derive(Debug)]
pub struct Known<'a> {
    /// Its annotations, parsed and cut to the agent's maximum, or why they are malformed.
    pub parsed: &'a Result<Parsed, AnnotationError>,
    /// The peer rules to bind (see [`Wanted::rules`]).
    pub rules: Option<&'a [String]>,
    /// What was last applied, on which cgroup, and whether that cgroup still exists.
    pub applied: Option<(&'a Path, Wanted, bool)>,
    /// A problem was reported and is not cleared: an unchanged pod is tried again.
    pub had_problem: bool,
    /// The pod finished (Succeeded or Failed): its cgroup is gone for good.
    pub finished: bool,
}

/// What to do for the pod.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// The limits in force are the wanted ones. `clear_problem`: nothing is wanted and nothing
    /// was applied, so an earlier problem (a malformed annotation since removed) is over.
    Nothing { clear_problem: bool },
    /// The annotations are malformed: say so in an Event, change nothing (not this pod's
    /// limit in force, not any other pod).
    ReportInvalid(String),
    /// No cgroup and nothing to wait for (nothing wanted, or the pod finished): forget what
    /// was applied; its state went with the cgroup.
    Forget,
    /// The cgroup is not there (yet): count a miss and look again later.
    WaitForCgroup,
    /// Put these limits and rules in force on this cgroup; `capped` says which directions
    /// were cut to the maximum.
    Apply {
        dir: PathBuf,
        wanted: Wanted,
        capped: Option<String>,
    },
}

/// Decides for one pod. `find` looks the pod's cgroup up; it is called only when the cgroup
/// last applied is not known to exist, so an unchanged pod costs no directory scan.
pub fn decide(known: &Known, find: impl FnOnce() -> Option<PathBuf>) -> Decision {
    let parsed = match known.parsed {
        Ok(p) => p,
        Err(e) => {
            return Decision::ReportInvalid(format!(
                "{e}. The limit in force (if any) is unchanged. Accepted: a Kubernetes quantity of bits/s from 1k to 1P, like 10M or 1.5G"
            ))
        }
    };
    let wanted = Wanted {
        limits: parsed.wanted,
        rules: known.rules.map(<[String]>::to_vec),
    };
    let Some((dir, applied, exists)) = &known.applied else {
        if wanted.is_none() {
            return Decision::Nothing { clear_problem: true };
        }
        return look_up(known, wanted, parsed, find);
    };
    // Unchanged and still there: nothing to do (status updates of the pod land here, and a
    // terminating pod keeps its limit while its containers run out their grace period).
    if *applied == wanted && *exists && !known.had_problem {
        return Decision::Nothing { clear_problem: false };
    }
    if *exists {
        return Decision::Apply {
            dir: dir.to_path_buf(),
            wanted,
            capped: capped(parsed),
        };
    }
    look_up(known, wanted, parsed, find)
}

fn look_up(
    known: &Known,
    wanted: Wanted,
    parsed: &Parsed,
    find: impl FnOnce() -> Option<PathBuf>,
) -> Decision {
    match find() {
        Some(dir) => Decision::Apply {
            dir,
            wanted,
            capped: capped(parsed),
        },
        None if wanted.is_none() || known.finished => Decision::Forget,
        None => Decision::WaitForCgroup,
    }
}

fn capped(parsed: &Parsed) -> Option<String> {
    (!parsed.clamped.is_empty()).then(|| parsed.clamped.join("; "))
}

/// An Event to publish.
#[derive(Debug, PartialEq, Eq)]
pub struct Report {
    pub warning: bool,
    pub reason: &'static str,
    pub note: String,
}

/// What the datapath has in force for a cgroup: its limits and the rules it is bound to,
/// sorted (none of either when it is not limited).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InForce {
    pub limits: Limits,
    pub rules: Vec<String>,
}

/// The Events a successful apply calls for, and the cap warning to remember: a new or
/// changed cut to the maximum is told once; a change of the limits or rules in force
/// (`before` to `wanted`) is told, a re-apply of the same (after a restart, a retry) is not.
pub fn after_apply(
    wanted: &Wanted,
    before: &InForce,
    capped: Option<String>,
    capped_before: Option<&str>,
) -> (Vec<Report>, Option<String>) {
    let mut reports = Vec::new();
    if let Some(note) = capped.as_deref().filter(|c| Some(*c) != capped_before) {
        reports.push(Report {
            warning: true,
            reason: "BandwidthCapped",
            note: note.to_string(),
        });
    }
    if before.limits != wanted.limits {
        reports.push(Report {
            warning: false,
            reason: if wanted.limits.is_none() {
                "BandwidthUnlimited"
            } else {
                "BandwidthLimited"
            },
            note: wanted.limits.to_string(),
        });
    }
    match &wanted.rules {
        Some(rules) if *rules != before.rules && rules.is_empty() => reports.push(Report {
            warning: false,
            reason: "PeerRulesLifted",
            note: "no BandwidthPolicy rule applies to this pod any more".into(),
        }),
        Some(rules) if *rules != before.rules => reports.push(Report {
            warning: false,
            reason: "PeerRulesBound",
            note: format!("BandwidthPolicy rules in force: {}", rules.join(", ")),
        }),
        _ => {}
    }
    (reports, capped)
}

/// Whether what is in force (nothing if the cgroup is not limited) drifted from what the
/// agent applied: a `podshaper reset`, `unlimit` or `limit --rules` on the node. The
/// annotations and policies win.
pub fn drifted(applied: &Wanted, in_force: Option<&InForce>) -> bool {
    let none = InForce::default();
    let in_force = in_force.unwrap_or(&none);
    in_force.limits != applied.limits || applied.rules.as_ref().is_some_and(|r| *r != in_force.rules)
}

/// When to look at a pod again after `misses` failed cgroup lookups or `failures` failed
/// applies in a row: 0.5 s, doubling, at most 30 s.
pub fn retry_delay(misses: u32, failures: u32) -> Duration {
    let n = misses.max(failures).clamp(1, 16);
    (FIRST_RETRY * 2u32.saturating_pow(n - 1)).min(MAX_RETRY)
}

#[cfg(test)]
mod tests {
    use std::{cell::Cell, collections::BTreeMap};

    use podshaper_api::Rate;

    use super::*;
    use crate::annotations::{self, EGRESS, INGRESS};

    fn rate(s: &str) -> Rate {
        Rate::parse_quantity(s).unwrap()
    }

    fn parsed(pairs: &[(&str, &str)], max: Option<&str>) -> Result<Parsed, AnnotationError> {
        let a: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        annotations::parse(Some(&a), max.map(rate))
    }

    fn egress(s: &str) -> Limits {
        Limits {
            egress: Some(rate(s)),
            ingress: None,
        }
    }

    /// Limits and no rule, with the policies listed.
    fn only(limits: Limits) -> Wanted {
        Wanted {
            limits,
            rules: Some(Vec::new()),
        }
    }

    /// Runs `decide`, counting the lookups.
    fn run(known: &Known, found: Option<&str>) -> (Decision, u32) {
        let calls = Cell::new(0);
        let d = decide(known, || {
            calls.set(calls.get() + 1);
            found.map(PathBuf::from)
        });
        (d, calls.get())
    }

    fn known<'a>(
        parsed: &'a Result<Parsed, AnnotationError>,
        applied: Option<(&'a Path, Limits, bool)>,
    ) -> Known<'a> {
        Known {
            parsed,
            rules: Some(&[]),
            applied: applied.map(|(d, l, e)| (d, only(l), e)),
            had_problem: false,
            finished: false,
        }
    }

    #[test]
    fn a_new_annotated_pod_is_limited_once_its_cgroup_is_found() {
        let p = parsed(&[(EGRESS, "10M")], None);
        let k = known(&p, None);
        assert_eq!(run(&k, None), (Decision::WaitForCgroup, 1));
        let (d, _) = run(&k, Some("/cg/pod"));
        assert_eq!(
            d,
            Decision::Apply {
                dir: "/cg/pod".into(),
                wanted: only(egress("10M")),
                capped: None
            }
        );
    }

    #[test]
    fn an_unchanged_pod_costs_nothing_and_a_terminating_one_keeps_its_limit() {
        let p = parsed(&[(EGRESS, "10M")], None);
        // Status updates, and the pod terminating (phase still Running, containers running
        // out their grace period): the limit stays, no lookup.
        let k = known(&p, Some((Path::new("/cg/pod"), egress("10M"), true)));
        assert_eq!(
            run(&k, Some("/elsewhere")),
            (Decision::Nothing { clear_problem: false }, 0)
        );
    }

    #[test]
    fn a_changed_annotation_applies_on_the_same_cgroup() {
        let p = parsed(&[(EGRESS, "50M"), (INGRESS, "30M")], None);
        let k = known(&p, Some((Path::new("/cg/pod"), egress("10M"), true)));
        let (d, lookups) = run(&k, None);
        assert_eq!(lookups, 0);
        let Decision::Apply { dir, wanted, .. } = d else {
            panic!("{d:?}")
        };
        assert_eq!(dir, Path::new("/cg/pod"));
        assert_eq!(wanted.limits.ingress, Some(rate("30M")));
    }

    #[test]
    fn removed_annotations_lift_the_limit_and_then_nothing_is_left_to_do() {
        let p = parsed(&[], None);
        let k = known(&p, Some((Path::new("/cg/pod"), egress("10M"), true)));
        let (d, _) = run(&k, None);
        assert_eq!(
            d,
            Decision::Apply {
                dir: "/cg/pod".into(),
                wanted: only(Limits::default()),
                capped: None
            }
        );
        let k = known(&p, None);
        assert_eq!(run(&k, None), (Decision::Nothing { clear_problem: true }, 0));
    }

    #[test]
    fn a_malformed_annotation_changes_nothing_and_says_why() {
        let p = parsed(&[(EGRESS, "10Zbit")], None);
        let k = known(&p, Some((Path::new("/cg/pod"), egress("10M"), true)));
        let (d, lookups) = run(&k, Some("/cg/pod"));
        assert_eq!(lookups, 0, "a malformed pod is not even looked up");
        let Decision::ReportInvalid(note) = d else {
            panic!("{d:?}")
        };
        assert!(note.contains(EGRESS), "{note}");
        assert!(note.contains("unchanged"), "{note}");
    }

    #[test]
    fn a_cgroup_that_went_is_looked_up_again() {
        // The pod's sandbox was recreated: the applied cgroup is gone, a new one is there.
        let p = parsed(&[(EGRESS, "10M")], None);
        let k = known(&p, Some((Path::new("/cg/old"), egress("10M"), false)));
        let (d, lookups) = run(&k, Some("/cg/new"));
        assert_eq!(lookups, 1);
        assert!(
            matches!(d, Decision::Apply { ref dir, .. } if dir == Path::new("/cg/new")),
            "{d:?}"
        );
        // Not there yet: wait for it.
        assert_eq!(run(&k, None).0, Decision::WaitForCgroup);
        // A finished pod's cgroup is gone for good; so is one that wants nothing.
        let done = Known {
            finished: true,
            ..known(&p, Some((Path::new("/cg/old"), egress("10M"), false)))
        };
        assert_eq!(run(&done, None).0, Decision::Forget);
        let none = parsed(&[], None);
        let k = known(&none, Some((Path::new("/cg/old"), egress("10M"), false)));
        assert_eq!(run(&k, None).0, Decision::Forget);
    }

    #[test]
    fn an_unchanged_pod_with_a_problem_is_tried_again() {
        let p = parsed(&[(EGRESS, "10M")], None);
        let k = Known {
            had_problem: true,
            ..known(&p, Some((Path::new("/cg/pod"), egress("10M"), true)))
        };
        assert!(matches!(run(&k, None).0, Decision::Apply { .. }));
    }

    #[test]
    fn a_rate_over_the_maximum_is_cut_and_told_once() {
        let p = parsed(&[(EGRESS, "2G")], Some("1G"));
        let k = known(&p, None);
        let (d, _) = run(&k, Some("/cg/pod"));
        let Decision::Apply { wanted, capped, .. } = d else {
            panic!("{d:?}")
        };
        assert_eq!(wanted, only(egress("1G")));
        let capped = capped.expect("a cap note");
        assert!(capped.contains("2G") && capped.contains("1G"), "{capped}");

        let (reports, kept) = after_apply(&wanted, &InForce::default(), Some(capped.clone()), None);
        let reasons: Vec<_> = reports.iter().map(|r| (r.warning, r.reason)).collect();
        assert_eq!(reasons, [(true, "BandwidthCapped"), (false, "BandwidthLimited")]);
        // The same cut again (a re-apply, a status update): no second warning.
        let was = in_force(wanted.limits, &[]);
        let (reports, _) = after_apply(&wanted, &was, Some(capped), kept.as_deref());
        assert!(reports.is_empty(), "{reports:?}");
        // Back under the maximum: the cap is forgotten, the change told.
        let (reports, kept) = after_apply(&only(egress("500M")), &was, None, kept.as_deref());
        assert_eq!(kept, None);
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].note, "egress limited to 500M, ingress unlimited");
    }

    fn in_force(limits: Limits, rules: &[&str]) -> InForce {
        InForce {
            limits,
            rules: rules.iter().map(|r| r.to_string()).collect(),
        }
    }

    fn with_rules(limits: Limits, rules: &[&str]) -> Wanted {
        Wanted {
            limits,
            rules: Some(rules.iter().map(|r| r.to_string()).collect()),
        }
    }

    #[test]
    fn only_a_change_in_force_is_told() {
        let w = egress("10M");
        assert!(
            after_apply(&only(w), &in_force(w, &[]), None, None).0.is_empty(),
            "adopted after a restart"
        );
        let (r, _) = after_apply(&only(Limits::default()), &in_force(w, &[]), None, None);
        assert_eq!(r[0].reason, "BandwidthUnlimited");
        // Rules bound, changed, lifted; kept as they are (None): not a change.
        let (r, _) = after_apply(&with_rules(w, &["bwp:a"]), &in_force(w, &[]), None, None);
        assert_eq!((r.len(), r[0].reason), (1, "PeerRulesBound"));
        assert!(r[0].note.contains("bwp:a"), "{}", r[0].note);
        let (r, _) = after_apply(&with_rules(w, &[]), &in_force(w, &["bwp:a"]), None, None);
        assert_eq!(r[0].reason, "PeerRulesLifted");
        let keep = Wanted {
            limits: w,
            rules: None,
        };
        assert!(after_apply(&keep, &in_force(w, &["bwp:a"]), None, None)
            .0
            .is_empty());
    }

    #[test]
    fn drift_is_a_limit_or_binding_in_force_that_differs_from_the_applied_one() {
        let w = egress("10M");
        assert!(!drifted(&only(w), Some(&in_force(w, &[]))));
        assert!(drifted(&only(w), None), "reset or unlimited on the node");
        assert!(drifted(&only(w), Some(&in_force(egress("20M"), &[]))));
        let bound = with_rules(Limits::default(), &["bwp:a"]);
        assert!(!drifted(&bound, Some(&in_force(Limits::default(), &["bwp:a"]))));
        assert!(
            drifted(&bound, Some(&in_force(Limits::default(), &[]))),
            "unbound by hand"
        );
        assert!(drifted(&bound, None), "a reset");
        // Bindings left as they are (policies not listed yet): only the limits count.
        let keep = Wanted {
            limits: w,
            rules: None,
        };
        assert!(!drifted(&keep, Some(&in_force(w, &["bwp:x"]))));
    }

    #[test]
    fn a_pod_wanted_only_for_rules_is_looked_up_and_bound() {
        let p = parsed(&[], None);
        let rules = ["bwp:shop/batch:egress0".to_string()];
        let k = Known {
            rules: Some(&rules),
            ..known(&p, None)
        };
        let (d, lookups) = run(&k, Some("/cg/pod"));
        assert_eq!(lookups, 1);
        assert_eq!(
            d,
            Decision::Apply {
                dir: "/cg/pod".into(),
                wanted: with_rules(Limits::default(), &["bwp:shop/batch:egress0"]),
                capped: None
            }
        );
        // Bound and unchanged: nothing. Its policy went: the binding is lifted.
        let bound = Known {
            rules: Some(&rules),
            applied: Some((
                Path::new("/cg/pod"),
                with_rules(Limits::default(), &["bwp:shop/batch:egress0"]),
                true,
            )),
            ..known(&p, None)
        };
        assert_eq!(run(&bound, None).0, Decision::Nothing { clear_problem: false });
        let lifted = Known {
            rules: Some(&[]),
            ..bound
        };
        let (d, _) = run(&lifted, None);
        assert_eq!(
            d,
            Decision::Apply {
                dir: "/cg/pod".into(),
                wanted: only(Limits::default()),
                capped: None
            }
        );
    }

    #[test]
    fn before_the_policies_are_listed_bindings_are_left_as_they_are() {
        // A restarted agent: nothing known applied, policies not listed. An unannotated pod
        // is not even looked up; an annotated one gets its limits and keeps its bindings.
        let none = parsed(&[], None);
        let k = Known {
            rules: None,
            ..known(&none, None)
        };
        assert_eq!(
            run(&k, Some("/cg/pod")),
            (Decision::Nothing { clear_problem: true }, 0)
        );
        let p = parsed(&[(EGRESS, "10M")], None);
        let k = Known {
            rules: None,
            ..known(&p, None)
        };
        let Decision::Apply { wanted, .. } = run(&k, Some("/cg/pod")).0 else {
            panic!()
        };
        assert_eq!(wanted.rules, None);
        assert_eq!(wanted.limits, egress("10M"));
    }

    #[test]
    fn retries_back_off_from_half_a_second_to_thirty() {
        assert_eq!(retry_delay(0, 0), Duration::from_millis(500));
        assert_eq!(retry_delay(1, 0), Duration::from_millis(500));
        assert_eq!(retry_delay(2, 1), Duration::from_secs(1));
        assert_eq!(retry_delay(0, 4), Duration::from_secs(4));
        assert_eq!(retry_delay(7, 0), Duration::from_secs(30));
        assert_eq!(retry_delay(u32::MAX, 0), Duration::from_secs(30));
    }
}
