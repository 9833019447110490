//! iperf3 as the load generator: a server, a client that returns its `--json` report, the
//! receiver-side numbers parsed from it, and the conversion of goodput to the L3 rate the
//! shapers limit.
use std::{
    ffi::OsString,
    io::Read,
    net::IpAddr,
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde::Deserialize;

use crate::{
    cgroup::Cgroup,
    netns::{command_in, listening, Netns},
    Error,
};

/// The port iperf3 uses unless told otherwise.
pub const DEFAULT_PORT: u16 = 5201;

/// How a server runs.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Port to listen on (`-p`).
    pub port: u16,
    /// Exit after one test (`-1`); otherwise serve until dropped.
    pub one_off: bool,
    /// Report interval in seconds (`-i`): the receiver-side intervals of uploads come from here.
    pub interval: f64,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            port: DEFAULT_PORT,
            one_off: true,
            interval: 0.1,
        }
    }
}

/// A running `iperf3 -s`, killed on drop.
#[derive(Debug)]
pub struct IperfServer {
    child: Child,
    port: u16,
}

impl IperfServer {
    /// How long `start` waits for the server to listen.
    pub const READY_TIMEOUT: Duration = Duration::from_secs(5);

    /// Starts a server inside `netns` (and `cgroup`, if given) and waits until it listens.
    /// It runs with `--json` so that clients can fetch its report (`--get-server-output`).
    pub fn start(netns: &Netns, cgroup: Option<&Cgroup>, opts: &ServerOptions) -> Result<Self, Error> {
        let mut args: Vec<String> = vec![
            "-s".into(),
            "-p".into(),
            opts.port.to_string(),
            "-i".into(),
            opts.interval.to_string(),
            "--json".into(),
        ];
        if opts.one_off {
            args.push("-1".into());
        }
        let child = command_in(netns, cgroup, "iperf3", &args)?
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| Error::Io {
                what: format!("spawn iperf3 server in netns {}", netns.name()),
                source,
            })?;
        let mut server = Self {
            child,
            port: opts.port,
        };
        let deadline = Instant::now() + Self::READY_TIMEOUT;
        // `ip netns exec` execs iperf3 in place, so the pid we hold is the server's.
        while !listening(server.child.id(), opts.port) {
            let exited = server.child.try_wait().map_err(|source| Error::Io {
                what: "wait for iperf3 server".into(),
                source,
            })?;
            if let Some(status) = exited {
                return Err(Error::Iperf(format!(
                    "server on port {} exited at start with {status}",
                    opts.port
                )));
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout {
                    command: format!("iperf3 -s -p {}", opts.port),
                    secs: Self::READY_TIMEOUT.as_secs(),
                });
            }
            thread::sleep(Duration::from_millis(10));
        }
        Ok(server)
    }

    /// The port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Pid of the server process.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for IperfServer {
    fn drop(&mut self) {
        // A one-off server has usually exited already; kill then fails, wait reaps it.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a client sends.
#[derive(Clone, Debug, PartialEq)]
pub enum Traffic {
    /// TCP with a congestion control (`-C`), or the system default.
    Tcp { congestion: Option<String> },
    /// UDP at `rate` bits/s of payload in total, split evenly over the flows (iperf3's `-b` is
    /// per stream), in datagrams of `len` payload bytes.
    Udp { rate: u64, len: u32 },
}

/// How a client runs.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Address of the server.
    pub server: IpAddr,
    /// Port of the server (`-p`).
    pub port: u16,
    /// Protocol and offered load.
    pub traffic: Traffic,
    /// Parallel flows (`-P`).
    pub flows: u32,
    /// Test length (`-t`).
    pub secs: u32,
    /// Report interval (`-i`); the server's interval must match for uploads.
    pub interval: f64,
    /// The server sends and the client receives (`-R`).
    pub reverse: bool,
    /// Per-flow pacing cap in bits/s (`--fq-rate`, SO_MAX_PACING_RATE on the sending sockets;
    /// at most 34G, the option's 32-bit byte rate). It also turns on TCP's internal pacing.
    pub pacing: Option<u64>,
    /// How long after the test's end to wait for the report. The final exchange travels over
    /// the shaped path: behind a deep queue (TBF with a large burst) it takes a while.
    pub grace: Duration,
}

impl ClientOptions {
    /// One TCP flow with the default congestion control for 5 s, 100 ms intervals.
    pub fn new(server: IpAddr) -> Self {
        Self {
            server,
            port: DEFAULT_PORT,
            traffic: Traffic::Tcp { congestion: None },
            flows: 1,
            secs: 5,
            interval: 0.1,
            reverse: false,
            pacing: None,
            grace: Duration::from_secs(30),
        }
    }

    /// The iperf3 arguments of this client.
    pub fn args(&self) -> Vec<OsString> {
        let mut a: Vec<String> = vec![
            "-c".into(),
            self.server.to_string(),
            "-p".into(),
            self.port.to_string(),
            "--json".into(),
            "--get-server-output".into(),
            "-i".into(),
            self.interval.to_string(),
            "-t".into(),
            self.secs.to_string(),
            "-P".into(),
            self.flows.to_string(),
        ];
        if self.reverse {
            a.push("-R".into());
        }
        if let Some(bps) = self.pacing {
            a.extend(["--fq-rate".into(), bps.to_string()]);
        }
        match &self.traffic {
            Traffic::Tcp { congestion: Some(cc) } => a.extend(["-C".into(), cc.clone()]),
            Traffic::Tcp { congestion: None } => {}
            Traffic::Udp { rate, len } => {
                let per_flow = rate.div_ceil(u64::from(self.flows.max(1)));
                a.extend([
                    "-u".into(),
                    "-b".into(),
                    per_flow.to_string(),
                    "-l".into(),
                    len.to_string(),
                ]);
            }
        }
        a.into_iter().map(OsString::from).collect()
    }
}

/// Runs a client inside `netns` (and `cgroup`) to completion and parses its report. Gives up
/// (killing the client) `grace` after the test should have ended.
pub fn run_client(
    netns: &Netns,
    cgroup: Option<&Cgroup>,
    opts: &ClientOptions,
) -> Result<IperfReport, Error> {
    let mut child = command_in(netns, cgroup, "iperf3", &opts.args())?
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| Error::Io {
            what: format!("spawn iperf3 client in netns {}", netns.name()),
            source,
        })?;
    // Drain both pipes while waiting: a long JSON report does not fit in a pipe buffer.
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let limit = Duration::from_secs(u64::from(opts.secs)) + opts.grace;
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Timeout {
                    command: "iperf3 client".into(),
                    secs: limit.as_secs(),
                });
            }
            Err(source) => {
                return Err(Error::Io {
                    what: "wait for iperf3 client".into(),
                    source,
                })
            }
        }
    };
    let out = stdout.join().unwrap_or_default();
    let err = stderr.join().unwrap_or_default();
    match IperfReport::parse(&out) {
        Ok(report) => Ok(report),
        // iperf3 puts its own errors in the JSON; anything else is in stderr.
        Err(Error::Iperf(msg)) => Err(Error::Iperf(msg)),
        Err(_) if !status.success() => Err(Error::Iperf(format!(
            "client exited with {status}: {}",
            err.trim()
        ))),
        Err(e) => Err(e),
    }
}

/// Runs several iperf3 clients at once in `netns`, each in its cgroup (if any) with its
/// options (each against its own server and port): their reports, in order, or the first
/// error.
pub fn run_clients(
    netns: &Netns,
    clients: &[(Option<&Cgroup>, ClientOptions)],
) -> Result<Vec<IperfReport>, Error> {
    thread::scope(|s| {
        let runs: Vec<_> = clients
            .iter()
            .map(|(cg, opts)| s.spawn(move || run_client(netns, *cg, opts)))
            .collect();
        runs.into_iter()
            .map(|r| {
                r.join()
                    .unwrap_or_else(|_| Err(Error::Iperf("an iperf3 client thread panicked".into())))
            })
            .collect()
    })
}

/// TCP flows at once (cubic, `secs` long), each from its cgroup in `clients` to its address,
/// against its own one-off server in `servers` (in `server_cgroup`) on ports from the default
/// up; `reverse`: the clients receive. Their reports, in order.
pub fn tcp_flows_at_once(
    clients: &Netns,
    servers: &Netns,
    server_cgroup: Option<&Cgroup>,
    flows: &[(Option<&Cgroup>, std::net::IpAddr)],
    reverse: bool,
    secs: u32,
) -> Result<Vec<IperfReport>, Error> {
    let mut running = Vec::new();
    let mut opts = Vec::new();
    for (i, (cgroup, to)) in flows.iter().enumerate() {
        let port = u16::try_from(i).map_or(u16::MAX, |i| DEFAULT_PORT.saturating_add(i));
        let server = ServerOptions {
            port,
            ..ServerOptions::default()
        };
        running.push(IperfServer::start(servers, server_cgroup, &server)?);
        let client = ClientOptions {
            traffic: Traffic::Tcp {
                congestion: Some("cubic".into()),
            },
            port,
            secs,
            reverse,
            ..ClientOptions::new(*to)
        };
        opts.push((*cgroup, client));
    }
    run_clients(clients, &opts)
}

fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_string(&mut s);
        }
        s
    })
}

/// Transport protocol of a test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// `-u` was not given.
    Tcp,
    /// `-u`.
    Udp,
}

/// One report interval, as the receiver saw it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Interval {
    /// Seconds since the start of the test.
    pub start: f64,
    /// Seconds since the start of the test.
    pub end: f64,
    /// Goodput (payload bits per second) in this interval.
    pub bits_per_second: f64,
}

/// The numbers of one iperf3 test that the labs use.
#[derive(Clone, Debug, PartialEq)]
pub struct IperfReport {
    /// TCP or UDP.
    pub protocol: Protocol,
    /// Whether the client received (`-R`).
    pub reverse: bool,
    /// Mean goodput at the receiver over the whole test (`end.sum_received`).
    pub received_bps: f64,
    /// Mean goodput the sender pushed (`end.sum_sent`).
    pub sent_bps: f64,
    /// Payload bytes sent over the whole test.
    pub sent_bytes: u64,
    /// Payload bytes received over the whole test.
    pub received_bytes: u64,
    /// TCP retransmissions of the sender, whichever side sent.
    pub retransmits: Option<u64>,
    /// UDP datagrams expected and lost as iperf3's receiver counts them: from sequence gaps
    /// up to the highest number seen per flow, so a flow starved for good is undercounted.
    pub packets: Option<u64>,
    /// UDP datagrams lost by the same count.
    pub lost_packets: Option<u64>,
    /// Congestion control of the sender (TCP).
    pub congestion: Option<String>,
    /// Per-interval sums of the receiving side (the client with `-R`, the server otherwise).
    pub intervals: Vec<Interval>,
}

impl IperfReport {
    /// Parses the `--json` output of a client (run with `--get-server-output` for the
    /// receiver-side intervals of uploads).
    pub fn parse(json: &str) -> Result<Self, Error> {
        let raw: Raw = serde_json::from_str(json).map_err(|e| Error::Parse {
            what: "iperf3 JSON".into(),
            why: e.to_string(),
        })?;
        if let Some(err) = raw.error {
            return Err(Error::Iperf(err));
        }
        let missing = |what: &str| Error::Parse {
            what: "iperf3 JSON".into(),
            why: format!("no {what}"),
        };
        let test = raw
            .start
            .and_then(|s| s.test_start)
            .ok_or_else(|| missing("start.test_start"))?;
        let protocol = match test.protocol.as_str() {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            other => {
                return Err(Error::Parse {
                    what: "iperf3 JSON".into(),
                    why: format!("protocol {other}"),
                })
            }
        };
        let end = raw.end.ok_or_else(|| missing("end"))?;
        let sent = end.sum_sent.ok_or_else(|| missing("end.sum_sent"))?;
        let received = end.sum_received.ok_or_else(|| missing("end.sum_received"))?;
        // The client's own intervals are the receiver's with -R; otherwise the server's are.
        let server = raw.server_output_json.map(|s| s.intervals).unwrap_or_default();
        let receiver = [raw.intervals, server]
            .into_iter()
            .find(|iv| iv.first().is_some_and(|i| i.sum.sender == Some(false)))
            .unwrap_or_default();
        let intervals = receiver
            .iter()
            .filter(|i| !i.sum.omitted.unwrap_or(false))
            .map(|i| Interval {
                start: i.sum.start,
                end: i.sum.end,
                bits_per_second: i.sum.bits_per_second,
            })
            .collect();
        let udp = protocol == Protocol::Udp;
        Ok(Self {
            protocol,
            reverse: test.reverse != 0,
            received_bps: received.bits_per_second,
            sent_bps: sent.bits_per_second,
            sent_bytes: sent.bytes,
            received_bytes: received.bytes,
            retransmits: if udp { None } else { sent.retransmits },
            packets: if udp { received.packets } else { None },
            lost_packets: if udp { received.lost_packets } else { None },
            congestion: end.sender_tcp_congestion,
            intervals,
        })
    }

    /// The highest interval rate (goodput) among intervals starting at or after `skip`
    /// seconds: how far the shaper let the receiver overshoot once the test settled.
    pub fn worst_interval_bps(&self, skip: f64) -> Option<f64> {
        self.after(skip).map(|i| i.bits_per_second).reduce(f64::max)
    }

    /// Mean goodput of the intervals starting at or after `skip` seconds, weighted by length.
    pub fn mean_after_bps(&self, skip: f64) -> Option<f64> {
        let (bits, secs) = self.after(skip).fold((0.0, 0.0), |(b, s), i| {
            let d = i.end - i.start;
            (b + i.bits_per_second * d, s + d)
        });
        (secs > 0.0).then(|| bits / secs)
    }

    /// Mean goodput of the intervals within `from`..`to` seconds (10 ms of slack for the
    /// reported boundaries), weighted by length: iperf3 may end with a sliver of an interval
    /// (6.000-6.003 s) whose rate is noise; counted as one of twenty it read as a 1.17x
    /// overshoot.
    pub fn mean_between_bps(&self, from: f64, to: f64) -> Option<f64> {
        let (bits, secs) = self
            .intervals
            .iter()
            .filter(|i| i.start + 0.01 >= from && i.end <= to + 0.01)
            .fold((0.0, 0.0), |(b, s), i| {
                let d = i.end - i.start;
                (b + i.bits_per_second * d, s + d)
            });
        (secs > 0.0).then(|| bits / secs)
    }

    /// Share of the sent payload bytes that never arrived, in percent (UDP; for TCP it is 0
    /// but for data in flight at the end).
    pub fn lost_percent(&self) -> Option<f64> {
        (self.sent_bytes > 0)
            .then(|| 100.0 * (1.0 - self.received_bytes as f64 / self.sent_bytes as f64).max(0.0))
    }

    /// The intervals without a short last one: iperf3 closes with a partial interval of a few
    /// ms whose rate (what was left in buffers, read at once) would dwarf the others.
    pub fn full_intervals(&self) -> impl Iterator<Item = &Interval> {
        let nominal = self.intervals.iter().map(|i| i.end - i.start).fold(0.0, f64::max);
        self.intervals
            .iter()
            .filter(move |i| i.end - i.start >= nominal / 2.0)
    }

    fn after(&self, skip: f64) -> impl Iterator<Item = &Interval> {
        // iperf3's interval timer fires a little late: allow 10 ms of slack at the boundary.
        self.full_intervals().filter(move |i| i.start + 0.01 >= skip)
    }
}

/// Payload and header bytes of one packet: converts goodput to the L3 rate (IP header and
/// payload of every packet) that podshaper limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct L3 {
    /// Payload bytes per packet (MSS, datagram length).
    pub payload: u32,
    /// IP and transport header bytes per packet.
    pub header: u32,
}

impl L3 {
    /// TCP over IPv4 with timestamps at MTU 1500: 1448-byte segments, 20 + 32 header bytes.
    pub const TCP_V4: Self = Self {
        payload: 1448,
        header: 52,
    };
    /// TCP over IPv6 with timestamps at MTU 1500: 1428-byte segments, 40 + 32 header bytes.
    pub const TCP_V6: Self = Self {
        payload: 1428,
        header: 72,
    };

    /// UDP over IPv4 with `len`-byte datagrams (20 + 8 header bytes).
    pub const fn udp_v4(len: u32) -> Self {
        Self {
            payload: len,
            header: 28,
        }
    }

    /// UDP over IPv6 with `len`-byte datagrams (40 + 8 header bytes).
    pub const fn udp_v6(len: u32) -> Self {
        Self {
            payload: len,
            header: 48,
        }
    }

    /// The L3 rate that carries `goodput` bits/s of payload.
    pub fn l3_bps(self, goodput: f64) -> f64 {
        goodput * f64::from(self.payload + self.header) / f64::from(self.payload)
    }
}

// The subset of iperf3's JSON that the labs read.
#[derive(Deserialize)]
struct Raw {
    error: Option<String>,
    start: Option<RawStart>,
    #[serde(default)]
    intervals: Vec<RawInterval>,
    end: Option<RawEnd>,
    server_output_json: Option<Box<Raw>>,
}

#[derive(Deserialize)]
struct RawStart {
    test_start: Option<RawTestStart>,
}

#[derive(Deserialize)]
struct RawTestStart {
    protocol: String,
    #[serde(default)]
    reverse: u8,
}

#[derive(Deserialize)]
struct RawInterval {
    sum: RawSum,
}

#[derive(Deserialize)]
struct RawSum {
    start: f64,
    end: f64,
    #[serde(default)]
    bytes: u64,
    bits_per_second: f64,
    retransmits: Option<u64>,
    packets: Option<u64>,
    lost_packets: Option<u64>,
    sender: Option<bool>,
    omitted: Option<bool>,
}

#[derive(Deserialize)]
struct RawEnd {
    sum_sent: Option<RawSum>,
    sum_received: Option<RawSum>,
    sender_tcp_congestion: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    // Real iperf3 3.12 reports from loopback inside a namespace (2 flows, 2 s, 100 ms
    // intervals), trimmed to the fields the parser reads; see testdata/README.md.
    const TCP: &str = include_str!("../testdata/iperf3-tcp.json");
    const TCP_REVERSE: &str = include_str!("../testdata/iperf3-tcp-reverse.json");
    const UDP: &str = include_str!("../testdata/iperf3-udp.json");
    const UDP_REVERSE: &str = include_str!("../testdata/iperf3-udp-reverse.json");
    // 20 Mbit/s offered into a 10 Mbit/s TBF between two namespaces.
    const UDP_LOSS: &str = include_str!("../testdata/iperf3-udp-loss.json");

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-6 * b.abs().max(1.0)
    }

    #[test]
    fn tcp_upload_takes_intervals_from_the_server() {
        let r = IperfReport::parse(TCP).unwrap();
        assert_eq!(r.protocol, Protocol::Tcp);
        assert!(!r.reverse);
        assert!(close(r.received_bps, 36_564_992_720.8), "{}", r.received_bps);
        assert_eq!(r.retransmits, Some(22));
        assert_eq!(r.congestion.as_deref(), Some("cubic"));
        assert_eq!(r.packets, None);
        // The server reported 21 intervals (one short tail), the client 20.
        assert_eq!(r.intervals.len(), 21);
        assert_eq!(
            r.full_intervals().count(),
            20,
            "the short tail is not a full interval"
        );
        assert!(close(r.intervals[0].bits_per_second, 31_808_069_721.8));
    }

    #[test]
    fn tcp_download_takes_intervals_from_the_client() {
        let r = IperfReport::parse(TCP_REVERSE).unwrap();
        assert!(r.reverse);
        assert_eq!(r.congestion.as_deref(), Some("bbr"));
        // With -R the server sends: its retransmits reach the client's sum_sent.
        assert_eq!(r.retransmits, Some(5));
        assert_eq!(r.intervals.len(), 20);
        assert!(close(r.intervals[0].bits_per_second, 15_001_671_960.6));
    }

    #[test]
    fn udp_reports_loss_not_retransmits() {
        let r = IperfReport::parse(UDP).unwrap();
        assert_eq!(r.protocol, Protocol::Udp);
        assert_eq!(r.retransmits, None);
        assert_eq!(r.packets, Some(17850));
        assert_eq!(r.lost_percent(), Some(0.0));
        assert!(r.intervals.iter().all(|i| i.bits_per_second > 90e6));
        let r = IperfReport::parse(UDP_REVERSE).unwrap();
        assert!(r.reverse);
        assert_eq!(r.intervals.len(), 20);
    }

    #[test]
    fn udp_loss_counts_bytes() {
        let r = IperfReport::parse(UDP_LOSS).unwrap();
        assert_eq!((r.sent_bytes, r.received_bytes), (4_998_000, 2_494_800));
        assert!(close(
            r.lost_percent().unwrap(),
            100.0 * (1.0 - 2_494_800.0 / 4_998_000.0)
        ));
        assert_eq!((r.packets, r.lost_packets), (Some(3570), Some(1788)));
        assert!(close(r.received_bps, 9_784_795.679_440_87));
        // Receiver intervals (the server's) show the shaped rate, not the offered one.
        assert!(r.worst_interval_bps(1.0).unwrap() < 11e6);
    }

    #[test]
    fn worst_and_steady_skip_the_first_second() {
        let r = IperfReport::parse(TCP).unwrap();
        let worst = r.worst_interval_bps(1.0).unwrap();
        let late_max = r.intervals[10..]
            .iter()
            .map(|i| i.bits_per_second)
            .fold(0.0, f64::max);
        assert!(close(worst, late_max));
        let mean = r.mean_after_bps(1.0).unwrap();
        assert!(mean <= worst && mean > 0.0);
        assert_eq!(r.worst_interval_bps(100.0), None);
        assert_eq!(r.mean_after_bps(100.0), None);
    }

    #[test]
    fn errors_come_back_as_iperf_errors() {
        let e = IperfReport::parse(r#"{"start":{},"intervals":[],"end":{},"error":"unable to connect to server: Connection refused"}"#)
            .unwrap_err();
        assert!(
            matches!(e, Error::Iperf(ref m) if m.contains("Connection refused")),
            "{e}"
        );
        let e = IperfReport::parse("not json").unwrap_err();
        assert!(e.to_string().contains("iperf3 JSON"), "{e}");
    }

    #[test]
    fn goodput_to_l3() {
        // 1448 payload bytes travel in 1500-byte packets.
        assert!(close(L3::TCP_V4.l3_bps(1448.0), 1500.0));
        assert!(close(L3::TCP_V6.l3_bps(1428.0), 1500.0));
        assert!(close(L3::udp_v4(1400).l3_bps(1400.0), 1428.0));
        assert!(close(L3::udp_v6(1400).l3_bps(1400.0), 1448.0));
    }

    #[test]
    fn client_args_split_udp_rate_over_flows() {
        let mut o = ClientOptions::new("198.18.0.2".parse().unwrap());
        o.traffic = Traffic::Udp {
            rate: 200_000_000,
            len: 1400,
        };
        o.flows = 8;
        o.reverse = true;
        let a: Vec<String> = o.args().into_iter().map(|s| s.into_string().unwrap()).collect();
        let joined = a.join(" ");
        assert!(joined.contains("-u -b 25000000 -l 1400"), "{joined}");
        assert!(joined.contains("-P 8 -R"), "{joined}");
        o.traffic = Traffic::Tcp {
            congestion: Some("bbr".into()),
        };
        let a: Vec<String> = o.args().into_iter().map(|s| s.into_string().unwrap()).collect();
        assert!(a.ends_with(&["-C".to_string(), "bbr".to_string()]), "{a:?}");
    }
}
