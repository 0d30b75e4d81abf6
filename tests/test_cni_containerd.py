"""containerd: `ctr run --cni` with our conflist gives containers addresses from our plugin,
they reach each other and the gateway, and removing them leaves nothing behind. containerd
is started by the fixture (setsid) on its own socket and state dirs and stopped by its pid.
Skips only when containerd cannot start a container at all here (and says why)."""
import ipaddress
import subprocess

import pytest

from kernel import cli, iptables_rules, veths
from runtimes import IMAGE, Containerd, allocations, runtime_session, wait_for

import cnikit

SUBNET = "10.244.13.0/24"
GATEWAY = "10.244.13.1"


@pytest.fixture
def ctr():
    with runtime_session(Containerd, "ct") as c:
        yield c


def test_ctr_run_cni_uses_our_plugin_and_leaves_nothing(ctr):
    cli("cni", "install", "--subnet", SUBNET, check=True)
    nat_before, filter_before = iptables_rules("nat"), iptables_rules("filter")
    # c1 stays up in the background: `ctr run --rm --cni` itself does the CNI DEL when its task ends
    c1 = subprocess.Popen(ctr.argv("run", "--rm", "--cni", IMAGE, "c1", "sleep", "120"),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: "default-c1" in allocations("cnikit")), c1.poll()
        ip1 = allocations("cnikit")["default-c1"]
        assert ipaddress.ip_address(ip1) in ipaddress.ip_network(SUBNET)
        proc = ctr("run", "--rm", "--cni", IMAGE, "c2", "sh", "-c",
                   f"ip -4 -o addr show dev eth0 && ping -c 1 -W 2 {ip1} && ping -c 1 -W 2 {GATEWAY}", check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "inet 10.244.13." in proc.stdout and f"{ip1}: seq=0" in proc.stdout and f"{GATEWAY}: seq=0" in proc.stdout
        assert list(allocations("cnikit")) == ["default-c1"]      # c2's address released by its DEL
    finally:
        ctr("task", "kill", "-s", "KILL", "c1", check=False)
        c1.wait(timeout=30)
    with open(cnikit.CNI_LOG) as f:
        log = f.read()
    assert "default-c1" in log and "DEL" in log
    # lesson 07 says so: containerd goes straight to ADD; the VERSION before every call is podman's habit
    assert "=== ADD" in log and "=== VERSION" not in log
    assert allocations("cnikit") == {}
    assert veths() == []
    assert iptables_rules("nat") == nat_before and iptables_rules("filter") == filter_before
