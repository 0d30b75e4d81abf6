"""`cnikit cni`: the libcni-like runtime driving real plugins (ours, and the reference
bridge + host-local + portmap) in the test's sandbox, plus install/uninstall and log."""
import json
import os

import pytest
import sh

import cnikit
from kernel import cli, iptables_rules, links, netns_list, ping

REF_DIR = "/usr/lib/cni"
CONF_DIR = "/etc/cni/net.d"
needs_ref = pytest.mark.skipif(not os.path.exists(os.path.join(REF_DIR, "bridge")),
                               reason="reference plugins missing: apt-get install containernetworking-plugins")


def run(*args):
    return cli(*args, check=True)


def files(d):
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def ref_conflist(path="/etc/cni/net.d/20-ref.conflist", version="1.0.0"):
    conf = {"cniVersion": version, "name": "refnet", "plugins": [
        {"type": "bridge", "bridge": "cni9", "isGateway": True, "ipMasq": False,
         "ipam": {"type": "host-local", "subnet": "10.88.0.0/24"}},
        {"type": "portmap", "capabilities": {"portMappings": True}}]}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(conf, f)
    return path


def invocations(stdout):
    """(command, plugin) of every plugin call the runtime printed, in order."""
    calls = []
    for line in stdout.splitlines():
        if line.startswith("env CNI_COMMAND="):
            words = line.split(" <<")[0].split()
            calls.append((words[1].split("=", 1)[1], os.path.basename(words[-1])))
    return calls


def calls_printed(stdout, command):
    """Each COMMAND call the runtime printed: its lines, from `env ...` to its here-document's EOF."""
    lines, found = stdout.splitlines(), []
    for i, line in enumerate(lines):
        if line.startswith(f"env CNI_COMMAND={command} "):
            assert line.endswith(" <<'EOF'") and lines[i + 2] == "EOF", lines[i:i + 3]
            found.append(lines[i:i + 3])
    return found


def pod_addr(ns):
    data = json.loads(str(sh.ip("-n", ns, "-j", "addr", "show", "dev", "eth0")))
    return [a["local"] for a in data[0]["addr_info"] if a["family"] == "inet"][0]


# ---------------------------------------------------------------- install / uninstall

def test_install_writes_plugin_and_conflist_and_uninstall_removes_exactly_that():
    out = run("cni", "install", "--subnet", "10.244.7.0/24", "--chain", "portmap").stdout
    plugin, conf = "/opt/cni/bin/cnikit", "/etc/cni/net.d/10-cnikit.conflist"
    assert os.access(plugin, os.X_OK)
    with open(plugin, "rb") as a:
        installed = a.read().split(b"\n", 2)
    # the plugin compiled, its interpreter fixed (a runtime's PATH may hold a slow python3 shim)
    assert installed[0].startswith(b"#!/usr/bin/python3 -ISc") and b" compiled for /usr/bin/python3 " in installed[1]
    data = json.load(open(conf))
    assert data["name"] == "cnikit" and data["cniVersion"] == "1.0.0"
    assert data["plugins"][0] == {"type": "cnikit", "ipam": {"subnet": "10.244.7.0/24"}}
    assert data["plugins"][1]["type"] == "portmap"
    # atomically: a temp file renamed into place, nothing half-written left behind
    assert "mv -f /opt/cni/bin/.cnikit.tmp /opt/cni/bin/cnikit" in out
    assert "mv -f /etc/cni/net.d/.10-cnikit.conflist.tmp /etc/cni/net.d/10-cnikit.conflist" in out
    assert sorted(os.listdir(CONF_DIR)) == ["10-cnikit.conflist"]
    assert sorted(os.listdir("/opt/cni/bin")) == ["cnikit"]
    again = run("cni", "install", "--subnet", "10.244.7.0/24", "--chain", "portmap").stdout
    assert "nothing to do" in again and "mv -f" not in again
    # someone else's files stay
    open("/etc/cni/net.d/99-other.conf", "w").write('{"cniVersion":"1.0.0","name":"o","type":"bridge"}')
    run("cni", "uninstall")
    assert sorted(os.listdir(CONF_DIR)) == ["99-other.conf"] and os.listdir("/opt/cni/bin") == []
    assert "nothing to uninstall" in run("cni", "uninstall").stdout


def test_uninstall_keeps_a_plugin_another_config_still_uses():
    run("cni", "install", "--name", "a")
    run("cni", "install", "--name", "b")
    out = run("cni", "uninstall", "--name", "a").stdout
    assert "stays: 10-b.conflist still uses type cnikit" in out
    assert os.path.exists("/opt/cni/bin/cnikit")
    run("cni", "uninstall", "--name", "b")
    assert not os.path.exists("/opt/cni/bin/cnikit")


def test_install_custom_dirs_type_and_version():
    run("cni", "install", "--plugin-dir", "/run/cni/bin", "--conf-dir", "/run/cni/net.d", "--type", "demystifying",
        "--cni-version", "1.1.0")
    data = json.load(open("/run/cni/net.d/10-cnikit.conflist"))
    assert data["cniVersion"] == "1.1.0" and data["plugins"] == [{"type": "demystifying"}]
    assert os.access("/run/cni/bin/demystifying", os.X_OK)
    run("cni", "install", "--plugin-dir", "/run/cni/bin", "--conf-dir", "/run/cni/net.d", "--type", "demystifying",
        "--cni-version", "1.1.0", "--python", "keep")
    with open("/run/cni/bin/demystifying", "rb") as a, open(cnikit.CNI_PLUGIN_SRC, "rb") as b:
        assert a.read() == b.read()


def test_install_dry_run_is_a_script_and_changes_nothing():
    proc = run("--dry-run", "cni", "install", "--subnet", "10.244.1.0/24")
    assert files(CONF_DIR) == [] and files("/opt/cni/bin") == []
    lines = proc.stdout.splitlines()
    src = cnikit.CNI_PLUGIN_SRC
    assert lines[:5] == ["mkdir -p /opt/cni/bin",
                         f"/usr/bin/python3 -I -S {src} --compile {src} /opt/cni/bin/.cnikit.tmp",
                         "mv -f /opt/cni/bin/.cnikit.tmp /opt/cni/bin/cnikit",
                         "mkdir -p /etc/cni/net.d",
                         "install -m 0644 /dev/stdin /etc/cni/net.d/.10-cnikit.conflist.tmp <<'EOF'"]
    assert lines[-1] == "mv -f /etc/cni/net.d/.10-cnikit.conflist.tmp /etc/cni/net.d/10-cnikit.conflist"
    # the printed script does the install when piped into sh
    sh.sh("-e", _in=proc.stdout)
    assert json.load(open("/etc/cni/net.d/10-cnikit.conflist"))["plugins"][0]["ipam"]["subnet"] == "10.244.1.0/24"
    assert os.access("/opt/cni/bin/cnikit", os.X_OK)
    assert os.stat("/etc/cni/net.d/10-cnikit.conflist").st_mode & 0o777 == 0o644   # runtimes and people read it


@pytest.mark.parametrize("args, msg", [
    (["--subnet", "10.244.1.5/24"], "not a CIDR network"),
    (["--name", "bad/name"], "network name"),
    (["--plugin", "/nonexistent"], "plugin source /nonexistent not found"),
    (["--type", "../x"], "not a plain file name"),
    (["--python", "python3"], "must be an absolute path"),
])
def test_install_bad_input_exits_2_and_changes_nothing(args, msg):
    proc = cli("cni", "install", *args)
    assert proc.returncode == 2 and msg in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert files(CONF_DIR) == [] and files("/opt/cni/bin") == []


# ---------------------------------------------------------------- runtime with the reference plugins

@needs_ref
def test_runtime_drives_reference_chain_with_prev_result_cache_and_reverse_del():
    conf = ref_conflist()
    run("netns", "add", "pod1")
    add = run("cni", "add", "pod1", "--conf", conf)
    assert invocations(add.stdout) == [("ADD", "bridge"), ("ADD", "portmap")]
    # the echoed call is the one a runtime makes: the real env, the plugin, its stdin
    first = [l for l in add.stdout.splitlines() if l.startswith("env CNI_COMMAND=ADD")][0]
    for part in ("CNI_CONTAINERID=pod1", "CNI_NETNS=/run/netns/pod1", "CNI_IFNAME=eth0",
                 "CNI_ARGS=IgnoreUnknown=1", "CNI_PATH=/opt/cni/bin:/usr/lib/cni", "/usr/lib/cni/bridge <<'EOF'"):
        assert part in first
    second = calls_printed(add.stdout, "ADD")[1]
    assert second[0].endswith("/usr/lib/cni/portmap <<'EOF'") and '"prevResult":' in second[1]
    cache = json.load(open("/var/lib/cni/results/refnet-pod1-eth0"))
    assert cache["kind"] == "cniCacheV1" and cache["containerId"] == "pod1" and cache["ifName"] == "eth0"
    assert cache["result"]["ips"][0]["address"] == "10.88.0.2/24"
    assert pod_addr("pod1") == "10.88.0.2" and ping("10.88.0.1", ns="pod1")
    check = run("cni", "check", "pod1", "--conf", conf)
    assert invocations(check.stdout) == [("CHECK", "bridge"), ("CHECK", "portmap")] and "CHECK passed" in check.stdout
    refused = cli("cni", "add", "pod1", "--conf", conf)
    assert refused.returncode == 2 and "already attached" in refused.stderr
    dele = run("cni", "del", "pod1", "--conf", conf)
    assert invocations(dele.stdout) == [("DEL", "portmap"), ("DEL", "bridge")]
    assert all('"prevResult":' in stdin for _, stdin, _ in calls_printed(dele.stdout, "DEL"))
    assert not os.path.exists("/var/lib/cni/results/refnet-pod1-eth0")
    assert "eth0" not in links("pod1") and sorted(os.listdir(os.path.join(cnikit.CNI_DATA_DIR, "refnet"))) in ([], ["last_reserved_ip.0", "lock"])
    again = run("cni", "del", "pod1", "--conf", conf)
    assert "no cached result" in again.stdout and invocations(again.stdout) == [("DEL", "portmap"), ("DEL", "bridge")]


@needs_ref
def test_del_after_the_netns_is_gone_passes_empty_netns_like_containerd():
    conf = ref_conflist()
    run("netns", "add", "pod1")
    run("cni", "add", "pod1", "--conf", conf)
    sh.ip("netns", "del", "pod1")
    out = run("cni", "del", "pod1", "--conf", conf).stdout
    assert all("CNI_NETNS= " in l for l in out.splitlines() if l.startswith("env CNI_COMMAND=DEL"))
    assert [f for f in os.listdir(os.path.join(cnikit.CNI_DATA_DIR, "refnet")) if f[0].isdigit()] == []


@needs_ref
def test_single_conf_file_and_version_verb():
    path = "/etc/cni/net.d/10-one.conf"
    os.makedirs(CONF_DIR, exist_ok=True)
    with open(path, "w") as f:
        json.dump({"cniVersion": "0.4.0", "name": "one", "type": "bridge", "bridge": "cni8",
                   "ipam": {"type": "host-local", "subnet": "10.89.0.0/24"}}, f)
    run("netns", "add", "p")
    out = run("cni", "add", "p", "--id", "c0ffee", "--ifname", "net1").stdout    # the first conf in the dir
    assert json.loads(out[out.index("\n{\n") + 1:])["cniVersion"] == "0.4.0"
    assert "net1" in links("p") and os.path.exists("/var/lib/cni/results/one-c0ffee-net1")
    run("cni", "check", "p", "--id", "c0ffee", "--ifname", "net1")
    run("cni", "del", "p", "--id", "c0ffee", "--ifname", "net1")
    ver = run("cni", "version").stdout
    assert invocations(ver) == [("VERSION", "bridge")] and '"supportedVersions"' in ver


@needs_ref
def test_failed_add_dels_the_chain_and_leaves_nothing():
    path = "/etc/cni/net.d/10-bad.conflist"
    os.makedirs(CONF_DIR, exist_ok=True)
    with open(path, "w") as f:
        json.dump({"cniVersion": "1.0.0", "name": "bad", "plugins": [
            {"type": "bridge", "bridge": "cni7", "ipam": {"type": "host-local", "subnet": "10.90.0.0/24"}},
            {"type": "bridge", "bridge": "cni6", "ipam": {"type": "host-local", "subnet": "10.91.0.0/24"}}]}, f)
    run("netns", "add", "pod1")
    proc = cli("cni", "add", "pod1")    # the second bridge finds eth0 taken by the first
    assert proc.returncode == 1 and "CNI plugin bridge ADD failed with CNI error" in proc.stderr
    assert invocations(proc.stdout) == [("ADD", "bridge"), ("ADD", "bridge"), ("DEL", "bridge"), ("DEL", "bridge")]
    assert "DEL the whole chain" in proc.stdout
    assert "eth0" not in links("pod1") and not os.path.exists("/var/lib/cni/results/bad-pod1-eth0")
    assert [f for f in os.listdir(os.path.join(cnikit.CNI_DATA_DIR, "bad")) if f[0].isdigit()] == []
    with open(path, "w") as f:
        json.dump({"cniVersion": "1.0.0", "name": "bad", "plugins": [{"type": "bridge"}, {"type": "nosuchplugin"}]}, f)
    missing = cli("cni", "add", "pod1")    # a plugin not in CNI_PATH: refused before anything runs
    assert missing.returncode == 2 and "CNI plugin 'nosuchplugin' not found" in missing.stderr
    assert invocations(missing.stdout) == []


def test_plugin_error_is_one_line_with_cni_code(tmp_path):
    run("cni", "install")
    run("netns", "add", "pod1")
    bad = tmp_path / "bad.conflist"
    bad.write_text(json.dumps({"cniVersion": "9.9.9", "name": "x", "plugins": [{"type": "cnikit"}]}))
    proc = cli("cni", "add", "pod1", "--conf", str(bad))
    assert proc.returncode == 1 and "CNI error 1" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args, msg", [
    (["add", "nopod"], "does not exist"),
    (["add", "pod1", "--ifname", "bad/if"], "--ifname"),
    (["add", "pod1", "--id=.x"], "container id"),
    (["add", "pod1", "--args", "novalue"], "not KEY=VALUE"),
    (["add", "pod1", "--runtime-config", "{"], "not JSON"),
    (["add", "pod1", "--conf", "/nonexistent.conf"], "cannot read network config"),
    (["check", "pod1"], "no cached result"),
])
def test_runtime_bad_input(args, msg):
    run("cni", "install")
    run("netns", "add", "pod1")
    proc = cli("cni", *args)
    assert proc.returncode in (1, 2) and msg in proc.stderr
    assert "eth0" not in links("pod1") and files("/var/lib/cni/results") == []


def test_no_config_at_all_says_how_to_get_one():
    proc = cli("cni", "add", "pod1")
    assert proc.returncode == 2 and "cnikit cni install" in proc.stderr


# ---------------------------------------------------------------- runtime with our plugin

def test_our_plugin_two_pods_ping_check_del_leaves_nothing():
    run("cni", "install", "--subnet", "10.244.3.0/24", "--cni-version", "1.1.0")
    before_rules = iptables_rules("nat")
    for pod in ("pod1", "pod2"):
        run("netns", "add", pod)
        out = run("cni", "add", pod).stdout
        assert invocations(out) == [("ADD", "cnikit")]
    a, b = pod_addr("pod1"), pod_addr("pod2")
    assert a != b and a.startswith("10.244.3.") and b.startswith("10.244.3.")
    assert ping(b, ns="pod1") and ping(a, ns="pod2") and ping("10.244.3.1", ns="pod1")
    run("cni", "check", "pod1")
    status = run("cni", "status").stdout
    assert invocations(status) == [("STATUS", "cnikit")] and "is ready" in status
    # CHECK fails when what the result says is gone
    sh.ip("-n", "pod2", "addr", "flush", "dev", "eth0")
    assert cli("cni", "check", "pod2").returncode == 1
    for pod in ("pod1", "pod2"):
        run("cni", "del", pod)
    assert [l for l in links() if l.startswith("veth")] == []
    assert "eth0" not in links("pod1") and "eth0" not in links("pod2")
    assert [f for f in os.listdir(os.path.join(cnikit.CNI_DATA_DIR, "cnikit")) if f[0].isdigit()] == []
    assert os.listdir("/var/lib/cni/results") == []
    assert iptables_rules("nat") == before_rules


def test_gc_releases_what_no_cached_attachment_holds():
    run("cni", "install", "--subnet", "10.244.4.0/24", "--cni-version", "1.1.0")
    for pod in ("pod1", "pod2"):
        run("netns", "add", pod)
        run("cni", "add", pod)
    # the runtime forgets pod2 (its cache is lost): GC must release its address
    os.unlink("/var/lib/cni/results/cnikit-pod2-eth0")
    out = run("cni", "gc").stdout
    assert invocations(out) == [("GC", "cnikit")] and "1 valid attachment(s)" in out
    assert '"cni.dev/valid-attachments":[{"containerID":"pod1","ifname":"eth0"}]' in out
    held = sorted(f for f in os.listdir(os.path.join(cnikit.CNI_DATA_DIR, "cnikit")) if f[0].isdigit())
    assert held == [pod_addr("pod1")]


def test_status_and_gc_on_an_older_config_do_nothing_like_libcni():
    run("cni", "install")
    out = run("cni", "status").stdout + run("cni", "gc").stdout
    assert invocations(out) == [] and "a runtime does not ask" in out


def test_log_shows_the_plugins_calls():
    run("cni", "install")
    run("netns", "add", "pod1")
    run("cni", "add", "pod1")
    out = run("cni", "log", "--no-follow", "--lines", "200").stdout
    assert out.startswith("tail -n 200 /var/log/cni.log") and "ADD" in out
    run("cni", "del", "pod1")


def test_verbose_prints_the_whole_stdin_pasteable():
    run("cni", "install")
    run("netns", "add", "pod1")
    out = run("-v", "cni", "add", "pod1").stdout
    call = calls_printed(out, "ADD")[0]
    assert "…" not in call[1]
    run("cni", "del", "pod1")
    # pasting the printed lines into a shell (dash, Debian's sh) does the same ADD
    sh.dash("-e", _in="\n".join(call) + "\n")
    assert pod_addr("pod1").startswith("10.244.0.")


def test_node_namespace_runs_the_plugin_there():
    """-n NODE: the plugin runs inside NODE (a host), the pod's netns as usual."""
    run("cni", "install", "--subnet", "10.244.5.0/24")
    run("netns", "add", "node1")
    run("netns", "add", "pod1")
    out = run("-n", "node1", "cni", "add", "pod1").stdout
    assert [l for l in out.splitlines() if l.startswith("ip netns exec node1 env CNI_COMMAND=ADD")]
    assert "cni0" in links("node1") and "cni0" not in links()
    assert ping("10.244.5.1", ns="pod1")
    run("-n", "node1", "cni", "del", "pod1")
    assert [l for l in links("node1") if l.startswith("veth")] == []
    assert netns_list() == ["node1", "pod1"]


def test_install_compiles_the_plugin_into_one_file_pods_run_with_and_plain_keeps_the_readable_copy():
    import hashlib
    out = run("cni", "install", "--subnet", "10.244.9.0/24").stdout
    assert f"-I -S {cnikit.CNI_PLUGIN_SRC} --compile " in out and " sh -c " not in out
    plugin = "/opt/cni/bin/cnikit"
    assert os.stat(plugin).st_mode & 0o777 == 0o755
    with open(plugin, "rb") as f, open(cnikit.CNI_PLUGIN_SRC, "rb") as src:
        assert f.readline().startswith(b"#!/usr/bin/python3 -ISc")  # a -c program that runs the bytecode below
        assert f"source sha256 {hashlib.sha256(src.read()).hexdigest()}.".encode() in f.readline()
        assert b"marshal.loads" in f.read()
    assert files("/opt/cni/bin") == ["cnikit"]              # no temp file left
    assert "nothing to do" in run("cni", "install", "--subnet", "10.244.9.0/24").stdout
    assert "nothing to do" in run("cni", "install", "--precompiled", "--subnet", "10.244.9.0/24").stdout  # the old name
    # built for another bytecode (as after a python3 upgrade: it would run from its source, slowly): built again
    with open(plugin, "rb") as f:
        data = f.read()
    first, second, rest = data.split(b"\n", 2)
    magic = second.split(b"(bytecode ", 1)[1].split(b")", 1)[0]
    with open(plugin, "wb") as f:
        f.write(b"\n".join([first, second.replace(magic, b"b'\\xcb\\r\\r\\n'"), rest]))
    again = run("cni", "install", "--subnet", "10.244.9.0/24").stdout
    assert "--compile" in again and "nothing to do" not in again
    with open(plugin, "rb") as f:
        assert f.read() == data
    # a pod comes up and goes away through the compiled file
    run("netns", "add", "zpod")
    run("cni", "add", "zpod")
    assert pod_addr("zpod").startswith("10.244.9.") and ping("10.244.9.1", ns="zpod")
    run("cni", "del", "zpod")
    assert set(files(os.path.join(cnikit.CNI_DATA_DIR, "cnikit"))) <= {".cnikit", "last_reserved_ip.0", "lock"}  # no address
    assert files(os.path.join(cnikit.CNI_DATA_DIR, "cnikit", ".cnikit", "attachments")) == []                          # no record
    # --plain: the readable file itself, first line pinned; the compiled one is replaced
    assert "--compile" not in run("cni", "install", "--plain", "--subnet", "10.244.9.0/24").stdout
    with open(plugin, "rb") as f:
        assert f.read() == cnikit.cni_plugin_bytes(cnikit.CNI_PLUGIN_SRC, "#!/usr/bin/python3 -IS")
    bad = cli("cni", "install", "--precompiled", "--python", "keep")
    assert bad.returncode == 2 and "--precompiled" in bad.stderr
    run("cni", "uninstall")
    assert files("/opt/cni/bin") == [] and files(CONF_DIR) == []


def test_dry_run_check_says_why_it_prints_no_plugin_call():
    run("cni", "install")
    out = run("--dry-run", "cni", "check", "pod1").stdout
    assert "CNI_COMMAND=CHECK" not in out
    assert "needs the ADD result as prevResult" in out and "not printed" in out


@needs_ref
def test_install_and_uninstall_never_replace_or_remove_a_compiled_plugin():
    import shutil
    os.makedirs("/opt/cni/bin", exist_ok=True)
    shutil.copy(os.path.join(REF_DIR, "portmap"), "/opt/cni/bin/portmap")
    with open("/opt/cni/bin/portmap", "rb") as f:
        before = f.read()
    bad = cli("cni", "install", "--type", "portmap")
    assert bad.returncode == 2 and "binary plugin" in bad.stderr
    # a conflist naming that type, written by hand, then uninstalled: the binary stays
    os.makedirs(CONF_DIR, exist_ok=True)
    with open(os.path.join(CONF_DIR, "10-cnikit.conflist"), "w") as f:
        json.dump({"cniVersion": "1.0.0", "name": "cnikit", "plugins": [{"type": "portmap"}]}, f)
    out = run("cni", "uninstall").stdout
    assert "stays: a binary plugin" in out
    with open("/opt/cni/bin/portmap", "rb") as f:
        assert f.read() == before


def test_version_is_asked_as_libcni_asks_it_with_dummy_values():
    run("cni", "install")
    out = run("cni", "version").stdout
    line = [l for l in out.splitlines() if l.startswith("env CNI_COMMAND=VERSION")][0]
    assert "CNI_NETNS=dummy CNI_IFNAME=dummy CNI_PATH=dummy /opt/cni/bin/cnikit" in line
    assert '"supportedVersions"' in out
