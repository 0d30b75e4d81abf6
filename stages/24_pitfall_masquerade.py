#!/usr/bin/env python3
"""Pitfall lab 24: MASQUERADE without the pod-to-pod exemption. Two nodes route their pod
subnets to each other; then egress NAT is added the simple way (masquerade all that leaves
the uplink), and pods on different nodes now see the node's address instead of each
other's: network policies, logs and allow-lists all see the wrong peer.

    sudo python3 stages/24_pitfall_masquerade.py            # in a throwaway sandbox
    sudo python3 stages/24_pitfall_masquerade.py --broken --keep
    python3 stages/24_pitfall_masquerade.py --dry-run
"""
import pitfall
from lesson import Lesson, cnikit, have, in_netns

CLUSTER = "10.24.0.0/16"            # every node's pod subnet is inside it
NODES = {"node1": {"pod": "pod1", "subnet": "10.24.1.0/24", "gw": "10.24.1.1/24", "addr": "10.24.1.2/24",
                   "underlay": "192.0.2.1/24"},
         "node2": {"pod": "pod2", "subnet": "10.24.2.0/24", "gw": "10.24.2.1/24", "addr": "10.24.2.2/24",
                   "underlay": "192.0.2.2/24"}}
POD1_IP, POD2_IP, NODE1_IP = "10.24.1.2", "10.24.2.2", "192.0.2.1"
PORT = 8080
EXEMPT = ["-s", NODES["node1"]["subnet"], "-d", CLUSTER, "-m", "comment", "--comment",
          "cnikit lab24: pod-to-pod keeps its source", "-j", "RETURN"]

LESSON = Lesson(
    "24", "pitfall_masquerade",
    goal="a masquerade rule without the pod-to-pod exemption hides pod1 behind node1's address; the far side, "
         "conntrack and doctor show it, the exemption gives pod2 pod1's own address back",
    picture=r"""
   +---------------- node1 (netns) ---------------+      +---------------- node2 (netns) ---------------+
   | pod1 10.24.1.2 -- br0 10.24.1.1/24            |      |            br0 10.24.2.1/24 -- pod2 10.24.2.2 |
   | route 10.24.2.0/24 via 192.0.2.2              |      |              route 10.24.1.0/24 via 192.0.2.1 |
   | MASQUERADE -s 10.24.1.0/24 -o eth0 (no exempt)|      |        server: "who is talking to me?"        |
   | eth0 192.0.2.1/24 ====================== underlay ====================== eth0 192.0.2.2/24           |
   +-----------------------------------------------+      +-----------------------------------------------+
""",
    skips={"fix": "no exemption: pod2 keeps seeing node1's address for every connection from pod1"},
    tools=("ip", "ping", "iptables", "sysctl", "socat", "ss"),
)


def setup(L):
    r = L.r
    L.step("two nodes on an underlay, a pod on each; each node routes the other node's pod subnet "
           "over the underlay (no overlay, no NAT: pods see each other as they are)")
    for node in NODES:
        cnikit.netns_add(r, node, lo_up=True)
    pitfall.link_between(L, "node1", "eth0", NODES["node1"]["underlay"], "node2", "eth0", NODES["node2"]["underlay"])
    for node, spec in NODES.items():
        other = NODES["node2" if node == "node1" else "node1"]
        pitfall.node_with_pods(L, node, "br0", spec["gw"], {spec["pod"]: spec["addr"]}, new_node=False)
        cnikit.route_add(r, other["subnet"], via=other["underlay"].split("/")[0], ns=node)
        L.sysctl("net.ipv4.ip_forward", 1, ns=node)
    L.step(f"pod2 runs a server on tcp/{PORT} that answers each connection with the address it sees")
    r.spawn(in_netns(["socat", f"TCP-LISTEN:{PORT},bind={POD2_IP},reuseaddr,fork", "SYSTEM:echo $SOCAT_PEERADDR"],
                     "pod2"))
    L.wait_listening(PORT, "pod2")


def seen_by_pod2(L, expect_fail=False):
    ok, out = L.r.probe(in_netns(["socat", "-u", f"TCP:{POD2_IP}:{PORT},connect-timeout=2", "-"], "pod1"),
                        expect_fail=expect_fail)
    return out.strip() if ok else ""


def works(L, expect_fail=False):
    return seen_by_pod2(L, expect_fail) == POD1_IP


def breakage(L):
    cnikit.nat_add(L.r, NODES["node1"]["subnet"], "eth0", ns="node1")


def reveal(L):
    r = L.r
    L.check("the ping from pod1 to pod2 still passes: nothing looks broken from pod1",
            L.ping(POD2_IP, "pod1"))
    seen = seen_by_pod2(L)
    L.check(f"pod2 sees node1's address {NODE1_IP}", seen == NODE1_IP, f"it saw {seen or 'nothing'}")
    r.show(cnikit.iptables("-t", "nat", "-S", "POSTROUTING", ns="node1"))
    if have("conntrack"):
        r.probe(in_netns(["conntrack", "-L", "-p", "tcp", "--orig-src", POD1_IP, "--orig-dst", POD2_IP], "node1"))
        L.say(f"the reply direction of each flow is addressed to {NODE1_IP}: node1 rewrote pod1's source")


def fix(L):
    L.r.run(cnikit.iptables("-t", "nat", "-I", "POSTROUTING", *EXEMPT, ns="node1"))
    L.r.show(cnikit.iptables("-t", "nat", "-S", "POSTROUTING", ns="node1"))


LAB = pitfall.Lab(
    LESSON,
    works=f"pod2's server sees pod1's own address {POD1_IP} as the peer",
    breaks=(f"egress to the internet is added the simple way on node1: `cnikit nat add {NODES['node1']['subnet']} "
            "--out eth0` masquerades everything from the pods that leaves eth0, the other node's pods included"),
    symptom=f"the ping still works, but pod2 now sees node1 ({NODE1_IP}) instead of pod1",
    reveals="node1's conntrack shows the flow rewritten: its replies go to node1's address, not to pod1",
    fixes=(f"the pod-to-pod exemption before the masquerade: traffic from {NODES['node1']['subnet']} to the cluster's "
           f"pods ({CLUSTER}) returns from POSTROUTING untouched"),
    cause="masquerade",
    doctor=("pod1", "pod2"),
    setup=setup, check=works, breakage=breakage, reveal=reveal, fix=fix,
)


if __name__ == "__main__":
    pitfall.main(LAB)
