#!/usr/bin/env python3
"""Lesson 08: what each path costs, measured. Every path the lessons built, in one sandbox,
measured in one run side by side: TCP throughput (iperf3), round-trip time (ping) and TCP
connect time, each relative to the plain veth; then the overlay again with its pods at the
wrong MTU, and with loss (and, where the kernel has netem, delay) on the underlay.

    sudo python3 stages/08_cost.py             # in a throwaway sandbox: a table and bar charts
    sudo python3 stages/08_cost.py --json      # the numbers as JSON on stdout (the verdict on stderr)
    python3 stages/08_cost.py --dry-run        # the lesson as a shell script

The numbers are relative and from one run: on a shared machine they move from run to run.
The checks never compare with an absolute speed, only properties the lesson controls (every
path carries data, the wrong MTU drops full-size frames, the underlay's loss shows as
retransmits, its delay as round-trip time). Every packet stays in the lesson's namespaces.
"""
import contextlib
import gzip
import json
import math
import os
import re
import sys

from lesson import Lesson, cnikit, in_netns, ip

IPERF_PORT, CONNECT_PORT = 5201, 5202
# iperf3 sends a fixed amount (-n), not for a time: its -t takes whole seconds only, and a second per
# path would make the lesson too long for `make demo`; 100 MB is far past TCP's slow start here.
VOLUME = "100M"
GIVE_UP = "10"           # seconds before `timeout` stops an iperf3 client on a path that stalls
# iperf3's control connection gets 3 s (in ms): a lost SYN is sent again after 1 s, and the lossy path loses some
CONNECT_TIMEOUT = "3000"
PINGS, FULL_PINGS, CONNECTS = 20, 3, 10
LISTEN_FOR = "60"        # seconds the connect-time listener lives at most (it is stopped long before)
LOSS_PCT, DELAY_MS = 2, 20
# A lossy path must retransmit at least this share of its segments (a tenth of the loss set on the
# underlay: a drop there can take a whole GSO bundle or just one segment). A clean path retransmits
# next to nothing.
MIN_RETRANS = LOSS_PCT / 10 / 100
OVERLAY_MTU = cnikit.DEFAULT_MTU - cnikit.VXLAN_OVERHEAD        # 1450
VNI, FLOOD = 42, "00:00:00:00:00:00"
NODES = {"node1": "192.0.2.1/24", "node2": "192.0.2.2/24"}      # the underlay between the two nodes
# pod -> (node, address, MTU of its link): pod1/pod2 at the overlay's MTU, pod3/pod4 at 1500 (too big)
PODS = {"pod1": ("node1", "10.0.86.11/24", OVERLAY_MTU), "pod2": ("node2", "10.0.86.12/24", OVERLAY_MTU),
        "pod3": ("node1", "10.0.86.13/24", cnikit.DEFAULT_MTU), "pod4": ("node2", "10.0.86.14/24", cnikit.DEFAULT_MTU)}
BRIDGE, BRIDGE_GW = "br0", "10.0.81.1/24"
UPLINK, UPLINK_ADDR, SERVER_ADDR = "uplink0", "203.0.113.1/24", "203.0.113.10/24"
ROUTED_GW = "10.0.82.1"                                         # on the host end of each routed pod's veth, as /32
ROUTED = {"rt1": "10.0.82.2", "rt2": "10.0.82.3"}


def ip_of(cidr):
    return cidr.split("/")[0]


class Path:
    """One path: a client namespace (None: the host) talks to a server at ADDR in SERVER_NS.
    SETUP and TEARDOWN, lists of argv, change the underlay just for this measurement."""

    def __init__(self, key, label, client, server_ns, addr, mtu=cnikit.DEFAULT_MTU, setup=(), teardown=(),
                 why=None, skip=None):
        self.key, self.label, self.client, self.server_ns = key, label, client, server_ns
        self.addr, self.mtu = addr, mtu
        self.setup, self.teardown, self.why, self.skip = list(setup), list(teardown), why, skip
        self.data = {}


def netem_available():
    """Does this kernel have netem (CONFIG_NET_SCH_NETEM, built in or a module)? A read-only
    look at its config (or module file), so a dry run decides as the live run does."""
    release = os.uname().release
    for path, opener in (("/proc/config.gz", gzip.open), (f"/boot/config-{release}", open)):
        try:
            with opener(path, "rt") as f:
                return re.search(r"^CONFIG_NET_SCH_NETEM=[ym]$", f.read(), re.M) is not None
        except OSError:
            continue
    return any(os.path.exists(f"/lib/modules/{release}/kernel/net/sched/sch_netem.ko{ext}")
               for ext in ("", ".xz", ".zst", ".gz"))


def underlay_loss(netem, node="node1", dev="eth0"):
    """(setup, teardown) argv lists: LOSS_PCT% of what NODE sends on its underlay is lost. netem where the
    kernel has it; else iptables' statistic match drops the same share of the VXLAN datagrams."""
    if netem:
        return ([in_netns(["tc", "qdisc", "add", "dev", dev, "root", "netem", "loss", f"{LOSS_PCT}%"], node)],
                [in_netns(["tc", "qdisc", "del", "dev", dev, "root"], node)])
    spec = ["-o", dev, "-p", "udp", "--dport", str(cnikit.VXLAN_PORT), "-m", "statistic", "--mode", "random",
            "--probability", f"{LOSS_PCT / 100:g}", "-m", "comment", "--comment", "cnikit lesson 08 loss",
            "-j", "DROP"]
    return ([cnikit.iptables("-A", "OUTPUT", *spec, ns=node)], [cnikit.iptables("-D", "OUTPUT", *spec, ns=node)])


def underlay_drops(r, node="node1", dev="eth0"):
    """How many datagrams the loss step dropped on NODE's underlay so far: the iptables rule's
    packet counter, or netem's `dropped` (0 where neither is in place: the step was skipped)."""
    drops = 0
    ok, out = r.query(cnikit.iptables("-w", "-n", "-v", "-x", "-L", "OUTPUT", ns=node))
    for line in out.splitlines() if ok else []:
        if "cnikit lesson 08 loss" in line and line.split()[0].isdigit():
            drops += int(line.split()[0])
    ok, out = r.query(in_netns(["tc", "-s", "qdisc", "show", "dev", dev], node))
    m = re.search(r"netem .*?dropped (\d+)", out, re.S) if ok else None
    return drops + (int(m.group(1)) if m else 0)


def underlay_delay(node="node1", dev="eth0"):
    return ([in_netns(["tc", "qdisc", "add", "dev", dev, "root", "netem", "delay", f"{DELAY_MS}ms"], node)],
            [in_netns(["tc", "qdisc", "del", "dev", dev, "root"], node)])


def paths(netem):
    overlay = ("pod1", "pod2", ip_of(PODS["pod2"][1]), OVERLAY_MTU)
    found = [Path("veth", "host -> ns0, a plain veth", None, "ns0", "10.0.80.2"),
             Path("bridge", "ns1 -> ns2 over br0", "ns1", "ns2", "10.0.81.3"),
             Path("nat", "ns1 -> internet, NAT", "ns1", "internet", ip_of(SERVER_ADDR)),
             Path("routed", "rt1 -> rt2, routed /32", "rt1", "rt2", ROUTED["rt2"]),
             Path("vxlan", "pod1 -> pod2, VXLAN", *overlay),
             Path("mtu", "pod3 -> pod4, VXLAN, MTU 1500", "pod3", "pod4", ip_of(PODS["pod4"][1]), cnikit.DEFAULT_MTU),
             Path("loss", f"pod1 -> pod2, {LOSS_PCT}% loss", *overlay, *underlay_loss(netem), skip="loss",
                  why=f"node1's underlay loses {LOSS_PCT}% of what it sends (" + ("netem" if netem else
                      "iptables' statistic match on the VXLAN datagrams, as this kernel has no netem") + ")")]
    if netem:
        found.append(Path("delay", f"pod1 -> pod2, +{DELAY_MS} ms", *overlay, *underlay_delay(),
                          why=f"node1's underlay holds each packet {DELAY_MS} ms (netem) before sending it"))
    return found


# What a listener for the connect times runs: it never accepts; the kernel completes each
# handshake by itself (the backlog holds the few connections made).
LISTEN = "import socket, sys, time; s = socket.create_server((sys.argv[1], int(sys.argv[2])), backlog=64); " \
         "time.sleep(float(sys.argv[3]))"
# The connect-time client: N connects, each timed from connect() to its return (SYN to SYN-ACK, one
# round trip plus the kernel's work at both ends). A lost SYN is sent again after 1 s, so each connect
# gets 3 s; the first that fails ends it (a path that carries nothing costs 3 s, not 30).
CONNECT = """import socket, statistics, sys, time
addr, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
took = []
for _ in range(n):
    s = socket.socket(); s.settimeout(3); t = time.perf_counter(); s.connect((addr, port))
    took.append((time.perf_counter() - t) * 1000); s.close()
print(f"connect ms: median {statistics.median(took):.4f} min {min(took):.4f} of {n}")"""

LESSON = Lesson(
    "08", "cost",
    goal="every path carries TCP, pings and connects, measured side by side relative to the plain veth; pods at "
         "MTU 1500 over the 1450 overlay lose every full-size frame; loss on the underlay shows as retransmits"
         + (f", its {DELAY_MS} ms delay in every round trip" if netem_available() else ""),
    picture=r"""
   +------------------------------------------ host ------------------------------------------+
   |  veth-ns0 10.0.80.1   br0 10.0.81.1       uplink0 203.0.113.1    veth-rt1  veth-rt2      |
   |     |                  /       \             |  MASQUERADE,       10.0.82.1/32 on each,  |
   |     |                 /         \            |  ip_forward        a route /32 per pod    |
   +-----|----------------|-----------|-----------|----------------------|---------|----------+
       ns0 10.0.80.2    ns1 .2      ns2 .3      internet 203.0.113.10  rt1 .2    rt2 .3

            node1 (netns)                                 node2 (netns)
   +--------------------------------+          +--------------------------------+
   |  pod1 10.0.86.11  mtu 1450     |          |     mtu 1450  10.0.86.12 pod2  |
   |  pod3 10.0.86.13  mtu 1500 (!) |          |     mtu 1500  10.0.86.14 pod4  |
   |           br0 --- vxlan0 1450  |          |  vxlan0 --- br0     (VNI 42)   |
   |   eth0 192.0.2.1 ==============|=underlay=|============== 192.0.2.2 eth0   |
   |   (loss, delay: node1's eth0)  |          |                                |
   +--------------------------------+          +--------------------------------+
   each path: iperf3 -n 100M (TCP), ping x20, 10 TCP connects, full-size pings (DF)
""",
    skips={"nat": "no MASQUERADE: the internet has no way back to ns1, the NAT path carries nothing",
           "fdb": "no flood entry on vxlan0: ARP for the far pod never crosses, no VXLAN path carries anything",
           "loss": "the underlay loses nothing: the lossy path retransmits no more than the clean overlay"},
    tools=("ip", "bridge", "ping", "iptables", "sysctl", "ss", "iperf3", "python3", "timeout")
    + (("tc",) if netem_available() else ()),
)
OPTIONS = {"json": False}
RESULTS = {}             # what --json prints: filled by verify


# ---------------------------------------------------------------- building every path

def build(L):
    r = L.r
    L.step("the baseline: a plain veth from the host into ns0, as in lesson 02")
    cnikit.netns_add(r, "ns0", lo_up=True)
    cnikit.veth_add(r, "veth-ns0", "eth0", netns="ns0", addr="10.0.80.1/24", peer_addr="10.0.80.2/24")

    L.step("two namespaces on a bridge, as in lesson 03: one frame through two veths and br0")
    cnikit.bridge_add(r, BRIDGE, addr=BRIDGE_GW)
    for ns, addr in (("ns1", "10.0.81.2/24"), ("ns2", "10.0.81.3/24")):
        cnikit.netns_add(r, ns, lo_up=True)
        cnikit.veth_add(r, f"veth-{ns}", "eth0", netns=ns, peer_addr=addr)
    cnikit.bridge_attach(r, BRIDGE, ["veth-ns1", "veth-ns2"])

    L.step("egress as in lesson 05: ns1 routes through the host, which masquerades it out of uplink0 "
           "to \"the internet\" (a namespace; a documentation address)")
    cnikit.netns_add(r, "internet", lo_up=True)
    cnikit.veth_add(r, UPLINK, "eth0", netns="internet", addr=UPLINK_ADDR, peer_addr=SERVER_ADDR)
    cnikit.route_add(r, "default", via=ip_of(BRIDGE_GW), ns="ns1")
    L.sysctl("net.ipv4.ip_forward", 1)
    if L.step("MASQUERADE: the server's replies go to uplink0's address and conntrack maps them back", skip="nat"):
        cnikit.nat_add(r, "10.0.81.0/24", UPLINK)

    L.step(f"the routed model as in lesson 07c: each pod a /32, the gateway {ROUTED_GW} as /32 on the host "
           "end of its veth, a host route /32 per pod: the host routes every packet, no bridge")
    for ns, addr in ROUTED.items():
        cnikit.netns_add(r, ns, lo_up=True)
        cnikit.veth_add(r, f"veth-{ns}", "eth0", netns=ns, addr=f"{ROUTED_GW}/32", peer_addr=f"{addr}/32")
        cnikit.route_add(r, f"{ROUTED_GW}/32", dev="eth0", ns=ns)
        cnikit.route_add(r, "default", via=ROUTED_GW, ns=ns)
        cnikit.route_add(r, f"{addr}/32", dev=f"veth-{ns}")
    if cnikit.forward_drops(r):
        # A Docker host (FORWARD policy DROP): the host routes between the two veths, so it must
        # accept that, and only that, as a CNI plugin's forward-accept rules would (tagged: undone).
        r.note("this host's FORWARD policy is DROP (Docker sets it): accept what the host routes between "
               "the routed pods' veths")
        tag = ["-m", "comment", "--comment", f"{cnikit.TAG} lesson 08 routed"]
        for a, b in (("rt1", "rt2"), ("rt2", "rt1")):
            spec = ["-i", f"veth-{a}", "-o", f"veth-{b}"] + tag + ["-j", "ACCEPT"]
            r.run(cnikit.iptables_rule("-A", "filter", "FORWARD", spec),
                  creates=cnikit.Change.rule("filter", "FORWARD", spec))

    L.step(f"two nodes and a VXLAN overlay between them, as in lesson 06 (vxlan0 MTU {OVERLAY_MTU}); "
           f"pod1 and pod2 at the overlay's MTU, pod3 and pod4 at {cnikit.DEFAULT_MTU} as in lab 21 (too big)")
    for node in NODES:
        cnikit.netns_add(r, node, lo_up=True)
    cnikit.veth_add(r, "eth0", "eth0", netns="node2", addr=NODES["node1"], peer_addr=NODES["node2"], ns="node1")
    for node, underlay in NODES.items():
        cnikit.bridge_add(r, BRIDGE, ns=node)
        cnikit.vxlan_add(r, "vxlan0", VNI, local=ip_of(underlay), dev="eth0", bridge_name=BRIDGE,
                         mtu=OVERLAY_MTU, ns=node)
    for pod, (node, addr, mtu) in PODS.items():
        cnikit.netns_add(r, pod, lo_up=True)
        cnikit.veth_add(r, f"veth-{pod}", "eth0", netns=pod, peer_addr=addr, mtu=mtu, ns=node)
        cnikit.bridge_attach(r, BRIDGE, [f"veth-{pod}"], ns=node)
    if L.step("each vxlan0 floods frames for unknown MACs (ARP) to the other node", skip="fdb"):
        for node in NODES:
            peer = ip_of(NODES["node2" if node == "node1" else "node1"])
            cnikit.vxlan_fdb_add(r, "vxlan0", FLOOD, peer, ns=node)


# ---------------------------------------------------------------- measuring

def measure_cmd(L, argv, timeout=30):
    """Echo and run one measurement; its raw output is parsed, not printed (a summary line is).
    It may fail (a path that carries nothing): that is data, so the script goes on (`|| true`)."""
    r = L.r
    r.echo(argv, " || true")
    if r.dry_run:
        return False, ""
    try:
        proc = r.execute(argv, timeout=timeout)
    except cnikit.CnikitError as e:
        return False, str(e)
    return proc.returncode == 0, proc.stdout + proc.stderr


def ping_summary(text):
    """(sent, received, rtt min, avg) from ping's summary lines; rtts None when nothing came back."""
    counts = re.search(r"(\d+) packets transmitted, (\d+) received", text)
    rtt = re.search(r"= ([\d.]+)/([\d.]+)/([\d.]+)/", text)
    sent, got = (int(counts.group(1)), int(counts.group(2))) if counts else (0, 0)
    return sent, got, (float(rtt.group(1)) if rtt else None), (float(rtt.group(2)) if rtt else None)


def iperf_summary(text):
    """(bytes, bits a second received, retransmits, error) from iperf3 -J; zeros and iperf3's
    error (or the end of what it said) when the test failed."""
    try:
        report = json.loads(text[text.index("{"):])
    except ValueError:
        return 0, 0.0, 0, (text.strip().splitlines() or ["no output"])[-1]
    try:
        end = report.get("end", {})
        sent, received = end["sum_sent"], end["sum_received"]
        return int(received["bytes"]), float(received["bits_per_second"]), int(sent.get("retransmits", 0)), None
    except (KeyError, TypeError, AttributeError):
        return 0, 0.0, 0, str(report.get("error", "no summary")) if isinstance(report, dict) else "no summary"


def measure(L, path):
    r, ns, addr = L.r, path.server_ns, path.addr
    L.say("")
    L.say(f"-- {path.label}")
    changed = path.setup and L.step(path.why + ", just for this measurement", skip=path.skip)
    for argv in path.setup if changed else ():
        r.run(argv)
    servers = [r.spawn(in_netns(["iperf3", "-s", "-1", "-B", addr, "-p", str(IPERF_PORT)], ns)),
               r.spawn(in_netns(["python3", "-c", LISTEN, addr, str(CONNECT_PORT), LISTEN_FOR], ns))]
    L.wait_listening(IPERF_PORT, ns)
    L.wait_listening(CONNECT_PORT, ns)
    d = path.data
    _, out = measure_cmd(L, in_netns(["ping", "-q", "-c", str(PINGS), "-i", "0.01", "-W", "1", addr], path.client))
    d["pings_sent"], d["pings_received"], d["rtt_min_ms"], d["rtt_avg_ms"] = ping_summary(out)
    size = path.mtu - 28          # the biggest ping that is one frame at the sender's MTU: IPv4 20 + ICMP 8
    _, out = measure_cmd(L, in_netns(["ping", "-q", "-c", str(FULL_PINGS), "-i", "0.01", "-W", "1", "-M", "do",
                                      "-s", str(size), addr], path.client))
    d["full_size"], (d["full_sent"], d["full_received"], _, _) = size + 28, ping_summary(out)
    ok, out = measure_cmd(L, in_netns(["python3", "-c", CONNECT, addr, str(CONNECT_PORT), str(CONNECTS)],
                                      path.client))
    m = re.search(r"median ([\d.]+)", out) if ok else None
    d["connect_ms"] = float(m.group(1)) if m else None
    _, out = measure_cmd(L, in_netns(["timeout", GIVE_UP, "iperf3", "-c", addr, "-p", str(IPERF_PORT), "-n", VOLUME,
                                      "-J", "--connect-timeout", CONNECT_TIMEOUT], path.client))
    d["bytes"], d["bits_per_second"], d["retransmits"], d["iperf3_error"] = iperf_summary(out)
    if path.key == "loss":      # what the underlay really dropped: the cause, not only its effect
        d["underlay_drops"] = underlay_drops(r)
    for proc in reversed(servers):
        r.stop(proc)
    for argv in path.teardown if changed else ():
        r.run(argv)
    if not r.dry_run:
        L.say(f"   tcp {_rate(d['bits_per_second'])}, {d['retransmits']} retransmits; ping "
              f"{d['pings_received']}/{d['pings_sent']}, avg {_ms(d['rtt_avg_ms'])}; connect {_ms(d['connect_ms'])}; "
              f"full-size ({d['full_size']} bytes, DF) {d['full_received']}/{d['full_sent']}")


def by_path(measured, key):
    return next(p for p in measured if p.key == key)


def cached_mtu(route):
    """The path MTU in `ip -j route get`'s cache entry (learned from ICMP), or None."""
    for metric in ((route or [{}])[0].get("metrics") or []):
        if isinstance(metric, dict) and "mtu" in metric:
            return metric["mtu"]
    return None


def carries(d):
    return d.get("bytes", 0) > 0 and d.get("pings_received", 0) > 0 and d.get("connect_ms") is not None


def verify(L):
    r = L.r
    netem = netem_available()
    L.say("each path in turn: its server (iperf3 -s -1 and a listener for the connect times) in the far "
          f"namespace, then from the near one {PINGS} pings {0.01 * 1000:g} ms apart, {FULL_PINGS} full-size pings "
          f"that must not be fragmented (-M do), {CONNECTS} timed TCP connects and {VOLUME}B over TCP with iperf3")
    if netem:
        L.say("this kernel has netem: loss and delay come from `tc qdisc ... netem` on node1's underlay")
    else:
        L.say("this kernel has no netem (CONFIG_NET_SCH_NETEM): the loss comes from iptables' statistic match "
              "on node1's underlay instead, and the delay is left out")
        L.unchecked.append(f"{DELAY_MS} ms of underlay delay (this kernel has no netem)")
    measured = paths(netem)
    for path in measured:
        measure(L, path)
    if r.dry_run:
        return
    by = {p.key: p.data for p in measured}
    L.say("")
    for path in measured:
        d = path.data
        L.check(f"{path.label}: TCP data, pings and connects go through", carries(d),
                f"{d['bytes']} bytes" + (f" (iperf3: {d['iperf3_error']})" if d["iperf3_error"] else "")
                + f", {d['pings_received']}/{d['pings_sent']} pings, connect {_ms(d['connect_ms'])}")
    mtu, vx = by["mtu"], by["vxlan"]
    L.check(f"pods at MTU {cnikit.DEFAULT_MTU} over vxlan0 ({OVERLAY_MTU}): not one full-size frame "
            f"({mtu['full_size']} bytes, DF) arrives, where the matched overlay's ({vx['full_size']}) do",
            mtu["full_received"] == 0 and mtu["full_sent"] > 0 and vx["full_received"] > 0,
            f"{mtu['full_received']}/{mtu['full_sent']} against {vx['full_received']}/{vx['full_sent']}")
    addr = by_path(measured, "mtu").addr
    L.say(f"and yet bulk TCP crossed the mismatched overlay: vxlan0 answered pod3's first big GSO bundles with "
          f"ICMP 'fragmentation needed, mtu {OVERLAY_MTU}', so pod3 now sends smaller segments to {addr} and "
          "sent again what was lost. Its route cache holds the path MTU it learned:")
    r.probe(ip("route", "get", addr, ns="pod3"))
    learned = cached_mtu(r.query_json(ip("-j", "route", "get", addr, ns="pod3")))
    L.check(f"bulk TCP over the mismatch recovers, not stalls: pod3 learned path MTU {OVERLAY_MTU} from vxlan0 "
            "and retransmitted the first big segments",
            learned == OVERLAY_MTU and mtu["retransmits"] > 0 and mtu["bytes"] > 0,
            f"path MTU {learned}, {mtu['retransmits']} retransmits")
    loss = by["loss"]
    segments = max(loss["bytes"] // 1400, 1)
    # A loaded machine makes a clean path retransmit too: the underlay's own drop count says
    # the loss was there; the retransmits say TCP felt it.
    L.check(f"{LOSS_PCT}% loss on the underlay shows as retransmits (the underlay dropped datagrams; at least "
            f"{MIN_RETRANS:.1%} of the segments were sent again, more than on the clean overlay)",
            loss.get("underlay_drops", 0) > 0 and loss["retransmits"] >= MIN_RETRANS * segments
            and loss["retransmits"] > vx["retransmits"],
            f"{loss.get('underlay_drops', 0)} datagrams dropped, {loss['retransmits']} retransmits of about "
            f"{segments}, the clean overlay {vx['retransmits']}")
    if "delay" in by:
        delay = by["delay"]
        L.check(f"{DELAY_MS} ms of underlay delay is in every round trip (ping min >= {DELAY_MS} ms)",
                delay["rtt_min_ms"] is not None and delay["rtt_min_ms"] >= DELAY_MS, f"min {_ms(delay['rtt_min_ms'])}")
    table(L, measured)
    RESULTS.update(lesson="08", relative_to="veth", note="relative numbers from one run on a shared machine",
                   netem=netem, paths=[dict(key=p.key, label=p.label, client=p.client or "host", server=p.server_ns,
                                            address=p.addr, mtu=p.mtu, **p.data, relative=_relative(p, measured[0]))
                                       for p in measured],
                   checks=[{"what": what, "ok": ok} for what, ok in L.checks], passed=L.passed())


# ---------------------------------------------------------------- the table and the bars

def _ratio(value, base):
    return value / base if value and base else None


def _relative(path, base):
    d, b = path.data, base.data
    return {"throughput": _ratio(d["bits_per_second"], b["bits_per_second"]),
            "rtt": _ratio(d["rtt_avg_ms"], b["rtt_avg_ms"]), "connect": _ratio(d["connect_ms"], b["connect_ms"])}


def _rate(bps):
    return f"{bps / 1e9:.2f} Gbit/s" if bps else "nothing"


def _ms(value):
    return f"{value:.3f} ms" if value is not None else "-"


def _x(value):
    return f"{value:.2f}x" if value is not None else "-"


BAR = 40


def bars(rows, log=False):
    """(name, ratio) -> lines of a bar chart. Linear: the longest ratio fills BAR marks. LOG: the
    plain veth (1.0) is one mark and every 4 marks more double the ratio."""
    top = max([v for _, v in rows if v] or [1.0])
    lines = []
    for name, value in rows:
        if not value:
            n = 0
        elif log:
            n = max(1, 1 + round(4 * math.log2(value)))
        else:
            n = max(1, round(BAR * value / top))
        lines.append(f"  {name:<8} {'#' * min(n, BAR * 2):<{BAR}} {_x(value)}")
    return lines


def table(L, measured):
    base = measured[0]
    rel = {p.key: _relative(p, base) for p in measured}
    L.say("")
    L.say("what each path costs (one run; relative to the plain veth, x = times the veth's value)")
    head = (f"{'path':<30} {'TCP':>13} {'x':>6} {'retr':>6} {'ping avg':>10} {'x':>7} {'connect':>10} {'x':>6} "
            "full-size")
    L.say(head)
    L.say("-" * len(head))
    for p in measured:
        d, x = p.data, rel[p.key]
        L.say(f"{p.label:<30} {_rate(d['bits_per_second']):>13} {_x(x['throughput']):>6} {d['retransmits']:>6} "
              f"{_ms(d['rtt_avg_ms']):>10} {_x(x['rtt']):>7} {_ms(d['connect_ms']):>10} {_x(x['connect']):>6} "
              f"{d['full_received']}/{d['full_sent']}")
    L.say("")
    L.say("TCP throughput, relative to the plain veth (linear):")
    for line in bars([(p.key, rel[p.key]["throughput"]) for p in measured]):
        L.say(line)
    L.say("ping round trip, relative to the plain veth (log scale: 4 more marks, twice the time):")
    for line in bars([(p.key, rel[p.key]["rtt"]) for p in measured], log=True):
        L.say(line)
    L.say("TCP connect, relative to the plain veth (log scale):")
    for line in bars([(p.key, rel[p.key]["connect"]) for p in measured], log=True):
        L.say(line)
    L.say("")
    L.say("how to read it: one run on a machine that may be busy, so compare rows of this run only (neighbours "
          "can swap from run to run). What each path adds to the veth: the bridge, a second veth and a "
          "forwarding lookup; NAT, routing plus conntrack and the address rewrite; the routed model, a route "
          "lookup on the host instead of the bridge's; VXLAN, both nodes' bridges, 50 bytes of headers around "
          "every frame and a second trip over the underlay's veth. At the wrong MTU full-size frames vanish; "
          "loss costs retransmits, and TCP halves its window at each")


def main():
    p = LESSON.parser()
    p.add_argument("--json", action="store_true",
                   help="print the measurements as JSON on stdout (implies -q; the verdict goes to stderr)")
    args = p.parse_args()
    if args.json and (args.dry_run or args.keep or args.step or args.present):
        p.error("--json goes with a plain run: a dry run measures nothing, --keep/--step/--present are interactive")
    if not args.json:
        return LESSON.run(build, verify, args)
    args.quiet = True
    with contextlib.redirect_stdout(sys.stderr):        # the lesson's own lines; stdout is the JSON's
        code = LESSON.run(build, verify, args)
    if RESULTS:
        print(json.dumps(RESULTS, indent=2))
    return code


if __name__ == "__main__":
    sys.exit(main())
