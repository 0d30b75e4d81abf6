#!/usr/bin/env python3
"""Lesson 01: a network namespace is a whole, separate network stack.

    sudo python3 stages/01_netns.py            # in a throwaway sandbox
    python3 stages/01_netns.py --dry-run       # the lesson as a shell script
"""
import json
from dataclasses import dataclass

from lesson import Lesson, cnikit, ip, have

NS = "ns1"
PRIVATE = "private0"      # an interface only ns1 has (a bridge here is just a link with no cable)
HOST_IF, HOST_ADDR = "host0", "192.0.2.1/24"   # in the sandbox: something the host side has and ns1 lacks

@dataclass
class Fresh:
    """What ns1 held when it was new, for verify to judge: `ip -j link` and `iptables -S`
    (None when iptables is not installed)."""
    links: str = ""
    iptables: str = None


LESSON = Lesson(
    "01", "netns",
    goal="a namespace starts with only lo, DOWN, no routes and no firewall rules; "
         "with lo up it reaches 127.0.0.1, and the host cannot see its interfaces",
    picture=r"""
   +------------ host (the sandbox) ----------+
   |  lo  127.0.0.1   UP                      |
   |  host0  192.0.2.1/24, its route          |
   +------------------------------------------+
              no link between the two
   +------------------ ns1 -------------------+
   |  lo  127.0.0.1   DOWN  ->  UP            |
   |  private0        (only ns1 can see it)   |
   |  routes: none    iptables: no rules      |
   +------------------------------------------+
""",
    skips={"lo-up": "lo stays DOWN: even 127.0.0.1 is unreachable inside ns1"},
    state=Fresh,
)


def build(L, fresh):
    r = L.r
    if not L.on_host:
        L.step("the \"host\" here is a sandbox: a fresh network namespace this lesson runs in (your "
               "machine's own interfaces are never touched; --host runs it there). Give it something "
               f"of its own to compare with: {HOST_IF}, with an address and so a route ({HOST_IF} is a "
               "bridge device, used here only as the simplest virtual interface that needs no partner; "
               "lesson 03 shows what a bridge does)")
        cnikit.bridge_add(r, HOST_IF, addr=HOST_ADDR)
        r.show(ip("-br", "addr", "show"))
        r.show(ip("route", "show"))

    L.step("a namespace is a fresh copy of the network stack: interfaces, routes, firewall")
    cnikit.netns_add(r, NS)

    L.step("what is inside: only lo, and it is DOWN")
    fresh.links = r.show(ip("-j", "link", "show", ns=NS))

    L.step("its own routing table: empty (the host's routes, shown above, do not apply in here)")
    r.show(ip("route", "show", ns=NS))

    if have("iptables"):
        L.step("its own firewall: default policies only, none of the host's rules")
        fresh.iptables = r.show(cnikit.iptables("-S", ns=NS))

    L.step("with lo DOWN even 127.0.0.1 is unreachable: this ping is expected to fail")
    L.ping("127.0.0.1", NS, expect_fail=True)

    if L.step("bring lo up: the loopback is an interface like any other", skip="lo-up"):
        cnikit.netns_lo_up(r, NS)

    L.step(f"give ns1 an interface of its own ({PRIVATE}, again a bridge device standing for any "
           "interface), then look for it from the host")
    cnikit.bridge_add(r, PRIVATE, ns=NS)
    r.show(ip("-br", "link", "show", ns=NS))
    r.probe(ip("link", "show", "dev", PRIVATE), expect_fail=True)     # the host has no such device
    r.show(ip("-br", "link", "show"))


def verify(L, fresh):
    r = L.r
    links = json.loads(fresh.links or "[]")
    L.check("ns1 started with only lo, and lo was DOWN",
            [link["ifname"] for link in links] == ["lo"] and "UP" not in links[0]["flags"], fresh.links)
    if fresh.iptables is not None:
        rules = [line for line in fresh.iptables.splitlines() if not line.startswith("-P ")]
        L.check("ns1 started with no firewall rules (default policies only)", rules == [], "\n".join(rules))
    L.check("ns1 reaches 127.0.0.1 over its own lo", L.ping("127.0.0.1", NS))
    ok, out = r.probe(ip("-j", "route", "show", ns=NS))
    L.check("ns1's routing table is its own, and empty", ok and json.loads(out or "[]") == [], out)
    seen_in_ns, _ = r.probe(ip("link", "show", "dev", PRIVATE, ns=NS))
    seen_on_host, _ = r.probe(ip("link", "show", "dev", PRIVATE), expect_fail=True)
    L.check(f"{PRIVATE} exists in ns1 and the host cannot see it", seen_in_ns and not seen_on_host)
    if not L.on_host:
        host_has, _ = r.probe(ip("link", "show", "dev", HOST_IF))
        ns_has, _ = r.probe(ip("link", "show", "dev", HOST_IF, ns=NS), expect_fail=True)
        L.check(f"the host side has {HOST_IF} and ns1 does not", host_has and not ns_has)


if __name__ == "__main__":
    LESSON.main(build, verify)
