#!/usr/bin/env python3
"""Pitfall lab 23: ip_forward off. The node stops routing: its pods still reach the node
itself, but nothing beyond it. Typical after a reboot when forwarding was switched on by
hand and never written to /etc/sysctl.d.

    sudo python3 stages/23_pitfall_ip_forward.py            # in a throwaway sandbox
    sudo python3 stages/23_pitfall_ip_forward.py --broken --keep
    python3 stages/23_pitfall_ip_forward.py --dry-run
"""
import pitfall
from lesson import Lesson, cnikit, in_netns, ip

NODE, SERVER, POD = "node1", "server", "pod1"
GATEWAY, POD_ADDR, POD_SUBNET = "10.0.23.1/24", "10.0.23.2/24", "10.0.23.0/24"
UPLINK, UPLINK_ADDR, SERVER_ADDR = "eth1", "198.51.100.1/24", "198.51.100.10/24"
UPLINK_IP, SERVER_IP = UPLINK_ADDR.split("/")[0], SERVER_ADDR.split("/")[0]
NOT_FORWARDED = "IpInAddrErrors"     # what a host that does not forward counts for a packet not for it

LESSON = Lesson(
    "23", "pitfall_ip_forward",
    goal="with net.ipv4.ip_forward=0 the node stops routing for its pods; counters and doctor show it, "
         "forwarding on brings the server back",
    picture=r"""
   +-- pod1 --------------+     +----------------- node1 (netns) ------------------+     +-- server ------------+
   | eth0 10.0.23.2/24    |-----| br0 10.0.23.1/24   ip_forward: 1 -> 0 -> 1       |     |                      |
   | default via 10.0.23.1|     |                    eth1 198.51.100.1/24 ------------------ eth0 198.51.100.10 |
   +----------------------+     +--------------------------------------------------+     | route 10.0.23.0/24   |
                                                                                          |   via 198.51.100.1   |
                                                                                          +----------------------+
""",
    skips={"fix": "forwarding stays off: the node keeps dropping everything it should route"},
    tools=("ip", "ping", "sysctl", "nstat"),
)


def setup(L):
    r = L.r
    L.step("a node with a pod on br0 and an uplink to a server's network; the server's network knows the "
           "pod subnet (routed, no NAT)")
    pitfall.node_with_pods(L, NODE, "br0", GATEWAY, {POD: POD_ADDR})
    cnikit.netns_add(r, SERVER, lo_up=True)
    pitfall.link_between(L, NODE, UPLINK, UPLINK_ADDR, SERVER, "eth0", SERVER_ADDR)
    cnikit.route_add(r, POD_SUBNET, via=UPLINK_IP, ns=SERVER)
    L.sysctl("net.ipv4.ip_forward", 1, ns=NODE)


def works(L, expect_fail=False):
    return L.ping(SERVER_IP, POD, expect_fail=expect_fail)


def breakage(L):
    L.r.run(cnikit.sysctl_set("net.ipv4.ip_forward", 0, NODE))


def reveal(L):
    r = L.r
    L.check(f"pod1 still reaches the node's far address {UPLINK_IP} (delivered to the node, not routed)",
            L.ping(UPLINK_IP, POD))
    before = pitfall.counter(L, NOT_FORWARDED, NODE)
    L.ping(SERVER_IP, POD, count=3, expect_fail=True)
    r.show(in_netns(["nstat", "-asz", NOT_FORWARDED], NODE))
    after = pitfall.counter(L, NOT_FORWARDED, NODE)
    L.check(f"the node counted the packets it would not route ({NOT_FORWARDED} {before} -> {after})",
            after > before)
    r.show(in_netns(["sysctl", "net.ipv4.ip_forward"], NODE))
    r.probe(ip("route", "get", SERVER_IP, "from", POD_ADDR.split("/")[0], "iif", "br0", ns=NODE), expect_fail=True)


def fix(L):
    L.r.run(cnikit.sysctl_set("net.ipv4.ip_forward", 1, NODE))
    L.say("on a real machine also: echo net.ipv4.ip_forward=1 > /etc/sysctl.d/99-forward.conf")


def prove(L):
    ok, out = L.r.probe(ip("route", "get", SERVER_IP, "from", POD_ADDR.split("/")[0], "iif", "br0", ns=NODE))
    L.check(f"the node has a forwarding decision for pod1 -> {SERVER_IP} again (out {UPLINK})",
            ok and f"dev {UPLINK}" in out)


LAB = pitfall.Lab(
    LESSON,
    works=f"pod1 pings the server ({SERVER_IP}) on the node's other network",
    breaks=("the node reboots; forwarding had been switched on by hand (sysctl -w) and never written to "
            "/etc/sysctl.d, so net.ipv4.ip_forward is back to 0"),
    symptom="pod1 no longer reaches the server",
    reveals=(f"pod1 still reaches the node (even its far address {UPLINK_IP}), so links and routes are fine; "
             "the node counts the packets it refused to route, and its sysctl says why"),
    fixes="forwarding back on (and, on a real machine, in /etc/sysctl.d/ so a reboot keeps it)",
    cause="ip-forward",
    doctor=(POD, SERVER_IP),
    setup=setup, check=works, breakage=breakage, reveal=reveal, fix=fix, prove=prove,
)


if __name__ == "__main__":
    pitfall.main(LAB)
