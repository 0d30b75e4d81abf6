#!/usr/bin/env python3
"""Lesson 05b: published ports, the way `docker run -p 8080:80` does it. Nothing listens on
the host's port 8080: nat rules rewrite the destination of connections to it (DNAT) to the
container's port 80, for traffic from outside (PREROUTING) and from the host itself (OUTPUT);
route_localnet and a masquerade make localhost:8080 work, a hairpin masquerade lets the
container reach its own published port; conntrack remembers each translation. The userland
proxy (docker-proxy) is the other way: a process on the host relays each connection.

    sudo python3 stages/05b_ports.py                 # in a throwaway sandbox
    python3 stages/05b_ports.py --dry-run            # the lesson as a shell script
    sudo python3 stages/05b_ports.py --with-docker   # and a real `docker run -p` beside ours

The rules are those dockerd 20.10 writes with `--userland-proxy=false` (its chain DOCKER is
CNIKIT-PORTS here); the narration says what its default (the userland proxy) writes
instead. "Outside" is a namespace this lesson creates, with documentation addresses.
"""
import re
import shlex
import subprocess
from dataclasses import dataclass, field

from lesson import Lesson, cnikit, have, in_netns, nft_view

BRIDGE, GATEWAY = "br0", "10.0.5.1/24"                 # docker0 172.17.0.1/16 on a Docker host
CTR, CTR_ADDR, SUBNET = "web", "10.0.5.2/24", "10.0.5.0/24"
HOST_END = "veth-web"
OUTSIDE = "outside"
UPLINK, UPLINK_ADDR, OUTSIDE_ADDR = "uplink0", "203.0.113.1/24", "203.0.113.10/24"
HOST_PORT, CTR_PORT, PROXY_PORT = 8080, 80, 8081       # -p 8080:80; the proxy's own port, beside it
CHAIN = cnikit.PORTS_CHAIN                             # Docker: DOCKER (nat table)
CONNECT_TIMEOUT = 2        # seconds: every proof is one connection on one machine
PROBE_TIMEOUT = 10         # seconds a proof may take in all (connect, answer, close)
LOCALHOST = "127.0.0.1"
GATEWAY_IP, CTR_IP, HOST_IP, OUTSIDE_IP = (a.split("/")[0] for a in (GATEWAY, CTR_ADDR, UPLINK_ADDR, OUTSIDE_ADDR))
# --with-docker: a real dockerd inside the lesson's sandbox, its state on tmpfs (runtimes note).
DOCKER_DIRS = ("/var/lib/docker", "/run/docker", "/run/containerd", "/etc/docker")
DOCKER_SOCK = "unix:///run/docker/d.sock"
DOCKER_PORT = 9080                      # -p 9080:80: our DNAT already owns 8080
DOCKER_CTR, DOCKER_IMAGE = "cnikit-web", "localhost/cnikit-bare"
DOCKER_ROOTFS = "/run/docker/rootfs"    # an image of a few directories; /usr comes from the host, read-only
DOCKER_READY = 30                       # seconds dockerd gets to answer
DOCKER_STOP = 20                        # seconds dockerd gets to stop its containerd
CGROUP_ROOT = "/sys/fs/cgroup"

# (table, chain, rule spec) of each rule, named by the step that adds it: the rules
# `cnikit nat publish` writes (tagged, so `cnikit cleanup` finds them).
RULES = cnikit.port_rules(HOST_PORT, CTR_IP, CTR_PORT, BRIDGE)

@dataclass
class WithDocker:
    """--with-docker's state: asked for (WANTED), dockerd's process once it runs (DAEMON), and the
    pairs (a rule of Docker's, our twin or None) verify judges (PAIRS)."""
    wanted: bool = False
    daemon: subprocess.Popen = None
    pairs: list = field(default_factory=list)


class PortsLesson(Lesson):
    def _leave(self, args, keep):
        """Whatever ended the lesson (a failed step, Ctrl-C), stop --with-docker's dockerd the way
        it stops cleanly, before the framework stops the rest: killed, it would leave its
        containerd and container behind."""
        with_docker = self.running
        if with_docker is not None and with_docker.daemon is not None and self.r is not None and not self.r.dry_run:
            self.r.stepping, self.r.present = None, None
            docker_stop(self, with_docker)
        super()._leave(args, keep)


LESSON = PortsLesson(
    "05b", "ports",
    goal=f"port {HOST_PORT} of the host is published to port {CTR_PORT} of the container {CTR} as "
         f"`docker run -p {HOST_PORT}:{CTR_PORT}` publishes it: real TCP from outside, from the host to its own "
         f"address, from localhost and from {CTR} itself (hairpin) reaches the container, which sees the outside "
         "client's own address; conntrack shows the translation; a userland proxy hides that address",
    picture=r"""
   +---------------- web (the container) -----------------+
   |  eth0 10.0.5.2/24, default via 10.0.5.1              |
   |  a server on tcp/80 answers "web <who called>"       |
   +-----------------------|------------------------------+
                           | veth-web (hairpin on)
   +-----------------------|----------- host -----------------------------------+
   |  br0 10.0.5.1/24 (Docker: docker0)          route_localnet=1 on br0        |
   |  nat PREROUTING, OUTPUT: to a local address -> CNIKIT-PORTS (DOCKER)       |
   |      CNIKIT-PORTS: tcp dport 8080 -> DNAT 10.0.5.2:80                      |
   |      POSTROUTING: MASQUERADE local sources out br0, and web -> web:80      |
   |  filter FORWARD: accept ! -i br0 -o br0 to 10.0.5.2 tcp/80                 |
   |  userland proxy: socat on :8081 -> 10.0.5.2:80 (Docker: docker-proxy)      |
   |  clients here: the host itself, localhost         uplink0 203.0.113.1/24   |
   +------------------------------------------------------------|---------------+
                                                                | veth: the uplink
   +--------------------------------- outside ------------------|---------------+
   |  a client out there                               eth0 203.0.113.10/24     |
   +----------------------------------------------------------------------------+
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
    state=WithDocker,
)


def docker(*args):
    return ["docker", "-H", DOCKER_SOCK] + [str(a) for a in args]


def cgroup_mounts(text):
    """The commands that mount this process's cgroup hierarchies (TEXT: /proc/self/cgroup) on
    /sys/fs/cgroup: the sandbox's fresh sysfs hides the host's, and runc needs them."""
    lines = [line.split(":", 2) for line in text.splitlines() if line.count(":") >= 2]
    if all(n == "0" for n, _, _ in lines):                  # cgroup v2 only
        return [["mount", "-t", "cgroup2", "cgroup2", CGROUP_ROOT]]
    out = [["mount", "-t", "tmpfs", "cgroup", CGROUP_ROOT]]
    for n, controllers, _ in lines:
        if n == "0":                                        # a hybrid host's v2 tree
            path, how = f"{CGROUP_ROOT}/unified", ["-t", "cgroup2", "cgroup2"]
        else:                                               # v1: one hierarchy, its controllers together
            path = f"{CGROUP_ROOT}/{controllers.replace('name=', '')}"
            opts = "none," + controllers if controllers.startswith("name=") else controllers
            how = ["-t", "cgroup", "-o", opts, "cgroup"]
        out += [["mkdir", "-p", path], ["mount", *how, path]]
    return out


def docker_start(L, with_docker):
    """--with-docker: start a real dockerd in the lesson's sandbox before the lesson's own steps
    (it sets FORWARD's policy to DROP at once, as on any Docker host); WITH_DOCKER.daemon is its
    process, None when there is no Docker step."""
    r, with_docker.daemon = L.r, None
    if not with_docker.wanted:
        return
    if L.on_host:
        raise cnikit.UsageError("--with-docker starts a Docker daemon of its own and runs only in the lesson's "
                                "sandbox: leave out --host")
    if r.dry_run:
        r.note("--with-docker: the Docker step runs only in the lesson's sandbox, not in a dry run's script")
        return
    if not (have("dockerd") and have("docker")):
        L.say("--with-docker: dockerd is not installed here (Debian package docker.io): no Docker step")
        return
    L.step("--with-docker: a real Docker daemon in this sandbox, so that a real `docker run -p` writes its rules "
           "beside ours. Its state goes on tmpfs, it gets the cgroup hierarchies the sandbox's fresh /sys hides, "
           "and the userland proxy off (its rules are then those this lesson writes). It starts first: it sets "
           "FORWARD's policy to DROP, and the lesson's steps below meet a Docker host")
    for path in DOCKER_DIRS:
        r.run(["mkdir", "-p", path])
        r.run(["mount", "-t", "tmpfs", "tmpfs", path])
    with open("/proc/self/cgroup") as f:
        for argv in cgroup_mounts(f.read()):
            r.run(argv)
    with_docker.daemon = r.spawn(["dockerd", "-H", DOCKER_SOCK, "--data-root", DOCKER_DIRS[0], "--exec-root",
                                  "/run/docker/exec", "--pidfile", "/run/docker/d.pid", "--userland-proxy=false",
                                  "--log-level", "error"])
    wait = f"until {shlex.join(docker('version'))} >/dev/null 2>&1; do sleep 0.2; done"
    r.run(["timeout", str(DOCKER_READY), "sh", "-c", wait])


def docker_run(L, with_docker):
    """--with-docker: a real `docker run -p DOCKER_PORT:80`, and its rules beside ours."""
    r = L.r
    if with_docker.daemon is None:
        return
    L.step(f"--with-docker: now the real thing. An image of a few empty directories (no registry here; /usr "
           f"comes from the host, read-only) and `docker run -p {DOCKER_PORT}:{CTR_PORT}` of the same server")
    for path in ("usr", "proc", "sys", "dev", "etc", "tmp"):
        r.run(["mkdir", "-p", f"{DOCKER_ROOTFS}/{path}"])
    for link in ("bin", "sbin", "lib", "lib64"):
        r.run(["ln", "-sfn", f"usr/{link}", f"{DOCKER_ROOTFS}/{link}"])
    r.run(["sh", "-c", f"tar -C {DOCKER_ROOTFS} -c . | {shlex.join(docker('import', '-', DOCKER_IMAGE))}"])
    # timeout: the container ends by itself even if the lesson is killed before it removes it
    r.run(docker("run", "-d", "--name", DOCKER_CTR, "-p", f"{DOCKER_PORT}:{CTR_PORT}", "-v", "/usr:/usr:ro",
                 DOCKER_IMAGE, "timeout", "600", "socat", f"TCP-LISTEN:{CTR_PORT},reuseaddr,fork",
                 "SYSTEM:echo docker $SOCAT_PEERADDR"))
    r.run(docker("exec", DOCKER_CTR, "timeout", "5", "sh", "-c",
                 f'until ss -Htln "sport = :{CTR_PORT}" | grep -q .; do sleep 0.02; done'))
    L.say("Docker's rules and ours in the same tables")
    nat = r.show(cnikit.iptables("-t", "nat", "-S"))
    docker_filter = r.show(cnikit.iptables("-S", "DOCKER"))
    forward = r.query(cnikit.iptables("-S", "FORWARD"))[1]
    with_docker.pairs = beside(nat.splitlines(), docker_filter.splitlines(), nat.splitlines() + forward.splitlines())
    L.say(f"side by side, each rule Docker wrote for its port and ours (DOCKER is {CHAIN}, docker0 is {BRIDGE}, "
          f"its port {DOCKER_PORT} is our {HOST_PORT}; its filter chain DOCKER is our FORWARD). Docker's egress "
          f"masquerade (! -o docker0) is lesson 05's, nat add's chain here")
    for theirs, ours in with_docker.pairs:
        L.say(f"Docker: {theirs}\n  ours: {ours or '(none)'}")


def rule_words(line):
    """An `iptables -S` line as words, cnikit's comment left out (Docker's rules have none)."""
    words = shlex.split(line)
    for i in range(len(words) - 3):
        if words[i:i + 3] == ["-m", "comment", "--comment"]:
            return words[:i] + words[i + 4:]
    return words


def beside(docker_nat, docker_filter, ours):
    """[(a rule Docker wrote for its published port, our rule that does the same, or None)]:
    DOCKER_NAT and DOCKER_FILTER are `iptables -S` lines (nat table; filter chain DOCKER),
    OURS the lines to look in. Docker's names are translated into the lesson's: the container's
    address comes from Docker's own DNAT rule."""
    dnat = [line for line in docker_nat if line.startswith("-A DOCKER ") and "DNAT" in line]
    theirs = shlex.split(dnat[0])[-1].rsplit(":", 1)[0] if dnat else None
    names = {"DOCKER": CHAIN, "docker0": BRIDGE, str(DOCKER_PORT): str(HOST_PORT)}
    if theirs:
        names.update({f"{theirs}/32": f"{CTR_IP}/32", f"{theirs}:{CTR_PORT}": f"{CTR_IP}:{CTR_PORT}"})
    mine = {tuple(rule_words(line)): line for line in ours if line.startswith("-A ")}
    pairs = []
    for table, lines in (("nat", docker_nat), ("filter", docker_filter)):
        for line in lines:
            words = rule_words(line)
            if words[:1] != ["-A"] or not {"DOCKER", "docker0", f"{theirs}/32"} & set(words) or \
                    "docker0" in words and words[words.index("docker0") - 2:words.index("docker0")] == ["!", "-o"]:
                continue        # not about the published port, or the subnet's egress masquerade
            local = dict(names, DOCKER="FORWARD") if table == "filter" else names
            pairs.append((line, mine.get(tuple(local.get(w, w) for w in words))))
    return pairs


def docker_stop(L, with_docker):
    """Remove Docker's container, then stop dockerd (it stops its own containerd). Also on the
    way out of a failed lesson, where either may not exist yet."""
    r = L.r
    r.run(docker("rm", "-f", DOCKER_CTR), check=False)
    r.run(["sh", "-c", "kill $(cat /run/docker/d.pid)"], check=False)
    r.stop(with_docker.daemon, wait=DOCKER_STOP)
    with_docker.daemon = None


def add_rule(L, name):
    table, chain, spec = RULES[name]
    L.r.run(cnikit.iptables_rule("-A", table, chain, spec), creates=cnikit.Change.rule(table, chain, spec))


def ports_taken(r):
    """The lesson's host ports that this host already uses: a listener, or someone's DNAT (a real
    `docker run -p 8080:...` on a learner's machine). Published twice, the first rule would win."""
    ok, nat = r.query(cnikit.iptables("-t", "nat", "-S"))
    taken = []
    for port in (HOST_PORT, PROXY_PORT):
        listening = r.query(["ss", "-Htln", f"sport = :{port}"])[1].strip()
        dnat = [l for l in nat.splitlines() if f"--dport {port} " in l and "DNAT" in l and "cnikit" not in l]
        if listening or dnat:
            taken.append(f"{port} ({'a listener' if listening else 'published: ' + dnat[0]})")
    return taken


def build(L, with_docker):
    r = L.r
    taken = ports_taken(r) if L.on_host and not r.dry_run else []
    if taken:
        raise cnikit.UsageError(f"port {taken[0]} is already in use on this host; the lesson publishes "
                                f"{HOST_PORT} and proxies {PROXY_PORT}: run it in the sandbox (without --host)")
    docker_start(L, with_docker)
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
           f"rules, with docker0 and 172.17.0.2). `cnikit nat publish {HOST_PORT} --to {CTR_IP}:{CTR_PORT} "
           f"--bridge {BRIDGE}` writes them all in one command, `cnikit nat unpublish {HOST_PORT}` removes them")
    r.show(cnikit.iptables("-t", "nat", "-S", "PREROUTING"))
    r.show(cnikit.iptables("-t", "nat", "-S", "OUTPUT"))
    r.show(cnikit.iptables("-t", "nat", "-S", CHAIN))
    r.show(cnikit.iptables("-t", "nat", "-S", "POSTROUTING"))
    r.show(cnikit.iptables("-S", "FORWARD"))
    L.say("these are Docker 20.10's (Debian 12's docker.io). Newer Docker writes more around them: 28.x moves its "
          "FORWARD rules into chains of its own (DOCKER-FORWARD, DOCKER-BRIDGE, DOCKER-CT) and drops, in the raw "
          "table, packets sent straight to a container's address from outside its bridge; 29.x can write nftables "
          "instead of iptables (--firewall-backend=nftables, experimental). The DNAT and the masquerades stay")
    nft_view(L, "nat", CHAIN, "what `iptables` really put in the kernel: iptables-nft writes nf_tables rules, and "
             f"nft shows {CHAIN} in its own words (tcp dport {HOST_PORT}, dnat to {CTR_IP}:{CTR_PORT}; leave "
             "changing it to iptables)")

    if L.step(f"the other way, Docker's default: a userland proxy. docker-proxy listens on the host's port and "
              f"opens a connection of its own to the container for each one it accepts. socat does the same "
              f"here on port {PROXY_PORT}: the container then sees the host's address, never the client's",
              skip="proxy"):
        r.spawn(["socat", f"TCP-LISTEN:{PROXY_PORT},reuseaddr,fork", f"TCP:{CTR_IP}:{CTR_PORT}"])
        L.wait_listening(PROXY_PORT)

    docker_run(L, with_docker)


def ask(L, target, port, ns=None, expect_fail=False, server=CTR):
    """One real TCP connection from NS (None: the host) to TARGET:PORT; returns the address the
    container's server (it answers "SERVER <peer>") saw the connection come from, or None when
    nothing answered."""
    argv = in_netns(["socat", "-u", f"TCP:{target}:{port},connect-timeout={CONNECT_TIMEOUT}", "-"], ns)
    ok, out = L.r.probe(argv, timeout=PROBE_TIMEOUT, expect_fail=expect_fail)
    answers = [line.split()[1] for line in out.splitlines() if len(line.split()) == 2 and line.split()[0] == server]
    return answers[0] if ok and answers else None


def verify(L, with_docker):
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
    L.check(f"no socket listens on the host's port {HOST_PORT}", ok and not out.strip(), out)

    if with_docker.daemon is not None:
        seen = ask(L, HOST_IP, DOCKER_PORT, OUTSIDE, server="docker")
        L.check(f"outside reaches Docker's published port {HOST_IP}:{DOCKER_PORT}, and Docker's container sees "
                f"{OUTSIDE_IP} too", seen == OUTSIDE_IP, f"it saw {seen or 'nothing'}")
        pairs = with_docker.pairs
        L.check("each rule the real `docker run -p` wrote for its port has its twin among ours",
                pairs and all(ours for _, ours in pairs),
                "; ".join(theirs for theirs, ours in pairs if not ours) or "no rule of Docker's found")
        docker_stop(L, with_docker)


def translated(conntrack_out, client, host_ip):
    """Is there a flow CLIENT -> HOST_IP:HOST_PORT whose reply direction comes from the
    container's port (src=CTR_IP sport=CTR_PORT back to CLIENT)? Whole addresses only."""
    for line in conntrack_out.splitlines():
        pairs = re.findall(r"\bsrc=(\S+) dst=(\S+) sport=(\d+) dport=(\d+)", line)
        if len(pairs) >= 2 and pairs[0][0] == client and pairs[0][1] == host_ip and \
                pairs[0][3] == str(HOST_PORT) and pairs[1][:3] == (CTR_IP, client, str(CTR_PORT)):
            return True
    return False


def main():
    p = LESSON.parser()
    p.add_argument("--with-docker", action="store_true",
                   help="also start a real dockerd in the sandbox and print the rules its `docker run -p` "
                        "writes beside ours (needs the Debian package docker.io; not with --host)")
    LESSON.main(build, verify, parser=p, state=WithDocker(wanted=p.parse_args().with_docker))


if __name__ == "__main__":
    main()
