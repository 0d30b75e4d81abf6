#!/usr/bin/env python3
"""Lesson 07b (beyond the classic lesson 07): a pod network across two nodes, flannel's
vxlan backend by hand. Each node runs our CNI plugin with its own pod subnet; a VXLAN
device per node carries pod traffic to the other node.

    sudo make stage-07b                            # in a throwaway sandbox (not in make demo: it is beyond lesson 07)
    python3 stages/07b_multinode.py --dry-run      # the lesson as a shell script

In the sandbox a node is a network namespace, so the nodes share one filesystem: each
gets its own config directory and network name (its own address files), which real
nodes get for free.
"""
import ipaddress
import json

from lesson import Lesson, cnikit, ip, pod_ip

NODES = {   # node -> underlay address, pod subnet, its pod
    "node1": {"underlay": "10.0.8.1/24", "pods": "10.244.1.0/24", "pod": "pod1"},
    "node2": {"underlay": "10.0.8.2/24", "pods": "10.244.2.0/24", "pod": "pod2"},
}
VNI, VXLAN = 1, "vxlan0"          # flannel's device is flannel.1 (VNI 1)
MTU = 1500 - cnikit.VXLAN_OVERHEAD

def conf_dir(node):
    return f"/etc/cni/{node}.d"


def net_name(node):
    return f"pods-{node}"


LESSON = Lesson(
    "07b", "multinode",
    goal="pods on two nodes get addresses from distinct per-node subnets (our CNI plugin) and "
         "reach each other across the nodes through VXLAN, like flannel's vxlan backend",
    picture=r"""
   +----------- node1 (netns) -----------+          +----------- node2 (netns) -----------+
   | pod1 eth0 10.244.1.2                |          | pod2 eth0 10.244.2.2                |
   |   | veth (our plugin, ADD)          |          |   | veth (our plugin, ADD)          |
   | cni0 10.244.1.1/24                  |          | cni0 10.244.2.1/24                  |
   | route 10.244.2.0/24 via 10.244.2.0  |          | route 10.244.1.0/24 via 10.244.1.0  |
   |       dev vxlan0 onlink             |          |       dev vxlan0 onlink             |
   | vxlan0 10.244.1.0/32 (VNI 1)        |          | vxlan0 10.244.2.0/32 (VNI 1)        |
   | eth0 10.0.8.1/24 ===== underlay (veth), UDP 4789 ===== eth0 10.0.8.2/24          |
   +-------------------------------------+          +-------------------------------------+
""",
    skips={"routes": "no node knows the other node's pod subnet: pod1's packets to 10.244.2.0/24 "
                     "leave node1 by no route, the cross-node ping fails"},
    tools=("ip", "ping", "iptables", "bridge"),
    # --host: what the plugin and the config writes leave besides the lesson's own commands
    indirect={"paths": [conf_dir(n) for n in ("node1", "node2")]
              + [f"/var/lib/cni/networks/{net_name(n)}" for n in ("node1", "node2")] + [cnikit.CNI_LOG]},
)


def pod_call(L, node):
    path = cnikit.cni_conf_file(conf_dir(node), net_name(node))
    net = cnikit.cni_parse(json.dumps(node_conflist(node)).encode(), path) if L.r.dry_run else None
    return cnikit.CniCall(NODES[node]["pod"], conf=path, net=net, host=node, print_result=not L.r.quiet)


def node_conflist(node):
    # ipMasq off: pod-to-pod traffic across nodes keeps the pod's address (flannel leaves the
    # cluster CIDR unmasqueraded); MTU leaves room for the 50 bytes of VXLAN headers.
    return cnikit.cni_conflist(net_name(node), NODES[node]["pods"], extra={"ipMasq": False, "mtu": MTU})


def vtep(node):
    """The node's VXLAN address: the network address of its pod subnet, as flannel does."""
    return str(ipaddress.ip_network(NODES[node]["pods"]).network_address)


def other(node):
    return "node2" if node == "node1" else "node1"


def build(L):
    r = L.r
    L.stage = {}
    L.step("two nodes (namespaces standing for machines) on one underlay link")
    for node in NODES:
        cnikit.netns_add(r, node, lo_up=True)
    cnikit.veth_add(r, "eth0", "eth0", netns="node2", addr=NODES["node1"]["underlay"],
                    peer_addr=NODES["node2"]["underlay"], host="node1")

    L.step("each node gets its own pod subnet (kubernetes: the node's spec.podCIDR) and our plugin with "
           "a config saying so")
    for node in NODES:
        cnikit.cni_install(r, net_name(node), conf_dir=conf_dir(node), extra={"ipMasq": False, "mtu": MTU},
                           subnet=NODES[node]["pods"])

    L.step("the runtime on each node ADDs a pod: the plugin runs on that node (ip netns exec NODE)")
    for node in NODES:
        pod = NODES[node]["pod"]
        cnikit.netns_add(r, pod, lo_up=True)
        try:
            L.stage[pod] = cnikit.cni_add(r, pod_call(L, node))
        except cnikit.CnikitError as e:
            L.say(f"    the runtime reports: {e}")

    L.step("a VXLAN device per node (VNI 1, UDP 4789) towards the other node; its address is the "
           "network address of the node's pod subnet, as flannel.1's is")
    for node in NODES:
        peer = NODES[other(node)]["underlay"].split("/")[0]
        cnikit.vxlan_add(r, VXLAN, VNI, remote=peer, dev="eth0", mtu=MTU, host=node)
        cnikit.ensure_addrs(r, VXLAN, [vtep(node) + "/32"], ns=node)

    if L.step("each node routes the other node's pod subnet into the VXLAN device, via the other "
              "node's VXLAN address (onlink: it is not on any local subnet)", skip="routes"):
        for node in NODES:
            o = other(node)
            r.run(ip("route", "add", NODES[o]["pods"], "via", vtep(o), "dev", VXLAN, "onlink", ns=node),
                  creates=cnikit.Change.route(NODES[o]["pods"], node, via=vtep(o), dev=VXLAN))


def verify(L):
    r = L.r
    a, b = pod_ip(L, "pod1"), pod_ip(L, "pod2")
    for node, addr in (("node1", a), ("node2", b)):
        inside = bool(addr) and ipaddress.ip_address(addr) in ipaddress.ip_network(NODES[node]["pods"])
        L.check(f"{NODES[node]['pod']} on {node} got {addr or 'no address'} from {node}'s subnet "
                f"{NODES[node]['pods']}", inside)
    ok, route = r.probe(ip("route", "get", b or "10.244.2.2", ns="node1"))
    L.check("node1 sends pod2's traffic into vxlan0", ok and f"dev {VXLAN}" in route)
    # vxlan0 also carries the nodes' own IPv6 chatter: only what moves during the ping counts.
    before = _tx_rx(r)
    L.check("pod1 (node1) reaches pod2 (node2) across the nodes", bool(b) and L.ping(b, "pod1"))
    after = _tx_rx(r)
    L.check("pod2 (node2) reaches pod1 (node1) across the nodes", bool(a) and L.ping(a, "pod2"))
    r.probe(ip("-s", "link", "show", "dev", VXLAN, ns="node1"))
    L.check(f"the ping went through node1's vxlan0 (tx {before[0]}->{after[0]}, rx {before[1]}->{after[1]})",
            after[0] > before[0] and after[1] > before[1])
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
