"""--dry-run fidelity (its text, replayed with `sh -e` in a fresh sandbox, builds the
same kernel state as the real run) and bad input (exit 2, one line, nothing changed)."""
import json
import os
import subprocess
import sys

import pytest

from kernel import CLI, ROOT, cli, cli_env, snapshot

NAMESPACES = ["ns1", "ns2", "inet", "node1"]

# A small world: two pods on br0, NAT out through an uplink, and a vxlan in a host namespace.
SCENARIO = [
    ["netns", "add", "ns1", "--lo-up"],
    ["netns", "add", "ns2"],
    ["netns", "add", "inet", "--lo-up"],
    ["netns", "add", "node1", "--lo-up"],
    ["bridge", "add", "br0", "--addr", "10.0.0.1/24"],
    ["veth", "add", "veth-ns1", "eth0", "--netns", "ns1", "--peer-addr", "10.0.0.2/24"],
    ["veth", "add", "veth-ns2", "eth0", "--netns", "ns2", "--peer-addr", "10.0.0.3/24", "--mtu", "1400"],
    ["bridge", "attach", "br0", "veth-ns1", "veth-ns2"],
    ["veth", "add", "uplink", "eth0", "--netns", "inet", "--addr", "203.0.113.1/24",
     "--peer-addr", "203.0.113.10/24"],
    ["nat", "add", "10.0.0.0/24", "--out", "uplink"],
    ["-n", "node1", "veth", "add", "under0", "under1", "--addr", "192.0.2.1/24", "--peer-addr", "192.0.2.9/24"],
    ["-n", "node1", "bridge", "add", "br0"],
    ["-n", "node1", "vxlan", "add", "vxlan0", "--id", "42", "--remote", "192.0.2.2", "--dev", "under0",
     "--bridge", "br0"],
    ["-n", "node1", "vxlan", "fdb", "add", "vxlan0", "02:00:00:00:00:02", "--dst", "192.0.2.2"],
]

SNAPSHOT = ("import json, sys; sys.path.insert(0, {tests!r}); from kernel import snapshot; "
            "print(json.dumps(snapshot({names!r})))").format(tests=os.path.join(ROOT, "tests"), names=NAMESPACES)


def in_fresh_sandbox(script):
    """Run a shell SCRIPT in a nested throwaway sandbox and return the kernel snapshot it leaves."""
    proc = subprocess.run([*CLI, "-q", "sandbox", "--", "sh", "-c", script + f"\n{sys.executable} -c \"$SNAP\""],
                          capture_output=True, text=True, env=cli_env(dict(os.environ, SNAP=SNAPSHOT)))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_dry_run_replayed_with_sh_builds_the_same_kernel_state_as_the_real_run(tmp_path):
    real_script = "set -e\n" + "\n".join(
        " ".join([*CLI, "-q"] + [f"'{a}'" for a in cmd]) + " >/dev/null"
        for cmd in SCENARIO)
    real = in_fresh_sandbox(real_script)
    plan = "".join(cli("--dry-run", *cmd, check=True).stdout for cmd in SCENARIO)
    (tmp_path / "plan.sh").write_text(plan)
    assert "ip -n node1 link add vxlan0 mtu 1450" in plan and "iptables -w -t nat -A POSTROUTING" in plan
    replayed = in_fresh_sandbox(f"dash -e {tmp_path / 'plan.sh'} >/dev/null")     # Debian's sh
    assert replayed == real
    assert real["node1"]["links"]["vxlan0"]["mtu"] == 1450


BAD = [
    (["veth", "add", "x" * 16, "eth0"], "at most 15"),
    (["veth", "add", "v0", "eth/0"], "'/'"),
    (["veth", "add", "v0", "eth:0"], "':'"),
    (["veth", "add", "v0", "eth0", "--addr", "10.0.0.1"], "prefix length"),
    (["veth", "add", "v0", "eth0", "--addr", "10.0.0.256/24"], "not an address"),
    (["veth", "add", "v0", "eth0", "--netns", "missing"], "does not exist"),
    (["veth", "add", "v0", "eth0", "--mtu", "9"], "MTU"),
    (["bridge", "add", "br0", "--addr", "nonsense"], "not an address"),
    (["bridge", "attach", "nobr", "eth0"], "does not exist"),
    (["nat", "add", "10.0.0.1/24", "--out", "eth0"], "CIDR"),
    (["nat", "add", "10.0.0.0/24", "--out", "a b"], "whitespace"),
    (["vxlan", "add", "vx0", "--id", "0", "--remote", "192.0.2.2"], "VNI"),
    (["vxlan", "add", "vx0", "--id", "16777216", "--remote", "192.0.2.2"], "VNI"),
    (["vxlan", "add", "vx0", "--id", "5", "--remote", "192.0.2.2", "--dstport", "70000"], "dstport"),
    (["vxlan", "add", "vx0", "--id", "5", "--remote", "not-an-ip"], "not an IP"),
    (["vxlan", "add", "vx0", "--id", "5", "--group", "192.0.2.2", "--dev", "lo"], "multicast"),
    (["vxlan", "fdb", "add", "vx0", "zz:00:00:00:00:00", "--dst", "192.0.2.2"], "MAC"),
    (["-n", "nowhere", "bridge", "add", "br0"], "does not exist"),
    (["-n", "../etc", "bridge", "add", "br0"], "namespace name"),
    (["netns", "add", "../../tmp/x"], "namespace name"),
    (["netns", "exec", "missing", "--", "true"], "does not exist"),
    (["bridge", "add"], "required"),
    (["nat", "add", "10.0.0.0/24", "--out", "nope0"], "does not exist"),
    (["-n", "ns1", "netns", "add", "x"], "does not apply to netns"),
    (["-n", "missing", "show"], "does not exist"),
    (["-n", "missing", "cleanup"], "does not exist"),
    # issue 14: every option a `cni` verb accepts is checked; none is silently ignored
    (["cni", "gc", "a/b"], "NETNS does not apply"),
    (["cni", "version", "--args", "=x"], "--args does not apply"),
    (["cni", "check", "pod1", "--args", "=x"], "has no KEY"),
    (["cni", "status", "--args", "=x"], "--args does not apply"),
    (["cni", "gc", "--args", "=x"], "--args does not apply"),
    (["cni", "add", "pod1", "--args", "=x"], "has no KEY"),
    (["cni", "del", "pod1", "--runtime-config", "null"], "must be a JSON object"),
    (["cni", "add", "pod1", "--runtime-config", "[1]"], "must be a JSON object"),
    (["cni", "del", "pod1", "--runtime-config", ""], "--runtime-config is empty"),
    (["cni", "check", "pod1", "--runtime-config", "{}"], "--runtime-config does not apply"),
    (["cni", "version", "--ifname", "eth1"], "--ifname does not apply"),
    (["cni", "status", "--id", "c1"], "--id does not apply"),
    (["cni", "install", "--python", ""], "--python is empty"),
    (["cni", "install", "--python", "python3"], "absolute path"),
    (["cni", "install", "--subnet", ""], "--subnet is empty"),
    (["cni", "install", "--cni-version", ""], "--cni-version is empty"),
    (["cni", "install", "--plugin", ""], "--plugin is empty"),
    (["cni", "install", "--plugin-dir", "opt/cni/bin"], "absolute path"),
    (["cni", "uninstall", "--conf-dir", ""], "--conf-dir is empty"),
    (["cni", "add", "pod1", "--conf", ""], "--conf is empty"),
    (["cni", "add", "pod1", "--cni-path", ":"], "names no directory"),
    (["cni", "log", "--conf", ""], "--conf is empty"),
]


@pytest.mark.parametrize("argv,why", BAD, ids=[" ".join(a)[:40] for a, _ in BAD])
def test_bad_input_exits_2_with_one_line_and_changes_nothing(argv, why):
    before = snapshot()
    proc = cli(*argv)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("cnikit: error:"), proc.stderr
    assert why in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stdout == ""
    assert snapshot() == before
