"""Lesson 08 (what each path costs): every path measured in one run PASSes in its sandbox, the
numbers come out as a table, bar charts and --json, each --skip makes its named proof FAIL,
and nothing is left behind; bench/paths.py turns a run into the table docs/lessons.md
records. Its dry run replaying under `dash -e` is tests/test_dryrun_dash.py's
(it takes every lesson in stages/).

No test compares a speed with a number: the machine is shared. What is asserted is what the
lesson controls: data crosses every path it built, the MTU mismatch drops full-size frames,
the underlay's loss shows as retransmits, and the relative columns are the ratios of the
measured ones.
"""
import importlib.util
import io
import json
import math
import os

import pytest

from kernel import ROOT, load_file, run_stage

STAGE = "08_cost.py"
TIMEOUT = 120
PATHS = ["veth", "bridge", "nat", "routed", "vxlan", "mtu", "loss"]


def load():
    return load_file(os.path.join(ROOT, "stages", STAGE), "lesson_08")


def as_json(*args):
    """The lesson with --json: (exit code, the JSON on stdout, stderr)."""
    proc = run_stage(STAGE, "--json", *args, timeout=TIMEOUT)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.returncode, json.loads(proc.stdout), proc.stderr


def verdict(err):
    """The lesson's PASS/FAIL line (with --json it goes to stderr)."""
    return next((l for l in reversed(err.splitlines()) if l.startswith(("PASS lesson", "FAIL lesson"))), "")


def test_every_path_is_measured_in_one_run_relative_to_the_veth_and_printed_as_a_table_and_charts():
    """Driven in this test's sandbox (one run of the lesson serves both): every path measured,
    the numbers as --json gives them (RESULTS, through JSON), and what it printed is what it
    measured. --json on the command line is the skip tests' (below); that a run in its own
    sandbox leaves nothing is the framework's (tests/test_stages.py, every lesson --host in
    tests/test_host_profiles.py)."""
    mod = load()
    out = io.StringIO()
    L = mod.LESSON.start(out=out, color=False)
    try:
        mod.build(L)
        mod.verify(L)
    finally:
        L.r.stop_all()
    assert L.passed(), L.checks
    data = json.loads(json.dumps(mod.RESULTS))
    assert data["passed"] is True and data["relative_to"] == "veth"
    paths = {p["key"]: p for p in data["paths"]}
    expected = PATHS + (["delay"] if data["netem"] else [])
    assert list(paths) == expected
    base = paths["veth"]
    for key, p in paths.items():
        assert p["bytes"] > 0 and p["bits_per_second"] > 0, p
        assert p["pings_received"] > 0 and p["connect_ms"] > 0, p
        rel = p["relative"]
        assert math.isclose(rel["throughput"], p["bits_per_second"] / base["bits_per_second"])
        assert math.isclose(rel["rtt"], p["rtt_avg_ms"] / base["rtt_avg_ms"])
        assert math.isclose(rel["connect"], p["connect_ms"] / base["connect_ms"])
    # the mismatch: a full-size frame at the sender's MTU never arrives; the matched overlay's do
    assert paths["mtu"]["full_size"] == 1500 and paths["mtu"]["full_received"] == 0
    assert paths["vxlan"]["full_size"] == 1450 and paths["vxlan"]["full_received"] > 0
    assert paths["loss"]["retransmits"] > paths["vxlan"]["retransmits"]
    if data["netem"]:
        assert paths["delay"]["rtt_min_ms"] >= 20
    else:         # no netem in this kernel: the delay is not measured, and the verdict says so
        assert "20 ms of underlay delay (this kernel has no netem)" in L.unchecked
    assert all(c["ok"] for c in data["checks"]) and len(data["checks"]) >= len(expected) + 3
    # bench/paths.py's table for docs/lessons.md, from this very run: a row per path, its ratios
    table = load_bench().markdown([data]).splitlines()
    for key, p in paths.items():
        row = next(l for l in table if l.startswith(f"| {p['label']} |")).split(" | ")
        assert row[2] == f"{p['relative']['throughput']:.2f}" and row[4] == f"{p['relative']['rtt']:.2f}", row
    assert "one run" in table[-1] and "Relative numbers" in table[-1]
    # what it printed: a table row per path with its numbers, three bar charts
    text = out.getvalue()
    table = text[text.index("# what each path costs"):]
    for p in paths.values():
        line = next(l for l in table.splitlines() if l.startswith(f"# {p['label']} "))
        assert f"{p['bits_per_second'] / 1e9:.2f} Gbit/s" in line and f"{p['rtt_avg_ms']:.3f} ms" in line
        assert line.endswith(f"{p['full_received']}/{p['full_sent']}")
    charts = table.split("TCP throughput, relative to the plain veth")[1]
    for key in paths:       # one bar per path in each of the three charts
        assert sum(1 for l in charts.splitlines() if l.startswith(f"#   {key} ")) == 3, key
    veth_bar = next(l for l in charts.splitlines() if l.startswith("#   veth "))
    assert "1.00x" in veth_bar and "#" in veth_bar[10:]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_paths", os.path.join(ROOT, "bench", "paths.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("step,proof", [
    ("nat", "ns1 -> internet, NAT: TCP data, pings and connects go through"),
    ("fdb", "pod1 -> pod2, VXLAN: TCP data, pings and connects go through"),
    ("loss", "2% loss on the underlay shows as retransmits"),
])
def test_each_skip_makes_its_named_proof_fail(step, proof):
    code, data, err = as_json("--skip", step)
    assert code == 1
    assert verdict(err).startswith("FAIL lesson 08 cost") and proof in verdict(err), err[-3000:]
    failed = [c["what"] for c in data["checks"] if not c["ok"]]
    assert any(what.startswith(proof) for what in failed), failed
    if step == "nat":       # only the NAT path broke
        assert [p["key"] for p in data["paths"] if p["bytes"] == 0] == ["nat"]


def test_json_with_a_dry_run_is_refused_in_one_line():
    proc = run_stage(STAGE, "--json", "--dry-run", timeout=TIMEOUT)
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and "--json" in proc.stderr


def test_netem_argv_where_the_kernel_has_it_and_iptables_where_it_does_not():
    """The loss and delay steps as argv (pure): netem on node1's underlay, or the same share of
    VXLAN datagrams dropped by iptables, each undone by its own inverse."""
    mod = load()
    (add,), (delete,) = mod.underlay_loss(True)
    assert add[-6:] == ["dev", "eth0", "root", "netem", "loss", "2%"] and delete[-4:] == ["del", "dev", "eth0", "root"]
    (add,), (delete,) = mod.underlay_loss(False)
    i, j = add.index("-A"), delete.index("-D")
    assert add[:i] == delete[:j] and add[i + 1:] == delete[j + 1:] and "4789" in add and "DROP" in add
    (add,), _ = mod.underlay_delay()
    assert add[-3:] == ["netem", "delay", "20ms"] and add[:4] == ["ip", "netns", "exec", "node1"]
