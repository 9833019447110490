//! Busy CPU time of the whole machine, read from /proc/stat with procfs: what a run cost,
//! however fast it went. Where throughput swings by tens of percent from run to run (a small
//! shared VM), CPU time per byte is the steadier measure of what a datapath adds.
use std::time::Duration;

use procfs::CurrentSI;

use crate::Error;

/// Time all CPUs spent busy since boot: user, nice, system, irq and softirq; not idle, iowait
/// or steal (time the hypervisor gave to others). Resolution: one clock tick (usually 10 ms).
pub fn busy() -> Result<Duration, Error> {
    let t = procfs::KernelStats::current()
        .map_err(|e| Error::Io {
            what: "read /proc/stat".into(),
            source: std::io::Error::other(e.to_string()),
        })?
        .total;
    let ms =
        t.user_ms() + t.nice_ms() + t.system_ms() + t.irq_ms().unwrap_or(0) + t.softirq_ms().unwrap_or(0);
    Ok(Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    #[test]
    fn busy_time_grows_while_this_thread_spins() {
        let before = busy().unwrap();
        let t0 = Instant::now();
        let mut x = 0u64;
        while t0.elapsed() < Duration::from_millis(300) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let spent = busy().unwrap() - before;
        // 300 ms of spinning on one CPU, at 10 ms ticks, whatever else the machine does.
        assert!(spent >= Duration::from_millis(200), "{spent:?}");
    }
}
