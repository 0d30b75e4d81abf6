#!/usr/bin/env python3
"""Lesson 06: a VXLAN overlay. Two nodes, a pod on each, one layer-2 segment for the
pods carried in UDP (port 4789) over the nodes' own network, the underlay.

    sudo python3 stages/06_vxlan.py            # both nodes as namespaces, in a sandbox
    python3 stages/06_vxlan.py --dry-run       # the lesson as a shell script

On two real hosts (the Vagrant VMs) each runs its own half, then node1 proves it:

    node1$ sudo python3 stages/06_vxlan.py --role node1 --peer 192.168.56.12
    node2$ sudo python3 stages/06_vxlan.py --role node2 --peer 192.168.56.11
    node1$ sudo python3 stages/06_vxlan.py --role node1 --peer 192.168.56.12 --verify
    both$  sudo python3 stages/06_vxlan.py --role nodeN --peer ... --down

With Docker, two containers are the nodes (the original series' way): the lesson makes a
local image, a docker network and the containers, runs each node's half inside its
container with `docker exec ... --role`, proves the overlay, and removes all it made:

    python3 stages/06_vxlan.py --docker        # (sudo unless you are in the docker group)
    python3 stages/06_vxlan.py --docker --down # what a killed run left (by its label)

The per-node steps are one function, build_node(), called with ns=<node namespace>
in the sandbox and ns=None on a real machine (or in a container).
"""
import os
import signal
import sys

from lesson import ROOT, Lesson, bridge, cnikit, have, in_netns, ip, read_until
import docker_image  # noqa: E402,I100  (after lesson: it puts cnikit on the path)

VNI, PORT = 42, cnikit.VXLAN_PORT
BRIDGE, VXLAN = "br0", "vxlan0"
FLOOD = "00:00:00:00:00:00"          # the fdb entry for frames to unknown MACs (ARP broadcasts)
# Each node: its pod, the pod's address (one subnet stretched across both nodes), and
# in the sandbox its underlay address on the link the lesson creates between them.
NODES = {
    "node1": {"pod": "pod1", "pod_addr": "10.0.6.11/24", "underlay": "192.0.2.1/24"},
    "node2": {"pod": "pod2", "pod_addr": "10.0.6.12/24", "underlay": "192.0.2.2/24"},
}
# tcpdump filter: VXLAN on the underlay whose inner frame is IPv4 (EtherType at byte 28
# of the UDP datagram: 8 UDP + 8 VXLAN + 12) carrying ICMP (inner protocol, byte 39).
# It leaves out the pods' IPv6 chatter and keeps just the ping, request and reply.
CAPTURE = f"udp port {PORT} and udp[28:2] = 0x0800 and udp[39] = 1"
CAPTURE_WAIT = 1.0                   # seconds tcpdump gets to see request and reply
UNDERLAY_DEV = "eth0"                # in the sandbox; on real hosts, the route to the peer decides


def ip_of(cidr):
    return cidr.split("/")[0]


def other(role):
    return "node2" if role == "node1" else "node1"


LESSON = Lesson(
    "06", "vxlan",
    goal="pod1 on node1 reaches pod2 on node2 through vxlan0 (VNI 42): the frames cross "
         "the underlay inside UDP 4789, and each vxlan0 learned where the other pod lives",
    picture=r"""
            node1 (netns)                                 node2 (netns)
   +--------------------------------+          +--------------------------------+
   |  +---- pod1 -----------+       |          |       +---- pod2 -----------+  |
   |  | eth0 10.0.6.11/24   |       |          |       | eth0 10.0.6.12/24   |  |
   |  +---------|-----------+       |          |       +---------|-----------+  |
   |            | veth-pod1         |          |         veth-pod2 |            |
   |           br0 --- vxlan0       |          |       vxlan0 --- br0           |
   |        VNI 42, mtu = 1500 - 50 |          | VNI 42, udp 4789               |
   |                   |            |          |            |                   |
   |   eth0 192.0.2.1/24 ===========|=underlay=|=========== eth0 192.0.2.2/24   |
   +--------------------------------+          +--------------------------------+
""",
    skips={"vxlan": "no vxlan0: br0 has no way off the node, pod2 is unreachable",
           "fdb": "no flood entry: vxlan0 does not know where to send ARP for pod2; nothing crosses"},
    tools=("ip", "bridge", "ping"),
)


# ---------------------------------------------------------------- one node's half

def build_node(L, role, underlay_ip, peer_ip, underlay_dev, ns=None):
    """Everything ROLE's node needs: its pod on br0, and vxlan0 on br0 tunnelling to
    PEER_IP from UNDERLAY_IP over UNDERLAY_DEV. NS is the node's namespace in the
    sandbox, None on a real machine (the Vagrant VMs run exactly this)."""
    r, node = L.r, NODES[role]
    pod, veth = node["pod"], f"veth-{node['pod']}"
    where = f" on {ns}" if ns else ""
    # A pod's packet grows by 50 bytes on the underlay (its own Ethernet header 14 rides inside,
    # then VXLAN 8, UDP 8, outer IPv4 20): the overlay's MTU is the underlay's - 50.
    mtu = cnikit.underlay_mtu(r, underlay_dev, ns=ns) - cnikit.VXLAN_OVERHEAD

    L.step(f"{role}: its pod {pod} ({node['pod_addr']}) on a bridge{where}, MTU {mtu} so a full "
           "pod packet still fits in the tunnel")
    cnikit.netns_add(r, pod, lo_up=True)
    cnikit.bridge_add(r, BRIDGE, ns=ns)
    cnikit.veth_add(r, veth, "eth0", netns=pod, peer_addr=node["pod_addr"], mtu=mtu, ns=ns)
    cnikit.bridge_attach(r, BRIDGE, [veth], ns=ns)

    if not L.step(f"{role}: vxlan0 (VNI {VNI}, UDP {PORT}) from {underlay_ip} on {underlay_dev}, a port "
                  "of br0: frames the bridge sends into it leave as UDP on the underlay", skip="vxlan"):
        return
    cnikit.vxlan_add(r, VXLAN, VNI, local=underlay_ip, dev=underlay_dev, dstport=PORT,
                     bridge_name=BRIDGE, mtu=mtu, ns=ns)

    if L.step(f"{role}: the flood entry: frames for MACs vxlan0 does not know yet (ARP "
              f"broadcasts) go to the peer {peer_ip}", skip="fdb"):
        cnikit.vxlan_fdb_add(r, VXLAN, FLOOD, peer_ip, ns=ns)


def verify_pods(L, role, peer_ip, underlay_dev, ns=None, peer_node=None):
    """From ROLE's pod, ping the other node's pod; prove the frames were encapsulated
    (tcpdump on the underlay when installed, vxlan0's counters always) and that
    vxlan0 learned the remote pod's MAC behind PEER_IP (that pod's own MAC when
    PEER_NODE, the other node's namespace, can be looked at from here)."""
    r = L.r
    pod, target = NODES[role]["pod"], ip_of(NODES[other(role)]["pod_addr"])
    capture = None
    if have("tcpdump"):
        L.say(f"watch the underlay for UDP {PORT} while the pod pings. The filter keeps only the ping: "
              f"UDP {PORT} (VXLAN) whose inner frame is IPv4 (`udp[28:2] = 0x0800`: the EtherType, after "
              "8 bytes of UDP header, 8 of VXLAN header and 12 of inner MAC addresses) carrying ICMP "
              "(`udp[39] = 1`: the inner IPv4 header's protocol byte, 9 bytes into it); the pods' IPv6 "
              "chatter is left out")
        capture = r.spawn(in_netns(["tcpdump", "--immediate-mode", "-lni", underlay_dev, "-c", "2", CAPTURE], ns))
        if capture is not None and read_until(capture, "listening on", "stderr") is None:
            L.say("tcpdump did not start; the counters below are the proof")
    else:
        L.say("tcpdump (Debian package tcpdump) is not installed: vxlan0's counters are the proof")
    before = _counters(r, ns)
    L.check(f"{pod} on {role} reaches {target} on {other(role)}", L.ping(target, pod))
    after = _counters(r, ns)

    if capture is not None:
        out, _ = r.stop(capture, wait=CAPTURE_WAIT)
        r.output(out) if not r.quiet else None
        # tcpdump decodes UDP 4789 as VXLAN and prints the inner frame: the pod's own
        # ICMP echo, wrapped in UDP between the two underlay addresses.
        L.check(f"the underlay carried {pod}'s ping inside UDP {PORT} (VNI {VNI}) to {peer_ip}",
                f"> {peer_ip}.{PORT}: VXLAN" in out and f"vni {VNI}" in out and "ICMP echo request" in out)
    r.probe(ip("-s", "link", "show", "dev", VXLAN, ns=ns))
    L.check(f"vxlan0 sent and received packets during the ping (tx {before[0]}->{after[0]}, "
            f"rx {before[1]}->{after[1]})", after[0] > before[0] and after[1] > before[1])

    check_learned(L, role, peer_ip, ns, peer_node)


def check_learned(L, role, peer_ip, ns=None, peer_node=None):
    """ROLE's vxlan0 learned, from the ping, a MAC behind PEER_IP: the other pod's own
    eth0 MAC when PEER_NODE (the other node's namespace) can be looked at from here (the
    sandbox), any remote MAC otherwise (the other pod lives on another machine)."""
    r = L.r
    L.say(f"{role}'s vxlan0 forwarding table: `self` lines say behind which underlay address a MAC "
          f"lives (learned from the source of what arrived); {FLOOD} is the flood entry")
    _, fdb = r.probe(bridge("fdb", "show", "dev", VXLAN, ns=ns))
    learned = [line.split()[0] for line in fdb.splitlines()
               if f"dst {peer_ip}" in line and not line.startswith(FLOOD)]
    if peer_node is None:
        L.check(f"vxlan0 learned a remote MAC behind {peer_ip}", learned)
        if len(learned) > 1:
            L.say("more than one MAC behind the peer: besides its pod, the peer's own vxlan0 or br0 sent "
                  "frames of its own (IPv6 neighbour discovery and multicast reports when they came up)")
        return
    pod_ns = NODES[peer_node]["pod"]
    ok, link = r.probe(ip("-br", "link", "show", "dev", "eth0", ns=pod_ns))
    mac = link.split()[2] if ok and len(link.split()) > 2 else "?"
    L.check(f"{role}'s vxlan0 learned {pod_ns}'s MAC {mac} behind {peer_ip}", mac in learned)
    own = {(cnikit.get_link(r, dev, peer_node) or {}).get("address"): dev for dev in (VXLAN, BRIDGE)}
    for other_mac in learned:
        if other_mac != mac and other_mac in own:
            L.say(f"the other MAC behind {peer_ip}, {other_mac}, is {peer_node}'s {own[other_mac]} itself: "
                  "when it came up, its IPv6 sent neighbour discovery and multicast reports of its own, "
                  f"flooded to {role}, and vxlan0 learned their source like any other")


def _counters(r, ns):
    """(tx_packets, rx_packets) of vxlan0: a look-up, not a step."""
    data = r.query_json(ip("-s", "-j", "link", "show", "dev", VXLAN, ns=ns)) or [{}]
    stats = data[0].get("stats64", {})
    return stats.get("tx", {}).get("packets", 0), stats.get("rx", {}).get("packets", 0)


# ---------------------------------------------------------------- the sandbox: both nodes

def build(L):
    r = L.r
    L.step("two nodes, each a namespace standing for a machine, on one shared link: the "
           "underlay (documentation addresses 192.0.2.0/24)")
    for role in NODES:
        cnikit.netns_add(r, role, lo_up=True)
    cnikit.veth_add(r, UNDERLAY_DEV, UNDERLAY_DEV, netns="node2", addr=NODES["node1"]["underlay"],
                    peer_addr=NODES["node2"]["underlay"], ns="node1")
    for role in NODES:
        build_node(L, role, ip_of(NODES[role]["underlay"]), ip_of(NODES[other(role)]["underlay"]),
                   UNDERLAY_DEV, ns=role)


def verify(L):
    verify_pods(L, "node1", ip_of(NODES["node2"]["underlay"]), UNDERLAY_DEV, ns="node1", peer_node="node2")
    # node2 learned too, from the frames that came in: pod1's MAC behind node1.
    check_learned(L, "node2", ip_of(NODES["node1"]["underlay"]), ns="node2", peer_node="node1")


# ---------------------------------------------------------------- a real host: one node

def underlay_of(r, peer, dev=None):
    """(local address, device) this host uses to reach PEER: the route decides."""
    route = r.live.query_json(ip("-j", "route", "get", peer, *(["oif", dev] if dev else [])))
    if not route or not route[0].get("prefsrc"):
        raise cnikit.UsageError(f"no route to --peer {peer}{' via ' + dev if dev else ''}: "
                                "is the underlay network up?")
    return route[0]["prefsrc"], route[0]["dev"]


def role_picture(picture, role, local, dev, peer):
    """The picture with the real underlay: this host's device and address, the peer's
    address (its device is not known from here). The sandbox keeps its own picture."""
    mine, theirs = f"{dev} {local}", peer
    left, right = (mine, theirs) if role == "node1" else (theirs, mine)
    lines = picture.splitlines()
    names = {role: f"{role} (this host)", other(role): f"{other(role)} ({peer})"}
    lines[0] = ("   " + f"{names['node1']:^34}" + " " * 10 + f"{names['node2']:^34}").rstrip()
    for i, line in enumerate(lines):
        if "=underlay=" in line:
            lines[i] = "   |" + f"   {left} ".ljust(32, "=") + "|=underlay=|" + f" {right}   ".rjust(32, "=") + "|"
    return "\n".join(lines)


# The goal of one node's half on a real host (--role), and of its --verify: they name this
# node (ROLE), its pod (POD), the other node (OTHER), its pod (OTHER_POD) and its address (PEER).
HALF_GOAL = (f"{{role}}'s half is up: {{pod}} on br0, vxlan0 (VNI {VNI}) flooding to {{peer}}; then --verify, "
             "once {other} has its half, proves the overlay")
VERIFY_GOAL = (f"{{pod}} on {{role}} (this host) reaches {{other_pod}} on {{other}} ({{peer}}) through vxlan0 "
               f"(VNI {VNI}), inside UDP {PORT} on the underlay")


def run_role(args):
    """One node's half on this machine (no sandbox: the peer is another machine)."""
    role = args.role
    peer = cnikit.check_ip(args.peer, "--peer")
    args.host, args.keep = True, True           # the half must stay up for the peer
    keep_hint = f"sudo python3 {sys.argv[0]} --role {role} --peer {peer} --down"
    if args.down:
        L = LESSON.variant(keep_hint=keep_hint)
        L.start(dry_run=args.dry_run, quiet=args.quiet)
        return down_node(L, role)
    r = cnikit.Runner(dry_run=args.dry_run, quiet=True)
    local, dev = underlay_of(r, peer, args.underlay_dev)
    goal = (VERIFY_GOAL if args.verify else HALF_GOAL).format(
        role=role, pod=NODES[role]["pod"], other=other(role), other_pod=NODES[other(role)]["pod"], peer=peer)
    L = LESSON.variant(goal=goal, picture=role_picture(LESSON.picture, role, local, dev, peer), keep_hint=keep_hint)

    def build_half(L):
        L.say(f"this host is {role}: underlay {dev}, {local} -> peer {peer}")
        build_node(L, role, local, peer, dev)

    def verify_half(L):
        if args.verify:
            if not L.r.dry_run and not cnikit.netns_exists(NODES[role]["pod"]):
                raise cnikit.UsageError(f"{NODES[role]['pod']} does not exist: run this node's half "
                                        f"first (--role {role} --peer {peer})")
            return verify_pods(L, role, peer, dev)
        link = cnikit.get_link(L.r, VXLAN)
        L.check(f"vxlan0 is up, VNI {VNI}, a port of br0",
                link and "UP" in link.get("flags", []) and link.get("master") == BRIDGE
                and link["linkinfo"]["info_data"].get("id") == VNI)
        _, fdb = L.r.probe(bridge("fdb", "show", "dev", VXLAN))
        L.check(f"vxlan0 floods to the peer {peer}", f"{FLOOD} dst {peer}" in fdb)
        L.say(f"now run the other half on {other(role)}, then --verify here")

    return L.run((lambda L: None) if args.verify else build_half, verify_half, args, adopt=True)


def down_node(L, role):
    """Remove this node's half: the pod namespace (its veth goes with it), vxlan0, br0."""
    r = L.r
    try:
        cnikit.netns_del(r, NODES[role]["pod"])
        cnikit.vxlan_del(r, VXLAN)
        cnikit.bridge_del(r, BRIDGE)
    except cnikit.CnikitError as e:
        print(f"lesson 06: error: {e}", file=sys.stderr)
        return e.code
    return 0


# ---------------------------------------------------------------- Docker containers as the nodes

DOCKER_LABELS = {"org.cnikit.lesson": "06"}     # on everything --docker makes; removal goes by it
DOCKER_IMAGE = "cnikit-06-node:local"
DOCKER_NET, DOCKER_SUBNET = "cnikit-06", "192.0.2.0/24"
DOCKER_NODES = {"node1": "192.0.2.11", "node2": "192.0.2.12"}    # each container's underlay address
CHECKOUT = "/cnikit"                             # where the containers see this checkout, read-only
HALF_TIMEOUT = 120                               # seconds a node's half (a whole lesson run) may take
LESSON_IN_NODE = f"{CHECKOUT}/stages/{os.path.basename(__file__)}"


def container(role):
    return f"cnikit-06-{role}"


def docker_label():
    return ",".join(f"{key}={value}" for key, value in DOCKER_LABELS.items())


class DockerLesson(Lesson):
    """Lesson 06 on two Docker containers. Nothing here runs in a sandbox or needs root
    beyond the Docker daemon's socket: every change is docker's (image, network,
    containers), labelled DOCKER_LABELS and removed by that label at the end, whatever
    happened after the daemon was found reachable."""
    prepared = False

    def _prepare(self, build, on_host, adopt=False, state=None):
        self.prepared = False
        why = docker_image.cannot_use()
        if why:
            raise cnikit.UsageError(f"--docker: {why}")
        left = docker_image.leftovers(self.r, DOCKER_LABELS)
        if left:
            raise cnikit.UsageError(
                "--docker: an earlier run left " + ", ".join(f"{len(ids)} {what}" for what, ids in left.items())
                + f" labelled {docker_label()}: remove them with `{docker_down_hint()}`")
        self.prepared = True
        self.host_changes = (f"  docker image {DOCKER_IMAGE}, network {DOCKER_NET} ({DOCKER_SUBNET}; docker "
                             f"adds a bridge and its iptables rules for it), containers "
                             + ", ".join(container(role) for role in DOCKER_NODES)
                             + f", all labelled {docker_label()}")

    def show_state(self):
        """What exists now is docker's: the labelled containers, and each one's own picture."""
        self.say("")
        self.say(f"what really exists now: the containers labelled {docker_label()}, and in each, cnikit show")
        self.r.probe(["docker", "ps", "--filter", f"label={docker_label()}"])
        for role in DOCKER_NODES:
            self.r.probe(cnikit.docker_exec(container(role), "python3", f"{CHECKOUT}/cnikit.py", "show"))

    def _leave(self, args, keep):
        super()._leave(args, keep)
        if not self.prepared or keep or self.r.dry_run:
            return
        self.prepared = False
        # A second Ctrl-C must not cut the removal short (the docker clients it runs ignore it too).
        saved = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            self.r.note(f"remove what the lesson made: everything labelled {docker_label()}")
            left = docker_image.remove(self.r, DOCKER_LABELS)
        finally:
            signal.signal(signal.SIGINT, saved)
        if left:
            print("06_vxlan.py: warning: still there after removal: "
                  + ", ".join(f"{what} {' '.join(ids)}" for what, ids in left.items()), file=sys.stderr)


def docker_down_hint():
    """The command that removes what --docker left, as typed from where the learner is."""
    return f"python3 {os.path.relpath(os.path.abspath(__file__))} --docker --down"


DOCKER_LESSON = DockerLesson(
    "06", "vxlan-docker",
    goal="pod1 in container node1 reaches pod2 in container node2 through vxlan0 (VNI 42): the frames "
         "cross the docker network inside UDP 4789, and each vxlan0 learned where the other pod lives",
    picture=r"""
       container cnikit-06-node1                    container cnikit-06-node2
   +--------------------------------+          +--------------------------------+
   |  +---- pod1 -----------+       |          |       +---- pod2 -----------+  |
   |  | eth0 10.0.6.11/24   |       |          |       | eth0 10.0.6.12/24   |  |
   |  +---------|-----------+       |          |       +---------|-----------+  |
   |            | veth-pod1         |          |         veth-pod2 |            |
   |           br0 --- vxlan0       |          |       vxlan0 --- br0           |
   |        VNI 42, mtu = 1500 - 50 |          | VNI 42, udp 4789               |
   |                   |            |          |            |                   |
   |   eth0 192.0.2.11/24 ==========|=underlay=|========== eth0 192.0.2.12/24   |
   +--------------------------------+          +--------------------------------+
         the underlay: docker network cnikit-06 (192.0.2.0/24, --internal)
   image cnikit-06-node:local (docker import); /usr and this checkout mounted read-only
""",
    skips=LESSON.skips,
    tools=("docker",),
    keep_hint=docker_down_hint(),
)


def half_argv(role, color, skip=(), verify=False):
    """ROLE's half of the lesson, run inside its container: the same --role run as on a VM."""
    peer = DOCKER_NODES[other(role)]
    return cnikit.docker_exec(container(role), "python3", LESSON_IN_NODE, "--role", role, "--peer", peer,
                              *(["--color", "always"] if color else []),
                              *[a for name in sorted(skip) for a in ("--skip", name)],
                              *(["--verify"] if verify else []))


def docker_cleanup_trap(L):
    """A dry run's script removes what it made (by label) when it ends, as the live lesson does."""
    r = L.r
    if not r.dry_run or r.quiet or L.keep:
        return
    r.note(f"the script removes what it makes (everything labelled {docker_label()}) when it ends, even when "
           "a step fails or it is interrupted")
    r.output("cleanup() {\n" + "".join(f"  {line}\n" for line in docker_image.remove_script(DOCKER_LABELS))
             + f'  [ -z "${{{docker_image.SCRATCH}:-}}" ] || rm -rf "${docker_image.SCRATCH}"\n}}')
    r.output("trap cleanup EXIT; trap 'exit 129' HUP; trap 'exit 130' INT; trap 'exit 143' TERM")


def build_docker(L):
    r = L.r
    docker_cleanup_trap(L)
    L.step("an image of our own, with no registry: `docker import` of a tar holding a few empty "
           "directories and the links a merged /usr has (bin -> usr/bin, sbin, lib, lib64); the "
           "containers bind-mount this machine's /usr, so python3, ip, bridge, ping and tcpdump come from here")
    docker_image.build(r, DOCKER_IMAGE, DOCKER_LABELS)

    L.step(f"the underlay: a docker network of the lesson's own, {DOCKER_SUBNET} (documentation "
           "addresses), --internal: the containers reach each other and nothing beyond it")
    r.run(["docker", "network", "create", "--internal", "--subnet", DOCKER_SUBNET,
           *docker_image.label_args(DOCKER_LABELS), DOCKER_NET])

    L.step("the two nodes: a container each, at a fixed address on that network, with NET_ADMIN and "
           "SYS_ADMIN (for `ip netns add` and vxlan0; --privileged is more than needed), and this "
           "checkout read-only so each can run the lesson's own node half")
    for role, addr in DOCKER_NODES.items():
        r.run(docker_image.run_argv(DOCKER_IMAGE, container(role), DOCKER_LABELS, network=DOCKER_NET, ip=addr,
                                    hostname=role, mounts=[f"{ROOT}:{CHECKOUT}:ro"], cmd=docker_image.CMD))

    for role in DOCKER_NODES:
        L.step(f"{role}'s half inside its container, exactly what a VM runs (`--role {role} --peer "
               f"{DOCKER_NODES[other(role)]}`): its pod on br0, vxlan0 flooding to the other container")
        ok, _ = r.probe(half_argv(role, r.color, L.skipped), timeout=HALF_TIMEOUT)
        L.check(f"{role}'s half is up in {container(role)} (its own checks, above)", ok)


def verify_docker(L):
    r = L.r
    n1, n2 = DOCKER_NODES["node1"], DOCKER_NODES["node2"]
    L.say("from node1: pod1 pings pod2 while tcpdump watches node1's eth0, the underlay (node1's own "
          "--verify, as on a VM)")
    ok, _ = r.probe(half_argv("node1", r.color, L.skipped, verify=True), timeout=HALF_TIMEOUT)
    L.check(f"pod1 in {container('node1')} reaches pod2 in {container('node2')} through vxlan0, the ping "
            f"inside UDP {PORT} on the underlay ({n1} -> {n2}), vxlan0 learned a MAC behind {n2}", ok)
    L.say(f"and node2 learned too, from the frames that came in: pod1's own MAC behind {n1}")
    ok, link = r.probe(cnikit.docker_exec(container("node1"), *ip("-br", "link", "show", "dev", "eth0",
                                                                     ns="pod1")))
    mac = link.split()[2] if ok and len(link.split()) > 2 else "?"
    _, fdb = r.probe(cnikit.docker_exec(container("node2"), *bridge("fdb", "show", "dev", VXLAN)))
    learned = [line.split()[0] for line in fdb.splitlines() if f"dst {n1}" in line and not line.startswith(FLOOD)]
    L.check(f"node2's vxlan0 learned pod1's MAC {mac} behind {n1}", mac in learned)


def run_docker(args):
    """Lesson 06 with two Docker containers as the nodes."""
    L = DOCKER_LESSON
    if args.host:
        raise cnikit.UsageError("--docker and --host: the nodes are containers; nothing of the lesson runs "
                                "on this host itself")
    args.host = True                # docker and its daemon are on this host: no sandbox of ours
    if args.down:
        return docker_down(args)
    return L.run(build_docker, verify_docker, args)


def docker_down(args):
    """Remove everything labelled DOCKER_LABELS (what a killed --docker run left)."""
    r = cnikit.Runner(dry_run=args.dry_run, quiet=args.quiet)
    why = None if args.dry_run else docker_image.cannot_use()
    if why:
        raise cnikit.UsageError(f"--docker: {why}")
    left = docker_image.remove(r, DOCKER_LABELS)
    if left:
        print("06_vxlan.py: error: still there after removal: "
              + ", ".join(f"{what} {' '.join(ids)}" for what, ids in left.items()), file=sys.stderr)
        return 1
    return 0


def main():
    p = LESSON.parser()
    g = p.add_argument_group("two real hosts (e.g. the Vagrant VMs): each runs its own half, no sandbox")
    g.add_argument("--role", choices=list(NODES), help="build only this node's half on this machine")
    g.add_argument("--peer", metavar="IP", help="the other node's underlay address")
    g.add_argument("--underlay-dev", metavar="DEV", help="default: the interface of the route to --peer")
    g.add_argument("--verify", action="store_true",
                   help="after both halves are up: ping the other pod and prove the encapsulation")
    g.add_argument("--down", action="store_true", help="remove this node's half (with --docker: what an "
                   "earlier --docker run left)")
    d = p.add_argument_group("Docker containers as the nodes (the original series' way)")
    d.add_argument("--docker", action="store_true",
                   help="make a local image, a docker network and two containers, run each node's half inside "
                        "its container (docker exec ... --role), prove the overlay, remove all it made")
    args = p.parse_args()
    if args.docker:
        if args.role or args.peer or args.underlay_dev or args.verify:
            p.error("--docker runs both halves itself: no --role, --peer, --underlay-dev or --verify")
        try:
            return run_docker(args)
        except cnikit.UsageError as e:
            print(f"{p.prog}: error: {e}", file=sys.stderr)
            return e.code
    if not args.role:
        if args.peer or args.underlay_dev or args.verify or args.down:
            p.error("--peer, --underlay-dev, --verify and --down go with --role node1|node2 (--down also "
                    "with --docker)")
        return LESSON.run(build, verify, args)
    if not args.peer:
        p.error("--role needs --peer IP: the other node's underlay address")
    try:
        return run_role(args)
    except cnikit.UsageError as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return e.code


if __name__ == "__main__":
    sys.exit(main())
