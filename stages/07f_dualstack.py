#!/usr/bin/env python3
"""Lesson 07f (beyond the classic lesson 07): dual-stack pods, IPv4 and IPv6 side by side on
one bridge, as a CNI plugin given two ranges (host-local's `ranges`) lays them out: two
addresses per pod, a gateway and a default route per family. What IPv6 does differently:
duplicate address detection (the tentative state, accept_dad, nodad), NDP instead of ARP
(`ip -6 neigh`), link-local gateways and router advertisements, ICMPv6 a firewall must let
through, and why IPv6 pods are usually not NATed.

    sudo python3 stages/07f_dualstack.py           # in a throwaway sandbox
    python3 stages/07f_dualstack.py --dry-run      # the lesson as a shell script
"""
import ipaddress
import json
import shlex
import time

from lesson import Lesson, cnikit, in_netns, ip

BRIDGE = "br0"
GW4, GW6 = "10.0.7.1/24", "fd00:7::1/64"        # fd00::/8: unique local addresses (ULA), private like 10/8
LINK_LOCAL_GW = "fe80::1"                        # the bridge's own link-local gateway (the only one ns2 knows)
PODS = {"ns1": ("10.0.7.2/24", "fd00:7::2/64"), "ns2": ("10.0.7.3/24", "fd00:7::3/64")}
PORT = 8080
BEYOND = "2001:db8::1"                           # a documentation address: only a route look-up, no packet
PEER = "SYSTEM:echo $SOCAT_PEERADDR"             # socat: answer with the address the connection came from
# A router advertisement (ICMPv6 134: hop limit 64, router lifetime 1800 s, "route through me"), hop limit 255
# as RFC 4861 requires; the kernel computes a raw ICMPv6 socket's checksum.
SEND_RA = ("import socket, struct; s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6); "
           "s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255); "
           "s.sendto(struct.pack(\"!BBHBBHII\", 134, 0, 0, 64, 0, 1800, 0, 0), "
           "(\"ff02::1\", 0, 0, socket.if_nametoindex(\"eth0\")))")


def addr(ns, family=6):
    return PODS[ns][0 if family == 4 else 1].split("/")[0]


def gw(cidr):
    return cidr.split("/")[0]


def host_end(ns):
    return f"veth-{ns}"


LESSON = Lesson(
    "07f", "dualstack",
    goal="two pods on br0 each hold an IPv4 and an IPv6 address and reach each other and their gateways in "
         "both families (ping, and TCP seeing each other's own address: no NAT); their IPv6 addresses are "
         "usable at once (no DAD), their neighbours are found by NDP, no one takes a route from a rogue pod's "
         "router advertisement, and a firewall that lets ICMPv6's neighbour discovery through keeps IPv6 working",
    picture=r"""
   +------------------------------------ host ------------------------------------+
   |  br0  10.0.7.1/24   fd00:7::1/64 (nodad)   fe80::1/64 (a link-local gateway) |
   |  accept_ra 0: the node takes no routes from what a pod could advertise       |
   |             veth-ns1 (port)                      veth-ns2 (port)             |
   +------------------|--------------------------------------|--------------------+
   +---------------- ns1 ----------------+  +---------------- ns2 ----------------+
   | eth0 10.0.7.2/24  fd00:7::2/64      |  | eth0 10.0.7.3/24  fd00:7::3/64      |
   |      fe80::.../64 (its own, always) |  |      fe80::.../64                   |
   | accept_dad 0 (as CNI plugins set)   |  | accept_dad 0                        |
   | accept_ra 0 (no routes from RAs)    |  | accept_ra 0; sends one RA (rogue)   |
   | default via 10.0.7.1                |  | default via 10.0.7.1                |
   | default via fd00:7::1               |  | default via fe80::1 dev eth0        |
   |                                     |  | firewall: INPUT DROP but replies,   |
   |                                     |  |   ping, TCP 8080, and NDP (ICMPv6)  |
   +-------------------------------------+  +-------------------------------------+
""",
    skips={"nodad": "the pods' eth0 keep accept_dad 1: their new IPv6 addresses stay tentative while the "
                    "kernel runs duplicate address detection (about a second) and cannot be used yet",
           "ra": "the pods keep accept_ra 1: ns1 takes a default route from the router advertisement of ns2, "
                 "a rogue pod, beside the one its CNI result gave it",
           "icmpv6": "ns2's firewall drops ICMPv6's neighbour solicitations and advertisements: ns1's neighbour "
                     "entry for ns2 stays INCOMPLETE and every IPv6 packet to ns2 (ping, TCP 8080, though "
                     "allowed) is lost, while IPv4 under the same rules works: ARP is not IP"},
    tools=("ip", "ping", "iptables", "sysctl", "socat", "ss"),
)


def build(L):
    r = L.r
    L.step("two pods and a bridge, as in lesson 03, each pod with its IPv4 address and its IPv4 gateway")
    for ns in PODS:
        cnikit.netns_add(r, ns, lo_up=True)
    cnikit.bridge_add(r, BRIDGE, addr=GW4)
    for ns, (v4, _) in PODS.items():
        cnikit.veth_add(r, host_end(ns), "eth0", netns=ns, peer_addr=v4)
    cnikit.bridge_attach(r, BRIDGE, [host_end(ns) for ns in PODS])

    L.step("IPv6 needs no configuration to start: every interface that comes up makes its own link-local "
           "address, fe80::/64 from its MAC, valid on its link only (NDP and router advertisements use it); "
           "for its first second or so it may show as `tentative`: the next step says why")
    r.show(ip("-6", "addr", "show", "dev", "eth0", ns="ns1"))

    if L.step("a new IPv6 address is first *tentative*: the kernel asks the link whether anyone holds it "
              "already (duplicate address detection, DAD: a neighbour solicitation, then a second of "
              "silence) and will not use it before. A pod's address comes from IPAM, which hands each out "
              "once, so CNI plugins switch DAD off on the pod's interface (accept_dad 0; the reference "
              "bridge plugin's `enabledad` turns it back on, and ADD then waits for it)", skip="nodad"):
        for ns in PODS:
            L.sysctl("net.ipv6.conf.eth0.accept_dad", "0", ns)

    L.step("two addresses per pod: the IPv6 ones beside the IPv4 ones; the gateway's on br0 with `nodad`, "
           "the same switch per address instead of per interface")
    for ns, (_, v6) in PODS.items():
        r.run(cnikit.addr_add(v6, "eth0", ns))
    r.run(ip("addr", "add", GW6, "dev", BRIDGE, "nodad"))
    r.show(ip("-6", "addr", "show", "dev", "eth0", ns="ns1"))
    L.say("the link-local address was made when eth0 came up, before accept_dad 0: it finishes its DAD "
          "(`tentative` until then); the address added after it is usable at once" if "nodad" not in L.skipped
          else "with accept_dad 1 both addresses run DAD: `tentative` until it ends, about a second")
    if not r.dry_run:
        flags = _flags_soon(L, "ns1", addr("ns1"))
        L.check(f"ns1's {addr('ns1')} is usable at once (not tentative)", flags is not None and
                not flags & {"tentative", "dadfailed"}, f"flags: {' '.join(sorted(flags or ())) or 'none'}")

    L.step("a default route per family. ns1's IPv6 one points at the global gateway fd00:7::1, as a CNI "
           f"result gives it; ns2's at {LINK_LOCAL_GW}, a link-local address of br0's: routers announce "
           "themselves from their link-local address, so on a link that is where an IPv6 default route usually "
           "points (Calico points pods at one too); a link-local address exists on every link, so the route "
           "names the link (`dev eth0`)")
    r.run(ip("addr", "add", f"{LINK_LOCAL_GW}/64", "dev", BRIDGE, "nodad"))
    for ns in PODS:
        cnikit.route_add(r, "default", via=gw(GW4), ns=ns)
    r.run(ip("-6", "route", "add", "default", "via", gw(GW6), "dev", "eth0", ns="ns1"))
    r.run(ip("-6", "route", "add", "default", "via", LINK_LOCAL_GW, "dev", "eth0", ns="ns2"))
    r.show(ip("-6", "route", "show", ns="ns2"))

    L.step("router advertisements (RA) are how IPv6 hosts usually learn their default route. A pod takes its "
           "routes from its CNI result, and nobody sends RAs on a pod network; but a pod could (CVE-2020-10749: "
           "a pod's RAs rerouting its node), so the node takes no routes from the pods' links: accept_ra 0 on "
           "the bridge and on the host end of each veth, as the reference bridge plugin sets them")
    L.sysctl(f"net.ipv6.conf.{BRIDGE}.accept_ra", "0")
    for ns in PODS:
        L.sysctl(f"net.ipv6.conf.{host_end(ns)}.accept_ra", "0")
    if L.step("and in the pods: a kernel takes RAs on every interface that does not forward (accept_ra 1), so "
              "on a shared bridge one pod's RA becomes its neighbours' default route. Neither the reference "
              "plugins nor ours switch that off inside the pod; here, accept_ra 0 in each pod", skip="ra"):
        for ns in PODS:
            L.sysctl("net.ipv6.conf.eth0.accept_ra", "0", ns)

    L.step("a rogue pod: ns2 advertises itself as a router, one RA to all nodes on its link (ff02::1) from a raw "
           "ICMPv6 socket, as any pod can with CAP_NET_RAW (runtimes grant it by default). An RA comes from a "
           "link-local address, so ns2 first waits until its own is no longer tentative")
    tentative = shlex.join(ip("-6", "addr", "show", "dev", "eth0", "tentative", ns="ns2"))
    r.run(["timeout", "5", "sh", "-c", f"while {tentative} | grep -q .; do sleep 0.05; done"])
    r.run(in_netns(["python3", "-c", SEND_RA], "ns2"))
    r.show(ip("-6", "route", "show", "default", ns="ns1"))

    L.step("NDP instead of ARP: before its first IPv6 packet to ns2, ns1 sends a neighbour solicitation, an "
           "ICMPv6 message to ns2's solicited-node multicast group (ARP is not IP at all, and broadcasts); the "
           "answer, a neighbour advertisement, fills `ip -6 neigh` as ARP fills `ip -4 neigh`")
    L.ping(addr("ns2"), "ns1")
    L.ping(addr("ns2", 4), "ns1")
    r.show(ip("-6", "neigh", "show", "dev", "eth0", ns="ns1"))
    r.show(ip("-4", "neigh", "show", "dev", "eth0", ns="ns1"))

    L.step("ns2 gets a firewall as a hardened host has one, the same rules in both families: INPUT drops "
           f"everything but replies, ping and TCP {PORT}")
    for tool, icmp, echo in (("iptables", "icmp", "--icmp-type"), ("ip6tables", "ipv6-icmp", "--icmpv6-type")):
        for spec in (["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED"], ["-p", icmp, echo, "echo-request"],
                     ["-p", "tcp", "--dport", str(PORT)]):
            r.run(in_netns([tool, "-w", "-A", "INPUT", *spec, "-j", "ACCEPT"], "ns2"))
        r.run(in_netns([tool, "-w", "-P", "INPUT", "DROP"], "ns2"))
    if L.step("and the two ICMPv6 messages of neighbour discovery: IPv6 has no ARP, NDP *is* ICMPv6, so an IPv6 "
              "firewall that drops ICMPv6 cuts its own link (RFC 4890 lists what must pass; the conntrack rule "
              "above already lets in the errors, such as Packet Too Big, that belong to a connection)",
              skip="icmpv6"):
        for kind in ("neighbour-solicitation", "neighbour-advertisement"):
            r.run(in_netns(["ip6tables", "-w", "-A", "INPUT", "-p", "ipv6-icmp", "--icmpv6-type", kind,
                            "-j", "ACCEPT"], "ns2"))
    L.say("forget what NDP learned before the firewall (the kernel would, within a minute)")
    for ns in PODS:
        r.run(ip("-6", "neigh", "flush", "dev", "eth0", ns=ns))

    L.step(f"a TCP listener in ns2 on port {PORT}, one socket for both families (an IPv4 client shows up as "
           "::ffff:a.b.c.d); it answers each connection with the address it came from")
    r.spawn(in_netns(["socat", f"TCP6-LISTEN:{PORT},reuseaddr,fork", PEER], "ns2"))
    L.wait_listening(PORT, "ns2")

    L.say("why IPv6 pods are usually not NATed: IPv4 pods hold private addresses and leave the node masqueraded "
          "(lesson 05), because public IPv4 addresses are scarce. An IPv6 cluster can give every pod an address "
          "routed on the internet (a /64 per node out of the cluster's prefix), so the node routes it instead "
          "and the far end sees the pod itself; the reference bridge plugin masquerades IPv6 only when ipMasq "
          "asks for it. With ULA addresses (fd00::/8, as here) a cluster that must reach the internet still "
          "NATs (NAT66), as with 10/8")


def verify(L):
    r = L.r
    ok, out = r.probe(ip("-j", "addr", "show", "dev", "eth0", ns="ns1"))
    have = _addresses(out) if ok and not r.dry_run else set()
    L.check("ns1's eth0 holds two addresses, one per family, beside its link-local one",
            {addr("ns1", 4), addr("ns1")} <= have and any(ipaddress.ip_address(a).is_link_local for a in have),
            " ".join(sorted(have)))
    for family in (4, 6):
        L.check(f"ns1 reaches its IPv{family} gateway on br0", L.ping(gw(GW4 if family == 4 else GW6), "ns1"))
        L.check(f"ns1 reaches ns2 over IPv{family}", L.ping(addr("ns2", family), "ns1"))
        if family == 6:     # before ns2 solicits ns1: its solicitation would tell ns1 its MAC unconfirmed (STALE)
            _check_ndp(L)
        L.check(f"ns2 reaches ns1 over IPv{family}", L.ping(addr("ns1", family), "ns2"))
    L.check(f"ns2 reaches its link-local gateway {LINK_LOCAL_GW} on its link", L.ping(f"{LINK_LOCAL_GW}%eth0", "ns2"))
    for ns, via in (("ns1", gw(GW6)), ("ns2", LINK_LOCAL_GW)):
        ok, out = r.probe(ip("-6", "route", "get", BEYOND, ns=ns))
        L.check(f"{ns} would send what leaves the pod network via {via}", ok and f"via {via} dev eth0" in out, out)
    for where, ns in (("ns1", "ns1"), ("the node", None)):
        ok, out = r.probe(ip("-j", "-6", "route", "show", "default", ns=ns))
        learned = [x.get("gateway") for x in json.loads(out or "[]") if x.get("protocol") == "ra"] if ok else []
        L.check(f"{where} took no route from ns2's router advertisement", ok and not learned,
                "default via " + ", ".join(map(str, learned)))
    for family in (6, 4):
        seen = _peer_seen(L, family)
        L.check(f"TCP {PORT} over IPv{family}: ns2 sees ns1's own address {addr('ns1', family)} (no NAT)",
                seen == addr("ns1", family), f"it saw {seen or 'nothing'}")


def _check_ndp(L):
    """ns2 answered ns1's neighbour solicitation: ns1's entry for ns2 holds ns2's MAC and is
    neither INCOMPLETE (asked, no answer yet) nor FAILED (no answer at all)."""
    r = L.r
    ok, out = r.probe(ip("-j", "-6", "neigh", "show", addr("ns2"), "dev", "eth0", ns="ns1"))
    entry = (json.loads(out) or [{}])[0] if ok and out.strip().startswith("[") else {}
    mac = (cnikit.get_link(r, "eth0", "ns2") or {}).get("address") if not r.dry_run else None
    state = set(entry.get("state", []))
    L.check("NDP found ns2's MAC for ns1 (ip -6 neigh)",
            bool(mac and entry.get("lladdr") == mac and not state & {"INCOMPLETE", "FAILED"}),
        f"the entry: {' '.join(sorted(state)) or 'none'}")



def _flags(L, ns, address):
    """The flags (tentative, nodad, dadfailed...) of ADDRESS in NS, or None when it is not there."""
    ok, out = L.r.query(ip("-j", "-6", "addr", "show", "dev", "eth0", ns=ns))
    for link in json.loads(out) if ok else []:
        for a in link.get("addr_info", []):
            if a.get("local") == address:
                return {k for k, v in a.items() if v is True}
    return None


def _flags_soon(L, ns, address):
    """ADDRESS's flags once the kernel has had its moment: even without DAD a new address is tentative
    until the kernel's address work runs (at once, or a little later on a busy machine). Waits for that
    up to half of what one DAD round takes on eth0 (dad_transmits x retrans_time_ms), so an address
    that really runs DAD is still tentative then."""
    ok1, n = L.r.query(in_netns(["sysctl", "-n", "net.ipv6.conf.eth0.dad_transmits"], ns))
    ok2, ms = L.r.query(in_netns(["sysctl", "-n", "net.ipv6.neigh.eth0.retrans_time_ms"], ns))
    deadline = time.monotonic() + (int(n) * int(ms) / 2000 if ok1 and ok2 else 0.5)
    flags = _flags(L, ns, address)
    while flags is not None and "tentative" in flags and time.monotonic() < deadline:
        time.sleep(0.02)
        flags = _flags(L, ns, address)
    return flags


def _addresses(out):
    return {a["local"] for link in json.loads(out or "[]") for a in link.get("addr_info", [])}


def _peer_seen(L, family):
    """Connect from ns1 to ns2's listener over FAMILY; the address ns2 saw, as IPv4 for a mapped one."""
    target = f"TCP6:[{addr('ns2')}]:{PORT}" if family == 6 else f"TCP4:{addr('ns2', 4)}:{PORT}"
    ok, out = L.r.probe(in_netns(["socat", "-u", f"{target},connect-timeout=2", "-"], "ns1"))
    try:
        seen = ipaddress.ip_address(out.strip().splitlines()[-1].strip("[]")) if ok and out.strip() else None
    except ValueError:
        return ""
    if seen is None:
        return ""
    return str(seen.ipv4_mapped or seen)


if __name__ == "__main__":
    LESSON.main(build, verify)
