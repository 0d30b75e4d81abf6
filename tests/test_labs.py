"""The pitfall labs (stages/2N_pitfall_*.py) and `cnikit doctor`.

Each lab passes in its own sandbox; built with the lab's own functions in this test's
sandbox, its broken state is named by doctor with the lab's cause and its fixed state is
healthy; doctor changes nothing (links, addresses, routes, neighbours, iptables, sysctls,
conntrack compared before and after) and answers bad input with one line and exit 2.
"""
import contextlib
import glob
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import sh

from kernel import ROOT, changes, cli, run_stage

STAGES = os.path.join(ROOT, "stages")
LABS = {os.path.basename(p)[:2]: os.path.basename(p)
        for p in sorted(glob.glob(os.path.join(STAGES, "2?_pitfall_*.py")))}
TIMEOUT = 120
SYSCTLS = re.compile(r"^net\.(ipv4\.(ip_forward|conf\.\S+\.(rp_filter|forwarding))|bridge\.\S+) = ")


def _lesson(name):
    """A lesson or lab file under stages/, imported as a module."""
    sys.path.insert(0, STAGES)
    spec = importlib.util.spec_from_file_location(f"lesson_{name[:3]}", os.path.join(STAGES, name))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load(number):
    """Lab NUMBER's declaration (its pitfall.Lab)."""
    return _lesson(LABS[number]).LAB


@contextlib.contextmanager
def started(lesson, **options):
    """LESSON started quietly in this test's sandbox; its background jobs stop at the end."""
    L = lesson.start(quiet=True, **options)
    try:
        yield L
    finally:
        L.r.stop_all()


def verdict(proc):
    lines = [l for l in proc.stdout.splitlines() if l.startswith(("PASS lesson", "FAIL lesson"))]
    return lines[-1] if lines else ""


def doctor(*args):
    """`cnikit doctor ARGS --json` as a user runs it: (exit code, report or None, stderr)."""
    proc = cli("doctor", *args, "--json")
    report = json.loads(proc.stdout) if proc.stdout.strip() else None
    return proc.returncode, report, proc.stderr


def _out(argv):
    return subprocess.run(argv, capture_output=True, text=True).stdout


# The kernel's own multicast (IGMP membership reports to 224.0.0.22, on its timers): never doctor's.
MULTICAST_DST = re.compile(r"\bdst=2(2[4-9]|3\d)\.")


def kernel_state():
    """Everything doctor could conceivably change, in every namespace: links (kind, flags,
    MTU, master, MAC, alias), IPv4 addresses and routes, neighbours (address, MAC, device;
    not the NUD state, which ages by itself), iptables-save without counters, the sysctls
    doctor reads, conntrack flows (their tuples: the timeout and the TCP state move by
    themselves). Timers, IPv6 autoconfiguration and the kernel's multicast flows, which move
    by themselves, are left out."""
    state = {}
    names = [n["name"] for n in json.loads(_out(["ip", "-j", "netns", "list"]) or "[]")]
    for ns in [None] + sorted(names):
        ip_ = ["ip", *(["-n", ns] if ns else []), "-j"]
        pre = ["ip", "netns", "exec", ns] if ns else []
        links = json.loads(_out(ip_ + ["-d", "link", "show"]) or "[]")
        state[ns or "host"] = {
            "links": sorted((l["ifname"], l.get("linkinfo", {}).get("info_kind"), tuple(l.get("flags", [])),
                             l.get("mtu"), l.get("master"), l.get("address"), l.get("ifalias")) for l in links),
            "addrs": sorted((l["ifname"], a["local"], a["prefixlen"]) for l in json.loads(_out(ip_ + ["-4", "addr"]))
                            for a in l.get("addr_info", [])),
            "routes": _out(ip_[:-1] + ["-4", "route", "show", "table", "all"]),
            "neigh": {(n.get("dst"), n.get("lladdr"), n.get("dev"))
                      for n in json.loads(_out(ip_ + ["neigh", "show"]) or "[]")},
            "iptables": re.sub(r"\[\d+:\d+\]|^#.*$", "", _out(pre + ["iptables-save"]), flags=re.M),
            # the other backend's tables too (lab 28): listed from what exists, never loading a table
            "iptables-legacy": re.sub(r"\[\d+:\d+\]|^#.*$", "", _out(pre + ["iptables-legacy-save"]), flags=re.M),
            "x_tables": _out(pre + ["cat", "/proc/net/ip_tables_names"]),
            "sysctls": sorted(l for l in _out(pre + ["sysctl", "-a"]).splitlines() if SYSCTLS.match(l)),
            "conntrack": {(l.split()[0],) + tuple(re.findall(r"\b(?:src|dst|sport|dport|type|code|id)=\S+", l))
                          for l in _out(pre + ["conntrack", "-L"]).splitlines()
                          if l.strip() and not MULTICAST_DST.search(l)},
        }
    return state




# ---------------------------------------------------------------- every lab, end to end

@pytest.mark.parametrize("number", sorted(LABS))
def test_lab_passes_in_its_sandbox_with_doctor_naming_the_cause(number):
    lab = load(number)
    proc = run_stage(LABS[number], timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    out = proc.stdout
    assert verdict(proc).startswith(f"PASS lesson {number} pitfall_")
    assert "# check: " in out and "FAILED" not in out
    assert re.search(rf"^BROKEN at \S+: {lab.cause}$", out, re.M), out[-3000:]
    assert re.search(r"^HEALTHY: ", out, re.M)
    # the six steps, in order
    order = ["before anything breaks", "break it the way it breaks in real life", "the symptom, as a user meets it",
             "diagnose:", "cnikit doctor walks the path", "fix it:", "verification: does the goal hold?"]
    at = [out.find(s) for s in order]
    assert -1 not in at and at == sorted(at), dict(zip(order, at))
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("number", ["20", "25", "27", "28"])
def test_skipping_the_fix_makes_the_lab_fail(number):
    proc = run_stage(LABS[number], "--skip", "fix", timeout=TIMEOUT)
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert verdict(proc).startswith(f"FAIL lesson {number}")
    assert "skipped (--skip fix)" in proc.stdout


def test_broken_stops_at_the_broken_state_and_keep_opens_a_shell_in_it():
    proc = run_stage(LABS["23"], "--broken", "--keep", "node1", timeout=TIMEOUT,
                     input="echo forwarding=$(sysctl -n net.ipv4.ip_forward)\nexit\n",
                     env=dict(os.environ, SHELL="/bin/bash"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    assert "fix it:" not in proc.stdout and "--broken: the lab stops here" in proc.stdout
    assert "forwarding=0" in proc.stdout
    assert verdict(proc).startswith("PASS lesson 23")


# A lab's dry run lists the doctor call and runs under `dash -e` to its end, building what the real
# run builds: tests/test_dryrun_dash.py, for every lesson and lab.


# ---------------------------------------------------------------- doctor on each lab's states

@pytest.mark.parametrize("number", sorted(LABS))
def test_doctor_names_the_broken_state_changes_nothing_and_finds_the_fixed_one_healthy(number):
    """Build the lab's states with its own functions in this sandbox: working, broken, fixed."""
    lab = load(number)
    with started(lab.lesson) as L:
        lab.setup(L)
        assert lab.check(L)
        code, report, _ = doctor(*lab.doctor)
        assert code == 0 and report["healthy"], report["broken"]

        lab.breakage(L)
        before = kernel_state()
        code, report, err = doctor(*lab.doctor)
        assert not changes(before, kernel_state()), "doctor changed the kernel's state"
        assert code == 1 and not report["healthy"], err
        broken = report["broken"]
        assert broken["cause"] == lab.cause, broken
        assert broken["what"] and broken["see"] and broken["fix"]
        assert report["hops"][0]["ns"] == lab.doctor[0]

        lab.fix(L)
        assert lab.check(L)
        code, report, _ = doctor(*lab.doctor)
        assert code == 0 and report["healthy"] and report["broken"] is None, report["broken"]
        assert report["hops"][-1].get("note", "").endswith("delivered")


def test_changes_tells_what_doctor_did_from_what_the_kernel_does_by_itself():
    flow = ("tcp", "src=10.0.0.2", "dst=10.0.0.3", "sport=1", "dport=2")
    before = {"node1": {"routes": "a", "neigh": {("10.0.0.3", "aa", "eth0")}, "conntrack": {flow}}}
    aged = {"node1": {"routes": "a", "neigh": set(), "conntrack": set()}}
    assert changes(before, aged) == []                                      # entries that aged out
    sent = {"node1": {"routes": "a", "neigh": {("10.0.0.9", "bb", "eth0")}, "conntrack": {flow, flow[:1] + ("src=x",)}}}
    assert [c.split(":")[0] for c in changes(before, sent)] == ["node1 conntrack", "node1 neigh"]
    assert changes(before, {"node1": dict(before["node1"], routes="b")}) == ["node1 routes: 'a' -> 'b'"]


def test_doctor_fix_command_really_fixes_the_broken_state():
    """The printed fix is a real command: run it by hand and the path is healthy."""
    lab = load("20")
    with started(lab.lesson) as L:
        lab.setup(L)
        lab.breakage(L)
        code, report, _ = doctor(*lab.doctor)
        assert code == 1
        for line in report["broken"]["fix"]:
            subprocess.run(line, shell=True, check=True)
        assert lab.check(L)
        assert doctor(*lab.doctor)[0] == 0


def test_doctor_text_report_names_hop_cause_see_and_fix():
    lab = load("23")
    with started(lab.lesson) as L:
        lab.setup(L)
        lab.breakage(L)
        proc = cli("doctor", *lab.doctor)
    assert proc.returncode == 1
    out = proc.stdout
    assert out.startswith("doctor: pod1 -> 198.51.100.10, icmp\n")
    assert re.search(r"^  hop 1  pod1: out eth0 to 10\.0\.23\.1", out, re.M)
    assert re.search(r"^  hop 2  node1: in br0", out, re.M)
    assert "BROKEN at node1: ip-forward" in out
    assert "  see:  ip netns exec node1 sysctl net.ipv4.ip_forward net.ipv4.conf.br0.forwarding" in out
    assert "  fix:  ip netns exec node1 sysctl -w net.ipv4.ip_forward=1" in out


def test_doctor_on_simulated_nodes_and_from_the_host():
    """-n NODE makes NODE the host: `doctor host ADDR` starts there. Lab 21's nodes: the
    underlay is healthy; an underlay too small for the overlay is named by its MTU."""
    lab = load("21")
    with started(lab.lesson) as L:
        lab.setup(L)
        proc = cli("-n", "node1", "doctor", "host", "192.0.2.2", "--json")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        report = json.loads(proc.stdout)
        assert report["from"] == "node1" and report["hops"][-1]["ns"] == "node2"
        sh.ip("-n", "node1", "link", "set", "dev", "eth0", "mtu", "1400")     # an underlay smaller than planned
        code, report, _ = doctor("pod1", "pod2")
        assert code == 1 and report["broken"]["cause"] == "mtu"
        assert "headroom" in report["broken"]["what"], report["broken"]
    # from the host (this test's sandbox) into a namespace of its own
    sh.ip("netns", "add", "ns1")
    sh.ip("link", "add", "veth-ns1", "type", "veth", "peer", "name", "eth0", "netns", "ns1")
    sh.ip("addr", "add", "10.0.99.1/24", "dev", "veth-ns1")
    sh.ip("link", "set", "veth-ns1", "up")
    sh.ip("-n", "ns1", "addr", "add", "10.0.99.2/24", "dev", "eth0")
    sh.ip("-n", "ns1", "link", "set", "eth0", "up")
    code, report, _ = doctor("host", "ns1")
    assert code == 0 and report["dst"] == "10.0.99.2" and report["hops"][-1]["ns"] == "ns1"
    sh.ip("-n", "ns1", "link", "set", "eth0", "down")
    code, report, _ = doctor("host", "10.0.99.2")
    assert code == 1 and report["broken"]["cause"] == "link-down" and report["broken"]["hop"] == "ns1"


def test_doctor_inside_lesson_05_names_missing_nat_as_no_way_back():
    """Lesson 05 without its NAT step: the internet has no route back to the pod."""
    mod = _lesson("05_egress.py")
    with started(mod.LESSON, skip=["nat"]) as L:
        mod.build(L)
        code, report, _ = doctor("ns1", "internet")
        assert code == 1 and report["broken"]["cause"] == "no-return-route", report["broken"]
        assert report["broken"]["fix"] == ["cnikit nat add 10.0.5.0/24 --out uplink0"]
        cli("-q", "nat", "add", "10.0.5.0/24", "--out", "uplink0", check=True)
        code, report, _ = doctor("ns1", "internet")
        assert code == 0, report["broken"]
        assert any(h.get("nat", {}).get("to") == "203.0.113.1" for h in report["hops"])


@pytest.mark.parametrize("name,skip,frm,to,cause,words", [
    ("03_bridge.py", "master", "ns1", "ns2", "no-l2-path", "ip link set dev veth-ns1 master br0"),
    ("03_bridge.py", None, "ns1", "host", None, "host"),
    ("06_vxlan.py", "fdb", "pod1", "pod2", "no-l2-path", "fdb append 00:00:00:00:00:00 dev vxlan0"),
    ("07b_multinode.py", None, "pod1", "pod2", None, "vxlan0 (VNI 1) in node1"),
    ("07b_multinode.py", "routes", "pod1", "pod2", "no-route", "node1 has no route to 10.244.2.2"),
    # a route to suggest, not a placeholder: via the neighbour that has the subnet (node2 on the
    # underlay), and for a pod without a default route, its gateway
    ("07b_multinode.py", "routes", "pod1", "pod2", "no-route", re.compile(r"fix:  ip -n node1 route add "
                                                                         r"10\.244\.2\.0/24 via 10\.0\.8\.\d+\n")),
    ("05_egress.py", "route", "ns1", "internet", "no-route", "fix:  ip -n ns1 route add default via 10.0.5.1\n"),
])
def test_doctor_inside_the_lessons(name, skip, frm, to, cause, words):
    """Doctor reads any topology, not only the labs': the lessons' states, whole or with a
    step left out; and a dry run of doctor looks just the same (it only reads)."""
    mod = _lesson(name)
    with started(mod.LESSON, skip=[skip] if skip else []) as L:
        L.call(mod.build, L.new_state())
        proc = cli("doctor", frm, to)
        assert proc.returncode == (1 if cause else 0), proc.stdout + proc.stderr
        assert (f": {cause}\n" if cause else "\nHEALTHY: ") in proc.stdout, proc.stdout
        assert (words.search(proc.stdout) if isinstance(words, re.Pattern) else words in proc.stdout), proc.stdout
        assert cli("--dry-run", "doctor", frm, to).stdout == proc.stdout


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("args,message", [
    (("nope", "10.0.0.1"), "FROM namespace 'nope' does not exist"),
    (("host", "999.1.1.1"), "TO '999.1.1.1' is neither an IPv4 or IPv6 address nor an existing namespace"),
    (("host", "2001:db8::1", "-4"), "TO 2001:db8::1 is an IPv6 address, but -4 asks for IPv4"),
    (("bad/name", "10.0.0.1"), "namespace name 'bad/name' is invalid"),
    (("host", "192.0.2.1", "--port", "70000"), "--port 70000 is out of range 1-65535"),
    (("host", "192.0.2.1", "--proto", "icmp", "--port", "53"), "--port goes with --proto tcp or udp"),
    (("host", "192.0.2.1", "--proto", "sctp"), "invalid choice: 'sctp'"),
    (("host",), "the following arguments are required: TO"),
])
def test_doctor_bad_input_is_one_line_and_exit_2(args, message):
    proc = cli("doctor", *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_doctor_with_n_of_a_missing_namespace_is_exit_2():
    proc = cli("-n", "ghost", "doctor", "host", "192.0.2.1")
    assert proc.returncode == 2 and "ghost" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- doctor's pure parts

DOCKER_FILTER = """-P INPUT ACCEPT -c 0 0
-P FORWARD DROP -c 7 588
-P OUTPUT ACCEPT -c 0 0
-N DOCKER
-N DOCKER-ISOLATION-STAGE-1
-N DOCKER-USER
-A FORWARD -c 0 0 -j DOCKER-USER
-A FORWARD -c 0 0 -j DOCKER-ISOLATION-STAGE-1
-A FORWARD -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -c 0 0 -j ACCEPT
-A FORWARD -o docker0 -c 0 0 -j DOCKER
-A FORWARD -i docker0 ! -o docker0 -c 0 0 -j ACCEPT
-A FORWARD -i docker0 -o docker0 -c 0 0 -j ACCEPT
-A DOCKER-ISOLATION-STAGE-1 -c 0 0 -j RETURN
-A DOCKER-USER -c 0 0 -j RETURN
"""


@pytest.mark.noroot
def test_doctor_reads_docker_forward_chain_as_the_kernel_would():
    import cnikit
    chains = cnikit._parse_iptables(DOCKER_FILTER)
    assert chains["FORWARD"]["policy"] == "DROP" and chains["FORWARD"]["packets"] == 7
    # docker0's own traffic: accepted by Docker's rules, through its user chains' RETURN
    assert cnikit._filter_verdict(chains, "FORWARD", {"iif": "docker0", "oif": "docker0"})[0] == "ACCEPT"
    assert cnikit._filter_verdict(chains, "FORWARD", {"iif": "docker0", "oif": "eth0"})[0] == "ACCEPT"
    # a CNI bridge's pods: nothing accepts them, the policy drops them (lab 20)
    assert cnikit._filter_verdict(chains, "FORWARD", {"iif": "cni0", "oif": "cni0"}) == ("DROP", None)
    # a new flow is not RELATED,ESTABLISHED: that rule does not count for it
    assert cnikit._filter_verdict(chains, "FORWARD", {"iif": "eth0", "oif": "docker0"}) == ("DROP", None)


@pytest.mark.noroot
@pytest.mark.parametrize("rule,pkt,matches", [
    (["-s", "10.24.1.0/24", "-o", "eth0", "-j", "MASQUERADE"], {"src": "10.24.1.2", "oif": "eth0"}, True),
    (["-s", "10.24.1.0/24", "!", "-d", "10.24.0.0/16", "-j", "MASQUERADE"], {"src": "10.24.1.2", "dst": "10.24.2.2"},
     False),
    (["-i", "veth+", "-j", "ACCEPT"], {"iif": "veth-pod1"}, True),
    (["-p", "udp", "-m", "udp", "--dport", "5000:6000", "-j", "DNAT"], {"proto": "udp", "dport": 5353}, True),
    (["-p", "tcp", "--dport", "5353", "-j", "DNAT"], {"proto": "udp", "dport": 5353}, False),
    (["-m", "mark", "--mark", "0x4000", "-j", "ACCEPT"], {}, False),      # a match doctor cannot judge
])
def test_doctor_rule_matcher(rule, pkt, matches):
    import cnikit
    assert cnikit._rule_matches(rule, pkt)[0] is matches


@pytest.mark.noroot
def test_doctor_reads_a_conntrack_line_both_ways():
    import cnikit
    flow = cnikit._parse_conntrack("udp      17 28 src=198.51.100.10 dst=198.51.100.1 sport=40000 dport=5353 "
                                   "src=10.0.25.2 dst=198.51.100.10 sport=5353 dport=40000 mark=0 use=1")
    assert flow["orig"] == {"src": "198.51.100.10", "dst": "198.51.100.1", "sport": "40000", "dport": "5353"}
    assert flow["reply"]["src"] == "10.0.25.2"


def test_doctor_names_a_link_without_carrier():
    """Up but no carrier (a tap nobody holds open): the packet goes nowhere."""
    sh.ip("tuntap", "add", "tap0", "mode", "tap")
    sh.ip("addr", "add", "192.0.2.5/24", "dev", "tap0")
    sh.ip("link", "set", "tap0", "up")
    code, report, _ = doctor("host", "192.0.2.77")
    assert code == 1 and report["broken"]["cause"] == "link-down" and "no carrier" in report["broken"]["what"]


def test_doctor_names_a_learned_neighbour_entry_with_a_mac_nobody_has():
    """A learned (STALE) entry is still used before the kernel asks again: named, and on a
    bridge with a MAC of its own (cnikit's) the fix is only to drop the entry."""
    for argv in (["netns", "add", "node1"], ["netns", "add", "pod1"],
                 ["-n", "node1", "bridge", "add", "br0", "--addr", "10.0.99.1/24"],
                 ["-n", "node1", "veth", "add", "veth-pod1", "eth0", "--netns", "pod1", "--peer-addr", "10.0.99.2/24"],
                 ["-n", "node1", "bridge", "attach", "br0", "veth-pod1"]):
        assert cli("-q", *argv).returncode == 0
    sh.ip("-n", "pod1", "neigh", "replace", "10.0.99.1", "lladdr", "02:00:00:00:99:99", "dev", "eth0", "nud", "stale")
    code, report, _ = doctor("pod1", "10.0.99.1")
    assert code == 1 and report["broken"]["cause"] == "neighbour", report["broken"]
    assert "02:00:00:00:99:99 (STALE)" in report["broken"]["what"]
    assert report["broken"]["fix"] == ["ip -n pod1 neigh del 10.0.99.1 dev eth0"]
    sh.ip("-n", "pod1", "neigh", "del", "10.0.99.1", "dev", "eth0")
    assert doctor("pod1", "10.0.99.1")[0] == 0
