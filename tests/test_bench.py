"""The benchmarks' own measuring tools measure what they say: peak RSS is the call's (not
the bench process's, which wait4's ru_maxrss would add), helpers the call starts count, and
bench/cni_latency.py runs end to end and prints every target row with a verdict (a short
run: the numbers themselves belong to the bench, not to a timed test)."""
import importlib.util
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench", "cni_latency.py")
PY = "/usr/bin/python3"
MIB = 1024 * 1024


def load_bench():
    spec = importlib.util.spec_from_file_location("cni_latency", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_peak_rss_is_the_calls_own_and_follows_its_children(tmp_path):
    bench = load_bench()
    ballast = bytearray(120 * MIB)            # a big bench process: wait4 would report >= 120 MiB for all
    ballast[::4096] = b"x" * len(ballast[::4096])
    small, _ = bench.peak_rss(["/bin/true"], b"", {}, str(tmp_path))
    assert small < 20, small
    big, out = bench.peak_rss([PY, "-c", f"b = bytearray({60 * MIB}); b[::4096] = b'x' * len(b[::4096]); print('ok')"],
                              b"", {}, str(tmp_path))
    assert out == b"ok\n" and 60 <= big < 110, big
    # a helper started by the call (as iptables-restore by the plugin) counts too
    child, _ = bench.peak_rss(["/bin/sh", "-c", f"{PY} -c \"b = bytearray({60 * MIB}); b[::4096] = b'x' * len(b[::4096])\"; true"],
                              b"", {}, str(tmp_path))
    assert 60 <= child < 110, child
    del ballast


def test_cni_latency_runs_and_prints_every_target_with_a_verdict():
    proc = subprocess.run([PY, BENCH, "--rounds", "1", "--rss-rounds", "1", "--pods", "3", "--scale-samples", "1",
                           "--parallel", "2", "--parallel-rounds", "1", "--dad-rounds", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    for row in ("ADD+DEL classic", "ADD+DEL minimal", "DEL-rm (no netns, no prevResult) classic", "VERSION classic",
                "ADD with 3 pods on the bridge", "2 ADDs in parallel", "ADD with DAD (enabledad), dual-stack"):
        line = next((l for l in out.splitlines() if l.startswith(row)), None)
        assert line and ("meets the target" in line or "MISSES the target" in line), (row, out)
    assert "peak RSS per call" in out and "python3 -I -S -c pass" in out
    assert "Traceback" not in proc.stderr


def test_cni_contention_runs_and_prints_both_targets_with_a_verdict():
    proc = subprocess.run([PY, os.path.join(ROOT, "bench", "cni_contention.py"), "--pods", "3", "--rounds", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for row in ("3 ADDs at once", "3 DELs at once"):
        line = next((l for l in proc.stdout.splitlines() if l.startswith(row)), None)
        assert line and ("meets the target" in line or "MISSES the target" in line), (row, proc.stdout)
    assert "reference" in proc.stdout and "installed" in proc.stdout and "Traceback" not in proc.stderr
    # the floor under the same contention: each contender's VERSION and the bare interpreter start, as numbers
    for row in ("floor reference VERSION", "floor installed VERSION", "floor python3 -I -S start",
                "ADD above floor reference", "ADD above floor installed"):
        line = next((l for l in proc.stdout.splitlines() if l.startswith(row)), None)
        assert line, (row, proc.stdout)
        ms = float(line[len(row):])
        assert ms > 0 or row.startswith("ADD above"), (row, proc.stdout)   # a start takes time; ADD may sit below


def test_cli_start_runs_and_prints_each_form_with_its_ratio_and_both_targets_with_a_verdict():
    proc = subprocess.run([PY, os.path.join(ROOT, "bench", "cli_start.py"), "--rounds", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    for form in ("python3 -I -S -c pass (floor)", "python3 cnikit.py netns list (script)",
                 "python3 -m cnikit netns list", "cnikit netns list (pip entry point)", "ip netns list (for scale)"):
        line = next((l for l in lines if l.startswith(form + " ")), None)
        assert line, (form, proc.stdout)
        ms, ratio = map(float, line[len(form):].split())
        assert ms > 0 and ratio > 0, line
    for target in ("python3 -m cnikit netns list <= 3x floor", "cnikit netns list (pip entry point) <= 3x floor"):
        line = next((l for l in lines if l.startswith(target)), None)
        assert line and ("meets the target" in line or "MISSES the target" in line), (target, proc.stdout)
    assert "Traceback" not in proc.stderr
