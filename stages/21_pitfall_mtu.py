#!/usr/bin/env python3
"""Pitfall lab 21: the VXLAN MTU black hole. Pods at MTU 1500 over a 1450 overlay: small
pings pass, and so does a bulk TCP transfer (its GSO bundles reach vxlan0, which answers
"fragmentation needed, mtu 1450", and pod1 learns the path MTU), but a packet that is one
frame of 1500 bytes (a request that fills one TCP segment, a UDP datagram or a ping with DF)
vanishes without a word: the bridge drops a plain frame too big for vxlan0 and tells no one.

    sudo python3 stages/21_pitfall_mtu.py            # both nodes as namespaces, in a sandbox
    sudo python3 stages/21_pitfall_mtu.py --broken --keep
    python3 stages/21_pitfall_mtu.py --dry-run       # the lab as a shell script
"""
import pitfall
from lesson import Lesson, cnikit, have, in_netns, ip, read_until

VNI, PORT = 42, 8080
NODES = {"node1": {"pod": "pod1", "pod_addr": "10.0.21.11/24", "underlay": "192.0.2.1/24"},
         "node2": {"pod": "pod2", "pod_addr": "10.0.21.12/24", "underlay": "192.0.2.2/24"}}
POD2_IP = "10.0.21.12"
FLOOD = "00:00:00:00:00:00"
OVERLAY_MTU = cnikit.DEFAULT_MTU - cnikit.VXLAN_OVERHEAD        # 1450
# One full TCP segment at MTU 1500: IPv4 20 + TCP 20 + timestamps option 12 = 52 bytes of headers.
# Written at once it leaves as one plain frame (no GSO bundle), the packet the black hole swallows.
REQUEST = cnikit.DEFAULT_MTU - 52                               # 1448
BULK = 300000                                                   # bytes of the bulk transfer
TIMEOUT = 8                                                     # seconds before we call it stalled (a loaded machine is slow)

LESSON = Lesson(
    "21", "pitfall_mtu",
    goal="pods at MTU 1500 over a 1450 VXLAN overlay silently lose every full-size packet that travels as "
         "one frame (a one-segment request, a UDP datagram, a ping with DF); doctor finds the MTU step, and "
         "the same request passes at 1450",
    picture=r"""
            node1 (netns)                                 node2 (netns)
   +--------------------------------+          +--------------------------------+
   |  pod1 eth0 10.0.21.11  mtu 1500|          |mtu 1500  10.0.21.12 eth0 pod2  |
   |            | veth-pod1 mtu 1500|          |mtu 1500 veth-pod2 |            |
   |           br0 --- vxlan0       |          |       vxlan0 --- br0           |
   |        1500 frames  mtu 1450 X |          | mtu 1450   (VNI 42)            |
   |   eth0 192.0.2.1/24 mtu 1500 ==|=underlay=|== mtu 1500 eth0 192.0.2.2/24   |
   +--------------------------------+          +--------------------------------+
""",
    skips={"fix": "the pods stay at MTU 1500: every full-size packet keeps dying at vxlan0"},
    tools=("ip", "bridge", "ping", "socat", "ss"),
)


def setup(L):
    r = L.r
    L.step("two nodes joined by an underlay (MTU 1500), a VXLAN overlay on a bridge in each, "
           f"as in lesson 06; pods at the overlay's MTU {OVERLAY_MTU}")
    for node in NODES:
        cnikit.netns_add(r, node, lo_up=True)
    pitfall.link_between(L, "node1", "eth0", NODES["node1"]["underlay"], "node2", "eth0", NODES["node2"]["underlay"])
    for node, spec in NODES.items():
        peer = NODES["node2" if node == "node1" else "node1"]["underlay"].split("/")[0]
        pitfall.node_with_pods(L, node, "br0", None, {spec["pod"]: spec["pod_addr"]}, mtu=OVERLAY_MTU,
                               new_node=False)
        cnikit.vxlan_add(r, "vxlan0", VNI, local=spec["underlay"].split("/")[0], dev="eth0",
                         bridge_name="br0", mtu=OVERLAY_MTU, ns=node)
        cnikit.vxlan_fdb_add(r, "vxlan0", FLOOD, peer, ns=node)
    L.step(f"pod2 counts the bytes it receives on tcp/{PORT} and says how many")
    # -T: a connection the black hole stalled ends after 5 s idle instead of lingering
    r.spawn(in_netns(["socat", "-T", "5", f"TCP-LISTEN:{PORT},bind={POD2_IP},reuseaddr,fork", "SYSTEM:wc -c"], "pod2"))
    L.wait_listening(PORT, "pod2")


def send(L, size, expect_fail=False):
    """SIZE bytes from pod1 to pod2 over TCP, written at once; True if pod2 counted them all."""
    argv = (f"head -c {size} /dev/zero | timeout {TIMEOUT} socat -t {TIMEOUT} - "
            f"TCP:{POD2_IP}:{PORT},connect-timeout=2")
    ok, out = L.r.probe(in_netns(["sh", "-c", argv], "pod1"), expect_fail=expect_fail)
    return ok and out.strip().splitlines()[-1:] == [str(size)]


def works(L, expect_fail=False):
    return send(L, REQUEST, expect_fail)


def _set_mtu(L, mtu):
    for node, spec in NODES.items():
        L.r.run(ip("link", "set", "dev", "eth0", "mtu", mtu, ns=spec["pod"]))
        L.r.run(ip("link", "set", "dev", f"veth-{spec['pod']}", "mtu", mtu, ns=node))


def breakage(L):
    _set_mtu(L, cnikit.DEFAULT_MTU)


def reveal(L):
    r = L.r
    L.check("a small ping still passes (it fits in any MTU)", L.ping(POD2_IP, "pod1"))
    seen = {}
    captures = {}
    if have("tcpdump"):
        for dev in ("veth-pod1", "vxlan0"):
            proc = r.spawn(in_netns(["tcpdump", "--immediate-mode", "-lni", dev, "-c", "1", "icmp and greater 1400"],
                                    "node1"))
            if proc is not None and read_until(proc, "listening on", "stderr") is None:
                L.say(f"tcpdump on {dev} did not start")
            captures[dev] = proc
    big = r.probe(in_netns(["ping", "-c", "1", "-W", "1", "-M", "do", "-s", "1472", POD2_IP], "pod1"),
                  expect_fail=True)[0]
    L.check("a full-size ping (1472 bytes of data + 28 of headers = 1500, do not fragment) gets no answer "
            "and no error", not big)
    for dev, proc in captures.items():
        out, _ = r.stop(proc, wait=0.5)
        seen[dev] = "ICMP echo request" in out
        if not r.quiet:
            L.say(f"tcpdump on node1's {dev}: " + (out.strip() or "nothing"))
    if captures:
        L.check("tcpdump: the 1500-byte request entered node1's bridge (veth-pod1) and never left through vxlan0",
                seen.get("veth-pod1") and not seen.get("vxlan0"))
    r.show(ip("link", "show", "dev", "eth0", ns="pod1"))
    r.show(ip("link", "show", "dev", "vxlan0", ns="node1"))
    # Why only some packets die: the bridge drops a plain frame too big for its port, and says
    # nothing. TCP's GSO bundles (more than one segment) pass that test; vxlan0 (Linux 5.9 and later,
    # as a bridge port) finds their segments too big and answers with ICMP "fragmentation needed".
    L.say(f"a bulk transfer ({BULK} bytes) is another matter: TCP hands the bridge bundles of many segments "
          f"(GSO), vxlan0 sees they will not fit and answers pod1 with ICMP 'fragmentation needed, mtu "
          f"{OVERLAY_MTU}'; pod1 caches that path MTU and the transfer goes through")
    L.check(f"the bulk transfer of {BULK} bytes gets through the same black hole", send(L, BULK))
    ok, out = r.probe(ip("route", "get", POD2_IP, ns="pod1"))
    L.check(f"pod1 learned the path MTU {OVERLAY_MTU} from vxlan0's ICMP (ip route get: cache ... mtu "
            f"{OVERLAY_MTU})", f"mtu {OVERLAY_MTU}" in out, out)
    L.say("that learned MTU lasts 10 minutes: until it expires, one-segment requests pass too; that is why "
          "the black hole comes and goes in real life. pod1 forgets it now, as it would by itself")
    r.run(ip("route", "flush", "cache", ns="pod1"))
    L.say("what stalls, then: whatever reaches the bridge as one plain frame of more than 1450 bytes (a TCP "
          "message that fills one segment and its retransmissions, a UDP datagram too big for the overlay, which Linux "
          "sends with DF, a ping with DF), and any transfer at all where the ICMP cannot reach the sender "
          "(a firewall that drops ICMP, an older kernel whose vxlan sends none)")


def fix(L):
    _set_mtu(L, OVERLAY_MTU)


def prove(L):
    ok, out = L.r.probe(in_netns(["ping", "-c", "1", "-W", "1", "-M", "do", "-s", "1472", POD2_IP], "pod1"),
                        expect_fail=True)
    L.check("pod1's eth0 now refuses to build a packet vxlan0 cannot carry (ping -s 1472 says "
            "'message too long' instead of vanishing)", not ok and "message too long" in out)
    L.check("the largest ping that fits the overlay (1422 + 28 = 1450) passes",
            L.r.probe(in_netns(["ping", "-c", "1", "-W", "1", "-M", "do", "-s", "1422", POD2_IP], "pod1"))[0])


LAB = pitfall.Lab(
    LESSON,
    works=f"a request of {REQUEST} bytes (one full TCP segment) from pod1 reaches pod2 across the overlay",
    breaks=(f"the pods come up at MTU {cnikit.DEFAULT_MTU} (a CNI config that forgot the overlay's MTU), "
            f"while vxlan0 carries only {OVERLAY_MTU}"),
    symptom=("the connection opens, the request never arrives and the client waits until it gives up; "
             "nothing reports an error"),
    reveals=("small pings pass, a full-size one (-M do -s 1472) does not; tcpdump shows where it dies: "
             "it enters node1's bridge and never leaves through vxlan0. A bulk transfer, by contrast, passes: "
             "vxlan0 answers its GSO bundles with ICMP and pod1 learns the path MTU"),
    fixes=(f"every pod link back to MTU {OVERLAY_MTU}: the overlay's MTU is the underlay's minus "
           f"{cnikit.VXLAN_OVERHEAD}"),
    cause="mtu",
    doctor=("pod1", POD2_IP),
    setup=setup, check=works, breakage=breakage, reveal=reveal, fix=fix, prove=prove,
)


if __name__ == "__main__":
    pitfall.main(LAB)
