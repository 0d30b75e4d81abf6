#!/usr/bin/env python3
"""End-to-end container start with our CNI plugin vs the reference bridge + host-local:
same runtime, same machine, same image, alternating, printed as a ratio (target <= 1.0x).

    sudo .venv/bin/python bench/container_start.py [--rounds 15] [--runtime podman|containerd|cri|all]
                                               [--form default|plain|precompiled]

One sample is a whole `podman run --rm --network NET IMAGE true` (or `ctr run --rm --cni`):
the container is created, the runtime calls the network's plugins (ADD; podman also
VERSION), the container runs and exits, the runtime DELs and removes it. For containerd's
CRI (what kubelet calls) one sample is RunPodSandbox -> StopPodSandbox -> RemovePodSandbox
over gRPC (tests/cri.py: needs grpcio and grpcio-tools, hence the venv's python): ADD, a
DEL with the netns and prevResult, and a DEL with neither; each network has a containerd
of its own (the CRI reads one CNI config directory). Both networks do the same, options
spelled out: a bridge, a veth, an address from the subnet, a default route, masquerading
(ours with forwardAccept off: the reference bridge never touches FORWARD).

It runs itself in a throwaway sandbox (network + mount namespace, private /etc/cni,
/opt/cni/bin, /var/lib/cni, /var/log; the runtimes' storage on a private tmpfs): nothing
reaches the host, and no packet leaves the sandbox. Our plugin is installed in the form
`cnikit cni install` uses by default (the first line says which), or with --form plain (install's
--plain: the readable file) or --form precompiled (install's --precompiled).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import cnikit  # noqa: E402
from cni_latency import form_label, install_form, machine  # noqa: E402
from runtimes import IMAGE, Containerd, Podman, cgroup_dirs, drop_new_cgroups, drop_scratch_dir, \
    mount_cgroups, scratch_dir  # noqa: E402

CONF_DIR = "/etc/cni/net.d"
REFERENCE_BIN = "/usr/lib/cni"
TARGET = 1.0
OURS = {"cniVersion": "1.0.0", "name": "ours", "plugins": [
    {"type": "cnikit", "bridge": "cni0", "isGateway": True, "isDefaultGateway": True, "ipMasq": True,
     "forwardAccept": False, "ipam": {"subnet": "10.244.20.0/24"}}]}
REFERENCE = {"cniVersion": "1.0.0", "name": "ref", "plugins": [
    {"type": "bridge", "bridge": "cni1", "isGateway": True, "isDefaultGateway": True, "ipMasq": True,
     "ipam": {"type": "host-local", "subnet": "10.244.21.0/24"}}]}


def write_conf(conf, only=False, conf_dir=CONF_DIR):
    """Put CONF in CONF_DIR; ONLY: as the only one (ctr takes the first file it finds)."""
    os.makedirs(conf_dir, exist_ok=True)
    if only:
        for name in os.listdir(conf_dir):
            os.unlink(os.path.join(conf_dir, name))
    with open(os.path.join(conf_dir, f"10-{conf['name']}.conflist"), "w") as f:
        json.dump(conf, f)


def timed(argv, env=None):
    started = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    elapsed = (time.perf_counter() - started) * 1000
    if proc.returncode != 0:
        raise SystemExit(f"bench: {' '.join(argv[-6:])} failed: {proc.stderr.strip()[-400:]}")
    return elapsed


def bench_podman(rounds):
    d = scratch_dir("pm")
    try:
        pm = Podman(d)
        reason = pm.cannot_start()
        if reason:
            return None, reason
        write_conf(OURS)
        write_conf(REFERENCE)
        runs = {"ours": [], "ref": []}
        for net in ("ours", "ref"):                       # warm-up: first start of each network
            timed(pm.base + ["run", "--rm", "--network", net, IMAGE, "true"], env=pm.env)
        for i in range(rounds):
            order = ("ours", "ref") if i % 2 == 0 else ("ref", "ours")
            for net in order:
                runs[net].append(timed(pm.base + ["run", "--rm", "--network", net, IMAGE, "true"], env=pm.env))
        return runs, None
    finally:
        subprocess.run(["podman", "--root", f"{d}/root", "--runroot", f"{d}/runroot", "rm", "-af"],
                       capture_output=True)
        drop_scratch_dir(d)


def bench_containerd(rounds):
    d = scratch_dir("ct")
    c = Containerd(d)
    try:
        reason = c.cannot_start()
        if reason:
            return None, reason
        runs = {"ours": [], "ref": []}
        confs = {"ours": OURS, "ref": REFERENCE}
        for i in range(rounds + 1):
            order = ("ours", "ref") if i % 2 == 0 else ("ref", "ours")
            for net in order:
                write_conf(confs[net], only=True)
                ms = timed(c.argv("run", "--rm", "--cni", IMAGE, f"b{i}{net}", "true"))
                if i:                                      # round 0 is the warm-up
                    runs[net].append(ms)
        return runs, None
    finally:
        c.stop()
        drop_scratch_dir(d)


def bench_cri(rounds):
    """RunPodSandbox -> StopPodSandbox -> RemovePodSandbox through containerd's CRI, one
    containerd per network: ours (our plugin where install put it, /opt/cni/bin, with the
    reference loopback the CRI runs for every pod linked beside it, as on a node) and the
    reference (/usr/lib/cni)."""
    try:
        from cri import CriClient
        import grpc  # noqa: F401
    except ImportError as e:
        return None, f"needs grpcio and grpcio-tools ({e}): `make deps`, then run this with .venv/bin/python"
    loopback = os.path.join(cnikit.CNI_PLUGIN_DIR, "loopback")
    if not os.path.exists(loopback):
        os.symlink(os.path.join(REFERENCE_BIN, "loopback"), loopback)
    setups = {"ours": (OURS, cnikit.CNI_PLUGIN_DIR), "ref": (REFERENCE, REFERENCE_BIN)}
    dirs, daemons, clients = [], {}, {}
    try:
        for net, (conf, bin_dir) in setups.items():
            conf_dir = f"/etc/cni/cri-{net}.d"
            write_conf(conf, only=True, conf_dir=conf_dir)
            dirs.append(scratch_dir("cr"))
            daemons[net] = Containerd(dirs[-1], cri=(bin_dir, conf_dir))
            reason = daemons[net].cannot_start()
            if reason:
                return None, reason
            clients[net] = CriClient(daemons[net].sock)
        runs = {"ours": [], "ref": []}
        for i in range(rounds + 1):
            for net in (("ours", "ref") if i % 2 == 0 else ("ref", "ours")):
                c = clients[net]
                started = time.perf_counter()
                pod = c.run_pod(f"bench{i}{net}")
                c.stop_pod(pod)
                c.remove_pod(pod)
                if i:                                      # round 0 is the warm-up
                    runs[net].append((time.perf_counter() - started) * 1000)
        return runs, None
    finally:
        for c in clients.values():
            c.close()
        for d in daemons.values():
            d.stop()
        for d in dirs:
            drop_scratch_dir(d)


def report(name, runs, reason):
    if runs is None:
        print(f"{name:<11} skipped: {reason}")
        return None
    ours, ref = statistics.median(runs["ours"]), statistics.median(runs["ref"])
    ratio = ours / ref
    verdict = "within" if ratio <= TARGET else "over"
    print(f"{name:<11} ours {ours:7.1f} ms   reference {ref:7.1f} ms   ratio {ratio:.3f}x "
          f"({verdict} the {TARGET}x target; medians of {len(runs['ours'])}, "
          f"ours min/max {min(runs['ours']):.0f}/{max(runs['ours']):.0f}, "
          f"reference {min(runs['ref']):.0f}/{max(runs['ref']):.0f})")
    return ratio


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=15, help="samples per contender (default 15)")
    p.add_argument("--runtime", choices=("podman", "containerd", "cri", "all"), default="all")
    p.add_argument("--form", choices=("default", "plain", "precompiled"), default="default",
                   help="how our plugin is installed: as `cnikit cni install` does by default, or the plain "
                        "file, or a zipapp carrying its bytecode")
    args = p.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench: needs root (it starts containers in a sandbox): sudo python3 bench/container_start.py")
    if not 1 <= args.rounds <= 500:
        raise SystemExit("bench: --rounds must be 1-500")
    cnikit.enter_sandbox()                                 # CNI dirs and /var/log private too
    mount_cgroups()
    cgroups = cgroup_dirs()
    r = cnikit.Runner(quiet=True)
    # the plugin as `cnikit cni install` puts it by default (or --form plain|precompiled)
    form = install_form(cnikit, args.form)
    if form is None:
        raise SystemExit(f"bench: this cnikit has no install option for --form {args.form}")
    cnikit.cni_install(r, "ours-install", **form)
    os.unlink(cnikit.cni_conf_file(CONF_DIR, "ours-install"))
    installed = os.path.join(cnikit.CNI_PLUGIN_DIR, cnikit.CNI_TYPE)
    first = form_label([installed])
    print(f"container start {time.strftime('%Y-%m-%d')}, {args.rounds} alternating rounds; {machine()}\n"
          f"our plugin vs bridge + host-local "
          f"(installed, form {args.form}: {first})")
    try:
        if args.runtime in ("podman", "all"):
            report("podman", *bench_podman(args.rounds))
        if args.runtime in ("containerd", "all"):
            report("containerd", *bench_containerd(args.rounds))
        if args.runtime in ("cri", "all"):
            report("cri", *bench_cri(args.rounds))
        print(f"load average at the end {os.getloadavg()[0]:.1f}")
    finally:
        drop_new_cgroups(cgroups)


if __name__ == "__main__":
    main()
