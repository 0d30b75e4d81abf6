#!/usr/bin/env python3
"""Lesson 02: a veth pair is a cable between the host and a namespace.

    sudo python3 stages/02_veth.py             # in a throwaway sandbox
    python3 stages/02_veth.py --dry-run        # the lesson as a shell script
"""
from lesson import Lesson, cnikit, ip

NS = "ns1"
HOST_END, NS_END = "veth-ns1", "eth0"
HOST_ADDR, NS_ADDR = "10.0.2.1/24", "10.0.2.2/24"
HOST_IP, NS_IP = HOST_ADDR.split("/")[0], NS_ADDR.split("/")[0]

LESSON = Lesson(
    "02", "veth",
    goal="a veth pair joins the host and ns1: each end has an address, "
         "pings go both ways, and each side learned the other's MAC (ARP)",
    picture=r"""
   +---------- host ----------+                 +----------- ns1 ----------+
   |                          |    veth pair    |                          |
   |  veth-ns1  10.0.2.1/24 o=|=================|=o eth0  10.0.2.2/24      |
   |                          |                 |                          |
   +--------------------------+                 +--------------------------+
""",
    skips={"addr-ns1": "eth0 in ns1 has no address: nobody answers ARP for 10.0.2.2, pings fail both ways"},
)


def build(L):
    r = L.r
    L.step("a namespace of our own to plug the cable into")
    cnikit.netns_add(r, NS, lo_up=True)

    L.step("a veth pair is two interfaces joined by a virtual cable; one end moves into ns1 "
           "(cnikit also brings both ends up: a cable with a DOWN end carries nothing)")
    cnikit.veth_add(r, HOST_END, NS_END, netns=NS)

    L.step("the host end gets an address: the host's side of the 10.0.2.0/24 link")
    r.run(cnikit.addr_add(HOST_ADDR, HOST_END))

    if L.step("the ns1 end gets an address in the same subnet, so each end knows the other "
              "is one hop away", skip="addr-ns1"):
        r.run(cnikit.addr_add(NS_ADDR, NS_END, ns=NS))

    L.step("no neighbour entries yet: nobody has asked who owns an address (ARP) so far")
    r.show(ip("neigh", "show", "dev", HOST_END))


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


def _has_neigh(text, addr, mac=None):
    """An `ip neigh` line for ADDR with a link-layer address (and MAC if given)."""
    for line in text.splitlines():
        words = line.split()
        if words[:1] == [addr] and "lladdr" in words:
            return mac is None or words[words.index("lladdr") + 1] == mac
    return False


if __name__ == "__main__":
    LESSON.main(build, verify)
