"""`cnikit cni kind-install` on real containers that stand in for a kind cluster's nodes
(stages/kindlike.py: podman, `--rootfs /:O`, `docker` being podman), not on a mocked docker.

Proves: the derived-image path (python3 in the nodes) installs plugin, conflist, subnet file
and routes on every node, atomically, and a re-run changes nothing; the plugin is the compiled
form built in each node by that node's python3 (one node runs another Python, whose bytecode
differs from this machine's, where one is found), rebuilt where a node's python3 changed,
and `--plain` swaps in the readable file (and back); kubelet's part played
inside each node (pod netns, ADD through the installed conflist with K8S_POD_* args, DEL with
and without the netns) gives pods that reach their gateway and the pods of every other node
with rp_filter=1, with no NAT between pods (seen from the receiving pod), and DEL leaves
nothing; uninstall --kind removes it all; the stock path (no python3, no mirror) stops with
one line naming the node and the fix, changing no node.
"""
import glob
import hashlib
import ipaddress
import json
import os
import re
import subprocess
import time

import pytest

import cnikit
import kindlike
import runtimes
from kernel import cli, run_stage

CLUSTER = "kl"
PING = ("ping", "-c", "3", "-i", "0.2", "-W", "2")   # any answer of three: a loaded machine may lose the first
CONF = cnikit.cni_conf_file(cnikit.CNI_CONF_DIR, cnikit.CNI_NET)
PLUGIN = f"{cnikit.CNI_PLUGIN_DIR}/{cnikit.CNI_TYPE}"
SUBNETS = {f"{CLUSTER}-control-plane": "10.244.0.0/24", f"{CLUSTER}-worker": "10.244.1.0/24",
           f"{CLUSTER}-worker2": "10.244.2.0/24"}
OTHER_PYTHON_NODE = f"{CLUSTER}-worker2"
MAGIC = "import importlib.util; print(importlib.util.MAGIC_NUMBER)"
STAGED = "/run/cnikit/build/cni-bash-compatible.py"     # the source while a node compiles it


def python_magic(python):
    proc = subprocess.run([python, "-I", "-S", "-c", MAGIC], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def another_python():
    """A python3 (3.8 or later: compile_plugin's floor) of this machine whose bytecode is not
    /usr/bin/python3's, the newest such (None when there is none): a node given it as its
    /usr/bin/python3 must get a plugin built by it, proof that the build ran in the node."""
    ours = python_magic(cnikit.CNI_PYTHON)
    found = []
    for path in glob.glob("/root/.pyenv/versions/3.*/bin/python3.*") + glob.glob("/usr/local/bin/python3.*"):
        minor = path.rsplit("python3.", 1)[1]
        if minor.isdigit() and int(minor) >= 8 and python_magic(path) not in (None, ours):
            found.append((int(minor), path))
    return max(found)[1] if found else None


def make_cluster(python):
    reason = kindlike.cannot_run()
    if reason:
        pytest.skip(reason)
    with kindlike.podman_as_docker():
        r = cnikit.Runner(quiet=True, color=False)
        try:
            nodes = kindlike.up(r, CLUSTER, workers=2, python=python)
        except cnikit.CnikitError as e:
            pytest.skip(f"podman cannot start a kind-like node here: {e}")
        yield r, nodes


@pytest.fixture
def derived():
    """Three kind-like nodes with python3 (as from kind/Dockerfile's derived image); where this
    machine has another Python, OTHER_PYTHON_NODE runs it as its /usr/bin/python3."""
    for r, nodes in make_cluster(python=True):
        other = another_python()
        if other:
            r.run(cnikit.docker_exec(OTHER_PYTHON_NODE, "ln", "-sf", other, cnikit.CNI_PYTHON))
        yield r, nodes


@pytest.fixture
def stock():
    """Three kind-like nodes as kind's stock image: no python3."""
    yield from make_cluster(python=False)


def node_magic(r, node):
    """The bytecode magic of NODE's /usr/bin/python3."""
    ok, out = r.query(cnikit.docker_exec(node, cnikit.CNI_PYTHON, "-I", "-S", "-c", MAGIC))
    assert ok, node
    return out.strip()


def assert_compiled_in_node(r, node, plugin):
    """PLUGIN (NODE's installed file) is the compiled form of our plugin, built for NODE's
    python3: its first two lines say so (interpreter, bytecode, source)."""
    with open(cnikit.CNI_PLUGIN_SRC, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    first, second = plugin.split("\n")[:2]
    assert first.startswith("#!/usr/bin/python3 -ISc"), first   # a -c program runs the bytecode below
    assert second.startswith("# cni-bash-compatible.py compiled for /usr/bin/python3 "
                             f"(bytecode {node_magic(r, node)}) by "), second
    assert second.endswith(f"; source sha256 {sha}."), second


def installed_state(r, node):
    return {"plugin": kindlike.node_plugin(r, node, PLUGIN), "conf": kindlike.node_file(r, node, CONF),
            "subnet": kindlike.node_file(r, node, cnikit.NODE_SUBNET_FILE),
            "routes": kindlike.node_routes(r, node)}


def unchanged_rerun(*args):
    """kind-install ARGS again on the installed cluster: it says there is nothing to do and runs
    no command that changes anything (no docker cp, no build, no write, no route: only look-ups)."""
    again = cli("cni", "kind-install", CLUSTER, *args, check=True).stdout
    assert "nothing to do" in again, again
    commands = [line for line in again.splitlines() if not line.startswith("#")]
    assert commands == [], commands
    return again


def test_kind_install_on_nodes_with_python3_then_rerun_then_uninstall(derived):
    r, nodes = derived
    assert nodes == list(SUBNETS)
    ips = {node: cnikit.kind_node_ip(r, node) for node in nodes}
    assert all(ips.values()), ips
    other = another_python()
    magics = {node: node_magic(r, node) for node in nodes}
    host_magic = python_magic(cnikit.CNI_PYTHON)
    assert magics[OTHER_PYTHON_NODE] != host_magic if other else set(magics.values()) == {host_magic}
    proc = cli("cni", "kind-install", CLUSTER, check=True)
    out = proc.stdout
    for node in nodes:
        assert f"{node}: {cnikit.CNI_PYTHON} is there" in out
        # compiled in the node by its own python3, to a temp name in the same directory, then renamed
        assert (f"docker exec {node} /usr/bin/python3 -I -S {STAGED} --compile {STAGED} /opt/cni/bin/.cnikit.tmp\n"
                f"docker exec {node} rm -rf /run/cnikit/build\n"
                f"docker exec {node} mv -f /opt/cni/bin/.cnikit.tmp /opt/cni/bin/cnikit\n") in out
        assert f"docker exec {node} mv -f /etc/cni/net.d/.10-cnikit.conflist.tmp {CONF}" in out
        state = installed_state(r, node)
        assert_compiled_in_node(r, node, state["plugin"])
        # what a runtime sends before every ADD and DEL, answered by the compiled plugin in the node
        version = r.run(cnikit.docker_exec(node, "env", "CNI_COMMAND=VERSION", "CNI_NETNS=dummy", "CNI_IFNAME=dummy",
                                           "CNI_PATH=dummy", PLUGIN, stdin=True), input='{"cniVersion":"1.0.0"}')
        assert "1.0.0" in json.loads(version)["supportedVersions"], version
        assert json.loads(state["conf"]) == {"cniVersion": "1.0.0", "name": "cnikit", "plugins": [
            {"type": "cnikit", "nonMasqueradeCIDRs": ["10.244.0.0/16"]},
            {"type": "portmap", "capabilities": {"portMappings": True}}]}
        assert state["subnet"] == f"CNIKIT_SUBNET={SUBNETS[node]}\n"
        assert state["routes"] == {SUBNETS[o]: ips[o] for o in nodes if o != node}
        ok, tmp = r.query(cnikit.docker_exec(node, "find", "/opt/cni/bin", "/etc/cni/net.d", "/run/cnikit",
                                             "-name", ".*.tmp", "-o", "-name", "build"))
        assert ok and tmp == ""                # no temp file, no build dir left
    before = {node: installed_state(r, node) for node in nodes}
    again = unchanged_rerun()
    for node in nodes:
        assert f"# {node}: {PLUGIN} is already this plugin (compiled by the node's python3)" in again
    assert {node: installed_state(r, node) for node in nodes} == before

    # a kind-install killed while a node compiled the plugin leaves its build directory there
    r.run(cnikit.docker_exec(nodes[0], "mkdir", "-p", f"{cnikit.KIND_BUILD_DIR}/compiler"))
    gone = cli("cni", "uninstall", "--kind", CLUSTER, check=True).stdout
    assert f"docker exec {nodes[0]} rm -rf {cnikit.KIND_BUILD_DIR}\n" in gone
    assert not r.query(cnikit.docker_exec(nodes[0], "test", "-e", cnikit.KIND_BUILD_DIR))[0]
    for node in nodes:
        assert f"docker exec {node} rm -f" in gone
        assert installed_state(r, node) == {"plugin": None, "conf": None, "subnet": None, "routes": {}}
        # what the node had before stays: the reference plugins, python3
        ok, left = r.query(cnikit.docker_exec(node, "ls", cnikit.CNI_PLUGIN_DIR))
        assert sorted(left.split()) == sorted(kindlike.NODE_PLUGINS)
    assert "nothing to do" in cli("cni", "uninstall", "--kind", CLUSTER, check=True).stdout


def test_kind_install_plain_swaps_in_the_readable_file_and_back_and_rebuilds_where_python3_changed(derived):
    """Split from the test above (each its own cluster) so that the two run side by side."""
    r, nodes = derived
    other = another_python()
    cli("cni", "kind-install", CLUSTER, check=True)
    before = {node: installed_state(r, node) for node in nodes}
    with open(cnikit.CNI_PLUGIN_SRC) as f:
        plain = "#!/usr/bin/python3 -IS\n" + f.read().split("\n", 1)[1]
    plain = "".join(plain.splitlines(True)[:2]) + f"{hashlib.sha256(plain.encode()).hexdigest()}  {PLUGIN}\n"  # as node_plugin reads it
    # --plain: the readable file replaces the compiled one (nothing else changes); then back
    swapped = cli("cni", "kind-install", CLUSTER, "--plain", check=True).stdout
    for node in nodes:
        assert (f"docker cp {cnikit.CNI_PLUGIN_SRC} {node}:/opt/cni/bin/.cnikit.tmp\n" in swapped
                and f"docker exec {node} mv -f /opt/cni/bin/.cnikit.tmp /opt/cni/bin/cnikit\n" in swapped)
        assert f"# {node}: {CONF} already says this" in swapped
        assert installed_state(r, node) == dict(before[node], plugin=plain)
    assert "--compile" not in swapped
    unchanged_rerun("--plain")
    back = cli("cni", "kind-install", CLUSTER, check=True).stdout
    assert back.count(" --compile ") == len(nodes), back
    for node in nodes:
        assert_compiled_in_node(r, node, installed_state(r, node)["plugin"])
    if other:
        # a node whose python3 changed (here: back to Debian's) gets the plugin built again, by it
        r.run(cnikit.docker_exec(OTHER_PYTHON_NODE, "ln", "-sf", os.readlink(cnikit.CNI_PYTHON), cnikit.CNI_PYTHON))
        rebuilt = cli("cni", "kind-install", CLUSTER, check=True).stdout
        assert [line.split()[2] for line in rebuilt.splitlines() if " --compile " in line] == [OTHER_PYTHON_NODE]
        assert_compiled_in_node(r, OTHER_PYTHON_NODE, installed_state(r, OTHER_PYTHON_NODE)["plugin"])
    unchanged_rerun()


def test_kubelet_played_in_the_nodes_pods_reach_across_nodes_without_nat(derived):
    r, nodes = derived
    cli("cni", "kind-install", CLUSTER, check=True)
    for node in nodes:
        ok, rp = r.query(cnikit.docker_exec(node, "sysctl", "-n", "net.ipv4.conf.all.rp_filter"))
        assert ok and rp.strip() == "1"
        # what the pods below go through: the compiled plugin, built by this node's python3
        assert_compiled_in_node(r, node, kindlike.node_plugin(r, node, PLUGIN))
        kindlike.install_runtime(r, node)
    pods = {node: f"web-{i}" for i, node in enumerate(nodes)}
    addr = {node: kindlike.pod_add(r, node, pods[node], CONF) for node in nodes}
    for node in nodes:
        assert addr[node] and ipaddress.ip_address(addr[node]) in ipaddress.ip_network(SUBNETS[node]), addr
        ok, log = r.query(cnikit.docker_exec(node, "cat", cnikit.CNI_LOG))
        # the plugin ran in that node, called as kubelet's runtime calls it
        assert ok and "ADD" in log and f"K8S_POD_NAME={pods[node]}" in log and kindlike.sandbox_id(node, pods[node]) in log
        gateway = str(ipaddress.ip_network(SUBNETS[node])[1])
        ok, out = r.probe(cnikit.docker_exec(node, "ip", "netns", "exec", pods[node], *PING, gateway))
        assert ok, out
    for i, node in enumerate(nodes):      # every pod serves "which address do you come from?"
        kindlike.serve_peer_address(r, node, pods[node], 8080)
        kindlike.serve_peer_address(r, node, pods[node], 5353, udp=True)
    for node in nodes:
        for other in nodes:
            if other == node:
                continue
            ok, out = r.probe(cnikit.docker_exec(node, "ip", "netns", "exec", pods[node], *PING, addr[other]))
            assert ok, f"{pods[node]} on {node} cannot reach {pods[other]} on {other}: {out}"
            # no NAT between pods: the far side sees the sender pod's own address, not its node's
            seen_tcp = kindlike.peer_address_seen(r, node, pods[node], addr[other], 8080)
            seen_udp = kindlike.peer_address_seen(r, node, pods[node], addr[other], 5353, udp=True, expect=addr[node])
            assert seen_tcp == addr[node] and seen_udp == addr[node], (node, other, seen_tcp, seen_udp)
    # DEL as containerd does: with the netns and prevResult, then again without either;
    # on the last node the netns is gone first (a node restart): only the DEL without it
    for i, node in enumerate(nodes):
        kindlike.pod_del(r, node, pods[node], CONF, netns_first=(i == len(nodes) - 1))
        assert kindlike.node_leftovers(r, node) == []
        ok, netns = r.query(cnikit.docker_exec(node, "ip", "netns", "list"))
        assert ok and netns.strip() == ""
        ok, log = r.query(cnikit.docker_exec(node, "cat", cnikit.CNI_LOG))
        assert log.count("DEL") >= 1


def test_stock_nodes_without_python3_fail_in_one_line_and_stay_unchanged(stock):
    r, nodes = stock
    before = {node: installed_state(r, node) for node in nodes}
    proc = cli("cni", "kind-install", CLUSTER)
    assert proc.returncode == 1, proc
    node = nodes[0]
    assert f"{node}: no python3 (kind node images carry none): installing python3-minimal in the node" in proc.stdout
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    line = errors[0]
    # our line's structure, with apt's reason in the parentheses in whatever words apt uses
    # ("Temporary failure resolving ...", behind a proxy "Could not connect to ...")
    shape = re.match(rf"cnikit: error: {re.escape(node)} has no python3 \(the plugin's interpreter\) and "
                     r"cannot reach a package mirror \((.+)\): no node was changed; fix: (.+)$", line)
    assert shape and shape[1].strip(), line
    assert "make kind-up KIND_NODE=derived" in shape[2], line
    assert "Unable to locate package" not in line
    assert {node: installed_state(r, node) for node in nodes} == before
    for node in nodes:
        ok, _ = r.query(cnikit.docker_exec(node, "test", "-e", cnikit.CNI_PYTHON))
        assert not ok


def test_lesson_07_kind_like_passes_and_leaves_no_container():
    reason = kindlike.cannot_run()
    if reason:
        pytest.skip(reason)
    proc = run_stage("07_cni.py", "--kind-like", timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr
    assert out.splitlines()[-1].startswith("PASS lesson 07 cni-kind-like:"), out[-2000:]
    assert "FAILED" not in out
    # the narration says what stands in for what, and which part is kubelet's
    assert "standing in for kind's" in out and "kubelet's part, played by hand" in out
    for check in ("reaches its gateway", "through kind-install's route", "no NAT between pods",
                  "nothing is left on cnikit-worker", "uninstall --kind left no plugin"):
        assert check in out, check
    assert "--rootfs /:O sleep infinity\n" in out
    # Its nodes' conmon and sleep are gone: `podman rm` has stopped them; a conmon reaped after
    # its container may still be on its way out on a loaded machine, so they get a bounded while.
    deadline = time.monotonic() + 20
    while runtimes.pids_with_arg("/tmp/k07") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert runtimes.pids_with_arg("/tmp/k07") == []


def test_lesson_07_kind_like_dry_run_and_host_refusal():
    proc = run_stage("07_cni.py", "--kind-like", "demo", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for node in ("demo-control-plane", "demo-worker"):
        # every podman option before --rootfs /:O; what follows it is the command
        assert (f"podman run -d --privileged --label io.x-k8s.kind.cluster=demo --name {node} --hostname {node} "
                "--network kind --rootfs /:O sleep infinity\n") in out
        assert f"docker exec {node} python3 /usr/local/bin/cnikit cni add " in out
    assert "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=" in out
    assert '"nonMasqueradeCIDRs": [\n        "10.244.0.0/16"' in out
    refused = run_stage("07_cni.py", "--kind-like", "--host")
    assert refused.returncode == 2 and "runs in its sandbox only" in refused.stderr
