"""The plugin on real namespaces: connectivity, masquerade, clean DEL, rollback, concurrency,
parity with the reference bridge + host-local, chaining, IPAM delegation and take-over."""
import json
import os
import subprocess
import time

import pytest
import sh

import cnikit
from plugin_helpers import (CLASSIC, PLUGIN, REFERENCE, addrs, allocation_files, cni, env_for, error, links,
                            internet, nat_rules, netns, ok, ping, pod, routes)  # noqa: F401


def test_many_pods_get_distinct_addresses_and_reach_each_other_and_the_gateway():
    results = [pod(f"p{i}", CLASSIC) for i in range(5)]
    ips = [r["ips"][0]["address"].split("/")[0] for r in results]
    assert len(set(ips)) == 5 and ips[0] == "10.244.0.2"
    for i, ip in enumerate(ips):
        ping(f"p{i}", "10.244.0.1")
        ping(f"p{i}", ips[(i + 1) % 5])
    hosts = [r["interfaces"][1]["name"] for r in results]
    assert len(set(hosts)) == 5 and all(links()[h]["master"] == "cni0" for h in hosts)


def test_add_returns_once_the_bridge_port_forwards():
    """The bridge learns of the new port's carrier later, from the kernel's linkwatch work; ADD
    waits for it, so the port is forwarding when it returns and the pod's first packet passes.
    No rules to apply (ipMasq, forwardAccept off): nothing else for ADD to wait on meanwhile."""
    conf = dict(CLASSIC, ipMasq=False, forwardAccept=False)
    for i in range(6):
        res = pod(f"p{i}", conf)
        veth = res["interfaces"][1]["name"]
        (port,) = json.loads(str(sh.ip("-j", "-d", "link", "show", "dev", veth)))
        assert port["linkinfo"]["info_slave_data"]["state"] == "forwarding", port
        out = subprocess.run(["ip", "netns", "exec", f"p{i}", "ping", "-c", "1", "-W", "1", "10.244.0.1"],
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr


def test_ip_masq_hides_the_pod_behind_the_node_towards_the_internet():
    pod("p1", CLASSIC)
    # the "internet": a namespace with a documentation address behind the node's uplink
    internet()
    listener = subprocess.Popen(["ip", "netns", "exec", "inet", "socat", "-u", "TCP-LISTEN:8080,reuseaddr",
                                 "SYSTEM:echo $SOCAT_PEERADDR > /run/cni/peer"])
    try:
        for _ in range(50):
            if "8080" in sh.ip("netns", "exec", "inet", "ss", "-ltn"):
                break
            time.sleep(0.1)
        else:
            pytest.fail("socat in inet never listened on 8080 (5 s)")
        sh.ip("netns", "exec", "p1", "socat", "-u", "OPEN:/dev/null", "TCP:203.0.113.10:8080")
        listener.wait(timeout=10)
    finally:
        listener.kill()
    assert open("/run/cni/peer").read().strip() == "203.0.113.1"  # not 10.244.0.2


def test_del_removes_every_trace_and_returns_the_address():
    res = pod("p1", CLASSIC)
    host_veth = res["interfaces"][1]["name"]
    assert host_veth in links() and "cnikit" in nat_rules()
    ok(cni("DEL", dict(CLASSIC, prevResult=res), cid="p1"))
    assert host_veth not in links() and "eth0" not in links("p1")
    assert "cnikit" not in nat_rules() and cnikit.CHAIN_PREFIX not in nat_rules()
    assert allocation_files("fromScratch") == {}
    assert pod("p2", CLASSIC)["ips"][0]["address"] == "10.244.0.3/24"  # round-robin goes on
    ok(cni("DEL", CLASSIC, cid="p2"))
    assert pod("p3", CLASSIC)["ips"][0]["address"] == "10.244.0.4/24"


def test_del_twice_without_netns_without_prev_result_or_allocation():
    pod("p1", CLASSIC)
    ok(cni("DEL", CLASSIC, cid="p1"))
    ok(cni("DEL", CLASSIC, cid="p1"))
    ok(cni("DEL", CLASSIC, cid="p1", netns=""))
    ok(cni("DEL", CLASSIC, cid="never-added", netns=""))
    # netns deleted before DEL: the address still comes back and the veth is gone
    pod("p2", CLASSIC)
    sh.ip("netns", "del", "p2")
    ok(cni("DEL", CLASSIC, cid="p2", netns="/run/netns/p2"))
    assert allocation_files("fromScratch") == {} and "cnikit" not in nat_rules()


def test_failure_mid_add_in_the_kernel_leaves_nothing():
    c = dict(CLASSIC, ipam={"routes": [{"dst": "192.0.2.0/24", "gw": "198.51.100.1"}]})  # unreachable gateway
    netns("p1")
    before = set(links())
    assert "192.0.2.0/24" in error(cni("ADD", c, cid="p1"), 101)["msg"]
    assert set(links()) - before <= {"cni0"} and "eth0" not in links("p1")
    assert allocation_files("fromScratch") == {} and "cnikit" not in nat_rules()


def test_failure_of_iptables_mid_add_leaves_nothing():
    os.makedirs("/run/cni/fakebin")
    with open("/run/cni/fakebin/iptables-restore", "w") as f:
        f.write("#!/bin/sh\necho 'iptables-restore: simulated failure' >&2\nexit 4\n")
    os.chmod("/run/cni/fakebin/iptables-restore", 0o755)
    netns("p1")
    before = set(links())
    res = cni("ADD", CLASSIC, cid="p1", PATH="/run/cni/fakebin:/usr/sbin:/usr/bin:/sbin:/bin")
    assert "simulated failure" in error(res, 102)["details"]
    assert set(links()) - before <= {"cni0"} and "eth0" not in links("p1")
    assert allocation_files("fromScratch") == {} and "cnikit" not in nat_rules()


def test_sixteen_parallel_adds_get_sixteen_distinct_addresses():
    procs = []
    for i in range(16):
        ns = netns(f"p{i}")
        procs.append(subprocess.Popen([PLUGIN], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      env=env_for("ADD", cid=f"p{i}", netns=ns)))
    raw = json.dumps(CLASSIC).encode()
    outs = [p.communicate(raw, timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    ips = {json.loads(o)["ips"][0]["address"] for o, _ in outs}
    assert len(ips) == 16
    assert len(allocation_files("fromScratch")) == 16
    ping("p0", "10.244.0.1")


def test_parity_with_reference_bridge_and_host_local():
    def conf(ipam_type, name):
        return {"cniVersion": "1.0.0", "name": name, "type": "bridge", "bridge": "cni0", "isGateway": True,
                "isDefaultGateway": True, "ipMasq": True, "mtu": 1400, "hairpinMode": True,
                "ipam": {"type": ipam_type, "subnet": "10.244.0.0/24",
                         "routes": [{"dst": "198.51.100.0/24"}]}}

    def snapshot(ns, res):
        host = res["interfaces"][1]["name"]
        return {
            "shape": {k: (sorted(v[0]) if isinstance(v, list) and v else v) for k, v in res.items() if k != "dns"},
            "interfaces": [sorted(i) for i in res["interfaces"]],
            "bridge": res["interfaces"][0]["name"],
            "ips": res["ips"], "routes": sorted(res["routes"], key=str),
            "gateway_on_bridge": addrs("cni0"),
            "pod_routes": sorted((r["dst"], r.get("gateway")) for r in routes(ns)),
            "mtu": (links(ns)["eth0"]["mtu"], links()[host]["mtu"], links()["cni0"]["mtu"]),
            "hairpin": links()[host]["linkinfo"]["info_slave_data"]["hairpin"],
        }

    ns = netns("ref")
    ref = ok(cni("ADD", conf("host-local", "refnet"), plugin=f"{REFERENCE}/bridge", cid="ref", netns=ns))
    theirs = snapshot("ref", ref)
    ok(cni("DEL", dict(conf("host-local", "refnet"), prevResult=ref), plugin=f"{REFERENCE}/bridge", cid="ref"))
    sh.ip("link", "del", "cni0")
    ns = netns("ours")
    res = ok(cni("ADD", conf("cnikit", "ournet"), cid="ours", netns=ns))
    mine = snapshot("ours", res)
    assert mine == theirs


def test_chained_with_reference_portmap_tuning_and_loopback():
    conflist = {"cniVersion": "1.0.0", "name": "chain", "plugins": [
        {"type": "cni-bash-compatible", "bridge": "cni0", "ipam": {"subnet": "10.244.0.0/24"}},
        {"type": "portmap", "capabilities": {"portMappings": True},
         "runtimeConfig": {"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]}},
        {"type": "tuning", "sysctl": {"net.core.somaxconn": "512"}},
    ]}
    ns = netns("p1")

    def plugin_conf(p, prev):
        c = dict(p, cniVersion=conflist["cniVersion"], name=conflist["name"])
        if prev is not None:
            c["prevResult"] = prev
        return c

    def exe(p):
        return PLUGIN if p["type"] == "cni-bash-compatible" else f"{REFERENCE}/{p['type']}"

    prev = None
    for p in conflist["plugins"]:
        prev = ok(cni("ADD", plugin_conf(p, prev), plugin=exe(p), cid="p1", netns=ns))
    lo = {"cniVersion": "1.0.0", "name": "lo", "type": "loopback"}
    ok(cni("ADD", lo, plugin=f"{REFERENCE}/loopback", cid="p1", netns=ns, ifname="lo"))
    assert prev["ips"][0]["address"] == "10.244.0.2/24"
    assert "--dport 8080" in nat_rules()
    assert sh.ip("netns", "exec", "p1", "sysctl", "-n", "net.core.somaxconn").strip() == "512"
    ping("p1", "127.0.0.1")
    # CHECK ours with the chain's final result (the reference portmap's own CHECK insists on ip6tables)
    ok(cni("CHECK", plugin_conf(conflist["plugins"][0], prev), cid="p1", netns=ns))
    for p in reversed(conflist["plugins"]):
        ok(cni("DEL", plugin_conf(p, prev), plugin=exe(p), cid="p1", netns=ns))
    assert "--dport 8080" not in nat_rules() and "cnikit" not in nat_rules()
    assert allocation_files("chain") == {}


def test_ipam_delegated_to_reference_host_local():
    c = dict(CLASSIC, ipam={"type": "host-local", "subnet": "10.88.0.0/24"})
    res = pod("p1", c)
    assert res["ips"][0] == {"address": "10.88.0.2/24", "gateway": "10.88.0.1", "interface": 2}
    assert allocation_files("fromScratch") == {"10.88.0.2": "p1\r\neth0"}
    ok(cni("CHECK", dict(c, prevResult=res), cid="p1"))
    ok(cni("DEL", dict(c, prevResult=res), cid="p1"))
    assert allocation_files("fromScratch") == {}


def test_builtin_and_host_local_take_over_each_others_allocations():
    ipam = {"type": "host-local", "subnet": "10.88.0.0/24"}
    first = pod("p1", dict(CLASSIC, ipam=ipam))  # reference host-local allocates .2
    second = pod("p2", dict(CLASSIC, ipam={"subnet": "10.88.0.0/24"}))  # built-in continues
    assert second["ips"][0]["address"] == "10.88.0.3/24"
    third = pod("p3", dict(CLASSIC, ipam=ipam))  # and host-local continues after ours
    assert third["ips"][0]["address"] == "10.88.0.4/24"
    ok(cni("DEL", dict(CLASSIC, ipam=ipam), cid="p2"))  # host-local releases the built-in's file
    assert sorted(allocation_files("fromScratch")) == ["10.88.0.2", "10.88.0.4"]
    assert first["ips"][0]["address"] == "10.88.0.2/24"


def test_subnet_precedence_config_args_node_file_default():
    # /run/cnikit is private in the test's sandbox (conftest): the node file stays there
    with open(cnikit.NODE_SUBNET_FILE, "w") as f:
        f.write("# written by cnikit cni kind-install\nCNIKIT_SUBNET=10.244.1.0/24\n")
    assert pod("a", CLASSIC)["ips"][0]["address"] == "10.244.1.2/24"
    ns = netns("b")
    res = ok(cni("ADD", dict(CLASSIC, name="n2"), cid="b", netns=ns, args="IgnoreUnknown=1;CNIKIT_SUBNET=10.244.7.0/24"))
    assert res["ips"][0]["address"] == "10.244.7.2/24"
    assert pod("c", dict(CLASSIC, name="n3", bridge="br3", ipam={"subnet": "10.244.9.0/24"}))["ips"][0]["address"] == "10.244.9.2/24"
    os.unlink(cnikit.NODE_SUBNET_FILE)
    assert pod("d", dict(CLASSIC, name="n4", bridge="br4"))["ips"][0]["address"] == "10.244.0.2/24"


def test_range_start_end_and_exhaustion():
    c = dict(CLASSIC, ipam={"subnet": "10.50.0.0/24", "rangeStart": "10.50.0.100", "rangeEnd": "10.50.0.101"})
    assert pod("p1", c)["ips"][0]["address"] == "10.50.0.100/24"
    assert pod("p2", c)["ips"][0]["address"] == "10.50.0.101/24"
    netns("p3")
    assert "no IP addresses left" in error(cni("ADD", c, cid="p3"), 11)["msg"]
    ok(cni("DEL", c, cid="p1"))
    assert ok(cni("ADD", c, cid="p3"))["ips"][0]["address"] == "10.50.0.100/24"


ROUTED = dict(CLASSIC, mode="routed")


def test_routed_mode_is_point_to_point_with_no_bridge():
    """mode=routed: the pod holds a /32 and a default route via the host end of its veth, which
    holds the gateway as /32; the host routes each pod's /32 to its veth; no bridge exists.
    Pod to pod crosses the host's routing (the TTL drops by one), CHECK agrees, DEL removes it all."""
    results = [pod(f"p{i}", ROUTED) for i in range(2)]
    ips = [r["ips"][0]["address"] for r in results]
    assert ips == ["10.244.0.2/32", "10.244.0.3/32"]
    assert [i["name"] for i in results[0]["interfaces"]][1:] == ["eth0"] and results[0]["ips"][0]["interface"] == 1
    assert "cni0" not in links()
    host_end = results[0]["interfaces"][0]["name"]
    assert links()[host_end].get("master") is None
    assert addrs(host_end) == ["10.244.0.1/32"]
    assert any(r["dst"] == "10.244.0.2" and r["dev"] == host_end for r in routes())
    assert any(r["dst"] == "default" and r.get("gateway") == "10.244.0.1" for r in routes("p0"))
    ping("p0", "10.244.0.1")
    out = str(sh.ip("netns", "exec", "p0", "ping", "-c", "1", "-W", "1", "10.244.0.3"))
    assert "ttl=63" in out, out                    # routed by the host, not switched
    ok(cni("CHECK", dict(ROUTED, prevResult=results[0]), cid="p0"))
    sh.ip("route", "del", "10.244.0.2/32")
    assert "host route 10.244.0.2/32" in error(cni("CHECK", dict(ROUTED, prevResult=results[0]), cid="p0"), 100)["msg"]
    for i, res in enumerate(results):
        ok(cni("DEL", dict(ROUTED, prevResult=res), cid=f"p{i}"))
    assert not [name for name in links() if name.startswith("veth")]
    assert cnikit.CHAIN_PREFIX not in nat_rules() and allocation_files("fromScratch") == {}


def test_routed_mode_rejects_an_unknown_mode_before_changing_anything():
    netns("p1")
    assert "invalid mode 'ptp'" in error(cni("ADD", dict(CLASSIC, mode="ptp"), cid="p1"), 7)["msg"]
    assert not [name for name in links() if name.startswith("veth")] and allocation_files("fromScratch") == {}


def test_routed_mode_dual_stack_gives_host_sized_addresses_and_routes_in_both_families():
    conf = dict(ROUTED, ipMasq=False, ipam={"ranges": [[{"subnet": "10.244.5.0/24"}], [{"subnet": "fd00:5::/64"}]]})
    results = [pod(f"p{i}", conf) for i in range(2)]
    assert [ip["address"] for ip in results[1]["ips"]] == ["10.244.5.3/32", "fd00:5::3/128"]
    host_end = results[1]["interfaces"][0]["name"]
    v6 = json.loads(str(sh.ip("-6", "-j", "route", "show")))
    assert any(r["dst"] == "fd00:5::3" and r["dev"] == host_end for r in v6)
    # no address DAD would hold back (the pods', the gateway and link-local on the host ends):
    # the first ping, right after ADD, is answered
    host_v6 = json.loads(str(sh.ip("-6", "-j", "addr", "show", "dev", host_end)))[0]["addr_info"]
    assert host_v6 and not any(a.get("tentative") for a in host_v6), host_v6
    assert any(a["local"] == "fd00:5::1" and a.get("nodad") for a in host_v6), host_v6
    for target in ("fd00:5::1", "fd00:5::3", "10.244.5.3"):
        out = subprocess.run(["ip", "netns", "exec", "p0", "ping", "-c", "1", "-W", "1", target],
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
    for i, res in enumerate(results):
        ok(cni("DEL", dict(conf, prevResult=res), cid=f"p{i}"))
    assert "fd00:5::3" not in str(sh.ip("-6", "route", "show"))
