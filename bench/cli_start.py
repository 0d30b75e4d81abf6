#!/usr/bin/env python3
"""How fast the CLI answers: `cnikit netns list` in each form a script can call it, against the
bare interpreter measured in the same rounds.

    sudo /usr/bin/python3 bench/cli_start.py [--rounds 30] [--builder PYTHON] [--json]

Runs in a sandbox with no namespaces (cnikit.enter_sandbox: a fresh network + mount
namespace, an empty /run/netns), so every form does the same work and prints nothing. Each
round runs every form once, in an order that rotates from round to round; each row is the
median of its rounds (whole-process wall time, started by this process) and its ratio to
the floor measured in the same rounds:

  floor        /usr/bin/python3 -I -S -c pass: the interpreter's own start
  site         /usr/bin/python3 -c pass: plus `site` (this machine's .pth files and
               sitecustomize), which -m and the entry point pay too
  script       /usr/bin/python3 cnikit.py netns list: Python compiles a script on every run
               (a script's bytecode is never cached)
  -m           /usr/bin/python3 -m cnikit netns list, from a copy whose bytecode this bench
               compiles first (py_compile): -m reads a cached .pyc but, with
               PYTHONDONTWRITEBYTECODE set (as on some machines), never writes one
  entry point  `cnikit netns list` as `pip install .` puts it in a fresh venv of
               /usr/bin/python3 (pip compiles the bytecode); the wheel is built offline by
               a Python that has setuptools: --builder, else the checkout's .venv
  ip           ip netns list, for scale

Issue #21's target: -m and the entry point answer in <= 3x the floor (2026-12-05, 2 CPUs
shared, two runs of 30 rounds: -m 2.36-2.74x, the entry point 2.45-2.56x). The interpreter's
`site` (the .pth files of this machine) is part of what they pay; the runner starts processes
with os.posix_spawnp, not the subprocess module (6-10 ms of imports). The -X importtime line
at the end says where a form's imports go.
"""
import argparse
import json
import os
import py_compile
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PYTHON = "/usr/bin/python3"
FLOOR = "floor"
TARGET = 3.0
COMMAND = ["netns", "list"]
TARGETED = ("-m", "entry point")
LABELS = {FLOOR: "python3 -I -S -c pass (floor)", "site": "python3 -c pass (site, for scale)", "script": "python3 cnikit.py netns list (script)",
          "-m": "python3 -m cnikit netns list", "entry point": "cnikit netns list (pip entry point)",
          "ip": "ip netns list (for scale)"}


def builder(given):
    """A Python that can build the wheel offline (has setuptools), or None."""
    for python in [given] if given else [os.path.join(ROOT, ".venv", "bin", "python"), sys.executable, PYTHON]:
        if python and os.path.exists(python) and subprocess.run(
                [python, "-c", "import setuptools"], capture_output=True).returncode == 0:
            return python
    return None


def run(argv, **kw):
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, **kw)
    if proc.returncode != 0:
        sys.exit(f"cli_start: {' '.join(argv)} failed: {proc.stderr.strip()[-500:]}")
    return proc


def forms(work, build_with):
    """{form: (argv, cwd)}: what each row runs."""
    copy = os.path.join(work, "m")
    os.makedirs(copy)
    shutil.copy(os.path.join(ROOT, "cnikit.py"), copy)
    py_compile.compile(os.path.join(copy, "cnikit.py"), doraise=True)      # what -m reads; it writes none
    out = {FLOOR: ([PYTHON, "-I", "-S", "-c", "pass"], None), "site": ([PYTHON, "-c", "pass"], None),
           "script": ([PYTHON, os.path.join(ROOT, "cnikit.py")] + COMMAND, None),
           "-m": ([PYTHON, "-m", "cnikit"] + COMMAND, copy)}
    if build_with:
        src = os.path.join(work, "src")
        os.makedirs(os.path.join(src, "plugins"))
        for name in ("cnikit.py", "pyproject.toml", "README.md"):
            shutil.copy(os.path.join(ROOT, name), src)
        shutil.copy(os.path.join(ROOT, "plugins", "cni-bash-compatible.py"), os.path.join(src, "plugins"))
        run([build_with, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
             "-w", os.path.join(work, "wheel"), src])
        venv = os.path.join(work, "venv")
        run([PYTHON, "-m", "venv", "--without-pip", venv])
        wheels = [os.path.join(work, "wheel", w) for w in os.listdir(os.path.join(work, "wheel"))]
        run([PYTHON, "-m", "pip", "--python", os.path.join(venv, "bin", "python"), "install", "-q", "--no-deps",
             "--no-index", *wheels])
        out["entry point"] = ([os.path.join(venv, "bin", "cnikit")] + COMMAND, "/")
    out["ip"] = (["ip"] + COMMAND, None)
    return out


def measure(who, rounds):
    """{form: [seconds per round]}, the forms run in a rotating order each round."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    names, times = list(who), {name: [] for name in who}
    for _ in range(2):                                  # warm the page cache; not counted
        for argv, cwd in who.values():
            run(argv, cwd=cwd, env=env)
    for i in range(rounds):
        for name in names[i % len(names):] + names[:i % len(names)]:
            argv, cwd = who[name]
            start = time.perf_counter()
            proc = subprocess.run(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            times[name].append(time.perf_counter() - start)
            if proc.returncode != 0:
                sys.exit(f"cli_start: {' '.join(argv)} failed: {proc.stderr.decode().strip()[-500:]}")
    return times


def heaviest_imports(argv, cwd, top=6):
    """The imports that cost a form most (self time, -X importtime), as 'name ms' words."""
    proc = subprocess.run([argv[0], "-X", "importtime"] + argv[1:], cwd=cwd, capture_output=True, text=True)
    rows = []
    for line in proc.stderr.splitlines():
        parts = line.split("|")
        if line.startswith("import time:") and parts[0].split()[-1].isdigit():
            rows.append((int(parts[0].split()[-1]), parts[2].strip()))
    return ", ".join(f"{name} {us / 1000:.1f}" for us, name in sorted(rows, reverse=True)[:top])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30, help="rounds, each running every form once (default 30)")
    ap.add_argument("--builder", help="a Python with setuptools to build the wheel (default: the checkout's .venv)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = ap.parse_args()
    if not 1 <= args.rounds <= 1000:
        ap.error("--rounds 1-1000")
    if os.geteuid() != 0:
        sys.exit("needs root (it measures in a sandbox of its own): sudo /usr/bin/python3 bench/cli_start.py")
    sys.path.insert(0, ROOT)
    import cnikit
    cnikit.enter_sandbox()          # no namespaces here: every form lists none
    work = tempfile.mkdtemp(prefix="cli-start-")
    try:
        build_with = builder(args.builder)
        who = forms(work, build_with)
        times = measure(who, args.rounds)
        imports = heaviest_imports(*who["-m"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {name: statistics.median(t) * 1000 for name, t in times.items()}
    floor = med[FLOOR]
    version = run([PYTHON, "-c", "import sys; print(sys.version.split()[0])"]).stdout.strip()
    print(f"# cli_start {time.strftime('%Y-%m-%d %H:%M')}: `cnikit netns list` in a sandbox with no namespaces, "
          f"median of {args.rounds} interleaved rounds; {PYTHON} {version}; {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"# PYTHONDONTWRITEBYTECODE={os.environ.get('PYTHONDONTWRITEBYTECODE', '')!s}: -m runs a copy whose "
          "bytecode this bench compiled first (py_compile); the entry point's was compiled by pip")
    if not build_with:
        print("# entry point: not measured (no Python with setuptools to build the wheel offline: --builder)")
    print(f"\n{'form':40s} {'median ms':>9s} {'x floor':>8s}")
    for name in who:
        print(f"{LABELS[name]:40s} {med[name]:9.1f} {med[name] / floor:8.2f}")
    print()
    for name in TARGETED:
        if name in med:
            ratio = med[name] / floor
            verdict = "meets the target" if ratio <= TARGET else "MISSES the target"
            print(f"{LABELS[name]} <= {TARGET:.0f}x floor: {ratio:.2f}x, {verdict}")
    print(f"# heaviest imports of python3 -m cnikit netns list (self ms, one run): {imports}")
    if args.json:
        print(json.dumps({"median_ms": med, "ratio": {n: m / floor for n, m in med.items()}, "rounds": args.rounds}))


if __name__ == "__main__":
    main()
