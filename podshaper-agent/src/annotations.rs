//! The pod annotations the agent reads: the standard bandwidth pair, parsed as containerd and
//! CRI-O parse them (a Kubernetes quantity in bits/s, 1k to 1P), and the uninstall signal.
use std::collections::BTreeMap;

use podshaper_api::{Limits, Rate};

/// Egress limit of a pod (what it sends), as the bandwidth CNI plugin reads it.
pub const EGRESS: &str = "kubernetes.io/egress-bandwidth";
/// Ingress limit of a pod (what it receives).
pub const INGRESS: &str = "kubernetes.io/ingress-bandwidth";
/// Set on an agent's own pod by the chart's pre-delete hook: lift every limit on the node.
pub const UNINSTALL: &str = "podshaper.io/uninstall";

/// An annotation that is not a rate; the message says what is accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("annotation {key}: {why}")]
pub struct AnnotationError {
    pub key: &'static str,
    pub why: String,
}

/// What the annotations ask for, and the directions cut down to the agent's maximum.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    pub wanted: Limits,
    /// One line per direction above `max`, for a warning Event.
    pub clamped: Vec<String>,
}

/// Reads the bandwidth annotations. Either one malformed fails the whole pod, so a typo never
/// half-applies. A rate above `max` is cut to `max` (a ceiling, not a refusal: refusing would
/// leave a new pod unlimited).
pub fn parse(
    annotations: Option<&BTreeMap<String, String>>,
    max: Option<Rate>,
) -> Result<Parsed, AnnotationError> {
    let mut parsed = Parsed::default();
    for (key, slot) in [
        (EGRESS, &mut parsed.wanted.egress),
        (INGRESS, &mut parsed.wanted.ingress),
    ] {
        let Some(value) = annotations.and_then(|a| a.get(key)) else {
            continue;
        };
        let rate = Rate::parse_quantity(value).map_err(|e| AnnotationError {
            key,
            why: e.to_string(),
        })?;
        *slot = Some(match max {
            Some(max) if rate > max => {
                parsed.clamped.push(format!(
                    "{key}={value} is above the agent's maximum of {max}; limited to {max}"
                ));
                max
            }
            _ => rate,
        });
    }
    Ok(parsed)
}

/// Whether the uninstall hook has asked this (agent) pod to lift every limit.
pub fn uninstall_requested(annotations: Option<&BTreeMap<String, String>>) -> bool {
    annotations
        .and_then(|a| a.get(UNINSTALL))
        .is_some_and(|v| v == "true")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn rate(s: &str) -> Rate {
        Rate::parse_quantity(s).unwrap()
    }

    #[test]
    fn reads_both_directions_as_quantities() {
        let a = annotations(&[(EGRESS, "10M"), (INGRESS, "1.5G"), ("other", "x")]);
        let p = parse(Some(&a), None).unwrap();
        assert_eq!(p.wanted.egress, Some(rate("10M")));
        assert_eq!(p.wanted.ingress, Some(rate("1500M")));
        assert!(p.clamped.is_empty());
        assert_eq!(
            p.wanted.to_string(),
            "egress limited to 10M, ingress limited to 1500M"
        );
    }

    #[test]
    fn no_annotations_is_unlimited() {
        assert!(parse(None, None).unwrap().wanted.is_none());
        let a = annotations(&[("app", "web")]);
        assert_eq!(parse(Some(&a), None).unwrap().wanted, Limits::default());
    }

    #[test]
    fn malformed_or_out_of_bounds_fails_the_pod_and_says_what_is_accepted() {
        for bad in ["10Zbit", "10mbit", "", "-5M", "500", "2P"] {
            let a = annotations(&[(EGRESS, "10M"), (INGRESS, bad)]);
            let err = parse(Some(&a), None).unwrap_err();
            assert_eq!(err.key, INGRESS, "{bad}");
            assert!(err.to_string().contains(INGRESS), "{err}");
        }
        let err = parse(Some(&annotations(&[(EGRESS, "10Zbit")])), None).unwrap_err();
        // tc units are for the CLI only: annotations take what the kubelet takes.
        assert!(err.to_string().contains("expected"), "{err}");
    }

    #[test]
    fn rates_above_the_maximum_are_cut_to_it() {
        let a = annotations(&[(EGRESS, "10G"), (INGRESS, "1G")]);
        let p = parse(Some(&a), Some(rate("2G"))).unwrap();
        assert_eq!(p.wanted.egress, Some(rate("2G")));
        assert_eq!(p.wanted.ingress, Some(rate("1G")));
        assert_eq!(p.clamped.len(), 1);
        assert!(p.clamped[0].contains("maximum of 2G"), "{:?}", p.clamped);
    }

    #[test]
    fn uninstall_needs_the_exact_value() {
        assert!(uninstall_requested(Some(&annotations(&[(UNINSTALL, "true")]))));
        assert!(!uninstall_requested(Some(&annotations(&[(UNINSTALL, "yes")]))));
        assert!(!uninstall_requested(None));
    }
}
