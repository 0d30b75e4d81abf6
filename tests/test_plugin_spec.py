"""The plugin against the CNI spec: every verb and version, result shapes, error codes,
runtime quirks, hostile input.  Each test runs in its own sandbox (conftest.py)."""
import json
import os

import pytest
import sh

import cnikit
from plugin_helpers import (CLASSIC, PLUGIN, VERSIONS, addrs, all_files, allocation_files, check_result_shape,
                            cni, error, links, nat_rules, netns, ok, pod, routes)  # noqa: F401


def conf(version="1.0.0", **kw):
    c = {"cniVersion": version, "name": "testnet", "type": "cni-bash-compatible"}
    c.update(kw)
    return c


# ---------------------------------------------------------------- VERSION

def test_version_as_podman_sends_it():
    res = ok(cni("VERSION", None, stdin=b'{"cniVersion":"1.0.0"}', netns="dummy", ifname="dummy", path="dummy"))
    assert res == {"cniVersion": "1.0.0", "supportedVersions": list(VERSIONS)}


@pytest.mark.parametrize("version", VERSIONS)
def test_version_echoes_each_supported_version(version):
    assert ok(cni("VERSION", {"cniVersion": version}))["cniVersion"] == version


def test_version_without_stdin_reports_latest():
    assert ok(cni("VERSION", None, stdin=b""))["cniVersion"] == "1.1.0"


# ---------------------------------------------------------------- every verb, every version

@pytest.mark.parametrize("version", VERSIONS)
def test_add_check_del_in_each_version(version):
    c = conf(version)
    res = pod("p1", c)
    check_result_shape(res, version)
    assert res["ips"][0]["address"] == "10.244.0.2/24" and res["ips"][0]["gateway"] == "10.244.0.1"
    assert addrs("eth0", "p1") == ["10.244.0.2/24"]
    prev = dict(c, prevResult=res)
    if version >= "0.4.0":
        assert ok(cni("CHECK", prev, cid="p1")) is None
    else:
        error(cni("CHECK", prev, cid="p1"), 1)
    assert ok(cni("DEL", prev, cid="p1")) is None
    assert "eth0" not in links("p1")
    assert allocation_files("testnet") == {}


def test_classic_minimal_config_gets_the_documented_defaults():
    res = pod("p1", CLASSIC)
    assert [i["name"] for i in res["interfaces"]][0] == "cni0"
    assert res["routes"] == [{"dst": "0.0.0.0/0", "gw": "10.244.0.1"}]
    assert addrs("cni0") == ["10.244.0.1/24"]
    assert any(r["dst"] == "default" and r["gateway"] == "10.244.0.1" for r in routes("p1"))
    assert "cnikit name: fromScratch id: p1 if: eth0" in nat_rules()  # ipMasq on by default
    assert open("/proc/sys/net/ipv4/ip_forward").read().strip() == "1"
    assert allocation_files("fromScratch") == {"10.244.0.2": "p1\r\neth0"}


def test_every_call_is_logged_to_the_default_log():
    pod("p1", CLASSIC)
    text = open(cnikit.CNI_LOG).read()
    assert "=== ADD" in text and "CNI_CONTAINERID=p1" in text and '"name":"fromScratch"' in text.replace(" ", "")
    assert "ip link add veth" in text and "iptables-restore" in text and "result:" in text


def test_log_path_from_config_and_env_and_unwritable_log_is_harmless():
    pod("p1", dict(CLASSIC, log="/run/cni/plugin.log"))
    assert "=== ADD" in open("/run/cni/plugin.log").read()
    netns("p2")
    ok(cni("ADD", CLASSIC, cid="p2", CNIKIT_LOG="/run/cni/env.log"))
    assert "CNI_CONTAINERID=p2" in open("/run/cni/env.log").read()
    netns("p3")
    ok(cni("ADD", CLASSIC, cid="p3", CNIKIT_LOG="/proc/no/such/dir/cni.log"))


def test_status_and_gc_in_1_1_0():
    c = conf("1.1.0")
    assert ok(cni("STATUS", c)) is None
    a, b = pod("a", c), pod("b", c)
    gc = dict(c, **{"cni.dev/valid-attachments": [{"containerID": "a", "ifname": "eth0"}]})
    assert ok(cni("GC", gc)) is None
    assert list(allocation_files("testnet").values()) == ["a\r\neth0"]
    rules = nat_rules()
    assert "id: a if: eth0" in rules and "id: b if: eth0" not in rules
    assert a["ips"][0]["address"] != b["ips"][0]["address"]


def test_gc_accepts_the_legacy_attachments_key():
    c = conf("1.1.0")
    pod("a", c)
    ok(cni("GC", dict(c, **{"cni.dev/attachments": []})))
    assert allocation_files("testnet") == {} and "cnikit" not in nat_rules()


def test_status_reports_50_when_no_address_is_left():
    c = conf("1.1.0", ipam={"subnet": "10.9.0.0/30"})  # .1 is the gateway, .2 the only address
    pod("p1", c)
    assert "no IP addresses left" in error(cni("STATUS", c), 50)["msg"]
    netns("p2")
    assert "no IP addresses left" in error(cni("ADD", c, cid="p2"), 11)["msg"]
    assert "eth0" not in links("p2")


def test_status_reports_50_when_the_ipam_plugin_is_missing():
    error(cni("STATUS", conf("1.1.0", ipam={"type": "no-such-ipam"})), 50)


@pytest.mark.parametrize("verb,version", [("STATUS", "1.0.0"), ("GC", "0.4.0"), ("CHECK", "0.3.1")])
def test_verbs_newer_than_the_config_version_are_refused(verb, version):
    netns("c1")
    error(cni(verb, conf(version, prevResult={})), 1)


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("env,code", [
    ({"CNI_COMMAND": None}, 4),
    ({"CNI_COMMAND": "FROB"}, 4),
    ({"CNI_CONTAINERID": None}, 4),
    ({"CNI_NETNS": None}, 4),
    ({"CNI_IFNAME": None}, 4),
    ({"CNI_PATH": None}, 4),
    ({"CNI_ARGS": "FOO=bar"}, 2),  # unknown key without IgnoreUnknown
    ({"CNI_ARGS": "garbage"}, 4),
])
def test_bad_environment(env, code):
    netns("p1")
    import plugin_helpers
    base = plugin_helpers.env_for("ADD", cid="p1")
    base.update(env)
    base = {k: v for k, v in base.items() if v is not None}
    import subprocess
    proc = subprocess.run([PLUGIN], input=json.dumps(conf()).encode(), env=base, capture_output=True)
    error(plugin_helpers.Result(proc), code)
    assert "eth0" not in links("p1")


@pytest.mark.parametrize("stdin,code", [
    (b"{not json", 6),
    (b"[1, 2]", 6),
    (b"\xff\xfe", 6),
    (json.dumps({"cniVersion": "0.2.0", "name": "n"}).encode(), 1),
    (json.dumps({"cniVersion": "9.9.9", "name": "n"}).encode(), 1),
    (json.dumps({"name": "n"}).encode(), 1),
    (json.dumps({"cniVersion": "1.0.0"}).encode(), 7),  # no name
    (json.dumps({"cniVersion": "1.0.0", "name": "n", "mtu": "big"}).encode(), 7),
    (json.dumps({"cniVersion": "1.0.0", "name": "n", "ipMasq": "yes"}).encode(), 7),
    (json.dumps({"cniVersion": "1.0.0", "name": "n", "ipam": {"subnet": "10.0.0.0/33"}}).encode(), 7),
    (json.dumps({"cniVersion": "1.0.0", "name": "n", "ipam": {"subnet": "10.0.0.0/24",
                                                              "rangeStart": "10.1.0.5"}}).encode(), 7),
    (json.dumps({"cniVersion": "1.0.0", "name": "n", "bridge": "a/b"}).encode(), 7),
    (json.dumps({"cniVersion": "1.0.0", "name": "n", "ipam": {"type": "not-in-cni-path"}}).encode(), 7),
])
def test_bad_config(stdin, code):
    netns("p1")
    error(cni("ADD", None, stdin=stdin, cid="p1"), code)
    assert "eth0" not in links("p1")
    assert all_files("/var/lib/cni") == [] or all(f.endswith("lock") for f in all_files("/var/lib/cni"))


def test_error_is_printed_in_the_config_version():
    netns("p1")
    assert error(cni("ADD", conf("0.4.0", mtu=-1), cid="p1"), 7)["cniVersion"] == "0.4.0"


def test_add_fails_cleanly_when_the_interface_exists():
    ns = netns("p1")
    sh.ip("-n", "p1", "link", "add", "eth0", "type", "bridge")
    assert "already exists" in error(cni("ADD", CLASSIC, cid="p1", netns=ns), 103)["msg"]
    assert allocation_files("fromScratch") == {}
    assert links("p1")["eth0"]["linkinfo"]["info_kind"] == "bridge"  # untouched


def test_check_notices_what_is_missing():
    c = conf("1.0.0")
    res = pod("p1", c)
    prev = dict(c, prevResult=res)
    sh.ip("-n", "p1", "route", "del", "default")
    assert "route 0.0.0.0/0" in error(cni("CHECK", prev, cid="p1"), 100)["msg"]
    sh.ip("-n", "p1", "addr", "flush", "dev", "eth0")
    assert "lacks address" in error(cni("CHECK", prev, cid="p1"), 100)["msg"]
    sh.ip("-n", "p1", "link", "del", "eth0")
    assert "missing" in error(cni("CHECK", prev, cid="p1"), 100)["msg"]


def test_check_needs_prev_result():
    pod("p1", conf())
    error(cni("CHECK", conf(), cid="p1"), 7)


# ---------------------------------------------------------------- runtime quirks

def test_containerd_style_args_and_capitalised_runtime_config():
    args = "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u1;IgnoreUnknown=1"
    cid = "f" * 64
    c = conf(runtimeConfig={"IPS": ["10.244.0.77/24"], "DNS": {"Servers": ["10.96.0.10"], "Searches": ["svc"]}})
    ns = netns("p1")
    res = ok(cni("ADD", c, cid=cid, netns=ns, args=args))
    assert res["ips"][0]["address"] == "10.244.0.77/24"
    assert res["dns"] == {"nameservers": ["10.96.0.10"], "search": ["svc"]}
    # DEL twice: at pod stop with netns and prevResult, at removal with neither
    ok(cni("DEL", dict(c, prevResult=res), cid=cid, netns=ns, args=args))
    ok(cni("DEL", c, cid=cid, netns="", args=args))
    assert allocation_files("testnet") == {}


def test_specific_address_from_cni_args_and_dns_passthrough():
    c = conf(dns={"nameservers": ["192.0.2.53"], "search": ["example.org"]})
    ns = netns("p1")
    res = ok(cni("ADD", c, cid="p1", netns=ns, args="IgnoreUnknown=1;IP=10.244.0.50"))
    assert res["ips"][0]["address"] == "10.244.0.50/24"
    assert res["dns"] == {"nameservers": ["192.0.2.53"], "search": ["example.org"]}
    netns("p2")
    assert "already allocated" in error(cni("ADD", c, cid="p2", args="IgnoreUnknown=1;IP=10.244.0.50"), 11)["msg"]
    assert "gateway" in error(cni("ADD", c, cid="p2", args="IgnoreUnknown=1;IP=10.244.0.1"), 7)["msg"]
    assert "eth0" not in links("p2")


def test_requested_mac_from_runtime_config():
    res = pod("p1", conf(runtimeConfig={"mac": "02:00:00:aa:bb:cc"}))
    assert res["interfaces"][2]["mac"] == "02:00:00:aa:bb:cc" == links("p1")["eth0"]["address"]


# ---------------------------------------------------------------- hostile input

HOSTILE = [
    ({"cid": "../../../tmp/pwned"}, None, 4),
    ({"cid": "-rf"}, None, 4),
    ({"cid": "a;touch /tmp/pwned"}, None, 4),
    ({"cid": "a b"}, None, 4),
    ({"ifname": "../../x"}, None, 4),
    ({"ifname": "e" * 16}, None, 4),
    ({"ifname": "."}, None, 4),
    ({"ifname": ".."}, None, 4),
    ({"ifname": "eth 0"}, None, 4),
    ({"ifname": "eth:0"}, None, 4),
    ({"ifname": "eth\n0"}, None, 4),
    ({"netns": "/etc/passwd"}, None, 4),
    ({"netns": "/proc/self/ns/../../../etc/passwd"}, None, 4),
    ({"netns": "relative/ns"}, None, 4),
    ({"netns": "/nonexistent/ns"}, None, 4),
    ({"args": "IgnoreUnknown=1;IP=../../tmp/pwned"}, None, 4),
    ({}, {"name": "../../../../tmp/pwned"}, 7),
    ({}, {"name": "a/b"}, 7),
    ({}, {"name": ".."}, 7),
    ({}, {"name": "x" * 300}, 7),
    ({}, {"ipam": {"type": "../../bin/sh"}}, 7),
    ({}, {"ipam": {"dataDir": "relative/dir"}}, 7),
]


@pytest.mark.parametrize("env,patch,code", HOSTILE)
def test_hostile_input_is_an_error_and_touches_nothing(env, patch, code):
    netns("victim")
    env_given = env
    env = dict({"cid": "victim", "netns": "/run/netns/victim"}, **env)
    c = dict(CLASSIC, **(patch or {}))
    before_links = set(links())
    for verb in ("ADD", "DEL", "CHECK"):
        res = cni(verb, dict(c, cniVersion="1.0.0", prevResult={}) if verb == "CHECK" else c, **env)
        if verb == "DEL" and "netns" in env_given and env["netns"].startswith("/"):
            ok(res)  # a pod whose namespace is gone (or not a namespace): DEL never enters it, must succeed
        else:
            error(res, code)
    assert not os.path.exists("/tmp/pwned")
    # at most the lock file of the (valid) network, taken by the DEL of a vanished pod
    assert all_files(os.path.dirname(cnikit.CNI_DATA_DIR)) in ([], [os.path.join(cnikit.CNI_DATA_DIR, "fromScratch", "lock")])
    assert set(links()) == before_links and "eth0" not in links("victim")
    assert "cnikit" not in nat_rules()


def test_oversized_stdin_is_refused():
    netns("p1")
    big = json.dumps(dict(CLASSIC, pad="x" * (2 << 20))).encode()
    assert "larger than" in error(cni("ADD", None, stdin=big, cid="p1"), 6)["msg"]
    assert "eth0" not in links("p1")


# ---------------------------------------------------------------- review: defects found and fixed

def test_requested_ip_outside_every_range_leaves_no_allocation():
    netns("p1")
    c = conf(ipMasq=False)
    assert "none of the ranges" in error(cni("ADD", c, cid="p1", args="IgnoreUnknown=1;IP=10.99.0.5"), 7)["msg"]
    assert allocation_files("testnet") == {}
    # a range set that fulfils nothing asked for must not keep what it took either
    c = conf(ipMasq=False, ipam={"ranges": [[{"subnet": "10.5.0.0/24"}], [{"subnet": "fd00:5::/64"}]]})
    error(cni("ADD", c, cid="p1", args="IgnoreUnknown=1;IP=10.6.0.9"), 7)
    assert allocation_files("testnet") == {} and "eth0" not in links("p1")


def test_requested_ip_moves_the_round_robin_cursor_like_host_local():
    c = conf(ipMasq=False)
    ns = netns("p1")
    ok(cni("ADD", c, cid="p1", netns=ns, args="IgnoreUnknown=1;IP=10.244.0.50"))
    assert pod("p2", c)["ips"][0]["address"] == "10.244.0.51/24"


def test_top_level_subnet_is_prepended_to_ranges_like_host_local():
    c = conf(ipMasq=False, ipam={"subnet": "10.6.0.0/24", "ranges": [[{"subnet": "fd00:6::/64"}]]})
    res = pod("p1", c)
    assert [ip["address"] for ip in res["ips"]] == ["10.6.0.2/24", "fd00:6::2/64"]


@pytest.mark.parametrize("kind", ["fifo", "chardev"])
def test_netns_that_is_a_fifo_or_device_is_refused_without_blocking(kind):
    path = "/run/cni/ns-" + kind
    if kind == "fifo":
        os.mkfifo(path)
    else:
        os.symlink("/dev/null", path)
    for verb in ("ADD", "CHECK"):
        c = conf(prevResult={}) if verb == "CHECK" else conf()
        error(cni(verb, c, cid="p1", netns=path), 4)  # cni() times out (60 s) if the open blocks
    ok(cni("DEL", conf(), cid="p1", netns=path))      # DEL never enters it: it cleans up and succeeds


def test_log_path_with_a_nul_or_a_fifo_never_breaks_the_plugin():
    netns("p1")
    res = cni("ADD", conf(ipMasq=False, log="/run/cni/a\u0000b"), cid="p1")
    ok(res)
    os.mkfifo("/run/cni/log.fifo")
    netns("p2")
    ok(cni("ADD", conf(ipMasq=False, log="/run/cni/log.fifo"), cid="p2"))


def test_long_container_id_gets_masquerade_and_gc_still_tells_attachments_apart():
    c = conf("1.1.0")
    long_a, long_b = "a" * 1000, "a" * 999 + "b"  # the same first 255 comment characters
    for cid in (long_a, long_b):
        ns = netns(cid[-1])
        ok(cni("ADD", c, cid=cid, netns=ns))
    assert nat_rules().count("-j " + cnikit.CHAIN_PREFIX) == 2
    gc = dict(c, **{"cni.dev/valid-attachments": [{"containerID": long_a, "ifname": "eth0"}]})
    ok(cni("GC", gc))
    assert nat_rules().count("-j " + cnikit.CHAIN_PREFIX) == 1
    assert list(allocation_files("testnet").values()) == [long_a + "\r\neth0"]
    ok(cni("DEL", c, cid=long_a, netns=""))
    assert cnikit.CHAIN_PREFIX not in nat_rules() and allocation_files("testnet") == {}


@pytest.mark.parametrize("attachments", [[1], ["a"], [{"containerID": ["x"], "ifname": "eth0"}],
                                         [{"containerID": "a"}]])
def test_gc_with_a_malformed_attachment_list_is_a_config_error_and_releases_nothing(attachments):
    c = conf("1.1.0")
    pod("a", c)
    error(cni("GC", dict(c, **{"cni.dev/valid-attachments": attachments})), 7)
    assert list(allocation_files("testnet").values()) == ["a\r\neth0"] and "id: a if: eth0" in nat_rules()


def test_status_is_50_when_the_data_dir_is_unusable():
    assert "cannot lock" in error(cni("STATUS", conf("1.1.0", ipMasq=False, ipam={"dataDir": "/proc/nope"})), 50)["msg"]


def test_data_dir_with_a_nul_is_a_config_error():
    for verb in ("ADD", "DEL"):
        netns("p1") if verb == "ADD" else None
        error(cni(verb, conf(ipMasq=False, ipam={"dataDir": "/run/cni/a\u0000b"}), cid="p1"), 7)


def test_ifname_longer_than_15_bytes_is_refused_before_anything_is_allocated():
    netns("p1")
    error(cni("ADD", conf(ipMasq=False), cid="p1", ifname="\u00e9" * 9), 4)
    assert allocation_files("testnet") == {}


def test_an_environment_error_is_printed_in_the_config_version():
    netns("p1")
    assert error(cni("ADD", conf("0.3.1"), cid="p1", ifname="."), 4)["cniVersion"] == "0.3.1"


@pytest.mark.parametrize("prev", [{"interfaces": ["x"]}, {"interfaces": [{"name": "eth0", "sandbox": "/x", "mac": 5}]},
                                  {"interfaces": {"a": 1}}, {"routes": "x"}])
def test_check_with_a_malformed_prev_result_is_a_config_error(prev):
    c = conf(ipMasq=False)
    pod("p1", c)
    error(cni("CHECK", dict(c, prevResult=prev), cid="p1"), 7)


def fake_plugin(name, body):
    os.makedirs("/run/cni/bin", exist_ok=True)
    path = f"/run/cni/bin/{name}"
    with open(path, "w") as f:
        f.write("#!/bin/sh\necho \"$CNI_COMMAND\" >> /run/cni/calls\n" + body)
    os.chmod(path, 0o755)


@pytest.mark.parametrize("output", ["garbage", "[1]", '{"ips": [{"address": "nope"}]}'])
def test_an_ipam_plugin_answering_nonsense_is_released_and_reported(output):
    fake_plugin("junk", f"echo '{output}'\n")
    netns("p1")
    res = error(cni("ADD", conf(ipMasq=False, ipam={"type": "junk"}), cid="p1", path="/run/cni/bin"), 102)
    assert "junk" in res["msg"]
    assert open("/run/cni/calls").read().split() == ["ADD", "DEL"]
    assert "eth0" not in links("p1")


def test_del_of_an_unknown_attachment_survives_a_failing_ip6tables_save():
    os.makedirs("/run/cni/fakebin")
    with open("/run/cni/fakebin/ip6tables-save", "w") as f:
        f.write("#!/bin/sh\necho 'ip6tables-save: no nat table' >&2\nexit 1\n")
    os.chmod("/run/cni/fakebin/ip6tables-save", 0o755)
    ok(cni("DEL", CLASSIC, cid="never-added", netns="", PATH="/run/cni/fakebin:/usr/sbin:/usr/bin:/sbin:/bin"))
