#!/usr/bin/env python3
"""How much does running a lesson through cnikit cost, compared with the same commands
as a plain shell script? For each lesson in stages/ (01 to 07d), the baseline "plain sh" is
the lesson's own `--dry-run` output (every command it runs, checks included: a POSIX sh
script that stops what it starts in the background itself) executed by sh in a fresh
sandbox; the lesson is `python3 stages/NN.py -q` (it enters its own sandbox). Runs
alternate, medians are compared; target: ratio <= 1.5.

    sudo python3 bench/lessons.py              # 5 runs of each, all lessons
    sudo python3 bench/lessons.py -n 9 03 07b  # more runs, some lessons
"""
import argparse
import glob
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = os.path.join(ROOT, "stages")
sys.path.insert(0, ROOT)
import cnikit  # noqa: E402  (its sandbox's private directories)
TARGET = 1.5
BASELINE = "plain sh"
# The same kind of sandbox the lessons make for themselves, in shell: a new network and
# mount namespace with a private, empty /run/netns and CNI directories (lesson 07's script
# installs a plugin and a config: they must land in the sandbox, never on the host).
_PRIVATE = " ".join(("/run/netns",) + cnikit.SANDBOX_DIRS)
SANDBOX = ["unshare", "--net", "--mount", "--propagation", "private", "sh", "-c",
           f'for d in {_PRIVATE}; do mkdir -p "$d" && mount -t tmpfs tmpfs "$d" || exit 1; done; '
           'ip link set lo up && exec sh "$0"']


def lessons(wanted):
    paths = sorted(glob.glob(os.path.join(STAGES, "0[0-9]*_*.py")))  # 05b and 07b-07f too
    return [p for p in paths if not wanted or os.path.basename(p).split("_")[0] in wanted]


def sh_script(path):
    """The lesson as a plain sh script: its dry run, which lists every command."""
    proc = subprocess.run([sys.executable, path, "--dry-run", "--color", "never"], capture_output=True,
                          text=True, check=True)
    return proc.stdout


def timed(argv, env=None):
    started = time.perf_counter()
    subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    return time.perf_counter() - started


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("only", nargs="*", metavar="NN", help="lesson numbers, e.g. 03 07b (default: all)")
    p.add_argument("-n", "--runs", type=int, default=5, help="runs of each, alternating (default 5)")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench: the lessons build namespaces (in sandboxes) and need root: sudo", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # Python's compiled bytecode is cached as on any machine that ran a lesson once
        # (here in a temporary directory, even where PYTHONDONTWRITEBYTECODE is set).
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPYCACHEPREFIX"] = os.path.join(tmp, "pycache")
        for path in lessons(args.only):
            name = os.path.basename(path)[:-3]
            script = os.path.join(tmp, name + ".sh")
            with open(script, "w") as f:
                f.write(sh_script(path))
            lesson = [sys.executable, path, "-q", "--color", "never"]
            timed(lesson, env)                  # warm-up: bytecode cache, page cache
            ours, theirs = [], []
            for _ in range(args.runs):          # alternate, so a noisy moment hits both sides
                ours.append(timed(lesson, env))
                theirs.append(timed(SANDBOX + [script]))
            rows.append((name, statistics.median(ours), statistics.median(theirs)))
    print(f"{'lesson':<11} {'cnikit (s)':>10} {BASELINE + ' (s)':>15} {'ratio':>6}")
    for name, ours, theirs in rows:
        print(f"{name:<11} {ours:>10.3f} {theirs:>15.3f} {ours / theirs:>6.2f}")
    total_ours, total_theirs = sum(r[1] for r in rows), sum(r[2] for r in rows)
    ratio = total_ours / total_theirs
    print(f"{'all':<11} {total_ours:>10.3f} {total_theirs:>15.3f} {ratio:>6.2f}   "
          f"(medians of {args.runs} alternating runs; target <= {TARGET} x {BASELINE})")
    return 0 if ratio <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
