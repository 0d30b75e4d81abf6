#!/usr/bin/env python3
"""Lesson 05b: published ports, the way `docker run -p 8080:80` does it. Nothing listens on
the host's port 8080: nat rules rewrite the destination of connections to it (DNAT) to the
container's port 80, for traffic from outside (PREROUTING) and from the host itself (OUTPUT);
route_localnet and a masquerade make localhost:8080 work, a hairpin masquerade lets the
container reach its own published port; conntrack remembers each translation. The userland
proxy (docker-proxy) is the other way: a process on the host relays each connection.

    sudo python3 stages/05b_ports.py           # in a throwaway sandbox
    python3 stages/05b_ports.py --dry-run      # the lesson as a shell script

The rules are those dockerd 20.10 writes with `--userland-proxy=false` (its chain DOCKER is
CNIKIT-PORTS here); the narration says what its default (the userland proxy) writes
instead. "Outside" is a namespace this lesson creates, with documentation addresses.
"""
import re

from lesson import Lesson, cnikit, have, in_netns, ip

BRIDGE, GATEWAY = "br0", "10.0.5.1/24"                 # docker0 172.17.0.1/16 on a Docker host
CTR, CTR_ADDR, SUBNET = "web", "10.0.5.2/24", "10.0.5.0/24"
HOST_END = "veth-web"
OUTSIDE = "outside"
UPLINK, UPLINK_ADDR, OUTSIDE_ADDR = "uplink0", "203.0.113.1/24", "203.0.113.10/24"
HOST_PORT, CTR_PORT, PROXY_PORT = 8080, 80, 8081       # -p 8080:80; the proxy's own port, beside it
CHAIN = cnikit.CHAIN_PREFIX + "PORTS"                  # Docker: DOCKER (nat table)
TAGGED = ["-m", "comment", "--comment", f"{cnikit.TAG} ports"]     # so `cnikit cleanup` finds them
CONNECT_TIMEOUT = 2        # seconds: every proof is one connection on one machine
PROBE_TIMEOUT = 10         # seconds a proof may take in all (connect, answer, close)
LOCALHOST = "127.0.0.1"
GATEWAY_IP, CTR_IP, HOST_IP, OUTSIDE_IP = (a.split("/")[0] for a in (GATEWAY, CTR_ADDR, UPLINK_ADDR, OUTSIDE_ADDR))
TCP_CTR = ["-p", "tcp", "-m", "tcp", "--dport", str(CTR_PORT)]

# (table, chain, rule spec) of each rule, named by the step that adds it.
RULES = {
    "dnat": ("nat", CHAIN, ["-p", "tcp", "-m", "tcp", "--dport", str(HOST_PORT), "-j", "DNAT",
                            "--to-destination", f"{CTR_IP}:{CTR_PORT}"]),
    "prerouting": ("nat", "PREROUTING", ["-m", "addrtype", "--dst-type", "LOCAL"] + TAGGED + ["-j", CHAIN]),
    "forward": ("filter", "FORWARD", ["-d", f"{CTR_IP}/32", "!", "-i", BRIDGE, "-o", BRIDGE] + TCP_CTR + TAGGED
                + ["-j", "ACCEPT"]),
    "output": ("nat", "OUTPUT", ["-m", "addrtype", "--dst-type", "LOCAL"] + TAGGED + ["-j", CHAIN]),
    "local-masquerade": ("nat", "POSTROUTING", ["-o", BRIDGE, "-m", "addrtype", "--src-type", "LOCAL"] + TAGGED
                         + ["-j", "MASQUERADE"]),
    "hairpin": ("nat", "POSTROUTING", ["-s", f"{CTR_IP}/32", "-d", f"{CTR_IP}/32"] + TCP_CTR + TAGGED
                + ["-j", "MASQUERADE"]),
}

LESSON = Lesson(
    "05b", "ports",
    goal=f"port {HOST_PORT} of the host is published to port {CTR_PORT} of the container {CTR} as "
         f"`docker run -p {HOST_PORT}:{CTR_PORT}` publishes it: real TCP from outside, from the host to its own "
         f"address, from localhost and from {CTR} itself (hairpin) reaches the container, which sees the outside "
         "client's own address; conntrack shows the translation; a userland proxy hides that address",
    picture=r"""
   +---------------- web (the container) ----------------+
   |  eth0 10.0.5.2/24, default via 10.0.5.1              |
   |  a server on tcp/80 answers "web <who called>"       |
   +--------------------------|---------------------------+
                              | veth-web (hairpin on)
   +--------------------------|------------------------------- host -----------+
   |  br0 10.0.5.1/24 (Docker: docker0)     route_localnet=1 on br0           |
   |  nat PREROUTING, OUTPUT: to a local address -> CNIKIT-PORTS (Docker: DOCKER)|
   |      CNIKIT-PORTS: tcp dport 8080 -> DNAT 10.0.5.2:80                      |
   |      POSTROUTING: MASQUERADE local sources out br0, and web -> web:80      |
   |  filter FORWARD: accept ! -i br0 -o br0 to 10.0.5.2 tcp/80                 |
   |  userland proxy: socat on :8081 -> 10.0.5.2:80 (Docker: docker-proxy)      |
   |  clients here: the host (203.0.113.1), localhost     uplink0 203.0.113.1/24 |
   +--------------------------------------------------------|-----------------+
   +------------------------------ outside -----------------|-----------------+
   |  a client out there                          eth0 203.0.113.10/24         |
   +---------------------------------------------------------------------------+
""",
    skips={"prerouting": "no PREROUTING jump: connections arriving from outside (and the container's own, "
                         "which arrive on br0) are not translated: outside and hairpin fail",
           "output": "no OUTPUT jump: the host's own connections are not translated: the host's address "
                     "and localhost fail, outside still works",
           "route-localnet": "route_localnet=0 on br0: a DNATed packet from 127.0.0.1 may not leave by br0: "
                             "localhost fails, the host's address still works",
           "local-masquerade": "no masquerade of local sources: the container gets a packet from 127.0.0.1 "
                               "and drops it: localhost fails",
           "hairpin": "no hairpin masquerade: the container gets its own connection from its own address "
                      "and drops it: hairpin fails",
           "proxy": "no userland proxy: nothing listens on port 8081: the proxy's proof fails"},
    tools=("ip", "iptables", "sysctl", "socat", "ss"),
)


def add_rule(L, name):
    table, chain, spec = RULES[name]
    L.r.run(cnikit.iptables_rule("-A", table, chain, spec), creates=cnikit.Change.rule(table, chain, spec))


def build(L):
    r = L.r
    L.step(f"the container: {CTR} on br0 with a default route via the host, as in lesson 05 (docker run "
           "gives each container a veth on docker0, 172.17.0.0/16)")
    cnikit.netns_add(r, CTR, lo_up=True)
    cnikit.bridge_add(r, BRIDGE, addr=GATEWAY)
    cnikit.veth_add(r, HOST_END, "eth0", netns=CTR, peer_addr=CTR_ADDR)
    cnikit.bridge_attach(r, BRIDGE, [HOST_END])
    cnikit.route_add(r, "default", via=GATEWAY_IP, ns=CTR)

    L.step("\"outside\": a machine on the host's network, behind its uplink, documentation addresses; and, as "
           "in lesson 05, forwarding and the container's egress masquerade (Docker: -s 172.17.0.0/16 ! -o "
           "docker0 -j MASQUERADE)")
    cnikit.netns_add(r, OUTSIDE, lo_up=True)
    cnikit.veth_add(r, UPLINK, "eth0", netns=OUTSIDE, addr=UPLINK_ADDR, peer_addr=OUTSIDE_ADDR)
    cnikit.nat_add(r, SUBNET, UPLINK)

    L.step(f"the container's server on tcp/{CTR_PORT}: it answers each connection with its name and the "
           "address the connection came from, so every proof shows who the container saw")
    r.spawn(in_netns(["socat", f"TCP-LISTEN:{CTR_PORT},reuseaddr,fork", f"SYSTEM:echo {CTR} $SOCAT_PEERADDR"], CTR))
    L.wait_listening(CTR_PORT, CTR)

    L.step(f"before any rule: outside connects to the host's port {HOST_PORT}. Nothing listens there, so the "
           "host's kernel answers with a reset; this connection is expected to FAIL (Connection refused)")
    L.check(f"before the rules, {HOST_IP}:{HOST_PORT} answers no one", ask(L, HOST_IP, HOST_PORT, OUTSIDE,
                                                                           expect_fail=True) is None)

    L.step(f"a chain of our own in the nat table (Docker's is called DOCKER) with the DNAT: TCP to port "
           f"{HOST_PORT} gets the destination {CTR_IP}:{CTR_PORT}. Only the first packet of a connection "
           "meets nat rules; conntrack does the same to the rest, and undoes it on the replies")
    r.run(cnikit.iptables("-t", "nat", "-N", CHAIN), creates=cnikit.Change.chain("nat", CHAIN))
    add_rule(L, "dnat")
    L.say(f"    Docker's default (the userland proxy on) writes `! -i docker0` into this rule and puts "
          f"`-i docker0 -j RETURN` before it: what containers send to a published port is left to docker-proxy")

    if L.step("PREROUTING sees every packet that arrives at the host, before routing decides where it goes: "
              "jump to the chain when the destination is one of the host's own addresses (`-m addrtype "
              "--dst-type LOCAL`, any of them, whatever interface holds it), as Docker does", skip="prerouting"):
        add_rule(L, "prerouting")

    L.step(f"the DNATed connection is now forwarded from uplink0 to br0: accept exactly it, new connections "
           f"to {CTR_IP}:{CTR_PORT} entering br0 from elsewhere (Docker: in its filter chain DOCKER). Where "
           "FORWARD's policy is ACCEPT (a fresh sandbox) it changes nothing; where it is DROP (Docker sets it) "
           "the published port is closed without it")
    add_rule(L, "forward")

    if L.step("the host's own connections never pass PREROUTING: they leave by OUTPUT. The same jump there "
              f"translates the host's connections to its own addresses, {HOST_IP} and {LOCALHOST} included",
              skip="output"):
        add_rule(L, "output")
        L.say("    Docker's default writes `! -d 127.0.0.0/8` into this jump: localhost:8080 then reaches "
              "docker-proxy, a process listening on the port, and the two steps below are not needed")

    if L.step(f"a connection to {LOCALHOST}:{HOST_PORT} now has the destination {CTR_IP} but still its "
              f"source {LOCALHOST}, and the kernel never sends a packet from 127.0.0.0/8 out of a real "
              "interface (nor accepts one) unless route_localnet is on for it: Docker sets it on docker0",
              skip="route-localnet"):
        L.sysctl(f"net.ipv4.conf.{BRIDGE}.route_localnet", 1)

    if L.step(f"and the container would drop a packet from {LOCALHOST} (its own loopback range): masquerade "
              f"what the host itself sends out of br0 (`--src-type LOCAL`) to {GATEWAY_IP}",
              skip="local-masquerade"):
        add_rule(L, "local-masquerade")

    L.step(f"hairpin: {CTR} calls its own published port. PREROUTING's DNAT sends the connection back to br0 "
           f"and, with br_netfilter (bridge-nf-call-iptables=1, as here and on every Docker host), out of the "
           f"very port it came in by: a bridge does that only with hairpin mode on that port (Docker sets it "
           "with the userland proxy off)")
    r.run(cnikit.bridge("link", "set", "dev", HOST_END, "hairpin", "on"))
    if L.step(f"then {CTR} would get a connection from its own address {CTR_IP}, drop it as a martian, and its "
              f"reply would never be un-DNATed anyway: masquerade {CTR_IP} -> {CTR_IP}:{CTR_PORT} to "
              f"{GATEWAY_IP} (Docker writes this rule for every published port)", skip="hairpin"):
        add_rule(L, "hairpin")

    L.step("the rules, read as the kernel reads them (beside `iptables-save` on a Docker host: the same "
           "rules, with docker0 and 172.17.0.2)")
    r.show(cnikit.iptables("-t", "nat", "-S", "PREROUTING"))
    r.show(cnikit.iptables("-t", "nat", "-S", "OUTPUT"))
    r.show(cnikit.iptables("-t", "nat", "-S", CHAIN))
    r.show(cnikit.iptables("-t", "nat", "-S", "POSTROUTING"))
    r.show(cnikit.iptables("-S", "FORWARD"))

    if L.step(f"the other way, Docker's default: a userland proxy. docker-proxy listens on the host's port and "
              f"opens a connection of its own to the container for each one it accepts. socat does the same "
              f"here on port {PROXY_PORT}: the container then sees the host's address, never the client's",
              skip="proxy"):
        r.spawn(["socat", f"TCP-LISTEN:{PROXY_PORT},reuseaddr,fork", f"TCP:{CTR_IP}:{CTR_PORT}"])
        L.wait_listening(PROXY_PORT)


def ask(L, target, port, ns=None, expect_fail=False):
    """One real TCP connection from NS (None: the host) to TARGET:PORT; returns the address the
    container's server saw the connection come from, or None when nothing answered."""
    argv = in_netns(["socat", "-u", f"TCP:{target}:{port},connect-timeout={CONNECT_TIMEOUT}", "-"], ns)
    ok, out = L.r.probe(argv, timeout=PROBE_TIMEOUT, expect_fail=expect_fail)
    answers = [line.split()[1] for line in out.splitlines() if len(line.split()) == 2 and line.split()[0] == CTR]
    return answers[0] if ok and answers else None


def verify(L):
    r = L.r
    seen = ask(L, HOST_IP, HOST_PORT, OUTSIDE)
    L.check(f"outside reaches {HOST_IP}:{HOST_PORT}, and {CTR} sees the client's own address {OUTSIDE_IP}",
            seen == OUTSIDE_IP, f"it saw {seen or 'nothing'}")

    if have("conntrack"):
        L.say(f"conntrack holds each translation: the original direction to {HOST_IP}:{HOST_PORT}, the reply "
              f"direction from {CTR_IP}:{CTR_PORT}")
        ok, out = r.probe(["conntrack", "-L", "-p", "tcp", "--orig-port-dst", str(HOST_PORT)])
        L.check(f"conntrack maps {OUTSIDE_IP} -> {HOST_IP}:{HOST_PORT} to replies from {CTR_IP}:{CTR_PORT}",
                ok and translated(out, OUTSIDE_IP, HOST_IP), out.strip().splitlines()[-1] if out.strip() else "")
    else:
        L.say("conntrack (Debian package conntrack) is not installed: skipping the look at the translation")

    seen = ask(L, HOST_IP, HOST_PORT)
    L.check(f"the host reaches its own address {HOST_IP}:{HOST_PORT} (OUTPUT's DNAT)", seen is not None)

    seen = ask(L, LOCALHOST, HOST_PORT)
    L.check(f"the host reaches localhost:{HOST_PORT}, and {CTR} sees the host's {GATEWAY_IP} (route_localnet, "
            "the masquerade)", seen == GATEWAY_IP, f"it saw {seen or 'nothing'}")

    seen = ask(L, HOST_IP, HOST_PORT, CTR)
    L.check(f"hairpin: {CTR} reaches its own published port {HOST_IP}:{HOST_PORT}, and sees the connection "
            f"come from {GATEWAY_IP}", seen == GATEWAY_IP, f"it saw {seen or 'nothing'}")

    L.say(f"the userland proxy on port {PROXY_PORT}: the connection {CTR} gets is the proxy's own")
    seen = ask(L, HOST_IP, PROXY_PORT, OUTSIDE)
    L.check(f"outside reaches the proxy at {HOST_IP}:{PROXY_PORT}, and {CTR} sees the host's {GATEWAY_IP}, "
            f"not {OUTSIDE_IP}", seen == GATEWAY_IP, f"it saw {seen or 'nothing'}")
    L.say(f"nothing listens on the host's port {HOST_PORT} itself: the published port is only rules")
    ok, out = r.probe(["ss", "-Htln", f"sport = :{HOST_PORT}"])
    L.check(f"no socket listens on the host's port {HOST_PORT}", r.dry_run or ok and not out.strip(), out)


def translated(conntrack_out, client, host_ip):
    """Is there a flow CLIENT -> HOST_IP:HOST_PORT whose reply direction comes from the
    container's port (src=CTR_IP sport=CTR_PORT back to CLIENT)? Whole addresses only."""
    for line in conntrack_out.splitlines():
        pairs = re.findall(r"\bsrc=(\S+) dst=(\S+) sport=(\d+) dport=(\d+)", line)
        if len(pairs) >= 2 and pairs[0][0] == client and pairs[0][1] == host_ip and \
                pairs[0][3] == str(HOST_PORT) and pairs[1][:3] == (CTR_IP, client, str(CTR_PORT)):
            return True
    return False


if __name__ == "__main__":
    LESSON.main(build, verify)
