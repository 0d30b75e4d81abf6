#!/usr/bin/env python3
"""Run every lesson (stages/0*.py: 01-08 with 05b and 07b-07f) and every pitfall lab
(stages/2N_pitfall_*.py) end to end, each in its own sandbox, and end with a table:
lesson, PASS/FAIL, seconds. Exit 1 if any lesson failed.

    sudo python3 stages/demo.py            # all lessons, each one's output in order
    sudo python3 stages/demo.py 03 05 21   # only these (21: a pitfall lab; 05: 05 and 05b)
    sudo python3 stages/demo.py 05b        # only lesson 05b
    sudo python3 stages/demo.py -q         # only the table (and the end of a failed lesson)
    sudo python3 stages/demo.py -j 1       # one lesson at a time, its output as it runs

Lessons mostly wait (pings, listeners, the kernel), and each has a sandbox of its own, so
two run at once by default; each one's output is printed whole, in lesson order.
"""
import argparse
import glob
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
TAIL = 25            # lines of a failed lesson's output shown under the table
LESSON_TIMEOUT = 120


def lessons(wanted=()):
    """The lessons (0N_*.py, 05b and 07b-07f), then the pitfall labs (NN_pitfall_*.py). WANTED
    numbers select: "05" lesson 05 and 05b, "05b" only 05b."""
    found = sorted(glob.glob(os.path.join(HERE, "0[0-9]*_*.py"))) + \
        sorted(glob.glob(os.path.join(HERE, "[1-9][0-9]_pitfall_*.py")))
    if wanted:
        found = [path for path in found if os.path.basename(path)[:2] in wanted
                 or os.path.basename(path).split("_")[0] in wanted]
    return found


def run(path, capture, color):
    """(passed, seconds, output) of one lesson, non-interactive, in its own sandbox. Unless
    CAPTURE the lesson talks to the terminal as it runs, and OUTPUT is ""; COLOR keeps the
    colours of captured output meant for a terminal."""
    started = time.monotonic()
    how = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True} if capture else {}
    colors = [] if not capture else ["--color", "always" if color else "never"]
    try:
        proc = subprocess.run([sys.executable, path] + colors, stdin=subprocess.DEVNULL,
                              timeout=LESSON_TIMEOUT, **how)
        output, ok = proc.stdout if capture else "", proc.returncode == 0
    except subprocess.TimeoutExpired:
        output, ok = f"timed out after {LESSON_TIMEOUT}s", False
    return ok, time.monotonic() - started, output


def main(argv=None):
    p = argparse.ArgumentParser(description="every lesson end to end in a sandbox, then a PASS/FAIL table")
    p.add_argument("only", nargs="*", metavar="NN", help="lesson numbers to run (default: all)")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="print only the table (and the end of a failed lesson's output)")
    p.add_argument("-j", "--jobs", type=int, default=2, metavar="N",
                   help="lessons run at once, each in its own sandbox (default 2; 1: output as it runs)")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error("--jobs needs 1 or more")
    if os.geteuid() != 0:
        print("demo: the lessons build real namespaces (in a sandbox) and need root: sudo make demo",
              file=sys.stderr)
        return 2
    paths = lessons(args.only)
    if not paths:
        print(f"demo: no lesson matches {' '.join(args.only)}", file=sys.stderr)
        return 2
    rows, failures, started = [], [], time.monotonic()
    capture = args.quiet or args.jobs > 1
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        # Submitted in order, printed in order: each lesson's output whole, as soon as it and
        # those before it are done.
        runs = [(path, pool.submit(run, path, capture, sys.stdout.isatty())) for path in paths]
        for path, future in runs:
            name = os.path.basename(path)[:-3]
            print(f"# running {name} ...", flush=True)
            ok, seconds, output = future.result()
            if not args.quiet and output:
                print(output.rstrip("\n"), flush=True)
            rows.append((name, "PASS" if ok else "FAIL", f"{seconds:.1f}"))
            if not ok:
                failures.append((name, output))
    width = max(len(r[0]) for r in rows + [("lesson",)])
    print(f"\n{'lesson'.ljust(width)}  result  seconds")
    print(f"{'-' * width}  ------  -------")
    for name, result, seconds in rows:
        print(f"{name.ljust(width)}  {result:<6}  {seconds:>7}")
    total = time.monotonic() - started
    print(f"{'total'.ljust(width)}  {len(rows) - len(failures)}/{len(rows)}     {total:>7.1f}"
          + (f"  (wall clock, {args.jobs} at once)" if args.jobs > 1 else ""))
    for name, output in failures:
        if output and args.quiet:
            print(f"\n# {name} failed; the end of its output:")
            print("\n".join(output.rstrip().splitlines()[-TAIL:]))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
