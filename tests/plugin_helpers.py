"""Shared helpers for the tests of plugins/cni-bash-compatible.py: run it the way a runtime
does (exec through its shebang, config on stdin, CNI_* in the environment) and look at the
real kernel with `sh`."""
import atexit
import json
import os
import shutil
import subprocess
import tempfile

import sh

import kernel
from kernel import addrs, links, routes  # noqa: F401  (the tests import them from here)

import cnikit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN_SRC = os.path.join(ROOT, "plugins", "cni-bash-compatible.py")


def compiled_plugin():
    """The plugin in the form `cni install` gives a host by default (python3 -I -S SRC --compile
    SRC OUT), built once per test process in a directory every uid can read."""
    where = tempfile.mkdtemp(prefix="cnikit-plugin-")
    os.chmod(where, 0o755)
    atexit.register(shutil.rmtree, where, True)
    out = os.path.join(where, "cni-bash-compatible")
    subprocess.run(["/usr/bin/python3", "-I", "-S", PLUGIN_SRC, "--compile", PLUGIN_SRC, out], check=True)
    return out


# The tests exec the plugin as users get it: compiled.  CNIKIT_TEST_PLUGIN=/path runs them against
# another build, e.g. the plain file (CNIKIT_TEST_PLUGIN=plugins/cni-bash-compatible.py, `install --plain`).
PLUGIN = os.path.abspath(os.environ["CNIKIT_TEST_PLUGIN"]) if os.environ.get("CNIKIT_TEST_PLUGIN") else compiled_plugin()
REFERENCE = "/usr/lib/cni"
RUNTIME_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # what runtimes pass
VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
CLASSIC = {"cniVersion": "1.0.0", "name": "fromScratch", "type": "demystifying"}


class Result:
    def __init__(self, proc):
        self.rc = proc.returncode
        self.stdout = proc.stdout.decode()
        self.stderr = proc.stderr.decode()
        self.json = json.loads(self.stdout) if self.stdout.strip() else None

    @property
    def code(self):
        return self.json.get("code") if self.json else None

    def __repr__(self):
        return f"<rc={self.rc} stdout={self.stdout!r} stderr={self.stderr[-2000:]!r}>"


def env_for(command, cid="c1", netns=None, ifname="eth0", args="IgnoreUnknown=1", path=REFERENCE, **extra):
    env = {"PATH": RUNTIME_PATH, "CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_IFNAME": ifname,
           "CNI_NETNS": netns if netns is not None else f"/run/netns/{cid}", "CNI_ARGS": args, "CNI_PATH": path}
    env.update(extra)
    return {k: v for k, v in env.items() if v is not None}


def cni(command, conf, plugin=PLUGIN, stdin=None, **kw):
    """Exec a plugin like a runtime does; returns a Result."""
    raw = stdin if stdin is not None else json.dumps(conf).encode()
    proc = subprocess.run([plugin], input=raw, env=env_for(command, **kw), capture_output=True, timeout=60)
    return Result(proc)


def ok(res):
    assert res.rc == 0, res
    assert "Traceback" not in res.stderr, res
    return res.json


def error(res, code):
    assert res.rc != 0, res
    assert res.json is not None and res.json["code"] == code, res
    assert set(res.json) >= {"cniVersion", "code", "msg"}, res
    assert "Traceback" not in res.stderr + res.stdout, res
    return res.json


def netns(name):
    sh.ip("netns", "add", name)
    return f"/run/netns/{name}"


def pod(cid, conf, ifname="eth0", **kw):
    """A namespace plus a successful ADD; returns the result."""
    ns = netns(cid)
    return ok(cni("ADD", conf, cid=cid, netns=ns, ifname=ifname, **kw))


def internet():
    """ "The internet": a namespace inet at 203.0.113.10 behind this node's uplink (203.0.113.1),
    with no route back to the pods: only masqueraded traffic can be answered."""
    netns("inet")
    sh.ip("link", "add", "uplink", "type", "veth", "peer", "name", "wan", "netns", "inet")
    sh.ip("addr", "add", "203.0.113.1/24", "dev", "uplink")
    sh.ip("link", "set", "uplink", "up")
    sh.ip("-n", "inet", "addr", "add", "203.0.113.10/24", "dev", "wan")
    sh.ip("-n", "inet", "link", "set", "wan", "up")
    return "203.0.113.10"


def nat_rules():
    return sh.iptables("-t", "nat", "-S")


def allocation_files(network, data_dir=cnikit.CNI_DATA_DIR):
    d = os.path.join(data_dir, network)
    if not os.path.isdir(d):
        return {}
    out = {}
    for name in os.listdir(d):
        if name[0].isdigit() or ":" in name:
            with open(os.path.join(d, name), "rb") as f:
                out[name] = f.read().decode()
    return out


def ping(ns, addr):
    """Assert that ADDR answers from inside NS."""
    assert kernel.ping(addr, ns), f"{ns} cannot reach {addr}"


def all_files(top):
    return sorted(os.path.join(d, f) for d, _, files in os.walk(top) for f in files)


def check_result_shape(res, version, n_ips=1):
    """The spec's result shape for the config's version."""
    assert res["cniVersion"] == version
    assert set(res) <= {"cniVersion", "interfaces", "ips", "routes", "dns"}
    ifaces = res["interfaces"]
    assert isinstance(ifaces, list) and ifaces
    for i in ifaces:
        allowed = {"name", "mac", "sandbox"} | ({"mtu"} if version == "1.1.0" else set())
        assert set(i) <= allowed and isinstance(i["name"], str) and i["name"]
        assert len(i["mac"].split(":")) == 6, i  # the classic plugin printed an empty MAC
        if version == "1.1.0":
            assert isinstance(i["mtu"], int) and i["mtu"] > 0
    assert len(res["ips"]) == n_ips
    for ip in res["ips"]:
        keys = {"address", "gateway", "interface"} | ({"version"} if version < "1.0.0" else set())
        assert set(ip) == keys, ip
        if version < "1.0.0":
            assert ip["version"] in ("4", "6")
        addr, plen = ip["address"].split("/")
        assert int(plen) <= 128
        assert 0 <= ip["interface"] < len(ifaces) and ifaces[ip["interface"]].get("sandbox")
    for r in res.get("routes", []):
        assert set(r) <= {"dst", "gw"} and "/" in r["dst"]
    assert isinstance(res.get("dns", {}), dict)
