"""The lessons in stages/: each one PASSes for real, each one FAILs when an essential
step is left out or broken (a verification that cannot fail is a defect), a dry run is
a shell script, --host leaves the host as it found it, and no lesson sends a packet
to an address it did not create.

Every test runs in the conftest sandbox; a lesson run as a subprocess enters its own
sandbox inside it (or, with --host, treats the test's sandbox as its host).
"""
import importlib.util
import ipaddress
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import sh

from host_state import host_state
from kernel import run_stage
from cnikit import nat_chain as cnikit_nat_chain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = os.path.join(ROOT, "stages")
LESSONS = {"01": "01_netns", "02": "02_veth", "03": "03_bridge", "04": "04_tcp",
           "05": "05_egress", "05b": "05b_ports", "06": "06_vxlan"}
# One essential step per lesson (two where the lesson has two distinct failure modes).
BREAKS = [("01", "lo-up"), ("02", "addr-ns1"), ("03", "master"), ("04", "listen"),
          ("05", "nat"), ("05", "route"), ("05b", "output"), ("06", "fdb"), ("06", "vxlan")]
TIMEOUT = 90


def lesson(number, *args, input=None, env=None):
    return run_stage(LESSONS[number] + ".py", *args, input=input, env=env, timeout=TIMEOUT)


def verdict(proc):
    lines = [l for l in proc.stdout.splitlines() if l.startswith(("PASS lesson", "FAIL lesson"))]
    return lines[-1] if lines else ""


def load(number):
    """Import a lesson script as a module (its name starts with a digit)."""
    sys.path.insert(0, STAGES)
    spec = importlib.util.spec_from_file_location(f"lesson_{number}", os.path.join(STAGES, LESSONS[number] + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- every lesson proves its goal

@pytest.mark.parametrize("number", sorted(LESSONS))
def test_lesson_passes_in_its_sandbox_and_leaves_nothing(number):
    before = host_state()
    proc = lesson(number)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    assert verdict(proc).startswith(f"PASS lesson {number}")
    out = proc.stdout
    assert "# goal: " in out and "# what this lesson builds:" in out      # the opening and its picture
    assert re.search(r"^# \[1\] \S", out, re.M)                           # a why before the first step
    assert "# check: " in out and "FAILED" not in out
    assert "what really exists now (cnikit show):" in out and "(netns)" in out
    assert "Traceback" not in proc.stderr
    assert host_state() == before          # the test's sandbox saw nothing: the lesson had its own


@pytest.mark.parametrize("number,step", BREAKS)
def test_leaving_out_an_essential_step_makes_the_lesson_fail(number, step):
    proc = lesson(number, "--skip", step)
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert verdict(proc).startswith(f"FAIL lesson {number}")
    assert f"skipped (--skip {step})" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_vxlan_device_down_on_one_node_makes_lesson_06_fail():
    """Drive lesson 06's own build() and verify() in this sandbox: it passes, then with
    node2's vxlan0 set down the very same verification reports the failure."""
    mod = load("06")
    L = mod.LESSON.start(quiet=True)
    try:
        mod.build(L)
        for node in ("node1", "node2"):     # the overlay MTU is the underlay's minus 50, pods included
            assert _mtu("vxlan0", node) == _mtu("eth0", node) - 50 == 1450
        assert _mtu("eth0", "pod1") == 1450
        mod.verify(L)
        assert L.passed(), L.checks
        sh.ip("-n", "node2", "link", "set", "dev", "vxlan0", "down")
        L.checks = []
        mod.verify(L)
        assert not L.passed()
        assert ("pod1 on node1 reaches 10.0.6.12 on node2", False) in L.checks
    finally:
        L.r.stop_all()


def test_lesson_01_fails_when_the_namespace_was_not_fresh():
    """Lesson 01's first checks are about a new namespace: one that already had a link, a
    lo that is up and a firewall rule must make the very same verification fail."""
    mod = load("01")
    sh.ip("netns", "add", "ns1")
    sh.ip("-n", "ns1", "link", "add", "stale0", "type", "bridge")
    sh.ip("-n", "ns1", "link", "set", "lo", "up")
    sh.ip("netns", "exec", "ns1", "iptables", "-A", "INPUT", "-j", "ACCEPT")
    L = mod.LESSON.start(quiet=True)
    try:
        L.play(mod.build, mod.verify)
    finally:
        L.r.stop_all()
    assert ("ns1 started with only lo, and lo was DOWN", False) in L.checks
    assert ("ns1 started with no firewall rules (default policies only)", False) in L.checks
    assert not L.passed()


def _mtu(dev, ns):
    return int(re.search(r"mtu (\d+)", str(sh.ip("-n", ns, "link", "show", "dev", dev))).group(1))


def test_lesson_06_halves_on_two_hosts_as_the_vagrant_vms_run_them():
    """Two 'machines' (namespaces joined by an underlay in 198.51.100.0/24); each runs
    `--role nodeN --peer IP` with host=None, as a real VM would; node1 then --verify."""
    for name, addr in (("hostA", "198.51.100.11/24"), ("hostB", "198.51.100.12/24")):
        sh.ip("netns", "add", name)
        sh.ip("-n", name, "link", "set", "lo", "up")
    sh.ip("-n", "hostA", "link", "add", "eth1", "type", "veth", "peer", "name", "eth1", "netns", "hostB")
    for name, addr in (("hostA", "198.51.100.11/24"), ("hostB", "198.51.100.12/24")):
        sh.ip("-n", name, "addr", "add", addr, "dev", "eth1")
        sh.ip("-n", name, "link", "set", "eth1", "up")

    def on(host, *args):
        # nsenter switches only the network namespace: /run/netns stays shared, as on a VM.
        return subprocess.run(["nsenter", f"--net=/run/netns/{host}", sys.executable,
                               os.path.join(STAGES, "06_vxlan.py"), "--color", "never", *args],
                              capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)

    half1 = on("hostA", "--role", "node1", "--peer", "198.51.100.12")
    assert half1.returncode == 0, half1.stdout[-2000:] + half1.stderr
    assert "this host is node1: underlay eth1, 198.51.100.11 -> peer 198.51.100.12" in half1.stdout
    half2 = on("hostB", "--role", "node2", "--peer", "198.51.100.11")
    assert half2.returncode == 0, half2.stdout[-2000:] + half2.stderr
    proof = on("hostA", "--role", "node1", "--peer", "198.51.100.12", "--verify")
    assert proof.returncode == 0, proof.stdout[-3000:]
    assert verdict(proof).startswith("PASS lesson 06 vxlan: pod1 on node1 (this host) reaches pod2 on node2 "
                                     "(198.51.100.12)")
    reverse = on("hostB", "--role", "node2", "--peer", "198.51.100.11", "--verify")    # named from node2's side
    assert verdict(reverse).startswith("PASS lesson 06 vxlan: pod2 on node2 (this host) reaches pod1 on node1"), \
        reverse.stdout[-2000:]
    assert "# check: the underlay carried pod2's ping inside UDP 4789" in reverse.stdout or "tcpdump" not in reverse.stdout
    assert on("hostA", "--role", "node1", "--peer", "198.51.100.12").returncode == 0   # re-run is fine
    down = on("hostB", "--role", "node2", "--peer", "198.51.100.11", "--down")
    assert down.returncode == 0
    assert "vxlan0" not in str(sh.ip("-n", "hostB", "link", "show"))
    failed = on("hostA", "--role", "node1", "--peer", "198.51.100.12", "--verify")
    assert failed.returncode == 1 and verdict(failed).startswith("FAIL lesson 06")


# ---------------------------------------------------------------- the modes

@pytest.mark.parametrize("number", sorted(LESSONS))
def test_dry_run_is_a_shell_script_with_the_checks_and_changes_nothing(number):
    before = host_state()
    proc = lesson(number, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout
    assert subprocess.run(["dash", "-n"], input=script, text=True).returncode == 0
    body = script.split("# verification: does the goal hold?")
    assert len(body) == 2 and re.search(r"^(ip|ping|bridge|conntrack|socat)\b", body[1], re.M)
    for line in script.splitlines():
        # a background job's PID ($!) is kept in a variable; the script's traps stop exactly those
        assert not line or line.startswith("#") or re.match(r"^job\d+=\$!$", line) or shlex.split(line)[0] in {
            "ip", "bridge", "iptables", "nft", "sysctl", "ping", "socat", "tcpdump", "conntrack", "ss", "kill",
            "trap", "timeout"}, line     # timeout: waiting for a listener on the host side (05b's userland proxy)
    assert not re.search(r"^(PASS|FAIL) lesson", script, re.M)      # nothing was verified
    assert host_state() == before


def _assigned_and_targets(script):
    """Addresses the script assigns (addr add, vxlan local, fdb dst, listeners) and
    the addresses it sends to (ping, socat TCP:)."""
    assigned, targets = set(), set()
    for line in script.splitlines():
        if line.startswith("#"):
            continue
        words = shlex.split(line)
        if words[-2:] == ["||", "true"]:          # a command the lesson shows failing
            words = words[:-2]
        for key in ("add", "local"):
            for i, w in enumerate(words[:-1]):
                if w == key and "/" in words[i + 1]:
                    assigned.add(words[i + 1].split("/")[0])
                if w == "local" and key == "local":
                    assigned.add(words[i + 1])
        if "ping" in words:
            targets.add(words[-1])
        for w in words:
            m = re.match(r"TCP:([\d.]+):\d+", w)
            if m:
                targets.add(m.group(1))
        if words[:3] == ["bridge", "fdb", "append"] or (words[:2] == ["bridge", "-n"] and "append" in words):
            targets.add(words[words.index("dst") + 1])
    return assigned, targets


@pytest.mark.noroot
@pytest.mark.parametrize("number", sorted(LESSONS))
def test_no_lesson_sends_a_packet_outside_what_it_created(number):
    script = lesson(number, "--dry-run").stdout
    assigned, targets = _assigned_and_targets(script)
    assert targets, "the lesson sends nothing: nothing to prove"
    for addr in targets:
        assert ipaddress.ip_address(addr).is_loopback or addr in assigned, f"{addr} is not the lesson's own"


def test_host_mode_says_what_it_changes_and_restores_everything():
    """--host on lesson 05 (iptables, ip_forward, links, namespaces) in this test's
    sandbox, which stands for the real host."""
    sh.sysctl("-w", "net.ipv4.ip_forward=0")
    before = host_state()
    proc = lesson("05", "--host")
    assert proc.returncode == 0, proc.stdout[-3000:]
    out = proc.stdout
    assert "# --host: this lesson changes this machine" in out
    assert "#   namespaces: ns1, internet" in out and "net.ipv4.ip_forward=1" in out
    assert "# removing what the lesson created on this host:" in out
    assert host_state() == before
    assert str(sh.sysctl("-n", "net.ipv4.ip_forward")).strip() == "0"


def test_host_mode_refuses_to_adopt_a_namespace_it_did_not_create():
    sh.ip("netns", "add", "ns1")
    proc = lesson("02", "--host")
    assert proc.returncode == 2
    assert "namespace ns1 already exists on this host" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "ns1" in str(sh.ip("netns", "list"))


def test_keep_asks_for_a_namespace_and_opens_a_shell_inside_it():
    """--keep asks which namespace (a wrong name is asked again), then the shell is
    `ip netns exec NS bash`: a bare `ip addr` there shows ns1's own eth0."""
    proc = lesson("02", "--keep", input="nope\nns1\nip -br addr show dev eth0\nexit\n",
                  env=dict(os.environ, SHELL="/bin/bash"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    assert "open a shell in which namespace? ns1" in proc.stderr and "no namespace 'nope'" in proc.stderr
    assert "--keep: a shell `ip netns exec ns1 bash`, inside ns1" in proc.stdout
    assert re.search(r"^eth0@\S+\s+UP\s+10\.0\.2\.2/24", proc.stdout, re.M), proc.stdout[-1500:]
    assert sh.ip("netns", "list").strip() == ""          # the sandbox took it all away


def test_keep_with_a_namespace_named_and_enter_for_the_host_side():
    named = lesson("02", "--keep", "ns1", input="ip -br link show dev eth0\nexit\n",
                   env=dict(os.environ, SHELL="/bin/bash"))
    assert named.returncode == 0 and "inside ns1" in named.stdout and "open a shell in which" not in named.stderr
    assert re.search(r"^eth0@\S+\s+UP", named.stdout, re.M), named.stdout[-1500:]
    host = lesson("02", "--keep", input="\nip -br link show dev veth-ns1\nexit\n",
                  env=dict(os.environ, SHELL="/bin/bash"))
    assert host.returncode == 0 and "on the sandbox's host side" in host.stdout
    assert re.search(r"^veth-ns1@\S+\s+UP", host.stdout, re.M), host.stdout[-1500:]


def test_step_mode_waits_for_enter_and_q_quits_before_running_the_command():
    done = lesson("01", "--step", input="\n" * 100)
    assert done.returncode == 0 and verdict(done).startswith("PASS lesson 01")
    assert done.stderr.count("[Enter] run, q quit") >= 10
    quit_ = lesson("01", "--step", input="q\n")
    assert quit_.returncode == 130
    assert re.search(r"^ip link add host0 address \S+ type bridge$", quit_.stdout, re.M)
    assert "FAIL lesson 01 netns: interrupted" in quit_.stdout
    assert "ip link set dev host0 alias cnikit" not in quit_.stdout     # stopped at the first command


@pytest.mark.noroot
def test_help_lists_the_steps_to_skip_and_what_breaks():
    proc = lesson("05", "--help")
    assert proc.returncode == 0
    assert "--skip STEP" in proc.stdout and "--host" in proc.stdout and "--dry-run" in proc.stdout
    assert re.search(r"^  nat\s+no MASQUERADE", proc.stdout, re.M)
    assert "--role" in lesson("06", "--help").stdout


@pytest.mark.noroot
@pytest.mark.parametrize("args,message", [
    (("--skip", "nope"), "unknown step 'nope' for --skip; lesson 03 has: master"),
    (("--bogus",), "unrecognized arguments: --bogus"),
])
def test_bad_usage_is_one_line_and_exit_2(args, message):
    proc = lesson("03", *args)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.noroot
def test_lesson_06_role_flags_go_together():
    assert "--role needs --peer" in lesson("06", "--role", "node1").stderr
    assert "go with --role" in lesson("06", "--verify").stderr


def test_demo_runs_lessons_and_ends_with_a_table():
    proc = subprocess.run([sys.executable, os.path.join(STAGES, "demo.py"), "01", "04"],
                          capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout
    rows = re.findall(r"^(0\d_\w+)\s+(PASS|FAIL)\s+([\d.]+)$", proc.stdout, re.M)
    assert [(name, result) for name, result, _ in rows] == [("01_netns", "PASS"), ("04_tcp", "PASS")]
    assert re.search(r"^total\s+2/2\s+[\d.]+  \(wall clock, 2 at once\)$", proc.stdout, re.M)


# ---------------------------------------------------------------- review: dry runs really run, proofs can fail

# Every lesson's dry run replayed under dash, its kernel state and its background jobs:
# tests/test_dryrun_dash.py.


def test_expected_failures_are_marked_in_the_printed_commands():
    before, after = lesson("01").stdout.split("# verification: does the goal hold?")
    assert "ip netns exec ns1 ping -c 1 -W 1 127.0.0.1 || true" in before     # lo is still DOWN
    assert "ip link show dev private0 || true" in after                       # the host must not see it
    assert "ip netns exec ns1 ping -c 1 -W 1 127.0.0.1\n" in after           # this one must succeed


def test_lesson_05_conntrack_check_reads_the_reply_direction():
    """dst=203.0.113.1 must not be found inside dst=203.0.113.10: without MASQUERADE the
    reply goes to 10.0.5.2, and the check must say so."""
    mod = load("05")
    unnatted = ("icmp     1 29 src=10.0.5.2 dst=203.0.113.10 type=8 code=0 id=7 [UNREPLIED] "
                "src=203.0.113.10 dst=10.0.5.2 type=0 code=0 id=7 mark=0 use=1")
    natted = ("tcp      6 119 TIME_WAIT src=10.0.5.2 dst=203.0.113.10 sport=51500 dport=8080 "
              "src=203.0.113.10 dst=203.0.113.1 sport=8080 dport=51500 [ASSURED] mark=0 use=1")
    assert not mod._replies_to(unnatted, "203.0.113.1")
    assert mod._replies_to(natted, "203.0.113.1")
    assert not mod._replies_to("conntrack v1.4.7 (conntrack-tools): 0 flow entries have been shown.",
                               "203.0.113.1")


def test_lesson_05_without_masquerade_but_with_conntrack_fails_the_conntrack_check():
    """Drive lesson 05 in this sandbox, then delete only the MASQUERADE rule (conntrack
    stays active through the FORWARD rules): no check about the translation may pass."""
    if not shutil.which("conntrack"):
        pytest.skip("conntrack not installed")
    mod = load("05")
    L = mod.LESSON.start(quiet=True)
    try:
        mod.build(L)
        sh.iptables("-t", "nat", "-D", cnikit_nat_chain("10.0.5.0/24"), "-s", "10.0.5.0/24", "-o", "uplink0",
                    "-m", "comment", "--comment", "cnikit nat 10.0.5.0/24", "-j", "MASQUERADE")
        L.checks = []
        mod.verify(L)
        failed = [what for what, ok in L.checks if not ok]
        assert any("conntrack" in what for what in failed), L.checks
    finally:
        L.r.stop_all()


def test_lesson_07b_without_forwarding_entries_fails_flannel_has_no_flood_to_fall_back_on():
    proc = run_stage("07b_multinode.py", "--skip", "fdb", timeout=TIMEOUT)
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert "pod3 (node3) reaches pod1 (node1)" in verdict(proc) and "floods nowhere" in verdict(proc)


@pytest.mark.noroot
def test_lesson_07b_is_flannel_three_nodes_no_remote_no_multicast_one_entry_per_peer():
    script = run_stage("07b_multinode.py", "--dry-run", timeout=TIMEOUT).stdout
    vxlans = re.findall(r"^ip -n (node\d) link add vxlan0 .*$", script, re.M)
    assert vxlans == ["node1", "node2", "node3"]
    for line in re.findall(r"^ip -n node\d link add vxlan0 .*$", script, re.M):
        assert " remote " not in line and " group " not in line and line.endswith(" nolearning")
    fdb = re.findall(r"^bridge -n (node\d) fdb append (\S+) dev vxlan0 dst (\S+)$", script, re.M)
    assert len(fdb) == 6 and "00:00:00:00:00:00" not in script.split("# verification")[0]
    neigh = re.findall(r"^ip -n (node\d) neigh replace (\S+) lladdr (\S+) dev vxlan0 nud permanent$", script, re.M)
    assert sorted((n, mac) for n, _, mac in neigh) == sorted((n, mac) for n, mac, _ in fdb)


def test_lesson_07b_counter_check_fails_when_no_pod_traffic_crosses():
    proc = run_stage("07b_multinode.py", "--skip", "routes", timeout=TIMEOUT)
    assert proc.returncode == 1
    assert "the ping went through node1's vxlan0" in verdict(proc), verdict(proc)


@pytest.mark.noroot
def test_lesson_07b_never_renames_an_interface_that_is_up():
    """Linux before 6.2 (Debian 12 runs 6.1) refuses to rename an UP link (EBUSY)."""
    script = run_stage("07b_multinode.py", "--dry-run", timeout=TIMEOUT).stdout
    assert not re.search(r"^ip .*link set dev \S+ name ", script, re.M), script


def test_lesson_06_checks_that_each_vxlan0_learned_the_other_pods_mac():
    mod = load("06")
    L = mod.LESSON.start(quiet=True)
    try:
        mod.build(L)
        mod.verify(L)
        whats = [what for what, _ in L.checks]
        assert any("node2's vxlan0" in w and "pod1" in w for w in whats), whats
        assert any("node1's vxlan0" in w and "pod2" in w for w in whats), whats
        assert L.passed(), L.checks
    finally:
        L.r.stop_all()


def test_lesson_07_host_mode_removes_cni0_and_restores_forwarding():
    """The plugin creates cni0 and switches forwarding on: --host must say so and undo it."""
    sh.sysctl("-w", "net.ipv4.ip_forward=0")
    before = host_state()
    proc = run_stage("07_cni.py", "--host", timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "cni0" in proc.stdout.split("# [1]")[0]            # the summary names what the plugin adds
    assert host_state() == before
    assert str(sh.sysctl("-n", "net.ipv4.ip_forward")).strip() == "0"


def test_lesson_07_host_mode_refuses_to_overwrite_an_existing_install():
    os.makedirs("/etc/cni/net.d", exist_ok=True)
    with open("/etc/cni/net.d/10-cnikit.conflist", "w") as f:
        f.write('{"cniVersion":"1.0.0","name":"cnikit","plugins":[{"type":"cnikit","ipam":{"subnet":"10.99.0.0/24"}}]}\n')
    proc = run_stage("07_cni.py", "--host", timeout=TIMEOUT)
    assert proc.returncode == 2, proc.stdout[-2000:]
    assert "/etc/cni/net.d/10-cnikit.conflist already exists on this host" in proc.stderr
    with open("/etc/cni/net.d/10-cnikit.conflist") as f:
        assert "10.99.0.0/24" in f.read()


def test_lesson_07b_host_mode_leaves_no_file_behind():
    before = host_state()
    proc = run_stage("07b_multinode.py", "--host", timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "#   files:" in proc.stdout and "/etc/cni/node1.d/10-pods-node1.conflist" in proc.stdout
    assert host_state() == before
    assert not os.path.exists("/etc/cni/node1.d")


# ---------------------------------------------------------------- narration a learner can trust

@pytest.mark.noroot
def test_lesson_02_moves_and_renames_the_peer_as_the_series_plugin_does_then_shows_the_short_way():
    script = lesson("02", "--dry-run").stdout
    order = ["ip link add veth-ns1 type veth peer name veth-ns1-peer",
             "ip link set dev veth-ns1-peer netns ns1",
             "ip -n ns1 link set dev veth-ns1-peer name eth0",
             "ip -n ns1 link set dev eth0 up",
             "ip link add veth-ns2 type veth peer name eth0 netns ns2"]
    at = [script.index(line + "\n") for line in order]
    assert at == sorted(at), at


def test_lesson_03_shows_an_address_on_a_bridge_port_answering_no_one_then_moves_it():
    out = lesson("03").stdout
    assert "# check: over its plain cable ns1 reaches 10.0.3.1 on veth-ns1: ok" in out
    assert "# check: with 10.0.3.1 on a port, no namespace reaches it: ok" in out
    assert "ip addr del 10.0.3.1/24 dev veth-ns1\nip addr add 10.0.3.1/24 dev br0\n" in out
    assert "# check: 10.0.3.1 is on br0, and on no port: ok" in out
    assert "gateway" not in out.split("# [1]")[0]          # no route uses it in lesson 03


def test_lesson_05_egress_fails_twice_in_the_normal_run_each_failure_named_rightly():
    out = lesson("05").stdout
    first, rest = out.split("# [5]", 1)
    assert "ping: connect: Network is unreachable" in first
    assert "# check: without a route, ns1's ping fails inside ns1 (Network is unreachable): ok" in first
    assert "IP 10.0.5.2 > 203.0.113.10: ICMP echo request" in rest       # seen from the far side
    assert "the internet has no route to it" in rest
    assert "the request reaches the server from 10.0.5.2 and no reply comes back: ok" in rest
    assert f"-A {cnikit_nat_chain('10.0.5.0/24')} -d 10.0.5.0/24 -i uplink0 -m conntrack --ctstate RELATED,ESTABLISHED" \
        in rest
    skipped = lesson("05", "--skip", "route").stdout
    second = skipped.split("second try")[1].split("# [")[0]
    assert "Network is unreachable" in second and "ns1 still has no route" in second
    assert "the internet has no route to it" not in second


def test_lesson_04_without_a_listener_says_nothing_came_back():
    out = lesson("04", "--skip", "listen").stdout
    assert "got back nothing" in out and "got back None" not in out


def test_the_ownership_alias_is_explained_once_and_never_paused_on(monkeypatch):
    import io
    sys.path.insert(0, STAGES)
    import lesson as lesson_lib
    out = io.StringIO()
    r = lesson_lib.LessonRunner(stepping=True, dry_run=False, quiet=False, color=False, out=out)
    answers = io.StringIO("\n" * 10)
    monkeypatch.setattr(sys, "stdin", answers)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    for argv in (["ip", "link", "add", "br0", "type", "bridge"], ["ip", "link", "set", "dev", "br0", "alias", "cnikit"],
                 ["ip", "-n", "ns1", "link", "set", "dev", "lo", "alias", "cnikit"], ["ip", "link", "set", "br0", "up"]):
        r.echo(argv)
    assert answers.tell() == 2                            # two pauses: the two real steps
    assert out.getvalue().count("# `alias cnikit`: cnikit labels each link") == 1
    full = lesson("03").stdout
    assert full.count("# `alias cnikit`:") == 1 and full.count("alias cnikit\n") == 1   # shown once


def test_lesson_06_names_each_side_and_prints_each_forwarding_table_once():
    out = lesson("06").stdout
    assert out.count("bridge -n node1 fdb show dev vxlan0\n") == 1
    assert out.count("bridge -n node2 fdb show dev vxlan0\n") == 1
    assert "udp[28:2] = 0x0800`: the EtherType" in out and "`udp[39] = 1`" in out


def test_lesson_07_shows_the_whole_add_in_the_log_the_masquerade_rules_and_why_cni0_stays():
    out = run_stage("07_cni.py", timeout=TIMEOUT).stdout
    log = out.split("its log of that ADD")[1].split("# [")[0]
    assert "=== ADD" in log and "CNI_CONTAINERID=pod1" in log and '  stdin: {' in log and "  result: {" in log
    assert re.search(r"^-A POSTROUTING -s 10\.244\.0\.2/32 .*-j CNIKIT-", out, re.M)
    assert "cni0 stays: it is the node's" in out and "(cni0, the node's bridge, stays" in out


def test_keep_on_lesson_07_opens_the_shell_before_the_pods_are_deleted():
    proc = run_stage("07_cni.py", "--keep", "pod1", input="ip -br addr show dev eth0\nexit\n",
                     env=dict(os.environ, SHELL="/bin/bash"), timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    shell_at = proc.stdout.index("--keep: a shell `ip netns exec pod1 bash`")
    assert re.search(r"^eth0@\S+\s+UP\s+10\.244\.0\.2/24", proc.stdout[shell_at:], re.M)
    assert proc.stdout.index("DEL both pods") > shell_at


def test_host_mode_leaves_even_when_build_breaks_unexpectedly():
    """Whatever goes wrong in build (here a bug, not a CnikitError), --host removes what
    the lesson had already made before the exception goes on."""
    import argparse
    sys.path.insert(0, STAGES)
    from lesson import Lesson
    import cnikit
    L = Lesson("99", "broken", goal="nothing", picture="nothing")

    def build(L):
        cnikit.netns_add(L.r, "nsbug")
        if not L.r.dry_run:
            assert "nsbug" in str(sh.ip("netns", "list"))
            raise RuntimeError("a bug in the lesson")

    args = argparse.Namespace(dry_run=False, quiet=True, step=False, skip=[], color="never", host=True, keep=False)
    with pytest.raises(RuntimeError):
        L.run(build, lambda L: None, args)
    assert "nsbug" not in str(sh.ip("netns", "list"))


# ---------------------------------------------------------------- 07c: the routed model beside the bridge model

def _passes_and_leaves_nothing(script, title):
    """Run lesson SCRIPT; it must PASS as TITLE and leave the test's sandbox as it was.
    Returns its output."""
    before = host_state()
    proc = run_stage(script, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr
    assert verdict(proc).startswith(f"PASS lesson {title}")
    assert host_state() == before
    return proc.stdout


def test_lesson_07c_routed_model_passes_compares_arp_and_path_and_leaves_nothing():
    out = _passes_and_leaves_nothing("07c_routed.py", "07c routed")
    assert re.search(r"^eth0@\S+\s+UP\s+10\.244\.2\.2/32", out, re.M)           # the pod's /32
    assert re.search(r"^default via 10\.244\.2\.1 dev eth0", out, re.M)
    assert re.search(r"^10\.244\.2\.3 dev veth[0-9a-f]{11} scope link", out, re.M)  # host route /32 dev veth
    assert "# check: bridged: the reply's TTL says switched, not routed (64): ok" in out
    assert "# check: routed: the reply's TTL says routed by the node, once (63): ok" in out
    assert "rpod2's address is not in its neighbour table: ok" in out


def test_lesson_07c_without_the_host_route_rpod1_cannot_reach_rpod2():
    proc = run_stage("07c_routed.py", "--skip", "host-route", timeout=TIMEOUT)
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert "rpod1 reaches rpod2 (routed)" in verdict(proc) and "bpod1 reaches bpod2" not in verdict(proc)


# ---------------------------------------------------------------- 07d: Services, kube-proxy's iptables mode

def test_lesson_07d_services_answer_from_both_backends_from_a_pod_the_node_outside_and_hairpin():
    out = _passes_and_leaves_nothing("07d_services.py", "07d services")
    assert "-A KUBE-SVC-WEB -m statistic --mode random --probability 0.5 -j KUBE-SEP-WEB1" in out
    assert re.search(r"^-A KUBE-SEP-WEB2 -p tcp (-m tcp )?-j DNAT --to-destination 10\.244\.0\.12:8080$", out, re.M)
    for proof in ("every connection from the client pod to 10.96.0.10:80 was answered, by both backends",
                  "from the node, 10.96.0.10:80 answers every connection, from both backends",
                  "the NodePort 203.0.113.1:30080 answers every connection from outside, from both backends",
                  "web1 reached itself through the Service, and no connection failed"):
        assert f"# check: {proof}: ok" in out
    # real TCP: each connection's answer names its backend and the peer that backend saw
    answers = re.findall(r"^(web[12]) (\S+)$", out, re.M)
    assert {"web1", "web2"} == {name for name, _ in answers} and len(answers) >= 4 * 20
    assert "203.0.113.10" not in {peer for _, peer in answers}  # NodePort: the outside client, masqueraded
    assert "# check: the backends saw the node (10.244.0.1, KUBE-EXT-WEB's masquerade), not the outside client 203.0.113.10: ok" in out
    if shutil.which("conntrack"):
        assert "# check: conntrack maps 10.244.0.20 -> 10.96.0.10:80 to replies from both backends: ok" in out


@pytest.mark.parametrize("step,broken", [
    ("br-netfilter", "every connection from the client pod to 10.96.0.10:80 was answered"),
    ("hairpin", "web1 reached itself through the Service"),
])
def test_lesson_07d_without_br_netfilter_or_hairpin_the_service_fails_where_it_should(step, broken):
    proc = run_stage("07d_services.py", "--skip", step, "-q", timeout=TIMEOUT)
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert broken in verdict(proc)
    if step == "hairpin":        # pods and the node still reach the Service: only hairpin breaks
        assert "every connection from the client pod" not in verdict(proc)
        assert "from the node, 10.96.0.10:80 answers" not in verdict(proc) and "NodePort" not in verdict(proc)


def test_lesson_07d_host_mode_names_its_chains_restores_everything_and_refuses_kube_proxys():
    sh.sysctl("-w", "net.ipv4.ip_forward=0")
    before = host_state()
    proc = run_stage("07d_services.py", "--host", "-q", timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert host_state() == before
    assert str(sh.sysctl("-n", "net.ipv4.ip_forward")).strip() == "0"
    summary = run_stage("07d_services.py", "--host", "--step", input="q\n", timeout=TIMEOUT).stdout
    assert "iptables chains" in summary and "-t nat KUBE-SERVICES" in summary
    sh.iptables("-t", "nat", "-N", "KUBE-SERVICES")
    refused = run_stage("07d_services.py", "--host", timeout=TIMEOUT)
    assert refused.returncode == 2 and "iptables chain KUBE-SERVICES (nat) already exists" in refused.stderr


def test_lesson_01_says_what_the_sandbox_is_and_contrasts_the_host_side_with_the_namespace():
    out = lesson("01").stdout
    opening = out.split("# [2]")[0]
    assert "the \"host\" here is a sandbox" in opening
    assert re.search(r"^host0\s+\S+\s+192\.0\.2\.1/24", opening, re.M)          # the host side's own interface
    assert re.search(r"^192\.0\.2\.0/24 dev host0", opening, re.M)                # and its route
    assert "# check: the host side has host0 and ns1 does not: ok" in out


def test_keep_with_host_on_lesson_07_leaves_the_pods_as_add_made_them():
    proc = run_stage("07_cni.py", "--host", "--keep", timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "--keep: the pods stay as ADD left them" in proc.stdout and "DEL both pods" not in proc.stdout
    assert verdict(proc).endswith("; not checked: DEL (--host --keep kept the pods)")   # the goal's DEL was not proven
    assert "10.244.0." in str(sh.ip("-n", "pod1", "-br", "addr", "show", "dev", "eth0"))


@pytest.mark.noroot
@pytest.mark.parametrize("script", ["03_bridge.py", "07_cni.py"])   # 07 runs the lesson through its own main
def test_a_reader_that_leaves_a_dry_run_early_gets_no_traceback(script):
    proc = subprocess.Popen([sys.executable, os.path.join(STAGES, script), "--dry-run", "--color", "never"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()           # as `| head` does once it has its lines; here before the first
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 1 and err == "", err
