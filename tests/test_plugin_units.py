"""Unit tests of the plugin's command paths with pytest-subprocess: failing commands and the
order of the rollback.  The plugin is imported as a module (its file name has dashes); its
netlink calls are real (this test's sandbox), only external commands are faked."""
import importlib.util
import json
import os

import pytest
import sh

from plugin_helpers import PLUGIN, allocation_files, links, netns


@pytest.fixture
def plugin():
    spec = importlib.util.spec_from_file_location("cni_bash_compatible", PLUGIN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.LOG.clear()
    return mod


def make_net(plugin, conf, args=""):
    return plugin.Net(dict({"cniVersion": "1.0.0", "name": "unit"}, **conf), plugin.parse_cni_args(args))


def env(cid="p1"):
    return {"CNI_CONTAINERID": cid, "CNI_IFNAME": "eth0", "CNI_NETNS": netns(cid), "CNI_PATH": "/run/cni/bin"}


def test_iptables_failure_rolls_back_masquerade_veth_then_address(plugin, fp):
    fp.register(["iptables-restore", "-w", "--noflush"], returncode=1, stderr="iptables: simulated")
    fp.register(["iptables-restore", "-w", "--noflush"], returncode=1, stderr="No chain/target/match")
    fp.register(["iptables-save"], stdout="*nat\nCOMMIT\n*filter\nCOMMIT\n")
    net = make_net(plugin, {"ipMasq": True})
    with pytest.raises(plugin.CNIError) as err:
        plugin.cmd_add(net, env(), b"{}")
    assert err.value.code == plugin.E_COMMAND and "simulated" in err.value.details
    steps = [line.strip() for line in plugin.LOG]
    created = steps.index(next(s for s in steps if s.startswith("netlink: ip link add veth")))
    failed = steps.index(next(s for s in steps if s.startswith("ADD failed")))
    rollback = steps[failed:]
    # reverse order of creation: rules first, then the veth, then the address
    order = [i for i, s in enumerate(rollback) if s.startswith(("+ iptables-save", "netlink: ip link del", "ipam: release"))]
    assert [rollback[i].split()[1] for i in order] == ["iptables-save", "ip", "release"]
    assert created < failed
    assert not any(name.startswith("veth") for name in links()) and "eth0" not in links("p1")
    assert allocation_files("unit") == {}


def test_missing_iptables_is_a_command_error_and_rolls_back(plugin, fp):
    def missing(process):
        raise FileNotFoundError(2, "No such file or directory")
    fp.register(["iptables-restore", fp.any()], callback=missing)
    fp.register(["iptables-save", fp.any()], callback=missing)
    with pytest.raises(plugin.CNIError) as err:
        plugin.cmd_add(make_net(plugin, {}), env(), b"{}")
    assert err.value.code == plugin.E_COMMAND and "cannot run iptables-restore" in err.value.msg
    assert allocation_files("unit") == {} and "eth0" not in links("p1")


def fake_ipam(path="/run/cni/bin/fakeipam"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("#!/bin/sh\nexit 1\n")  # never really run: pytest-subprocess answers for it
    os.chmod(path, 0o755)
    return path


def test_delegated_ipam_is_released_when_the_veth_cannot_be_created(plugin, fp):
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
        # a link that already has our host-side veth name makes the veth creation fail
        sh.ip("link", "add", plugin.host_veth_name("p1", "eth0"), "type", "bridge")
        with pytest.raises(plugin.CNIError) as err:
            plugin.cmd_add(make_net(plugin, {"ipMasq": False, "ipam": {"type": "fakeipam"}}), e, b"{}")
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
            plugin.cmd_add(make_net(plugin, {"ipMasq": False, "ipam": {"type": "fakeipam"}}), env(), b"{}")
    finally:
        os.environ.pop("CNI_PATH")
    assert err.value.code == 11 and "fakeipam: pool busy" in err.value.msg
    assert "eth0" not in links("p1")


def test_del_falls_back_to_iptables_save_when_the_known_rules_are_gone(plugin, fp):
    fp.register(["iptables-restore", "-w", "--noflush"], returncode=1, stderr="Bad rule")
    chain = plugin.chain_name("unit", "p1", "eth0")
    saved = (f"*filter\n:FORWARD DROP [0:0]\n:{chain} - [0:0]\n-A FORWARD -s 10.244.0.5/32 -i cni0 -j {chain}\n"
             f"-A {chain} -s 10.244.0.5/32 -j ACCEPT\nCOMMIT\n*mangle\n:FORWARD ACCEPT [0:0]\nCOMMIT\n"
             f"*nat\n:{chain} - [0:0]\n-A POSTROUTING -s 10.244.0.5/32 -j {chain}\nCOMMIT\n")
    fp.register(["iptables-save"], stdout=saved)
    seen = []
    fp.register(["iptables-restore", "-w", "--noflush"], stdin_callable=lambda data: seen.append(data.decode()))
    plugin.teardown_attachment_rules(make_net(plugin, {}), "p1", "eth0", {(plugin.AF_INET, 0x0AF40005)})
    assert fp.call_count(["iptables-restore", "-w", "--noflush"]) == 2
    assert fp.call_count(["iptables-save"]) == 1
    # what is really there goes, in both tables, in one call; other tables are left alone
    assert seen == [f"*filter\n-D FORWARD -s 10.244.0.5/32 -i cni0 -j {chain}\n-F {chain}\n-X {chain}\nCOMMIT\n"
                    f"*nat\n-D POSTROUTING -s 10.244.0.5/32 -j {chain}\n-F {chain}\n-X {chain}\nCOMMIT\n"]


def test_command_runner_logs_argv_and_raises_one_error_type(plugin, fp):
    fp.register(["iptables-save", "-t", "nat"], returncode=3, stderr="boom")
    with pytest.raises(plugin.CNIError) as err:
        plugin.run(["iptables-save", "-t", "nat"])
    assert err.value.code == plugin.E_COMMAND and err.value.details == "boom"
    assert "+ iptables-save -t nat" in plugin.LOG and any("exit 3: boom" in line for line in plugin.LOG)


def test_round_robin_continues_after_the_last_reserved_address(plugin):
    net = make_net(plugin, {"ipam": {"subnet": "10.60.0.0/29"}})  # .1 gateway, .2-.6 usable
    got = [plugin.builtin_add(net, f"c{i}", "eth0")[0]["n"] & 0xFF for i in range(3)]
    assert got == [2, 3, 4]
    plugin.builtin_del(net, "c0", "eth0")
    assert [plugin.builtin_add(net, f"d{i}", "eth0")[0]["n"] & 0xFF for i in range(3)] == [5, 6, 2]


def test_ipam_type_naming_the_plugin_itself_is_refused_not_run_forever(plugin, fp):
    path = fake_ipam("/run/cni/bin/selfy")
    fp.register([path], stdout="{}")
    os.environ["CNI_PATH"] = "/run/cni/bin"
    try:
        with pytest.raises(plugin.CNIError) as err:  # refused while reading the config
            plugin.cmd_add(make_net(plugin, {"type": "selfy", "ipMasq": False, "ipam": {"type": "selfy"}}), env(), b"{}")
        assert err.value.code == plugin.E_CONFIG and fp.call_count([path]) == 0
        # an indirect loop (another name for this plugin): the delegated call refuses to delegate again
        os.environ["CNIKIT_DELEGATED"] = "1"
        net = make_net(plugin, {"ipMasq": False, "ipam": {"type": "selfy"}})
        with pytest.raises(plugin.CNIError) as err:
            plugin.cmd_add(net, env("p2"), b"{}")
        assert err.value.code == plugin.E_CONFIG and fp.call_count([path]) == 0
    finally:
        os.environ.pop("CNI_PATH")
        os.environ.pop("CNIKIT_DELEGATED", None)
