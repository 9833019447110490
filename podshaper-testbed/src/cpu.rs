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
    use super::*;

    // This thread's own CPU time: spinning for wall-clock time flaked on a loaded machine,
    // where the thread got less than the CPU time the assertion expects.
    fn thread_cpu() -> Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime fills the timespec it is given.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        assert_eq!(rc, 0, "clock_gettime");
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    #[test]
    fn busy_time_grows_while_this_thread_spins() {
        let before = busy().unwrap();
        let t0 = thread_cpu();
        let mut x = 0u64;
        while thread_cpu() - t0 < Duration::from_millis(300) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let spent = busy().unwrap() - before;
        // 300 ms of this thread on a CPU, at 10 ms ticks, whatever else the machine does.
        assert!(spent >= Duration::from_millis(250), "{spent:?}");
    }
}
