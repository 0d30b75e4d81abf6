"""The machines learners really have (tests/host_profiles.py): a Docker host (FORWARD policy
DROP, br_netfilter with bridge-nf-call-iptables=1, rp_filter=1) and a kind node (rp_filter=1),
reproduced in the test's sandbox, and a real Docker host: dockerd from docker.io in a sandbox of
its own, containers running, one publishing a port (tests/docker_daemon.py; skipped, saying why,
where Docker is missing).  Every lesson passes there with --host (on a kind node: those a Docker host
would change, PROFILE_LESSONS says why), and so do two pods of our
plugin installed by `cnikit cni install` + `cni add`; nothing opens the host (the policy stays
DROP) and no rule of ours outlives cleanup or DEL; on the real Docker host, Docker still works
afterwards and its rules are byte-identical.  A lesson or verb that meets the Docker condition
says so in one line."""
import itertools
import json
import os
import re
import shlex
import subprocess

import pytest
import sh

import cnikit
from docker_daemon import IDLE, PUBLISHED, SERVED, WEB, DockerDaemon, http_get, iptables_save
from docker_daemon import docker_daemon  # noqa: F401  (a fixture)
from host_profiles import BR_NF, docker_host, docker_real, forward_policy, host_profile, kind_node  # noqa: F401
from host_state import host_state
from kernel import cli, iptables_rules, links, ping, run_stage
from plugin_helpers import CLASSIC, PLUGIN, cni, env_for, error, netns, ok, pod

STAGES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "stages")
# Every lesson and pitfall lab (their names start with a number), new ones included.
LESSONS = sorted(f[:-3] for f in os.listdir(STAGES) if f[:1].isdigit() and f.endswith(".py"))
DOCKER_NOTE = "# this host's FORWARD policy is DROP (Docker sets it)"


def bridge_note(name, tool="iptables"):
    which = "" if tool == "iptables" else f"{tool} "
    return re.compile(rf"^# this host's {which}FORWARD policy is DROP \(Docker sets it\) and br_netfilter sends "
                      rf"{name}'s switched frames through it \(bridge-nf-call-{tool}=1\): accept traffic between "
                      rf"{name}'s own ports$", re.M)


BRIDGE_NOTE = bridge_note("br0")
NAT_NOTE = "# this host's FORWARD policy is DROP (Docker sets it): only the FORWARD accept rules below let"
CNI_NOTE = "# this host's FORWARD policy is DROP (Docker sets it): a pod's forwarded traffic needs accept rules"
EGRESS_NOTE = "# this host's FORWARD policy is DROP (Docker sets it): the request was dropped in FORWARD"
SERVICES_NOTE = "# this host's FORWARD policy is DROP (Docker sets it): kube-proxy accepts Service traffic"
# The lines a lesson that meets the Docker condition says about it (a bridge on the host, egress, pods).
NOTES = {"03_bridge": [BRIDGE_NOTE], "04_tcp": [BRIDGE_NOTE], "05_egress": [BRIDGE_NOTE, EGRESS_NOTE, NAT_NOTE],
         "07_cni": [CNI_NOTE], "07b_multinode": [bridge_note("underlay0")],
         "05b_ports": [BRIDGE_NOTE, NAT_NOTE], "07d_services": [BRIDGE_NOTE, SERVICES_NOTE],
         "07e_container": [BRIDGE_NOTE, NAT_NOTE],
         "07f_dualstack": [BRIDGE_NOTE], "08_cost": [BRIDGE_NOTE, NAT_NOTE]}   # its ip6tables note follows ip6tables' policy: real Docker 20.10 keeps it
SUBNET, GATEWAY = "10.244.9.0/24", "10.244.9.1"
UPLINK, SERVER = "203.0.113.1/24", "203.0.113.10/24"


def said(out, note):
    return bool(note.search(out)) if isinstance(note, re.Pattern) else note in out


def ours(rules):
    return [rule for rule in rules if "cnikit" in rule or cnikit.CHAIN_PREFIX in rule]


def test_the_docker_profile_reproduces_what_docker_does(docker_host):
    assert forward_policy() == forward_policy("ip6tables") == "DROP"
    assert str(sh.sysctl("-n", "net.ipv4.conf.all.rp_filter")).strip() == "1"
    if docker_host.missing:
        pytest.skip("this kernel has no br_netfilter: " + ", ".join(docker_host.missing))
    with open(BR_NF) as f:
        assert f.read().strip() == "1"


# Every lesson on both Docker hosts: the strictest profile (docker_host: FORWARD DROP, br_netfilter and
# rp_filter=1) and the real daemon's rules (docker_real). kind_node's one condition, rp_filter=1, is
# docker_host's too, so there it runs the lessons that meet the Docker condition elsewhere: they must
# stay silent and open nothing on a host that does not drop (its other lessons would repeat docker_host).
PROFILE_LESSONS = [("docker_host", lesson) for lesson in LESSONS] + \
    [("kind_node", lesson) for lesson in LESSONS if lesson in NOTES] + [("docker_real", lesson) for lesson in LESSONS]


@pytest.mark.parametrize("host_profile, lesson", PROFILE_LESSONS, indirect=["host_profile"],
                         ids=[f"{profile}-{lesson}" for profile, lesson in PROFILE_LESSONS])
def test_every_lesson_passes_with_host_and_leaves_the_host_as_it_was(host_profile, lesson):
    before, rules = host_state(), iptables_save()
    proc = run_stage(lesson + ".py", "--host", timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    assert re.search(r"^PASS lesson ", proc.stdout, re.M), proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr
    assert host_state() == before            # the FORWARD policy and every rule included
    if host_profile.daemon:                  # Docker's chains byte-identical (every table, in order), Docker up
        assert iptables_save() == rules
        assert host_profile.daemon.broken() is None
    if host_profile.forward_drop:
        assert forward_policy() == "DROP"
    for note in NOTES.get(lesson, []):       # the pitfall is said, once a step meets it, and only then
        if isinstance(note, re.Pattern) and host_profile.missing:
            continue
        assert said(proc.stdout, note) == host_profile.forward_drop, (note, proc.stdout[:4000])
    assert (DOCKER_NOTE in proc.stdout) == (host_profile.forward_drop and lesson in NOTES)
    # the opening's list of what --host changes names the bridge rules the run then adds
    listed = proc.stdout.split("--host: this lesson changes this machine", 1)[1].splitlines()[1:]
    opening = "\n".join(itertools.takewhile(lambda line: line.startswith("#   "), listed))
    bridges = re.findall(r"-t filter -A FORWARD -i (\S+) -o \1 -m comment", proc.stdout)
    assert bool(bridges) == (host_profile.forward_drop and any(isinstance(n, re.Pattern) for n in NOTES.get(lesson, [])))
    for name in set(bridges):
        assert f"--comment 'cnikit bridge {name}' -j ACCEPT" in opening, opening


def _internet():
    """A namespace "internet" behind an uplink of this (sandbox) host, documentation addresses."""
    sh.ip("netns", "add", "internet")
    sh.ip("link", "add", "uplink0", "type", "veth", "peer", "name", "eth0", "netns", "internet")
    sh.ip("addr", "add", UPLINK, "dev", "uplink0")
    sh.ip("link", "set", "uplink0", "up")
    sh.ip("-n", "internet", "addr", "add", SERVER, "dev", "eth0")
    sh.ip("-n", "internet", "link", "set", "eth0", "up")
    sh.ip("-n", "internet", "link", "set", "lo", "up")
    return SERVER.split("/")[0]


def _pod_ip(ns):
    data = json.loads(str(sh.ip("-n", ns, "-j", "-4", "addr", "show", "dev", "eth0")))
    return data[0]["addr_info"][0]["local"]


def test_two_plugin_pods_reach_each_other_the_gateway_and_the_internet(host_profile):
    rules_before = {t: iptables_rules(t) for t in ("filter", "nat")}
    cli("cni", "install", "--subnet", SUBNET, check=True)
    server = _internet()
    for name in ("pod1", "pod2"):
        cli("netns", "add", name, check=True)
        add = cli("cni", "add", name, check=True)
        assert ("FORWARD policy is DROP" in add.stdout) == host_profile.forward_drop
    a, b = _pod_ip("pod1"), _pod_ip("pod2")
    assert ping(b, "pod1") and ping(a, "pod2")                       # same bridge (br_netfilter: FORWARD)
    assert ping(GATEWAY, "pod1") and ping(GATEWAY, "pod2")
    assert ping(server, "pod1") and ping(server, "pod2")            # routed through FORWARD, masqueraded
    # The internet may route to the pods (a neighbour on the uplink could): a Docker host still lets no
    # new connection in, since the plugin accepts the pod's own traffic and replies, not everyone's.
    sh.ip("-n", "internet", "route", "add", SUBNET, "via", UPLINK.split("/")[0])
    assert ping(a, "internet") == (not host_profile.forward_drop)
    filter_rules = ours(iptables_rules("filter"))
    assert filter_rules and all('--comment "cnikit name: cnikit id: pod' in r for r in filter_rules)
    assert not any(" -j ACCEPT" in r and " -s " not in r and " -d " not in r for r in filter_rules), filter_rules
    cli("cni", "check", "pod1", check=True)
    for name in ("pod1", "pod2"):
        cli("cni", "del", name, check=True)
    assert {t: iptables_rules(t) for t in ("filter", "nat")} == rules_before
    if host_profile.forward_drop:
        assert forward_policy() == "DROP"


def test_plugin_pods_on_a_real_docker_host_then_cleanup_leaves_docker_as_it_was(docker_real):
    """A real dockerd with containers running, one publishing a port: two pods of our plugin
    reach each other, their gateway, a Docker container and the published port; `cnikit cleanup`
    then removes what cnikit made, and only that: Docker still works and its rules (every table,
    in order) are byte-identical to before, packet and byte counters aside."""
    docker = docker_real.daemon
    links_before, rules_before = sorted(links()), iptables_save()
    cli("cni", "install", "--subnet", SUBNET, check=True)
    for name in ("pod1", "pod2"):
        cli("netns", "add", name, check=True)
        cli("cni", "add", name, check=True)
    a, b = _pod_ip("pod1"), _pod_ip("pod2")
    assert ping(b, "pod1") and ping(a, "pod2")
    assert ping(GATEWAY, "pod1") and ping(GATEWAY, "pod2")
    for name in (IDLE, WEB):
        assert ping(docker.address(name), "pod1"), name          # routed to docker0, through FORWARD
    assert http_get(GATEWAY, PUBLISHED, ns="pod2") is None      # Docker's DNAT, then FORWARD to docker0
    assert http_get(docker.address(WEB), SERVED, ns="pod1") is None
    out = cli("cleanup", check=True).stdout
    assert "removed" in out
    assert ours(iptables_rules("filter")) == [] and ours(iptables_rules("nat")) == []
    assert sorted(links()) == links_before                        # docker0 and its container ports stay
    assert iptables_save() == rules_before
    assert forward_policy() == "DROP"
    assert docker.broken() is None
    assert "nothing of cnikit's is left" in cli("cleanup", check=True).stdout


def test_where_docker_is_missing_the_real_profile_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))                     # no dockerd on it
    assert DockerDaemon().start() == "Docker is not installed (make deps installs docker.io)"


def test_without_the_plugins_accept_chain_a_docker_host_drops_pod_traffic(docker_host):
    """The profile is real: the same two pods with forwardAccept off cannot reach each other
    across the bridge nor the internet; with it (the default) they can."""
    if docker_host.missing:
        pytest.skip("this kernel has no br_netfilter: " + ", ".join(docker_host.missing))
    server = _internet()
    closed = dict(CLASSIC, name="closed", forwardAccept=False, ipam={"subnet": "10.244.8.0/24"})
    a = pod("c1", closed)["ips"][0]["address"].split("/")[0]
    pod("c2", closed)
    assert not ping(a, "c2") and not ping(server, "c2")
    assert ping("10.244.8.1", "c2")                                 # the gateway is the host: INPUT, not FORWARD
    assert not [r for r in iptables_rules("filter") if "closed" in r]
    opened = dict(CLASSIC, name="open", bridge="cni1", ipam={"subnet": "10.244.7.0/24"})
    b = pod("o1", opened)["ips"][0]["address"].split("/")[0]
    pod("o2", opened)
    assert ping(b, "o2") and ping(server, "o2")
    assert not ping(b, "c2")             # nobody else's traffic: another network's pod is no peer of o1
    for cid, conf in (("c1", closed), ("c2", closed), ("o1", opened), ("o2", opened)):
        ok(cni("DEL", conf, cid=cid))
    assert ours(iptables_rules("filter")) == [] and ours(iptables_rules("nat")) == []
    assert forward_policy() == "DROP"


def test_a_failed_add_rolls_back_the_accept_chain_of_the_family_that_went_in(docker_host):
    """Dual stack: IPv4's chains go in, ip6tables-restore fails: nothing of IPv4's stays."""
    os.makedirs("/run/cni/fakebin")
    with open("/run/cni/fakebin/ip6tables-restore", "w") as f:
        f.write("#!/bin/sh\necho 'ip6tables-restore: simulated failure' >&2\nexit 4\n")
    os.chmod("/run/cni/fakebin/ip6tables-restore", 0o755)
    netns("p1")
    conf = dict(CLASSIC, ipam={"ranges": [[{"subnet": "10.244.6.0/24"}], [{"subnet": "fd00:6::/64"}]]})
    res = cni("ADD", conf, cid="p1", PATH="/run/cni/fakebin:/usr/sbin:/usr/bin:/sbin:/bin")
    assert "simulated failure" in error(res, 102)["details"]
    assert ours(iptables_rules("filter")) == [] and ours(iptables_rules("nat")) == []
    assert cnikit.CHAIN_PREFIX not in str(sh.iptables("-S")) + str(sh.iptables("-t", "nat", "-S"))


def test_check_and_gc_know_the_accept_chain(docker_host):
    conf = dict(CLASSIC, cniVersion="1.1.0", ipam={"subnet": "10.244.5.0/24"})
    res = pod("p1", conf)
    pod("p2", conf)
    chain = next(r.split()[-1] for r in iptables_rules("filter") if "id: p1 if" in r and r.startswith("-A FORWARD"))
    ok(cni("CHECK", dict(conf, prevResult=res), cid="p1"))
    for jump in [r for r in iptables_rules("filter") if r.startswith("-A FORWARD") and r.endswith(chain)]:
        sh.iptables("-D", *shlex.split(jump)[1:])
    sh.iptables("-F", chain)
    sh.iptables("-X", chain)
    assert f"filter chain {chain} is missing" in error(cni("CHECK", dict(conf, prevResult=res), cid="p1"), 100)["msg"]
    gc = dict(conf, **{"cni.dev/valid-attachments": [{"containerID": "p1", "ifname": "eth0"}]})
    ok(cni("GC", gc))
    left = ours(iptables_rules("filter")) + ours(iptables_rules("nat"))
    assert left and not any("id: p2 " in r for r in left)          # p2's chains went, in both tables
    ok(cni("DEL", conf, cid="p1"))
    assert ours(iptables_rules("filter")) == [] and ours(iptables_rules("nat")) == []


def test_bridge_add_on_a_docker_host_accepts_its_own_ports_and_says_why(docker_host):
    if docker_host.missing:
        pytest.skip("this kernel has no br_netfilter: " + ", ".join(docker_host.missing))
    for ns, addr in (("ns1", "10.0.3.2/24"), ("ns2", "10.0.3.3/24")):
        cli("netns", "add", ns, check=True)
        cli("veth", "add", f"veth-{ns}", "eth0", "--netns", ns, "--peer-addr", addr, check=True)
    out = cli("bridge", "add", "br0", "--addr", "10.0.3.1/24", check=True).stdout
    assert len(BRIDGE_NOTE.findall(out)) == 1 and len(bridge_note("br0", "ip6tables").findall(out)) == 1
    cli("bridge", "attach", "br0", "veth-ns1", "veth-ns2", check=True)
    rule = ["-A FORWARD -i br0 -o br0 -m comment --comment \"cnikit bridge br0\" -j ACCEPT"]
    assert iptables_rules("filter") == rule == ip6tables_forward()      # the same accept for bridged IPv6
    assert ping("10.0.3.3", "ns1")
    for ns, addr in (("ns1", "fd03::2/64"), ("ns2", "fd03::3/64")):
        sh.ip("-n", ns, "addr", "add", addr, "dev", "eth0", "nodad")
    assert ping("fd03::3", "ns1")                                       # switched IPv6 passes ip6tables too
    again = cli("bridge", "add", "br0", "--addr", "10.0.3.1/24", check=True).stdout
    assert "already present" in again and iptables_rules("filter") == rule      # re-run: not twice
    sh.iptables("-D", "FORWARD", "-i", "br0", "-o", "br0", "-m", "comment", "--comment", "cnikit bridge br0",
                "-j", "ACCEPT")
    assert not ping("10.0.3.3", "ns1")                              # the rule is what lets it through
    cli("bridge", "add", "br0", check=True)
    cli("bridge", "del", "br0", check=True)
    assert iptables_rules("filter") == [] == ip6tables_forward() and forward_policy() == "DROP"
    cli("bridge", "add", "br0", check=True)
    assert "removed" in cli("cleanup", check=True).stdout and iptables_rules("filter") == [] == ip6tables_forward()


def ip6tables_forward():
    return [l for l in str(sh.ip6tables("-w", "-S", "FORWARD")).splitlines() if l.startswith("-A ")]


def test_bridge_add_on_a_clean_host_or_kind_node_adds_no_rule(kind_node):
    out = cli("bridge", "add", "br0", "--addr", "10.0.3.1/24", check=True).stdout
    assert "FORWARD" not in out and iptables_rules("filter") == []
    if not os.path.exists(BR_NF):
        return
    sh.iptables("-P", "FORWARD", "DROP")
    sh.sysctl("-w", "net.bridge.bridge-nf-call-iptables=0")      # DROP, but bridged frames skip iptables
    out = cli("bridge", "add", "br1", check=True).stdout
    assert "FORWARD" not in out and iptables_rules("filter") == []


def _node_cni(node, command, conf, cid):
    """Run the plugin inside NODE's network namespace, as its runtime would."""
    env = env_for(command, cid=cid, netns=f"/run/netns/{cid}")
    proc = subprocess.run(["ip", "netns", "exec", node, PLUGIN], input=json.dumps(conf).encode(), env=env,
                          capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout) if proc.stdout.strip() else None


@pytest.mark.parametrize("cluster_range", [True, False])
def test_pods_on_two_docker_host_nodes_reach_each_other_with_the_cluster_range_as_peers(cluster_range):
    """Two nodes that are Docker hosts themselves (policy DROP in each), our plugin on each with
    its own /24, routes between the nodes. With the cluster pod range in nonMasqueradeCIDRs a pod
    reaches the other node's pod unmasqueraded and is let in there; without it the far node sees
    a new connection from the near node's address, which is nobody's peer, and drops it."""
    for node in ("node1", "node2"):
        sh.ip("netns", "add", node)
        sh.ip("netns", "exec", node, "sh", "-c", "iptables -P FORWARD DROP && ip link set lo up && "
              "sysctl -qw net.ipv4.conf.all.rp_filter=1 net.ipv4.conf.default.rp_filter=1")
    sh.ip("-n", "node1", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", "node2")
    for i, node in enumerate(("node1", "node2"), 1):
        sh.ip("-n", node, "addr", "add", f"198.51.100.{i}/24", "dev", "eth0")
        sh.ip("-n", node, "link", "set", "eth0", "up")
        sh.ip("-n", node, "route", "add", f"10.244.{3 - i}.0/24", "via", f"198.51.100.{3 - i}")
    confs = {i: dict(CLASSIC, ipam={"subnet": f"10.244.{i}.0/24", "dataDir": f"/run/cni/node{i}"},
                     **({"nonMasqueradeCIDRs": ["10.244.0.0/16"]} if cluster_range else {})) for i in (1, 2)}
    addrs = {}
    for i, node in enumerate(("node1", "node2"), 1):
        netns(f"pod{i}")
        addrs[i] = _node_cni(node, "ADD", confs[i], f"pod{i}")["ips"][0]["address"].split("/")[0]
        assert ping(f"10.244.{i}.1", f"pod{i}")
    assert ping(addrs[2], "pod1") == cluster_range and ping(addrs[1], "pod2") == cluster_range
    for i, node in enumerate(("node1", "node2"), 1):
        _node_cni(node, "DEL", confs[i], f"pod{i}")
        assert ours(iptables_rules("filter", node)) == [] and ours(iptables_rules("nat", node)) == []
        assert "-P FORWARD DROP" in str(sh.ip("netns", "exec", node, "iptables", "-S", "FORWARD"))
