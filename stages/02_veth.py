#!/usr/bin/env python3
"""Lesson 02: a veth pair is a cable between the host and a namespace.

    sudo python3 stages/02_veth.py             # in a throwaway sandbox
    python3 stages/02_veth.py --dry-run        # the lesson as a shell script
"""
from lesson import Lesson, cnikit, ip

NS, NS2 = "ns1", "ns2"
HOST_END, NS_END = "veth-ns1", "eth0"
TEMP_NAME = "veth-ns1-peer"   # the peer's name while it is still on the host (eth0 may be taken there)
HOST_END2 = "veth-ns2"
HOST_ADDR, NS_ADDR = "10.0.2.1/24", "10.0.2.2/24"
HOST_IP, NS_IP = HOST_ADDR.split("/")[0], NS_ADDR.split("/")[0]

LESSON = Lesson(
    "02", "veth",
    goal="a veth pair, made on the host then moved into ns1 and renamed eth0 there (as the series' plugin "
         "does), joins the host and ns1: pings go both ways and each side learned the other's MAC (ARP)",
    picture=r"""
   +---------- host ----------+                 +----------- ns1 ----------+
   |                          |    veth pair    |                          |
   |  veth-ns1  10.0.2.1/24 o=|=================|=o eth0  10.0.2.2/24      |
   |                          |  (made on the   |   (was veth-ns1-peer)    |
   |                          |   host, moved)  |                          |
   |  veth-ns2 o==============|=================|=o eth0 in ns2 (born      |
   |                          |  the short way  |   there, one request)    |
   +--------------------------+                 +--------------------------+
""",
    skips={"addr-ns1": "eth0 in ns1 has no address: nobody answers ARP for 10.0.2.2, pings fail both ways"},
)


def build(L):
    r = L.r
    L.step("a namespace of our own to plug the cable into")
    cnikit.netns_add(r, NS, lo_up=True)

    L.step("a veth pair is two interfaces joined by a virtual cable; made on the host, both ends "
           f"start there: the peer under a name unique on the host, {TEMP_NAME}")
    r.run(ip("link", "add", HOST_END, "type", "veth", "peer", "name", TEMP_NAME),
          creates=cnikit.Change.link(HOST_END))
    r.run(cnikit.tag_link(HOST_END))
    r.show(ip("-br", "link", "show", "type", "veth"))

    L.step(f"move the peer into ns1: it leaves the host's list of interfaces and appears in ns1's")
    r.run(ip("link", "set", "dev", TEMP_NAME, "netns", NS))
    r.show(ip("-br", "link", "show", ns=NS))

    L.step("rename it eth0 inside ns1, where that name is free. Every pod's interface is eth0, so a "
           "plugin cannot create it under that name on the host (the host's own eth0, or another pod's "
           "being set up at the same moment): born unique, moved, renamed. Rename while it is DOWN: "
           "Linux before 6.2 refuses to rename an interface that is up")
    r.run(ip("link", "set", "dev", TEMP_NAME, "name", NS_END, ns=NS))

    L.step("bring both ends up: a cable with a DOWN end carries nothing")
    r.run(cnikit.link_up(HOST_END))
    r.run(cnikit.link_up(NS_END, ns=NS))

    L.step("the host end gets an address: the host's side of the 10.0.2.0/24 link")
    r.run(cnikit.addr_add(HOST_ADDR, HOST_END))

    if L.step("the ns1 end gets an address in the same subnet, so each end knows the other "
              "is one hop away", skip="addr-ns1"):
        r.run(cnikit.addr_add(NS_ADDR, NS_END, ns=NS))

    L.step("no neighbour entries yet: nobody has asked who owns an address (ARP) so far")
    r.show(ip("neigh", "show", "dev", HOST_END))

    L.step("the short way, for ns2: one request creates the pair with the peer born inside the "
           "namespace under its final name (`peer name eth0 netns ns2`), never on the host, so no "
           "name clash and no rename. `cnikit veth add` and our CNI plugin do this; the reference "
           "plugins create the pair inside the pod's namespace and move the host end out instead")
    cnikit.netns_add(r, NS2, lo_up=True)
    cnikit.veth_add(r, HOST_END2, NS_END, netns=NS2)


def verify(L):
    r = L.r
    L.check(f"host reaches ns1 ({NS_IP})", L.ping(NS_IP))
    L.check(f"ns1 reaches the host ({HOST_IP})", L.ping(HOST_IP, NS))

    # ARP ran because of the pings: each side now holds the other's MAC, and the
    # MAC the host learned must be exactly the one of eth0 inside ns1.
    _, host_neigh = r.probe(ip("neigh", "show", "dev", HOST_END))
    _, ns_neigh = r.probe(ip("neigh", "show", "dev", NS_END, ns=NS))
    ok, link = r.probe(ip("-br", "link", "show", "dev", NS_END, ns=NS))
    ns_mac = link.split()[2] if ok and len(link.split()) > 2 else "?"
    L.check(f"the host's neighbour entry for {NS_IP} is ns1's eth0 MAC ({ns_mac})",
            _has_neigh(host_neigh, NS_IP, ns_mac), host_neigh)
    L.check(f"ns1 has a neighbour entry for {HOST_IP}", _has_neigh(ns_neigh, HOST_IP), ns_neigh)
    L.check(f"ns1's eth0 is the peer of {HOST_END} (moved and renamed), and {TEMP_NAME} is gone",
            cnikit.is_veth_pair(cnikit.get_link(r, HOST_END), cnikit.get_link(r, NS_END, NS))
            and not cnikit.get_link(r, TEMP_NAME) and not cnikit.get_link(r, TEMP_NAME, NS))
    L.check(f"ns2's eth0, born there, is the peer of {HOST_END2}",
            cnikit.is_veth_pair(cnikit.get_link(r, HOST_END2), cnikit.get_link(r, NS_END, NS2)))


def _has_neigh(text, addr, mac=None):
    """An `ip neigh` line for ADDR with a link-layer address (and MAC if given)."""
    for line in text.splitlines():
        words = line.split()
        if words[:1] == [addr] and "lladdr" in words:
            return mac is None or words[words.index("lladdr") + 1] == mac
    return False


if __name__ == "__main__":
    LESSON.main(build, verify)
