#!/usr/bin/env python3
"""Latency of plugins/cni-bash-compatible.py against the reference bridge + host-local.

    sudo /usr/bin/python3 bench/cni_latency.py [--rounds 30] [--scenario masq|nomasq|all]

Runs itself inside a private network + mount namespace (unshare), so nothing touches the
host: the pods' namespaces are bound on files in a private tmpfs.  Each round creates a pod
namespace and runs ADD, CHECK, DEL and VERSION (as podman sends it) for each contender, in
alternating order, timing each exec from spawn to exit.  Prints medians (ms) and the
ratios against the reference.

Contenders:
  reference          /usr/lib/cni/bridge with ipam.type host-local (Debian containernetworking-plugins)
  shebang            our file exec'd directly with a runtime's PATH (/usr/sbin:/usr/bin:...), i.e.
                     #!/usr/bin/env python3 resolves to /usr/bin/python3 - what podman/containerd do
  shebang-callerPATH the same with this shell's PATH, if its python3 is another one (e.g. a pyenv shim)
  python3-direct     /usr/bin/python3 <file>
  python3-I-S        /usr/bin/python3 -I -S <file> (how much interpreter flags would save)
  precompiled        /usr/bin/python3 <the file compiled to .pyc> (what the ~15 ms per-exec compile of a
                     script costs: scripts, unlike imported modules, never use cached bytecode)
  installed          what `cnikit cni install` puts in /opt/cni/bin: the file, first line #!/usr/bin/python3 -IS
  installed-precompiled  `cnikit cni install --precompiled`: one zipapp file carrying the bytecode
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PLUGIN = os.path.join(ROOT, "plugins", "cni-bash-compatible.py")
REFERENCE_DIR = "/usr/lib/cni"
RUNTIME_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SUBNET = "10.244.0.0/24"
VERBS = ("ADD", "CHECK", "DEL", "VERSION")


def in_sandbox():
    if os.environ.get("CNIKIT_BENCH_SANDBOX") == "1":
        return
    if os.geteuid() != 0:
        sys.exit("needs root (it builds namespaces): sudo /usr/bin/python3 bench/cni_latency.py")
    env = dict(os.environ, CNIKIT_BENCH_SANDBOX="1")
    os.execvpe("unshare", ["unshare", "--net", "--mount", "--propagation", "private",
                           sys.executable, os.path.abspath(__file__)] + sys.argv[1:], env)


def config(kind, masq, data_dir):
    conf = {"cniVersion": "1.0.0", "name": f"bench-{kind}", "type": "bridge", "bridge": "cni0",
            "isGateway": True, "isDefaultGateway": True, "ipMasq": masq,
            "ipam": {"type": "host-local" if kind == "reference" else "cnikit", "subnet": SUBNET,
                     "dataDir": data_dir}}
    return conf


def contenders():
    out = {"reference": [os.path.join(REFERENCE_DIR, "bridge")], "shebang": [PLUGIN]}
    runtime_py = shutil.which("python3", path=RUNTIME_PATH)
    caller_py = shutil.which("python3")
    if caller_py and runtime_py and os.path.realpath(caller_py) != os.path.realpath(runtime_py):
        out["shebang-callerPATH"] = [PLUGIN]
    out["python3-direct"] = ["/usr/bin/python3", PLUGIN]
    out["python3-I-S"] = ["/usr/bin/python3", "-I", "-S", PLUGIN]
    import py_compile
    pyc = os.path.join(tempfile.gettempdir(), "cni-bash-compatible.bench.pyc")
    out["precompiled"] = ["/usr/bin/python3", py_compile.compile(PLUGIN, cfile=pyc, doraise=True)]
    # The two ways cnikit installs the plugin, built by cnikit itself.
    sys.path.insert(0, ROOT)
    import cnikit
    for name, precompiled in (("installed", False), ("installed-precompiled", True)):
        plugin_dir = tempfile.mkdtemp(prefix=f"cni-bench-{name}-")
        cnikit.cni_install(cnikit.Runner(quiet=True), plugin_dir=plugin_dir, conf_dir=os.path.join(plugin_dir, "net.d"),
                           precompiled=precompiled)
        out[name] = [os.path.join(plugin_dir, cnikit.CNI_TYPE)]
    return out


def timed(argv, stdin, env):
    start = time.perf_counter()
    proc = subprocess.run(argv, input=stdin, env=env, capture_output=True)
    elapsed = (time.perf_counter() - start) * 1000
    if proc.returncode != 0:
        raise RuntimeError(f"{argv} {env.get('CNI_COMMAND')} failed: {proc.stdout!r} {proc.stderr!r}")
    return elapsed, proc.stdout


def new_netns(work, name):
    path = os.path.join(work, name)
    open(path, "w").close()
    subprocess.run(["unshare", f"--net={path}", "true"], check=True)
    return path


def drop_netns(path):
    subprocess.run(["umount", path], check=True)
    os.unlink(path)


def cycle(name, argv, conf, work, round_no, times):
    netns = new_netns(work, f"pod-{name}-{round_no}")
    base = dict(os.environ, CNI_CONTAINERID=f"bench{round_no}{name.replace('-', '')}", CNI_NETNS=netns,
                CNI_IFNAME="eth0", CNI_PATH=REFERENCE_DIR, CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAME=bench",
                CNIKIT_LOG=os.path.join(work, "cni.log"))
    base["PATH"] = os.environ["PATH"] if name == "shebang-callerPATH" else RUNTIME_PATH
    raw = json.dumps(conf).encode()
    ms, out = timed(argv, raw, dict(base, CNI_COMMAND="ADD"))
    times["ADD"].append(ms)
    with_prev = json.dumps(dict(conf, prevResult=json.loads(out))).encode()
    times["CHECK"].append(timed(argv, with_prev, dict(base, CNI_COMMAND="CHECK"))[0])
    times["DEL"].append(timed(argv, with_prev, dict(base, CNI_COMMAND="DEL"))[0])
    dummy = dict(base, CNI_COMMAND="VERSION", CNI_NETNS="dummy", CNI_IFNAME="dummy", CNI_PATH="dummy")
    times["VERSION"].append(timed(argv, b'{"cniVersion":"1.0.0"}', dummy)[0])
    times["ADD+DEL"].append(times["ADD"][-1] + times["DEL"][-1])
    drop_netns(netns)


def bench(masq, rounds, work):
    who = contenders()
    times = {name: {v: [] for v in VERBS + ("ADD+DEL",)} for name in who}
    confs = {name: config("reference" if name == "reference" else "ours", masq, os.path.join(work, "ipam"))
             for name in who}
    names = list(who)
    for name in names:  # warm-up: page cache, bridge creation
        cycle(name, who[name], confs[name], work, -1, {v: [] for v in VERBS + ("ADD+DEL",)})
    for i in range(rounds):
        order = names if i % 2 == 0 else names[::-1]
        for name in order:
            cycle(name, who[name], confs[name], work, i, times[name])
    return {name: {v: statistics.median(t) for v, t in per.items()} for name, per in times.items()}


def report(title, med):
    ref = med["reference"]
    cols = ("ADD", "CHECK", "DEL", "VERSION", "ADD+DEL")
    print(f"\n## {title}: median ms (ratio to reference)")
    print(f"{'contender':22s}" + "".join(f"{c:>18s}" for c in cols))
    for name, m in med.items():
        cells = "".join(f"{m[c]:9.1f} ({m[c] / ref[c]:4.2f}x)" for c in cols)
        print(f"{name:22s}{cells}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--scenario", choices=("masq", "nomasq", "all"), default="all")
    ap.add_argument("--json", action="store_true", help="print the medians as JSON too")
    args = ap.parse_args()
    in_sandbox()
    work = tempfile.mkdtemp(prefix="cni-bench-")
    subprocess.run(["mount", "-t", "tmpfs", "cni-bench", work], check=True)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    print(f"# cni_latency: {args.rounds} rounds, subnet {SUBNET}, cniVersion 1.0.0, {os.cpu_count()} CPUs, "
          f"python3 via runtime PATH = {os.path.realpath(shutil.which('python3', path=RUNTIME_PATH) or '?')}, "
          f"via caller PATH = {shutil.which('python3')}")
    results = {}
    for masq in ((True, False) if args.scenario == "all" else (args.scenario == "masq",)):
        title = "isGateway+isDefaultGateway+ipMasq (the classic defaults)" if masq else "isGateway+isDefaultGateway, no ipMasq"
        results[title] = bench(masq, args.rounds, work)
        report(title, results[title])
    if args.json:
        print(json.dumps(results, indent=1))
    subprocess.run(["umount", "-l", work])
    os.rmdir(work)


if __name__ == "__main__":
    main()
