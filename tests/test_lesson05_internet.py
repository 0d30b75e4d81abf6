"""Lesson 05's --internet ADDR: the original series' ending, opt-in. The test's sandbox stands
for the learner's real host, with an uplink into a namespace this test makes ("isp", holding
the address the learner would name): no packet leaves what the test created.

Without --internet, not one IPv4 packet of the lesson reaches that uplink; with it, ns1's
ping reaches ADDR masqueraded behind the uplink, conntrack shows the translation, and the
host is left as it was.
"""
import re

import pytest
import sh

from host_state import host_state
from kernel import run_stage

ISP, WAN = "isp", "wan0"
WAN_ADDR, ISP_ADDR = "198.51.100.2/24", "198.51.100.1/24"
OUT_THERE = "192.0.2.99"                   # "an address on the internet": the isp namespace's own


@pytest.fixture
def uplink():
    """This (sandbox) host's uplink into an isp namespace, a default route through it; the
    isp knows nothing of the host's private subnets (like the real internet) and counts the
    IPv4 packets it gets."""
    sh.ip("netns", "add", ISP)
    sh.ip("link", "add", WAN, "type", "veth", "peer", "name", "eth0", "netns", ISP)
    sh.sysctl("-w", f"net.ipv6.conf.{WAN}.disable_ipv6=1")    # IPv4 only: no routes appearing later
    sh.ip("addr", "add", WAN_ADDR, "dev", WAN)
    sh.ip("link", "set", WAN, "up")
    for argv in (["addr", "add", ISP_ADDR, "dev", "eth0"], ["addr", "add", OUT_THERE + "/32", "dev", "lo"],
                 ["link", "set", "eth0", "up"], ["link", "set", "lo", "up"]):
        sh.ip("-n", ISP, *argv)
    sh.ip("route", "add", "default", "via", ISP_ADDR.split("/")[0])
    sh.ip("netns", "exec", ISP, "iptables", "-w", "-A", "INPUT", "-i", "eth0")
    return ISP


def ipv4_packets_at_isp():
    out = str(sh.ip("netns", "exec", ISP, "iptables", "-w", "-nvxL", "INPUT"))
    return sum(int(row.split()[0]) for row in out.splitlines()[2:] if row.split())


def test_without_internet_nothing_reaches_the_hosts_uplink(uplink):
    before = host_state()
    proc = run_stage("05_egress.py", "--host", timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    assert ipv4_packets_at_isp() == 0
    assert host_state() == before


def test_internet_pings_the_named_address_through_the_hosts_uplink_and_leaves_nothing(uplink):
    before = host_state()
    proc = run_stage("05_egress.py", "--host", "--internet", OUT_THERE, timeout=120)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr
    assert f"check: ns1 reaches {OUT_THERE} through this host's uplink {WAN}: ok" in out
    assert re.search(rf"^iptables -w -t nat -I POSTROUTING -s 10\.0\.5\.0/24 -o {WAN} .*-j MASQUERADE$", out, re.M)
    if "conntrack (Debian package conntrack) is not installed" not in out:
        assert "check: conntrack shows the translation: the replies come back to wan0's address: ok" in out
    assert ipv4_packets_at_isp() >= 3
    assert host_state() == before                  # the extra rule went with the rest


def test_internet_without_a_route_says_why_and_the_lesson_still_proves_nat():
    proc = run_stage("05_egress.py", "--host", "--internet", OUT_THERE, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    assert f"this host has no route to {OUT_THERE}" in proc.stdout
    assert f"not checked: --internet {OUT_THERE} (this host has no route to it)" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--internet", OUT_THERE], "--internet needs --host and a live run"),
    (["--host", "--dry-run", "--internet", OUT_THERE], "--internet needs --host and a live run"),
    (["--host", "--internet", "somewhere"], "is not an IPv4 address"),
    (["--host", "--internet", "127.0.0.1"], "not a loopback, link-local, multicast address or one of the lesson's own"),
    (["--host", "--internet", "10.0.5.2"], "or one of the lesson's own"),
])
def test_internet_bad_usage_is_one_line_and_exit_2_before_anything(args, message):
    before = host_state()
    proc = run_stage("05_egress.py", *args, timeout=30)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and host_state() == before
