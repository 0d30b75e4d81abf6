#!/usr/bin/env python3
"""Contention: N ADDs started at once on one network, then their N DELs at once; ours against
the reference bridge + host-local, each call's own latency.

    sudo /usr/bin/python3 bench/cni_contention.py [--pods 32] [--rounds 7] [--json]

Runs itself inside a private network + mount namespace (unshare), as bench/cni_latency.py
does (whose helpers it uses): the pods' namespaces are files in a private tmpfs, no packet is
sent. Each contender has one network of its own (bridge, subnet, IPAM directory, classic
options, forwardAccept off as the reference has no such thing). A round, per contender in
alternating order: N namespaces, N ADDs spawned together, each timed from its spawn to its
exit; then N DELs (netns and prevResult: containerd's StopPodSandbox) spawned together.
Reported: the median call over all rounds, as a ratio to the reference's in the same run (the
target: <= 1.0x for ADD and DEL), the spread of the per-round medians, and each burst's wall
time. Contenders: the reference, ours as `cnikit cni install` puts it by default, and ours in
its other install form (the plain file, or the compiled one).

The floor, in the same rounds: N VERSION calls at once (a program that starts, answers and
exits: the reference's Go binary, ours, which loads only its head for it) and N bare starts of
the plugin's Python (`python3 -I -S`), so an ADD's median can be read as its start under the
same contention plus its work.
"""
import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("cni_latency", os.path.join(HERE, "cni_latency.py"))
lat = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lat)

BASELINE, OURS = lat.BASELINE, lat.OURS
TARGETS = {"ADD": 1.0, "DEL": 1.0}      # issue #18: ours' median call over the reference's


def burst(argv, stdins, envs, work):
    """Spawn every call at once; [(ms from its own spawn to its own exit, CPU ms, stdout)] in
    order. The bench blocks in wait4(-1), so each exit is seen as it happens; the CPU time is
    the call's and that of the helpers it waited for (host-local, iptables-restore)."""
    started, running = [], {}
    for i, (stdin, env) in enumerate(zip(stdins, envs)):
        t = time.perf_counter()
        pid, files = lat.spawn(argv, stdin, env, work)
        started.append(t)
        running[pid] = (i, files, env)
    results = [None] * len(envs)
    while running:
        pid, status, usage = os.wait4(-1, 0)
        done = time.perf_counter()
        i, files, env = running.pop(pid)
        out, err = (f.seek(0) or f.read() for f in files[1:])
        for f in files:
            f.close()
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"bench: {argv[-1]} {env.get('CNI_COMMAND')} failed: {out!r} {err!r}")
        results[i] = ((done - started[i]) * 1000, (usage.ru_utime + usage.ru_stime) * 1000, out)
    return results


def network(name, index, work):
    return lat.config(name, lat.SCENARIOS["classic"], os.path.join(work, f"ipam-c{index}"),
                      bridge=f"bc{index}", subnet=f"10.251.{index}.0/24", name=f"contention{index}")


def one_round(name, argv, conf, n, work, tag):
    """ADD N pods at once, then DEL them at once: ({"ADD": [ms...], "DEL": [ms...]}, walls)."""
    cids = [f"c{tag}n{k}" for k in range(n)]
    netnss = [lat.new_netns(work, cid) for cid in cids]
    raw = json.dumps(conf).encode()
    t = time.perf_counter()
    added = burst(argv, [raw] * n, [lat.plugin_env(name, c, ns, work, "ADD") for c, ns in zip(cids, netnss)], work)
    add_wall = (time.perf_counter() - t) * 1000
    dels = [json.dumps(dict(conf, prevResult=json.loads(out))).encode() for _, _, out in added]
    t = time.perf_counter()
    deleted = burst(argv, dels, [lat.plugin_env(name, c, ns, work, "DEL") for c, ns in zip(cids, netnss)], work)
    del_wall = (time.perf_counter() - t) * 1000
    for ns in netnss:
        lat.drop_netns(ns)
    return ({"ADD": [ms for ms, _, _ in added], "DEL": [ms for ms, _, _ in deleted]},
            {"ADD": [cpu for _, cpu, _ in added], "DEL": [cpu for _, cpu, _ in deleted]},
            {"ADD": add_wall, "DEL": del_wall})


def floor_round(argv, n, work):
    """N VERSION calls (or bare starts) at once: [ms from each spawn to its exit]."""
    envs = [lat.plugin_env("floor", f"f{k}", "dummy", work, "VERSION") for k in range(n)]
    return [ms for ms, _, _ in burst(argv, [b'{"cniVersion":"1.0.0"}'] * n, envs, work)]


def contend(who, n, rounds, work, floors=None):
    floors = floors or {}
    floor_ms = {name: [] for name in floors}
    names = list(who)
    nets = {name: network(name, i, work) for i, name in enumerate(names)}
    calls = {name: {"ADD": [], "DEL": []} for name in names}
    per_round = {name: {"ADD": [], "DEL": []} for name in names}
    walls = {name: {"ADD": [], "DEL": []} for name in names}
    cpus = {name: {"ADD": [], "DEL": []} for name in names}
    for r in range(-1, rounds):                 # round -1: warm-up (bridge creation, page cache)
        for name in (names if r % 2 == 0 else names[::-1]):
            ms, cpu, wall = one_round(name, who[name], nets[name], n, work, f"{names.index(name)}r{r + 1}")
            if r < 0:
                continue
            for verb in ("ADD", "DEL"):
                calls[name][verb] += ms[verb]
                per_round[name][verb].append(statistics.median(ms[verb]))
                walls[name][verb].append(wall[verb])
                cpus[name][verb] += cpu[verb]
        for name in (list(floors) if r % 2 == 0 else list(floors)[::-1]):
            ms = floor_round(floors[name], n, work)
            if r >= 0:
                floor_ms[name] += ms
    res = {name: {verb: {"median": statistics.median(calls[name][verb]),
                          "rounds": sorted(per_round[name][verb]),
                          "p90": statistics.quantiles(calls[name][verb], n=10)[-1],
                          "wall": statistics.median(walls[name][verb]),
                          "cpu": statistics.median(cpus[name][verb])}
                   for verb in ("ADD", "DEL")} for name in names}
    return res, {name: statistics.median(ms) for name, ms in floor_ms.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pods", type=int, default=32, help="calls started at once (default 32)")
    ap.add_argument("--rounds", type=int, default=7, help="alternating rounds (default 7)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = ap.parse_args()
    if not (2 <= args.pods <= 200 and 1 <= args.rounds <= 100):
        ap.error("--pods 2-200, --rounds 1-100")
    lat.in_sandbox(__file__)
    work = tempfile.mkdtemp(prefix="cni-contention-")
    subprocess.run(["mount", "-t", "tmpfs", "cni-contention", work], check=True)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    try:
        who = {BASELINE: [os.path.join(lat.REFERENCE_DIR, "bridge")]}
        who.update((k, v) for k, v in lat.installed_forms(work).items() if k != lat.WITH_FORWARD)
        print(f"# cni_contention {time.strftime('%Y-%m-%d %H:%M')}: {args.pods} ADDs at once on one network, "
              f"then their DELs, {args.rounds} rounds, classic options; {lat.machine()}")
        for name in who:
            if name.startswith("installed"):
                print(f"# {name}: {lat.form_label(who[name])}")
        floors = {f"{BASELINE} VERSION": who[BASELINE], f"{OURS} VERSION": who[OURS],
                  "python3 -I -S start": lat.START}
        res, floor = contend(who, args.pods, args.rounds, work, floors)
        ref = res[BASELINE]
        print(f"\n## median ms per call (ratio to {BASELINE}), per-round medians min-max, p90, wall of the burst, "
              "median CPU ms per call (its own and its helpers')")
        for name, r in res.items():
            print(f"{name:22s}" + "".join(
                f"  {verb} {r[verb]['median']:6.1f} ({r[verb]['median'] / ref[verb]['median']:4.2f}x) "
                f"[{r[verb]['rounds'][0]:.0f}-{r[verb]['rounds'][-1]:.0f}] p90 {r[verb]['p90']:.0f} "
                f"wall {r[verb]['wall']:.0f} cpu {r[verb]['cpu']:.1f}" for verb in ("ADD", "DEL")))
        print(f"\n## floor: median ms from spawn to exit of {args.pods} at once, same rounds; "
              "ADD's median above its own VERSION floor")
        for name, ms in floor.items():
            print(f"floor {name:22s} {ms:6.1f}")
        for name in (BASELINE, OURS):
            print(f"ADD above floor {name:12s} {res[name]['ADD']['median'] - floor[f'{name} VERSION']:6.1f}")
        print(f"\n## Targets (ours = `{OURS}`, the default install form; baseline measured in the same run)")
        rows = []
        for verb in ("ADD", "DEL"):
            ratio = res[OURS][verb]["median"] / ref[verb]["median"]
            rows.append((f"{args.pods} {verb}s at once", ratio, ratio <= TARGETS[verb]))
            print(f"{rows[-1][0]:22s} median call {ratio:.2f}x {BASELINE} ({res[OURS][verb]['median']:.0f} vs "
                  f"{ref[verb]['median']:.0f} ms) (<= {TARGETS[verb]}x) {lat.verdict(rows[-1][2])}")
        print(f"# load average at the end {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)")
        if args.json:
            print(json.dumps({"results": res, "floor": floor, "targets": [{"what": w, "ratio": r, "ok": ok} for w, r, ok in rows]},
                             indent=1))
    finally:
        subprocess.run(["umount", "-l", work])
        os.rmdir(work)


if __name__ == "__main__":
    main()
