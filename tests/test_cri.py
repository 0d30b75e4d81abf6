"""containerd's CRI service (what kubelet calls) runs pods on our plugin: two pods through
RunPodSandbox get addresses from our plugin (installed by `cnikit cni install`, portmap
chained), reach each other, a hostPort mapped through the chained portmap answers from the
node, and StopPodSandbox + RemovePodSandbox (two DELs, the second without netns or
prevResult) leave no link, IPAM file, cache entry, netns or rule. The same flow with the
reference bridge + host-local is the baseline bench/container_start.py compares against.

containerd is started by the fixture (setsid, own root/state/socket, CRI plugin on,
sandbox image built locally from busybox-static: nothing is pulled) and stopped by its pid.
The gRPC client is tests/cri.py, run as a command for each call."""
import ipaddress
import json
import os
import re
import subprocess
import sys

import pytest

from kernel import cli, iptables_rules, veths
from runtimes import Containerd, allocations, runtime_session, wait_for

HERE = os.path.dirname(os.path.abspath(__file__))
CLIENT = [sys.executable, os.path.join(HERE, "cri.py")]
OURS_BIN = "/opt/cni/bin"                 # where `cnikit cni install` puts the plugin
REFERENCE_BIN = "/usr/lib/cni"            # Debian's reference plugins (portmap included)
CONF_DIR = "/etc/cni/net.d"
NODE_IP = "198.51.100.10"                 # the node's own address (on the sandbox's lo: no dummy module here)
HOST_PORT, POD_PORT = 8080, 80
# What the reference portmap keeps once the last mapping is gone, by design: its top-level
# chains and their jumps, shared by every pod. Nothing in them names a pod.
PORTMAP_SHARED = re.compile(r"^-A (PREROUTING|OUTPUT|POSTROUTING) .*-j CNI-HOSTPORT-(DNAT|MASQ)$"
                            r"|^-A CNI-HOSTPORT-(MASQ|SETMARK) ")


def cri_call(c, *args):
    """One CRI call through tests/cri.py; its JSON answer."""
    proc = subprocess.run(CLIENT + [c.sock, *args], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"cri {' '.join(args)}: {proc.stderr.strip()}"
    return json.loads(proc.stdout)


@pytest.fixture(params=["ours", "reference"])
def cri(request):
    """(flavour, containerd with its CRI on BIN_DIR and CONF_DIR)."""
    bin_dir = OURS_BIN if request.param == "ours" else REFERENCE_BIN
    os.makedirs(OURS_BIN, exist_ok=True)
    with runtime_session(lambda d: Containerd(d, cri=(bin_dir, CONF_DIR)), "cr") as c:
        yield request.param, c


def install(flavour, subnet):
    """The network as a user sets it up: ours by `cnikit cni install --chain portmap`
    (the CRI looks in one bin_dir and runs `loopback` for every pod itself, so the reference
    portmap and loopback are linked beside ours, as a node ships them); the reference spelled
    out as a conflist."""
    if flavour == "ours":
        for plugin in ("portmap", "loopback"):
            os.symlink(os.path.join(REFERENCE_BIN, plugin), os.path.join(OURS_BIN, plugin))
        cli("cni", "install", "--subnet", subnet, "--chain", "portmap", check=True)
        return "cnikit"
    os.makedirs(CONF_DIR, exist_ok=True)
    with open(os.path.join(CONF_DIR, "10-ref.conflist"), "w") as f:
        json.dump({"cniVersion": "1.0.0", "name": "ref", "plugins": [
            {"type": "bridge", "bridge": "cni0", "isGateway": True, "isDefaultGateway": True, "ipMasq": True,
             "ipam": {"type": "host-local", "subnet": subnet}},
            {"type": "portmap", "capabilities": {"portMappings": True}}]}, f)
    return "ref"


def files_naming(ids, tops=("/var/lib/cni", "/run/cni", "/run/cnikit")):
    """Files under TOPS (where CNI plugins and libcni keep state) whose name or content names one of IDS."""
    found = []
    for top in tops:
        for root, _, names in os.walk(top):
            for name in names:
                path = os.path.join(root, name)
                try:
                    with open(path, "rb") as f:
                        text = name.encode() + f.read(1 << 20)
                except OSError:
                    continue
                if any(i.encode() in text for i in ids):
                    found.append(path)
    return found


def fetch(addr, port):
    """What a TCP connection from the node to ADDR:PORT reads ('' when refused)."""
    proc = subprocess.run(["socat", "-T", "3", "-", f"TCP:{addr}:{port},connect-timeout=2"],
                          input="", capture_output=True, text=True, timeout=15)
    return proc.stdout.strip()


def test_cri_pods_ping_each_other_reach_a_hostport_and_leave_nothing(cri):
    flavour, c = cri
    subnet = "10.244.15.0/24" if flavour == "ours" else "10.244.16.0/24"
    net = install(flavour, subnet)
    subprocess.run(["ip", "addr", "add", f"{NODE_IP}/32", "dev", "lo"], check=True)
    nat_before, filter_before = iptables_rules("nat"), iptables_rules("filter")

    assert cri_call(c, "version")["runtime_name"] == "containerd"
    pod1 = cri_call(c, "run", "web", "--port", f"{HOST_PORT}:{POD_PORT}/tcp")["id"]
    pod2 = cri_call(c, "run", "client")["id"]
    s1, s2 = cri_call(c, "status", pod1), cri_call(c, "status", pod2)
    assert s1["state"] == s2["state"] == "SANDBOX_READY"
    # CNI_CONTAINERID is the sandbox id: the IPAM files name the pods
    assert allocations(net) == {pod1: s1["ip"], pod2: s2["ip"]} and s1["ip"] != s2["ip"]
    assert all(ipaddress.ip_address(s["ip"]) in ipaddress.ip_network(subnet) for s in (s1, s2))
    assert len(veths()) == 2 and files_naming((pod1,)) != []
    ns1, ns2 = (os.path.basename(s["netns"]) for s in (s1, s2))
    assert sorted(os.listdir("/run/netns")) == sorted([ns1, ns2])

    # pod <-> pod over the bridge
    for ns, peer in ((ns1, s2["ip"]), (ns2, s1["ip"])):
        proc = subprocess.run(["ip", "netns", "exec", ns, "ping", "-c", "1", "-W", "2", peer],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr

    # hostPort: the node's address, port 8080, lands on pod1's port 80 through portmap's DNAT
    server = subprocess.Popen(["ip", "netns", "exec", ns1, "socat", f"TCP-LISTEN:{POD_PORT},reuseaddr,fork",
                               f"SYSTEM:echo served-by-{flavour}-web"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: fetch(s1["ip"], POD_PORT) == f"served-by-{flavour}-web", 10)
        assert fetch(NODE_IP, HOST_PORT) == f"served-by-{flavour}-web"
        assert any(f"--dport {HOST_PORT}" in rule for rule in iptables_rules("nat"))
    finally:
        server.kill()
        server.wait()

    for pod in (pod1, pod2):
        cri_call(c, "stop", pod)
    assert veths() == [] and allocations(net) == {}            # the DEL at stop released everything
    for pod in (pod1, pod2):
        cri_call(c, "remove", pod)                             # a second DEL: no netns, no prevResult

    assert veths() == []
    assert allocations(net) == {}
    assert os.listdir("/run/netns") == []
    assert files_naming((pod1, pod2)) == []                    # IPAM, libcni's cache, the plugin's records
    nat_after = iptables_rules("nat")
    left = [r for r in nat_after if r not in nat_before and not PORTMAP_SHARED.search(r)]
    assert left == [], left
    assert not [r for r in nat_after if s1["ip"] in r or s2["ip"] in r or pod1[:12] in r or pod2[:12] in r]
    assert iptables_rules("filter") == filter_before
