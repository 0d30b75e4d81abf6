#!/usr/bin/env python3
"""What each path costs on this machine: lesson 08 (stages/08_cost.py --json) measures every
path in one run, in its own sandbox; this prints its numbers as the Markdown table that
docs/lessons.md records. Every ratio is against the plain veth measured in the same run, so
a busy moment slows the baseline too; with -n N, each ratio is the median of N runs.

    sudo python3 bench/paths.py            # one run: the table for docs/lessons.md
    sudo python3 bench/paths.py -n 3       # medians of 3 runs
    sudo python3 bench/paths.py --json     # the lesson's JSON of every run, as a list
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LESSON = os.path.join(ROOT, "stages", "08_cost.py")
TIMEOUT = 300
# column header -> (the lesson's key, the relative key, how to print it)
COLUMNS = (("TCP", "bits_per_second", "throughput", lambda v: f"{v / 1e9:.2f} Gbit/s"),
           ("ping avg", "rtt_avg_ms", "rtt", lambda v: f"{v:.3f} ms"),
           ("TCP connect", "connect_ms", "connect", lambda v: f"{v:.3f} ms"))


def run_lesson():
    """One run of lesson 08: its JSON (it raises on a lesson that could not measure)."""
    proc = subprocess.run([sys.executable, LESSON, "--json"], capture_output=True, text=True, timeout=TIMEOUT,
                          stdin=subprocess.DEVNULL)
    if not proc.stdout.strip():
        raise RuntimeError("lesson 08 measured nothing: " + (proc.stderr.strip().splitlines() or ["?"])[-1])
    return json.loads(proc.stdout)


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def markdown(runs, when=None):
    """The table: one row per path, the median over RUNS of each value and of each ratio to the veth."""
    keys = [p["key"] for p in runs[0]["paths"]]
    rows = {key: [next(p for p in run["paths"] if p["key"] == key) for run in runs] for key in keys}
    head = ["path"] + [h for c in COLUMNS for h in (c[0], "x veth")] + ["retransmits", "full-size frames"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in keys:
        ps = rows[key]
        cells = [ps[0]["label"]]
        for _, field, rel, fmt in COLUMNS:
            value, ratio = _median(p[field] for p in ps), _median(p["relative"][rel] for p in ps)
            cells += [fmt(value) if value else "nothing", f"{ratio:.2f}" if ratio else "-"]
        cells += [f"{_median(p['retransmits'] for p in ps):g}",
                  f"{ps[-1]['full_received']}/{ps[-1]['full_sent']} of {ps[-1]['full_size']} bytes"]
        lines.append("| " + " | ".join(cells) + " |")
    what = "one run" if len(runs) == 1 else f"medians of {len(runs)} runs"
    lines.append("")
    lines.append(f"Relative numbers, {what} of `sudo python3 bench/paths.py`"
                 + (f" on {when}" if when else "") + f" ({os.cpu_count()} CPUs, kernel {platform.release()}, a "
                 "machine shared with other work): read the `x veth` columns, not the absolute values."
                 + ("" if runs[0].get("netem") else " This kernel has no netem: no delay row, and the loss "
                    "comes from iptables' statistic match."))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--runs", type=int, default=1, help="runs of the lesson (default 1)")
    p.add_argument("--json", action="store_true", help="print the lesson's JSON of every run instead")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs needs 1 or more")
    if os.geteuid() != 0:
        print("bench: lesson 08 builds namespaces (in a sandbox) and needs root: sudo", file=sys.stderr)
        return 2
    try:
        runs = [run_lesson() for _ in range(args.runs)]
    except (RuntimeError, ValueError, subprocess.TimeoutExpired) as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    print(json.dumps(runs, indent=2) if args.json else markdown(runs, time.strftime("%Y-%m-%d")))
    return 0 if all(run.get("passed") for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
