"""The kind path of `cnikit cni`, without docker: the exact docker/kubectl commands of a dry
run, and the real code path against a fake `docker` and `kubectl` on PATH (tests/fake_tools.py)
where a path cannot be produced here: a node without python3 (install python3-minimal), a node
that has it."""
import json
import os
import subprocess
import sys

import pytest

import cnikit
from fake_tools import ANY, FakeTools
from kernel import ROOT, cli

PLUGIN = cnikit.CNI_PLUGIN_SRC


@pytest.mark.noroot
def test_kind_install_dry_run_prints_every_docker_command(tmp_path):
    # A docker that knows no cluster (a fake one first on PATH, so every machine answers alike):
    # the dry run asks it, then plans for kind.yaml's two nodes.
    fake = tmp_path / "docker"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "cnikit.py"), "-v", "--dry-run", "cni", "kind-install",
                           "demo"], capture_output=True, text=True,
                          env=dict(os.environ, PATH=f"{tmp_path}:{os.environ.get('PATH', '')}"))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for node, cidr in (("demo-control-plane", "10.244.0.0/24"), ("demo-worker", "10.244.1.0/24")):
        assert (f"docker exec {node} apt-get update -qq -o APT::Update::Error-Mode=any\n"
                f"docker exec -e DEBIAN_FRONTEND=noninteractive {node} apt-get install -y -qq "
                "--no-install-recommends python3-minimal\n") in out
        # the compiled plugin, built in the node by the node's python3, then renamed into place
        staged = "/run/cnikit/build/cni-bash-compatible.py"
        assert (f"docker exec {node} mkdir -p /run/cnikit/build\n"
                f"docker cp {PLUGIN} {node}:{staged}\n"
                f"docker exec {node} /usr/bin/python3 -I -S {staged} --compile {staged} /opt/cni/bin/.cnikit.tmp\n"
                f"docker exec {node} rm -rf /run/cnikit/build\n"
                f"docker exec {node} mv -f /opt/cni/bin/.cnikit.tmp /opt/cni/bin/cnikit\n") in out
        assert (f"docker exec {node} mkdir -p /run/cnikit\n"
                f"docker exec -i {node} install -m 0644 /dev/stdin /run/cnikit/.subnet.env.tmp <<'EOF'\nCNIKIT_SUBNET={cidr}\nEOF\n"
                f"docker exec {node} mv -f /run/cnikit/.subnet.env.tmp /run/cnikit/subnet.env\n") in out
        assert f"docker exec -i {node} install -m 0644 /dev/stdin /etc/cni/net.d/.10-cnikit.conflist.tmp <<'EOF'" in out
        assert " sh -c " not in out      # plain commands only, never a shell
        assert f"{node}: no python3 (kind node images carry none): installing python3-minimal in the node" in out
    # the look-ups it makes to decide, shown with -v
    assert "# look-up: docker ps --filter label=io.x-k8s.kind.cluster=demo --format '{{.Names}}'" in out
    assert "# dry run: no docker answer, planning for kind.yaml's nodes demo-control-plane demo-worker" in out
    # the same conflist on every node; the node's subnet lives in subnet.env (flannel-style)
    conflist = out.split("10-cnikit.conflist.tmp <<'EOF'\n")[1].split("\nEOF")[0]
    # ... and the whole cluster pod range is never masqueraded: no NAT between pods (as kindnet)
    assert json.loads(conflist) == {"cniVersion": "1.0.0", "name": "cnikit", "plugins": [
        {"type": "cnikit", "nonMasqueradeCIDRs": ["10.244.0.0/16"]},
        {"type": "portmap", "capabilities": {"portMappings": True}}]}


def test_kind_install_plain_dry_run_copies_the_readable_file():
    out = cli("--dry-run", "cni", "kind-install", "demo", "--plain", check=True).stdout
    for node in ("demo-control-plane", "demo-worker"):
        assert (f"docker cp {PLUGIN} {node}:/opt/cni/bin/.cnikit.tmp\n"
                f"docker exec {node} sed -i '1s|^#!.*|#!/usr/bin/python3 -IS|' /opt/cni/bin/.cnikit.tmp\n"
                f"docker exec {node} chmod 0755 /opt/cni/bin/.cnikit.tmp\n"
                f"docker exec {node} mv -f /opt/cni/bin/.cnikit.tmp /opt/cni/bin/cnikit\n") in out
        assert f"# {node}: pods in 10.244." in out and "the plugin plain" in out
    assert "--compile" not in out
    assert out == cli("--dry-run", "cni", "install", "--kind", "demo", "--plain", check=True).stdout


def test_kind_install_another_python_plugin_is_compiled_by_ours_in_the_node(tmp_path):
    mine = tmp_path / "my-plugin"
    mine.write_text("#!/usr/bin/env python3\nprint('{}')\n")
    out = cli("--dry-run", "cni", "kind-install", "demo", "--plugin", str(mine), check=True).stdout
    build = "/run/cnikit/build"
    assert (f"docker exec demo-worker mkdir -p {build}/compiler\n"
            f"docker cp {mine} demo-worker:{build}/my-plugin\n"
            f"docker cp {PLUGIN} demo-worker:{build}/compiler/cni-bash-compatible.py\n"
            f"docker exec demo-worker /usr/bin/python3 -I -S {build}/compiler/cni-bash-compatible.py --compile "
            f"{build}/my-plugin /opt/cni/bin/.cnikit.tmp\n") in out


@pytest.mark.noroot
def test_compiled_from_reads_the_two_lines_compile_writes():
    head = ("#!/usr/bin/python3 -IScimport sys;sys.argv[:1]=[]\n# cni-bash-compatible.py compiled for /usr/bin/python3 (bytecode b'\\xa7\\r\\r\\n') "
            "by `/usr/bin/python3 -I -S cni-bash-compatible.py --compile`; source sha256 abc.\n")
    assert cnikit.compiled_from(head, "#!/usr/bin/python3 -IS", "abc")
    assert cnikit.compiled_from(head, "#!/usr/bin/python3 -IS", "abc", "b'\\xa7\\r\\r\\n'")
    assert not cnikit.compiled_from(head, "#!/usr/bin/python3 -IS", "abc", "b'\\xcb\\r\\r\\n'")   # another Python
    assert not cnikit.compiled_from(head, "#!/usr/bin/python3 -IS", "abd")                       # another source
    assert not cnikit.compiled_from(head, "#!/usr/local/bin/python3 -IS", "abc")                 # another interpreter
    plain = "#!/usr/bin/python3 -IS\n# source sha256 abc.\n"
    assert not cnikit.compiled_from(plain, "#!/usr/bin/python3 -IS", "abc")                     # not the compiled form
    assert not cnikit.compiled_from(head.replace(" -ISc", " -IS", 1).split("import")[0] + "\n" + head.split("\n")[1],
                                    "#!/usr/bin/python3 -IS", "abc")                             # no loader on line 1


def test_uninstall_kind_dry_run_removes_what_install_wrote_on_every_node():
    out = cli("--dry-run", "cni", "uninstall", "--kind", "demo", check=True).stdout
    for node in ("demo-control-plane", "demo-worker"):
        assert (f"docker exec {node} rm -f /etc/cni/net.d/10-cnikit.conflist /run/cnikit/subnet.env "
                f"/opt/cni/bin/cnikit\ndocker exec {node} rm -rf /run/cnikit/build\n") in out


@pytest.mark.noroot
def test_cluster_pod_range_is_kinds_or_the_nodes_podcidrs_merged():
    plan = lambda *cidrs: {f"n{i}": {"podCIDR": c} for i, c in enumerate(cidrs)}  # noqa: E731
    assert cnikit.kind_cluster_cidrs(plan("10.244.0.0/24", "10.244.7.0/24")) == ["10.244.0.0/16"]
    assert cnikit.kind_cluster_cidrs(plan("10.100.0.0/24", "10.100.1.0/24", "fd00:10::/64")) == \
        ["10.100.0.0/23", "fd00:10::/64"]


def test_install_kind_is_the_same_as_kind_install():
    a = cli("--dry-run", "cni", "install", "--kind", "demo", check=True).stdout
    b = cli("--dry-run", "cni", "kind-install", "demo", check=True).stdout
    assert a == b


@pytest.mark.noroot
def test_kind_install_bad_cluster_name():
    proc = cli("--dry-run", "cni", "kind-install", "Bad_Name")
    assert proc.returncode == 2 and "kind cluster name" in proc.stderr


def _fake_docker(fake, python_on):
    """docker and kubectl answering as for a two-node kind cluster `demo`."""
    fake.register(["docker", "ps", "--filter", "label=io.x-k8s.kind.cluster=demo", "--format", "{{.Names}}"],
                stdout="demo-worker\ndemo-control-plane\n")
    for i, node in enumerate(("demo-control-plane", "demo-worker")):
        fake.register(["kubectl", "--context", "kind-demo", "get", "node", node, "-o", "jsonpath={.spec.podCIDR}"],
                    stdout=f"10.244.{i + 5}.0/24")
        fake.register(["docker", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}", node],
                    stdout=f"172.18.0.{i + 2} ")
        fake.register(["docker", "exec", node, "test", "-x", "/usr/bin/python3"],
                    returncode=0 if node in python_on else 1)
    fake.register(["docker", ANY])


@pytest.mark.noroot
def test_kind_install_against_a_fake_docker_installs_python3_only_where_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cnikit, "which", lambda tool: f"/usr/bin/{tool}")
    fake = FakeTools(tmp_path, monkeypatch)
    _fake_docker(fake, python_on={"demo-worker"})
    r = cnikit.Runner(color=False)
    plan = cnikit.kind_install(r, "demo")
    out = capsys.readouterr().out
    assert plan == {"demo-control-plane": {"podCIDR": "10.244.5.0/24", "ip": "172.18.0.2", "python3": "installed"},
                    "demo-worker": {"podCIDR": "10.244.6.0/24", "ip": "172.18.0.3", "python3": "present"}}
    calls = fake.calls()
    apt = [c for c in calls if "apt-get" in " ".join(c)]
    assert {c[c.index("apt-get") - 1] for c in apt} == {"demo-control-plane"}   # only where it was missing
    assert "demo-worker: /usr/bin/python3 is there" in out
    assert "demo-control-plane: no python3" in out and "installing python3-minimal" in out
    # each node: the plugin copied then renamed, its subnet from spec.podCIDR, the shared conflist
    for node, cidr in (("demo-control-plane", "10.244.5.0/24"), ("demo-worker", "10.244.6.0/24")):
        assert ["docker", "cp", cnikit.CNI_PLUGIN_SRC, f"{node}:/run/cnikit/build/cni-bash-compatible.py"] in calls
        assert f"CNIKIT_SUBNET={cidr}" in out
    # routes to the other node's pods, as kindnet does
    assert ["docker", "exec", "demo-control-plane", "ip", "route", "replace", "10.244.6.0/24", "via",
            "172.18.0.3"] in calls
    assert ["docker", "exec", "demo-worker", "ip", "route", "replace", "10.244.5.0/24", "via", "172.18.0.2"] in calls
    # the order on a node: python3 before the plugin that needs it
    i_apt = calls.index(apt[0])
    i_cp = calls.index(["docker", "cp", cnikit.CNI_PLUGIN_SRC,
                        "demo-control-plane:/run/cnikit/build/cni-bash-compatible.py"])
    assert i_apt < i_cp


@pytest.mark.noroot
def test_kind_install_a_python3_that_cannot_compile_is_one_line_and_leaves_the_node_as_it_was(tmp_path,
                                                                                               monkeypatch):
    """A node's python3 too old for the plugin's compile (cannot be had for real here: every
    Python of this machine compiles it)."""
    monkeypatch.setattr(cnikit, "which", lambda tool: f"/usr/bin/{tool}")
    build = "/run/cnikit/build/cni-bash-compatible.py"
    fake = FakeTools(tmp_path, monkeypatch)
    fake.register(["docker", "exec", "demo-worker", "/usr/bin/python3", "-I", "-S", build, "--compile", build,
                 "/opt/cni/bin/.cnikit.tmp"], returncode=1,
                stderr="Traceback (most recent call last):\nTypeError: replace() got an unexpected keyword "
                       "argument 'co_linetable'\n")
    _fake_docker(fake, python_on={"demo-control-plane", "demo-worker"})
    with pytest.raises(cnikit.CnikitError) as e:
        cnikit.kind_install(cnikit.Runner(color=False, quiet=True), "demo")
    msg = str(e.value)
    assert msg == ("demo-worker: its /usr/bin/python3 cannot compile the plugin (TypeError: replace() got an "
                   "unexpected keyword argument 'co_linetable'): /opt/cni/bin/cnikit on demo-worker is unchanged; "
                   "demo-control-plane got it already; fix: --plain installs the readable file")
    calls = fake.calls()
    # the worker's build dir and temp file go; its plugin file is never touched
    assert ["docker", "exec", "demo-worker", "rm", "-rf", "/run/cnikit/build", "/opt/cni/bin/.cnikit.tmp"] in calls
    assert ["docker", "exec", "demo-worker", "mv", "-f", "/opt/cni/bin/.cnikit.tmp", "/opt/cni/bin/cnikit"] \
        not in calls
    assert ["docker", "exec", "demo-control-plane", "mv", "-f", "/opt/cni/bin/.cnikit.tmp",
            "/opt/cni/bin/cnikit"] in calls


@pytest.mark.noroot
def test_kind_install_no_nodes_is_a_usage_error(tmp_path, monkeypatch):
    monkeypatch.setattr(cnikit, "which", lambda tool: f"/usr/bin/{tool}")
    fake = FakeTools(tmp_path, monkeypatch)
    fake.register(["docker", "ps", ANY], stdout="")
    with pytest.raises(cnikit.UsageError, match="has no node containers"):
        cnikit.kind_install(cnikit.Runner(color=False), "demo")


def _fake_node_without_python(tmp_path, monkeypatch, update_rc, install_rc, install_err):
    monkeypatch.setattr(cnikit, "which", lambda tool: f"/usr/bin/{tool}" if tool == "docker" else None)
    fake = FakeTools(tmp_path, monkeypatch)
    fake.register(["docker", "ps", ANY], stdout="demo-control-plane\n")
    fake.register(["docker", "inspect", ANY], stdout="172.18.0.2")
    fake.register(["docker", "exec", "demo-control-plane", "test", "-x", "/usr/bin/python3"], returncode=1)
    fake.register(["docker", "exec", "demo-control-plane", "apt-get", "update", ANY], returncode=update_rc,
                stderr="" if update_rc == 0 else "E: Failed to fetch http://deb.debian.org/debian/dists/bookworm/"
                "InRelease  Could not connect to deb.debian.org:80\nE: Some index files failed to download.\n")
    fake.register(["docker", "exec", "-e", "DEBIAN_FRONTEND=noninteractive", "demo-control-plane", "apt-get",
                   "install", ANY], returncode=install_rc, stderr=install_err)
    return fake


@pytest.mark.noroot
def test_kind_install_apt_that_exits_0_without_lists_names_the_real_cause(tmp_path, monkeypatch):
    """An apt too old for Error-Mode=any: update exits 0 although no mirror answered, and the
    install then says "Unable to locate package" (apt-get's exit 0 cannot be made for real here)."""
    fake = _fake_node_without_python(tmp_path, monkeypatch, 0, 100, "E: Unable to locate package python3-minimal\n")
    with pytest.raises(cnikit.CnikitError) as e:
        cnikit.kind_install(cnikit.Runner(color=False, quiet=True), "demo")
    msg = str(e.value)
    assert msg.startswith("demo-control-plane has no python3") and "\n" not in msg
    assert "cannot reach a package mirror (apt-get update fetched no package lists)" in msg
    assert "make kind-up KIND_NODE=derived" in msg
    assert not any("docker cp" in " ".join(c) for c in fake.calls())      # nothing written


@pytest.mark.noroot
def test_python_failure_after_another_node_got_python3_says_so():
    err = cnikit.CommandFailed(["apt-get", "update"], 100, "E: Failed to fetch http://deb.debian.org/x  "
                               "Temporary failure resolving 'deb.debian.org'\n")
    msg = cnikit.kind_python_failure("demo-worker2", err, ["demo-worker"])
    assert "(Temporary failure resolving 'deb.debian.org')" in msg
    assert "nothing but python3 on demo-worker was written" in msg and "no node was changed" not in msg


@pytest.mark.noroot
def test_kind_install_other_apt_failure_is_quoted(tmp_path, monkeypatch):
    _fake_node_without_python(tmp_path, monkeypatch, 0, 100, "E: Could not get lock /var/lib/dpkg/lock-frontend\n")
    with pytest.raises(cnikit.CnikitError, match=r"apt-get failed \(E: Could not get lock"):
        cnikit.kind_install(cnikit.Runner(color=False, quiet=True), "demo")


@pytest.mark.noroot
def test_kind_yaml_and_make_targets():
    with open(os.path.join(ROOT, "kind.yaml")) as f:
        text = f.read()
    assert "disableDefaultCNI: true" in text and "role: worker" in text
    with open(os.path.join(ROOT, "kind", "Dockerfile")) as f:
        assert "python3-minimal" in f.read()
    make = subprocess.run(["make", "-s", "-n", "--no-print-directory", "-C", ROOT, "kind-up", "kind-cni", "kind-down"], capture_output=True, text=True)
    assert make.returncode == 0, make.stderr
    assert make.stdout.splitlines() == ["kind create cluster --name cnikit --config kind.yaml",
                                        "python3 cnikit.py cni kind-install cnikit",
                                        "kind delete cluster --name cnikit"]
    derived = subprocess.run(["make", "-s", "-n", "--no-print-directory", "-C", ROOT, "kind-up", "KIND_NODE=derived"], capture_output=True, text=True)
    assert derived.stdout.splitlines()[0] == "docker build -t cnikit/kind-node:latest kind/"


def test_lesson_07_kind_flow_dry_run_prints_the_classic_steps():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "stages", "07_cni.py"), "--kind", "demo", "--dry-run",
                           "--color", "never"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"kind create cluster --name demo --config {os.path.join(ROOT, 'kind.yaml')}" in out
    assert "kubectl --context kind-demo run web --image=busybox:1.36 --restart=Never -- sleep 3600" in out
    assert "docker cp " in out and "python3-minimal" in out
    assert "kubectl --context kind-demo wait --for=condition=Ready pod/web --timeout=180s" in out


# -- the plugin key kind-install writes: the cluster pod range is never masqueraded

def test_plugin_non_masquerade_cidrs_exempts_them_before_the_masquerade():
    from plugin_helpers import cni, error, nat_rules, netns, ok
    conf = {"cniVersion": "1.0.0", "name": "podnet", "type": "cnikit", "ipam": {"subnet": "10.244.1.0/24"},
            "nonMasqueradeCIDRs": ["10.244.0.0/16", "fd00:10:244::/56", "192.0.2.7/24"]}
    ok(cni("ADD", conf, cid="p1", netns=netns("p1")))
    rules = [line for line in str(nat_rules()).splitlines() if line.startswith("-A " + cnikit.CHAIN_PREFIX)]
    targets = [(line.split(" -d ")[1].split()[0] if " -d " in line else None, line.split(" -j ")[1])
               for line in rules]
    # own subnet, then the cluster range (IPv4 only in the IPv4 table; host bits dropped), then MASQUERADE
    assert targets == [("10.244.1.0/24", "ACCEPT"), ("10.244.0.0/16", "ACCEPT"), ("192.0.2.0/24", "ACCEPT"),
                       ("224.0.0.0/4", "MASQUERADE")], rules
    ok(cni("DEL", conf, cid="p1", netns="/run/netns/p1"))
    assert cnikit.CHAIN_PREFIX not in str(nat_rules())
    for bad in ("10.244.0.0/16", ["10.244.0.0/33"], ["pods"], [16]):
        res = error(cni("ADD", dict(conf, nonMasqueradeCIDRs=bad), cid="p2", netns=netns(f"p2{len(str(bad))}")), 7)
        assert "nonMasqueradeCIDRs" in res["msg"]
    assert cnikit.CHAIN_PREFIX not in str(nat_rules())
