"""The plugin under soak and fuzz, bounded in time (each test stops itself after SECONDS): parallel
ADD/DEL rounds and kill -9 in the middle of ADD (IPv4 and dual-stack), and fuzzed configs.  After each, the invariants a
runtime relies on: every live pod keeps a distinct address it really has, DEL leaves nothing (no
address file, record, temporary file, veth or rule), and no call answers with a traceback."""
import json
import os
import random
import signal
import subprocess
import time

import pytest
import sh

import cnikit
from plugin_helpers import CLASSIC, PLUGIN, allocation_files, cni, env_for, links, nat_rules, netns

SECONDS = float(os.environ.get("CNIKIT_SOAK_SECONDS", "6"))  # longer: CNIKIT_SOAK_SECONDS=600
DATA = os.path.join(cnikit.CNI_DATA_DIR, "fromScratch")
# The classic config, and the same with an IPv6 range set beside the IPv4 one (dual-stack)
DUAL = dict(CLASSIC, ipam={"ranges": [[{"subnet": "10.244.0.0/24"}], [{"subnet": "fd00:244::/64"}]]})
FAMILIES = pytest.mark.parametrize("conf", [CLASSIC, DUAL], ids=["ipv4", "dual-stack"])


def start(command, conf, cid):
    return subprocess.Popen([PLUGIN], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env_for(command, cid=cid, netns=f"/run/netns/{cid}" if command == "ADD" else ""))


def finish(proc, conf):
    out, err = proc.communicate(json.dumps(conf).encode(), timeout=60)
    assert b"Traceback" not in err, err[-2000:]
    return proc.returncode, json.loads(out) if out.strip() else None


def leftovers():
    """What DEL of every pod must have removed."""
    tmp = os.path.join(DATA, ".cnikit", "tmp")
    records = os.path.join(DATA, ".cnikit", "attachments")
    return {"addresses": allocation_files("fromScratch"),
            "records": sorted(os.listdir(records)) if os.path.isdir(records) else [],
            "temporary": sorted(os.listdir(tmp)) if os.path.isdir(tmp) else [],
            "veths": sorted(n for n in links() if n.startswith("veth")),
            "rules": [r for r in nat_rules().splitlines() + str(sh.iptables("-S")).splitlines()
                      + str(sh.ip6tables("-t", "nat", "-S")).splitlines() + str(sh.ip6tables("-S")).splitlines()
                      if cnikit.CHAIN_PREFIX in r]}


def addresses(res):
    return [ip["address"].split("/")[0] for ip in res["ips"]]


EMPTY = {"addresses": {}, "records": [], "temporary": [], "veths": [], "rules": []}


@FAMILIES
def test_parallel_add_and_del_rounds_keep_addresses_distinct_and_leave_nothing(conf):
    deadline, rounds = time.monotonic() + SECONDS, 0
    while time.monotonic() < deadline or rounds < 2:
        cids = [f"r{rounds}p{i}" for i in range(8)]
        for cid in cids:
            netns(cid)
        adds = [(cid, start("ADD", conf, cid)) for cid in cids]
        got = {}
        for cid, proc in adds:
            rc, res = finish(proc, conf)
            assert rc == 0, res
            got[cid] = addresses(res)
        per_pod = len(conf["ipam"]["ranges"]) if "ipam" in conf else 1     # an address per family
        assert len({a for addrs in got.values() for a in addrs}) == len(cids) * per_pod
        assert allocation_files("fromScratch") == {a: f"{c}\r\neth0" for c, addrs in got.items() for a in addrs}
        dels = [start("DEL", conf, cid) for cid in cids]  # containerd's second DEL: no netns, no prevResult
        assert all(finish(p, conf)[0] == 0 for p in dels)
        assert leftovers() == EMPTY
        for cid in cids:
            os.system(f"ip netns del {cid}")
        rounds += 1


@FAMILIES
def test_kill_9_during_add_then_del_leaves_nothing_and_other_pods_untouched(conf):
    rng = random.Random(11)
    live = cni("ADD", dict(conf), cid="live", netns=netns("live")).json
    live_rules = leftovers()["rules"]
    deadline, kills = time.monotonic() + SECONDS, 0
    while time.monotonic() < deadline or kills < 5:
        cid = f"k{kills}"
        netns(cid)
        proc = start("ADD", conf, cid)
        proc.stdin.write(json.dumps(conf).encode())
        proc.stdin.close()
        time.sleep(rng.uniform(0.0, 0.06))  # anywhere from start-up to the rules
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        rc, res = finish(start("DEL", conf, cid), conf)  # what a runtime does after a failed ADD
        assert rc == 0, res
        os.system(f"ip netns del {cid}")
        kills += 1
        left = leftovers()
        assert left["addresses"] == {a: "live\r\neth0" for a in addresses(live)}, left
        assert len(left["records"]) == 1 and left["veths"] == [live["interfaces"][1]["name"]]
        assert left["rules"] == live_rules and left["temporary"] == [], left
    for ip in live["ips"]:  # the live pod still reaches its gateway in every family it has
        assert subprocess.run(["ip", "netns", "exec", "live", "ping", "-c1", "-W2", ip["gateway"]],
                              capture_output=True).returncode == 0, ip


KEYS = ["bridge", "isGateway", "isDefaultGateway", "ipMasq", "hairpinMode", "mtu", "dns", "ipam", "mode",
        "nonMasqueradeCIDRs", "cniVersion", "name", "ipam.type", "ipam.subnet", "ipam.ranges", "ipam.rangeStart",
        "ipam.rangeEnd", "ipam.gateway", "ipam.routes", "runtimeConfig", "prevResult"]
VALUES = [None, 0, -1, 1, 65536, 1.5, True, False, "", "x", "cni0", "10.244.0.0/24", "224.0.0.0/4", "0.0.0.0/8",
          "10.244.0.0/\uff12\uff14", "::/0", "10.244.0.300", "a" * 300, [], [[]], [{}], [{"subnet": 7}],
          [[{"subnet": "10.9.0.0/24"}]], {}, {"type": []}, {"dst": "0.0.0.0/0"}, [{"dst": 5}], "1.1.0", "0.2.0",
          "routed", "../../etc"]


def test_fuzzed_configs_answer_in_cni_terms_and_leave_nothing_behind():
    rng = random.Random(14)
    deadline, n, failures = time.monotonic() + SECONDS, 0, set()
    netns("f")
    while time.monotonic() < deadline or n < 20:
        conf = dict(CLASSIC, ipam={"subnet": "10.244.0.0/24"})
        for _ in range(rng.randint(1, 3)):
            where = rng.choice(KEYS).split(".")
            target = conf
            if len(where) == 2:
                if not isinstance(conf.get("ipam"), dict):
                    conf["ipam"] = {}
                target = conf["ipam"]
            target[where[-1]] = rng.choice(VALUES)
        raw = json.dumps(conf).encode()
        if rng.random() < 0.1:
            raw = raw[:rng.randrange(len(raw))]  # cut short
        add = cni("ADD", None, stdin=raw, cid="f")
        assert "Traceback" not in add.stderr and add.json is not None, (conf, add)
        if add.rc:
            assert add.code in (1, 2, 4, 6, 7, 11, 101, 102, 103), (conf, add)
            failures.add(add.code)
        dele = cni("DEL", None, stdin=raw, cid="f", netns="")
        assert "Traceback" not in dele.stderr, (conf, dele)
        if add.rc == 0:
            assert dele.rc == 0, (conf, dele)
        left = leftovers()
        assert left["addresses"] == {} and left["records"] == [] and left["temporary"] == [], (conf, left)
        assert "eth0" not in links("f"), conf
        n += 1
    assert 7 in failures  # the fuzz did reach the config checks
