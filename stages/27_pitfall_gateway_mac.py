#!/usr/bin/env python3
"""Pitfall lab 27: the gateway's MAC moves. A hand-written bash CNI plugin makes its bridge
with a bare `ip link add cni0 type bridge`: no MAC of its own, so the bridge takes the lowest
MAC of its ports and changes it when that port goes. Pods that leave take the gateway's MAC
with them; a pod that stays keeps the old one in its neighbour table and its packets go to a
MAC nobody has until the entry ages out (tens of seconds; one reproduction lost 46 s).

    sudo python3 stages/27_pitfall_gateway_mac.py            # in a throwaway sandbox
    sudo python3 stages/27_pitfall_gateway_mac.py --broken --keep
    python3 stages/27_pitfall_gateway_mac.py --dry-run
"""
import pitfall
from lesson import Lesson, cnikit, in_netns, ip

NODE, BRIDGE, GATEWAY = "node1", "cni0", "10.0.27.1/24"
GATEWAY_IP = GATEWAY.split("/")[0]
PODS = {"pod1": "10.0.27.2/24", "pod2": "10.0.27.3/24", "pod3": "10.0.27.4/24"}
# The kernel gives each veth a random MAC, so which port is lowest is luck; these make it
# the same on every run: pod1's port, then pod2's (locally administered addresses).
PORT_MACS = {"pod1": "02:00:0a:00:1b:01", "pod2": "02:00:0a:00:1b:02", "pod3": "02:00:0a:00:1b:03",
             "pod4": "02:00:0a:00:1b:00"}
LEAVING, STAYING = ("pod1", "pod2"), "pod3"
NEW_POD = ("pod4", "10.0.27.5/24")
# How long a confirmed neighbour entry is used without asking again: 30 s by default (15-45 s,
# random). An hour here, so the stale entry is surely still REACHABLE when the lab looks;
# real life loses "only" those tens of seconds, and then a few more to probes at the old MAC.
REACHABLE = ("net.ipv4.neigh.eth0.base_reachable_time_ms", 3600000)

LESSON = Lesson(
    "27", "pitfall_gateway_mac",
    goal="a bridge without a MAC of its own changes it when its lowest port leaves; a pod that stays "
         "keeps the old MAC for its gateway and loses it; ip neigh, sysfs and doctor show it, a fixed "
         "bridge MAC ends it",
    picture=r"""
   +------------------------------- node1 (netns) --------------------------------+
   |  cni0 10.0.27.1/24  (ip link add cni0 type bridge: no MAC of its own)        |
   |  MAC = lowest port: 02:..:1b:01 -> 02:..:1b:02 -> 02:..:1b:03 as pods leave  |
   |      veth-pod1 :01        veth-pod2 :02        veth-pod3 :03                 |
   +-----------|-------------------|--------------------|-------------------------+
           pod1 (leaves)       pod2 (leaves)     +------|---- pod3 ----------------------+
                                                 | eth0 10.0.27.4/24                     |
                                                 | neigh 10.0.27.1 lladdr 02:..:1b:01    |
                                                 |       REACHABLE: sends without asking |
                                                 +---------------------------------------+
""",
    skips={"fix": f"{BRIDGE} keeps following its ports and {STAYING} keeps the gateway's old MAC"},
    tools=("ip", "ping"),
)


def _pod(L, pod, cidr):
    """A pod as the plugin's ADD makes it: a veth into its namespace, the host end on the bridge."""
    r = L.r
    cnikit.netns_add(r, pod, lo_up=True)
    cnikit.veth_add(r, f"veth-{pod}", "eth0", netns=pod, peer_addr=cidr, ns=NODE)
    r.run(ip("link", "set", "dev", f"veth-{pod}", "address", PORT_MACS[pod], ns=NODE))
    cnikit.bridge_attach(r, BRIDGE, [f"veth-{pod}"], ns=NODE)


def setup(L):
    r = L.r
    L.step(f"a node with {BRIDGE} made as a bash plugin makes it (no MAC of its own), and three pods on it")
    cnikit.netns_add(r, NODE, lo_up=True)
    # the bash plugin's line, on purpose without `address`: the hole this lab shows
    r.run(ip("link", "add", BRIDGE, "type", "bridge", ns=NODE), creates=cnikit.Change.link(BRIDGE, NODE, "bridge"))
    r.run(ip("addr", "add", GATEWAY, "dev", BRIDGE, ns=NODE))
    r.run(ip("link", "set", "dev", BRIDGE, "up", ns=NODE))
    for pod, cidr in PODS.items():
        _pod(L, pod, cidr)
    L.say(f"{STAYING} keeps a confirmed neighbour entry for an hour instead of 15-45 s, so the lab sees "
          "for sure what real life shows for tens of seconds")
    L.sysctl(*REACHABLE, ns=STAYING)
    _bridge_mac(L, PORT_MACS["pod1"])


def works(L, expect_fail=False):
    return L.ping(GATEWAY_IP, STAYING, expect_fail=expect_fail)


def _bridge_mac(L, expect):
    """Show the bridge's MAC; check it is EXPECT (the lowest port's, or the one it keeps)."""
    L.r.show(ip("-br", "link", "show", "dev", BRIDGE, ns=NODE))
    link = L.r.query_json(ip("-j", "link", "show", "dev", BRIDGE, ns=NODE)) or [{}]
    L.check(f"{BRIDGE}'s MAC is {expect}", link[0].get("address") == expect, link[0].get("address", "none"))


def _neigh(L):
    data = L.r.query_json(ip("-j", "neigh", "show", GATEWAY_IP, "dev", "eth0", ns=STAYING)) or [{}]
    return data[0].get("lladdr"), data[0].get("state", [])


def _addr_assign_type(L):
    ok, out = L.r.query(in_netns(["cat", f"/sys/class/net/{BRIDGE}/addr_assign_type"], NODE))
    return int(out) if ok and out.strip().isdigit() else None


def _gone(L, pod):
    """POD left for good: nothing of it is left for the end of the lab to undo (--host)."""
    L.r.forget(lambda c: c.ns == pod or c.same("netns", pod) or c.same("link", f"veth-{pod}", NODE))


def breakage(L):
    r = L.r
    for pod in LEAVING:
        L.say(f"{pod} is deleted: the plugin's DEL removes its veth, the runtime its namespace")
        r.run(ip("link", "del", f"veth-{pod}", ns=NODE))
        r.run(ip("netns", "del", pod))
        _gone(L, pod)
    L.say(f"{BRIDGE} took {STAYING}'s port's MAC; the kernel sent no one the news (arp_notify is off by default)")
    _bridge_mac(L, PORT_MACS[STAYING])


def reveal(L):
    r = L.r
    r.show(ip("neigh", "show", GATEWAY_IP, "dev", "eth0", ns=STAYING))
    r.show(ip("link", "show", "dev", BRIDGE, ns=NODE))
    r.show(in_netns(["cat", f"/sys/class/net/{BRIDGE}/addr_assign_type"], NODE))
    mac, state = _neigh(L)
    L.check(f"{STAYING} still holds the gateway's old MAC {PORT_MACS['pod1']}, in use without asking "
            f"({'/'.join(state) or 'no entry'})",
            mac == PORT_MACS["pod1"] and any(s in state for s in ("REACHABLE", "STALE", "DELAY", "PROBE")),
            f"{mac} {'/'.join(state)}")
    L.check(f"{BRIDGE}'s MAC is the kernel's choice (addr_assign_type 1), not its own (3)",
            _addr_assign_type(L) not in (None, 3), str(_addr_assign_type(L)))


def fix(L):
    r = L.r
    # Setting the MAC it has now changes nothing on the wire and makes it the bridge's own:
    # no port can move it any more.
    r.run(ip("link", "set", "dev", BRIDGE, "address", PORT_MACS[STAYING], ns=NODE))
    r.run(ip("neigh", "del", GATEWAY_IP, "dev", "eth0", ns=STAYING))


def prove(L):
    L.check(f"{BRIDGE}'s MAC is its own now (addr_assign_type 3)", _addr_assign_type(L) == 3)
    mac, _ = _neigh(L)
    L.check(f"{STAYING} learned the gateway's MAC {PORT_MACS[STAYING]}", mac == PORT_MACS[STAYING])
    L.say(f"a new pod joins with the lowest port MAC of all ({PORT_MACS[NEW_POD[0]]}): the bridge keeps its own")
    _pod(L, *NEW_POD)
    _bridge_mac(L, PORT_MACS[STAYING])
    L.check(f"{STAYING} pings its gateway at once, and so does {NEW_POD[0]}",
            L.ping(GATEWAY_IP, STAYING) and L.ping(GATEWAY_IP, NEW_POD[0]))


LAB = pitfall.Lab(
    LESSON,
    works=f"{STAYING} pings its gateway {GATEWAY_IP} on {BRIDGE}",
    breaks=(f"pods leave: {' and '.join(LEAVING)}, whose ports have the lowest MACs, are deleted; {BRIDGE}, "
            "which has no MAC of its own, takes the next lowest port's each time"),
    symptom=f"{STAYING}'s pings to its gateway vanish, though the gateway, the bridge and {STAYING}'s port are all up",
    reveals=(f"`ip neigh` in {STAYING} still says the gateway is at {PORT_MACS['pod1']} (REACHABLE: no ARP for "
             f"tens of seconds); {BRIDGE} is now {PORT_MACS[STAYING]}, addr_assign_type 1 (the kernel's choice)"),
    fixes=(f"give {BRIDGE} a MAC of its own, its current one (addr_assign_type 3, as the reference bridge plugin "
           f"and `cnikit bridge add` do), and delete {STAYING}'s stale entry so it asks again"),
    cause="neighbour",
    doctor=(STAYING, GATEWAY_IP),
    setup=setup, check=works, breakage=breakage, reveal=reveal, fix=fix, prove=prove,
)


if __name__ == "__main__":
    pitfall.main(LAB)
