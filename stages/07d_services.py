#!/usr/bin/env python3
"""Lesson 07d (after pods, Services): what kube-proxy's iptables mode writes, from scratch.
A ClusterIP is an address no interface has: nat rules rewrite connections to it (DNAT) to
one of the Service's backend pods, picked at random by `-m statistic --mode random`. A
NodePort is the same DNAT for connections to the node's own address on a port (portmap's
hostPort is that DNAT for one pod); under kube-proxy's default, externalTrafficPolicy:
Cluster, a NodePort also masquerades: the backend sees the node, not the outside client.
Conntrack remembers each translation and undoes it on the replies; hairpin lets a pod reach
itself through its own Service.

    sudo python3 stages/07d_services.py            # in a throwaway sandbox
    python3 stages/07d_services.py --dry-run       # the lesson as a shell script

The chains carry kube-proxy's names and are wired as its iptables mode wires them
(KUBE-SERVICES, KUBE-NODEPORTS, KUBE-EXT-..., KUBE-SVC-..., KUBE-SEP-..., KUBE-MARK-MASQ,
KUBE-POSTROUTING). A real node's `iptables-save -t nat` has more: a comment on every rule,
hashes in the chain names, `-m tcp` beside every `-p tcp`, a KUBE-MARK-MASQ jump in
KUBE-SVC-... for ClusterIP traffic from outside the pod network (when kube-proxy knows the
cluster's pod CIDR), chains in the filter table too (KUBE-FORWARD, KUBE-PROXY-FIREWALL and
others) and canary chains (KUBE-PROXY-CANARY) by which kube-proxy notices a flushed table.
"Outside" is a namespace this lesson creates, with documentation addresses.
"""
import os
import re

from lesson import Lesson, cnikit, have, in_netns, ip, nft_view

BRIDGE, GATEWAY = "br0", "10.244.0.1/24"
BACKENDS = {"web1": "10.244.0.11/24", "web2": "10.244.0.12/24"}     # the Service's endpoints
CLIENT, CLIENT_ADDR = "client", "10.244.0.20/24"
PODS = dict(BACKENDS, **{CLIENT: CLIENT_ADDR})
OUTSIDE = "outside"
UPLINK, UPLINK_ADDR, OUTSIDE_ADDR = "uplink0", "203.0.113.1/24", "203.0.113.10/24"
CLUSTER_IP, PORT, TARGET_PORT, NODE_PORT = "10.96.0.10", 80, 8080, 30080
MARK = "0x4000/0x4000"            # kube-proxy's masquerade mark
TRIES = 20                        # connections per proof: both of two backends answer, but for 2**-19
CONNECT_TIMEOUT = 3               # seconds: a SYN lost once is resent after 1 s, on a busy machine too
BACKLOG = 64                      # the listeners' accept queue: connections come in quick succession
PROC_BRIDGE = "/proc/sys/net/bridge"
BR_NF = "net.bridge.bridge-nf-call-iptables"


def ip_of(cidr):
    return cidr.split("/")[0]


GATEWAY_IP, CLIENT_IP, NODE_IP, OUTSIDE_IP = map(ip_of, (GATEWAY, CLIENT_ADDR, UPLINK_ADDR, OUTSIDE_ADDR))


def sep(pod):
    """A Service endpoint's chain (kube-proxy: KUBE-SEP-<hash of service, endpoint>)."""
    return f"KUBE-SEP-{pod.upper()}"


SVC = "KUBE-SVC-WEB"              # kube-proxy: KUBE-SVC-<hash of the service port>
EXT = "KUBE-EXT-WEB"              # kube-proxy: KUBE-EXT-<the same hash>, external traffic's way in
CHAINS = ["KUBE-SERVICES", "KUBE-NODEPORTS", EXT, SVC] + [sep(p) for p in BACKENDS] + ["KUBE-MARK-MASQ",
                                                                                      "KUBE-POSTROUTING"]


def rules():
    """(chain, rule spec, why) in the order kube-proxy's rules are read."""
    out = [("PREROUTING", ["-j", "KUBE-SERVICES"], "every packet arriving (from pods, from outside) is "
            "looked at by the Services' rules"),
           ("OUTPUT", ["-j", "KUBE-SERVICES"], "and so is every packet the node itself sends"),
           ("POSTROUTING", ["-j", "KUBE-POSTROUTING"], "on the way out, what was marked gets masqueraded"),
           ("KUBE-SERVICES", ["-d", f"{CLUSTER_IP}/32", "-p", "tcp", "--dport", str(PORT), "-j", SVC],
            f"the ClusterIP: TCP to {CLUSTER_IP}:{PORT} goes to the Service's chain"),
           ("KUBE-SERVICES", ["-m", "addrtype", "--dst-type", "LOCAL", "-j", "KUBE-NODEPORTS"],
            "anything to one of the node's own addresses may be a NodePort"),
           ("KUBE-NODEPORTS", ["-p", "tcp", "--dport", str(NODE_PORT), "-j", EXT],
            f"the NodePort: TCP to any node address on port {NODE_PORT} is external traffic"),
           (EXT, ["-j", "KUBE-MARK-MASQ"], "externalTrafficPolicy: Cluster (the default): external traffic is "
            "marked for masquerade: the backend may sit on another node, and its replies must come back through "
            "this one to be un-DNATed"),
           (EXT, ["-j", SVC], "then it is the same Service"),
           (SVC, ["-m", "statistic", "--mode", "random", "--probability", "0.5", "-j", sep("web1")],
            "the load balancing: the first of two endpoints is taken with probability 1/2, the last takes "
            "the rest (with n endpoints: 1/n, 1/(n-1), ..., 1: each gets an equal share)"),
           (SVC, ["-j", sep("web2")], "")]
    for pod, cidr in BACKENDS.items():
        out += [(sep(pod), ["-s", f"{ip_of(cidr)}/32", "-j", "KUBE-MARK-MASQ"],
                 f"hairpin: {pod} reaching itself through the Service gets masqueraded (a packet from its "
                 "own address would be dropped as a martian)"),
                (sep(pod), ["-p", "tcp", "-j", "DNAT", "--to-destination", f"{ip_of(cidr)}:{TARGET_PORT}"],
                 f"the DNAT: the destination becomes {pod}'s address and its targetPort")]
    out += [("KUBE-MARK-MASQ", ["-j", "MARK", "--set-xmark", MARK], "marking only: the masquerade comes later"),
            ("KUBE-POSTROUTING", ["-m", "mark", "!", "--mark", MARK, "-j", "RETURN"],
             "on the way out: what is not marked is left alone"),
            ("KUBE-POSTROUTING", ["-j", "MARK", "--xor-mark", MARK.split("/")[0]],
             "the mark is cleared (a packet that passes again is not masqueraded twice)"),
            ("KUBE-POSTROUTING", ["-j", "MASQUERADE", "--random-fully"], "and the source becomes the node's "
             "address on the way to the backend; --random-fully picks its source port at random (fewer clashes "
             "between connections masqueraded at once)")]
    return out


LESSON = Lesson(
    "07d", "services",
    goal=f"a ClusterIP ({CLUSTER_IP}:{PORT}, on no interface) and a NodePort ({NODE_PORT}) built as kube-proxy's "
         "iptables mode builds them: real TCP to the Service from a pod, from the node and from outside the node "
         "is DNATed to both backend pods (statistic mode random), the NodePort's outside client is masqueraded "
         "(externalTrafficPolicy: Cluster), conntrack shows the translation, and a backend reaches itself "
         "through its Service (hairpin)",
    picture=r"""
   +------- web1 -------+  +------- web2 -------+  +------ client ------+
   | eth0 10.244.0.11   |  | eth0 10.244.0.12   |  | eth0 10.244.0.20   |
   | socat :8080 says   |  | socat :8080 says   |  |                    |
   |  "web1 <peer>"     |  |  "web2 <peer>"     |  |                    |
   +---------|----------+  +---------|----------+  +---------|----------+
   +---------|-------------------- node --------------------|----------+
   |        br0 10.244.0.1/24  (hairpin on the ports, br_netfilter)      |
   |  nat: KUBE-SERVICES  10.96.0.10:80 -> KUBE-SVC-WEB                  |
   |       node address :30080 -> KUBE-NODEPORTS -> KUBE-EXT-WEB (mark)  |
   |       KUBE-SVC-WEB   random 1/2 -> KUBE-SEP-WEB1, else -> SEP-WEB2  |
   |       KUBE-SEP-*     DNAT to 10.244.0.1x:8080 (hairpin: mark)       |
   |       KUBE-POSTROUTING  marked -> MASQUERADE                        |
   |                                         uplink0 203.0.113.1/24      |
   +--------------------------------------------------|-----------------+
   +------------------------- outside ----------------|-----------------+
   |   a client on the node's network        eth0 203.0.113.10/24       |
   +--------------------------------------------------------------------+
""",
    skips={"br-netfilter": f"{BR_NF}=0: the backend's reply to the client pod is switched straight "
                           "across br0, never un-DNATed: the client gets an answer from an address it never "
                           "called and resets it; connections from a pod to the ClusterIP fail",
           "hairpin": "no hairpin mode on the bridge ports: when the random pick sends web1 to itself, "
                      "br0 will not send the frame back out of the port it came in by: those connections fail"},
    tools=("ip", "iptables", "sysctl", "socat", "ss"),
)


def build(L):
    r = L.r
    if not r.dry_run and not os.path.isdir(PROC_BRIDGE):
        raise cnikit.UsageError(f"{PROC_BRIDGE} is missing: Services on a bridge need br_netfilter "
                                "(load it with: modprobe br_netfilter)")
    L.step("the pods of lesson 04 on br0: two backends of one Service and a client, each with a default "
           "route via br0 (kubernetes: the pod network your CNI plugin made)")
    cnikit.bridge_add(r, BRIDGE, addr=GATEWAY)
    for pod, cidr in PODS.items():
        cnikit.netns_add(r, pod, lo_up=True)
        cnikit.veth_add(r, f"veth-{pod}", "eth0", netns=pod, peer_addr=cidr)
        cnikit.route_add(r, "default", via=GATEWAY_IP, ns=pod)
    cnikit.bridge_attach(r, BRIDGE, [f"veth-{pod}" for pod in PODS])

    L.step("each backend listens on its targetPort and answers every connection with its own name and "
           "the address it sees the connection coming from")
    for pod, cidr in BACKENDS.items():
        r.spawn(in_netns(["socat", f"TCP-LISTEN:{TARGET_PORT},reuseaddr,fork,backlog={BACKLOG}",
                          f"SYSTEM:echo {pod} $SOCAT_PEERADDR"], pod))
    for pod in BACKENDS:
        L.wait_listening(TARGET_PORT, pod)

    L.step("the node's network: an uplink to \"outside\", a machine next to the node, which is also the "
           "node's default router. A ClusterIP is on no interface, yet a connection from the node itself "
           "needs a route to it before OUTPUT's DNAT rewrites it: the default route is that route")
    cnikit.netns_add(r, OUTSIDE, lo_up=True)
    cnikit.veth_add(r, UPLINK, "eth0", netns=OUTSIDE, addr=UPLINK_ADDR, peer_addr=OUTSIDE_ADDR)
    cnikit.route_add(r, "default", via=OUTSIDE_IP)
    L.sysctl("net.ipv4.ip_forward", 1)

    if L.step("br_netfilter: frames switched across br0 pass through iptables too. A backend answers the "
              "client pod directly, across the bridge: only then does conntrack see the reply and turn its "
              "source back into the ClusterIP (kubeadm up to 1.29 refused to start without it; since 1.30 it no longer "
              "checks, and loading it is up to the network plugin or the admin)", skip="br-netfilter"):
        L.sysctl(BR_NF, 1)
    else:
        L.sysctl(BR_NF, 0)

    if L.step("hairpin mode on each bridge port: a frame may leave by the port it came in by, as when a "
              "backend's connection to its own Service is sent back to itself (kubelet sets it)",
              skip="hairpin"):
        for pod in PODS:
            r.run(cnikit.bridge("link", "set", "dev", f"veth-{pod}", "hairpin", "on"))

    L.step("kube-proxy's chains in the nat table, empty first")
    for chain in CHAINS:
        r.run(cnikit.iptables("-t", "nat", "-N", chain), creates=cnikit.Change.chain("nat", chain))

    L.step("and its rules, read top to bottom as the kernel does")
    for chain, spec, why in rules():
        if why:
            L.say(f"    {why}")
        r.run(cnikit.iptables_rule("-A", "nat", chain, spec), creates=cnikit.Change.rule("nat", chain, spec))
    r.show(cnikit.iptables("-t", "nat", "-S"))
    nft_view(L, "nat", SVC, f"the same {SVC} as nf_tables holds it (iptables here is iptables-nft): "
             "`-m statistic --mode random` became `meta random` compared with a threshold; kube-proxy's "
             "nftables mode (GA in 1.33) writes such rules itself, in a table of its own")
    if cnikit.forward_drops(r):     # a Docker host: a NodePort's DNATed connection is forwarded, and dropped
        r.note("this host's FORWARD policy is DROP (Docker sets it): kube-proxy accepts Service traffic in its "
               "KUBE-FORWARD chain; here: connections a Service rule DNATed, both ways, and nothing else")
        accept = ["-m", "conntrack", "--ctstate", "DNAT", "-m", "comment", "--comment", "cnikit services", "-j", "ACCEPT"]
        r.run(cnikit.iptables_rule("-A", "filter", "FORWARD", accept),
              creates=cnikit.Change.rule("filter", "FORWARD", accept))


def connect_loop(L, target, port, ns=None, tries=TRIES):
    """TRIES real TCP connections to TARGET:PORT from NS (None: the node), one shell loop;
    returns the answers, one "<backend> <the peer it saw>" per connection that got one."""
    # A connection that fails ends the loop: one is enough to fail the proof, and a broken
    # Service (--skip) then costs one connect timeout, not TRIES of them.
    loop = (f"for i in $(seq {tries}); do socat -u TCP:{target}:{port},connect-timeout={CONNECT_TIMEOUT} - "
            "|| { echo failed; break; }; done")
    ok, out = L.r.probe(in_netns(["sh", "-c", loop], ns))
    return [line.split() for line in out.splitlines() if re.match(r"^(web\d|failed)\b", line)]


def tally(answers):
    return {name: sum(1 for a in answers if a[0] == name) for name in ("web1", "web2", "failed")}


def verify(L):
    r = L.r
    if r.dry_run:
        L.say(f"each proof below opens {TRIES} connections; each answer names the backend that took it")

    L.say(f"from the client pod to the ClusterIP: {TRIES} connections")
    answers = connect_loop(L, CLUSTER_IP, PORT, CLIENT)
    count = tally(answers)
    L.say(f"web1 answered {count['web1']}, web2 {count['web2']}, failed {count['failed']}")
    L.check(f"every connection from the client pod to {CLUSTER_IP}:{PORT} was answered, by both backends",
            len(answers) == TRIES and not count["failed"] and count["web1"] and count["web2"], str(count))
    answered = [a for a in answers if a[0] != "failed"]
    L.check(f"the backends saw the client's own address {CLIENT_IP} (a ClusterIP hides the backend, not "
            "the client)", answered and all(a[1:] == [CLIENT_IP] for a in answered))

    if have("conntrack"):
        L.say("conntrack holds each translation: the original direction to the ClusterIP, the reply "
              "direction from the backend that was picked")
        argv = ["conntrack", "-L", "-p", "tcp", "--orig-dst", CLUSTER_IP]
        r.echo(argv)
        ok, out = r.query(argv)
        backs = {ip_of(c) for c in BACKENDS.values()}
        flows = [line for line in out.splitlines() if line.startswith("tcp")]
        shown = {}
        for line in flows:          # one flow per backend is enough to read
            m = re.search(rf"dport={PORT} src=(\S+) dst={re.escape(CLIENT_IP)} ", line)
            if m:
                shown.setdefault(m.group(1), line)
        if not r.quiet and not r.dry_run:
            L.say(f"{len(flows)} flows; one per backend:")
            r.output("\n".join(shown.values()))
        L.check(f"conntrack maps {CLIENT_IP} -> {CLUSTER_IP}:{PORT} to replies from both backends",
                set(shown) == backs, out.strip().splitlines()[-1] if out.strip() else "")
    else:
        L.say("conntrack (Debian package conntrack) is not installed: skipping the look at the translations")

    L.say(f"from the node itself (OUTPUT's DNAT): {TRIES} connections")
    count = tally(connect_loop(L, CLUSTER_IP, PORT))
    L.say(f"web1 answered {count['web1']}, web2 {count['web2']}, failed {count['failed']}")
    L.check(f"from the node, {CLUSTER_IP}:{PORT} answers every connection, from both backends",
            sum(count.values()) == TRIES and not count["failed"] and count["web1"] and count["web2"], str(count))

    L.say(f"from outside the node, to the node's address {NODE_IP} on the NodePort {NODE_PORT}")
    answers = connect_loop(L, NODE_IP, NODE_PORT, OUTSIDE)
    count = tally(answers)
    L.say(f"web1 answered {count['web1']}, web2 {count['web2']}, failed {count['failed']}")
    L.check(f"the NodePort {NODE_IP}:{NODE_PORT} answers every connection from outside, from both backends",
            sum(count.values()) == TRIES and not count["failed"] and count["web1"] and count["web2"], str(count))
    answered = [a for a in answers if a[0] != "failed"]
    L.check(f"the backends saw the node ({GATEWAY_IP}, KUBE-EXT-WEB's masquerade), not the outside client "
            f"{OUTSIDE_IP}", answered and all(a[1:] == [GATEWAY_IP] for a in answered), str(answered[:3]))
    L.say("to keep the client's address, a Service sets externalTrafficPolicy: Local: kube-proxy then "
          "skips the mark and sends external traffic only to endpoints on the node it arrived at. The cost: "
          "a node without a ready endpoint drops it (a load balancer learns which nodes to avoid from the "
          "Service's healthCheckNodePort), and the load is shared per node, not per pod")

    L.say(f"hairpin: web1 connects to its own Service; about half the time the pick is web1 itself")
    answers = connect_loop(L, CLUSTER_IP, PORT, "web1")
    count = tally(answers)
    L.say(f"web1 answered {count['web1']}, web2 {count['web2']}, failed {count['failed']}")
    itself = [a for a in answers if a[0] == "web1"]
    L.check("web1 reached itself through the Service, and no connection failed",
            len(answers) == TRIES and not count["failed"] and itself, str(count))
    L.check(f"web1 saw its own connections come from the node ({GATEWAY_IP}, the masquerade), not from itself",
            itself and all(a[1:] == [GATEWAY_IP] for a in itself), str(itself[:3]))
    L.say("the ClusterIP is on no interface at all: nothing answers ARP or ping for it, only the DNAT "
          "rules give it a meaning")
    ok, out = r.probe(ip("-br", "addr", "show", "to", CLUSTER_IP))
    L.check(f"no interface on the node holds {CLUSTER_IP}", ok and not out.strip(), out)


if __name__ == "__main__":
    LESSON.main(build, verify)
