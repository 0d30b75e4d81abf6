"""The plugin's pure parts, without a kernel: reading its config (every refusal is error 7,
before anything changes), the IPAM arithmetic of host-local's ranges, the names an attachment
gets, and the result it builds. No root, no sandbox (the `make check` tier); what these feed
into the kernel is tested, as root, by test_plugin_*.py."""
import json
import os

import pytest

import cnikit
from kernel import load_file

pytestmark = pytest.mark.noroot

PLUGIN = os.path.join(os.path.dirname(cnikit.CNI_PLUGIN_SRC), "cni-bash-compatible.py")
P = load_file(PLUGIN, "cni_bash_compatible_pure")
V4, V6 = P.AF_INET, P.AF_INET6


def net(args="", **conf):
    """A Net from CONF (a subnet given, so nothing is read from this host's node file)."""
    conf = dict({"cniVersion": "1.0.0", "name": "pure", "type": "cnikit", "ipam": {"subnet": "10.22.0.0/24"}}, **conf)
    return P.Net(conf, P.parse_cni_args(args))


def refused(code=P.E_CONFIG, args="", **conf):
    """The message of the CNIError reading CONF raises (its code must be CODE)."""
    with pytest.raises(P.CNIError) as err:
        net(args, **conf)
    assert err.value.code == code, err.value.msg
    return err.value.msg


def n4(text):
    return P.parse_ip(text)[1]


# ---------------------------------------------------------------- config

def test_a_config_without_options_gets_the_documented_defaults():
    n = net()
    assert (n.mode, n.bridge, n.is_gw, n.default_gw, n.masq, n.forward) == ("bridge", "cni0", True, True, True, True)
    assert (n.hairpin, n.promisc, n.isolated, n.vlan, n.trunk, n.mtu) == (False, False, False, 0, None, 0)
    assert (n.masq_backend, n.nft, n.data_dir, n.routes) == ("iptables", False, P.DEFAULT_DATA_DIR, [])


@pytest.mark.parametrize("key,value,says", [
    ("ipMasq", "yes", "ipMasq must be true or false, not \"yes\""),
    ("mtu", True, "mtu must be an integer, not true"),
    ("mtu", "1400", "mtu must be an integer"),
    ("bridge", 7, "bridge must be a string, not 7"),
    ("vlanTrunk", {"id": 3}, "vlanTrunk must be a list"),
    ("nonMasqueradeCIDRs", ["10.0.0.0"], "nonMasqueradeCIDRs: not a CIDR"),
    ("ipMasqBackend", "pf", "invalid ipMasqBackend 'pf'"),
    ("mode", "macvlan", "invalid mode 'macvlan'"),
    ("bridge", "a/b", "invalid bridge name"),
    ("vlan", 4095, "invalid vlan 4095"),
    ("mtu", 70000, "invalid mtu"),
    ("disableContainerInterface", True, "disableContainerInterface is not supported"),
    ("name", "-x", "invalid network name"),
])
def test_a_wrong_value_is_error_7_naming_its_key(key, value, says):
    assert says in refused(**{key: value})


def test_combinations_the_reference_refuses_are_refused():
    assert "cannot both be true" in refused(hairpinMode=True, promiscMode=True)
    assert "longer than 15 characters" in refused(bridge="bridge-0123456", vlan=100)
    for key, value in (("vlan", 5), ("promiscMode", True), ("vlanTrunk", []), ("macspoofchk", True)):
        assert "not supported in routed mode" in refused(mode="routed", **{key: value}), key
    assert "minID and maxID go together" in refused(vlanTrunk=[{"minID": 3}])
    assert "greater than maxID" in refused(vlanTrunk=[{"minID": 9, "maxID": 3}])
    assert "between 1 and 4094" in refused(vlanTrunk=[{"id": 0}])


def test_ipam_keys_are_checked_before_anything_changes():
    assert "ipam.dataDir must be an absolute path" in refused(ipam={"subnet": "10.22.0.0/24", "dataDir": "var/x"})
    assert "ipam.routes[0] must be an object" in refused(ipam={"subnet": "10.22.0.0/24", "routes": ["0.0.0.0/0"]})
    assert "ipam.routes[0].gw must be a string" in refused(ipam={"subnet": "10.22.0.0/24",
                                                                 "routes": [{"dst": "0.0.0.0/0", "gw": 1}]})
    assert "ipam.ranges[0] must be a non-empty list" in refused(ipam={"ranges": [[]]})
    assert "is this plugin itself" in refused(ipam={"type": "cnikit-self"}, type="cnikit-self")


def test_teardown_judges_only_what_finds_what_to_remove():
    # DEL and GC read a config ADD would refuse (a bad mode), but never a wrong type
    conf = {"cniVersion": "1.0.0", "name": "pure", "mode": "macvlan", "ipam": {"subnet": "10.22.0.0/24"}}
    assert P.Net(conf, {}, teardown=True).mode == "macvlan"
    with pytest.raises(P.CNIError):
        P.Net(dict(conf, ipMasq="no"), {}, teardown=True)


def test_cni_args():
    assert P.parse_cni_args("IgnoreUnknown=1;K8S_POD_NAME=web;Other=x") == \
        {"IGNOREUNKNOWN": "1", "K8S_POD_NAME": "web", "OTHER": "x"}
    assert P.parse_cni_args("") == {}
    for text, code, says in (("novalue", P.E_ENV, "is not KEY=VALUE"), ("=x", P.E_ENV, "is not KEY=VALUE"),
                             ("Other=x", P.E_FIELD, "unknown key(s) Other"),
                             ("IP=10.0.0.300", P.E_ENV, "is not an address")):
        with pytest.raises(P.CNIError) as err:
            P.parse_cni_args(text)
        assert err.value.code == code and says in err.value.msg, text


def test_interface_names_as_the_kernel_takes_them():
    for good in ("eth0", "x" * 15, "a.b-c_d"):
        assert P.valid_ifname(good), good
    for bad in ("", "x" * 16, ".", "..", "a/b", "a:b", "a b", "a\tb", "é" * 8):
        assert not P.valid_ifname(bad), bad


# ---------------------------------------------------------------- IPAM arithmetic

def test_cidrs_parse_to_integers_and_back():
    assert P.parse_cidr("10.22.0.5/24") == (V4, 0x0A160005, 24)
    assert P.network_of(V4, 0x0A160005, 24) == 0x0A160000 and P.network_of(V4, 0x0A160005, 0) == 0
    assert P.fmt_cidr(V4, 0x0A160005, 24) == "10.22.0.5/24"
    family, n, plen = P.parse_cidr("2001:db8::5/64")
    assert (family, plen) == (V6, 64) and P.fmt_cidr(V6, P.network_of(V6, n, plen), plen) == "2001:db8::/64"
    assert P.in_subnet(V4, n4("10.22.0.200"), (V4, n4("10.22.0.0"), 24))
    assert not P.in_subnet(V4, n4("10.22.1.1"), (V4, n4("10.22.0.0"), 24))
    assert not P.in_subnet(V6, n, (V4, n4("10.22.0.0"), 24))
    for bad in ("10.22.0.5", "10.22.0.5/33", "10.22.0.5/２４", "10.22.0/24", "x/8", "2001:db8::/129", 24):
        with pytest.raises(ValueError):
            P.parse_cidr(bad)


def test_a_range_defaults_to_the_whole_subnet_less_network_gateway_and_broadcast():
    r = P.parse_range({"subnet": "10.22.0.0/24"})
    assert r == {"family": V4, "subnet": (V4, n4("10.22.0.0"), 24), "start": n4("10.22.0.1"),
                 "end": n4("10.22.0.254"), "gw": n4("10.22.0.1")}
    # IPv6 has no broadcast: the last address is handed out
    r6 = P.parse_range({"subnet": "2001:db8::/120"})
    assert P.fmt_ip(V6, r6["end"]) == "2001:db8::ff" and P.fmt_ip(V6, r6["gw"]) == "2001:db8::1"
    r = P.parse_range({"subnet": "10.22.0.7/24", "rangeStart": "10.22.0.10", "rangeEnd": "10.22.0.20",
                       "gateway": "10.22.0.254"})
    assert (r["subnet"], r["start"], r["end"], r["gw"]) == ((V4, n4("10.22.0.0"), 24), n4("10.22.0.10"),
                                                            n4("10.22.0.20"), n4("10.22.0.254"))


@pytest.mark.parametrize("rng,says", [
    ({"subnet": "10.22.0.0/31"}, "too small"),
    ({"subnet": "127.0.0.0/24"}, "loopback"),
    ({"subnet": "0.0.0.0/0"}, "this network"),
    ({"subnet": "224.1.0.0/16"}, "multicast"),
    ({"subnet": "ff02::/64"}, "multicast"),
    ({"subnet": "10.22.0.0/24", "gateway": "10.22.1.1"}, "gateway 10.22.1.1 is outside 10.22.0.0/24"),
    ({"subnet": "10.22.0.0/24", "rangeStart": "10.22.0.20", "rangeEnd": "10.22.0.10"}, "is not inside"),
    ({"subnet": "10.22.0.0/24", "rangeEnd": "10.22.0.255"}, "is not inside"),
    ({"subnet": "10.22.0.0"}, "not a CIDR"),
    ({"subnet": 10}, "subnet must be a string"),
    (["10.22.0.0/24"], "must be an object"),
])
def test_a_range_that_cannot_hand_out_addresses_is_refused(rng, says):
    with pytest.raises(P.CNIError) as err:
        P.parse_range(rng)
    assert err.value.code == P.E_CONFIG and says in err.value.msg, err.value.msg


def test_candidates_go_round_robin_after_the_last_reserved_and_skip_the_gateway():
    rset = [P.parse_range({"subnet": "10.22.0.0/29"})]          # .1 gateway, .2-.6 usable
    def order(rset, after):          # every address offered, in order (each must come once)
        return [P.fmt_ip(V4, n) for _, n in P.candidates(rset, after)]
    one = [f"10.22.0.{i}" for i in (2, 3, 4, 5, 6)]
    assert order(rset, None) == one
    assert order(rset, (V4, n4("10.22.0.4"))) == one[3:] + one[:3]
    assert order(rset, (V4, n4("10.22.0.6"))) == one       # the range's last address: round to its start
    # three ranges in one set, the last reserved in the middle one: the rest of it, the later
    # range, round to the first, and the middle one's start last
    three = [P.parse_range({"subnet": s}) for s in ("10.22.0.0/29", "10.23.0.0/30", "10.24.0.0/30")]
    assert order(three, (V4, n4("10.23.0.2"))) == ["10.24.0.2"] + one + ["10.23.0.2"]
    assert order(three, (V4, n4("10.22.0.6"))) == ["10.23.0.2", "10.24.0.2"] + one
    assert order(three, (V4, n4("10.22.0.3"))) == one[2:] + ["10.23.0.2", "10.24.0.2"] + one[:2]


def test_the_range_sets_of_a_config():
    # ranges after a top-level subnet, as host-local reads them; one address from each set
    sets = net(ipam={"subnet": "10.22.0.0/24", "ranges": [[{"subnet": "2001:db8::/64"}]]}).range_sets()
    assert [[P.fmt_cidr(*r["subnet"]) for r in s] for s in sets] == [["10.22.0.0/24"], ["2001:db8::/64"]]
    # CNI_ARGS CNIKIT_SUBNET when the config names none
    conf = {"cniVersion": "1.0.0", "name": "pure", "ipam": {}}
    sets = P.Net(conf, P.parse_cni_args("CNIKIT_SUBNET=10.30.0.0/24")).range_sets()
    assert P.fmt_cidr(*sets[0][0]["subnet"]) == "10.30.0.0/24"


def test_requested_addresses():
    n = net("IgnoreUnknown=1;IP=10.22.0.9/24,2001:db8::9", runtimeConfig={"ips": ["10.22.0.10"]})
    assert P.requested_ips(n) == [(V4, n4("10.22.0.9")), P.parse_ip("2001:db8::9"), (V4, n4("10.22.0.10"))]
    with pytest.raises(P.CNIError):
        P.requested_ips(net(runtimeConfig={"ips": ["nope"]}))


# ---------------------------------------------------------------- an attachment's names

def test_an_attachments_names_fit_the_kernels_limits_and_differ_per_attachment():
    veth = P.host_veth_name("c" * 64, "eth0")
    assert len(veth) == 15 and veth.startswith("veth") and P.valid_ifname(veth)
    assert veth != P.host_veth_name("c" * 64, "eth1") and veth == P.host_veth_name("c" * 64, "eth0")
    chain = P.chain_name("n" * 200, "c" * 64, "eth0")
    assert chain.startswith(P.CHAIN_PREFIX) and len(chain) <= 28      # iptables' chain name limit
    assert chain != P.chain_name("other", "c" * 64, "eth0")
    assert len(P.rule_comment("n" * 200, "c" * 300, "eth0")) == 255   # xt_comment's limit


# ---------------------------------------------------------------- the result

def ips_of(*cidrs, gw=None):
    out = []
    for cidr in cidrs:
        family, n, plen = P.parse_cidr(cidr)
        out.append({"family": family, "n": n, "plen": plen, "subnet": (family, P.network_of(family, n, plen), plen),
                    "gw": P.parse_ip(gw[family])[1]})
    return out


GWS = {V4: "10.22.0.1", V6: "2001:db8::1"}
BR = {"name": "cni0", "mac": "02:00:00:00:00:01", "mtu": 1500}
VETH = {"name": "veth0123456789a", "mac": "02:00:00:00:00:02", "mtu": 1500}
POD = {"name": "eth0", "mac": "02:00:00:00:00:03", "mtu": 1500}


def test_the_result_of_a_dual_stack_add():
    n = net(ipam={"subnet": "10.22.0.0/24", "routes": [{"dst": "192.0.2.0/24", "gw": "10.22.0.254"}]})
    ips = ips_of("10.22.0.5/24", "2001:db8::5/64", gw=GWS)
    routes = P.container_routes(n, ips, n.routes)
    res = P.build_result(n, BR, VETH, POD, "/run/netns/p1", ips, routes, {})
    assert res == {
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "cni0", "mac": "02:00:00:00:00:01"},
                       {"name": "veth0123456789a", "mac": "02:00:00:00:00:02"},
                       {"name": "eth0", "mac": "02:00:00:00:00:03", "sandbox": "/run/netns/p1"}],
        "ips": [{"address": "10.22.0.5/24", "gateway": "10.22.0.1", "interface": 2},
                {"address": "2001:db8::5/64", "gateway": "2001:db8::1", "interface": 2}],
        "routes": [{"dst": "192.0.2.0/24", "gw": "10.22.0.254"}, {"dst": "0.0.0.0/0", "gw": "10.22.0.1"},
                   {"dst": "::/0", "gw": "2001:db8::1"}],
        "dns": {}}
    json.dumps(res)      # what the plugin prints: plain JSON types only


def test_the_result_follows_the_cni_version_asked_for():
    ips = ips_of("10.22.0.5/24", gw=GWS)
    old = net(cniVersion="0.4.0", isDefaultGateway=False)
    res = P.build_result(old, None, VETH, POD, "/run/netns/p1", ips, [], {})
    assert res["ips"] == [{"address": "10.22.0.5/24", "gateway": "10.22.0.1", "interface": 1, "version": "4"}]
    assert "routes" not in res and [i["name"] for i in res["interfaces"]] == ["veth0123456789a", "eth0"]
    new = net(cniVersion="1.1.0")
    res = P.build_result(new, BR, VETH, POD, "/run/netns/p1", ips, [], {})
    assert [i["mtu"] for i in res["interfaces"]] == [1500, 1500, 1500] and "version" not in res["ips"][0]


def test_routes_the_pod_gets():
    ips = ips_of("10.22.0.5/24", gw=GWS)
    # an IPAM route without gw goes via the family's gateway but says none; the default route is added
    n = net(ipam={"subnet": "10.22.0.0/24", "routes": [{"dst": "198.51.100.7/24"}]})
    assert P.container_routes(n, ips, n.routes) == [(V4, n4("198.51.100.0"), 24, n4("10.22.0.1"), False),
                                                   (V4, 0, 0, n4("10.22.0.1"), True)]
    # an IPAM default route replaces the added one; isDefaultGateway false adds none
    n = net(ipam={"subnet": "10.22.0.0/24", "routes": [{"dst": "0.0.0.0/0", "gw": "10.22.0.9"}]})
    assert P.container_routes(n, ips, n.routes) == [(V4, 0, 0, n4("10.22.0.9"), True)]
    assert P.container_routes(net(isDefaultGateway=False), ips, []) == []
    # routed mode: a link route to the gateway first (the pod holds a /32 on no subnet of it)
    assert P.routed_container_routes(net(mode="routed"), P.routed_ips(ips), [])[0] == \
        (V4, n4("10.22.0.1"), 32, None, False)
    assert P.routed_ips(ips)[0]["plen"] == 32
    with pytest.raises(P.CNIError):
        P.container_routes(n, ips, [{"dst": "nowhere"}])


def test_dns_merges_ipam_then_config_then_the_runtime():
    n = net(dns={"nameservers": ["192.0.2.53"], "search": ["conf.example"]},
            runtimeConfig={"dns": {"servers": ["198.51.100.53"], "options": ["ndots:5"]}})
    assert P.result_dns(n, {"nameservers": ["203.0.113.53"], "domain": "ipam.example"}) == \
        {"nameservers": ["198.51.100.53"], "domain": "ipam.example", "search": ["conf.example"],
         "options": ["ndots:5"]}
    assert P.result_dns(net(), {}) == {}


def test_the_pods_mac_as_the_reference_reads_it():
    assert P.requested_mac(net()) is None
    assert P.requested_mac(net("IgnoreUnknown=1;MAC=02:00:00:00:00:09")) == bytes.fromhex("020000000009")
    assert P.requested_mac(net("IgnoreUnknown=1;MAC=02:00:00:00:00:09",
                               runtimeConfig={"mac": "02:00:00:00:00:0a"})) == bytes.fromhex("02000000000a")
    with pytest.raises(P.CNIError):
        P.requested_mac(net(runtimeConfig={"mac": "02:00:00"}))
