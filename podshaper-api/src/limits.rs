//! The limits of one cgroup: the one type the agent's annotations, the daemon, the datapath,
//! the status and the test harness share.
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{Rate, RateError};

/// Egress and ingress limits of one cgroup in bits per second of L3 traffic; `None` is no
/// limit that way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Limits {
    pub egress: Option<Rate>,
    pub ingress: Option<Rate>,
}

impl Limits {
    /// Limits from bits per second, each checked against [`Rate`]'s bounds.
    pub fn from_bps(egress: Option<u64>, ingress: Option<u64>) -> Result<Self, RateError> {
        Ok(Self {
            egress: egress.map(Rate::from_bps).transpose()?,
            ingress: ingress.map(Rate::from_bps).transpose()?,
        })
    }

    /// Whether neither direction is limited.
    pub fn is_none(&self) -> bool {
        self.egress.is_none() && self.ingress.is_none()
    }

    /// Egress and ingress in bits per second.
    pub fn bps(&self) -> (Option<u64>, Option<u64>) {
        (self.egress.map(Rate::bps), self.ingress.map(Rate::bps))
    }
}

/// "egress limited to 10M, ingress unlimited": what Events and logs say.
impl fmt::Display for Limits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |r: Option<Rate>| r.map(|r| format!("limited to {r}")).unwrap_or("unlimited".into());
        write!(f, "egress {}, ingress {}", show(self.egress), show(self.ingress))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_rates_and_say_what_they_are() {
        let l = Limits::from_bps(Some(10_000_000), None).unwrap();
        assert_eq!(l.to_string(), "egress limited to 10M, ingress unlimited");
        assert_eq!(l.bps(), (Some(10_000_000), None));
        assert!(!l.is_none());
        assert!(Limits::default().is_none());
        assert!(Limits::from_bps(None, Some(5)).is_err(), "below 1k");
    }
}
