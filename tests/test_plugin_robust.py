"""The plugin under bad input and half-done state (issue #14): a duplicate ADD never frees a live
pod's address, wrong-typed config values are refused by name, no NaN, no Unicode digits, no
reserved subnets, a failed ADD takes back its gateway address, stale temporary files are swept,
and the ownership record lets DEL work without scanning.  Real namespaces, links and rules."""
import json
import os

import pytest
import sh

import cnikit
from plugin_helpers import (CLASSIC, addrs, allocation_files, cni, error, links, nat_rules, netns, ok, ping,
                            pod)

DATA = os.path.join(cnikit.CNI_DATA_DIR, "fromScratch")
RECORDS = os.path.join(DATA, ".cnikit", "attachments")
LOG = "/run/cni/plugin.log"


def logged(**kw):
    """A call's own log lines (CNIKIT_LOG set to a fresh file)."""
    if os.path.exists(LOG):
        os.unlink(LOG)
    return dict(kw, CNIKIT_LOG=LOG)


def log_text():
    with open(LOG) as f:
        return f.read()


def filter_rules():
    return str(sh.iptables("-S"))


def records():
    out = {}
    for name in sorted(os.listdir(RECORDS)) if os.path.isdir(RECORDS) else []:
        with open(os.path.join(RECORDS, name)) as f:
            out[name] = json.load(f)
    return out


# ---------------------------------------------------------------- duplicate ADD

def test_a_duplicate_add_is_refused_and_the_live_pod_keeps_its_address():
    first = pod("c1", CLASSIC)
    netns("other")
    dup = error(cni("ADD", CLASSIC, cid="c1", netns="/run/netns/other"), 103)
    assert "already attached" in dup["msg"] and "DEL it first" in dup["msg"]
    assert allocation_files("fromScratch") == {"10.244.0.2": "c1\r\neth0"}       # not released
    assert "eth0" not in links("other")
    ping("c1", "10.244.0.1")                                                       # the live pod still works
    assert pod("c2", CLASSIC)["ips"][0]["address"] == "10.244.0.3/24"             # .2 is not handed out again
    assert first["ips"][0]["address"] == "10.244.0.2/24"


def test_a_duplicate_add_whose_veth_died_with_its_netns_is_refused_by_the_record():
    pod("c1", dict(CLASSIC, ipMasq=False))
    os.system("ip netns del c1")                                                  # the pod's netns (and veth) gone, no DEL
    netns("c1")
    assert "already attached" in error(cni("ADD", dict(CLASSIC, ipMasq=False), cid="c1"), 103)["msg"]
    assert allocation_files("fromScratch") == {"10.244.0.2": "c1\r\neth0"}
    ok(cni("DEL", dict(CLASSIC, ipMasq=False), cid="c1", netns=""))              # the runtime's DEL clears it
    assert allocation_files("fromScratch") == {} and records() == {}
    assert ok(cni("ADD", dict(CLASSIC, ipMasq=False), cid="c1"))["ips"][0]["address"] == "10.244.0.3/24"


# ---------------------------------------------------------------- config values of the wrong type

@pytest.mark.parametrize("path, value", [
    ("bridge", 0), ("bridge", []), ("bridge", True),
    ("isGateway", "yes"), ("isDefaultGateway", 1), ("ipMasq", []), ("hairpinMode", {}),
    ("mtu", False), ("mtu", ""), ("mtu", {}), ("mtu", 1500.0), ("dns", []), ("ipam", []), ("mode", 0),
    ("ipam.type", []), ("ipam.type", {}), ("ipam.subnet", 0), ("ipam.subnet", []), ("ipam.subnet", {}),
    ("ipam.ranges", {}), ("ipam.ranges", [{}]), ("ipam.rangeStart", 5), ("ipam.rangeEnd", []),
    ("ipam.gateway", {}), ("ipam.routes", {}), ("ipam.routes", [5]), ("ipam.routes", [{"dst": 0}]),
    ("ipam.dataDir", 1), ("nonMasqueradeCIDRs", "10.0.0.0/8"), ("prevResult", []),
])
def test_a_value_of_the_wrong_type_is_error_7_naming_the_key(path, value):
    conf = dict(CLASSIC, ipam={"subnet": "10.244.0.0/24"})
    where = path.split(".")
    (conf["ipam"] if len(where) == 2 else conf)[where[-1]] = value
    netns("c1")
    msg = error(cni("ADD", conf, cid="c1"), 7)["msg"]
    assert where[-1] in msg, msg
    assert "cni0" not in links() and allocation_files("fromScratch") == {}      # nothing was changed


@pytest.mark.parametrize("absent", [{"bridge": None}, {"bridge": ""}, {"mtu": None}, {"ipMasq": None},
                                    {"ipam": {"subnet": "", "type": None, "routes": None}}, {"dns": None}])
def test_null_and_empty_strings_mean_absent(absent):
    res = pod("c1", dict(CLASSIC, **absent))
    assert res["ips"][0]["address"] == "10.244.0.2/24" and "cni0" in links()


def test_json_nan_and_infinity_are_refused():
    netns("c1")
    for text in ('{"cniVersion":"1.0.0","name":"fromScratch","type":"x","mtu":NaN}',
                 '{"cniVersion":"1.0.0","name":"fromScratch","type":"x","mtu":Infinity}',
                 '{"cniVersion":"1.0.0","name":"fromScratch","type":"x","x":-Infinity}'):
        assert error(cni("ADD", None, stdin=text.encode(), cid="c1"), 6)
    assert "cni0" not in links()


@pytest.mark.parametrize("subnet", ["10.76.0.0/\uff12\uff14", "10.76.0.0/\u0662\u0664", "10.76.0.0/ 24", "10.76.0.0/+24"])
def test_a_prefix_length_in_anything_but_ascii_digits_is_refused(subnet):
    netns("c1")
    assert "invalid ipam range" in error(cni("ADD", dict(CLASSIC, ipam={"subnet": subnet}), cid="c1"), 7)["msg"]
    assert "cni0" not in links()


@pytest.mark.parametrize("subnet, what", [("224.0.0.0/4", "multicast"), ("239.1.0.0/24", "multicast"),
                                          ("0.0.0.0/8", "this network"), ("0.0.0.0/0", "this network"),
                                          ("127.0.0.0/24", "loopback"), ("240.0.0.0/24", "reserved"),
                                          ("ff02::/64", "multicast")])
def test_reserved_subnets_are_refused_before_anything_is_made(subnet, what):
    netns("c1")
    msg = error(cni("ADD", dict(CLASSIC, ipam={"subnet": subnet}), cid="c1"), 7)["msg"]
    assert what in msg and subnet in msg
    assert "cni0" not in links() and not os.path.exists(DATA)


# ---------------------------------------------------------------- rollback of the gateway address

UNREACHABLE_ROUTE = {"subnet": "10.244.0.0/24", "routes": [{"dst": "192.0.2.0/24", "gw": "198.51.100.1"}]}


def test_a_failed_add_takes_back_the_gateway_address_it_added():
    netns("c1")
    conf = dict(CLASSIC, ipMasq=False, ipam=UNREACHABLE_ROUTE)  # the pod's route cannot be added: after the gateway
    assert error(cni("ADD", conf, cid="c1"), 101)
    assert "cni0" in links() and addrs("cni0") == []
    assert allocation_files("fromScratch") == {} and records() == {}
    assert [name for name in links() if name.startswith("veth")] == [] and "eth0" not in links("c1")


def test_a_failed_add_keeps_a_gateway_another_pod_uses():
    pod("c1", dict(CLASSIC, ipMasq=False))
    netns("c2")
    assert error(cni("ADD", dict(CLASSIC, ipMasq=False, ipam=UNREACHABLE_ROUTE), cid="c2"), 101)
    assert "10.244.0.1/24" in addrs("cni0")
    ping("c1", "10.244.0.1")


# ---------------------------------------------------------------- temporary files of calls that died

def test_the_next_call_under_the_lock_sweeps_temporary_files_of_calls_that_died():
    pod("c1", CLASSIC)
    tmp = os.path.join(DATA, ".cnikit", "tmp")
    for name in ("ip-999999", "999998"):  # what a kill -9 in the middle of a write leaves
        with open(os.path.join(tmp, name), "w") as f:
            f.write("c9\r\neth0")
    pod("c2", CLASSIC)
    assert os.listdir(tmp) == []
    assert allocation_files("fromScratch") == {"10.244.0.2": "c1\r\neth0", "10.244.0.3": "c2\r\neth0"}


def test_older_state_gets_records_once_and_its_stray_temporary_files_go():
    # a network directory as an older version left it: allocations, a cursor, pid-named temp files
    os.makedirs(DATA)
    for name, text in (("10.244.0.2", "old\r\neth0"), ("last_reserved_ip.0", "10.244.0.2"), (".tmp-999999", "x"),
                       (".last-999999", "10.244.0.9")):
        with open(os.path.join(DATA, name), "w") as f:
            f.write(text)
    assert pod("c1", CLASSIC)["ips"][0]["address"] == "10.244.0.3/24"
    assert sorted(os.listdir(DATA)) == [".cnikit", "10.244.0.2", "10.244.0.3", "last_reserved_ip.0", "lock"]
    old = [r for r in records().values() if r["containerID"] == "old"]
    assert old == [{"containerID": "old", "ifname": "eth0", "ips": ["10.244.0.2"], "veth": old[0]["veth"],
                    "iptables": None}]                                         # its rules unknown: looked for at DEL
    ok(cni("DEL", CLASSIC, cid="old", netns="", **logged()))
    assert "+ iptables-save" in log_text() and "10.244.0.2" not in allocation_files("fromScratch")


# ---------------------------------------------------------------- the ownership record

def test_add_records_what_the_attachment_owns_and_del_reads_it_instead_of_scanning():
    res = pod("c1", CLASSIC)
    (rec,) = records().values()
    assert rec["containerID"] == "c1" and rec["ifname"] == "eth0" and rec["ips"] == ["10.244.0.2/24"]
    assert rec["veth"] == res["interfaces"][1]["name"]
    tables = {e["table"]: e for e in rec["iptables"]}
    assert sorted(tables) == ["filter", "nat"] and all(e["family"] == 4 for e in tables.values())  # ipMasq, forwardAccept
    (chain,) = tables["nat"]["chains"]
    assert f"-N {chain}" in nat_rules() and f"-N {chain}" in filter_rules()
    assert all(f"-j {chain}" in j for e in tables.values() for j in e["jumps"])
    # containerd's RemovePodSandbox: CNI_NETNS="" and no prevResult, as the only DEL
    ok(cni("DEL", CLASSIC, cid="c1", netns="", **logged()))
    text = log_text()
    assert "iptables-save" not in text and "+ iptables-restore" in text         # the known rules, no dump
    assert chain not in nat_rules() and chain not in filter_rules() and rec["veth"] not in links()
    assert allocation_files("fromScratch") == {} and records() == {}
    # and again: it owns nothing now, so nothing is run at all
    ok(cni("DEL", CLASSIC, cid="c1", netns="", **logged()))
    assert "+ " not in log_text()


def test_del_without_a_record_releases_what_prevresult_names_only_if_it_is_still_that_pods():
    res = pod("c1", dict(CLASSIC, ipMasq=False))
    for name in os.listdir(RECORDS):
        os.unlink(os.path.join(RECORDS, name))                                  # a record lost (edited away)
    ok(cni("DEL", dict(CLASSIC, ipMasq=False, prevResult=res), cid="c1"))
    assert allocation_files("fromScratch") == {}
    other = pod("c2", dict(CLASSIC, ipMasq=False))
    ok(cni("DEL", dict(CLASSIC, ipMasq=False, prevResult=dict(res, ips=other["ips"])), cid="c1"))
    assert allocation_files("fromScratch") == {"10.244.0.3": "c2\r\neth0"}      # not c1's: kept


def test_an_unreadable_record_falls_back_to_looking():
    pod("c1", CLASSIC)
    (name,) = os.listdir(RECORDS)
    with open(os.path.join(RECORDS, name), "w") as f:
        f.write("{not json")
    ok(cni("DEL", CLASSIC, cid="c1", netns="", **logged()))
    assert "unreadable" in log_text() and "+ iptables-save" in log_text()
    assert cnikit.CHAIN_PREFIX not in nat_rules() and allocation_files("fromScratch") == {} and records() == {}


def test_gc_removes_what_the_records_of_stale_attachments_own():
    conf = dict(CLASSIC, cniVersion="1.1.0")
    keep, gone = pod("keep", conf), pod("gone", conf)
    ok(cni("GC", dict(conf, **{"cni.dev/valid-attachments": [{"containerID": "keep", "ifname": "eth0"}]})))
    assert [r["containerID"] for r in records().values()] == ["keep"]
    assert gone["interfaces"][1]["name"] not in links() and keep["interfaces"][1]["name"] in links()
    assert allocation_files("fromScratch") == {"10.244.0.2": "keep\r\neth0"}
    assert "id: gone" not in nat_rules() and "id: keep" in nat_rules()


def test_check_looks_at_each_recorded_chain_without_dumping_the_table():
    conf = dict(CLASSIC, cniVersion="1.1.0")
    res = pod("c1", conf)
    ok(cni("CHECK", dict(conf, prevResult=res), cid="c1", **logged()))
    assert "iptables-save" not in log_text() and "-t nat -S CNIKIT-" in log_text()
    (chain,) = {c for r in records().values() for e in r["iptables"] for c in e["chains"]}
    rules = [r for r in nat_rules().splitlines() if r.startswith("-A POSTROUTING") and chain in r]
    os.system(f"iptables -t nat {rules[0].replace('-A', '-D', 1)} && iptables -t nat -F {chain} && iptables -t nat -X {chain}")
    assert chain in error(cni("CHECK", dict(conf, prevResult=res), cid="c1"), 100)["msg"]


def test_a_duplicate_add_of_an_attachment_older_than_records_gives_back_only_its_own_address():
    pod("c1", dict(CLASSIC, ipMasq=False))
    for name in os.listdir(RECORDS):
        os.unlink(os.path.join(RECORDS, name))              # as if made before records: only the veth says it
    netns("other")
    assert "cannot create veth" in error(cni("ADD", dict(CLASSIC, ipMasq=False), cid="c1", netns="/run/netns/other"), 101)["msg"]
    assert allocation_files("fromScratch") == {"10.244.0.2": "c1\r\neth0"} and records() == {}
    ping("c1", "10.244.0.1")


# ---------------------------------------------------------------- the compiled form

def test_the_compiled_form_answers_like_the_plain_file_and_falls_back_to_its_source_on_another_python():
    import subprocess
    from plugin_helpers import PLUGIN_SRC
    out = "/run/cni/compiled"
    subprocess.run(["/usr/bin/python3", "-I", "-S", PLUGIN_SRC, "--compile", PLUGIN_SRC, out], check=True)
    with open(out, "rb") as f:
        data = f.read()
    first, text = data.split(b"\n", 1)[0], data[:data.index(b"\n#\n")]
    # Python runs a -c program that reads the file, never the file as a script: the first line
    # fits the kernel's #! limit of older kernels too, and what follows the text is bytecode
    assert first.startswith(b"#!/usr/bin/python3 -ISc") and len(first) <= 127 and b"marshal.loads" in text
    assert b"compiled for /usr/bin/python3 " in data.split(b"\n")[1]
    other = "/run/cni/compiled-other"
    with open(other, "wb") as f:  # as if /usr/bin/python3 were upgraded: its bytecode magic differs
        f.write(data.replace(b"MAGIC_NUMBER\", None) == b'", b"MAGIC_NUMBER\", None) == b'X", 1))
    os.chmod(other, 0o755)
    with open(other, "rb") as f:
        assert f.read() != data
    for plugin in (out, other, PLUGIN_SRC):
        version = ok(cni("VERSION", None, stdin=b'{"cniVersion":"0.4.0"}', plugin=plugin))
        assert version == {"cniVersion": "0.4.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]}
        cid = {out: "cc", other: "co", PLUGIN_SRC: "cp"}[plugin]
        res = ok(cni("ADD", CLASSIC, plugin=plugin, cid=cid, netns=netns(cid)))
        ping(cid, "10.244.0.1")
        ok(cni("DEL", dict(CLASSIC, prevResult=res), plugin=plugin, cid=cid))
        assert error(cni("ADD", dict(CLASSIC, mtu="x"), plugin=plugin, cid=cid), 7)
    assert allocation_files("fromScratch") == {} and records() == {}


def test_an_interpreter_path_too_long_for_the_first_line_is_refused_in_one_line(tmp_path):
    import subprocess
    from plugin_helpers import PLUGIN_SRC
    far = tmp_path / ("d" * 100)
    far.mkdir()
    (far / "python3").symlink_to("/usr/bin/python3")
    proc = subprocess.run([str(far / "python3"), "-I", "-S", PLUGIN_SRC, "--compile", PLUGIN_SRC, str(tmp_path / "out")],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and not (tmp_path / "out").exists()
    assert proc.stderr.count("\n") == 1 and "too long for the first line" in proc.stderr and "--plain" in proc.stderr
