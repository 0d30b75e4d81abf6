#!/usr/bin/env python3
"""Pitfall lab 28: two iptables backends on one host. Debian 12's `iptables` is iptables-nft:
its rules live in nf_tables. iptables-legacy keeps its rules in the older x_tables. Both sets
of hooks see every packet, so a packet must pass both, but each tool lists only its own
rules. An old component whose image ships iptables-legacy (an old kube-proxy or Docker
image, a script pinned to `iptables-legacy`) then drops traffic that `iptables -S` on the
host cannot explain: there, policy ACCEPT and the node's own accept rule for the traffic.

    sudo python3 stages/28_pitfall_two_backends.py            # in a throwaway sandbox
    sudo python3 stages/28_pitfall_two_backends.py --broken --keep node1   # explore it
    python3 stages/28_pitfall_two_backends.py --dry-run       # the lab as a shell script

The node and the server are namespaces the lab creates: the machine's own tables are never
touched.
"""
import pitfall
from lesson import Lesson, cnikit, in_netns

NODE, BRIDGE, GATEWAY = "node1", "br0", "10.0.28.1/24"
PODS = {"pod1": "10.0.28.2/24"}
SUBNET = "10.0.28.0/24"
SERVER, UPLINK, UPLINK_ADDR, SERVER_ADDR = "server", "uplink0", "198.51.100.1/24", "198.51.100.10/24"
SERVER_IP, UPLINK_IP = SERVER_ADDR.split("/")[0], UPLINK_ADDR.split("/")[0]
LEGACY = "iptables-legacy"
TAG = ["-m", "comment", "--comment", "cnikit lab 28"]
# The node's own rules, in iptables (nf_tables here): the pods' traffic may be forwarded, and its replies.
NODE_RULES = [["-s", SUBNET] + TAG + ["-j", "ACCEPT"],
              ["-d", SUBNET, "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED"] + TAG + ["-j", "ACCEPT"]]

LESSON = Lesson(
    "28", "pitfall_two_backends",
    goal="a DROP written with iptables-legacy stops pods whose traffic iptables-nft accepts; "
         "only iptables-legacy's counters show it, and one backend for everything brings them back",
    picture=r"""
   +------------------------------ node1 (netns) ------------------------------+
   |  iptables (nf_tables):  FORWARD policy ACCEPT, -s 10.0.28.0/24 -j ACCEPT    |
   |  iptables-legacy (x_tables): FORWARD policy DROP  <- the old component     |
   |       a forwarded packet passes through BOTH; each tool shows only its own  |
   |   br0 10.0.28.1/24                                  uplink0 198.51.100.1/24  |
   +------|------------------------------------------------------|--------------+
   +--- pod1 ----------------+                     +--- server ---|--------------+
   |  eth0 10.0.28.2/24      |                     |  eth0 198.51.100.10/24      |
   +-------------------------+                     +-----------------------------+
""",
    skips={"fix": "the legacy DROP stays: pod1's traffic keeps dying where `iptables -S` cannot see"},
    tools=("ip", "ping", "iptables", LEGACY, "iptables-legacy-save", "iptables-nft-restore", "sysctl"),
)


def legacy(*args):
    return in_netns([LEGACY, "-w", *args], NODE)


def setup(L):
    r = L.r
    L.step("a node with br0 and a pod, and an uplink to a server it routes to (no NAT: the server routes "
           "back); the node's own rules accept the pod's forwarded traffic, as a CNI plugin's do")
    pitfall.node_with_pods(L, NODE, BRIDGE, GATEWAY, PODS)
    cnikit.netns_add(r, SERVER, lo_up=True)
    cnikit.veth_add(r, UPLINK, "eth0", netns=SERVER, addr=UPLINK_ADDR, peer_addr=SERVER_ADDR, ns=NODE)
    cnikit.route_add(r, SUBNET, via=UPLINK_IP, ns=SERVER)
    L.sysctl("net.ipv4.ip_forward", 1, ns=NODE)
    for spec in NODE_RULES:
        r.run(cnikit.iptables_rule("-A", "filter", "FORWARD", spec, ns=NODE))


def works(L, expect_fail=False):
    return L.ping(SERVER_IP, "pod1", expect_fail=expect_fail)


def breakage(L):
    r = L.r
    r.run(legacy("-P", "FORWARD", "DROP"))
    r.run(legacy("-A", "FORWARD", "-i", "docker0", "-o", "docker0", "-j", "ACCEPT"))


def reveal(L):
    r = L.r
    L.say("iptables (iptables-nft here): policy ACCEPT and the node's accept rule; nothing in it drops "
          "pod1's packets. Its counters do not even see them (x_tables' FORWARD hook ran first and dropped "
          "them), and its warning, on stderr, says where to look:")
    ok, out = r.probe(cnikit.iptables("-S", "FORWARD", "-v", ns=NODE))
    L.check("`iptables -S` warns that iptables-legacy tables are present",
            ok and "iptables-legacy tables present" in out)
    before = pitfall.policy_packets(L, "FORWARD", NODE, LEGACY)
    L.ping(SERVER_IP, "pod1", count=3, expect_fail=True)
    r.show(legacy("-L", "FORWARD", "-v", "-n", "-x"))
    after = pitfall.policy_packets(L, "FORWARD", NODE, LEGACY)
    L.check(f"iptables-legacy's FORWARD policy counter grew with the lost pings ({before} -> {after} packets)",
            after > before)


def fix(L):
    r = L.r
    L.say("the old component's filter rules, moved into nf_tables: --noflush appends them after the node's "
          "own accepts and takes its DROP policy along")
    r.run(in_netns(["sh", "-c", "iptables-legacy-save -t filter | iptables-nft-restore --noflush"], NODE))
    r.run(legacy("-F"))
    r.run(legacy("-P", "FORWARD", "ACCEPT"))
    r.show(cnikit.iptables("-S", "FORWARD", ns=NODE))


def prove(L):
    r = L.r
    ok, out = r.query(legacy("-S", "FORWARD"))
    L.check("the legacy FORWARD chain is empty, its policy ACCEPT",
            out.split() == ["-P", "FORWARD", "ACCEPT"])
    ok, out = r.query(cnikit.iptables("-S", "FORWARD", ns=NODE))
    L.check("all of FORWARD is in one place now: policy DROP, the node's accepts first, the old component's after",
            "-P FORWARD DROP" in out and out.find("cnikit lab 28") < out.find("docker0"))


LAB = pitfall.Lab(
    LESSON,
    works=f"pod1 reaches the server ({SERVER_IP}) through node1's FORWARD chain",
    breaks=("an old component whose image ships iptables-legacy starts on node1: in its own backend it sets "
            "FORWARD's policy to DROP and accepts only its own bridge's traffic, as an old Docker does"),
    symptom="pod1 no longer reaches the server, though `iptables -S` shows an accept rule for it",
    reveals=("`iptables -S` (nf_tables) shows nothing that drops and warns that legacy tables exist; "
             "`iptables-legacy` shows the DROP policy, its counter growing with every lost ping"),
    fixes=("one backend for everything: the old component's rules move into nf_tables, behind the node's own "
           "accepts, and the legacy tables are emptied (in real life: run it with iptables-nft)"),
    cause="other-backend",
    doctor=("pod1", SERVER_IP),
    setup=setup, check=works, breakage=breakage, reveal=reveal, fix=fix, prove=prove,
)


if __name__ == "__main__":
    pitfall.main(LAB)
