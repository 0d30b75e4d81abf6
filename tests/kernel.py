"""Test helpers that look at the real kernel (through `sh`) and run the cnikit CLI."""
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile

import sh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CNIKIT = os.path.join(ROOT, "cnikit.py")


# `python3 -m cnikit`, the form README gives scripts: the same CLI as `python3 cnikit.py`, but it loads
# cached bytecode (`make test` compiles it first) where a script is compiled on every start.
CLI = [sys.executable, "-m", "cnikit"]


def cli_env(env=None):
    """ENV (default: this process's) with cnikit importable, for CLI."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def cli(*args, check=False, input=None):
    """Run `python3 -m cnikit ARGS` as a user would; returns the CompletedProcess."""
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True, input=input, env=cli_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"cnikit {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


NOBODY = 65534


def _others_can_enter(path):
    """Can a user who is not root reach files in PATH (o+x on it and every parent)?"""
    path = os.path.abspath(path)
    while True:
        if not os.stat(path).st_mode & stat.S_IXOTH:
            return False
        if path == "/":
            return True
        path = os.path.dirname(path)


def cli_as_nobody(*args):
    """Run `python3 cnikit.py ARGS` as uid/gid 65534, as a user without root would. It runs
    a world-readable copy of cnikit.py (all it needs: stdlib only) from a temp directory,
    because the checkout may live where that user cannot read, e.g. a clone in /root (0700)."""
    base = next(d for d in (tempfile.gettempdir(), "/tmp", "/dev/shm") if os.path.isdir(d) and _others_can_enter(d))
    with tempfile.TemporaryDirectory(prefix="cnikit-nobody-", dir=base) as d:
        os.chmod(d, 0o755)
        shutil.copyfile(CNIKIT, os.path.join(d, "cnikit.py"))
        os.chmod(os.path.join(d, "cnikit.py"), 0o644)
        return subprocess.run(["python3", "cnikit.py", *args], capture_output=True, text=True, cwd=d,
                              user=NOBODY, group=NOBODY, extra_groups=[], stdin=subprocess.DEVNULL)


def run_stage(script, *args, input=None, env=None, timeout=300):
    """Run stages/SCRIPT (a lesson) as a learner would, colours off; stdin closed unless INPUT."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "stages", script), "--color", "never", *args],
                          capture_output=True, text=True, input=input, env=env, timeout=timeout,
                          stdin=None if input is not None else subprocess.DEVNULL)


def _ns(ns):
    return ["-n", ns] if ns else []


def command_output(*argv):
    """ARGV's output; a failure raises what `sh` would (sh.ErrorReturnCode). The readers below run
    often (every snapshot), and a call through `sh` costs tens of ms (a pty, four threads)."""
    proc = subprocess.run(argv, capture_output=True)
    rc = proc.returncode
    if rc != 0:
        import signal
        error = f"ErrorReturnCode_{rc}" if rc > 0 else f"SignalException_{signal.Signals(-rc).name}"
        raise getattr(sh, error)(" ".join(argv), proc.stdout, proc.stderr)
    return proc.stdout.decode()


def links(ns=None):
    """{ifname: `ip -j -d link` record} in NS (or here)."""
    return {l["ifname"]: l for l in json.loads(command_output("ip", *_ns(ns), "-j", "-d", "link", "show"))}


def veths(ns=None):
    """Names of the veth-named links in NS (a CNI plugin's host ends), sorted."""
    return sorted(name for name in links(ns) if name.startswith("veth"))


def addrs(dev, ns=None):
    data = json.loads(command_output("ip", *_ns(ns), "-j", "addr", "show", "dev", dev))
    return sorted(f"{a['local']}/{a['prefixlen']}" for a in data[0]["addr_info"] if a["family"] == "inet")


def routes(ns=None):
    return json.loads(command_output("ip", *_ns(ns), "-j", "route", "show"))


def netns_list():
    return sorted(n["name"] for n in json.loads(command_output("ip", "-j", "netns", "list") or "[]"))


def ping(addr, ns=None, count=1):
    """True when ADDR answers from inside NS."""
    args = ["-c", str(count), "-W", "2", addr]
    return subprocess.run([*(["ip", "netns", "exec", ns] if ns else []), "ping", *args],
                          capture_output=True).returncode == 0


def iptables_rules(table="filter", ns=None):
    argv = ["iptables", "-t", table, "-S"]
    out = command_output("ip", "netns", "exec", ns, *argv) if ns else command_output(*argv)
    return [line for line in out.splitlines() if line.startswith("-A")]


def _settled(route):
    """ROUTE without its "linkdown" flag: the kernel sets it from the device's carrier later, by
    itself (linkwatch, up to a second after a bridge's last port goes), so two runs that made the
    same objects can be read a moment apart with it set and without."""
    return dict(route, flags=[f for f in route.get("flags", []) if f != "linkdown"])


def snapshot(namespaces=()):
    """Kernel state comparable across runs: links (no MACs, ifindexes), addresses,
    routes, iptables rules, per namespace."""
    state = {}
    for ns in [None, *namespaces]:
        ls = {}
        # every link's addresses in one look (addrs() per link would run `ip` once per link)
        inet = {a["ifname"]: sorted(f"{i['local']}/{i['prefixlen']}" for i in a["addr_info"] if i["family"] == "inet")
                for a in json.loads(command_output("ip", *_ns(ns), "-j", "addr", "show"))}
        for name, l in links(ns).items():
            info = l.get("linkinfo", {})
            ls[name] = {"kind": info.get("info_kind"), "mtu": l["mtu"], "up": "UP" in l["flags"],
                        "master": l.get("master"), "alias": l.get("ifalias"),
                        "vxlan": {k: v for k, v in info.get("info_data", {}).items()
                                  if k in ("id", "remote", "port", "local", "group")}
                        if info.get("info_kind") == "vxlan" else None,
                        "addrs": inet.get(name, [])}
        state[ns or "host"] = {"links": ls,
                               "routes": sorted(json.dumps(_settled(r), sort_keys=True) for r in routes(ns)),
                               "nat": iptables_rules("nat", ns), "filter": iptables_rules("filter", ns),
                               "forwarding": command_output(*(["ip", "netns", "exec", ns] if ns else []),
                                                  "sysctl", "-n", "net.ipv4.ip_forward").strip()}
    state["netns"] = netns_list()
    return state


def marked(var, mark):
    """PIDs of live processes (not zombies) whose environment carries VAR=MARK: everything a run
    started with it in its environment, however deep (children inherit it)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        if f"{var}={mark}".encode() in env and stat[stat.rindex(")") + 2:][:1] != "Z":
            found.append(int(pid))
    return found


def kill_left(var, mark, grace=2.0):
    """The command lines of what a marked run left alive after GRACE seconds (a stopped process
    gets a moment to go), each killed so it never leaks out of the test; [] when nothing was left."""
    import signal
    import time
    deadline = time.monotonic() + grace
    while (left := marked(var, mark)) and time.monotonic() < deadline:
        time.sleep(0.05)
    names = []
    for pid in left:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                names.append(f.read().replace(b"\0", b" ").decode(errors="replace").strip())
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return names

def changes(before, after):
    """What differs between two kernel_state()s that the kernel would not have done by itself:
    any change of links, addresses, routes, rules or sysctls; a new neighbour or a new flow
    (one that ages out, or a TCP flow closing, is the kernel's own doing)."""
    out = []
    for ns in sorted(set(before) | set(after)):
        b, a = before.get(ns, {}), after.get(ns, {})
        for key in sorted(set(b) | set(a)):
            if key in ("neigh", "conntrack"):
                new = a.get(key, set()) - b.get(key, set())
                if new:
                    out.append(f"{ns} {key}: new {sorted(new)}")
            elif b.get(key) != a.get(key):
                out.append(f"{ns} {key}: {b.get(key)!r} -> {a.get(key)!r}")
    return out


def load_file(path, name):
    """The Python file PATH as a fresh module NAME: a lesson (stages/ goes on the path, for the
    `lesson` module it imports) or the plugin, whose file names are not module names."""
    import importlib.util
    stages = os.path.join(ROOT, "stages")
    if stages not in sys.path:
        sys.path.insert(0, stages)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
