"""Unit tests of the plugin's command paths with pytest-subprocess: failing commands and the
order of the rollback.  The plugin is imported as a module (its file name has dashes); its
netlink calls are real (this test's sandbox), only external commands are faked."""
import importlib.util
import json
import os
import types

import pytest
import sh

from plugin_helpers import PLUGIN_SRC, allocation_files, links, netns


@pytest.fixture
def fp(fp):
    """pytest-subprocess's fake, but `ip` runs for real: the tests read the kernel with it
    (tests/kernel.py), and the plugin itself never runs it (netlink)."""
    fp.pass_command(["ip", fp.any()], occurrences=1000)
    return fp


@pytest.fixture
def plugin():
    spec = importlib.util.spec_from_file_location("cni_bash_compatible", PLUGIN_SRC)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.LOG.clear()
    return mod


def make_net(plugin, conf, args=""):
    return plugin.Net(dict({"cniVersion": "1.0.0", "name": "unit"}, **conf), plugin.parse_cni_args(args))


def env(cid="p1"):
    return {"CNI_CONTAINERID": cid, "CNI_IFNAME": "eth0", "CNI_NETNS": netns(cid), "CNI_PATH": "/run/cni/bin"}


def call(environ, raw=b"{}"):
    """What cmd_add reads of a plugin.Call."""
    return types.SimpleNamespace(env=environ, raw=raw)


def record_for(plugin, net, cid):
    return lambda ips: plugin.Record(cid, "eth0", [plugin.fmt_cidr(i["family"], i["n"], i["plen"]) for i in ips],
                                     plugin.attachment_rules(net, cid, "eth0", ips))


def test_iptables_failure_rolls_back_masquerade_veth_then_address(plugin, fp):
    fp.register(["iptables-restore", "-w", "--noflush"], returncode=1, stderr="iptables: simulated")
    fp.register(["iptables-restore", "-w", "--noflush"], returncode=1, stderr="No chain/target/match")
    fp.register(["iptables-save"], stdout="*nat\nCOMMIT\n*filter\nCOMMIT\n")
    net = make_net(plugin, {"ipMasq": True})
    with pytest.raises(plugin.CNIError) as err:
        plugin.cmd_add(net, call(env()))
    assert err.value.code == plugin.E_COMMAND and "simulated" in err.value.details
    steps = [line.strip() for line in plugin.LOG]
    created = steps.index(next(s for s in steps if s.startswith("netlink: ip link add veth")))
    failed = steps.index(next(s for s in steps if s.startswith("ADD failed")))
    rollback = steps[failed:]
    # reverse order of creation (the rules are started with the record, before the veth is made):
    # the veth first, then the rules, then the address
    order = [i for i, s in enumerate(rollback) if s.startswith(("+ iptables-save", "netlink: ip link del", "ipam: release"))]
    assert [rollback[i].split()[1] for i in order] == ["ip", "iptables-save", "release"]
    assert steps.index(next(s for s in steps if s.startswith("+ iptables-restore"))) < created
    assert created < failed
    assert not any(name.startswith("veth") for name in links()) and "eth0" not in links("p1")
    assert allocation_files("unit") == {}


def test_missing_iptables_is_a_command_error_and_rolls_back(plugin, fp):
    def missing(process):
        raise FileNotFoundError(2, "No such file or directory")
    fp.register(["iptables-restore", fp.any()], callback=missing)
    fp.register(["iptables-save", fp.any()], callback=missing)
    with pytest.raises(plugin.CNIError) as err:
        plugin.cmd_add(make_net(plugin, {}), call(env()))
    assert err.value.code == plugin.E_COMMAND and "cannot run iptables-restore" in err.value.msg
    assert allocation_files("unit") == {} and "eth0" not in links("p1")


def fake_ipam(path="/run/cni/bin/fakeipam"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("#!/bin/sh\nexit 1\n")  # never really run: pytest-subprocess answers for it
    os.chmod(path, 0o755)
    return path


def test_delegated_ipam_is_released_when_the_veth_cannot_be_created(plugin, fp, monkeypatch):
    path = fake_ipam()
    commands = []

    def record(process):
        commands.append(process.kwargs["env"]["CNI_COMMAND"])
    result = {"cniVersion": "1.0.0", "ips": [{"address": "10.77.0.9/24", "gateway": "10.77.0.1"}]}
    fp.register([path], stdout=json.dumps(result), callback=record)
    fp.register([path], stdout="", callback=record)
    e = env()
    os.environ.update(e)
    try:
        def refused(*args):  # the kernel refusing the veth (e.g. out of memory) after the IPAM ADD
            raise OSError(12, "Cannot allocate memory")
        monkeypatch.setattr(plugin.Netlink, "add_veth", refused)
        with pytest.raises(plugin.CNIError) as err:
            plugin.cmd_add(make_net(plugin, {"ipMasq": False, "forwardAccept": False, "ipam": {"type": "fakeipam"}}), call(e))
    finally:
        for k in e:
            os.environ.pop(k, None)
    assert err.value.code == plugin.E_KERNEL and "cannot create veth" in err.value.msg
    assert commands == ["ADD", "DEL"]
    assert "eth0" not in links("p1")


def test_delegated_ipam_error_code_is_passed_through(plugin, fp):
    path = fake_ipam()
    fp.register([path], returncode=1, stdout=json.dumps({"cniVersion": "1.0.0", "code": 11, "msg": "pool busy"}))
    os.environ["CNI_PATH"] = "/run/cni/bin"
    try:
        with pytest.raises(plugin.CNIError) as err:
            plugin.cmd_add(make_net(plugin, {"ipMasq": False, "ipam": {"type": "fakeipam"}}), call(env()))
    finally:
        os.environ.pop("CNI_PATH")
    assert err.value.code == 11 and "fakeipam: pool busy" in err.value.msg
    assert "eth0" not in links("p1")


@pytest.mark.noroot
def test_del_falls_back_to_iptables_save_when_the_known_rules_are_gone(plugin, fp, tmp_path, monkeypatch):
    # the plugin looks for the tools on PATH before it calls them (fp answers the calls): give it
    # a PATH that has them, whatever this machine and user have
    for tool in ("iptables-save", "iptables-restore"):
        (tmp_path / tool).write_text("#!/bin/sh\nexit 1\n")
        (tmp_path / tool).chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    fp.register(["iptables-restore", "-w", "--noflush"], returncode=1, stderr="Bad rule")
    chain = plugin.chain_name("unit", "p1", "eth0")
    saved = (f"*filter\n:FORWARD DROP [0:0]\n:{chain} - [0:0]\n-A FORWARD -s 10.244.0.5/32 -i cni0 -j {chain}\n"
             f"-A {chain} -s 10.244.0.5/32 -j ACCEPT\nCOMMIT\n*mangle\n:FORWARD ACCEPT [0:0]\nCOMMIT\n"
             f"*nat\n:{chain} - [0:0]\n-A POSTROUTING -s 10.244.0.5/32 -j {chain}\nCOMMIT\n")
    fp.register(["iptables-save"], stdout=saved)
    seen = []
    fp.register(["iptables-restore", "-w", "--noflush"], stdin_callable=lambda data: seen.append(data.decode()))
    ip = {"family": plugin.AF_INET, "n": 0x0AF40005, "plen": 24, "subnet": (plugin.AF_INET, 0x0AF40000, 24)}
    plugin.remove_rules(plugin.attachment_rules(make_net(plugin, {}), "p1", "eth0", [ip]))
    assert fp.call_count(["iptables-restore", "-w", "--noflush"]) == 2
    assert fp.call_count(["iptables-save"]) == 1
    # the second restore deletes what iptables-save showed, in both tables, in one call: the jumps,
    # then the chains; other tables are left alone
    assert seen == [f"*filter\n-D FORWARD -s 10.244.0.5/32 -i cni0 -j {chain}\n-F {chain}\n-X {chain}\nCOMMIT\n"
                    f"*nat\n-D POSTROUTING -s 10.244.0.5/32 -j {chain}\n-F {chain}\n-X {chain}\nCOMMIT\n"]


@pytest.mark.noroot
def test_an_attachments_rules_are_one_entry_per_family_and_table(plugin):
    """ipMasq: the nat chain; forwardAccept: the filter chain of the same name, jumped to for the
    pod's address on its bridge only; the peers (own subnet, nonMasqueradeCIDRs) in both."""
    ip = {"family": plugin.AF_INET, "n": 0x0AF40105, "plen": 24, "subnet": (plugin.AF_INET, 0x0AF40100, 24)}
    net = make_net(plugin, {"nonMasqueradeCIDRs": ["10.244.0.0/16"]})
    nat, filt = plugin.attachment_rules(net, "p1", "eth0", [ip])
    chain = plugin.chain_name("unit", "p1", "eth0")
    tag = '-m comment --comment "cnikit name: unit id: p1 if: eth0"'
    assert (nat["table"], filt["table"]) == ("nat", "filter") and nat["chains"] == filt["chains"] == [chain]
    assert filt["jumps"] == [f"FORWARD -s 10.244.1.5/32 -i cni0 {tag} -j {chain}",
                             f"FORWARD -d 10.244.1.5/32 -o cni0 {tag} -j {chain}"]
    assert filt["rules"] == [f"-A {chain} -s 10.244.1.5/32 {tag} -j ACCEPT",
                             f"-A {chain} -d 10.244.1.5/32 -m conntrack --ctstate RELATED,ESTABLISHED,DNAT {tag} -j ACCEPT",
                             f"-A {chain} -s 10.244.1.0/24 -d 10.244.1.5/32 {tag} -j ACCEPT",
                             f"-A {chain} -s 10.244.0.0/16 -d 10.244.1.5/32 {tag} -j ACCEPT"]
    assert f"-A {chain} -d 10.244.0.0/16 {tag} -j ACCEPT" in nat["rules"]
    routed = plugin.attachment_rules(make_net(plugin, {"mode": "routed", "ipMasq": False}), "p1", "eth0", [ip])
    assert [e["table"] for e in routed] == ["filter"]
    assert routed[0]["jumps"][0].startswith(f"FORWARD -s 10.244.1.5/32 -i {plugin.host_veth_name('p1', 'eth0')} ")
    assert plugin.attachment_rules(make_net(plugin, {"ipMasq": False, "forwardAccept": False}), "p1", "eth0", [ip]) == []


@pytest.mark.noroot
def test_command_runner_logs_argv_and_raises_one_error_type(plugin, fp):
    fp.register(["iptables-save", "-t", "nat"], returncode=3, stderr="boom")
    with pytest.raises(plugin.CNIError) as err:
        plugin.run(["iptables-save", "-t", "nat"])
    assert err.value.code == plugin.E_COMMAND and err.value.details == "boom"
    assert "+ iptables-save -t nat" in plugin.LOG and any("exit 3: boom" in line for line in plugin.LOG)


def test_round_robin_continues_after_the_last_reserved_address(plugin):
    net = make_net(plugin, {"ipam": {"subnet": "10.60.0.0/29"}})  # .1 gateway, .2-.6 usable
    added = [plugin.builtin_add(net, f"c{i}", "eth0", record_for(plugin, net, f"c{i}")) for i in range(3)]
    assert [ips[0]["n"] & 0xFF for ips, _ in added] == [2, 3, 4]
    plugin.ipam_del(net, added[0][1], b"{}")
    assert [plugin.builtin_add(net, f"d{i}", "eth0", record_for(plugin, net, f"d{i}"))[0][0]["n"] & 0xFF
            for i in range(3)] == [5, 6, 2]


def test_ipam_type_naming_the_plugin_itself_is_refused_not_run_forever(plugin, fp):
    path = fake_ipam("/run/cni/bin/selfy")
    fp.register([path], stdout="{}")
    os.environ["CNI_PATH"] = "/run/cni/bin"
    try:
        with pytest.raises(plugin.CNIError) as err:  # refused while reading the config
            plugin.cmd_add(make_net(plugin, {"type": "selfy", "ipMasq": False, "ipam": {"type": "selfy"}}), call(env()))
        assert err.value.code == plugin.E_CONFIG and fp.call_count([path]) == 0
        # an indirect loop (another name for this plugin): the delegated call refuses to delegate again
        os.environ["CNIKIT_DELEGATED"] = "1"
        net = make_net(plugin, {"ipMasq": False, "ipam": {"type": "selfy"}})
        with pytest.raises(plugin.CNIError) as err:
            plugin.cmd_add(net, call(env("p2")))
        assert err.value.code == plugin.E_CONFIG and fp.call_count([path]) == 0
    finally:
        os.environ.pop("CNI_PATH")
        os.environ.pop("CNIKIT_DELEGATED", None)


def open_fds():
    return sorted(os.listdir("/proc/self/fd"))


def test_add_del_and_check_close_every_fd_and_socket_they_open(plugin):
    net = make_net(plugin, {"ipMasq": False, "cniVersion": "1.0.0"})
    before = open_fds()
    e = env()
    res = plugin.cmd_add(net, call(e))
    assert open_fds() == before
    plugin.cmd_check(make_net(plugin, {"ipMasq": False, "prevResult": res}), call(e))
    assert open_fds() == before
    plugin.cmd_del(net, call(dict(e, CNI_NETNS="")))
    assert open_fds() == before and allocation_files("unit") == {}


def test_a_bug_answers_in_cni_terms_with_code_999_never_a_traceback(plugin, capsys):
    c = plugin.Call({"CNIKIT_LOG": "/run/cni/unit.log"})  # no CNI_COMMAND: stdin is not read

    def buggy(_):
        return 1 // 0
    assert plugin.answer(c, buggy) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["code"] == plugin.E_INTERNAL == 999 and out["msg"] == "internal error: ZeroDivisionError: integer division or modulo by zero"
    with open("/run/cni/unit.log") as f:
        assert '"code": 999' in f.read()


def test_versions_compare_as_numbers_and_the_verb_table_says_what_each_verb_needs(plugin):
    assert plugin.version_tuple("0.10.0") > plugin.version_tuple("0.4.0") > plugin.version_tuple("0.3.1")
    assert plugin.version_tuple("1.0") is None and plugin.version_tuple("1.0.\u0662") is None
    assert plugin.VERBS["CHECK"].since == (0, 4, 0) and plugin.VERBS["GC"].since == (1, 1, 0)
    assert plugin.VERBS["DEL"].needs == ("CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH")  # no netns needed
    c = plugin.Call({})  # as read from a CHECK call whose config says 0.3.1
    c.command, c.conf = "CHECK", {"cniVersion": "0.3.1", "name": "unit"}
    c.env = {"CNI_CONTAINERID": "x", "CNI_NETNS": netns("x"), "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin"}
    with pytest.raises(plugin.CNIError) as err:
        plugin.dispatch(c)
    assert err.value.code == plugin.E_VERSION and "0.3.1" in err.value.msg


@pytest.mark.noroot
def test_vlan_trunk_is_the_sorted_union_of_its_ranges_and_ids(plugin):
    net = make_net(plugin, {"vlanTrunk": [{"minID": 5, "maxID": 7}, {"id": 3}, {"id": 6}]})
    assert net.trunk == [3, 5, 6, 7]
    assert make_net(plugin, {"vlanTrunk": []}).trunk == []  # present: vlan_filtering on, no VLAN to add
    assert make_net(plugin, {}).trunk is None


class VlanRecorder:
    """Stands in for Netlink.port_vlans where the kernel cannot filter VLANs (this machine's)."""

    def __init__(self):
        self.calls = []

    def port_vlans(self, index, name, vlans, delete=False):
        self.calls.append(("del" if delete else "add", vlans))


@pytest.mark.noroot
@pytest.mark.parametrize("vlan,trunk,keep,calls", [
    (100, None, False, [("del", [(1, False)]), ("add", [(100, True)])]),
    (100, None, True, [("add", [(100, True)])]),
    (100, [200, 201], False, [("del", [(1, False)]), ("add", [(100, True), (200, False), (201, False)])]),
    (0, [200], False, [("del", [(1, False)]), ("add", [(200, False), (1, True)])]),
    (0, [], False, []),
    (0, None, False, []),
])
def test_port_vlans_follow_the_reference_order(plugin, vlan, trunk, keep, calls):
    nl = VlanRecorder()
    plugin.port_vlans(nl, {"default_pvid": 1}, {"index": 5, "name": "veth0"}, vlan, trunk, keep)
    assert nl.calls == calls


def test_add_waits_for_the_bridge_port_on_the_kernels_announcement_not_on_a_poll(plugin, monkeypatch):
    """port_ready wakes when the bridge announces the port's change (the link group), and gives
    up after PORT_WAIT on a port that never gets a carrier; it closes the socket it opened."""
    sh.ip("link", "add", "brw", "type", "bridge")
    sh.ip("link", "set", "brw", "up")
    sh.ip("link", "add", "vethw", "type", "veth", "peer", "name", "vethw-pod")
    sh.ip("link", "add", "vethx", "type", "veth", "peer", "name", "vethx-pod")
    for port in ("vethw", "vethx"):                       # their peers down: no carrier, the ports disabled
        sh.ip("link", "set", port, "master", "brw", "up")
    fds = set(os.listdir("/proc/self/fd"))
    woken, real = [], plugin.link_event

    def carrier_comes_while_waiting(sock, index, timeout):
        sh.ip("link", "set", "vethw-pod", "up")          # only now: the wait has joined the group
        woken.append(real(sock, index, timeout))
        return woken[-1]

    monkeypatch.setattr(plugin, "link_event", carrier_comes_while_waiting)
    with plugin.Netlink() as nl:
        assert nl.link("vethw")["port_state"] == plugin.BR_STATE_DISABLED
        plugin.port_ready(nl, "vethw")
        assert woken[0] is True and nl.link("vethw")["port_state"] != plugin.BR_STATE_DISABLED
        monkeypatch.setattr(plugin, "link_event", real)
        monkeypatch.setattr(plugin, "PORT_WAIT", 0.2)
        with pytest.raises(plugin.CNIError) as err:
            plugin.port_ready(nl, "vethx")
        assert err.value.code == plugin.E_KERNEL and "still disabled" in err.value.msg
    assert set(os.listdir("/proc/self/fd")) == fds
