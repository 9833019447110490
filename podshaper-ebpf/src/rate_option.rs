//! Tests of the rate option's encoding and the ACK window check (bpf/rate_option.h), compiled
//! for the host by build.rs: the very functions the sock_ops programs run.
#![cfg(test)]

mod ffi {
    #[link(name = "ps_controller", kind = "static")]
    extern "C" {
        pub fn psh_opt_encode(bytes_per_sec: u64) -> u32;
        pub fn psh_opt_none() -> u32;
        pub fn psh_opt_decode(value: u32, bytes_per_sec: *mut u64) -> i32;
        pub fn psh_ack_in_window(ack: u32, snd_una: u32, snd_nxt: u32) -> i32;
    }
}

const BAD: i32 = 0;
const RATE: i32 = 1;
const LIFTED: i32 = 2;

// SAFETY (all wrappers): pure functions of their arguments.
fn encode(bytes_per_sec: u64) -> u32 {
    unsafe { ffi::psh_opt_encode(bytes_per_sec) }
}

fn decode(value: u32) -> (i32, u64) {
    let mut rate = 0;
    let what = unsafe { ffi::psh_opt_decode(value, &mut rate) };
    (what, rate)
}

fn in_window(ack: u32, una: u32, nxt: u32) -> bool {
    unsafe { ffi::psh_ack_in_window(ack, una, nxt) != 0 }
}

#[test]
fn a_rate_survives_the_option_rounded_up_to_a_kbit() {
    // 10 Mbit/s = 1.25 MB/s: exact in kbit/s.
    assert_eq!(encode(1_250_000), 0x1000_0000 | 10_000);
    assert_eq!(decode(encode(1_250_000)), (RATE, 1_250_000));
    // 1 byte/s rounds up to 1 kbit/s (125 bytes/s), never to 0.
    assert_eq!(decode(encode(1)), (RATE, 125));
    assert_eq!(decode(encode(0)), (RATE, 125));
    // 1 Pbit/s is clamped to the option's ceiling, 268 Gbit/s, not wrapped.
    let (what, rate) = decode(encode(125_000_000_000_000));
    assert_eq!(what, RATE);
    assert_eq!(rate, 0x0fff_fffe * 125);
    for bps in [1_000u64, 999_999, 34_000_000_000] {
        let (what, rate) = decode(encode(bps / 8));
        assert_eq!(what, RATE);
        let back = rate * 8;
        assert!(back >= bps / 8 * 8 && back < bps + 1000, "{bps} -> {back}");
    }
}

#[test]
fn no_limit_another_version_and_zero_are_told_apart() {
    assert_eq!(unsafe { ffi::psh_opt_none() }, 0x1fff_ffff);
    assert_eq!(decode(0x1fff_ffff).0, LIFTED);
    // Version 2 (a future format) and version 0 are not ours to read.
    assert_eq!(decode(0x2000_0001).0, BAD);
    assert_eq!(decode(0x0000_0001).0, BAD);
    // A zero rate is malformed: no receiver sends it.
    assert_eq!(decode(0x1000_0000).0, BAD);
}

#[test]
fn only_acks_of_data_in_flight_count() {
    assert!(in_window(100, 100, 200));
    assert!(in_window(200, 100, 200));
    assert!(in_window(150, 100, 200));
    assert!(!in_window(99, 100, 200));
    assert!(!in_window(201, 100, 200));
    // Across the wrap of sequence space.
    assert!(in_window(5, u32::MAX - 10, 20));
    assert!(!in_window(u32::MAX - 11, u32::MAX - 10, 20));
    assert!(!in_window(21, u32::MAX - 10, 20));
}
