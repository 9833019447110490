#!/usr/bin/env python3
"""Trims an iperf3 --json report to the fields IperfReport::parse reads (see README.md)."""
import json
import sys


def trim(d):
    out = {}
    if "error" in d:
        out["error"] = d["error"]
    ts = d.get("start", {}).get("test_start", {})
    out["start"] = {"version": d.get("start", {}).get("version"),
                    "test_start": {k: ts[k] for k in ("protocol", "num_streams", "duration", "reverse") if k in ts}}
    out["intervals"] = [{"sum": i["sum"]} for i in d.get("intervals", [])]
    end = d.get("end", {})
    out["end"] = {k: end[k] for k in ("sum_sent", "sum_received", "sum", "sender_tcp_congestion",
                                       "receiver_tcp_congestion") if k in end}
    if "server_output_json" in d:
        out["server_output_json"] = trim(d["server_output_json"])
    return out


json.dump(trim(json.load(sys.stdin)), sys.stdout, indent=1)
sys.stdout.write("\n")
