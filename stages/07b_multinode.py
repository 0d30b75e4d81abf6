#!/usr/bin/env python3
"""Lesson 07b (beyond the classic lesson 07): a pod network across three nodes, flannel's
vxlan backend by hand. Each node runs our CNI plugin with its own pod subnet; one VXLAN
device per node, with no remote and no multicast, is told for each peer node where that
peer's VTEP lives (a forwarding entry) and what its MAC is (a neighbour entry), the way
flanneld does from what each node publishes.

    sudo make stage-07b                            # in a throwaway sandbox (make demo runs it too, after 07)
    python3 stages/07b_multinode.py --dry-run      # the lesson as a shell script

In the sandbox a node is a network namespace, so the nodes share one filesystem: each
gets its own config directory and network name (its own address files), which real
nodes get for free.
"""
import ipaddress
import itertools
import json
import os

from lesson import Lesson, Pods, bridge, cnikit, in_netns, ip

NODES = {   # node -> underlay address, pod subnet, its pod
    "node1": {"underlay": "10.0.8.1/24", "pods": "10.244.1.0/24", "pod": "pod1"},
    "node2": {"underlay": "10.0.8.2/24", "pods": "10.244.2.0/24", "pod": "pod2"},
    "node3": {"underlay": "10.0.8.3/24", "pods": "10.244.3.0/24", "pod": "pod3"},
}
VNI, VXLAN = 1, "vxlan0"          # flannel's device is flannel.1 (VNI 1)
MTU = 1500 - cnikit.VXLAN_OVERHEAD
CLUSTER_PODS = "10.244.0.0/16"    # every node's pod subnet lies in it (flannel's Network, kind's podSubnet)
# Masquerade stays on for traffic leaving the cluster, but never towards another pod (the
# Kubernetes model: no NAT between pods; flannel and kindnet exempt the whole cluster range);
# MTU leaves room for the 50 bytes VXLAN adds (inner Ethernet 14, VXLAN 8, UDP 8, outer IPv4 20).
POD_CONF = {"nonMasqueradeCIDRs": [CLUSTER_PODS], "mtu": MTU}
ECHO_PORT = 8080
UNDERLAY = "underlay0"            # the switch the nodes' eth0 plug into (the machines' LAN)
FLOOD = "00:00:00:00:00:00"


def conf_dir(node):
    return f"/etc/cni/{node}.d"


def net_name(node):
    return f"pods-{node}"


def underlay_ip(node):
    return NODES[node]["underlay"].split("/")[0]


def vtep_mac(node):
    """The node's VXLAN MAC. flanneld lets the kernel pick one and publishes it (a node
    annotation); the lesson sets one derived from the VTEP address so its script is
    the same every run: 02 (locally administered), then the VTEP address in hex."""
    return "02:00:" + ":".join(f"{b:02x}" for b in ipaddress.ip_address(vtep(node)).packed)


def peers(node):
    return [n for n in NODES if n != node]


LESSON = Lesson(
    "07b", "multinode",
    goal="pods on three nodes get addresses from distinct per-node subnets (our CNI plugin) and each "
         "reaches the others across the nodes through one VXLAN device per node, flannel's way: per-peer "
         "forwarding and neighbour entries, no flooding, no multicast",
    picture=r"""
   +------ node1 (netns) ------+   +------ node2 (netns) ------+   +------ node3 (netns) ------+
   | pod1 eth0 10.244.1.2      |   | pod2 eth0 10.244.2.2      |   | pod3 eth0 10.244.3.2      |
   |   | veth (our plugin)     |   |   | veth (our plugin)     |   |   | veth (our plugin)     |
   | cni0 10.244.1.1/24        |   | cni0 10.244.2.1/24        |   | cni0 10.244.3.1/24        |
   | vxlan0 10.244.1.0/32      |   | vxlan0 10.244.2.0/32      |   | vxlan0 10.244.3.0/32      |
   |  VNI 1, nolearning        |   |  VNI 1, nolearning        |   |  VNI 1, nolearning        |
   | per peer: route via its   |   |                           |   |                           |
   |  VTEP, neigh VTEP -> MAC, |   |        (the same)         |   |        (the same)         |
   |  fdb MAC -> underlay IP   |   |                           |   |                           |
   | eth0 10.0.8.1/24          |   | eth0 10.0.8.2/24          |   | eth0 10.0.8.3/24          |
   +-----------|---------------+   +-----------|---------------+   +-----------|---------------+
               +--------------- underlay0 (the LAN), UDP 4789 --------------+
""",
    skips={"routes": "no node knows the other nodes' pod subnets: pod1's packets to 10.244.2.0/24 "
                     "leave node1 by no route, the cross-node pings fail",
           "fdb": "vxlan0 knows each peer VTEP's MAC but not behind which node it lives, and has no "
                  "flood entry: the frames are dropped, the cross-node pings fail"},
    tools=("ip", "ping", "iptables", "bridge", "socat", "ss"),
    # --host: what the plugin and the config writes leave besides the lesson's own commands
    indirect={"paths": [conf_dir(n) for n in NODES]
              + [os.path.join(cnikit.CNI_DATA_DIR, net_name(n)) for n in NODES] + [cnikit.CNI_LOG]},
    state=Pods,             # what ADD returned for each pod
)


def pod_call(L, node):
    path = cnikit.cni_conf_file(conf_dir(node), net_name(node))
    net = cnikit.cni_parse(json.dumps(node_conflist(node)).encode(), path) if L.r.dry_run else None
    return cnikit.CniCall(NODES[node]["pod"], conf=path, net=net, ns=node, print_result=not L.r.quiet)


def node_conflist(node):
    return cnikit.cni_conflist(net_name(node), NODES[node]["pods"], extra=POD_CONF)


def vtep(node):
    """The node's VXLAN address: the network address of its pod subnet, as flannel does."""
    return str(ipaddress.ip_network(NODES[node]["pods"]).network_address)


def build(L, pods):
    r = L.r
    L.step("three nodes (namespaces standing for machines), each with its eth0 on one LAN, the underlay "
           "(here a bridge: the switch the machines are plugged into)")
    cnikit.bridge_add(r, UNDERLAY)
    for node in NODES:
        cnikit.netns_add(r, node, lo_up=True)
        cnikit.veth_add(r, f"u-{node}", "eth0", netns=node, peer_addr=NODES[node]["underlay"])
    cnikit.bridge_attach(r, UNDERLAY, [f"u-{node}" for node in NODES])

    L.step("each node gets its own pod subnet (kubernetes: the node's spec.podCIDR) and our plugin with "
           "a config saying so")
    for node in NODES:
        cnikit.cni_install(r, net_name(node), conf_dir=conf_dir(node), extra=POD_CONF,
                           subnet=NODES[node]["pods"])

    L.step("the runtime on each node ADDs a pod: the plugin runs on that node (ip netns exec NODE)")
    for node in NODES:
        pod = NODES[node]["pod"]
        cnikit.netns_add(r, pod, lo_up=True)
        try:
            pods[pod] = cnikit.cni_add(r, pod_call(L, node))
        except cnikit.CnikitError as e:
            L.say(f"    the runtime reports: {e}")

    L.step("one VXLAN device per node, as flannel.1: VNI 1, UDP 4789, from the node's own underlay "
           "address, with NO remote and no multicast group (it knows no peer yet) and `nolearning` (it "
           "will know only what it is told); its address is the network address of the node's pod "
           "subnet, its MAC what the node publishes (flanneld: a node annotation)")
    for node in NODES:
        cnikit.vxlan_add(r, VXLAN, VNI, local=underlay_ip(node), dev="eth0", mtu=MTU, ns=node,
                         learning=False)
        r.run(ip("link", "set", "dev", VXLAN, "address", vtep_mac(node), ns=node))
        cnikit.ensure_addrs(r, VXLAN, [vtep(node) + "/32"], ns=node)

    L.step("for each peer, what flanneld writes when it learns of a node: a neighbour entry (the "
           "peer VTEP's address has this MAC: no ARP ever needs to cross), so frames for it get that "
           "destination MAC")
    for node in NODES:
        for peer in peers(node):
            r.run(ip("neigh", "replace", vtep(peer), "lladdr", vtep_mac(peer), "dev", VXLAN, "nud", "permanent",
                     ns=node))

    if L.step("and a forwarding entry: that MAC lives behind the peer's underlay address, where vxlan0 "
              "sends the frame inside UDP. One entry per peer, no flood entry: nothing is broadcast",
              skip="fdb"):
        for node in NODES:
            for peer in peers(node):
                cnikit.vxlan_fdb_add(r, VXLAN, vtep_mac(peer), underlay_ip(peer), ns=node)

    if L.step("each node routes each peer's pod subnet into vxlan0, via that peer's VXLAN address "
              "(onlink: it is on no local subnet)", skip="routes"):
        for node in NODES:
            for o in peers(node):
                r.run(ip("route", "add", NODES[o]["pods"], "via", vtep(o), "dev", VXLAN, "onlink", ns=node),
                      creates=cnikit.Change.route(NODES[o]["pods"], node, via=vtep(o), dev=VXLAN))


def verify(L, pods):
    r = L.r
    addrs = {node: pods.ip(NODES[node]["pod"]) for node in NODES}
    for node, addr in addrs.items():
        inside = bool(addr) and ipaddress.ip_address(addr) in ipaddress.ip_network(NODES[node]["pods"])
        L.check(f"{NODES[node]['pod']} on {node} got {addr or 'no address'} from {node}'s subnet "
                f"{NODES[node]['pods']}", inside)
    b = addrs["node2"]
    ok, route = r.probe(ip("route", "get", b or "10.244.2.2", ns="node1"))
    L.check("node1 sends pod2's traffic into vxlan0", ok and f"dev {VXLAN}" in route)
    # vxlan0 also carries the nodes' own IPv6 chatter: only what moves during the ping counts.
    before = _tx_rx(r)
    L.check("pod1 (node1) reaches pod2 (node2) across the nodes", bool(b) and L.ping(b, "pod1"))
    after = _tx_rx(r)
    L.check(f"the ping went through node1's vxlan0 (tx {before[0]}->{after[0]}, rx {before[1]}->{after[1]})",
            after[0] > before[0] and after[1] > before[1])
    for src, dst in itertools.permutations(NODES, 2):
        if (src, dst) != ("node1", "node2"):
            L.check(f"{NODES[src]['pod']} ({src}) reaches {NODES[dst]['pod']} ({dst})",
                    bool(addrs[dst]) and L.ping(addrs[dst], NODES[src]["pod"]))
    L.say(f"no NAT between pods: pod2 answers each connection with the address it came from (socat), "
          f"and pod1 must come from its own address, not node1's ({CLUSTER_PODS} is exempt from masquerade)")
    server = r.spawn(in_netns(["socat", f"TCP-LISTEN:{ECHO_PORT},reuseaddr,fork", "SYSTEM:echo $SOCAT_PEERADDR"],
                              "pod2"))
    L.wait_listening(ECHO_PORT, "pod2")
    ok, seen = r.probe(in_netns(["socat", "-u", f"TCP:{b or '10.244.2.2'}:{ECHO_PORT},connect-timeout=2", "-"],
                                "pod1"))
    r.stop(server)
    L.check(f"pod2 sees pod1's own address {addrs['node1']}", ok and seen.strip() == addrs["node1"],
            f"it saw {seen.strip() or 'nothing'}")
    L.say("each vxlan0's forwarding table: one entry per peer (its VTEP MAC -> its underlay address), "
          "no flood entry; and its neighbour table: each peer VTEP's MAC, permanent")
    for node in NODES:
        fdb = r.query_json(bridge("-j", "fdb", "show", "dev", VXLAN, ns=node)) or []
        r.probe(bridge("fdb", "show", "dev", VXLAN, ns=node))
        told = {(e.get("mac"), e.get("dst")) for e in fdb if e.get("dst")}
        L.check(f"{node}'s vxlan0 sends to each peer's MAC at that peer's underlay address, and floods nowhere",
                told == {(vtep_mac(p), underlay_ip(p)) for p in peers(node)}, str(sorted(told)))
        _, neigh = r.probe(ip("neigh", "show", "dev", VXLAN, ns=node))
        L.check(f"{node} holds a permanent neighbour entry for each peer VTEP",
                all(f"{vtep(p)} lladdr {vtep_mac(p)} PERMANENT" in neigh for p in peers(node)), neigh)
    L.explore("then the lesson DELs the pods, and everything goes")
    if L.keeps_on_host():
        return
    for node in NODES:
        try:
            cnikit.cni_del(r, pod_call(L, node))
        except cnikit.CnikitError as e:
            L.say(f"    DEL: {e}")
def _tx_rx(r):
    """(tx_packets, rx_packets) of node1's vxlan0: a look-up, not a step."""
    data = r.query_json(ip("-s", "-j", "link", "show", "dev", VXLAN, ns="node1")) or [{}]
    stats = data[0].get("stats64", {})
    return stats.get("tx", {}).get("packets", 0), stats.get("rx", {}).get("packets", 0)


if __name__ == "__main__":
    LESSON.main(build, verify)
