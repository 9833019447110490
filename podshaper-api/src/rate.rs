//! Rates in bits per second, parsed the way users write them.
//!
//! Kubernetes bandwidth annotations are resource quantities (`500k`, `10M`, `1.5G`, `1Gi`,
//! `1e6`), rounded up to whole bits per second and bounded to 1k..1P exactly as containerd and
//! CRI-O do. The command line also takes tc-style units (`10mbit`, `1gbit`, `500kbps`).
//! Hand-written rather than taken from a quantity crate: the bounds, the rounding and the
//! error text are what the annotations' users know from the kubelet.
use std::fmt;

use serde::{Deserialize, Serialize};

/// Smallest accepted rate, as the kubelet: 1 kbit/s.
pub const MIN_BPS: u64 = 1_000;
/// Largest accepted rate, as the kubelet: 1 Pbit/s.
pub const MAX_BPS: u64 = 1_000_000_000_000_000;

/// A rate in bits per second, within [`MIN_BPS`]..=[`MAX_BPS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u64", into = "u64")]
pub struct Rate(u64);

/// Why a rate was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateError {
    #[error("invalid rate {input:?}: {why}; {ACCEPTED}")]
    Invalid { input: String, why: &'static str },
    #[error("rate {input:?} is below the minimum of 1k (1000 bits/s)")]
    TooSmall { input: String },
    #[error("rate {input:?} is above the maximum of 1P (10^15 bits/s)")]
    TooLarge { input: String },
}

const ACCEPTED: &str = "expected bits per second as a Kubernetes quantity (500k, 10M, 1.5G, 1Gi, 1e6) or, on the command line, tc-style (10mbit, 1gbit, 500kbps), between 1k and 1P";

impl Rate {
    /// The smallest rate, [`MIN_BPS`].
    pub const MIN: Rate = Rate(MIN_BPS);

    /// A rate from bits per second, checked against the bounds.
    pub fn from_bps(bps: u64) -> Result<Self, RateError> {
        Self::bounded(bps, &bps.to_string())
    }

    /// Bits per second.
    pub fn bps(self) -> u64 {
        self.0
    }

    fn bounded(bps: u64, input: &str) -> Result<Self, RateError> {
        if bps < MIN_BPS {
            return Err(RateError::TooSmall { input: input.into() });
        }
        if bps > MAX_BPS {
            return Err(RateError::TooLarge { input: input.into() });
        }
        Ok(Self(bps))
    }

    /// Parses a Kubernetes quantity (what the bandwidth annotations hold).
    pub fn parse_quantity(input: &str) -> Result<Self, RateError> {
        let bps = parse_quantity_bits(input.trim()).map_err(|why| RateError::Invalid {
            input: input.into(),
            why,
        })?;
        Self::bounded_f(bps, input)
    }

    /// Parses a Kubernetes quantity or a tc-style rate (what the command line takes).
    pub fn parse_cli(input: &str) -> Result<Self, RateError> {
        let s = input.trim();
        if let Some(bps) = parse_tc_bits(s) {
            return Self::bounded_f(bps, input);
        }
        Self::parse_quantity(input)
    }

    fn bounded_f(bps: f64, input: &str) -> Result<Self, RateError> {
        if !bps.is_finite() || bps > MAX_BPS as f64 {
            return Err(RateError::TooLarge { input: input.into() });
        }
        // Quantities round up to whole units, as resource.Quantity.Value() does.
        Self::bounded(bps.ceil() as u64, input)
    }
}

impl TryFrom<u64> for Rate {
    type Error = RateError;
    fn try_from(v: u64) -> Result<Self, RateError> {
        Self::from_bps(v)
    }
}

impl From<Rate> for u64 {
    fn from(r: Rate) -> u64 {
        r.0
    }
}

impl fmt::Display for Rate {
    /// The shortest exact quantity: 10M, 1500k, 1234.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (div, unit) in [
            (1_000_000_000_000_000, "P"),
            (1_000_000_000_000, "T"),
            (1_000_000_000, "G"),
            (1_000_000, "M"),
            (1_000, "k"),
        ] {
            if self.0.is_multiple_of(div) {
                return write!(f, "{}{unit}", self.0 / div);
            }
        }
        write!(f, "{}", self.0)
    }
}

/// A measured rate in bits per second, written the way limits are, with at most three
/// decimals and none that are zero: 9.87M, 2.5G, 10M, 999. The one formatter of the CLI's
/// status, the demo and the benches; exact limits use [`Rate`]'s `Display`.
pub fn human_bps(bps: f64) -> String {
    let bps = bps.max(0.0);
    for (div, unit) in [(1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")] {
        // Rounded at three decimals first, so 999.9996k reads 1M, not 1000k.
        if (bps / div * 1e3).round() >= 1e3 {
            let s = format!("{:.3}", bps / div);
            return format!("{}{unit}", s.trim_end_matches('0').trim_end_matches('.'));
        }
    }
    format!("{}", bps.round() as u64)
}

// Kubernetes quantity grammar: <signed number><suffix>, suffix one of the binary SI (Ki..Ei),
// decimal SI (n u m "" k M G T P E) or a decimal exponent (e3, E-2).
fn parse_quantity_bits(s: &str) -> Result<f64, &'static str> {
    if s.is_empty() {
        return Err("empty");
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    if num.is_empty() || num == "+" || num == "-" || num.matches('.').count() > 1 {
        return Err("no number");
    }
    if num[1..].contains(['+', '-']) {
        return Err("misplaced sign");
    }
    let value: f64 = num.parse().map_err(|_| "no number")?;
    if value < 0.0 {
        return Err("negative");
    }
    let mult = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        e if e.starts_with(['e', 'E']) => {
            let exp: i32 = e[1..].parse().map_err(|_| "unknown suffix")?;
            if !(-30..=30).contains(&exp) {
                return Err("exponent out of range");
            }
            10f64.powi(exp)
        }
        _ => return Err("unknown suffix"),
    };
    Ok(value * mult)
}

// tc(8) units: bit, kbit, mbit, gbit, tbit (decimal), kibit.. (binary), bps.. (bytes).
fn parse_tc_bits(s: &str) -> Option<f64> {
    let lower = s.to_ascii_lowercase();
    let split = lower.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (num, unit) = lower.split_at(split);
    let value: f64 = num.parse().ok()?;
    let mult = match unit {
        "bit" => 1.0,
        "kbit" => 1e3,
        "mbit" => 1e6,
        "gbit" => 1e9,
        "tbit" => 1e12,
        "kibit" => 1024.0,
        "mibit" => 1024f64.powi(2),
        "gibit" => 1024f64.powi(3),
        "tibit" => 1024f64.powi(4),
        "bps" => 8.0,
        "kbps" => 8e3,
        "mbps" => 8e6,
        "gbps" => 8e9,
        "tbps" => 8e12,
        _ => return None,
    };
    Some(value * mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str) -> u64 {
        Rate::parse_quantity(s).unwrap().bps()
    }

    #[test]
    fn quantities_as_the_kubelet_reads_them() {
        assert_eq!(q("1k"), 1_000);
        assert_eq!(q("500k"), 500_000);
        assert_eq!(q("10M"), 10_000_000);
        assert_eq!(q("1.5G"), 1_500_000_000);
        assert_eq!(q("1Gi"), 1 << 30);
        assert_eq!(q("1e6"), 1_000_000);
        assert_eq!(q("2E3"), 2_000);
        assert_eq!(q("1P"), MAX_BPS);
        assert_eq!(q(" 100M "), 100_000_000);
        assert_eq!(q("1000"), 1_000);
        // Rounded up to a whole bit per second, as Quantity.Value() does.
        assert_eq!(q("1000500m"), 1_001);
    }

    #[test]
    fn tc_style_on_the_command_line() {
        let c = |s: &str| Rate::parse_cli(s).unwrap().bps();
        assert_eq!(c("10mbit"), 10_000_000);
        assert_eq!(c("10Mbit"), 10_000_000);
        assert_eq!(c("1gbit"), 1_000_000_000);
        assert_eq!(c("500kbps"), 4_000_000);
        assert_eq!(c("2kibit"), 2_048);
        assert_eq!(c("10M"), 10_000_000);
        // tc units are not quantities: annotations refuse them.
        assert!(Rate::parse_quantity("10mbit").is_err());
    }

    #[test]
    fn refuses_bad_input_with_what_is_accepted() {
        for bad in [
            "10Zbit", "", "abc", "10 M", "-5M", "1.2.3M", "M", "10MB", "1e99", "5-3",
        ] {
            let err = Rate::parse_cli(bad).unwrap_err();
            assert!(
                matches!(err, RateError::Invalid { .. } | RateError::TooLarge { .. }),
                "{bad}: {err}"
            );
            if let RateError::Invalid { .. } = err {
                assert!(err.to_string().contains("expected bits per second"), "{err}");
            }
        }
        assert!(matches!(
            Rate::parse_quantity("999"),
            Err(RateError::TooSmall { .. })
        ));
        assert!(matches!(
            Rate::parse_quantity("2P"),
            Err(RateError::TooLarge { .. })
        ));
        assert!(matches!(
            Rate::parse_quantity("0"),
            Err(RateError::TooSmall { .. })
        ));
    }

    #[test]
    fn displays_shortest_exact_quantity() {
        assert_eq!(
            Rate::parse_quantity("10M").unwrap(),
            Rate::parse_cli("10mbit").unwrap()
        );
        assert_eq!(Rate::from_bps(10_000_000).unwrap().to_string(), "10M");
        assert_eq!(Rate::from_bps(1_500_000).unwrap().to_string(), "1500k");
        assert_eq!(Rate::from_bps(1_234).unwrap().to_string(), "1234");
    }

    #[test]
    fn serde_checks_bounds() {
        assert!(serde_json::from_str::<Rate>("5").is_err());
        assert_eq!(
            serde_json::from_str::<Rate>("10000000").unwrap().bps(),
            10_000_000
        );
    }

    #[test]
    fn measured_rates_read_like_limits() {
        assert_eq!(human_bps(10e6), "10M");
        assert_eq!(human_bps(9.87e6), "9.87M");
        assert_eq!(human_bps(9_870_123.0), "9.87M");
        assert_eq!(human_bps(2.5e9), "2.5G");
        assert_eq!(human_bps(40e9), "40G");
        assert_eq!(human_bps(999.0), "999");
        assert_eq!(human_bps(999_999.9), "1M");
        assert_eq!(human_bps(0.0), "0");
        assert_eq!(human_bps(-1.0), "0");
    }
}
