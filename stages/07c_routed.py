#!/usr/bin/env python3
"""Lesson 07c (beyond the classic lesson 07): the routed model, side by side with the bridge
model of lessons 03 and 07. Our CNI plugin builds both: `"mode": "routed"` in its config
gives each pod a /32, a default route via the host end of its veth, which holds the gateway
as a /32, and a host route `/32 dev veth` — no bridge at all. That layout is the reference
`ptp` plugin's. Calico routes pods the same way with another trick for the gateway: every
pod's default route points at 169.254.1.1, an address no interface holds, and the host end
of the veth answers ARP for it (proxy ARP) without an address of its own.

    sudo python3 stages/07c_routed.py              # in a throwaway sandbox
    python3 stages/07c_routed.py --dry-run         # the lesson as a shell script

Two nodes (namespaces standing for machines) with two pods each: one node runs the
plugin in bridge mode, the other in routed mode. The lesson then compares what ARP
learns in each and what a packet to the other pod passes through.
"""
import ipaddress
import json
import os

from lesson import PING, Lesson, Pods, cnikit, in_netns, ip, plugin_host_ends

NODES = {   # node -> plugin mode, pod subnet, its two pods
    "bridged": {"mode": "bridge", "pods": "10.244.1.0/24", "names": ("bpod1", "bpod2")},
    "routed": {"mode": "routed", "pods": "10.244.2.0/24", "names": ("rpod1", "rpod2")},
}
TTL = 64                     # what a Linux ping reply starts with; each router on the way takes one off


def conf_dir(node):
    return f"/etc/cni/{node}.d"


def net_name(node):
    return f"pods-{node}"


def gateway(node):
    return str(ipaddress.ip_network(NODES[node]["pods"]).network_address + 1)


def extra(node):
    # No masquerade: this lesson has no egress; pod-to-pod traffic never leaves the node.
    return {"ipMasq": False, **({"mode": "routed"} if NODES[node]["mode"] == "routed" else {})}


LESSON = Lesson(
    "07c", "routed",
    goal="our CNI plugin builds the routed model (pod /32, default via the host end of its veth, host route "
         "/32 dev veth, no bridge) beside the bridge model: in the bridge model a pod ARPs for the other "
         "pod and the bridge switches the frame; in the routed model a pod only ever ARPs for its gateway "
         "and the node routes every packet (the TTL drops by one)",
    picture=r"""
   +---------------- bridged (netns) ----------------+  +---------------- routed (netns) -----------------+
   |  mode bridge: one layer-2 segment                |  |  mode routed: point-to-point, no bridge          |
   |            cni0 10.244.1.1/24                    |  |  host routes: 10.244.2.2 dev vethA               |
   |           /                 \                    |  |               10.244.2.3 dev vethB               |
   |   veth (port)          veth (port)               |  |  vethA 10.244.2.1/32    vethB 10.244.2.1/32      |
   |      |                      |                    |  |      |                      |                    |
   |  bpod1 eth0            bpod2 eth0                |  |  rpod1 eth0             rpod2 eth0               |
   |  10.244.1.2/24         10.244.1.3/24             |  |  10.244.2.2/32          10.244.2.3/32            |
   |  default via 10.244.1.1                          |  |  10.244.2.1 dev eth0 scope link                  |
   |                                                  |  |  default via 10.244.2.1                          |
   +--------------------------------------------------+  +--------------------------------------------------+
""",
    skips={"host-route": "the lesson deletes the /32 route the plugin gave rpod2 on its node: the node "
                         "no longer knows which veth leads to 10.244.2.3 and answers rpod1 with "
                         "'Destination Net Unreachable': rpod1 cannot reach rpod2"},
    tools=("ip", "ping"),
    indirect={"paths": [conf_dir(n) for n in NODES]
              + [os.path.join(cnikit.CNI_DATA_DIR, net_name(n)) for n in NODES] + [cnikit.CNI_LOG]},
    state=Pods,             # what ADD returned for each pod
)


def pod_call(L, node, pod):
    path = cnikit.cni_conf_file(conf_dir(node), net_name(node))
    net = None
    if L.r.dry_run:
        conflist = cnikit.cni_conflist(net_name(node), NODES[node]["pods"], extra=extra(node))
        net = cnikit.cni_parse(json.dumps(conflist).encode(), path)
    return cnikit.CniCall(pod, conf=path, net=net, ns=node, print_result=not L.r.quiet)


def host_end(pods, pod):
    """The host end of POD's veth: what the plugin's result names outside the pod, the
    bridge excepted (a routed node has none)."""
    return min(pods.host_ends(pod), default="")


def build(L, pods):
    r = L.r
    L.step("two nodes (namespaces standing for machines): the same plugin, in bridge mode on one and in "
           "routed mode (`\"mode\": \"routed\"` in its config) on the other")
    for node in NODES:
        cnikit.netns_add(r, node, lo_up=True)
        cnikit.cni_install(r, net_name(node), conf_dir=conf_dir(node), extra=extra(node),
                           subnet=NODES[node]["pods"])

    L.step("the runtime ADDs two pods on each node")
    for node, spec in NODES.items():
        for pod in spec["names"]:
            cnikit.netns_add(r, pod, lo_up=True)
            try:
                pods[pod] = cnikit.cni_add(r, pod_call(L, node, pod))
            except cnikit.CnikitError as e:
                L.say(f"    the runtime reports: {e}")

    L.step("a routed pod: its address is a /32, a subnet of one, so no other address is on its link; "
           "it reaches the gateway through a link route (`scope link`: on the wire, no router needed) and "
           "everything else via it")
    r.show(ip("-br", "addr", "show", "dev", "eth0", ns="rpod1"))
    r.show(ip("route", "show", ns="rpod1"))

    L.step("the routed node: no bridge; the host end of each pod's veth holds the gateway address as /32 "
           "(all of them the same one: an address belongs to an interface), and one host route per pod, "
           "`/32 dev veth`, says which cable leads to which pod")
    r.show(ip("-br", "addr", "show", ns="routed"))
    r.show(ip("route", "show", ns="routed"))

    if not L.step("those host routes, added by the plugin at ADD, are the only thing that tells the node "
                  "which cable leads to which pod", skip="host-route"):
        rpod2 = pods.ip("rpod2") or "10.244.2.3"
        r.run(ip("route", "del", f"{rpod2}/32", ns="routed"))
        r.show(ip("route", "show", ns="routed"))

    L.step("the bridged node for comparison: one route for the whole subnet, into cni0, the switch")
    r.show(ip("route", "show", ns="bridged"))


def verify(L, pods):
    r = L.r
    for node, spec in NODES.items():
        for pod in spec["names"]:
            addr = pods.ip(pod)
            L.check(f"{pod} on {node} got {addr or 'no address'} from {spec['pods']}",
                    bool(addr) and ipaddress.ip_address(addr) in ipaddress.ip_network(spec["pods"]))
    gw_mac = (cnikit.get_link(r, host_end(pods, "rpod1"), "routed") or {}).get("address", "?") \
        if host_end(pods, "rpod1") else "?"

    L.say("")
    L.say("ARP: each first pod forgets its neighbours, pings the other pod, then shows whom it asked")
    for node, spec in NODES.items():
        first, second = spec["names"]
        r.run(ip("neigh", "flush", "dev", "eth0", ns=first))
        ok, out = r.probe(in_netns(list(PING) + [pods.ip(second) or "0.0.0.0"], first))
        L.check(f"{first} reaches {second} ({node})", ok)
        ttl = _ttl(out)
        L.say(f"the reply came with ttl={ttl}: " + (
            "untouched, no router on the way: the bridge only switched the frame" if ttl == TTL else
            "one less than it started with: the node routed it" if ttl == TTL - 1 else "?"))
        L.check(f"{node}: the reply's TTL says " + ("switched, not routed (64)" if spec["mode"] == "bridge"
                                                      else "routed by the node, once (63)"),
                ttl == (TTL if spec["mode"] == "bridge" else TTL - 1), f"ttl={ttl}")
        ok, neigh = r.probe(ip("neigh", "show", "dev", "eth0", ns=first))
        if spec["mode"] == "bridge":
            mac = (cnikit.get_link(r, "eth0", second) or {}).get("address", "?")
            L.check(f"bpod1 ARPed for bpod2 itself: its neighbour table holds bpod2's own MAC {mac}",
                    _lladdr(neigh, pods.ip(second)) == mac, neigh)
        else:
            L.check(f"rpod1 ARPed only for its gateway {gateway(node)}, answered by the host end of its veth "
                    f"({gw_mac}); rpod2's address is not in its neighbour table",
                    _lladdr(neigh, gateway(node)) == gw_mac and _lladdr(neigh, pods.ip(second)) is None, neigh)

    L.say("")
    L.say("the path of a packet to the other pod, as each node decides it: into the switch, or into "
          "that pod's own cable")
    ok, out = r.probe(ip("route", "get", pods.ip("bpod2") or "10.244.1.3", ns="bridged"))
    L.check("bridged: the node reaches bpod2 through cni0", ok and "dev cni0" in out)
    rpod2_end = host_end(pods, "rpod2")
    ok, out = r.probe(ip("route", "get", pods.ip("rpod2") or "10.244.2.3", ns="routed"))
    L.check(f"routed: the node reaches rpod2 through its own veth {rpod2_end or '(none)'}, no bridge on the node",
            ok and bool(rpod2_end) and f"dev {rpod2_end}" in out
            and not any(cnikit.link_kind(l) == "bridge" for l in r.query_json(ip("-d", "-j", "link", "show",
                                                                                   ns="routed")) or []))

    L.explore("then the lesson DELs the pods, and everything goes")
    if L.keeps_on_host():
        return
    L.say("DEL every pod: the host end of its veth goes, and with it its host route")
    routed = NODES["routed"]["names"]
    ends = [] if r.dry_run else plugin_host_ends(pods, routed, net_name("routed"))
    for node, spec in NODES.items():
        for pod in spec["names"]:
            try:
                cnikit.cni_del(r, pod_call(L, node, pod))
            except cnikit.CnikitError as e:
                L.say(f"    DEL: {e}")
    if not r.dry_run:
        left = [end for end in ends if cnikit.get_link(r, end, "routed")]
        routes = [x.get("dst") for x in r.query_json(ip("-j", "route", "show", ns="routed")) or []]
        L.check("routed: DEL left no veth and no host route", not left and not routes, f"{left} {routes}")


def _ttl(ping_output):
    for word in ping_output.split():
        if word.startswith("ttl="):
            return int(word[4:])
    return None


def _lladdr(neigh, addr):
    """The MAC `ip neigh` holds for ADDR, or None."""
    for line in neigh.splitlines():
        words = line.split()
        if words[:1] == [addr] and "lladdr" in words:
            return words[words.index("lladdr") + 1]
    return None


if __name__ == "__main__":
    LESSON.main(build, verify)
