#!/usr/bin/env python3
"""Pitfall lab 22: strict reverse-path filtering (rp_filter=1, as on kind nodes) drops an
asymmetric path. A client with two links to the node sends over one, but the node's
route back to the client's address leaves through the other: the node takes the packet
for a spoofed one and drops it, counting it and nothing else.

    sudo python3 stages/22_pitfall_rp_filter.py            # in a throwaway sandbox
    sudo python3 stages/22_pitfall_rp_filter.py --broken --keep
    python3 stages/22_pitfall_rp_filter.py --dry-run
"""
import pitfall
from lesson import Lesson, cnikit, in_netns, ip

NODE, CLIENT, POD = "node1", "client", "pod1"
GATEWAY, POD_ADDR, POD_SUBNET = "10.0.22.1/24", "10.0.22.2/24", "10.0.22.0/24"
POD_IP = POD_ADDR.split("/")[0]
LINK1 = ("eth1", "198.51.100.1/24", "eth1", "198.51.100.10/24")     # node dev, node addr, client dev, client addr
LINK2 = ("eth2", "203.0.113.1/24", "eth2", "203.0.113.10/24")
CLIENT_SRC = "203.0.113.10"          # the client's own address, on its second link
RPF = "TcpExtIPReversePathFilter"    # the kernel's counter of reverse-path drops

LESSON = Lesson(
    "22", "pitfall_rp_filter",
    goal="strict rp_filter on the node drops the client's asymmetric path; the kernel's counter and doctor "
         "show it, loose mode on the incoming link lets it through",
    picture=r"""
   +--------------- client --------------+        +------------------ node1 (netns) ------------------+
   | eth1 198.51.100.10 --------------------------- eth1 198.51.100.1   (packets come IN here)        |
   | eth2 203.0.113.10  --------------------------- eth2 203.0.113.1    (route back to 203.0.113.10)  |
   | route 10.0.22.0/24 via 198.51.100.1 |        | rp_filter=1: "a packet from 203.0.113.10 on eth1? |
   |       src 203.0.113.10              |        | my route back is eth2: spoofed, drop"             |
   +-------------------------------------+        | br0 10.0.22.1/24 --- veth-pod1                    |
                                                  +---------------------------|-----------------------+
                                                                   pod1 eth0 10.0.22.2/24
""",
    skips={"fix": "rp_filter stays strict on eth1: the client's packets keep being dropped as spoofed"},
    tools=("ip", "ping", "sysctl", "nstat"),
)


def setup(L):
    r = L.r
    L.step("a node routing for its pod, and a client with two links to it (two networks, documentation "
           "addresses)")
    pitfall.node_with_pods(L, NODE, "br0", GATEWAY, {POD: POD_ADDR})
    cnikit.netns_add(r, CLIENT, lo_up=True)
    for node_dev, node_addr, client_dev, client_addr in (LINK1, LINK2):
        pitfall.link_between(L, NODE, node_dev, node_addr, CLIENT, client_dev, client_addr)
    L.sysctl("net.ipv4.ip_forward", 1, ns=NODE)
    L.step(f"the client reaches the pods over eth1 but speaks from its address on eth2, {CLIENT_SRC} "
           "(a multi-homed machine: its service address lives on the other network)")
    r.run(ip("route", "add", POD_SUBNET, "via", LINK1[1].split("/")[0], "src", CLIENT_SRC, ns=CLIENT))


def works(L, expect_fail=False):
    return L.ping(POD_IP, CLIENT, expect_fail=expect_fail)


def breakage(L):
    L.sysctl("net.ipv4.conf.all.rp_filter", 1, ns=NODE)


def reveal(L):
    r = L.r
    before = pitfall.counter(L, RPF, NODE)
    L.ping(POD_IP, CLIENT, count=3, expect_fail=True)
    r.show(in_netns(["nstat", "-asz", RPF], NODE))
    after = pitfall.counter(L, RPF, NODE)
    L.check(f"the node counted the lost pings as reverse-path drops ({RPF} {before} -> {after})", after > before)
    L.say(f"why: the ping comes in on eth1, but the node's route back to {CLIENT_SRC} leaves by eth2:")
    r.show(ip("route", "get", CLIENT_SRC, ns=NODE))
    r.show(in_netns(["sysctl", "net.ipv4.conf.all.rp_filter", "net.ipv4.conf.eth1.rp_filter"], NODE))


def fix(L):
    L.sysctl("net.ipv4.conf.eth1.rp_filter", 2, ns=NODE)
    L.say("the kernel applies the larger of conf.all and conf.eth1: eth1 is now loose (2), the rest stays strict")


def prove(L):
    before = pitfall.counter(L, RPF, NODE)
    L.ping(POD_IP, CLIENT, count=3)
    L.check("no reverse-path drop counted any more", pitfall.counter(L, RPF, NODE) == before)


LAB = pitfall.Lab(
    LESSON,
    works=f"the client pings pod1 ({POD_IP}) through the node",
    breaks=("the node gets kind's sysctls: net.ipv4.conf.all.rp_filter=1 (strict reverse-path filtering); "
            "the client's path in (eth1) and the node's path back (eth2) differ"),
    symptom="the client's pings to pod1 vanish; the pod and the node look fine",
    reveals=(f"the node's {RPF} counter grows with each lost ping, and `ip route get` shows the route back "
             "leaves by another link"),
    fixes=("loose reverse-path filtering on the link the client comes in by (rp_filter=2 on eth1: a route back "
           "must exist, through any link); the other cure is a route back through eth1"),
    cause="rp-filter",
    doctor=(CLIENT, POD),
    setup=setup, check=works, breakage=breakage, reveal=reveal, fix=fix, prove=prove,
)


if __name__ == "__main__":
    pitfall.main(LAB)
