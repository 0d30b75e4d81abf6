#!/usr/bin/env python3
"""Pitfall lab 20: Docker's FORWARD DROP meets br_netfilter. Two pods on one bridge talk
until Docker starts on the node: it sets the iptables FORWARD policy to DROP, and with
br_netfilter (bridge-nf-call-iptables=1) even frames the bridge switches between two of
its own ports go through FORWARD. Docker up to 27.2 (Debian 12's docker.io is 20.10) loads
br_netfilter whenever it starts with iptables on; since 27.3 only with icc=false, and since
27.4 also with userland-proxy=false, so on a newer Docker host it is whatever else loaded
it (a CNI plugin, kube-proxy's setup, the admin) that meets the DROP.

    sudo python3 stages/20_pitfall_forward_drop.py            # in a throwaway sandbox
    sudo python3 stages/20_pitfall_forward_drop.py --broken --keep   # explore the broken state
    python3 stages/20_pitfall_forward_drop.py --dry-run       # the lab as a shell script

The node is a namespace the lab creates: the machine's own firewall is never touched.
"""
import os

import pitfall
from lesson import Lesson, cnikit, in_netns

NODE, BRIDGE, GATEWAY = "node1", "br0", "10.0.20.1/24"
PODS = {"pod1": "10.0.20.2/24", "pod2": "10.0.20.3/24"}
POD2_IP = PODS["pod2"].split("/")[0]
BR_NF = "net.bridge.bridge-nf-call-iptables"

LESSON = Lesson(
    "20", "pitfall_forward_drop",
    goal="pods on one bridge stop talking when Docker's FORWARD DROP meets br_netfilter; "
         "the policy counter shows the drops, a narrow accept rule brings them back",
    picture=r"""
   +------------------------------ node1 (netns) -------------------------------+
   |   iptables FORWARD policy DROP (Docker)   bridge-nf-call-iptables = 1      |
   |                       br0  10.0.20.1/24                                     |
   |                      /                 \     frames switched between two   |
   |             veth-pod1                   veth-pod2   ports go through FORWARD |
   +---------------|-----------------------------|-------------------------------+
   +---- pod1 -----|--------+          +---------|------- pod2 ----+
   |  eth0 10.0.20.2/24     |          |  eth0 10.0.20.3/24        |
   +------------------------+          +---------------------------+
""",
    skips={"fix": "no accept rule: the FORWARD policy keeps dropping pod-to-pod frames"},
    tools=("ip", "ping", "iptables", "sysctl"),
)


def setup(L):
    L.step("a node (a namespace standing for a machine) with br0 and two pods on it, as in lesson 03")
    pitfall.node_with_pods(L, NODE, BRIDGE, GATEWAY, PODS)


def works(L, expect_fail=False):
    return L.ping(POD2_IP, "pod1", expect_fail=expect_fail)


def breakage(L):
    r = L.r
    if not r.dry_run and not os.path.exists("/proc/sys/net/bridge"):
        raise cnikit.UsageError("br_netfilter is not loaded on this machine (no /proc/sys/net/bridge): "
                                "`modprobe br_netfilter` (Docker up to 27.2 loads it) and run the lab again")
    L.sysctl(BR_NF, 1, ns=NODE)
    r.run(cnikit.iptables("-P", "FORWARD", "DROP", ns=NODE))


def reveal(L):
    r = L.r
    r.show(in_netns(["sysctl", BR_NF], NODE))
    before = pitfall.policy_packets(L, "FORWARD", NODE)
    L.ping(POD2_IP, "pod1", count=3, expect_fail=True)
    r.show(cnikit.iptables("-L", "FORWARD", "-v", "-n", "-x", ns=NODE))
    after = pitfall.policy_packets(L, "FORWARD", NODE)
    L.check(f"the FORWARD policy counter grew with the lost pings ({before} -> {after} packets)",
            after > before)


def fix(L):
    # cnikit's own rule for this (bridge add puts it there on a Docker host): tagged, so
    # `cnikit bridge del` and `cnikit cleanup` remove it with the bridge
    L.r.run(cnikit.iptables_rule("-I", *cnikit.bridge_forward_rule(BRIDGE), ns=NODE))
    L.r.show(cnikit.iptables("-S", "FORWARD", ns=NODE))


def prove(L):
    before = pitfall.policy_packets(L, "FORWARD", NODE)
    L.ping(POD2_IP, "pod1", count=3)
    after = pitfall.policy_packets(L, "FORWARD", NODE)
    L.check(f"the policy drops nothing any more (counter stays at {before})", after == before)
    ok, out = L.r.query(cnikit.iptables("-S", "FORWARD", ns=NODE))
    L.check("the policy is still DROP: the fix opened br0's own traffic, not the whole node",
            "-P FORWARD DROP" in out)


LAB = pitfall.Lab(
    LESSON,
    works=f"pod1 pings pod2 ({POD2_IP}) across br0",
    breaks=("Docker starts on the node: it loads br_netfilter (bridge-nf-call-iptables=1; Docker up to 27.2 "
            "always does, later ones with icc=false or userland-proxy=false) and sets the iptables FORWARD policy "
            "to DROP"),
    symptom="pod1 no longer reaches pod2, though both sit on the same bridge",
    reveals="the FORWARD policy's own counter grows with every lost ping; the sysctl says why bridged frames see it",
    fixes="a narrow accept for what br0 switches between its own ports (-i br0 -o br0), as Docker does for docker0",
    cause="forward-drop",
    doctor=("pod1", POD2_IP),
    setup=setup, check=works, breakage=breakage, reveal=reveal, fix=fix, prove=prove,
)


if __name__ == "__main__":
    pitfall.main(LAB)
