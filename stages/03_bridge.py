#!/usr/bin/env python3
"""Lesson 03: a bridge is a switch inside the host; namespaces plug into it.

    sudo python3 stages/03_bridge.py           # in a throwaway sandbox
    python3 stages/03_bridge.py --dry-run      # the lesson as a shell script
"""
from lesson import Lesson, bridge, cnikit, ip

BRIDGE, GATEWAY = "br0", "10.0.3.1/24"
PODS = {"ns1": "10.0.3.2/24", "ns2": "10.0.3.3/24"}     # namespace -> address of its eth0


def host_end(ns):
    return f"veth-{ns}"


def addr(ns):
    return PODS[ns].split("/")[0]


LESSON = Lesson(
    "03", "bridge",
    goal="ns1 and ns2 share br0: they reach each other and the host reaches both, "
         "and the bridge learned each namespace's MAC on its port",
    picture=r"""
   +------------------------------- host --------------------------------+
   |                     br0  10.0.3.1/24  (the gateway)                  |
   |                    /                            \                    |
   |        veth-ns1 (no address)            veth-ns2 (no address)        |
   +-------------|------------------------------------------|------------+
                 | veth pair                      veth pair |
   +------------ ns1 ------------+          +------------ ns2 ------------+
   |  eth0  10.0.3.2/24          |          |  eth0  10.0.3.3/24          |
   +-----------------------------+          +-----------------------------+
""",
    skips={"master": "the host ends are not ports of br0: the bridge forwards nothing, "
                     "no namespace reaches anyone"},
)


def build(L):
    r = L.r
    L.step("two namespaces, each standing for a container")
    for ns in PODS:
        cnikit.netns_add(r, ns, lo_up=True)

    L.step("a bridge is a virtual switch; the gateway address goes on the bridge itself, "
           "the host's one interface into the 10.0.3.0/24 segment")
    cnikit.bridge_add(r, BRIDGE, addr=GATEWAY)

    L.step("a veth pair per namespace; NO address on the host ends: once plugged into the "
           "bridge they are switch ports (layer 2), handing every frame they receive to br0, so an "
           "address on a port is never reached; the host's address for the segment is br0's")
    for ns, cidr in PODS.items():
        cnikit.veth_add(r, host_end(ns), "eth0", netns=ns, peer_addr=cidr)

    if L.step("plug the host ends into br0 (`master br0`): now frames between ports are "
              "switched by the bridge", skip="master"):
        cnikit.bridge_attach(r, BRIDGE, [host_end(ns) for ns in PODS])


def verify(L):
    r = L.r
    L.check("ns1 reaches ns2 through the bridge", L.ping(addr("ns2"), "ns1"))
    L.check("ns2 reaches ns1 through the bridge", L.ping(addr("ns1"), "ns2"))
    for ns in PODS:
        L.check(f"the host reaches {ns} via br0", L.ping(addr(ns)))

    # The bridge learns a source MAC on the port a frame came in through: after the
    # pings, each namespace's eth0 MAC must sit on its own veth port. `dynamic` leaves
    # out the permanent entries (the bridge's own and multicast addresses).
    r.show(ip("-br", "link", "show", "master", BRIDGE))
    _, fdb = r.probe(bridge("fdb", "show", "br", BRIDGE, "dynamic"))
    for ns in PODS:
        ok, link = r.probe(ip("-br", "link", "show", "dev", "eth0", ns=ns))
        mac = link.split()[2] if ok and len(link.split()) > 2 else "?"
        learned = any(line.split()[:3] == [mac, "dev", host_end(ns)] for line in fdb.splitlines())
        L.check(f"br0 learned {ns}'s MAC {mac} on port {host_end(ns)}", learned)


if __name__ == "__main__":
    LESSON.main(build, verify)
