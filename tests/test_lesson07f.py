"""Lesson 07f (dual-stack): it PASSes in its sandbox and leaves nothing; each --skip makes the named
proofs FAIL and only those (IPv4 keeps working where only IPv6 should break); with --host it
undoes what it changed, ip6tables included.  Its dry run under `dash -e` is replayed by
test_dryrun_dash.py, and under the Docker and kind host profiles by test_host_profiles.py."""
import ipaddress
import re
import shlex
import subprocess

import sh

from host_state import host_state
from kernel import run_stage

SCRIPT = "07f_dualstack.py"
TIMEOUT = 90


def verdict(proc):
    lines = [l for l in proc.stdout.splitlines() if l.startswith(("PASS lesson", "FAIL lesson"))]
    return lines[-1] if lines else ""


def failed_checks(proc):
    return re.findall(r"^# check: (.*): FAILED", proc.stdout, re.M)


def ip6tables_rules(table="filter"):
    return [r for r in str(sh.ip6tables("-t", table, "-S")).splitlines() if r.startswith("-A")]


def test_lesson_07f_passes_in_its_sandbox_proves_both_families_and_leaves_nothing():
    before = host_state()
    proc = run_stage(SCRIPT, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr
    assert verdict(proc).startswith("PASS lesson 07f dualstack")
    assert failed_checks(proc) == [] and "Traceback" not in proc.stderr
    for family in (4, 6):
        assert f"# check: ns1 reaches ns2 over IPv{family}: ok" in proc.stdout
        assert f"# check: ns2 reaches ns1 over IPv{family}: ok" in proc.stdout
        assert re.search(rf"^# check: TCP 8080 over IPv{family}: ns2 sees ns1's own address \S+ \(no NAT\): ok$",
                         proc.stdout, re.M)
    for proof in ("ns1's fd00:7::2 is usable at once (not tentative)", "NDP found ns2's MAC for ns1 (ip -6 neigh)",
                  "ns2 reaches its link-local gateway fe80::1 on its link",
                  "ns1 took no route from ns2's router advertisement",
                  "the node took no route from ns2's router advertisement"):
        assert f"# check: {proof}: ok" in proc.stdout
    # every command is printed: the ones that make the IPv6 half, in the kernel's words
    for command in ("ip netns exec ns1 sysctl -w net.ipv6.conf.eth0.accept_dad=0",
                    "ip addr add fd00:7::1/64 dev br0 nodad",
                    "ip -n ns2 -6 route add default via fe80::1 dev eth0",
                    "ip netns exec ns2 ip6tables -w -A INPUT -p ipv6-icmp --icmpv6-type neighbour-solicitation "
                    "-j ACCEPT"):
        assert re.search(rf"^{re.escape(command)}$", proc.stdout, re.M), command
    assert host_state() == before


def test_lesson_07f_without_accept_dad_0_the_pods_address_is_still_tentative():
    proc = run_stage(SCRIPT, "--skip", "nodad", timeout=TIMEOUT)
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "skipped (--skip nodad)" in proc.stdout
    assert "ns1's fd00:7::2 is usable at once (not tentative)" in failed_checks(proc)
    assert not [c for c in failed_checks(proc) if "IPv4" in c]


def test_lesson_07f_with_accept_ra_1_in_the_pods_a_rogue_pods_advertisement_becomes_a_default_route():
    proc = run_stage(SCRIPT, "--skip", "ra", timeout=TIMEOUT)
    assert proc.returncode == 1, proc.stdout[-3000:]
    failed = failed_checks(proc)
    assert "ns1 took no route from ns2's router advertisement" in failed, failed
    # the node's links keep accept_ra 0: it still takes nothing
    assert "the node took no route from ns2's router advertisement" not in failed
    assert not [c for c in failed if "IPv4" in c], failed


def test_lesson_07f_a_firewall_dropping_ndp_breaks_ipv6_only():
    proc = run_stage(SCRIPT, "--skip", "icmpv6", timeout=TIMEOUT)
    assert proc.returncode == 1, proc.stdout[-3000:]
    failed = failed_checks(proc)
    assert {"ns1 reaches ns2 over IPv6", "ns2 reaches ns1 over IPv6",
            "NDP found ns2's MAC for ns1 (ip -6 neigh)"} <= set(failed), failed
    assert any(c.startswith("TCP 8080 over IPv6") for c in failed), failed
    # the same rules in IPv4 let everything through: ARP is not IP, iptables never sees it
    assert not [c for c in failed if "IPv4" in c], failed
    assert re.search(r"^# check: NDP found ns2's MAC for ns1 \(ip -6 neigh\): FAILED \(the entry: .*INCOMPLETE",
                     proc.stdout, re.M) or "FAILED (the entry: FAILED)" in proc.stdout


def test_lesson_07f_with_host_restores_the_hosts_sysctls_and_ip6tables():
    """--host in this test's sandbox (its host): the bridge, the pods, the sysctls and any rule go."""
    before = (host_state(), ip6tables_rules(), ip6tables_rules("nat"))
    proc = run_stage(SCRIPT, "--host", "-q", timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    assert verdict(proc).startswith("PASS lesson 07f")
    assert (host_state(), ip6tables_rules(), ip6tables_rules("nat")) == before
    assert subprocess.run(["ip", "link", "show", "br0"], capture_output=True).returncode != 0


def test_lesson_07f_with_host_refuses_a_br0_it_did_not_make_and_leaves_it_alone():
    sh.ip("link", "add", "br0", "type", "bridge")
    proc = run_stage(SCRIPT, "--host", timeout=TIMEOUT)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr
    assert "br0" in proc.stderr and "Traceback" not in proc.stderr
    assert subprocess.run(["ip", "link", "show", "br0"], capture_output=True).returncode == 0
    assert "ns1" not in str(sh.ip("netns", "list"))


def _assigned_and_targets(script):
    """Addresses the dry run assigns (`addr add`), and those it sends to: ping, socat TCP4/TCP6,
    and the router advertisement's destination."""
    assigned, targets = set(), set()
    for line in script.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        words = shlex.split(line)
        for i, w in enumerate(words[:-1]):
            if w == "add" and re.match(r"^[0-9a-f:.]+/\d+$", words[i + 1]):
                assigned.add(str(ipaddress.ip_interface(words[i + 1]).ip))
        if "ping" in words:
            targets.add(words[-1].split("%")[0])
        for w in words:
            m = re.match(r"TCP[46]?:(?:\[([0-9a-f:]+)\]|([\d.]+)):\d+", w)
            if m:
                targets.add(m.group(1) or m.group(2))
            targets.update(re.findall(r"\"(ff02::[0-9a-f:]*)\"", w))
    return assigned, targets


def test_lesson_07f_sends_packets_only_to_its_own_addresses_and_its_links():
    script = run_stage(SCRIPT, "--dry-run", timeout=TIMEOUT).stdout
    assigned, targets = _assigned_and_targets(script)
    assert {"fd00:7::3", "10.0.7.3", "fe80::1", "ff02::1"} <= targets, targets
    for addr in map(ipaddress.ip_address, targets):
        # ff02::/16: link-scope multicast, which no router forwards
        assert str(addr) in assigned or addr in ipaddress.ip_network("ff02::/16"), f"{addr} is not the lesson's own"
