"""Containers that stand in for a kind cluster's nodes, where neither kind nor its node
image can be fetched (shared/notes/runtimes.md, "Containers that stand in for kind nodes").
Used by `stages/07_cni.py --kind-like` and by tests/test_cni_kind_nodes.py.

A node is `podman run -d --privileged --label io.x-k8s.kind.cluster=NAME --name NAME-worker
--network NET --rootfs /:O sleep infinity` (every option before `--rootfs /:O`; what follows
it is the command): its filesystem is an overlay of this machine's, so writes and deletions
stay in the node. It is then made to look like a kind node: /opt/cni/bin holds only
host-local, loopback, ptp and portmap (no bridge, nothing in /usr/lib/cni), /etc/cni/net.d
and the CNI state are empty, rp_filter=1, and the "stock" variant has no python3.

The nodes share one podman network, as kind's nodes share the docker network `kind`. It is
--internal: no gateway, no masquerade, no default route in the nodes, so nothing in a node
can send a packet beyond the network the sandbox holds (a node's apt finds no mirror).

`docker` is podman: a two-line script on PATH, what Debian's podman-docker installs as
/usr/bin/docker, so every docker command `cnikit cni kind-install` prints runs for real.

Podman keeps everything (store, run root, tmp, its network configs) in a scratch dir on a
tmpfs of the sandbox's private mount namespace (and the sandbox's private /etc/cni):
nothing touches this machine's podman store.
"""
import contextlib
import hashlib
import json
import os
import shutil
import signal
import time

import cnikit
import sandbox_runtime as runtime

NETWORK = "kind"                                       # the docker network kind's nodes share
NODE_PLUGINS = ("host-local", "loopback", "ptp", "portmap")   # what kind's node image carries
REF_PLUGIN_DIR = "/usr/lib/cni"                        # Debian's containernetworking-plugins
NODE_RUNTIME = "/usr/local/bin/cnikit"                 # cnikit.py in the node, playing containerd
POD_NAMESPACE = "default"
ECHO_PEER = "SYSTEM:echo $SOCAT_PEERADDR"              # socat: answer with the address it came from
STORAGE_CONF = '[storage]\ndriver = "overlay"\ngraphroot = "{0}/root"\nrunroot = "{0}/runroot"\n'
DOCKER_WRAPPER = '#!/bin/sh\n# docker is podman here (as Debian\'s podman-docker)\nexec podman "$@"\n'


def cannot_run():
    """Why kind-like nodes cannot be made on this machine (None when they can)."""
    for tool, pkg in (("podman", "podman"), ("runc", "runc")):
        if not shutil.which(tool):
            return f"{tool} is not installed (apt-get install {pkg})"
    missing = [p for p in NODE_PLUGINS if not os.path.exists(os.path.join(REF_PLUGIN_DIR, p))]
    if missing:
        return f"{REF_PLUGIN_DIR} lacks {', '.join(missing)} (apt-get install containernetworking-plugins)"
    return None


def node_names(cluster, workers=2):
    """kind's names: NAME-control-plane, NAME-worker, NAME-worker2, ..."""
    return [f"{cluster}-control-plane"] + [f"{cluster}-worker{i + 1 if i else ''}" for i in range(workers)]


def node_run_argv(cluster, node, network=NETWORK):
    return ["podman", "run", "-d", "--privileged", "--label", f"{cnikit.KIND_NODE_LABEL}={cluster}",
            "--name", node, "--hostname", node, "--network", network, "--rootfs", "/:O", "sleep", "infinity"]


def node_prepare_argvs(node, python=True):
    """The commands that make NODE look like a kind node (docker exec, i.e. podman)."""
    ex = lambda *argv: cnikit.docker_exec(node, *argv)  # noqa: E731
    argvs = [ex("sysctl", "-q", "-w", "net.ipv4.conf.all.rp_filter=1", "net.ipv4.conf.default.rp_filter=1"),
             # this machine's CNI files and state are not a fresh kind node's
             ex("rm", "-rf", "/etc/cni/net.d", "/opt/cni/bin", "/var/lib/cni", "/run/cnikit", cnikit.CNI_LOG),
             ex("mkdir", "-p", "/etc/cni/net.d", "/opt/cni/bin"),
             ex("cp", *[os.path.join(REF_PLUGIN_DIR, p) for p in NODE_PLUGINS], "/opt/cni/bin/"),
             ex("rm", "-rf", REF_PLUGIN_DIR)]
    if not python:
        pythons = sorted(f for f in os.listdir("/usr/bin") if f.startswith("python3"))
        argvs.append(ex("rm", "-f", *[os.path.join("/usr/bin", f) for f in pythons]))
    return argvs


def up(r, cluster, workers=2, python=True, network=NETWORK):
    """The network and the nodes, made through runner R (so a lesson shows every command).
    Returns the node names."""
    r.run(["podman", "network", "create", "--internal", network])
    nodes = node_names(cluster, workers)
    for node in nodes:
        r.run(node_run_argv(cluster, node, network))
        for argv in node_prepare_argvs(node, python):
            r.run(argv)
    return nodes


def install_runtime(r, node):
    """cnikit.py in NODE: inside the node it plays containerd (netns, CNI calls, result cache).
    Our plugin's source goes beside it, as in a checkout: cnikit reads how a cniVersion reads
    from the plugin it ships (cnikit.cni_plugin)."""
    r.run(cnikit.docker("cp", os.path.abspath(cnikit.__file__),
                        f"{node}:{NODE_RUNTIME}"))
    plugins = os.path.join(os.path.dirname(NODE_RUNTIME), "plugins")
    r.run(cnikit.docker_exec(node, "mkdir", "-p", plugins))
    r.run(cnikit.docker("cp", cnikit.CNI_PLUGIN_SRC, f"{node}:{plugins}/{os.path.basename(cnikit.CNI_PLUGIN_SRC)}"))


def node_runtime(node, *args):
    """argv: cnikit's runtime verbs run inside NODE, where kind's containerd would call CNI."""
    return cnikit.docker_exec(node, "python3", NODE_RUNTIME, *args)


def sandbox_id(node, pod):
    """A 64-hex pod sandbox id, as containerd's CRI gives every pod (CNI_CONTAINERID)."""
    return hashlib.sha256(f"{node}/{pod}".encode()).hexdigest()


def pod_args(node, pod):
    """CNI_ARGS as kubelet's containerd sends them (K8S_POD_*; cnikit adds IgnoreUnknown=1)."""
    uid = hashlib.sha256(f"uid/{node}/{pod}".encode()).hexdigest()
    uid = f"{uid[:8]}-{uid[8:12]}-{uid[12:16]}-{uid[16:20]}-{uid[20:32]}"
    return (f"K8S_POD_NAMESPACE={POD_NAMESPACE};K8S_POD_NAME={pod};"
            f"K8S_POD_INFRA_CONTAINER_ID={sandbox_id(node, pod)};K8S_POD_UID={uid}")


def pod_add(r, node, pod, conf):
    """RunPodSandbox on NODE: a network namespace (lo up), then ADD through the installed
    conflist CONF. Returns the pod's IPv4 address ("" when it got none)."""
    r.run(cnikit.docker_exec(node, "ip", "netns", "add", pod))
    r.run(cnikit.docker_exec(node, "ip", "-n", pod, "link", "set", "lo", "up"))
    r.run(node_runtime(node, "cni", "add", pod, "--id", sandbox_id(node, pod), "--conf", conf,
                       "--args", pod_args(node, pod)))
    return pod_address(r, node, pod)


def pod_address(r, node, pod):
    found = r.query_json(cnikit.docker_exec(node, "ip", "-n", pod, "-j", "-4", "addr", "show", "dev", "eth0")) or []
    return next((a["local"] for link in found for a in link.get("addr_info", [])), "")


def pod_stop(r, node, pod):
    """kubelet stops the pod's containers first: here, whatever runs in its namespace."""
    ok, pids = r.query(cnikit.docker_exec(node, "ip", "netns", "pids", pod))
    if ok and pids.split():
        r.run(cnikit.docker_exec(node, "kill", *pids.split()), check=False)


def pod_del(r, node, pod, conf, netns_first=False):
    """As containerd's CRI: StopPodSandbox DELs with the netns and the cached result
    (prevResult), the netns goes, RemovePodSandbox DELs again with CNI_NETNS="" and no
    prevResult. NETNS_FIRST: the netns is already gone (a node restart), only the second DEL."""
    pod_stop(r, node, pod)
    cid = sandbox_id(node, pod)
    if not netns_first:
        r.run(node_runtime(node, "cni", "del", pod, "--id", cid, "--conf", conf, "--args", pod_args(node, pod)))
    r.run(cnikit.docker_exec(node, "ip", "netns", "del", pod))
    r.run(node_runtime(node, "cni", "del", "", "--id", cid, "--conf", conf, "--args", pod_args(node, pod)))


def serve_peer_address(r, node, pod, port, udp=False):
    """A listener in POD that answers each connection (or datagram) with the address it came
    from: what the far side really sees. It ends by itself after two minutes at most."""
    listen = f"UDP4-RECVFROM:{port},fork" if udp else f"TCP4-LISTEN:{port},fork,reuseaddr"
    r.run(cnikit.docker("exec", "-d", node, "ip", "netns", "exec", pod, "timeout", "120",
                        "socat", listen, ECHO_PEER))


def peer_address_seen(r, node, pod, addr, port, udp=False, wait=20.0, expect=None):
    """From POD on NODE, ask the listener at ADDR:PORT which address it saw us come from.
    EXPECT (the address it should be): over UDP, which has no end of stream, the client stops
    once an answer that long is in instead of waiting out its -t (a longer one is cut: no match)."""
    remote = (f"UDP4:{addr}:{port}" + (f",readbytes={len(expect) + 1}" if expect else "")) if udp \
        else f"TCP4:{addr}:{port}"
    argv = cnikit.docker_exec(node, "ip", "netns", "exec", pod, "socat", "-T", "2", "-t", "2", "-", remote,
                              stdin=True)
    deadline = time.monotonic() + wait
    while True:        # the listener starts in the background: retry until it answers
        out = r.run(argv, input="which address do you see?\n", check=False)
        if out.strip() or r.dry_run or time.monotonic() > deadline:
            return out.strip().split(":")[0]
        time.sleep(0.2)


def node_host_ends(r, node, network=cnikit.CNI_NET):
    """The host ends of the veths our plugin made on NODE, as its attachment records there name
    them (<dataDir>/<network>/.cnikit/attachments: written before it creates anything)."""
    records = os.path.join(cnikit.CNI_DATA_DIR, network, ".cnikit", "attachments")
    ok, text = r.query(cnikit.docker_exec(node, "sh", "-c", 'for f in "$1"/*; do [ -f "$f" ] && cat "$f" && echo; '
                                          'done; true', "sh", records))
    ends = []
    for line in text.splitlines() if ok else []:
        try:
            veth = json.loads(line).get("veth")
        except (ValueError, AttributeError):
            continue
        if isinstance(veth, str):
            ends.append(veth)
    return sorted(ends)


def node_leftovers(r, node, network=cnikit.CNI_NET, ends=()):
    """What pods could leave on NODE after DEL: the host ends our plugin made (ENDS, read with
    node_host_ends before DEL, and those its remaining records name; never every link named
    veth...), address files, cached results, our nat chains."""
    left = [end for end in sorted(set(ends) | set(node_host_ends(r, node, network)))
            if r.query(cnikit.docker_exec(node, "ip", "link", "show", "dev", end))[0]]
    ok, files = r.query(cnikit.docker_exec(node, "find", os.path.join(cnikit.CNI_DATA_DIR, network),
                                           cnikit.CNI_CACHE_DIR, "-type", "f"))
    left += [f for f in files.split() if os.path.basename(f)[0].isdigit() or f.startswith(cnikit.CNI_CACHE_DIR)
             or "/.cnikit/attachments/" in f]
    ok, rules = r.query(cnikit.docker_exec(node, "iptables", "-t", "nat", "-S"))
    left += [line for line in rules.splitlines() if cnikit.CHAIN_PREFIX in line]
    return left


def node_file(r, node, path):
    """PATH's text in NODE, or None when it is not there."""
    ok, text = r.query(cnikit.docker_exec(node, "cat", path))
    return text if ok else None


def node_plugin(r, node, path):
    """What identifies the plugin file PATH in NODE: its first two lines (a compiled plugin says
    there what it was built from and for) and its sha256 (past those lines a compiled plugin is
    bytecode, not text); None when it is not there."""
    ok, text = r.query(cnikit.docker_exec(node, "sh", "-c", 'head -n 2 "$1" && sha256sum "$1"', "sh", path))
    return text if ok else None


def node_routes(r, node):
    """{dst: gateway} of NODE's routes that go via a gateway."""
    return {rt["dst"]: rt["gateway"] for rt in r.query_json(cnikit.docker_exec(node, "ip", "-j", "route")) or []
            if rt.get("gateway")}


def down(r, cluster, network=NETWORK):
    """Remove the nodes and their network; absent is fine."""
    ok, out = r.query(["podman", "ps", "-a", "-q", "--filter", f"label={cnikit.KIND_NODE_LABEL}={cluster}"])
    if ok and out.split():
        r.run(["podman", "rm", "-f", "-t", "0"] + out.split(), check=False)
    ok, _ = r.query(["podman", "network", "exists", network])
    if ok:
        r.run(["podman", "network", "rm", "-f", network], check=False)


@contextlib.contextmanager
def podman_as_docker(tag="kl"):
    """podman with a store of its own, and `docker` on PATH being that podman, in this
    process's environment (its children inherit it). Afterwards every container, pod,
    network and image it holds is removed, its scratch dir and the cgroups it left too, and
    the environment is as before."""
    runtime.mount_cgroups()
    cgroups = runtime.cgroup_dirs()
    directory = runtime.scratch_dir(tag)
    saved = {k: os.environ.get(k) for k in ("PATH", "CONTAINERS_CONF", "CONTAINERS_STORAGE_CONF")}
    try:
        conf = os.path.join(directory, "containers.conf")
        with open(conf, "w") as f:
            f.write(runtime.CONTAINERS_CONF.replace("[engine]\n", f'[engine]\ntmp_dir = "{directory}/tmp"\n', 1))
        storage = os.path.join(directory, "storage.conf")
        with open(storage, "w") as f:
            f.write(STORAGE_CONF.format(directory))
        bindir = os.path.join(directory, "bin")
        os.mkdir(bindir)
        with open(os.path.join(bindir, "docker"), "w") as f:
            f.write(DOCKER_WRAPPER)
        os.chmod(os.path.join(bindir, "docker"), 0o755)
        os.environ.update(CONTAINERS_CONF=conf, CONTAINERS_STORAGE_CONF=storage,
                          PATH=bindir + os.pathsep + os.environ.get("PATH", ""))
        yield directory
    finally:
        if shutil.which("podman"):
            quiet = cnikit.Runner(quiet=True, color=False)
            for argv in (["podman", "rm", "-a", "-f", "-t", "0"], ["podman", "network", "prune", "-f"],
                         ["podman", "rmi", "-a", "-f"]):
                with contextlib.suppress(cnikit.CnikitError):     # a timeout must not skip the rest
                    quiet.execute(argv, timeout=120)
        # conmon (one per container and per exec session) may outlive `rm` a moment on a
        # loaded machine: wait for the processes that name our scratch dir, then stop any
        # straggler by its pid (they are ours: the dir is this call's own).
        deadline = time.monotonic() + 15
        while (left := runtime.pids_with_arg(directory)) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        runtime.drop_scratch_dir(directory)
        runtime.drop_new_cgroups(cgroups)
