"""What each verb that changes the kernel plans on a fresh host, compared exactly: the argv
lists a dry run would run, in order (written below as the shell lines it echoes), the Change
records rollback reads (with each one's undo argv), and bad input refused before any command.

A library dry run plans for a fresh host: it runs nothing and looks up nothing on this host,
so these need neither root nor a sandbox (the `make check` tier). It checks its input against
its own plan, so what a verb needs (a namespace, a bridge, an uplink) is planned first, as
GIVEN, and only what comes after is compared. The CLI's dry run plans against this host (read
only): its tests compare it with the library's plan of this host. A change to any list is a
change to what cnikit does to a kernel: make it on purpose, here and in the verb together.
"""
import base64
import io
import json
import os
import shlex

import pytest

import cnikit

pytestmark = pytest.mark.noroot

CHAIN = cnikit.nat_chain("10.0.0.0/24")
NAT_COMMENT = "-m comment --comment 'cnikit nat 10.0.0.0/24'"


def plan(*steps, given=(), plan_for="fresh host"):
    """A dry-run Runner after each (verb, args, kwargs) of GIVEN (what must exist first: planned,
    not compared), then of STEPS, in order."""
    r = cnikit.Runner(dry_run=True, out=io.StringIO(), plan_for=plan_for)
    for verb, args, kwargs in given:
        verb(r, *args, **kwargs)
    r.given = (r.mark(), len(r.changes()))
    for verb, args, kwargs in steps:
        verb(r, *args, **kwargs)
    return r


def step(verb, *args, **kwargs):
    return verb, args, kwargs


def lines(r):
    """The commands R planned, as the shell lines it echoes (an exact argv comparison:
    shlex.join quotes each word, so two lists give the same lines only when they are equal)."""
    return [shlex.join(argv) for argv in r.commands()[getattr(r, "given", (0, 0))[0]:]]


def made(r):
    """R's Change records: (kind, name, ns, undo as a shell line or None)."""
    return [(c.kind, c.name, c.ns, c.undo and shlex.join(c.undo)) for c in r.changes()[getattr(r, "given", (0, 0))[1]:]]


def mac(name, host=None):
    """The MAC bridge add pins (a hash of this machine's id, the namespace and the name)."""
    return cnikit.bridge_mac(name, host, cnikit.machine_id())


# ---------------------------------------------------------------- netns

def test_netns_add():
    r = plan(step(cnikit.netns_add, "ns1"))
    assert lines(r) == ["ip netns add ns1",
                        "ip -n ns1 link set dev lo alias cnikit"]
    assert made(r) == [("netns", "ns1", None, "ip netns del ns1")]


def test_netns_add_with_lo_up():
    r = plan(step(cnikit.netns_add, "ns1", lo_up=True))
    assert lines(r) == ["ip netns add ns1",
                        "ip -n ns1 link set dev lo alias cnikit",
                        "ip -n ns1 link set dev lo up"]
    assert made(r) == [("netns", "ns1", None, "ip netns del ns1"), ("up", "lo", "ns1", None)]


NS1 = [step(cnikit.netns_add, "ns1")]


def test_netns_lo_del_and_exec():
    r = plan(step(cnikit.netns_lo_up, "ns1"), step(cnikit.netns_del, "ns1"), given=NS1)
    assert lines(r) == ["ip -n ns1 link set dev lo up",
                        "ip netns del ns1"]
    r = plan(step(cnikit.netns_exec, "ns1", ["ip", "-br", "addr"]), given=NS1)
    assert lines(r) == ["ip netns exec ns1 ip -br addr"]
    # a namespace the plan neither made nor finds: the live run's error, nothing planned
    for verb in (cnikit.netns_lo_up, cnikit.netns_exec):
        with pytest.raises(cnikit.UsageError, match="namespace 'ns1' does not exist"):
            plan(step(verb, "ns1", *([["true"]] if verb is cnikit.netns_exec else [])))


def test_netns_add_twice_in_one_plan_plans_it_once():
    # a plan reads itself back: the second add finds ns1 (and its lo up) there, as a real run would
    r = plan(step(cnikit.netns_add, "ns1", lo_up=True), step(cnikit.netns_add, "ns1", lo_up=True))
    assert lines(r) == ["ip netns add ns1",
                        "ip -n ns1 link set dev lo alias cnikit",
                        "ip -n ns1 link set dev lo up"]
    assert made(r) == [("netns", "ns1", None, "ip netns del ns1"), ("up", "lo", "ns1", None)]


def test_netns_del_after_add_in_one_plan():
    r = plan(step(cnikit.netns_add, "ns1"), step(cnikit.netns_del, "ns1"))
    assert lines(r) == ["ip netns add ns1",
                        "ip -n ns1 link set dev lo alias cnikit",
                        "ip netns del ns1"]


# ---------------------------------------------------------------- veth

def test_veth_add_bare():
    r = plan(step(cnikit.veth_add, "v0", "v1"))
    assert lines(r) == ["ip link add v0 type veth peer name v1",
                        "ip link set dev v0 alias cnikit",
                        "ip link set dev v0 up",
                        "ip link set dev v1 up"]
    assert made(r) == [("link", "v0", None, "ip link del v0"), ("link", "v1", None, None),
                       ("up", "v0", None, None), ("up", "v1", None, None)]


def test_veth_add_into_a_namespace_with_addresses_and_mtu():
    r = plan(step(cnikit.veth_add, "v0", "eth0", netns="ns1", addr="10.0.0.1/24", peer_addr="10.0.0.2/24",
                  mtu=1400), given=NS1)
    assert lines(r) == ["ip link add v0 mtu 1400 type veth peer name eth0 mtu 1400 netns ns1",
                        "ip link set dev v0 alias cnikit",
                        "ip addr add 10.0.0.1/24 dev v0",
                        "ip -n ns1 addr add 10.0.0.2/24 dev eth0",
                        "ip link set dev v0 up",
                        "ip -n ns1 link set dev eth0 up"]
    # the peer goes with its pair: one undo, the host end's
    assert made(r) == [("link", "v0", None, "ip link del v0"), ("link", "eth0", "ns1", None),
                       ("addr", "10.0.0.1/24 dev v0", None, None), ("addr", "10.0.0.2/24 dev eth0", "ns1", None),
                       ("up", "v0", None, None), ("up", "eth0", "ns1", None)]
    assert [cnikit.get_link(r, "v0")["mtu"], cnikit.get_link(r, "eth0", "ns1")["mtu"]] == [1400, 1400]


def test_veth_add_with_ipv6_addresses():
    r = plan(step(cnikit.veth_add, "v0", "eth0", netns="ns1", addr="2001:db8::1/64", peer_addr="2001:db8::2/64"),
             given=NS1)
    assert lines(r) == ["ip link add v0 type veth peer name eth0 netns ns1",
                        "ip link set dev v0 alias cnikit",
                        "ip addr add 2001:db8::1/64 dev v0",
                        "ip -n ns1 addr add 2001:db8::2/64 dev eth0",
                        "ip link set dev v0 up",
                        "ip -n ns1 link set dev eth0 up"]


def test_veth_add_inside_a_host_namespace():
    r = plan(step(cnikit.veth_add, "v1", "v2", ns="node1"), given=[step(cnikit.netns_add, "node1")])
    assert lines(r) == ["ip -n node1 link add v1 type veth peer name v2",
                        "ip -n node1 link set dev v1 alias cnikit",
                        "ip -n node1 link set dev v1 up",
                        "ip -n node1 link set dev v2 up"]
    assert made(r)[:2] == [("link", "v1", "node1", "ip -n node1 link del v1"), ("link", "v2", "node1", None)]


def test_veth_add_twice_in_one_plan_plans_it_once():
    r = plan(step(cnikit.veth_add, "v0", "eth0", addr="10.0.0.1/24"),
             step(cnikit.veth_add, "v0", "eth0", addr="10.0.0.1/24"))
    assert lines(r) == ["ip link add v0 type veth peer name eth0",
                        "ip link set dev v0 alias cnikit",
                        "ip addr add 10.0.0.1/24 dev v0",
                        "ip link set dev v0 up",
                        "ip link set dev eth0 up"]


def test_veth_del_after_add_in_one_plan():
    r = plan(step(cnikit.veth_add, "v0", "v1"), step(cnikit.veth_del, "v0"))
    assert lines(r)[-1:] == ["ip link del v0"] and len(lines(r)) == 5
    r = plan(step(cnikit.veth_del, "v0", ns="node1"),
             given=[step(cnikit.netns_add, "node1"), step(cnikit.veth_add, "v0", "v1", ns="node1")])
    assert lines(r) == ["ip -n node1 link del v0"]
    assert lines(plan(step(cnikit.veth_del, "v0"))) == []        # nothing there: nothing to delete


# ---------------------------------------------------------------- bridge

def test_bridge_add():
    r = plan(step(cnikit.bridge_add, "br0"))
    assert lines(r) == [f"ip link add br0 address {mac('br0')} type bridge",
                        "ip link set dev br0 alias cnikit",
                        "ip link set dev br0 up"]
    assert made(r) == [("link", "br0", None, "ip link del br0"), ("up", "br0", None, None)]


def test_bridge_add_with_address_and_mtu_in_a_host_namespace():
    r = plan(step(cnikit.bridge_add, "br0", addr="10.0.0.1/24", mtu=1400, ns="node1"),
             given=[step(cnikit.netns_add, "node1")])
    assert lines(r) == [f"ip -n node1 link add br0 address {mac('br0', 'node1')} mtu 1400 type bridge",
                        "ip -n node1 link set dev br0 alias cnikit",
                        "ip -n node1 addr add 10.0.0.1/24 dev br0",
                        "ip -n node1 link set dev br0 up"]
    assert made(r) == [("link", "br0", "node1", "ip -n node1 link del br0"),
                       ("addr", "10.0.0.1/24 dev br0", "node1", None), ("up", "br0", "node1", None)]
    assert mac("br0", "node1") != mac("br0")


def test_bridge_attach_twice_in_one_plan_brings_each_port_up_once():
    r = plan(step(cnikit.bridge_add, "br0"), step(cnikit.veth_add, "v0", "eth0"),
             step(cnikit.bridge_attach, "br0", ["v0"]), step(cnikit.bridge_attach, "br0", ["v0"]))
    assert lines(r)[7:] == ["ip link set dev v0 master br0"]      # the second finds v0 a port, up
    assert made(r)[-1:] == [("master", "v0 master br0", None, None)]
    # a bridge or a port the plan neither made nor finds: the live run's error
    with pytest.raises(cnikit.UsageError, match="bridge br0 does not exist"):
        plan(step(cnikit.bridge_attach, "br0", ["v0"]), given=[step(cnikit.veth_add, "v0", "eth0")])
    with pytest.raises(cnikit.UsageError, match="interface v1 does not exist"):
        plan(step(cnikit.bridge_attach, "br0", ["v1"]), given=[step(cnikit.bridge_add, "br0")])


def test_bridge_add_twice_in_one_plan_brings_it_up_once():
    r = plan(step(cnikit.bridge_add, "br0", addr="10.0.0.1/24"), step(cnikit.bridge_add, "br0", addr="10.0.0.1/24"))
    once = [f"ip link add br0 address {mac('br0')} type bridge",
            "ip link set dev br0 alias cnikit",
            "ip addr add 10.0.0.1/24 dev br0"]
    assert lines(r) == once + ["ip link set dev br0 up"]


def test_bridge_del():
    assert lines(plan(step(cnikit.bridge_add, "br0"), step(cnikit.bridge_del, "br0")))[3:] == ["ip link del br0"]
    assert lines(plan(step(cnikit.bridge_del, "br0", ns="node1"),
                      given=[step(cnikit.netns_add, "node1"), step(cnikit.bridge_add, "br0", ns="node1")])) == \
        ["ip -n node1 link del br0"]


# ---------------------------------------------------------------- nat

NAT_ADD = ["sysctl -w net.ipv4.ip_forward=1",
           f"iptables -w -t nat -N {CHAIN}",
           f"iptables -w -t nat -A {CHAIN} -s 10.0.0.0/24 -o uplink {NAT_COMMENT} -j MASQUERADE",
           f"iptables -w -t nat -A POSTROUTING {NAT_COMMENT} -j {CHAIN}",
           f"iptables -w -t filter -N {CHAIN}",
           f"iptables -w -t filter -A {CHAIN} -s 10.0.0.0/24 -o uplink {NAT_COMMENT} -j ACCEPT",
           f"iptables -w -t filter -A {CHAIN} -d 10.0.0.0/24 -i uplink -m conntrack --ctstate RELATED,ESTABLISHED "
           f"{NAT_COMMENT} -j ACCEPT",
           f"iptables -w -t filter -A FORWARD {NAT_COMMENT} -j {CHAIN}"]


UPLINK = [step(cnikit.veth_add, "uplink", "uplink-peer")]


def test_nat_add():
    r = plan(step(cnikit.nat_add, "10.0.0.0/24", "uplink"), given=UPLINK)
    assert lines(r) == NAT_ADD
    # rollback removes each rule, then each chain once it is empty (newest first: see test_rollback_order)
    assert made(r) == [
        ("sysctl", "net.ipv4.ip_forward=1", None, None),
        ("chain", f"-t nat {CHAIN}", None, f"iptables -w -t nat -X {CHAIN}"),
        ("rule", f"-t nat -A {CHAIN} -s 10.0.0.0/24 -o uplink {NAT_COMMENT} -j MASQUERADE", None,
         f"iptables -w -t nat -D {CHAIN} -s 10.0.0.0/24 -o uplink {NAT_COMMENT} -j MASQUERADE"),
        ("rule", f"-t nat -A POSTROUTING {NAT_COMMENT} -j {CHAIN}", None,
         f"iptables -w -t nat -D POSTROUTING {NAT_COMMENT} -j {CHAIN}"),
        ("chain", f"-t filter {CHAIN}", None, f"iptables -w -t filter -X {CHAIN}"),
        ("rule", f"-t filter -A {CHAIN} -s 10.0.0.0/24 -o uplink {NAT_COMMENT} -j ACCEPT", None,
         f"iptables -w -t filter -D {CHAIN} -s 10.0.0.0/24 -o uplink {NAT_COMMENT} -j ACCEPT"),
        ("rule", f"-t filter -A {CHAIN} -d 10.0.0.0/24 -i uplink -m conntrack --ctstate RELATED,ESTABLISHED "
                 f"{NAT_COMMENT} -j ACCEPT", None,
         f"iptables -w -t filter -D {CHAIN} -d 10.0.0.0/24 -i uplink -m conntrack --ctstate RELATED,ESTABLISHED "
         f"{NAT_COMMENT} -j ACCEPT"),
        ("rule", f"-t filter -A FORWARD {NAT_COMMENT} -j {CHAIN}", None,
         f"iptables -w -t filter -D FORWARD {NAT_COMMENT} -j {CHAIN}")]


def test_nat_add_inside_a_host_namespace():
    r = plan(step(cnikit.nat_add, "10.0.0.0/24", "uplink", ns="inet"),
             given=[step(cnikit.netns_add, "inet"), step(cnikit.veth_add, "uplink", "uplink-peer", ns="inet")])
    assert lines(r) == [line.replace("sysctl ", "ip netns exec inet sysctl ", 1)
                        .replace("iptables ", "ip netns exec inet iptables ", 1) for line in NAT_ADD]
    assert {ns for _, _, ns, _ in made(r)} == {"inet"}
    with pytest.raises(cnikit.UsageError, match="--out interface uplink does not exist"):
        plan(step(cnikit.nat_add, "10.0.0.0/24", "uplink"))


def test_nat_add_twice_and_del_after_add_in_one_plan():
    # the plan reads itself back: the second add finds every rule there, del removes what add made
    r = plan(step(cnikit.nat_add, "10.0.0.0/24", "uplink"), step(cnikit.nat_add, "10.0.0.0/24", "uplink"),
             given=UPLINK)
    assert lines(r) == NAT_ADD
    r = plan(step(cnikit.nat_add, "10.0.0.0/24", "uplink"), step(cnikit.nat_del, "10.0.0.0/24"), given=UPLINK)
    assert lines(r) == NAT_ADD + [f"iptables -w -t nat -D POSTROUTING {NAT_COMMENT} -j {CHAIN}",
                                  f"iptables -w -t filter -D FORWARD {NAT_COMMENT} -j {CHAIN}",
                                  f"iptables -w -t nat -F {CHAIN}",
                                  f"iptables -w -t nat -X {CHAIN}",
                                  f"iptables -w -t filter -F {CHAIN}",
                                  f"iptables -w -t filter -X {CHAIN}"]


def test_nat_del_and_unpublish_on_a_fresh_host_plan_nothing():
    r = plan(step(cnikit.nat_del, "10.0.0.0/24"), step(cnikit.nat_unpublish, 8080))
    assert lines(r) == [] and made(r) == []


def test_nat_publish():
    r = plan(step(cnikit.nat_publish, 8080, "10.0.0.2:80", "br0"), given=[step(cnikit.bridge_add, "br0")])
    port, ports = "-m comment --comment 'cnikit port tcp/8080'", "-m comment --comment 'cnikit ports'"
    assert lines(r) == [
        "sysctl -w net.ipv4.ip_forward=1",
        "sysctl -w net.ipv4.conf.br0.route_localnet=1",
        "iptables -w -t nat -N CNIKIT-PORTS",
        f"iptables -w -t nat -A CNIKIT-PORTS -p tcp -m tcp --dport 8080 {port} -j DNAT --to-destination 10.0.0.2:80",
        f"iptables -w -t nat -A PREROUTING -m addrtype --dst-type LOCAL {ports} -j CNIKIT-PORTS",
        f"iptables -w -t filter -A FORWARD -d 10.0.0.2/32 '!' -i br0 -o br0 -p tcp -m tcp --dport 80 {port} -j ACCEPT",
        f"iptables -w -t nat -A OUTPUT -m addrtype --dst-type LOCAL {ports} -j CNIKIT-PORTS",
        f"iptables -w -t nat -A POSTROUTING -o br0 -m addrtype --src-type LOCAL {ports} -j MASQUERADE",
        f"iptables -w -t nat -A POSTROUTING -s 10.0.0.2/32 -d 10.0.0.2/32 -p tcp -m tcp --dport 80 {port} "
        f"-j MASQUERADE"]
    # every rule has its exact -D as undo
    for c in r.changes("rule"):
        assert shlex.join(c.undo) == "iptables -w " + c.name.replace(" -A ", " -D ", 1)


# ---------------------------------------------------------------- vxlan and its forwarding entries

def test_vxlan_add_over_a_planned_underlay_takes_its_mtu_minus_50():
    r = plan(step(cnikit.vxlan_add, "vx0", 42, remote="192.0.2.2", dev="under0"),
             given=[step(cnikit.veth_add, "under0", "under1", mtu=1500)])
    assert lines(r) == ["ip link add vx0 mtu 1450 type vxlan id 42 dstport 4789 remote 192.0.2.2 dev under0",
                        "ip link set dev vx0 alias cnikit",
                        "ip link set dev vx0 up"]
    assert made(r) == [("link", "vx0", None, "ip link del vx0"), ("up", "vx0", None, None)]
    assert cnikit.get_link(r, "vx0")["mtu"] == 1450
    # no --dev: the underlay is the device whose planned address covers --remote
    r = plan(step(cnikit.vxlan_add, "vx1", 43, remote="192.0.2.2"),
             given=[step(cnikit.veth_add, "under0", "under1", addr="192.0.2.1/24", mtu=9000)])
    assert lines(r)[0] == "ip link add vx1 mtu 8950 type vxlan id 43 dstport 4789 remote 192.0.2.2"


def test_vxlan_add_with_every_option():
    r = plan(step(cnikit.vxlan_add, "vx0", 7, group="239.1.1.1", local="192.0.2.1", dev="eth0", dstport=8472,
                  bridge_name="br0", mtu=1400, ns="node1", learning=False),
             given=[step(cnikit.netns_add, "node1"), step(cnikit.bridge_add, "br0", ns="node1"),
                    step(cnikit.veth_add, "eth0", "eth1", ns="node1")])
    assert lines(r) == ["ip -n node1 link add vx0 mtu 1400 type vxlan id 7 dstport 8472 group 239.1.1.1 "
                        "local 192.0.2.1 dev eth0 nolearning",
                        "ip -n node1 link set dev vx0 alias cnikit",
                        "ip -n node1 link set dev vx0 master br0",
                        "ip -n node1 link set dev vx0 up"]


def test_vxlan_add_twice_in_one_plan_and_del():
    r = plan(step(cnikit.vxlan_add, "vx0", 42, mtu=1400), step(cnikit.vxlan_add, "vx0", 42, mtu=1400),
             step(cnikit.vxlan_del, "vx0"))
    assert lines(r) == ["ip link add vx0 mtu 1400 type vxlan id 42 dstport 4789",
                        "ip link set dev vx0 alias cnikit",
                        "ip link set dev vx0 up",
                        "ip link del vx0"]


def test_vxlan_fdb_add():
    r = plan(step(cnikit.vxlan_fdb_add, "vx0", "02:00:00:00:00:02", "192.0.2.2"),
             step(cnikit.vxlan_fdb_add, "vx0", "02:00:00:00:00:02", "192.0.2.2", ns="node1"),
             given=[step(cnikit.vxlan_add, "vx0", 42, mtu=1400), step(cnikit.netns_add, "node1"),
                    step(cnikit.vxlan_add, "vx0", 42, mtu=1400, ns="node1")])
    assert lines(r) == ["bridge fdb append 02:00:00:00:00:02 dev vx0 dst 192.0.2.2",
                        "bridge -n node1 fdb append 02:00:00:00:00:02 dev vx0 dst 192.0.2.2"]
    # an entry lives in its device: nothing of its own to undo
    assert made(r) == []


# ---------------------------------------------------------------- routes

def test_route_add():
    r = plan(step(cnikit.route_add, "192.0.2.0/24", via="10.0.0.2"),
             step(cnikit.route_add, "default", dev="eth0", ns="ns1"),
             step(cnikit.route_add, "198.51.100.0/24", via="10.0.0.2", dev="v0"), given=NS1)
    assert lines(r) == [f"ip route add 192.0.2.0/24 via 10.0.0.2 proto {cnikit.ROUTE_PROTO}",
                        f"ip -n ns1 route add default dev eth0 proto {cnikit.ROUTE_PROTO}",
                        f"ip route add 198.51.100.0/24 via 10.0.0.2 dev v0 proto {cnikit.ROUTE_PROTO}"]
    assert made(r) == [("route", "192.0.2.0/24 via 10.0.0.2", None, "ip route del 192.0.2.0/24"),
                       ("route", "default dev eth0", "ns1", "ip -n ns1 route del default"),
                       ("route", "198.51.100.0/24 via 10.0.0.2 dev v0", None, "ip route del 198.51.100.0/24")]


def test_route_and_fdb_entry_twice_in_one_plan():
    # the route is planned once (the plan reads it back; another gateway would be a conflict);
    # a forwarding entry is not in the plan's model, so it is planned again (append: harmless)
    r = plan(step(cnikit.route_add, "192.0.2.0/24", via="10.0.0.2"),
             step(cnikit.route_add, "192.0.2.0/24", via="10.0.0.2"),
             step(cnikit.vxlan_fdb_add, "vx0", "02:00:00:00:00:02", "192.0.2.2"),
             step(cnikit.vxlan_fdb_add, "vx0", "02:00:00:00:00:02", "192.0.2.2"),
             given=[step(cnikit.vxlan_add, "vx0", 42, mtu=1400)])
    assert lines(r) == [f"ip route add 192.0.2.0/24 via 10.0.0.2 proto {cnikit.ROUTE_PROTO}"] + \
        ["bridge fdb append 02:00:00:00:00:02 dev vx0 dst 192.0.2.2"] * 2
    with pytest.raises(cnikit.UsageError, match="already exists"):
        plan(step(cnikit.route_add, "192.0.2.0/24", via="10.0.0.3"),
             given=[step(cnikit.route_add, "192.0.2.0/24", via="10.0.0.2")])


# ---------------------------------------------------------------- cni install

def test_cni_install_plans_the_compiled_plugin_and_the_conflist_each_atomically(tmp_path):
    bindir, confdir = str(tmp_path / "bin"), str(tmp_path / "net.d")
    out = io.StringIO()
    r = cnikit.Runner(dry_run=True, out=out)
    cnikit.cni_install(r, subnet="10.244.1.0/24", plugin_dir=bindir, conf_dir=confdir, python="/usr/bin/python3")
    src = cnikit.CNI_PLUGIN_SRC
    conflist = f"{confdir}/10-cnikit.conflist"
    assert lines(r) == [f"mkdir -p {bindir}",
                        f"/usr/bin/python3 -I -S {src} --compile {src} {bindir}/.cnikit.tmp",
                        f"mv -f {bindir}/.cnikit.tmp {bindir}/cnikit",
                        f"mkdir -p {confdir}",
                        f"install -m 0644 /dev/stdin {confdir}/.10-cnikit.conflist.tmp",
                        f"mv -f {confdir}/.10-cnikit.conflist.tmp {conflist}"]
    assert [(c.kind, c.name, c.undo and shlex.join(c.undo)) for c in r.changes() if c.kind == "file"] == \
        [("file", f"{bindir}/cnikit", f"rm -f {bindir}/cnikit"), ("file", conflist, f"rm -f {conflist}")]
    # the echo is a script: the config goes in as a here-document
    assert f"install -m 0644 /dev/stdin {confdir}/.10-cnikit.conflist.tmp <<'EOF'\n{{\n" in out.getvalue()
    assert not os.path.exists(bindir) and not os.path.exists(confdir)


# ---------------------------------------------------------------- one plan, start to end

def test_rollback_order_is_the_plan_reversed():
    # What a failure at the end of this plan would undo, newest first (Runner.rollback's order):
    # the records say it even where a dry run has nothing to roll back.
    r = plan(step(cnikit.netns_add, "ns1"),
             step(cnikit.veth_add, "v0", "eth0", netns="ns1", mtu=1400),
             step(cnikit.bridge_add, "br0"),
             step(cnikit.bridge_attach, "br0", ["v0"]),
             step(cnikit.nat_add, "10.0.0.0/24", "br0"),
             step(cnikit.route_add, "192.0.2.0/24", via="10.0.0.2"))
    undo = [shlex.join(c.undo) for c in reversed(r.changes()) if c.undo]
    assert undo == ["ip route del 192.0.2.0/24",
                    f"iptables -w -t filter -D FORWARD {NAT_COMMENT} -j {CHAIN}",
                    f"iptables -w -t filter -D {CHAIN} -d 10.0.0.0/24 -i br0 -m conntrack --ctstate "
                    f"RELATED,ESTABLISHED {NAT_COMMENT} -j ACCEPT",
                    f"iptables -w -t filter -D {CHAIN} -s 10.0.0.0/24 -o br0 {NAT_COMMENT} -j ACCEPT",
                    f"iptables -w -t filter -X {CHAIN}",
                    f"iptables -w -t nat -D POSTROUTING {NAT_COMMENT} -j {CHAIN}",
                    f"iptables -w -t nat -D {CHAIN} -s 10.0.0.0/24 -o br0 {NAT_COMMENT} -j MASQUERADE",
                    f"iptables -w -t nat -X {CHAIN}",
                    "ip link del br0",
                    "ip link del v0",
                    "ip netns del ns1"]
    assert r.rollback() == [] and r.commands() == [shlex.split(line) for line in lines(r)]


# ---------------------------------------------------------------- through the CLI

def cli_plan(capsys, *argv):
    """`cnikit --dry-run ARGV` in-process: (exit code, stdout lines, stderr)."""
    code = cnikit.main(["--dry-run", *argv])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


def here(*steps):
    """The library's plan of STEPS against this host (read only), as the lines it prints."""
    return plan(*steps, plan_for="this host").out.getvalue().splitlines()


CLI_AND_LIBRARY = [
    (["veth", "add", "v0", "eth0", "--netns", "ns1", "--addr", "10.0.0.1/24", "--peer-addr", "10.0.0.2/24",
      "--mtu", "1400"],
     step(cnikit.veth_add, "v0", "eth0", netns="ns1", addr="10.0.0.1/24", peer_addr="10.0.0.2/24", mtu=1400)),
    (["-n", "node1", "bridge", "add", "br0", "--addr", "10.0.0.1/24"],
     step(cnikit.bridge_add, "br0", addr="10.0.0.1/24", ns="node1")),
    (["nat", "add", "10.0.0.0/24", "--out", "uplink"], step(cnikit.nat_add, "10.0.0.0/24", "uplink")),
    (["vxlan", "add", "vx0", "--id", "42", "--remote", "192.0.2.2", "--mtu", "1400", "--bridge", "br0"],
     step(cnikit.vxlan_add, "vx0", 42, remote="192.0.2.2", bridge_name="br0", mtu=1400)),
    (["-n", "node1", "vxlan", "fdb", "add", "vx0", "02:00:00:00:00:02", "--dst", "192.0.2.2"],
     step(cnikit.vxlan_fdb_add, "vx0", "02:00:00:00:00:02", "192.0.2.2", ns="node1")),
    (["netns", "add", "ns1", "--lo-up"], step(cnikit.netns_add, "ns1", lo_up=True)),
    (["netns", "del", "ns1"], step(cnikit.netns_del, "ns1")),
    (["veth", "del", "v0"], step(cnikit.veth_del, "v0")),
    (["bridge", "del", "br0"], step(cnikit.bridge_del, "br0")),
    (["bridge", "attach", "br0", "v0"], step(cnikit.bridge_attach, "br0", ["v0"])),
    (["vxlan", "del", "vx0"], step(cnikit.vxlan_del, "vx0")),
    (["netns", "lo", "ns1"], step(cnikit.netns_lo_up, "ns1")),
]


@pytest.mark.parametrize("argv,library", CLI_AND_LIBRARY, ids=[" ".join(a)[:40] for a, _ in CLI_AND_LIBRARY])
def test_the_cli_prints_exactly_the_plan_the_library_makes(capsys, argv, library):
    # both plan against this host, read only: the same host, the same lines (notes included)
    code, out, err = cli_plan(capsys, *argv)
    assert (code, err) == (0, "")
    assert out == here(library)


def test_the_clis_plan_takes_input_it_cannot_find_as_made_by_an_earlier_command(capsys):
    # each CLI dry run is one step of a longer script: it says so, and plans on
    code, out, err = cli_plan(capsys, "veth", "add", "v0", "eth0", "--netns", "cnikit-absent-ns")
    assert (code, err) == (0, "")
    assert out[0].startswith("# namespace 'cnikit-absent-ns' does not exist")
    assert out[0].endswith("planned as if an earlier command made it")
    assert "ip -n cnikit-absent-ns link set dev eth0 up" in out


# Bad input: exit 2, one line on stderr, and not one command planned (stdout empty).
# Only input a dry run can judge without looking at this host (what must exist is checked
# by test_core_dryrun_badinput, as root).
BAD = [
    (["netns", "add", "../../tmp/x"], "namespace name"),
    (["netns", "add", ".hidden"], "namespace name"),
    (["-n", "../etc", "bridge", "add", "br0"], "namespace name"),
    (["-n", "ns1", "netns", "add", "x"], "does not apply to netns"),
    (["veth", "add", "x" * 16, "eth0"], "at most 15"),
    (["veth", "add", "v0", "eth/0"], "'/'"),
    (["veth", "add", "v0", "eth:0"], "':'"),
    (["veth", "add", "v0", "eth0", "--addr", "10.0.0.1"], "prefix length"),
    (["veth", "add", "v0", "eth0", "--addr", "10.0.0.256/24"], "not an address"),
    (["veth", "add", "v0", "eth0", "--peer-addr", "10.0.0.0/24"], "10.0.0.0/24"),
    (["veth", "add", "v0", "eth0", "--mtu", "9"], "MTU"),
    (["veth", "add", "v0", "v0"], "two different names"),
    (["bridge", "add", "br0", "--addr", "nonsense"], "not an address"),
    (["bridge", "add", "br 0"], "whitespace"),
    (["bridge", "add"], "required"),
    (["bridge", "attach", "br0", "a/b"], "'/'"),
    (["nat", "add", "10.0.0.1/24", "--out", "eth0"], "CIDR"),
    (["nat", "add", "10.0.0.0/24", "--out", "a b"], "whitespace"),
    (["nat", "del", "10.0.0.0/33"], "10.0.0.0/33"),
    (["nat", "publish", "0", "--to", "10.0.0.2:80", "--bridge", "br0"], "0"),
    (["nat", "publish", "8080", "--to", "10.0.0.2", "--bridge", "br0"], "10.0.0.2"),
    (["vxlan", "add", "vx0", "--id", "0", "--remote", "192.0.2.2"], "VNI"),
    (["vxlan", "add", "vx0", "--id", "16777216", "--remote", "192.0.2.2"], "VNI"),
    (["vxlan", "add", "vx0", "--id", "5", "--remote", "192.0.2.2", "--dstport", "70000"], "dstport"),
    (["vxlan", "add", "vx0", "--id", "5", "--remote", "not-an-ip"], "not an IP"),
    (["vxlan", "add", "vx0", "--id", "5", "--remote", "192.0.2.2", "--group", "239.1.1.1"], "not both"),
    (["vxlan", "add", "vx0", "--id", "5", "--group", "192.0.2.2", "--dev", "lo"], "multicast"),
    (["vxlan", "add", "vx0", "--id", "5", "--group", "239.1.1.1"], "--group needs --dev"),
    (["vxlan", "fdb", "add", "vx0", "zz:00:00:00:00:00", "--dst", "192.0.2.2"], "MAC"),
    (["vxlan", "fdb", "add", "vx0", "02:00:00:00:00:02", "--dst", "nowhere"], "nowhere"),
    (["cni", "install", "--python", "python3"], "absolute path"),
    (["cni", "install", "--subnet", "10.244.1.1/24"], "10.244.1.1/24"),
    (["cni", "install", "--plugin-dir", "opt/cni/bin"], "absolute path"),
    (["cni", "install", "--name", "a b"], "network name"),
    (["frobnicate"], "invalid choice"),
]


@pytest.mark.parametrize("argv,why", BAD, ids=[" ".join(a)[:40] for a, _ in BAD])
def test_bad_input_is_refused_before_any_command(capsys, argv, why):
    code, out, err = cli_plan(capsys, *argv)
    assert code == 2, err
    assert err.startswith("cnikit: error:") and err.count("\n") == 1, err
    assert why in err, err
    assert out == []


@pytest.mark.parametrize("verb,args,kwargs", [
    (cnikit.netns_add, ("a/b",), {}),
    (cnikit.veth_add, ("v0", "eth0"), {"addr": "10.0.0.1/24", "peer_addr": "bogus"}),
    (cnikit.veth_add, ("v0", "eth0"), {"netns": "ns1", "mtu": 70000}),
    (cnikit.bridge_add, ("br0",), {"addr": "10.0.0.1/24", "mtu": 10}),
    (cnikit.bridge_attach, ("br0", ["v0", "x" * 16]), {}),
    (cnikit.nat_add, ("10.0.0.0/24", "x" * 16), {}),
    (cnikit.vxlan_add, ("vx0", 42), {"remote": "192.0.2.2", "mtu": 40}),
    (cnikit.vxlan_fdb_add, ("vx0", "02:00:00:00:00", "192.0.2.2"), {}),
    (cnikit.route_add, ("192.0.2.0/24",), {}),
    (cnikit.route_add, ("192.0.2.1/24",), {"via": "10.0.0.2"}),
])
def test_a_verb_given_bad_input_plans_nothing(verb, args, kwargs):
    # checked whole before the first command: a later bad argument leaves no half plan
    r = cnikit.Runner(dry_run=True, out=io.StringIO())
    with pytest.raises(cnikit.UsageError):
        verb(r, *args, **kwargs)
    assert r.commands() == [] and r.changes() == [] and r.out.getvalue() == ""


# ---------------------------------------------------------------- cni: the runtime's calls, as a script

@pytest.fixture
def unit_net(tmp_path):
    """A conflist (our plugin, then portmap) and a CNI_PATH holding both plugins (never run here)."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "net.d").mkdir()
    for name in ("cnikit", "portmap"):
        (tmp_path / "bin" / name).write_text("#!/bin/sh\nexit 1\n")
        (tmp_path / "bin" / name).chmod(0o755)
    text = ('{"cniVersion":"1.0.0","name":"unit","plugins":[{"type":"cnikit","ipam":{"subnet":"10.22.0.0/24"}},'
            '{"type":"portmap","capabilities":{"portMappings":true}}]}')
    (tmp_path / "net.d" / "10-unit.conflist").write_text(text)
    return str(tmp_path / "bin"), str(tmp_path / "net.d" / "10-unit.conflist"), text


def test_cni_add_plans_each_plugin_of_the_chain_then_caches_the_result(capsys, unit_net):
    bindir, conf, text = unit_net
    code, out, err = cli_plan(capsys, "cni", "add", "pod1", "--conf", conf, "--cni-path", bindir)
    assert (code, err) == (0, "")
    env = (f"env CNI_COMMAND=ADD CNI_CONTAINERID=pod1 CNI_NETNS=/run/netns/pod1 CNI_IFNAME=eth0 "
           f"CNI_ARGS=IgnoreUnknown=1 CNI_PATH={bindir}")
    cache = f"{cnikit.CNI_CACHE_DIR}/unit-pod1-eth0"
    record = {"kind": "cniCacheV1", "containerId": "pod1", "ifName": "eth0", "networkName": "unit",
              "config": base64.b64encode(text.encode()).decode(), "cniArgs": [["IgnoreUnknown", "1"]],
              "netns": "/run/netns/pod1", "capabilityArgs": {}, "result": "RESULT"}
    expected = [
        f"# ADD pod1 eth0 to network unit ({conf}): cnikit -> portmap",
        "result_pod1_eth0=$(",
        f"{env} {bindir}/cnikit <<'EOF'",
        '{"type":"cnikit","ipam":{"subnet":"10.22.0.0/24"},"name":"unit","cniVersion":"1.0.0"}',
        "EOF",
        ")",
        "result_pod1_eth0=$(",
        f"{env} {bindir}/portmap <<EOF",
        '{"type":"portmap","capabilities":{"portMappings":true},"name":"unit","cniVersion":"1.0.0",'
        '"prevResult":$result_pod1_eth0}',
        "EOF",
        ")",
        f"# cache the result in {cache} (CHECK and DEL get it as prevResult)",
        f"mkdir -p {cnikit.CNI_CACHE_DIR}",
        f"install -m 0644 /dev/stdin {cache}.tmp <<EOF",
        json.dumps(record).replace('"RESULT"', "$result_pod1_eth0"),
        "EOF",
        f"mv -f {cache}.tmp {cache}",
        "printf '%s\\n' \"$result_pod1_eth0\""]
    # (what this host adds as notes, a pod1 that is not here or Docker's FORWARD policy, aside)
    assert [line for line in out if line in expected or not line.startswith("#")] == expected


def test_cni_del_plans_the_chain_in_reverse_without_a_prev_result(capsys, unit_net):
    bindir, conf, _ = unit_net
    code, out, err = cli_plan(capsys, "cni", "del", "pod1", "--conf", conf, "--cni-path", bindir,
                              "--ifname", "eth1", "--id", "c1")
    assert (code, err) == (0, "")
    # DEL passes the netns only where it is (as a runtime's second DEL, after it is gone, does not)
    netns = "/run/netns/pod1" if os.path.exists("/run/netns/pod1") else ""
    env = (f"env CNI_COMMAND=DEL CNI_CONTAINERID=c1 CNI_NETNS={netns} CNI_IFNAME=eth1 "
           f"CNI_ARGS=IgnoreUnknown=1 CNI_PATH={bindir}")
    assert [line for line in out if not line.startswith("#")] == [
        f"{env} {bindir}/portmap <<'EOF'",
        '{"type":"portmap","capabilities":{"portMappings":true},"name":"unit","cniVersion":"1.0.0"}',
        "EOF",
        f"{env} {bindir}/cnikit <<'EOF'",
        '{"type":"cnikit","ipam":{"subnet":"10.22.0.0/24"},"name":"unit","cniVersion":"1.0.0"}',
        "EOF",
        f"rm -f {cnikit.CNI_CACHE_DIR}/unit-c1-eth1"]
    assert out[0].startswith("# DEL c1 eth1 from network unit, in reverse order")


def test_cni_uninstall_plans_removing_what_install_wrote(capsys, unit_net):
    bindir, conf, _ = unit_net
    confdir = os.path.dirname(conf)
    code, out, err = cli_plan(capsys, "cni", "uninstall", "--name", "unit", "--conf-dir", confdir,
                              "--plugin-dir", bindir)
    assert (code, out, err) == (0, [f"rm -f {conf}", f"rm -f {bindir}/cnikit"], "")
    # Another config still uses the plugin: a real run keeps it, and so does the plan.
    with open(os.path.join(confdir, "20-other.conflist"), "w") as f:
        json.dump({"cniVersion": "1.0.0", "name": "other", "plugins": [{"type": "cnikit"}]}, f)
    code, out, err = cli_plan(capsys, "cni", "uninstall", "--name", "unit", "--conf-dir", confdir,
                              "--plugin-dir", bindir)
    assert (code, [line for line in out if not line.startswith("#")], err) == (0, [f"rm -f {conf}"], "")
    assert os.path.exists(conf) and os.path.exists(os.path.join(bindir, "cnikit"))


def test_cni_gc_plans_one_call_per_plugin_with_the_attachments_to_keep(capsys, tmp_path):
    # cniVersion 1.1.0 (GC is new there); no attachment of this network is cached, so none is kept
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "cnikit").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "bin" / "cnikit").chmod(0o755)
    conf = tmp_path / "10-planonly.conflist"
    conf.write_text('{"cniVersion":"1.1.0","name":"planonly","plugins":[{"type":"cnikit"}]}')
    code, out, err = cli_plan(capsys, "cni", "gc", "--conf", str(conf), "--cni-path", str(tmp_path / "bin"))
    assert (code, err) == (0, "")
    assert out == ["# GC on network planonly: 0 valid attachment(s) to keep",
                   f"env CNI_COMMAND=GC CNI_PATH={tmp_path}/bin {tmp_path}/bin/cnikit <<'EOF'",
                   '{"type":"cnikit","name":"planonly","cniVersion":"1.1.0","cni.dev/valid-attachments":[],'
                   '"cni.dev/attachments":[]}',
                   "EOF"]
    # CHECK needs the result ADD cached, which a dry run cannot know: it plans no call
    code, out, err = cli_plan(capsys, "cni", "check", "pod1", "--conf", str(conf), "--cni-path", str(tmp_path / "bin"))
    assert (code, err) == (0, "") and [line for line in out if not line.startswith("#")] == []


def test_a_hosts_plan_builds_on_the_uplink_this_host_has_and_refuses_one_it_lacks():
    # A lesson's --host plan is a fresh host's that reads this host's facts: an uplink the
    # lesson names is this host's own (with its MTU); one this host lacks is refused as live.
    class Here(cnikit.FreshHost):
        def link(self, name, ns=None):
            return {"ifname": name, "mtu": 9000, "flags": ["UP"]} if name == "eth1" and ns is None else None
    r = cnikit.Runner(dry_run=True, out=io.StringIO())
    r.state = cnikit.PlanState(cnikit.FreshHost(Here()), r.note)
    assert cnikit.underlay_mtu(r, "eth1") == cnikit.DEFAULT_MTU     # not known before it is named
    cnikit.vxlan_add(r, "vxlan0", 42, local="192.0.2.1", dev="eth1")
    assert lines(r)[0] == "ip link add vxlan0 mtu 8950 type vxlan id 42 dstport 4789 local 192.0.2.1 dev eth1"
    with pytest.raises(cnikit.UsageError, match="--dev eth2 does not exist"):
        cnikit.vxlan_add(r, "vxlan1", 43, local="192.0.2.1", dev="eth2")
