#!/usr/bin/env python3
"""Latency and memory of plugins/cni-bash-compatible.py against the reference bridge + host-local.

    sudo /usr/bin/python3 bench/cni_latency.py [--rounds 20] [--scenario classic|minimal|all]
                                               [--pods 200] [--parallel 16] [--dad-rounds 5]
                                               [--all-forms] [--json]

Runs itself inside a private network + mount namespace (unshare), so nothing touches the
host: the pods' namespaces are bound on files in a private tmpfs and no packet is sent.
Every number is a median over alternating rounds (the order of the contenders flips each
round), measured in this run against a named baseline, and printed as a ratio:

  latency   per round and contender, pod A: ADD, CHECK, DEL with the netns and prevResult
            (containerd's StopPodSandbox, podman's rm), DEL again with CNI_NETNS="" and no
            prevResult (containerd's RemovePodSandbox: "DEL-rm"), VERSION as podman sends it
            before every ADD and DEL; pod B: ADD, then a DEL with CNI_NETNS="" and no
            prevResult as its first DEL ("DEL-bare": the netns is gone, e.g. after a reboot).
            Both contenders get the same options spelled out (their defaults differ), and the
            same work: forwardAccept off, since the reference bridge never touches FORWARD
            (ours accepts the pod's traffic there by default, for Docker hosts; the row
            "installed+forwardAccept" is our default, which has no counterpart there):
              classic  isGateway, isDefaultGateway, ipMasq
              minimal  isGateway only
  floor     `/usr/bin/python3 -I -S -c pass`, in the same rounds: VERSION's target is floor + 3 ms
  start     `/usr/bin/python3 -I -S -c "import posix; posix._exit(0)"`: the interpreter's start
            alone, without the teardown a normal exit does (the plugin skips it too), i.e. what
            any CPython plugin pays per call before doing anything: a target whose baseline is
            below it cannot be met by a plugin written in Python
  memory    peak RSS of each call: the largest VmHWM of the plugin process and the helpers
            it starts (e.g. iptables-restore), read at their exit under ptrace, in rounds of
            their own (--rss-rounds) so the tracing never touches the timings
  scale     ADD latency on a bridge with --pods pods already attached vs on an empty
            bridge (two networks of the same contender, sampled alternately)
  parallel  --parallel ADDs started at once, wall time to the last exit: throughput of ours
            over the reference's
  DAD       dual-stack (an IPv4 and an IPv6 range set, classic options), ADD on a fresh pod with
            the default accept_dad 0 and with enabledad (duplicate address detection, which ADD
            waits for): with enabledad ours must not take longer than the reference on the same
            config (--dad-rounds alternating rounds; the reference's history
            has ADD taking 1-3 s for it). The pods' router_solicitation_delay is 0: the kernel's
            random delay before DAD (0-1 s) would drown the difference in noise

Contenders: "reference" is /usr/lib/cni/bridge with ipam host-local (Debian's
containernetworking-plugins); "installed" is our plugin in the form `cnikit cni install` puts it
by default, and the other install form is measured too. --all-forms adds the file run
other ways (#!/usr/bin/env python3 with a runtime's PATH or this shell's, python3 <file>,
python3 -I -S <file>, a bare .pyc) to show where the time goes.
"""
import argparse
import inspect
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PLUGIN = os.path.join(ROOT, "plugins", "cni-bash-compatible.py")
REFERENCE_DIR = "/usr/lib/cni"
PYTHON = "/usr/bin/python3"
FLOOR = [PYTHON, "-I", "-S", "-c", "pass"]
START = [PYTHON, "-I", "-S", "-c", "import posix; posix._exit(0)"]
RUNTIME_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SUBNET = "10.244.0.0/24"
BASELINE = "reference"
OURS = "installed"
VERBS = ("ADD", "CHECK", "DEL", "DEL-rm", "DEL-bare", "VERSION", "ADD+DEL")
RSS_VERBS = ("ADD", "CHECK", "DEL", "DEL-rm", "VERSION")
SCENARIOS = {"classic": {"isGateway": True, "isDefaultGateway": True, "ipMasq": True, "forwardAccept": False},
             "minimal": {"isGateway": True, "isDefaultGateway": False, "ipMasq": False, "forwardAccept": False}}
WITH_FORWARD = OURS + "+forwardAccept"            # ours as its default has it: the Docker-host rules on top
TITLES = {"classic": "classic: isGateway, isDefaultGateway, ipMasq",
          "minimal": "minimal: isGateway only (no default route, no ipMasq)"}
PTRACE_TRACEME, PTRACE_CONT, PTRACE_SETOPTIONS = 0, 7, 0x4200
PTRACE_O_TRACEFORK, PTRACE_O_TRACEVFORK, PTRACE_O_TRACECLONE, PTRACE_O_TRACEEXIT = 0x2, 0x4, 0x8, 0x40
PTRACE_EVENT_EXIT = 6
WALL = 0x40000000                                 # waitpid's __WALL: threads and clones too
# Issue #11's targets: (what, comparison, bound)
TARGETS = {"classic": 0.9, "minimal": 1.2, "version_over_floor_ms": 3.0, "del_rm": 1.0,
           "scale": 1.2, "parallel": 1.0, "dad": 1.0}
DAD_SETTINGS = {"accept_dad 0": False, "enabledad": True}


def in_sandbox(script=__file__):
    """Run SCRIPT again in a network + mount namespace of its own (its benches build namespaces)."""
    if os.environ.get("CNIKIT_BENCH_SANDBOX") == "1":
        return
    if os.geteuid() != 0:
        sys.exit(f"needs root (it builds namespaces): sudo /usr/bin/python3 bench/{os.path.basename(script)}")
    env = dict(os.environ, CNIKIT_BENCH_SANDBOX="1")
    os.execvpe("unshare", ["unshare", "--net", "--mount", "--propagation", "private",
                           sys.executable, os.path.abspath(script)] + sys.argv[1:], env)


def config(kind, options, data_dir, bridge="cni0", subnet=SUBNET, name=None):
    """One network config with OPTIONS spelled out, for the reference or ours."""
    conf = {"cniVersion": "1.0.0", "name": name or f"bench-{kind.replace('+', '-')}", "type": "bridge", "bridge": bridge}
    conf.update(options)
    if kind == WITH_FORWARD:
        conf["forwardAccept"] = True
    conf["ipam"] = {"type": "host-local" if kind == BASELINE else "cnikit", "subnet": subnet, "dataDir": data_dir}
    return conf


def _install(cnikit, plugin_dir, **form):
    cnikit.cni_install(cnikit.Runner(quiet=True), plugin_dir=plugin_dir,
                       conf_dir=os.path.join(plugin_dir, "net.d"), **form)
    return os.path.join(plugin_dir, cnikit.CNI_TYPE)


def install_form(cnikit, form):
    """cni_install's keyword arguments for FORM: "default" (what `cnikit cni install` does
    with no option), "plain" (the file) or "precompiled" (a zipapp carrying its bytecode);
    None when this cnikit has no such option."""
    params = inspect.signature(cnikit.cni_install).parameters
    if form == "default":
        return {}
    if form == "plain":
        return {"plain": True} if "plain" in params else {"precompiled": False} if "precompiled" in params else None
    return {"precompiled": True} if "precompiled" in params else None


def installed_forms(work):
    """{name: argv}: our plugin as `cnikit cni install` puts it by default ("installed"),
    and in its other form (a plain file or a zipapp carrying bytecode), built by cnikit itself."""
    sys.path.insert(0, ROOT)
    import cnikit
    default = _install(cnikit, tempfile.mkdtemp(prefix="installed-", dir=work))
    forms = {OURS: [default], WITH_FORWARD: [default]}
    other = "precompiled" if form_label([default]).startswith("plain") else "plain"
    kwargs = install_form(cnikit, other)
    if kwargs is not None:
        path = _install(cnikit, tempfile.mkdtemp(prefix=other + "-", dir=work), **kwargs)
        if form_label([path]) != form_label([default]):
            forms["installed-" + other] = [path]
    return forms


def machine():
    """The machine a result belongs to: CPUs, CPU model, kernel, the plugin's Python, load."""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        model = "?"
    py = subprocess.run([PYTHON, "-c", "import sys; print(sys.version.split()[0])"], capture_output=True, text=True)
    return (f"{os.cpu_count()} CPUs ({model}), kernel {os.uname().release}, {PYTHON} {py.stdout.strip()}, "
            f"load average {os.getloadavg()[0]:.1f}")


def form_label(argv):
    with open(argv[0], "rb") as f:
        first, second = (f.readline().decode(errors="replace").strip() for _ in range(2))
    kind = "zipapp" if zipfile.is_zipfile(argv[0]) else "compiled" if " compiled for " in second else "plain file"
    return f"{kind}, {first}"


def contenders(work, all_forms):
    out = {BASELINE: [os.path.join(REFERENCE_DIR, "bridge")]}
    out.update(installed_forms(work))
    if all_forms:
        out["shebang"] = [PLUGIN]
        runtime_py = shutil.which("python3", path=RUNTIME_PATH)
        caller_py = shutil.which("python3")
        if caller_py and runtime_py and os.path.realpath(caller_py) != os.path.realpath(runtime_py):
            out["shebang-callerPATH"] = [PLUGIN]
        out["python3-direct"] = [PYTHON, PLUGIN]
        out["python3-I-S"] = [PYTHON, "-I", "-S", PLUGIN]
        import py_compile
        pyc = os.path.join(work, "cni-bash-compatible.bench.pyc")
        out["precompiled"] = [PYTHON, py_compile.compile(PLUGIN, cfile=pyc, doraise=True)]
    return out


def spawn(argv, stdin, env, work):
    """Start ARGV (exec'd directly, as a runtime does) with STDIN on its standard input;
    its stdout and stderr go to files."""
    files = [tempfile.TemporaryFile(dir=work) for _ in range(3)]
    files[0].write(stdin)
    files[0].seek(0)
    pid = os.posix_spawn(argv[0], argv, env,
                         file_actions=[(os.POSIX_SPAWN_DUP2, f.fileno(), fd) for fd, f in enumerate(files)])
    return pid, files


def reap(pid, files, argv, env):
    """Wait for PID; its stdout. A failed call stops the bench, saying why."""
    _, status = os.waitpid(pid, 0)
    out, err = (f.seek(0) or f.read() for f in files[1:])
    for f in files:
        f.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"bench: {argv[-1]} {env.get('CNI_COMMAND')} failed: {out!r} {err!r}")
    return out


def timed(argv, stdin, env, work):
    """(ms from spawn to exit, stdout): no tracing, nothing but the call."""
    start = time.perf_counter()
    pid, files = spawn(argv, stdin, env, work)
    out = reap(pid, files, argv, env)
    return (time.perf_counter() - start) * 1000, out


def _vmhwm_kib(tid):
    try:
        with open(f"/proc/{tid}/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), 0)
    except OSError:
        return 0


def peak_rss(argv, stdin, env, work):
    """(stdout, peak RSS in MiB) of one call: the largest VmHWM of the process and every
    process it starts (iptables-restore, ...), each read when it is about to exit (ptrace's
    exit stop, while its memory is still mapped). Not wait4's ru_maxrss: that one counts
    the spawning parent's RSS too (a fork copies its counters; exec keeps their maximum),
    so a 25 MiB bench would report at least 25 MiB for /bin/true."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    files = [tempfile.TemporaryFile(dir=work) for _ in range(3)]
    files[0].write(stdin)
    files[0].seek(0)
    pid = os.fork()
    if pid == 0:                                   # the child: traced from its exec on
        try:
            for fd, f in enumerate(files):
                os.dup2(f.fileno(), fd)
            libc.ptrace(PTRACE_TRACEME, 0, None, None)
            os.execve(argv[0], argv, env)
        finally:
            os._exit(127)
    peak, live, code = 0, {pid}, None
    opts = PTRACE_O_TRACEFORK | PTRACE_O_TRACEVFORK | PTRACE_O_TRACECLONE | PTRACE_O_TRACEEXIT
    first = True
    while live:
        tid, status = os.waitpid(-1, WALL)
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            live.discard(tid)
            if tid == pid:
                code = os.waitstatus_to_exitcode(status)
            continue
        live.add(tid)                              # a new child's first stop may come first
        sig, event = os.WSTOPSIG(status), status >> 16
        if first and tid == pid:                   # stopped at its exec: follow what it starts
            libc.ptrace(PTRACE_SETOPTIONS, pid, None, ctypes.c_void_p(opts))
            first, sig = False, 0
        elif event == PTRACE_EVENT_EXIT:
            peak, sig = max(peak, _vmhwm_kib(tid)), 0
        elif event or sig in (signal.SIGTRAP, signal.SIGSTOP):
            sig = 0                                # ptrace's own stops, not signals to pass on
        libc.ptrace(PTRACE_CONT, tid, None, ctypes.c_void_p(sig))
    out, err = (f.seek(0) or f.read() for f in files[1:])
    for f in files:
        f.close()
    if code != 0:
        raise SystemExit(f"bench: {argv[-1]} {env.get('CNI_COMMAND')} failed: {out!r} {err!r}")
    return peak / 1024, out


def new_netns(work, name):
    path = os.path.join(work, name)
    open(path, "w").close()
    subprocess.run(["unshare", f"--net={path}", "true"], check=True)
    return path


def drop_netns(path):
    subprocess.run(["umount", path], check=True)
    os.unlink(path)


def plugin_env(name, cid, netns, work, command):
    env = dict(os.environ, CNI_COMMAND=command, CNI_CONTAINERID=cid, CNI_NETNS=netns, CNI_IFNAME="eth0",
               CNI_PATH=REFERENCE_DIR, CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAME=bench",
               CNIKIT_LOG=os.path.join(work, "cni.log"))
    env["PATH"] = os.environ["PATH"] if name == "shebang-callerPATH" else RUNTIME_PATH
    if command == "VERSION":
        env.update(CNI_NETNS="dummy", CNI_IFNAME="dummy", CNI_PATH="dummy")   # libcni's (podman's) VERSION
    return env


def new_samples():
    return {"ms": {v: [] for v in VERBS}, "rss": {v: [] for v in RSS_VERBS}}


def cycle(name, argv, conf, work, round_no, s, probe="ms"):
    """One round of one contender: pod A through a runtime's whole life, pod B deleted
    without its netns as its first DEL. Appends to the samples S[PROBE]: "ms" (latency,
    untraced) or "rss" (peak RSS, traced)."""
    tag = f"{round_no}{probe}" + "".join(c for c in name if c.isalnum())  # a container id's characters
    raw = json.dumps(conf).encode()
    measure = timed if probe == "ms" else peak_rss

    def call(verb, cid, netns, stdin, command=None):
        value, out = measure(argv, stdin, plugin_env(name, cid, netns, work, command or verb), work)
        if verb in s[probe]:
            s[probe][verb].append(value)
        return out

    netns = new_netns(work, f"pod-{name}-{round_no}{probe}")
    out = call("ADD", f"benchA{tag}", netns, raw)
    with_prev = json.dumps(dict(conf, prevResult=json.loads(out))).encode()
    call("CHECK", f"benchA{tag}", netns, with_prev)
    call("DEL", f"benchA{tag}", netns, with_prev)
    call("DEL-rm", f"benchA{tag}", "", raw, "DEL")
    call("VERSION", f"benchA{tag}", netns, b'{"cniVersion":"1.0.0"}')
    if probe == "ms":
        s["ms"]["ADD+DEL"].append(s["ms"]["ADD"][-1] + s["ms"]["DEL"][-1])
    drop_netns(netns)

    netns = new_netns(work, f"podb-{name}-{round_no}{probe}")
    _, out = timed(argv, raw, plugin_env(name, f"benchB{tag}", netns, work, "ADD"), work)
    call("DEL-bare", f"benchB{tag}", "", raw, "DEL")
    # untimed: the netns's half (the reference's DEL without a netns leaves its masquerade
    # chain behind, which would slow its later rounds)
    timed(argv, json.dumps(dict(conf, prevResult=json.loads(out))).encode(),
          plugin_env(name, f"benchB{tag}", netns, work, "DEL"), work)
    drop_netns(netns)


def bench(who, options, rounds, rss_rounds, work):
    confs = {name: config(name, options, os.path.join(work, "ipam")) for name in who}
    times = {name: new_samples() for name in who}
    floor, start = [], []
    names = list(who)
    for name in names:  # warm-up: page cache, bridge creation
        cycle(name, who[name], confs[name], work, -1, new_samples())
    for i in range(rounds):
        order = names if i % 2 == 0 else names[::-1]
        if i % 2:
            floor.append(timed(FLOOR, b"", dict(os.environ), work)[0])
            start.append(timed(START, b"", dict(os.environ), work)[0])
        for name in order:
            cycle(name, who[name], confs[name], work, i, times[name])
        if not i % 2:
            start.append(timed(START, b"", dict(os.environ), work)[0])
            floor.append(timed(FLOOR, b"", dict(os.environ), work)[0])
    for i in range(rss_rounds):                    # memory: traced, so apart from the timed rounds
        for name in (names if i % 2 == 0 else names[::-1]):
            cycle(name, who[name], confs[name], work, i, times[name], probe="rss")
    med = {name: {k: {v: statistics.median(t) for v, t in per.items()} for k, per in s.items()}
           for name, s in times.items()}
    return med, {"ms": statistics.median(floor), "start_ms": statistics.median(start),
                 "rss": peak_rss(FLOOR, b"", dict(os.environ), work)[0]}


def report(title, med, floor):
    ref = med[BASELINE]["ms"]
    cols = VERBS
    print(f"\n## {title}: median ms per call (ratio to {BASELINE})")
    print(f"{'contender':22s}" + "".join(f"{c:>17s}" for c in cols))
    for name, m in med.items():
        cells = "".join(f"{m['ms'][c]:8.1f} ({m['ms'][c] / ref[c]:4.2f}x)" for c in cols)
        print(f"{name:22s}{cells}")
    print(f"{'python3 -I -S -c pass':22s}" + " " * 17 * cols.index("VERSION") + f"{floor['ms']:8.1f}")
    print(f"{'python3 start, no exit':22s}" + " " * 17 * cols.index("VERSION") + f"{floor['start_ms']:8.1f}"
          "   (the least a CPython plugin pays per call)")
    print(f"\npeak RSS per call, MiB (median; the largest VmHWM of the plugin and what it starts):")
    print(f"{'contender':22s}" + "".join(f"{c:>9s}" for c in RSS_VERBS))
    for name, m in med.items():
        print(f"{name:22s}" + "".join(f"{m['rss'][v]:9.1f}" for v in RSS_VERBS))
    print(f"{'python3 -I -S -c pass':22s}{floor['rss']:9.1f}")


def pod_net(name, index, suffix, work):
    """A network of its own for a scale or parallel measurement: bridge, subnet, IPAM dir."""
    return config(name, SCENARIOS["classic"], os.path.join(work, f"ipam-{suffix}{index}"),
                  bridge=f"b{suffix}{index}", subnet=f"10.250.{index}.0/24", name=f"{suffix}{index}")


def add_pod(name, argv, conf, work, cid):
    netns = new_netns(work, cid)
    ms = timed(argv, json.dumps(conf).encode(), plugin_env(name, cid, netns, work, "ADD"), work)[0]
    return netns, ms


def del_pod(name, argv, conf, work, cid, netns):
    timed(argv, json.dumps(conf).encode(), plugin_env(name, cid, netns, work, "DEL"), work)
    drop_netns(netns)


def scale(who, names, pods, samples, work):
    """{name: (median ADD ms on an empty bridge, median ADD ms with PODS pods on the bridge)}."""
    nets = {}
    for i, name in enumerate(names):
        empty, full = pod_net(name, 2 * i, "e", work), pod_net(name, 2 * i + 1, "f", work)
        del_pod(name, who[name], empty, work, f"se{i}w", add_pod(name, who[name], empty, work, f"se{i}w")[0])
        for p in range(pods):
            add_pod(name, who[name], full, work, f"sf{i}p{p}")
        nets[name] = {"empty": empty, "full": full}
    times = {name: {"empty": [], "full": []} for name in names}
    for r in range(samples):
        for name in (names if r % 2 == 0 else names[::-1]):
            for which in (("empty", "full") if r % 2 == 0 else ("full", "empty")):
                cid = f"s{which[0]}{names.index(name)}r{r}"
                netns, ms = add_pod(name, who[name], nets[name][which], work, cid)
                times[name][which].append(ms)
                del_pod(name, who[name], nets[name][which], work, cid, netns)
    return {name: (statistics.median(t["empty"]), statistics.median(t["full"])) for name, t in times.items()}


def parallel(who, names, n, rounds, work):
    """{name: median wall ms for N ADDs started at once}."""
    nets = {name: pod_net(name, 20 + i, "p", work) for i, name in enumerate(names)}
    walls = {name: [] for name in names}
    for r in range(-1, rounds):                  # round -1: warm-up (bridge creation)
        for name in (names if r % 2 == 0 else names[::-1]):
            argv, conf = who[name], nets[name]
            cids = [f"p{names.index(name)}r{r + 1}n{k}" for k in range(n)]
            netnss = [new_netns(work, cid) for cid in cids]
            raw = json.dumps(conf).encode()
            envs = [plugin_env(name, cid, ns, work, "ADD") for cid, ns in zip(cids, netnss)]
            start = time.perf_counter()
            running = [spawn(argv, raw, env, work) for env in envs]
            for (pid, files), env in zip(running, envs):
                reap(pid, files, argv, env)
            if r >= 0:
                walls[name].append((time.perf_counter() - start) * 1000)
            for cid, ns in zip(cids, netnss):
                del_pod(name, argv, conf, work, cid, ns)
    return {name: statistics.median(w) for name, w in walls.items()}


def dual_net(name, index, work, enabledad):
    """A dual-stack network of its own (bridge, both ranges, IPAM dir) for the DAD row."""
    conf = config(name, dict(SCENARIOS["classic"], enabledad=enabledad), os.path.join(work, f"ipam-d{index}"),
                  bridge=f"bd{index}", name=f"d{index}")
    del conf["ipam"]["subnet"]
    conf["ipam"]["ranges"] = [[{"subnet": f"10.251.{index}.0/24"}], [{"subnet": f"fd00:251:{index}::/64"}]]
    return conf


# Before its first solicitation the kernel waits a random 0 to router_solicitation_delay (1 s) (RFC 4862,
# 5.4.2), so one DAD takes 1-2 s; 0 in the pods leaves the part the plugin controls: waiting for the end.
NO_RANDOM_DELAY = "net.ipv6.conf.default.router_solicitation_delay=0"


def dad_pod(name, argv, conf, work, cid):
    """add_pod, in a netns whose new interfaces start DAD at once (no random delay)."""
    netns = new_netns(work, cid)
    subprocess.run(["nsenter", f"--net={netns}", "sysctl", "-qw", NO_RANDOM_DELAY], check=True)
    ms = timed(argv, json.dumps(conf).encode(), plugin_env(name, cid, netns, work, "ADD"), work)[0]
    return netns, ms


def dad(who, names, rounds, work):
    """{setting: {name: median ADD ms}} on dual-stack networks, DAD off (accept_dad 0) and on."""
    nets = {(name, setting): dual_net(name, 2 * i + k, work, on)
            for i, name in enumerate(names) for k, (setting, on) in enumerate(DAD_SETTINGS.items())}
    times = {setting: {name: [] for name in names} for setting in DAD_SETTINGS}
    for r in range(-1, rounds):                  # round -1: warm-up (bridge creation)
        for name in (names if r % 2 == 0 else names[::-1]):
            for setting in (list(DAD_SETTINGS) if r % 2 == 0 else list(DAD_SETTINGS)[::-1]):
                cid = f"d{names.index(name)}{setting[0]}r{r + 1}"
                netns, ms = dad_pod(name, who[name], nets[name, setting], work, cid)
                if r >= 0:
                    times[setting][name].append(ms)
                del_pod(name, who[name], nets[name, setting], work, cid, netns)
    return {setting: {name: statistics.median(t) for name, t in per.items()} for setting, per in times.items()}


def verdict(ok):
    return "meets the target" if ok else "MISSES the target"


def summary(results, floor_by_scenario, scaled, par, n_par, pods, dads=None):
    """The issue's targets, each as a measured ratio and a plain verdict."""
    print("\n## Targets (ours = `installed`, the default install form; baseline measured in the same run)")
    rows = []
    for scen, med in results.items():
        ratio = med[OURS]["ms"]["ADD+DEL"] / med[BASELINE]["ms"]["ADD+DEL"]
        rows.append((f"ADD+DEL {scen}", f"{ratio:.2f}x {BASELINE} (<= {TARGETS[scen]}x)", ratio <= TARGETS[scen]))
        ours, ref, start = med[OURS]["ms"]["DEL-rm"], med[BASELINE]["ms"]["DEL-rm"], floor_by_scenario[scen]["start_ms"]
        rows.append((f"DEL-rm (no netns, no prevResult) {scen}",
                     f"{ours / ref:.2f}x {BASELINE} (<= {TARGETS['del_rm']}x; {ours:.1f} vs {ref:.1f} ms, "
                     f"a bare python3 start {start:.1f} ms)", ours / ref <= TARGETS["del_rm"]))
        over = med[OURS]["ms"]["VERSION"] - floor_by_scenario[scen]["ms"]
        rows.append((f"VERSION {scen}", f"{med[OURS]['ms']['VERSION']:.1f} ms = python3 -I -S floor "
                     f"{floor_by_scenario[scen]['ms']:.1f} ms {over:+.1f} ms (<= +{TARGETS['version_over_floor_ms']} ms)",
                     over <= TARGETS["version_over_floor_ms"]))
    if scaled:
        e, f = scaled[OURS]
        re_, rf = scaled[BASELINE]
        rows.append((f"ADD with {pods} pods on the bridge", f"{f / e:.2f}x the first pod's ({f:.1f} vs {e:.1f} ms; "
                     f"{BASELINE} {rf / re_:.2f}x) (<= {TARGETS['scale']}x)", f / e <= TARGETS["scale"]))
    if par:
        ratio = par[BASELINE] / par[OURS]
        rows.append((f"{n_par} ADDs in parallel", f"throughput {ratio:.2f}x {BASELINE}'s ({par[OURS]:.0f} vs "
                     f"{par[BASELINE]:.0f} ms wall) (>= {TARGETS['parallel']}x)", ratio >= TARGETS["parallel"]))
    if dads:   # the whole ADD: ours starts its iptables work before the wait, so the wait hides it
        ours, ref = dads["enabledad"][OURS], dads["enabledad"][BASELINE]
        rows.append(("ADD with DAD (enabledad), dual-stack", f"{ours / ref:.2f}x {BASELINE} ({ours:.0f} vs "
                     f"{ref:.0f} ms) (<= {TARGETS['dad']}x)", ours / ref <= TARGETS["dad"]))
    for what, measured, ok in rows:
        print(f"{what:42s} {measured:78s} {verdict(ok)}")
    for scen, med in results.items():
        start, ours = floor_by_scenario[scen]["start_ms"], med[OURS]["ms"]
        below = [v for v in ("ADD+DEL", "DEL-rm") if med[BASELINE]["ms"][v] * (TARGETS[scen] if v == "ADD+DEL" else
                                                                             TARGETS["del_rm"]) < start * (2 if v == "ADD+DEL" else 1)]
        print(f"# {scen}: ours above a bare python3 start, ms per call: " + ", ".join(
            f"{v} {ours[v] - start:+.1f}" for v in ("ADD", "DEL", "DEL-rm", "VERSION"))
              + (f"; out of reach of any CPython plugin ({', '.join(below)}): the target is under its start"
                 if below else ""))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20, help="alternating rounds per scenario (default 20)")
    ap.add_argument("--rss-rounds", type=int, default=3, help="traced rounds for peak RSS (default 3)")
    ap.add_argument("--scenario", choices=("classic", "minimal", "all"), default="all")
    ap.add_argument("--pods", type=int, default=200, help="pods already on the bridge for the scale row (0: skip)")
    ap.add_argument("--scale-samples", type=int, default=10)
    ap.add_argument("--parallel", type=int, default=16, help="ADDs started at once (0: skip)")
    ap.add_argument("--parallel-rounds", type=int, default=7)
    ap.add_argument("--dad-rounds", type=int, default=5, help="alternating rounds of the dual-stack DAD row (0: skip)")
    ap.add_argument("--all-forms", action="store_true", help="also the plugin file run other ways (where time goes)")
    ap.add_argument("--json", action="store_true", help="print the medians as JSON too")
    args = ap.parse_args()
    if not (1 <= args.rounds <= 500 and 1 <= args.rss_rounds <= 50 and 0 <= args.pods <= 240 and 0 <= args.parallel <= 64
            and 1 <= args.scale_samples <= 100 and 1 <= args.parallel_rounds <= 100 and 0 <= args.dad_rounds <= 100):
        ap.error("--rounds 1-500, --rss-rounds 1-50, --pods 0-240, --parallel 0-64, --scale-samples/--parallel-rounds 1-100, "
                 "--dad-rounds 0-100")
    in_sandbox()
    work = tempfile.mkdtemp(prefix="cni-bench-")
    subprocess.run(["mount", "-t", "tmpfs", "cni-bench", work], check=True)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    try:
        who = contenders(work, args.all_forms)
        print(f"# cni_latency {time.strftime('%Y-%m-%d')}: {args.rounds} rounds, cniVersion 1.0.0; {machine()}")
        for name in who:
            if name.startswith("installed"):
                print(f"# {name}: {form_label(who[name])}")
        results, floors = {}, {}
        for scen in (SCENARIOS if args.scenario == "all" else (args.scenario,)):
            results[scen], floors[scen] = bench(who, SCENARIOS[scen], args.rounds, args.rss_rounds, work)
            report(TITLES[scen], results[scen], floors[scen])
        names = [BASELINE, OURS]
        # before the scale row, whose pods stay until the end
        par = parallel(who, names, args.parallel, args.parallel_rounds, work) if args.parallel else None
        if par:
            print(f"\n## parallel (classic): {args.parallel} ADDs at once, median wall ms of "
                  f"{args.parallel_rounds} alternating rounds")
            for name, wall in par.items():
                print(f"{name:22s} {wall:7.1f} ms   {args.parallel * 1000 / wall:6.1f} ADD/s")
        dads = dad(who, names, args.dad_rounds, work) if args.dad_rounds else None
        if dads:
            print(f"\n## DAD (dual-stack, classic): median ADD ms of {args.dad_rounds} alternating rounds, "
                  "a fresh pod each")
            for name in names:
                print(f"{name:22s}" + "   ".join(f"{setting} {per[name]:7.1f}" for setting, per in dads.items()))
        scaled = scale(who, names, args.pods, args.scale_samples, work) if args.pods else None
        if scaled:
            print(f"\n## scale (classic): median ADD ms on an empty bridge vs with {args.pods} pods on it "
                  f"({args.scale_samples} alternating samples)")
            for name, (e, f) in scaled.items():
                print(f"{name:22s} empty {e:7.1f}   {args.pods} pods {f:7.1f}   ratio {f / e:.2f}x")
        rows = summary(results, floors, scaled, par, args.parallel, args.pods, dads)
        print(f"# load average at the end {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)")
        if args.json:
            print(json.dumps({"latency": results, "floor": floors, "scale": scaled, "parallel": par, "dad": dads,
                              "targets": [{"what": w, "measured": m, "ok": ok} for w, m, ok in rows]}, indent=1))
    finally:
        subprocess.run(["umount", "-l", work])
        os.rmdir(work)


if __name__ == "__main__":
    main()
