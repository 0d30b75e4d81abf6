#!/usr/bin/env python3
"""Lesson 07: be kubelet's container runtime and call our CNI plugin the way it does.

    sudo python3 stages/07_cni.py              # in a throwaway sandbox
    python3 stages/07_cni.py --dry-run         # the lesson as a shell script
    sudo python3 stages/07_cni.py --kind demo  # the classic kind flow (needs kind, docker, kubectl)
    sudo python3 stages/07_cni.py --kind-like  # the same on podman containers standing in for kind's nodes
"""
import contextlib
import ipaddress
import json
import os
import sys
from dataclasses import dataclass, field

from lesson import ROOT, Lesson, Pods, cnikit, ip, nft_view, plugin_host_ends
import kindlike  # the stand-in nodes (after lesson, which puts cnikit on sys.path); tests use it too

SUBNET, GATEWAY = "10.244.0.0/24", "10.244.0.1"
PODS = ("pod1", "pod2")
KIND_YAML = os.path.join(ROOT, "kind.yaml")
KIND_POD = "web"
KIND_IMAGE = "busybox:1.36"
KIND_LIKE_CONF = cnikit.cni_conf_file(cnikit.CNI_CONF_DIR, cnikit.CNI_NET)
KIND_LIKE_PLUGIN = os.path.join(cnikit.CNI_PLUGIN_DIR, cnikit.CNI_TYPE)


LESSON = Lesson(
    "07", "cni",
    goal="as a container runtime, we ADD two pods with our CNI plugin: each gets an address from "
         "10.244.0.0/24, they reach each other and the gateway, CHECK agrees, and DEL leaves nothing of "
         "the pods (cni0, the node's bridge, stays for the next pod)",
    picture=r"""
   kubelet -> runtime (here: cnikit cni) -> plugin /opt/cni/bin/cnikit  (config /etc/cni/net.d/10-cnikit.conflist)
        CNI_COMMAND=ADD CNI_CONTAINERID=pod1 CNI_NETNS=/run/netns/pod1 CNI_IFNAME=eth0 ... < config
   +---------------------------------- node ----------------------------------+
   |                  cni0  10.244.0.1/24  (the pods' gateway)                |
   |                 /                                  \                     |
   |      veth<hash> (the plugin names it)        veth<hash>                  |
   +-------------|---------------------------------------|-------------------+
   +----------- pod1 ------------+          +----------- pod2 ------------+
   |  eth0  10.244.0.x/24        |          |  eth0  10.244.0.y/24        |
   |  default via 10.244.0.1     |          |  default via 10.244.0.1     |
   +-----------------------------+          +-----------------------------+
""",
    skips={"install": "no plugin of type cnikit in CNI_PATH: ADD fails, as kubelet reports "
                      "'failed to find plugin', and the pods get no network"},
    tools=("ip", "ping", "iptables"),
    # what the plugin's ADD does besides what the lesson runs: the bridge, forwarding, its
    # address files and its log
    indirect={"links": ["cni0"], "sysctls": ["net.ipv4.ip_forward"],
              "paths": [os.path.join(cnikit.CNI_DATA_DIR, cnikit.CNI_NET), cnikit.CNI_LOG]},
    state=Pods,             # what ADD returned for each pod
)


def call(L, pod):
    """The attachment kubelet's runtime would make for POD (a dry run plans with the config
    install would have written)."""
    path = cnikit.cni_conf_file(cnikit.CNI_CONF_DIR, cnikit.CNI_NET)
    net = cnikit.cni_parse(json.dumps(cnikit.cni_conflist(subnet=SUBNET)).encode(), path) if L.r.dry_run else None
    return cnikit.CniCall(pod, conf=path, net=net, args=f"K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod}",
                          print_result=not L.r.quiet)


def build(L, pods):
    r = L.r
    if L.step("install the plugin where every runtime looks: the program in /opt/cni/bin under the "
              "`type` name its config uses, the config in /etc/cni/net.d (both written to a temp file, "
              "then renamed: a runtime must never read half a file)", skip="install"):
        cnikit.cni_install(r, subnet=SUBNET)
    else:
        conf = json.dumps(cnikit.cni_conflist(subnet=SUBNET), indent=2) + "\n"
        cnikit.write_file_atomic(r, cnikit.cni_conf_file(cnikit.CNI_CONF_DIR, cnikit.CNI_NET), conf)

    L.step("kubelet asks the runtime for a pod sandbox: the runtime creates its network namespace "
           "(and brings lo up, as containerd does with the loopback plugin)")
    cnikit.netns_add(r, "pod1", lo_up=True)

    L.step("VERSION: which spec versions does the plugin speak? (podman asks before every ADD and DEL; "
           "containerd, kubelet's runtime, goes straight to ADD)")
    _try(L, cnikit.cni_version, "pod1")

    L.step("ADD: the runtime sets CNI_COMMAND, CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME, CNI_ARGS, CNI_PATH, "
           "pipes the config into the plugin, and keeps the result it prints (the pod's IP) in "
           "/var/lib/cni/results so CHECK and DEL get it back as prevResult")
    pods["pod1"] = _try(L, cnikit.cni_add, "pod1")

    L.step("the plugin's side of it: its log of that ADD (the call, its CNI_* env and stdin, each "
           "netlink request it made, the result it printed)")
    if not r.dry_run and os.path.exists(cnikit.cni_log_path()):
        cnikit.cni_log(r, lines=_last_call_lines(cnikit.cni_log_path()), follow=False)
    elif not r.dry_run:
        L.say("    (no log: the plugin never ran)")

    L.step("and its masquerade (ipMasq): one nat chain per pod, jumped to from POSTROUTING for the pod's "
           "address: traffic to the pod subnet stays as it is, the rest leaves with the node's address")
    r.show(cnikit.iptables("-t", "nat", "-S"))
    nft_view(L, "nat", cnikit.CHAIN_PREFIX + "*", "the same rules as nf_tables holds them (iptables here is "
             "iptables-nft): the table ip nat, the plugin's chain among its chains")

    L.step("inside the pod: the interface the plugin created there as eth0, its address and routes")
    if not r.dry_run and "eth0" not in (cnikit.get_link(r, "eth0", "pod1") or {}).get("ifname", ""):
        L.say("    pod1 has no eth0")
    else:
        r.show(ip("-br", "addr", "show", "dev", "eth0", ns="pod1"))
        r.show(ip("route", "show", ns="pod1"))

    L.step("a second pod, the same way: it gets the next address of the node's subnet")
    cnikit.netns_add(r, "pod2", lo_up=True)
    pods["pod2"] = _try(L, cnikit.cni_add, "pod2")


def _last_call_lines(path):
    """How many lines at the end of the plugin's log its last call wrote (from its `===` line)."""
    with open(path, errors="replace") as f:
        lines = f.read().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("=== ")]
    return len(lines) - starts[-1] if starts else len(lines)


def _try(L, verb, pod):
    """Run a runtime verb; a plugin failure is the lesson's FAIL, not a crash."""
    try:
        return verb(L.r, call(L, pod))
    except cnikit.CnikitError as e:
        L.say(f"    the runtime reports: {e}")
        return None


def leftovers(r, ends, pods=PODS):
    """What our plugin could leave on the node of PODS after DEL: the host ends it made (ENDS,
    from its records and results: a Docker host's own ports are named veth... too), its records,
    address files, cached results, its iptables chains."""
    left = [end for end in ends if cnikit.get_link(r, end)]
    left += [f"attachment record of {end}" for end in plugin_host_ends(None, pods, cnikit.CNI_NET)]
    net_dir = os.path.join(cnikit.CNI_DATA_DIR, cnikit.CNI_NET)
    left += [f"address file {f}" for f in (os.listdir(net_dir) if os.path.isdir(net_dir) else []) if f[0].isdigit()]
    left += [f"cached result {path}" for path in (cnikit.cni_cache_path(cnikit.CNI_NET, pod, "eth0") for pod in pods)
             if os.path.exists(path)]
    for table in ("nat", "filter"):        # masquerade; FORWARD accepts where the policy is DROP
        ok, rules = r.query(cnikit.iptables("-t", table, "-S"))
        left += [line for line in rules.splitlines() if ok and cnikit.CHAIN_PREFIX in line]
    return left


def verify(L, pods):
    r = L.r
    a, b = pods.ip("pod1"), pods.ip("pod2")
    L.check(f"the plugin gave pod1 an address in {SUBNET} ({a})", ipaddress.ip_address(a or "0.0.0.0") in
            ipaddress.ip_network(SUBNET) if a else False)
    L.check(f"pod2 got another one in {SUBNET} ({b})",
            bool(b) and a != b and ipaddress.ip_address(b) in ipaddress.ip_network(SUBNET))
    L.check("pod1 reaches pod2", bool(b) and L.ping(b, "pod1"))
    L.check("pod2 reaches pod1", bool(a) and L.ping(a, "pod2"))
    L.check(f"pod1 reaches its gateway {GATEWAY} on cni0", L.ping(GATEWAY, "pod1"))
    L.say("CHECK: the runtime hands the cached result back; the plugin verifies it is all still there")
    L.check("CHECK agrees for pod1", _try(L, cnikit.cni_check, "pod1") is True)
    L.explore("then the lesson DELs both pods, and everything goes")
    if L.keeps_on_host():
        return
    L.say("DEL both pods (the chain in reverse, with prevResult), as kubelet does when a pod is deleted")
    ends = [] if r.dry_run else plugin_host_ends(pods, PODS, cnikit.CNI_NET)
    for pod in PODS:
        _try(L, cnikit.cni_del, pod)
    if not r.dry_run:
        left = leftovers(r, ends)
        L.check("nothing is left on the node: no veth, address file, cached result or iptables chain",
                not left, ", ".join(left))
        L.check("the pods' eth0 went with DEL", not any(cnikit.get_link(r, "eth0", pod) for pod in PODS))
        L.say("cni0 stays: it is the node's, shared by every pod on it; a DEL cannot know that no other "
              "pod is about to be added (runtimes call in parallel), so, like the reference bridge "
              "plugin, ours never deletes it")


# ---------------------------------------------------------------- the classic kind flow

@dataclass
class Cluster:
    """The kind flows' state: the cluster's NAME (--kind, --kind-like), what goes when the lesson
    ends (CLEANUP: podman's store, the stand-in nodes), and --kind-like's NODES and each node's
    pod address once ADD gave it one (ADDRS)."""
    name: str
    cleanup: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    nodes: list = field(default_factory=list)
    addrs: dict = field(default_factory=dict)


KIND_LESSON = Lesson(
    "07", "cni-kind",
    goal="a kind cluster without CNI keeps a pod Pending; after `cnikit cni kind-install` the pod runs "
         "with an address from our plugin",
    picture=r"""
   docker: kind nodes (containers)  <cluster>-control-plane, <cluster>-worker
     kubelet -> containerd (CRI) -> /opt/cni/bin/cnikit  (python3 added to the node)
     each node: /run/cnikit/subnet.env = its spec.podCIDR; routes to the other nodes' pods
""",
    tools=("kind", "docker", "kubectl"),
    state=Cluster,
)


def kubectl(cluster, *args):
    return cnikit.kubectl(cluster.name, *args)


def build_kind(L, cluster):
    r = L.r
    c = cluster.name
    L.step("a cluster whose nodes have no CNI plugin at all (kind.yaml: disableDefaultCNI: true)")
    ok, out = r.query(["kind", "get", "clusters"])
    if ok and c in out.split():
        r.note(f"kind cluster {c} already exists")
    else:
        r.run(["kind", "create", "cluster", "--name", c, "--config", KIND_YAML],
              creates=cnikit.Change("cluster", c, undo=["kind", "delete", "cluster", "--name", c]))
    L.step("a pod: the scheduler has nowhere to put it (nodes are NotReady: 'cni plugin not initialized')")
    r.run(kubectl(cluster, "run", KIND_POD, f"--image={KIND_IMAGE}", "--restart=Never", "--", "sleep", "3600"))
    r.probe(kubectl(cluster, "get", "nodes"))
    r.probe(kubectl(cluster, "get", "pod", KIND_POD, "-o", "wide"))
    L.step("install our plugin into every node (python3 first: kind node images carry none)")
    cnikit.kind_install(r, c)
    L.step("kubelet notices the config, the node turns Ready, containerd calls our plugin for the pod")
    r.probe(kubectl(cluster, "wait", "--for=condition=Ready", f"pod/{KIND_POD}", "--timeout=180s"), timeout=200)
    r.probe(kubectl(cluster, "get", "pod", KIND_POD, "-o", "wide"))


def verify_kind(L, cluster):
    r = L.r
    ok, phase = r.probe(kubectl(cluster, "get", "pod", KIND_POD, "-o", "jsonpath={.status.phase}"))
    L.check("the pod is Running", ok and phase.strip() == "Running", phase)
    ok, pod_ip_ = r.probe(kubectl(cluster, "get", "pod", KIND_POD, "-o", "jsonpath={.status.podIP}"))
    ok2, node = r.probe(kubectl(cluster, "get", "pod", KIND_POD, "-o", "jsonpath={.spec.nodeName}"))
    ok3, cidr = r.probe(kubectl(cluster, "get", "node", node.strip(), "-o", "jsonpath={.spec.podCIDR}"))
    inside = False
    try:
        inside = ipaddress.ip_address(pod_ip_.strip()) in ipaddress.ip_network(cidr.strip())
    except ValueError:
        pass
    L.check(f"its address {pod_ip_.strip()} comes from its node's podCIDR {cidr.strip()} (our plugin)", inside)
    ok, log = r.probe(["docker", "exec", node.strip(), "tail", "-n", "5", cnikit.CNI_LOG])
    L.check("our plugin's log on the node shows the ADD", ok and "ADD" in log)


# ---------------------------------------------------------------- kind-like: podman nodes, kubelet played

KIND_LIKE_LESSON = Lesson(
    "07", "cni-kind-like",
    goal="on containers standing in for a kind cluster's nodes, `cnikit cni kind-install` puts our plugin "
         "in every node; with kubelet's part played inside each node, pods get their node's podCIDR, reach "
         "their gateway and the pods of the other node (rp_filter=1) without NAT, and DEL leaves nothing",
    picture=r"""
   docker = podman here; the nodes are podman containers standing in for kind's (no kind, no node image)
   +----- <c>-control-plane (container) ------+    +--------- <c>-worker (container) ---------+
   | kubelet's part, played: netns web-0,     |    | netns web-1, ADD through the same        |
   |   ADD through 10-cnikit.conflist         |    |   conflist, K8S_POD_* in CNI_ARGS        |
   | pod web-0 eth0 10.244.0.x                |    | pod web-1 eth0 10.244.1.x                |
   |   cni0 10.244.0.1 (our plugin's bridge)  |    |   cni0 10.244.1.1 (our plugin's bridge)  |
   | route 10.244.1.0/24 via <worker>         |    | route 10.244.0.0/24 via <control-plane>  |
   | /opt/cni/bin: host-local loopback ptp    |    | rp_filter=1; python3 (the derived        |
   |   portmap, + cnikit (kind-install)       |    |   image's case: stock kind has none)     |
   +------------------ eth0 ------------------+    +------------------ eth0 ------------------+
                         \________ podman network "kind" (as docker's "kind") ________/
""",
    tools=("podman", "runc", "ip", "socat"),
    state=Cluster,
)
KIND_LIKE_PODS = ("web-0", "web-1")
ECHO_PORT = 8080
NODE_PING = ("ping", "-c", "2", "-i", "0.2", "-W", "2")   # across two bridges and a container runtime: a little slack


def build_kind_like(L, cluster):
    r = L.r
    c = cluster.name
    L.step("podman with a store of its own inside this sandbox, and `docker` being podman (a wrapper on "
           "PATH, what Debian's podman-docker installs): kind-install speaks docker, as to real kind nodes")
    if r.dry_run:
        r.note("as a script: give podman a store of its own (CONTAINERS_STORAGE_CONF) and put a `docker` that "
               "execs podman on PATH (Debian's podman-docker) first")
    else:
        cluster.cleanup.enter_context(kindlike.podman_as_docker("k07"))
        cluster.cleanup.callback(kindlike.down, cnikit.Runner(quiet=True), c)
    L.step("the stand-ins: a container per node, labelled as kind labels its nodes, privileged, on one shared "
           "network, its filesystem an overlay of this machine's (--rootfs /:O); inside, what a kind node "
           "image has: only host-local, loopback, ptp, portmap in /opt/cni/bin, rp_filter=1 (python3 kept: "
           "this is the derived image's case, kind/Dockerfile)")
    cluster.nodes = kindlike.up(r, c, workers=1)
    L.step("install our plugin into every node, exactly as on a real kind cluster (`make kind-cni`): the plugin "
           "(compiled in each node by the node's own python3: its bytecode may not be this machine's), "
           "the node's podCIDR in subnet.env, one conflist whose nonMasqueradeCIDRs is the cluster's pod range "
           "(no NAT between pods, as kindnet), and routes between the nodes' pod subnets")
    cnikit.kind_install(r, c)
    L.step("what a node now holds: the conflist kubelet's runtime will read, and the route to the other node's pods")
    r.show(cnikit.docker_exec(cluster.nodes[0], "cat", KIND_LIKE_CONF))
    r.show(cnikit.docker_exec(cluster.nodes[0], "ip", "route"))
    L.step("kubelet's part, played by hand (real kind: kubelet asks containerd over CRI): on each node "
           "containerd's RunPodSandbox makes the pod's network namespace and calls the plugin through the "
           "installed conflist, CNI_ARGS carrying K8S_POD_NAMESPACE/NAME/INFRA_CONTAINER_ID/UID; here "
           "cnikit's runtime verbs, copied into the node, make that call")
    for node, pod in zip(cluster.nodes, KIND_LIKE_PODS):
        kindlike.install_runtime(r, node)
        cluster.addrs[node] = kindlike.pod_add(r, node, pod, KIND_LIKE_CONF)


def verify_kind_like(L, cluster):
    r = L.r
    nodes, pods, addr = cluster.nodes, dict(zip(cluster.nodes, KIND_LIKE_PODS)), cluster.addrs
    plan = {node: cnikit.kind_pod_cidr(cnikit.Runner(quiet=True), cluster.name, node, i)
            for i, node in enumerate(nodes)}
    for node in nodes:
        inside = bool(addr[node]) and ipaddress.ip_address(addr[node]) in ipaddress.ip_network(plan[node])
        L.check(f"{pods[node]} on {node} got {addr[node] or 'no address'} from the node's podCIDR {plan[node]}",
                inside)
        gateway = str(ipaddress.ip_network(plan[node])[1])
        L.check(f"{pods[node]} reaches its gateway {gateway} (cni0 on {node})", r.probe(
            cnikit.docker_exec(node, "ip", "netns", "exec", pods[node], *NODE_PING, gateway))[0])
        ok, rp = r.query(cnikit.docker_exec(node, "sysctl", "-n", "net.ipv4.conf.all.rp_filter"))
        L.check(f"{node} filters by reverse path (rp_filter=1), as kind's nodes do", ok and rp.strip() == "1")
    L.say("each pod answers TCP with the address a connection came from (socat): the far side's own view")
    for node in nodes:
        kindlike.serve_peer_address(r, node, pods[node], ECHO_PORT)
    for node in nodes:
        for other in nodes:
            if other == node:
                continue
            L.check(f"{pods[node]} ({node}) reaches {pods[other]} ({other}) through kind-install's route",
                    bool(addr[other]) and r.probe(cnikit.docker_exec(
                        node, "ip", "netns", "exec", pods[node], *NODE_PING, addr[other]))[0])
            seen = kindlike.peer_address_seen(r, node, pods[node], addr[other], ECHO_PORT) if addr[other] else ""
            L.check(f"no NAT between pods: {pods[other]} sees {pods[node]}'s own address {addr[node]}",
                    bool(seen) and seen == addr[node], f"it saw {seen or 'nothing'}")
    L.say("kubelet deletes the pods: containerd DELs with the netns and the cached result (StopPodSandbox), "
          "then again without either (RemovePodSandbox)")
    for node in nodes:
        ends = [] if r.dry_run else kindlike.node_host_ends(r, node)
        kindlike.pod_del(r, node, pods[node], KIND_LIKE_CONF)
        if not r.dry_run:
            left = kindlike.node_leftovers(r, node, ends=ends)
            L.check(f"nothing is left on {node}: no veth, address file, cached result or nat chain",
                    not left, ", ".join(left))
    L.say("and our CNI goes from every node again")
    cnikit.kind_uninstall(r, cluster.name)
    if not r.dry_run:
        L.check("uninstall --kind left no plugin, conflist, subnet file or pod route on any node",
                all(kindlike.node_plugin(r, n, p) is None for n in nodes
                    for p in (KIND_LIKE_CONF, cnikit.NODE_SUBNET_FILE, KIND_LIKE_PLUGIN))
                and not any(dst in plan.values() for n in nodes for dst in kindlike.node_routes(r, n)))


def run_kind_like(args):
    if args.host:
        raise cnikit.UsageError("--kind-like runs in its sandbox only: the stand-in nodes and their network "
                                "live there (without --host)")
    reason = None if args.dry_run else kindlike.cannot_run()
    if reason:
        raise cnikit.UsageError(f"--kind-like needs podman: {reason}")
    cluster = Cluster(args.kind_like)
    with cluster.cleanup:
        return KIND_LIKE_LESSON.run(build_kind_like, verify_kind_like, args, state=cluster)


def main():
    p = LESSON.parser()
    p.add_argument("--kind", metavar="CLUSTER", help="run the classic kind flow on this machine instead "
                   "(needs kind, docker, kubectl; the cluster is deleted at the end unless --keep)")
    p.add_argument("--kind-like", metavar="CLUSTER", nargs="?", const="cnikit",
                   help="the kind flow on podman containers standing in for kind's nodes, kubelet's part "
                        "played inside them, in the sandbox (needs podman, runc, containernetworking-plugins)")
    args = p.parse_args()
    if args.kind:
        args.host = True                 # docker and kind live on the real host
        raise SystemExit(KIND_LESSON.run(build_kind, verify_kind, args, state=Cluster(args.kind)))
    if args.kind_like:
        try:
            raise SystemExit(run_kind_like(args))
        except cnikit.UsageError as e:
            print(f"{os.path.basename(__file__)}: error: {e}", file=sys.stderr)
            raise SystemExit(2)
    raise SystemExit(LESSON.run(build, verify, args))


if __name__ == "__main__":
    main()
