"""The reference bridge plugin's config keys, on real namespaces: each builds a pod and reads
the kernel back (ip -j -d link, bridge -j vlan, nft, address flags, sysctls); DEL and GC leave
nothing; a value that cannot be honoured is error 7 before anything changes."""
import json
import os

import pytest
import sh

from plugin_helpers import CLASSIC, allocation_files, cni, error, internet, links, nat_rules, netns, ok, ping, pod

import kernel

CONF = dict(CLASSIC, cniVersion="1.1.0")


def link(name, ns=None):
    return links(ns)[name]


def host_veth(res):
    return res["interfaces"][1]["name"]


def port_vlans(dev):
    """{vid: set of flags} of a bridge port."""
    data = json.loads(str(sh.bridge("-j", "vlan", "show", "dev", dev)))
    entries = data[0]["vlans"] if data else []
    return {v["vlan"]: set(v.get("flags", [])) for v in entries}


def nft_ruleset():
    return json.loads(str(sh.nft("-j", "list", "ruleset")))["nftables"]


def nft_tables():
    """The inet and bridge tables (iptables, here iptables-nft, keeps to ip and ip6)."""
    return sorted((o["table"]["family"], o["table"]["name"]) for o in nft_ruleset()
                  if "table" in o and o["table"]["family"] in ("inet", "bridge"))


def vlan_filtering_or_skip():
    """This kernel's bridges can filter VLANs (CONFIG_BRIDGE_VLAN_FILTERING), or the test is skipped."""
    try:
        sh.ip("link", "add", "probe0", "type", "bridge", "vlan_filtering", "1")
    except sh.ErrorReturnCode:
        pytest.skip("this kernel has no bridge VLAN filtering (CONFIG_BRIDGE_VLAN_FILTERING)")
    sh.ip("link", "del", "probe0")


def nft_rules(family, table):
    return [o["rule"] for o in nft_ruleset() if "rule" in o and o["rule"]["family"] == family
            and o["rule"]["table"] == table]


def sysctl(ns, path):
    return str(sh.ip("netns", "exec", ns, "cat", path)).strip()


def v6_addr_info(ns, dev="eth0"):
    data = json.loads(str(sh.ip("-n", ns, "-j", "addr", "show", "dev", dev)))
    return [a for a in data[0]["addr_info"] if a["family"] == "inet6" and a.get("scope") == "global"]


def nothing_made(ns):
    """ADD changed nothing: no bridge, no pod interface, no allocation, no rules, no nft table."""
    assert "cni0" not in links() and "eth0" not in links(ns)
    assert allocation_files(CONF["name"]) == {} and "cnikit" not in nat_rules() and nft_tables() == []


def gc_all(conf):
    ok(cni("GC", dict(conf, **{"cni.dev/valid-attachments": []})))


# ---------------------------------------------------------------- issue #18 item 1: the bridge's MAC

def test_bridge_mac_is_its_own_so_a_pod_keeps_its_gateway_when_the_lowest_ports_leave():
    results = [pod(f"p{i}", CONF) for i in (1, 2, 3)]
    with open("/sys/class/net/cni0/addr_assign_type") as f:
        assert f.read().strip() == "3"  # NET_ADDR_SET: never recalculated from the ports
    mac = link("cni0")["address"]
    ping("p3", "10.244.0.1")
    for i in (1, 2):
        ok(cni("DEL", CONF, cid=f"p{i}"))
        assert host_veth(results[i - 1]) not in links()
    assert link("cni0")["address"] == mac
    neigh = json.loads(str(sh.ip("-n", "p3", "-j", "neigh", "show", "10.244.0.1")))
    assert neigh and all(n.get("lladdr", mac) == mac for n in neigh)
    assert kernel.ping("10.244.0.1", "p3", count=1)  # at once: the entry p3 holds is still right


def test_a_bridge_made_by_someone_else_gets_its_mac_set_with_its_first_gateway():
    sh.ip("link", "add", "cni0", "type", "bridge")
    with open("/sys/class/net/cni0/addr_assign_type") as f:
        assert f.read().strip() != "3"
    pod("p1", CONF)
    with open("/sys/class/net/cni0/addr_assign_type") as f:
        assert f.read().strip() == "3"


# ---------------------------------------------------------------- promiscMode, portIsolation, hairpin

def test_promisc_mode_makes_the_bridge_promiscuous_and_check_verifies_it():
    c = dict(CONF, promiscMode=True)
    res = pod("p1", c)
    assert "PROMISC" in link("cni0")["flags"] and link("cni0")["promiscuity"] >= 1
    ok(cni("CHECK", dict(c, prevResult=res), cid="p1"))
    assert "promiscMode is false" in error(cni("CHECK", dict(CONF, prevResult=res), cid="p1"), 100)["msg"]
    ping("p1", "10.244.0.1")


def test_check_fails_when_the_bridge_is_promiscuous_but_the_config_says_not():
    res = pod("p1", CONF)
    sh.ip("link", "set", "cni0", "promisc", "on")
    assert "promisc" in error(cni("CHECK", dict(CONF, prevResult=res), cid="p1"), 100)["msg"]


def test_promisc_mode_on_an_existing_bridge_turns_it_on():
    sh.ip("link", "add", "cni0", "type", "bridge")
    pod("p1", dict(CONF, promiscMode=True))
    assert "PROMISC" in link("cni0")["flags"]


def test_hairpin_and_promisc_together_are_refused_before_anything():
    ns = netns("p1")
    assert "promiscMode" in error(cni("ADD", dict(CONF, hairpinMode=True, promiscMode=True), cid="p1", netns=ns), 7)["msg"]
    nothing_made("p1")


def test_port_isolation_marks_the_port_isolated_pods_reach_the_gateway_not_each_other():
    c = dict(CONF, portIsolation=True)
    r1, r2 = pod("p1", c), pod("p2", c)
    for r in (r1, r2):
        assert link(host_veth(r))["linkinfo"]["info_slave_data"]["isolated"] is True
    ping("p1", "10.244.0.1")
    assert not kernel.ping(r2["ips"][0]["address"].split("/")[0], "p1")


def test_hairpin_and_isolation_together_on_one_port():
    r = pod("p1", dict(CONF, hairpinMode=True, portIsolation=True))
    slave = link(host_veth(r))["linkinfo"]["info_slave_data"]
    assert slave["hairpin"] is True and slave["isolated"] is True


# ---------------------------------------------------------------- vlan, vlanTrunk, preserveDefaultVlan

def test_vlan_filters_the_bridge_puts_the_port_untagged_in_the_vlan_and_the_gateway_on_its_own_link():
    vlan_filtering_or_skip()
    c = dict(CONF, vlan=100)
    r1, r2 = pod("p1", c), pod("p2", c)
    assert link("cni0")["linkinfo"]["info_data"]["vlan_filtering"] == 1
    for r in (r1, r2):
        assert port_vlans(host_veth(r)) == {100: {"PVID", "Egress Untagged"}}  # the default VLAN 1 is gone
    assert kernel.addrs("cni0.100") == ["10.244.0.1/24"] and kernel.addrs("cni0") == []
    assert [i["name"] for i in r1["interfaces"]][-1] == "cni0.100"
    ping("p1", "10.244.0.1")
    ping("p1", r2["ips"][0]["address"].split("/")[0])
    ok(cni("DEL", c, cid="p1"))
    ok(cni("DEL", c, cid="p2"))
    assert "cni0.100" in links()  # shared by the VLAN's pods, like the bridge: it stays


def test_preserve_default_vlan_keeps_vlan_1_on_the_port():
    vlan_filtering_or_skip()
    r = pod("p1", dict(CONF, vlan=100, preserveDefaultVlan=True, isGateway=False, isDefaultGateway=False, ipMasq=False))
    vlans = port_vlans(host_veth(r))
    assert vlans[100] == {"PVID", "Egress Untagged"} and 1 in vlans and "PVID" not in vlans[1]
    assert "cni0.100" not in links()  # no gateway asked for: no gateway link


def test_vlan_trunk_tags_its_ids_and_keeps_vlan_1_native():
    vlan_filtering_or_skip()
    c = dict(CONF, vlanTrunk=[{"minID": 200, "maxID": 202}, {"id": 300}])
    r = pod("p1", c)
    assert link("cni0")["linkinfo"]["info_data"]["vlan_filtering"] == 1
    assert port_vlans(host_veth(r)) == {1: {"PVID", "Egress Untagged"}, 200: set(), 201: set(), 202: set(), 300: set()}
    ping("p1", "10.244.0.1")  # untagged, VLAN 1, like the bridge's own port


@pytest.mark.parametrize("extra", [{"vlan": 100}, {"vlanTrunk": []}])
def test_vlan_on_a_kernel_without_vlan_filtering_fails_clearly_and_leaves_nothing(extra):
    try:
        sh.ip("link", "add", "probe0", "type", "bridge", "vlan_filtering", "1")
        pytest.skip("this kernel's bridges filter VLANs")
    except sh.ErrorReturnCode:
        pass
    ns = netns("p1")
    assert "VLAN filtering" in error(cni("ADD", dict(CONF, **extra), cid="p1", netns=ns), 101)["msg"]
    nothing_made("p1")


@pytest.mark.parametrize("extra", [
    {"vlan": 4095}, {"vlan": -1}, {"vlan": "100"}, {"vlanTrunk": [{"minID": 5}]}, {"vlanTrunk": [{"maxID": 5}]},
    {"vlanTrunk": [{"minID": 9, "maxID": 5}]}, {"vlanTrunk": [{"id": 0}]}, {"vlanTrunk": [{"id": 4095}]},
    {"vlanTrunk": {"id": 5}}, {"vlanTrunk": [5]}, {"preserveDefaultVlan": "yes"}, {"promiscMode": 1},
    {"portIsolation": "true"}, {"macspoofchk": None, "enabledad": 0}, {"forceAddress": "no"},
    {"ipMasqBackend": "ebtables"}, {"ipMasqBackend": True}, {"disableContainerInterface": True},
    {"mode": "routed", "vlan": 10}, {"mode": "routed", "macspoofchk": True}, {"mode": "routed", "portIsolation": True},
    {"vlan": 100, "bridge": "br-long-name"},
])
def test_values_that_cannot_be_honoured_are_error_7_naming_the_key_before_anything_changes(extra):
    ns = netns("p1")
    msg = error(cni("ADD", dict(CONF, **extra), cid="p1", netns=ns), 7)["msg"]
    named = [k for k in extra if k not in ("mode", "bridge") and extra[k] is not None]
    assert any(k in msg for k in named) or "bridge" in msg, msg
    nothing_made("p1")


REFUSED_BY_ADD = [{"hairpinMode": True, "promiscMode": True}, {"vlan": 4095}, {"disableContainerInterface": True},
                  {"mode": "routed", "portIsolation": True}, {"vlan": 100, "bridge": "br-long-name"},
                  {"mode": "tunnel"}, {"mtu": 70000}]


@pytest.mark.parametrize("extra", REFUSED_BY_ADD)
def test_del_of_a_config_its_add_refused_succeeds_and_releases_what_it_can(extra):
    # a runtime retries a failing DEL (kubelet, containerd: until it succeeds), so DEL does not
    # judge what only ADD acts on
    ns = netns("p1")
    error(cni("ADD", dict(CONF, **extra), cid="p1", netns=ns), 7)
    ok(cni("DEL", dict(CONF, **extra), cid="p1", netns=ns))
    ok(cni("DEL", dict(CONF, **extra), cid="p1", netns=""))
    pod("p2", CONF)  # attached with a good config, then deleted with the refused one
    assert allocation_files(CONF["name"]) != {}
    ok(cni("DEL", dict(CONF, **extra), cid="p2"))
    assert allocation_files(CONF["name"]) == {} and "cnikit" not in nat_rules() and "eth0" not in links("p2")


@pytest.mark.parametrize("extra", [{"hairpinMode": "yes"}, {"vlan": "100"}, {"ipam": {"subnet": "10.244.0.0/33"}}])
def test_del_still_refuses_a_value_it_cannot_read(extra):
    error(cni("DEL", dict(CONF, **extra), cid="p1", netns=""), 7)


# ---------------------------------------------------------------- macspoofchk

def test_macspoofchk_drops_frames_with_another_source_mac_and_del_removes_its_table():
    c = dict(CONF, macspoofchk=True)
    res = pod("p1", c)
    mac = link("eth0", "p1")["address"]
    assert res["interfaces"][2]["mac"] == mac
    (family, table), = nft_tables()
    assert family == "bridge" and table.startswith("cnikit-")
    text = str(sh.nft("list", "table", "bridge", table))
    assert "cnikit name: fromScratch id: p1 if: eth0" in text and host_veth(res) in text and mac in text
    ping("p1", "10.244.0.1")
    sh.ip("-n", "p1", "neigh", "flush", "all")
    sh.ip("-n", "p1", "link", "set", "eth0", "address", "02:00:00:00:00:99")
    assert not kernel.ping("10.244.0.1", "p1")
    ok(cni("CHECK", dict(c, prevResult=dict(res, interfaces=res["interfaces"][:2])), cid="p1"))
    ok(cni("DEL", c, cid="p1"))
    assert nft_tables() == []
    ok(cni("DEL", c, cid="p1"))  # again: nothing to do, no error


def test_macspoofchk_honours_a_requested_mac():
    for i, (extra, kw) in enumerate([({"runtimeConfig": {"mac": "02:aa:00:00:00:01"}}, {}),
                                     ({"args": {"cni": {"mac": "02:aa:00:00:00:02"}}}, {}),
                                     ({}, {"args": "IgnoreUnknown=1;MAC=02:aa:00:00:00:03"})]):
        c = dict(CONF, macspoofchk=True, **extra)
        pod(f"p{i}", c, **kw)
        assert link("eth0", f"p{i}")["address"] == f"02:aa:00:00:00:0{i + 1}"
        ping(f"p{i}", "10.244.0.1")


def test_gc_removes_the_nft_tables_of_attachments_no_longer_valid():
    c = dict(CONF, macspoofchk=True, ipMasqBackend="nftables")
    pod("p1", c)
    pod("p2", c)
    assert len(nft_tables()) == 4
    ok(cni("GC", dict(c, **{"cni.dev/valid-attachments": [{"containerID": "p2", "ifname": "eth0"}]})))
    assert len(nft_tables()) == 2
    # a table whose record is gone (say a crash): found by its comment, even by a config without the keys
    os.unlink(next(os.path.join(d, f) for d, _, fs in os.walk("/var/lib/cni/networks/fromScratch/.cnikit/attachments")
                   for f in fs))
    gc_all(CONF)
    assert nft_tables() == [] and allocation_files("fromScratch") == {}


def test_an_nft_table_of_another_network_or_owner_is_left_alone_by_gc():
    sh.nft("add", "table", "inet", "cnikit-0000")
    sh.nft("add", "table", "inet", "mine", "{", "comment", '"cnikit name: fromScratch id: x if: eth0"', ";", "}")
    pod("p1", dict(CONF, name="other", ipMasqBackend="nftables"), args="IgnoreUnknown=1;CNIKIT_SUBNET=10.244.9.0/24")
    gc_all(CONF)
    assert ("inet", "cnikit-0000") in nft_tables() and ("inet", "mine") in nft_tables()
    assert len([t for t in nft_tables() if t[1].startswith("cnikit-")]) == 2  # the other network's pod keeps its table


# ---------------------------------------------------------------- ipMasqBackend

def test_ip_masq_backend_nftables_puts_masquerade_and_forward_accept_in_an_nft_table_not_iptables():
    c = dict(CONF, ipMasqBackend="nftables", nonMasqueradeCIDRs=["10.244.0.0/16"])
    res = pod("p1", c)
    assert "cnikit" not in nat_rules() and "cnikit" not in str(sh.iptables("-S"))
    (family, table), = nft_tables()
    assert family == "inet"
    rules = json.dumps(nft_rules("inet", table))
    assert '"masquerade"' in rules and "10.244.0.0" in rules and '"accept"' in rules
    chains = {o["chain"]["name"]: o["chain"] for o in nft_ruleset() if "chain" in o}
    assert chains["postrouting"]["hook"] == "postrouting" and chains["forward"]["hook"] == "forward"
    ok(cni("CHECK", dict(c, prevResult=res), cid="p1"))
    sh.nft("delete", "table", "inet", table)
    assert "nft table" in error(cni("CHECK", dict(c, prevResult=res), cid="p1"), 100)["msg"]
    ok(cni("DEL", c, cid="p1"))
    assert nft_tables() == []


def test_ip_masq_backend_nftables_masquerades_for_real():
    pod("p1", dict(CONF, ipMasqBackend="nftables"))
    internet()
    # no route back to 10.244.0.0/24 in inet: only a masqueraded ping can be answered
    assert kernel.ping("203.0.113.10", "p1")


def test_ip_masq_backend_iptables_is_the_default_and_makes_no_nft_table():
    pod("p1", dict(CONF, ipMasqBackend="iptables"))
    assert "cnikit" in nat_rules() and nft_tables() == []


# ---------------------------------------------------------------- enabledad, arp_notify, forceAddress

DUAL = dict(CONF, ipMasq=False, ipam={"ranges": [[{"subnet": "10.244.0.0/24"}], [{"subnet": "fd00:18::/64"}]]})


def test_ipv6_addresses_skip_dad_by_default_and_arp_notify_is_on_as_the_reference_sets_them():
    pod("p1", DUAL)
    (a,), = [v6_addr_info("p1")]
    assert a["local"] == "fd00:18::2" and not a.get("tentative") and not a.get("nodad")
    assert sysctl("p1", "/proc/sys/net/ipv6/conf/eth0/accept_dad") == "0"
    assert sysctl("p1", "/proc/sys/net/ipv4/conf/eth0/arp_notify") == "1"
    ping("p1", "10.244.0.1")


def test_enabledad_does_duplicate_address_detection_and_returns_once_it_is_over():
    pod("p1", dict(DUAL, enabledad=True))
    (a,), = [v6_addr_info("p1")]
    assert not a.get("nodad") and not a.get("tentative") and not a.get("dadfailed")
    assert sysctl("p1", "/proc/sys/net/ipv6/conf/eth0/accept_dad") == "1"
    assert sysctl("p1", "/proc/sys/net/ipv6/conf/eth0/enhanced_dad") == "1"


def test_force_address_replaces_another_ipv4_address_on_the_bridge():
    sh.ip("link", "add", "cni0", "type", "bridge")
    sh.ip("addr", "add", "192.0.2.1/24", "dev", "cni0")
    pod("p1", dict(CONF, forceAddress=True))
    assert kernel.addrs("cni0") == ["10.244.0.1/24"]


def test_force_address_replacing_an_address_of_the_same_subnet_keeps_the_gateway_pods_ping():
    # the old address is the subnet's primary: removed after the gateway, it would take the
    # gateway (a secondary) with it
    sh.ip("link", "add", "cni0", "type", "bridge")
    sh.ip("addr", "add", "10.244.0.99/24", "dev", "cni0")
    c = dict(CONF, forceAddress=True)
    pod("p1", c)
    assert kernel.addrs("cni0") == ["10.244.0.1/24"]
    pod("p2", c)
    ping("p1", "10.244.0.1")
    ping("p2", "10.244.0.1")
    assert kernel.addrs("cni0") == ["10.244.0.1/24"]


def test_without_force_address_another_network_keeps_its_gateway_on_the_shared_bridge():
    sh.ip("link", "add", "cni0", "type", "bridge")
    sh.ip("addr", "add", "192.0.2.1/24", "dev", "cni0")
    pod("p1", CONF)
    assert kernel.addrs("cni0") == ["10.244.0.1/24", "192.0.2.1/24"]


def test_everything_at_once_then_del_and_gc_leave_nothing():
    c = dict(DUAL, ipMasq=True, portIsolation=True, macspoofchk=True, ipMasqBackend="nftables",
             enabledad=True)
    res = pod("p1", c)
    ping("p1", "10.244.0.1")
    pod("p2", c)
    ok(cni("DEL", dict(c, prevResult=res), cid="p1"))
    gc_all(c)
    assert nft_tables() == [] and allocation_files("fromScratch") == {} and "cnikit" not in nat_rules()
    assert [name for name in links() if name.startswith("veth")] == []


def test_a_failure_mid_add_takes_its_nft_tables_back():
    c = dict(CONF, macspoofchk=True, ipMasqBackend="nftables",
             ipam={"routes": [{"dst": "192.0.2.0/24", "gw": "198.51.100.1"}]})  # a gateway the pod cannot reach
    ns = netns("p1")
    error(cni("ADD", c, cid="p1", netns=ns), 101)
    assert nft_tables() == [] and allocation_files("fromScratch") == {} and "eth0" not in links("p1")
