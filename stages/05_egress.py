#!/usr/bin/env python3
"""Lesson 05: egress. A namespace on a private subnet reaches "the internet" through
the host: default route, forwarding, and NAT (MASQUERADE).

    sudo python3 stages/05_egress.py           # in a throwaway sandbox
    python3 stages/05_egress.py --dry-run      # the lesson as a shell script

"The internet" is a namespace this lesson creates, with a server at a documentation
address (203.0.113.10): no packet leaves the lesson's own namespaces.

On a real host, the original series' ending is yours to ask for: --internet ADDR, with an
address of your choice out there (the lesson never picks one), masquerades ns1 out of
this host's own uplink too and pings ADDR through it:

    sudo python3 stages/05_egress.py --host --internet ADDR
"""
import ipaddress
import re
import sys

from lesson import PING, Lesson, cnikit, have, in_netns, ip, nft_view, read_until

BRIDGE, GATEWAY = "br0", "10.0.5.1/24"
NS, NS_ADDR, SUBNET = "ns1", "10.0.5.2/24", "10.0.5.0/24"
INTERNET = "internet"
UPLINK, UPLINK_ADDR = "uplink0", "203.0.113.1/24"      # the host's side of its uplink
SERVER_ADDR, PORT = "203.0.113.10/24", 8080            # a server out there
GATEWAY_IP, NS_IP, UPLINK_IP, SERVER_IP = (a.split("/")[0] for a in (GATEWAY, NS_ADDR, UPLINK_ADDR, SERVER_ADDR))
UNREACHABLE = "Network is unreachable"     # what ping says when ns1 has no route at all

LESSON = Lesson(
    "05", "egress",
    goal=f"ns1 ({NS_IP}) reaches the server at {SERVER_IP} only once the host masquerades it, "
         f"and the server sees the host's uplink address {UPLINK_IP}, not {NS_IP}",
    picture=r"""
   +----------- ns1 -------------+
   |  eth0  10.0.5.2/24          |
   |  default via 10.0.5.1       |
   +-------------|---------------+
                 | veth-ns1
   +-------------|------------------------ host -------------------------+
   |   br0  10.0.5.1/24        net.ipv4.ip_forward = 1                   |
   |   iptables: MASQUERADE 10.0.5.0/24 out uplink0, FORWARD accept      |
   |                                          uplink0  203.0.113.1/24    |
   +-----------------------------------------------|---------------------+
                                                   | veth: the uplink
   +------------------------------ internet ------|----------------------+
   |                                eth0  203.0.113.10/24                |
   |   server on tcp/8080 replies with the address it sees;              |
   |   like the real internet, it has no route to private 10.x addresses |
   +---------------------------------------------------------------------+
""",
    skips={"route": "ns1 has no default route: its ping fails inside ns1, Network is unreachable",
           "nat": "no MASQUERADE: packets reach the server from 10.0.5.2 and the replies have "
                  "no way back"},
    tools=("ip", "ping", "iptables", "sysctl", "socat", "ss"),
)
OPTIONS = {"internet": None}        # --internet ADDR (main sets it; None: the lesson's own internet only)


def build(L):
    r = L.r
    L.step("ns1 on br0, as in lesson 03: a container on a private subnet")
    cnikit.netns_add(r, NS, lo_up=True)
    cnikit.bridge_add(r, BRIDGE, addr=GATEWAY)
    cnikit.veth_add(r, "veth-ns1", "eth0", netns=NS, peer_addr=NS_ADDR)
    cnikit.bridge_attach(r, BRIDGE, ["veth-ns1"])

    L.step("\"the internet\": a namespace behind the host's uplink (a veth), documentation addresses")
    cnikit.netns_add(r, INTERNET, lo_up=True)
    cnikit.veth_add(r, UPLINK, "eth0", netns=INTERNET, addr=UPLINK_ADDR, peer_addr=SERVER_ADDR)

    L.step(f"a server at {SERVER_IP}:{PORT} that answers each connection with the source address it sees")
    r.spawn(in_netns(["socat", f"TCP-LISTEN:{PORT},bind={SERVER_IP},reuseaddr,fork",
                      "SYSTEM:echo $SOCAT_PEERADDR"], INTERNET))
    L.wait_listening(PORT, INTERNET)

    L.step(f"first try: ns1 knows only its own subnet, so {SERVER_IP} has no route; this ping is "
           f"expected to FAIL at once with '{UNREACHABLE}', before any packet leaves ns1")
    answered, out = r.probe(in_netns(list(PING) + [SERVER_IP], NS), expect_fail=True)
    L.check(f"without a route, ns1's ping fails inside ns1 ({UNREACHABLE})", not answered and
            UNREACHABLE in out, out.strip().splitlines()[-1] if out.strip() else "")

    if L.step("ns1's default route: anything not on its own subnet goes to the gateway on br0",
              skip="route"):
        cnikit.route_add(r, "default", via=GATEWAY_IP, ns=NS)

    L.step("forwarding turns the host into a router: without it the host drops packets not meant for it")
    L.sysctl("net.ipv4.ip_forward", 1)

    L.step("second try, with the route but before NAT: this ping is expected to FAIL too, differently")
    answered, out, seen = _ping_seen_by_server(L)
    forward_drops = cnikit.forward_drops(r)
    if forward_drops:               # a Docker host: the request dies in the host's FORWARD chain
        r.note(f"this host's FORWARD policy is DROP (Docker sets it): the request was dropped in FORWARD "
               f"before it left uplink0, so no server saw it; nat add below accepts {SUBNET} there too")
        L.check("with a route but without NAT (and FORWARD's policy DROP), no reply comes back",
                not answered and UNREACHABLE not in out and not seen)
    elif UNREACHABLE in out:
        L.say(f"the same failure as before: ns1 still has no route ({UNREACHABLE}); nothing left ns1")
    elif r.dry_run or not answered:
        L.say(f"this time the request left: " + (f"the server's side saw it arrive from {NS_IP}. " if seen else "")
              + f"Its source {NS_IP} is a private address: the server's reply goes to {NS_IP}, and the "
              "internet has no route to it, so the reply never comes back:")
        r.probe(ip("route", "get", NS_IP, ns=INTERNET), expect_fail=True)
    if not forward_drops:
        L.check(f"with a route but without NAT, the request reaches the server from {NS_IP} and no reply "
                "comes back", not answered and UNREACHABLE not in out and (seen or not have("tcpdump")))

    if L.step(f"MASQUERADE rewrites the source of what leaves uplink0 to {UPLINK_IP}, an address "
              "the internet can answer; conntrack maps the replies back to 10.0.5.2", skip="nat"):
        cnikit.nat_add(r, SUBNET, UPLINK)
        chain = cnikit.nat_chain(SUBNET)
        L.say(f"nat add keeps its rules in a chain of its own, {chain}, with one jump into it from "
              "POSTROUTING (nat table) and one from FORWARD (filter table): nat del removes exactly those")
        r.show(cnikit.iptables("-t", "nat", "-S", "POSTROUTING"))
        r.show(cnikit.iptables("-t", "nat", "-S", chain))
        L.say("its two FORWARD rules: the first lets ns1's subnet out of uplink0, the "
              "second lets back in only replies to connections that went out (conntrack's ESTABLISHED, "
              "RELATED). Where FORWARD's policy is ACCEPT (a fresh sandbox) they change nothing; "
              "where it is DROP (Docker sets it) egress fails without them")
        r.show(cnikit.iptables("-S", chain))
        nft_view(L, "nat", chain, "what `iptables` really put in the kernel: on Debian 12 and every current "
                 "distribution it is iptables-nft, which writes nf_tables rules; nft shows the same chain in its "
                 "own words (oifname, ip saddr, masquerade; leave changing it to iptables)")


def _ping_seen_by_server(L):
    """Ping the server from ns1, with tcpdump on the server's side when installed so
    the learner sees the request arrive (and from which address). Returns (answered,
    what ping said, whether the server's side saw the request come from ns1's address)."""
    r = L.r
    capture = None
    if have("tcpdump"):
        capture = r.spawn(in_netns(["tcpdump", "--immediate-mode", "-lni", "eth0", "-c", "2", "icmp"], INTERNET))
        if capture is not None and read_until(capture, "listening on", "stderr") is None:
            L.say("tcpdump did not start; going on without it")
    answered, said = r.probe(in_netns(list(PING) + [SERVER_IP], NS), expect_fail=True)
    seen = False
    if capture is not None:
        out, _ = r.stop(capture)
        seen = f"IP {NS_IP} > {SERVER_IP}: ICMP echo request" in out
        if not r.quiet:
            L.say("what the server's side saw (tcpdump in the internet namespace):")
            r.output(out)
    return answered, said, seen


def verify(L):
    r = L.r
    L.check(f"ns1 reaches {SERVER_IP}", L.ping(SERVER_IP, NS))
    ok, seen = r.probe(in_netns(["socat", "-u", f"TCP:{SERVER_IP}:{PORT},connect-timeout=2", "-"], NS))
    seen = seen.strip() if ok else ""
    L.check(f"the server saw the host's uplink address {UPLINK_IP} (not {NS_IP})", seen == UPLINK_IP,
            f"it saw {seen or 'nothing'}")

    if have("conntrack"):
        L.say("conntrack remembers each translation; its reply direction is addressed to the uplink:")
        ok, out = r.probe(["conntrack", "-L", "-s", NS_IP])
        L.check(f"conntrack holds ns1's flow with replies to {UPLINK_IP}",
                ok and _replies_to(out, UPLINK_IP), out.strip().splitlines()[-1] if out.strip() else "")
    else:
        L.say("conntrack (Debian package conntrack) is not installed: skipping the look at the NAT table")
    if OPTIONS["internet"]:
        _the_real_internet(L, OPTIONS["internet"])


def _the_real_internet(L, addr):
    """--internet ADDR (with --host): the same masquerade out of this host's real uplink, and
    ns1 pings ADDR through it, as the original series ended."""
    r = L.r
    L.say("")
    L.say(f"--internet {addr}: the internet you asked for. Which way does this host send packets to {addr}?")
    route = r.query_json(ip("-j", "route", "get", addr)) or []
    dev = route[0].get("dev") if route else None
    if not dev or dev == "lo":
        L.say(f"this host has no route to {addr} (no default route: nothing says where the internet is), "
              "so ns1 cannot get there either; the lesson's own internet above is the proof of NAT")
        L.unchecked.append(f"--internet {addr} (this host has no route to it)")
        return
    r.show(ip("route", "get", addr))
    L.say(f"one more MASQUERADE, for what leaves {dev}: the internet answers {dev}'s own address, and "
          "conntrack maps the replies back to ns1 (tagged as the lesson's NAT, removed at the end)")
    tag = ["-m", "comment", "--comment", cnikit.nat_comment(SUBNET)]
    rules = [("nat", "POSTROUTING", ["-s", SUBNET, "-o", dev] + tag + ["-j", "MASQUERADE"])]
    if cnikit.forward_drops(r):          # a Docker host: FORWARD lets ns1 out of DEV and the replies in
        rules += [("filter", "FORWARD", ["-s", SUBNET, "-o", dev] + tag + ["-j", "ACCEPT"]),
                  ("filter", "FORWARD", ["-d", SUBNET, "-i", dev, "-m", "conntrack", "--ctstate",
                                         "RELATED,ESTABLISHED"] + tag + ["-j", "ACCEPT"])]
    for table, chain, spec in rules:
        r.run(cnikit.iptables_rule("-I", table, chain, spec), creates=cnikit.Change.rule(table, chain, spec))
    L.check(f"ns1 reaches {addr} through this host's uplink {dev}", L.ping(addr, NS, count=3))
    if have("conntrack"):
        ok, out = r.probe(["conntrack", "-L", "-p", "icmp", "-s", NS_IP, "-d", addr])
        mine = [a["local"] for a in (r.query_json(ip("-j", "addr", "show", "dev", dev)) or [{}])[0].get("addr_info", [])
                if a.get("family") == "inet"]
        L.check(f"conntrack shows the translation: the replies come back to {dev}'s address",
                ok and any(_replies_to(out, a) for a in mine), out.strip().splitlines()[-1] if out.strip() else "")


def internet_address(text):
    """--internet's ADDR: an IPv4 unicast address outside the lesson's own subnets."""
    try:
        addr = ipaddress.IPv4Address(text)
    except ValueError:
        raise cnikit.UsageError(f"--internet {text!r} is not an IPv4 address") from None
    if addr.is_loopback or addr.is_multicast or addr.is_unspecified or addr.is_link_local \
            or any(addr in ipaddress.ip_interface(n).network for n in (SUBNET, UPLINK_ADDR)):
        raise cnikit.UsageError(f"--internet {text}: name an address out there on the internet, not a "
                                "loopback, link-local, multicast address or one of the lesson's own")
    return str(addr)


def main():
    p = LESSON.parser()
    p.add_argument("--internet", metavar="ADDR",
                   help="with --host: also masquerade ns1 out of this host's own uplink and ping ADDR, an "
                        "address of your choice out there (the lesson never picks one; tests never use this)")
    args = p.parse_args()
    if args.internet is not None:
        if not args.host or args.dry_run:
            p.error("--internet needs --host and a live run: the sandbox (and a script written in advance) "
                    "has no way to this host's own uplink")
        try:
            OPTIONS["internet"] = internet_address(args.internet)
        except cnikit.UsageError as e:
            p.error(str(e))
    return LESSON.run(build, verify, args)


def _replies_to(conntrack_out, addr):
    """Does a flow's reply direction (its second src=/dst= pair) go to ADDR? Whole
    addresses only: dst=203.0.113.1 is not dst=203.0.113.10."""
    for line in conntrack_out.splitlines():
        dsts = re.findall(r"\bdst=(\S+)", line)
        if len(dsts) >= 2 and dsts[1] == addr:
            return True
    return False


if __name__ == "__main__":
    sys.exit(main())
