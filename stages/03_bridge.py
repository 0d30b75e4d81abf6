#!/usr/bin/env python3
"""Lesson 03: a bridge is a switch inside the host; namespaces plug into it.

    sudo python3 stages/03_bridge.py           # in a throwaway sandbox
    python3 stages/03_bridge.py --dry-run      # the lesson as a shell script
"""
from lesson import Lesson, bridge, cnikit, ip

BRIDGE, GATEWAY = "br0", "10.0.3.1/24"     # the host's address on the segment (a gateway from lesson 05 on)
PODS = {"ns1": "10.0.3.2/24", "ns2": "10.0.3.3/24"}     # namespace -> address of its eth0


def host_end(ns):
    return f"veth-{ns}"


def addr(ns):
    return PODS[ns].split("/")[0]


GATEWAY_IP = GATEWAY.split("/")[0]


LESSON = Lesson(
    "03", "bridge",
    goal="ns1 and ns2 share br0: they reach each other and the host reaches both, "
         "and the bridge learned each namespace's MAC on its port",
    picture=r"""
   +------------------------------- host --------------------------------+
   |                 br0  10.0.3.1/24  (the host's address)               |
   |                    /                            \                    |
   |        veth-ns1 (no address: a port)    veth-ns2 (no address)        |
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

    L.step("a bridge is a virtual switch; no address on it yet")
    cnikit.bridge_add(r, BRIDGE)

    L.step("a veth pair per namespace; first, the host's address on a host end, as in lesson 02")
    for ns, cidr in PODS.items():
        cnikit.veth_add(r, host_end(ns), "eth0", netns=ns, peer_addr=cidr)
    r.run(cnikit.addr_add(GATEWAY, host_end("ns1")))
    L.say(f"over a plain cable it works: ns1 reaches {GATEWAY_IP} on the far end of its veth")
    L.check(f"over its plain cable ns1 reaches {GATEWAY_IP} on veth-ns1", L.ping(GATEWAY_IP, "ns1"))

    if L.step("plug the host ends into br0 (`master br0`): they become switch ports (layer 2), and "
              "frames between ports are switched by the bridge", skip="master"):
        cnikit.bridge_attach(r, BRIDGE, [host_end(ns) for ns in PODS])

    L.step(f"now the address on the port is useless: a port hands every frame it receives to the "
           f"bridge, so the ARP reply ns1 sends to veth-ns1 lands on br0 and the host never learns ns1's "
           f"MAC where its route ({GATEWAY_IP}'s subnet dev veth-ns1) needs it. Forget what ARP learned "
           "before (as the kernel does within a minute); both pings are expected to FAIL")
    r.run(ip("neigh", "flush", "dev", host_end("ns1")))
    answered = [ns for ns in PODS if L.ping(GATEWAY_IP, ns, expect_fail=True)]
    L.check(f"with {GATEWAY_IP} on a port, no namespace reaches it", not answered,
            "answered from " + ", ".join(answered))
    r.probe(ip("neigh", "show", "dev", host_end("ns1")))

    L.step("so the host's address for the segment belongs on the bridge itself, the host's one "
           "interface into the 10.0.3.0/24 segment: move it")
    r.run(ip("addr", "del", GATEWAY, "dev", host_end("ns1")))
    r.run(cnikit.addr_add(GATEWAY, BRIDGE))


def verify(L):
    r = L.r
    L.check("ns1 reaches ns2 through the bridge", L.ping(addr("ns2"), "ns1"))
    L.check("ns2 reaches ns1 through the bridge", L.ping(addr("ns1"), "ns2"))
    ok, holders = r.probe(ip("-br", "addr", "show", "to", GATEWAY_IP))
    L.check(f"{GATEWAY_IP} is on br0, and on no port", ok and [l.split()[0] for l in holders.splitlines()] == [BRIDGE],
            holders)
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
