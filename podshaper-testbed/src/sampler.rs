//! Samples a namespace's IP receive counter (`IpExt InOctets` in /proc/net/netstat) at a fixed
//! period, from a thread that joined the namespace. The counter counts what reached IP, after
//! any qdisc on the way in and before sockets, so the rate over each period shows bursts that
//! an application's reads (iperf3 reads 128 KB at a time) would smear or invent.
use std::{
    fs,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use crate::{io_err, Error, Netns};

/// One reading: when, and InOctets then.
pub type Sample = (Instant, u64);

/// A thread sampling InOctets in one namespace until [`InOctetsSampler::finish`].
pub struct InOctetsSampler {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Result<Vec<Sample>, Error>>,
}

impl InOctetsSampler {
    /// Starts sampling in `ns` every `period`.
    pub fn start(ns: &Netns, period: Duration) -> Result<Self, Error> {
        let path = ns.path();
        let stop = Arc::new(AtomicBool::new(false));
        let handle = thread::spawn({
            let stop = stop.clone();
            move || -> Result<Vec<Sample>, Error> {
                // This thread ends with the sampling.
                crate::netns::enter(&path)?;
                // thread-self: /proc/self/net would show the process's (main thread's) namespace.
                let netstat = std::path::Path::new("/proc/thread-self/net/netstat");
                let mut samples = Vec::new();
                let mut next = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    let text = fs::read_to_string(netstat).map_err(|e| io_err("read", netstat, e))?;
                    samples.push((Instant::now(), in_octets(&text).unwrap_or(0)));
                    next += period;
                    thread::sleep(next.saturating_duration_since(Instant::now()));
                }
                Ok(samples)
            }
        });
        Ok(Self { stop, handle })
    }

    /// Stops sampling and returns the readings.
    pub fn finish(self) -> Result<Vec<Sample>, Error> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().map_err(|_| Error::Parse {
            what: "InOctets sampler".into(),
            why: "thread panicked".into(),
        })?
    }
}

/// IpExt InOctets from the text of /proc/net/netstat (a header line and a value line).
fn in_octets(netstat: &str) -> Option<u64> {
    let mut lines = netstat.lines().filter(|l| l.starts_with("IpExt:"));
    let (names, values) = (lines.next()?, lines.next()?);
    let i = names.split_whitespace().position(|n| n == "InOctets")?;
    values.split_whitespace().nth(i)?.parse().ok()
}

/// The highest and the mean rate (bits/s) over consecutive samples between `from` and `to`.
pub fn peak_and_mean(samples: &[Sample], from: Instant, to: Instant) -> Option<(f64, f64)> {
    let inside: Vec<&Sample> = samples.iter().filter(|(t, _)| *t >= from && *t <= to).collect();
    let (first, last) = (inside.first()?, inside.last()?);
    let span = last.0.duration_since(first.0).as_secs_f64();
    if inside.len() < 3 || span <= 0.0 {
        return None;
    }
    let rate = |a: &Sample, b: &Sample| (b.1 - a.1) as f64 * 8.0 / b.0.duration_since(a.0).as_secs_f64();
    let peak = inside.windows(2).map(|w| rate(w[0], w[1])).fold(0.0, f64::max);
    Some((peak, rate(first, last)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_in_octets() {
        let text = "TcpExt: A B\nTcpExt: 1 2\nIpExt: InNoRoutes InTruncatedPkts InMcastPkts OutMcastPkts InBcastPkts OutBcastPkts InOctets OutOctets\nIpExt: 0 0 0 0 0 0 123456 789\n";
        assert_eq!(in_octets(text), Some(123456));
        assert_eq!(in_octets("TcpExt: A\nTcpExt: 1\n"), None);
    }

    #[test]
    fn peak_and_mean_of_samples() {
        let t0 = Instant::now();
        let ms = |m: u64| t0 + Duration::from_millis(m);
        // 1250 bytes per 100 ms = 100 kbit/s, one period of 2500 bytes = 200 kbit/s.
        let s = [(ms(0), 0), (ms(100), 1250), (ms(200), 3750), (ms(300), 5000)];
        let (peak, mean) = peak_and_mean(&s, ms(0), ms(300)).unwrap();
        assert!((peak - 200_000.0).abs() < 1.0, "{peak}");
        assert!((mean - 133_333.3).abs() < 1.0, "{mean}");
        assert_eq!(peak_and_mean(&s, ms(250), ms(300)), None);
    }
}
