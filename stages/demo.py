#!/usr/bin/env python3
"""Run every lesson (stages/0*.py, 05b and 07b-07d included) and every pitfall lab
(stages/2N_pitfall_*.py) end to end, each in its own sandbox, and end with a table:
lesson, PASS/FAIL, seconds. Exit 1 if any lesson failed.

    sudo python3 stages/demo.py            # all lessons, each one's output as it runs
    sudo python3 stages/demo.py 03 05 21   # only these (21: a pitfall lab; 05: 05 and 05b)
    sudo python3 stages/demo.py 05b        # only lesson 05b
    sudo python3 stages/demo.py -q         # only the table (and the end of a failed lesson)
"""
import argparse
import glob
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TAIL = 25            # lines of a failed lesson's output shown under the table
LESSON_TIMEOUT = 120


def lessons(wanted=()):
    """The lessons (0N_*.py, 05b and 07b-07d), then the pitfall labs (NN_pitfall_*.py). WANTED
    numbers select: "05" lesson 05 and 05b, "05b" only 05b."""
    found = sorted(glob.glob(os.path.join(HERE, "0[0-9]*_*.py"))) + \
        sorted(glob.glob(os.path.join(HERE, "[1-9][0-9]_pitfall_*.py")))
    if wanted:
        found = [path for path in found if os.path.basename(path)[:2] in wanted
                 or os.path.basename(path).split("_")[0] in wanted]
    return found


def run(path, quiet):
    """(passed, seconds, output) of one lesson, non-interactive, in its own sandbox. Unless
    QUIET the lesson talks to the terminal as it runs (colours included), and OUTPUT is ""."""
    started = time.monotonic()
    capture = {"capture_output": True, "text": True} if quiet else {}
    try:
        proc = subprocess.run([sys.executable, path] + (["--color", "never"] if quiet else []),
                              stdin=subprocess.DEVNULL, timeout=LESSON_TIMEOUT, **capture)
        output, ok = (proc.stdout + proc.stderr) if quiet else "", proc.returncode == 0
    except subprocess.TimeoutExpired:
        output, ok = f"timed out after {LESSON_TIMEOUT}s", False
    return ok, time.monotonic() - started, output


def main(argv=None):
    p = argparse.ArgumentParser(description="every lesson end to end in a sandbox, then a PASS/FAIL table")
    p.add_argument("only", nargs="*", metavar="NN", help="lesson numbers to run (default: all)")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="print only the table (and the end of a failed lesson's output)")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("demo: the lessons build real namespaces (in a sandbox) and need root: sudo make demo",
              file=sys.stderr)
        return 2
    paths = lessons(args.only)
    if not paths:
        print(f"demo: no lesson matches {' '.join(args.only)}", file=sys.stderr)
        return 2
    rows, failures = [], []
    for path in paths:
        name = os.path.basename(path)[:-3]
        print(f"# running {name} ...", flush=True)
        ok, seconds, output = run(path, args.quiet)
        rows.append((name, "PASS" if ok else "FAIL", f"{seconds:.1f}"))
        if not ok:
            failures.append((name, output))
    width = max(len(r[0]) for r in rows + [("lesson",)])
    print(f"\n{'lesson'.ljust(width)}  result  seconds")
    print(f"{'-' * width}  ------  -------")
    for name, result, seconds in rows:
        print(f"{name.ljust(width)}  {result:<6}  {seconds:>7}")
    total = sum(float(r[2]) for r in rows)
    print(f"{'total'.ljust(width)}  {len(rows) - len(failures)}/{len(rows)}     {total:>7.1f}")
    for name, output in failures:
        if output:
            print(f"\n# {name} failed; the end of its output:")
            print("\n".join(output.rstrip().splitlines()[-TAIL:]))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
