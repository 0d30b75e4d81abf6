"""podman (CNI backend) runs containers on a network whose plugin is ours: each gets an
address from our plugin, reaches the other container and the gateway, and `podman rm`
leaves no veth, address file, rule or result behind. Skips only when podman cannot start
a container at all here (and says why)."""
import ipaddress
import json
import os

import pytest

from kernel import cli, iptables_rules, links, veths
from runtimes import IMAGE, Podman, allocations, runtime_session

import cnikit

SUBNET = "10.244.11.0/24"
GATEWAY = "10.244.11.1"


@pytest.fixture
def podman():
    with runtime_session(Podman, "pm") as pm:
        yield pm


def test_podman_runs_containers_on_our_plugin_and_rm_leaves_nothing(podman):
    cli("cni", "install", "--subnet", SUBNET, "--chain", "portmap", check=True)
    nat_before, filter_before = iptables_rules("nat"), iptables_rules("filter")
    assert "cnikit" in podman("network", "ls", "--format", "{{.Name}}").stdout.split()
    podman("run", "-d", "--name", "c1", "--network", "cnikit", IMAGE, "sleep", "120")
    c1 = podman("inspect", "-f", "{{.Id}}", "c1").stdout.strip()
    ip1 = allocations("cnikit")[c1]
    assert ipaddress.ip_address(ip1) in ipaddress.ip_network(SUBNET)
    assert len(veths()) == 1 and "cni0" in links()
    assert [f for f in os.listdir("/var/lib/cni/results") if c1 in f] == [f"cnikit-{c1}-eth0"]   # libcni's cache
    proc = podman("run", "--name", "c2", "--network", "cnikit", IMAGE, "sh", "-c",
                  f"ip -4 -o addr show dev eth0 && ping -c 1 -W 2 {ip1} && ping -c 1 -W 2 {GATEWAY}", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "inet 10.244.11." in proc.stdout and f"{ip1}: seq=0" in proc.stdout and f"{GATEWAY}: seq=0" in proc.stdout
    with open(cnikit.CNI_LOG) as f:
        log = f.read()
    assert "VERSION" in log and "ADD" in log and c1 in log      # podman called ours, with its 64-hex id
    podman("rm", "-f", "-t", "0", "c1", "c2")
    assert veths() == []
    assert allocations("cnikit") == {}
    assert iptables_rules("nat") == nat_before and iptables_rules("filter") == filter_before
    assert [f for f in os.listdir("/var/lib/cni/results") if "cnikit" in f] == []     # rm dropped it
    assert [n for n in os.listdir("/run/netns") if n.startswith("netns-")] == []


def test_podman_reference_bridge_baseline_on_the_same_machine(podman):
    """The same flow with the reference bridge + host-local: what the bench compares against."""
    os.makedirs("/etc/cni/net.d", exist_ok=True)
    with open("/etc/cni/net.d/20-ref.conflist", "w") as f:
        json.dump({"cniVersion": "1.0.0", "name": "ref", "plugins": [
            {"type": "bridge", "bridge": "cni1", "isGateway": True, "ipMasq": True,
             "ipam": {"type": "host-local", "subnet": "10.244.12.0/24"}}]}, f)
    proc = podman("run", "--rm", "--network", "ref", IMAGE, "ping", "-c", "1", "-W", "2", "10.244.12.1", check=False)
    assert proc.returncode == 0, proc.stderr
    assert allocations("ref") == {} and veths() == []
