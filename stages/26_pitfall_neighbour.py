#!/usr/bin/env python3
"""Pitfall lab 26: a wrong neighbour (ARP) entry. pod1 holds a permanent neighbour entry
for pod2 (some CNI plugins pin neighbours); pod2 is recreated with the same address and a
new MAC, and pod1 keeps sending to the old MAC without ever asking again.

    sudo python3 stages/26_pitfall_neighbour.py            # in a throwaway sandbox
    sudo python3 stages/26_pitfall_neighbour.py --broken --keep
    python3 stages/26_pitfall_neighbour.py --dry-run
"""
import pitfall
from lesson import Lesson, cnikit, have, in_netns, ip, read_until

NODE, GATEWAY = "node1", "10.0.26.1/24"
PODS = {"pod1": "10.0.26.2/24", "pod2": "10.0.26.3/24"}
POD2_IP = PODS["pod2"].split("/")[0]
NEW_MAC = "02:00:0a:00:1a:03"        # pod2's eth0 once it is recreated (locally administered)

LESSON = Lesson(
    "26", "pitfall_neighbour",
    goal="a pinned neighbour entry with a stale MAC cuts pod1 off from pod2; ip neigh, tcpdump and doctor "
         "show it, deleting the entry lets ARP find the new MAC",
    picture=r"""
   +-- pod1 ------------------------------+        +------ node1 (netns) ------+        +-- pod2 ---------------+
   | eth0 10.0.26.2/24                    |        | br0 10.0.26.1/24          |        | eth0 10.0.26.3/24     |
   | neigh 10.0.26.3 lladdr <old MAC>     |--------| veth-pod1      veth-pod2  |--------| MAC: old -> new       |
   |       PERMANENT: never asks again    |        +---------------------------+        | (pod recreated)       |
   +--------------------------------------+                                             +-----------------------+
""",
    skips={"fix": "the stale entry stays: pod1 keeps addressing a MAC nobody has"},
    tools=("ip", "ping"),
)


def setup(L):
    L.step("a node with two pods on br0, as in lesson 03")
    pitfall.node_with_pods(L, NODE, "br0", GATEWAY, PODS)


def works(L, expect_fail=False):
    return L.ping(POD2_IP, "pod1", expect_fail=expect_fail)


def _mac(L, ns):
    data = L.r.query_json(ip("-j", "link", "show", "dev", "eth0", ns=ns))
    return data[0]["address"] if data else "02:00:0a:00:1a:99"


def breakage(L):
    r = L.r
    r.run(ip("neigh", "replace", POD2_IP, "lladdr", _mac(L, "pod2"), "dev", "eth0", "nud", "permanent", ns="pod1"))
    L.say("pod2 is deleted and created again: same address, a new eth0 with a new MAC")
    r.run(ip("link", "set", "dev", "eth0", "down", ns="pod2"))
    r.run(ip("link", "set", "dev", "eth0", "address", NEW_MAC, ns="pod2"))
    r.run(ip("link", "set", "dev", "eth0", "up", ns="pod2"))


def _capture(L, why):
    """tcpdump on pod2's eth0, MACs shown (-e), while pod1 pings: what arrives, and to whom."""
    r = L.r
    if not have("tcpdump"):
        L.say("tcpdump (Debian package tcpdump) is not installed: skipping the look at the wire")
        return ""
    proc = r.spawn(in_netns(["tcpdump", "--immediate-mode", "-elni", "eth0", "-c", "4", "arp or icmp"], "pod2"))
    if proc is not None and read_until(proc, "listening on", "stderr") is None:
        L.say("tcpdump did not start")
    L.ping(POD2_IP, "pod1", expect_fail=why == "broken")
    out, _ = r.stop(proc, wait=0.5)
    if not r.quiet:
        L.say(f"what pod2's eth0 saw ({why}):")
        r.output(out)
    return out


def reveal(L):
    r = L.r
    r.show(ip("neigh", "show", POD2_IP, "dev", "eth0", ns="pod1"))
    r.show(ip("-br", "link", "show", "dev", "eth0", ns="pod2"))
    out = _capture(L, "broken")
    if have("tcpdump") and not r.dry_run:
        L.check("the echo request reaches pod2 addressed to the old MAC, and pod1 sends no ARP",
                "ICMP echo request" in out and f"> {NEW_MAC}" not in out and "ARP" not in out)
    L.check("pod2 itself still reaches the node (its own neighbour entries are fine)",
            L.ping(GATEWAY.split("/")[0], "pod2"))


def fix(L):
    L.r.run(ip("neigh", "del", POD2_IP, "dev", "eth0", ns="pod1"))
    out = _capture(L, "fixed")
    if have("tcpdump"):
        L.check(f"pod1 asked again (ARP who-has {POD2_IP}) and pod2 answered with {NEW_MAC}",
                f"Request who-has {POD2_IP}" in out and f"Reply {POD2_IP} is-at {NEW_MAC}" in out)


def prove(L):
    ok, neigh = L.r.probe(ip("neigh", "show", POD2_IP, "dev", "eth0", ns="pod1"))
    L.check(f"pod1's neighbour entry for pod2 now holds {NEW_MAC}", NEW_MAC in neigh)


LAB = pitfall.Lab(
    LESSON,
    works=f"pod1 pings pod2 ({POD2_IP})",
    breaks=("pod1 gets a permanent neighbour entry for pod2's MAC (pinned, as some plugins do); then pod2 is "
            f"recreated: same address, new MAC {NEW_MAC}"),
    symptom="pod1's pings to pod2 vanish, while pod2 still reaches the node",
    reveals=("`ip neigh` in pod1 shows the old MAC, PERMANENT; tcpdump on pod2 sees the echo requests arrive "
             "addressed to a MAC it no longer has, and no ARP at all"),
    fixes="delete the pinned entry: pod1 asks again (who-has), pod2 answers with its new MAC",
    cause="neighbour",
    doctor=("pod1", POD2_IP),
    setup=setup, check=works, breakage=breakage, reveal=reveal, fix=fix, prove=prove,
)


if __name__ == "__main__":
    pitfall.main(LAB)
