"""Dual-stack, proven as the reference does it: one conflist with an IPv4 and an IPv6 range set
(host-local's `ranges`), run through the reference bridge + host-local (v1.1.1, /usr/lib/cni) and
through ours.  Each test reads the kernel back (`ip -j`, sysctls, ip6tables) and sends real
packets: ping in both families, TCP over IPv6 (socat TCP6).  ADD, CHECK, DEL and GC must cover
both families; IPv6 is masqueraded only when ipMasq asks for it; the pod's IPv6 addresses skip
duplicate address detection (DAD) unless `enabledad`, and ADD never waits for DAD longer than the
reference on the same config."""
import ipaddress
import json
import statistics
import subprocess
import sys
import time

import pytest
import sh

from plugin_helpers import PLUGIN, REFERENCE, allocation_files, cni, error, links, netns, ok

import kernel

V4, V6 = "10.244.20.0/24", "fd00:20::/64"
GW4, GW6 = "10.244.20.1", "fd00:20::1"
NET = "dual"
IMPLS = {"ours": (PLUGIN, "cni-bash-compatible"), "reference": (f"{REFERENCE}/bridge", "bridge")}
PORT = 8080
OUTSIDE4, OUTSIDE6 = "198.51.100.2", "2001:db8:20::2"    # a namespace standing for the world beyond the node


def dual(impl, **extra):
    """The same dual-stack conflist for both plugins; the reference's defaults are false, so the
    keys ours defaults to true are spelled out."""
    conf = {"cniVersion": "1.0.0", "name": NET, "type": IMPLS[impl][1], "bridge": "cni0", "isGateway": True,
            "isDefaultGateway": True, "ipMasq": False,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": V4}], [{"subnet": V6}]]}}
    conf.update(extra)
    return conf


def add(impl, cid, conf):
    netns(cid)
    return ok(cni("ADD", conf, plugin=IMPLS[impl][0], cid=cid))


def call(impl, verb, cid, conf, **kw):
    return cni(verb, conf, plugin=IMPLS[impl][0], cid=cid, **kw)


def v6_addrs(dev, ns=None):
    """[(address, prefix, flags)] of DEV's IPv6 addresses; flags as `ip -j` names them (tentative, nodad...)."""
    data = json.loads(str(sh.ip(*(["-n", ns] if ns else []), "-j", "-6", "addr", "show", "dev", dev)))
    return [(a["local"], a["prefixlen"], {k for k, v in a.items() if v is True})
            for a in data[0]["addr_info"]] if data else []


def flags_soon(ns, address, dev="eth0"):
    """ADDRESS's flags once the kernel's address work has run: even without DAD a new address is
    tentative until then (at once, or a little later on a busy machine). Waits up to half a DAD round,
    so an address that really runs DAD is still tentative then."""
    deadline = time.monotonic() + dad_round(ns) / 2
    while True:
        flags = next((f for a, _, f in v6_addrs(dev, ns) if a == address), None)
        if flags is None or "tentative" not in flags or time.monotonic() > deadline:
            return flags
        time.sleep(0.02)


def default_route(ns, family):
    rs = json.loads(str(sh.ip("-n", ns, "-j", family, "route", "show", "default")))
    return [(r.get("gateway"), r.get("dev")) for r in rs]


def sysctl(path, ns=None):
    return str(sh.ip("netns", "exec", ns, "cat", path) if ns else sh.cat(path)).strip()


def wait_settled(dev, ns=None, seconds=5.0):
    """Wait until DEV has no tentative IPv6 address (the bridge's gateway runs DAD for about a
    second after it is added, in both plugins): a condition of the kernel's, not a guessed sleep."""
    deadline = time.monotonic() + seconds
    while any("tentative" in flags for *_, flags in v6_addrs(dev, ns)):
        assert time.monotonic() < deadline, f"{dev} still has tentative addresses: {v6_addrs(dev, ns)}"
        time.sleep(0.05)


def rules6(table):
    return [r for r in str(sh.ip6tables("-t", table, "-S")).splitlines() if r.startswith("-A")]


def rules4(table):
    return kernel.iptables_rules(table)


def address(res, family):
    (ip,) = [i for i in res["ips"] if ipaddress.ip_interface(i["address"]).version == family]
    return ip["address"].split("/")[0]


def tcp6_peer_seen(server_ns, server_addr, client_ns):
    """Ask a socat listener in SERVER_NS, over TCP6, which address the connection came from (a
    connection that gets no answer is tried again, for 5 s at most: a busy machine's listener may
    take its moment to answer)."""
    server = subprocess.Popen(["ip", "netns", "exec", server_ns, "socat", f"TCP6-LISTEN:{PORT},reuseaddr,fork",
                               "SYSTEM:echo $SOCAT_PEERADDR"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 5
        while not str(sh.ip("netns", "exec", server_ns, "ss", "-Htln", f"sport = :{PORT}")).strip():
            assert time.monotonic() < deadline and server.poll() is None, "socat never listened"
            time.sleep(0.02)
        while True:
            client = subprocess.run(["ip", "netns", "exec", client_ns, "socat", "-u",
                                     f"TCP6:[{server_addr}]:{PORT},connect-timeout=3", "-"],
                                    capture_output=True, text=True, timeout=10)
            out = client.stdout.strip()
            if out or time.monotonic() > deadline:
                return str(ipaddress.ip_address(out.strip("[]"))) if out else client.stderr
            time.sleep(0.1)
    finally:
        server.kill()
        server.wait()


# ---------------------------------------------------------------- ADD: the same kernel state as the reference

@pytest.mark.parametrize("impl", IMPLS)
def test_add_gives_a_pod_two_addresses_two_gateways_and_two_default_routes(impl):
    conf = dual(impl)
    p1, p2 = add(impl, "p1", conf), add(impl, "p2", conf)
    for res, n in ((p1, 2), (p2, 3)):
        assert [(i["address"], i["gateway"]) for i in res["ips"]] == \
            [(f"10.244.20.{n}/24", GW4), (f"fd00:20::{n}/64", GW6)]
        eth0 = res["interfaces"][res["ips"][1]["interface"]]
        assert eth0["name"] == "eth0" and eth0["sandbox"]
        assert {"0.0.0.0/0", "::/0"} <= {r["dst"] for r in res["routes"]}
    # in the pod: both addresses, the IPv6 one usable at once (accept_dad 0: never tentative), beside
    # the link-local address every IPv6 interface gets; a default route per family via its gateway
    assert ("fd00:20::2", 64) in [(a, plen) for a, plen, _ in v6_addrs("eth0", "p1")]
    flags = flags_soon("p1", "fd00:20::2")
    assert not flags & {"tentative", "dadfailed"}, flags
    assert any(ipaddress.ip_address(a).is_link_local for a, *_ in v6_addrs("eth0", "p1"))
    assert sysctl("/proc/sys/net/ipv6/conf/eth0/accept_dad", "p1") == "0"
    assert kernel.addrs("eth0", "p1") == ["10.244.20.2/24"]
    assert default_route("p1", "-4") == [(GW4, "eth0")] and default_route("p1", "-6") == [(GW6, "eth0")]
    # on the node: both gateways on the bridge, forwarding in both families, and the bridge takes
    # no routes from router advertisements (a pod could send one)
    assert kernel.addrs("cni0") == [f"{GW4}/24"] and f"{GW6}" in [a for a, *_ in v6_addrs("cni0")]
    assert sysctl("/proc/sys/net/ipv4/ip_forward") == "1"
    assert sysctl("/proc/sys/net/ipv6/conf/all/forwarding") == "1"
    assert sysctl("/proc/sys/net/ipv6/conf/cni0/accept_ra") == "0"
    # real packets: the gateways and the other pod in both families, TCP over IPv6 without NAT
    wait_settled("cni0")
    for dst in (GW4, GW6, "10.244.20.3", "fd00:20::3"):
        assert kernel.ping(dst, "p1"), f"p1 cannot reach {dst}"
    assert kernel.ping("fd00:20::2", "p2")
    assert tcp6_peer_seen("p2", "fd00:20::3", "p1") == "fd00:20::2"
    # NDP, not ARP: p1 learned p2's MAC for its IPv6 address
    neigh = json.loads(str(sh.ip("-n", "p1", "-j", "-6", "neigh", "show", "fd00:20::3")))
    assert [n.get("lladdr") for n in neigh] == [links("p2")["eth0"]["address"]]


# ---------------------------------------------------------------- masquerade and forward-accept, per family

@pytest.mark.parametrize("impl", IMPLS)
def test_ipv6_is_masqueraded_only_when_ip_masq_asks_for_it(impl):
    add(impl, "p1", dual(impl))
    assert not [r for r in rules6("nat") if "MASQUERADE" in r] and not [r for r in rules4("nat") if "MASQUERADE" in r]
    add(impl, "p2", dual(impl, ipMasq=True))
    for rules, pod, subnet, multicast in ((rules6("nat"), "fd00:20::3/128", V6, "ff00::/8"),
                                          (rules4("nat"), "10.244.20.3/32", V4, "224.0.0.0/4")):
        (jump,) = [r for r in rules if r.startswith(f"-A POSTROUTING -s {pod}")]
        chain = jump.split()[-1]
        mine = [r for r in rules if r.startswith(f"-A {chain} ")]
        assert any(f"-d {subnet}" in r and r.endswith("-j ACCEPT") for r in mine), mine
        assert any(f"! -d {multicast}" in r and r.endswith("-j MASQUERADE") for r in mine), mine


def test_forward_accept_lets_pods_out_and_replies_in_through_a_drop_policy_in_both_families():
    """A Docker-like node (FORWARD policy DROP in both families): the pod's own chain lets its
    traffic out and the replies in, and still no new connection in from outside its subnet."""
    netns("world")
    sh.ip("link", "add", "to-world", "type", "veth", "peer", "name", "eth0", "netns", "world")
    for cidr, peer in (("198.51.100.1/24", f"{OUTSIDE4}/24"), ("2001:db8:20::1/64", f"{OUTSIDE6}/64")):
        sh.ip("addr", "add", cidr, "dev", "to-world", "nodad")
        sh.ip("-n", "world", "addr", "add", peer, "dev", "eth0", "nodad")
    sh.ip("link", "set", "to-world", "up")
    sh.ip("-n", "world", "link", "set", "eth0", "up")
    # no NAT: the world routes the pod ranges back to the node, as a routed pod network does
    sh.ip("-n", "world", "route", "add", V4, "via", "198.51.100.1")
    sh.ip("-n", "world", "-6", "route", "add", V6, "via", "2001:db8:20::1")
    sh.iptables("-P", "FORWARD", "DROP")
    sh.ip6tables("-P", "FORWARD", "DROP")
    res = add("ours", "p1", dual("ours"))
    wait_settled("cni0")
    for dst in (OUTSIDE4, OUTSIDE6):
        assert kernel.ping(dst, "p1"), f"p1 cannot reach {dst} through FORWARD DROP"
    assert not kernel.ping(address(res, 6), "world") and not kernel.ping(address(res, 4), "world")
    for rules in (rules4("filter"), rules6("filter")):
        assert sum(r.startswith("-A FORWARD ") and "cnikit name: dual id: p1" in r for r in rules) == 2, rules
    ok(call("ours", "DEL", "p1", dict(dual("ours"), prevResult=res)))
    assert not [r for r in rules4("filter") + rules6("filter") if "cnikit" in r]


# ---------------------------------------------------------------- router advertisements from a pod

# A router advertisement (ICMPv6 134: hop limit 64, router lifetime 1800 s: "make me your default
# router"), sent to all nodes on the link; the kernel fills in the checksum of a raw ICMPv6 socket.
SEND_RA = """
import socket, struct, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
for dev in sys.argv[1:]:
    s.sendto(struct.pack("!BBHBBHII", 134, 0, 0, 64, 0, 1800, 0, 0), ("ff02::1", 0, 0, socket.if_nametoindex(dev)))
"""


def test_routed_mode_the_node_takes_no_default_route_from_a_pods_router_advertisement():
    """CVE-2020-10749's host side: a node that forwards and still autoconfigures (accept_ra 2, the
    default its new links inherit) would take a default route from any router advertisement. The
    reference sets accept_ra 0 on each host end; so does ours. A plain veth beside it, with the
    inherited setting, takes the same advertisement: it is a valid one."""
    sh.sysctl("-qw", "net.ipv6.conf.default.accept_ra=2")
    conf = dual("ours", mode="routed")
    conf["ipam"] = {"ranges": conf["ipam"]["ranges"]}
    res = add("ours", "p1", conf)
    host_end = res["interfaces"][0]["name"]
    assert sysctl(f"/proc/sys/net/ipv6/conf/{host_end}/accept_ra") == "0"
    sh.ip("link", "add", "plain-h", "type", "veth", "peer", "name", "eth1", "netns", "p1")
    sh.ip("netns", "exec", "p1", "sysctl", "-qw", "net.ipv6.conf.eth1.accept_dad=0")
    sh.ip("link", "set", "plain-h", "up")
    sh.ip("-n", "p1", "link", "set", "eth1", "up")
    assert sysctl("/proc/sys/net/ipv6/conf/plain-h/accept_ra") == "2"
    for dev in ("eth0", "eth1"):
        wait_settled(dev, "p1")
    subprocess.run(["ip", "netns", "exec", "p1", sys.executable, "-c", SEND_RA, "eth0", "eth1"], check=True)
    deadline = time.monotonic() + 5
    while not default_route_devs("plain-h"):
        assert time.monotonic() < deadline, "the control veth never took the advertisement"
        time.sleep(0.05)
    assert default_route_devs(host_end) == []


def default_route_devs(dev):
    """The node's IPv6 default routes learned from router advertisements on DEV."""
    return [r for r in json.loads(str(sh.ip("-j", "-6", "route", "show", "default")))
            if r.get("dev") == dev and r.get("protocol") == "ra"]


# ---------------------------------------------------------------- CHECK, DEL and GC in both families

def gc_conf():
    """GC is CNI 1.1.0, which host-local v1.1.1 does not speak: ours with its built-in allocator
    (host-local's files, the same ranges)."""
    conf = dual("ours", cniVersion="1.1.0", ipMasq=True)
    conf["ipam"] = {k: v for k, v in conf["ipam"].items() if k != "type"}
    return conf


@pytest.mark.parametrize("impl", IMPLS)
def test_check_sees_the_ipv6_half_go_missing(impl):
    conf = dual(impl, cniVersion="1.0.0")
    res = add(impl, "p1", conf)
    checked = dict(conf, prevResult=res)
    ok(call(impl, "CHECK", "p1", checked))
    sh.ip("-n", "p1", "-6", "route", "del", "default")
    assert call(impl, "CHECK", "p1", checked).rc != 0           # the IPv6 default route is gone
    sh.ip("-n", "p1", "-6", "route", "add", "default", "via", GW6, "dev", "eth0")
    ok(call(impl, "CHECK", "p1", checked))
    sh.ip("-n", "p1", "addr", "del", "fd00:20::2/64", "dev", "eth0")
    assert call(impl, "CHECK", "p1", checked).rc != 0           # the IPv6 address is gone


@pytest.mark.parametrize("impl", IMPLS)
def test_del_releases_both_families_and_leaves_no_rule_in_either(impl):
    conf = dual(impl, ipMasq=True)
    res = add(impl, "p1", conf)
    assert set(allocation_files(NET)) >= {"10.244.20.2", "fd00:20::2"}
    ok(call(impl, "DEL", "p1", dict(conf, prevResult=res)))
    assert not {"10.244.20.2", "fd00:20::2"} & set(allocation_files(NET))
    assert "eth0" not in links("p1") and not [n for n in links() if n.startswith("veth")]
    assert not [r for r in rules6("nat") + rules6("filter") if "fd00:20::2" in r]
    assert not [r for r in rules4("nat") + rules4("filter") if "10.244.20.2/" in r]


def test_gc_releases_both_families_of_a_stale_attachment_and_keeps_the_valid_one():
    conf = gc_conf()
    add("ours", "p1", conf)
    add("ours", "p2", conf)
    gc = dict(conf, **{"cni.dev/valid-attachments": [{"containerID": "p1", "ifname": "eth0"}]})
    assert ok(call("ours", "GC", "", gc, netns="")) is None
    assert set(allocation_files(NET)) == {"10.244.20.2", "fd00:20::2"}
    for rules in (rules4("nat"), rules6("nat"), rules4("filter"), rules6("filter")):
        assert not [r for r in rules if "id: p2 " in r] and [r for r in rules if "id: p1 " in r], rules
    wait_settled("cni0")
    assert kernel.ping(GW6, "p1") and kernel.ping(GW4, "p1")


def test_gc_with_an_invalid_attachment_list_releases_nothing_in_either_family():
    conf = gc_conf()
    add("ours", "p1", conf)
    before = (allocation_files(NET), rules6("nat"), rules4("nat"))
    error(call("ours", "GC", "", dict(conf, **{"cni.dev/valid-attachments": [{"containerID": 5}]}), netns=""), 7)
    assert (allocation_files(NET), rules6("nat"), rules4("nat")) == before


# ---------------------------------------------------------------- DAD: no longer a wait than the reference's

ROUNDS = 3
# Before its first solicitation the kernel waits a random 0 to router_solicitation_delay (1 s) (RFC 4862,
# 5.4.2): 0 in the test's pods, so each DAD takes one round and the medians compare what the plugins do.
NO_RANDOM_DELAY = "net.ipv6.conf.default.router_solicitation_delay=0"


def add_times(impl, conf, tag):
    """ADD times of ROUNDS fresh pods, and each pod's IPv6 address flags right after its ADD."""
    times, flags = [], []
    for i in range(ROUNDS):
        cid = f"{tag}{i}"
        netns(cid)
        sh.ip("netns", "exec", cid, "sysctl", "-qw", NO_RANDOM_DELAY)
        start = time.monotonic()
        res = call(impl, "ADD", cid, conf)
        times.append(time.monotonic() - start)
        ok(res)
        flags += [flags_soon(cid, a) for a, _, _ in v6_addrs("eth0", cid) if a.startswith("fd00:")]
    return statistics.median(times), flags


def dad_round(ns):
    """How long DAD takes on the pod's eth0: dad_transmits solicitations, retrans_time_ms apart."""
    return (int(sysctl("/proc/sys/net/ipv6/conf/eth0/dad_transmits", ns))
            * int(sysctl("/proc/sys/net/ipv6/neigh/eth0/retrans_time_ms", ns)) / 1000)


@pytest.mark.parametrize("enabledad", [False, True], ids=["accept_dad-0", "enabledad"])
def test_add_waits_for_dad_no_longer_than_the_reference_on_the_same_config(enabledad):
    """The reference's history: ADD took 1-3 s waiting for DAD, until it set accept_dad 0 in the pod
    (enabledad brings the wait back). Measured here on the same config, run after run: ours answers
    once its address is usable (never tentative after ADD), and its median is not longer than the
    reference's by more than half a DAD round (the ratio itself is bench/cni_latency.py's DAD row)."""
    medians = {}
    for impl in IMPLS:
        medians[impl], flags = add_times(impl, dual(impl, enabledad=enabledad), impl[:3])
        assert flags and not any(f & {"tentative", "dadfailed"} for f in flags), (impl, flags)
    once = dad_round("our0")
    assert once > 0
    if enabledad:     # both really waited for DAD (at least one round), or the comparison means nothing
        assert min(medians.values()) >= once, medians
    else:             # neither waited a DAD round
        assert max(medians.values()) < once, medians
    assert medians["ours"] <= medians["reference"] + once / 2, medians
