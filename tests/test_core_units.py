"""Pure parts of cnikit.py: validation, argv builders, the echo, the parser."""
import io
import os
import shlex
import subprocess

import pytest

import cnikit
from cnikit import UsageError

pytestmark = pytest.mark.noroot


@pytest.mark.parametrize("name", ["eth0", "a", "x" * 15, "veth-ns1", "br_0.1"])
def test_valid_interface_names(name):
    assert cnikit.check_ifname(name) == name


@pytest.mark.parametrize("name,why", [("x" * 16, "at most 15"), ("", "empty"), ("a/b", "'/'"), ("a:b", "':'"),
                                      ("a b", "whitespace"), (".", "'.'"), ("..", "'..'"), ("tab\t", "whitespace")])
def test_bad_interface_names(name, why):
    with pytest.raises(UsageError, match=why.replace(".", r"\.")):
        cnikit.check_ifname(name)


@pytest.mark.parametrize("name", ["../etc", "-rf", "a/b", "", "x" * 65, ".hidden", "a b"])
def test_bad_namespace_names(name):
    with pytest.raises(UsageError):
        cnikit.check_netns(name)


def test_addresses_and_subnets():
    assert cnikit.check_ifaddr("10.0.0.1/24") == "10.0.0.1/24"
    assert cnikit.check_ifaddr("2001:db8::1/64") == "2001:db8::1/64"
    for bad in ("10.0.0.1", "10.0.0.300/24", "10.0.0.0/24", "bogus", "10.0.0.1/33"):
        with pytest.raises(UsageError):
            cnikit.check_ifaddr(bad)
    assert cnikit.check_subnet("10.0.0.0/24") == "10.0.0.0/24"
    for bad in ("10.0.0.1/24", "10.0.0.0", "10.0.0.0/40", "x"):
        with pytest.raises(UsageError):
            cnikit.check_subnet(bad)


@pytest.mark.parametrize("value,low,high,ok", [(1, 1, cnikit.VNI_MAX, True), (cnikit.VNI_MAX, 1, cnikit.VNI_MAX, True),
                                               (0, 1, cnikit.VNI_MAX, False), (2 ** 24, 1, cnikit.VNI_MAX, False),
                                               ("4789", 1, 65535, True), ("70000", 1, 65535, False),
                                               ("abc", 1, 65535, False)])
def test_number_ranges(value, low, high, ok):
    if ok:
        assert cnikit.check_int(value, low, high, "n") == int(value)
    else:
        with pytest.raises(UsageError):
            cnikit.check_int(value, low, high, "n")


def test_mtu_and_mac():
    assert cnikit.check_mtu("1450") == 1450
    with pytest.raises(UsageError):
        cnikit.check_mtu(67)
    assert cnikit.check_mac("02:42:AC:11:00:02") == "02:42:ac:11:00:02"
    with pytest.raises(UsageError):
        cnikit.check_mac("02:42:ac:11:00")


def test_argv_builders_are_plain_iproute2():
    assert cnikit.ip("link", "show", ns="ns1") == ["ip", "-n", "ns1", "link", "show"]
    assert cnikit.in_netns(["iptables", "-S"], "h1") == ["ip", "netns", "exec", "h1", "iptables", "-S"]
    assert cnikit.kv(mtu=None, netns="ns1", id=42) == ["netns", "ns1", "id", "42"]
    assert cnikit.veth_add_argv("v0", "eth0", netns="ns1", mtu=1400) == \
        ["ip", "link", "add", "v0", "mtu", "1400", "type", "veth", "peer", "name", "eth0", "mtu", "1400",
         "netns", "ns1"]
    assert cnikit.vxlan_add_argv("vx0", 42, 1450, remote="192.0.2.2", dev="eth0", ns="node1") == \
        ["ip", "-n", "node1", "link", "add", "vx0", "mtu", "1450", "type", "vxlan", "id", "42", "dstport",
         "4789", "remote", "192.0.2.2", "dev", "eth0"]
    assert cnikit.netns_add_argv("ns1") == [["ip", "netns", "add", "ns1"],
                                            ["ip", "-n", "ns1", "link", "set", "dev", "lo", "alias", "cnikit"]]


def test_every_nat_rule_is_tagged_as_cnikits_and_lives_in_its_own_chain():
    rules = cnikit.nat_rules("10.0.0.0/24", "eth0")
    chain = cnikit.nat_chain("10.0.0.0/24")
    assert chain.startswith("CNIKIT-NAT-") and len(chain) <= 28 and chain != cnikit.nat_chain("10.0.1.0/24")
    assert len(cnikit.nat_chain("2001:db8:ffff:ffff::/64")) <= 28
    assert [(t, c) for t, c, _ in rules] == [("nat", chain), ("filter", chain), ("filter", chain)]
    assert cnikit.nat_jumps("10.0.0.0/24") == [
        ("nat", "POSTROUTING", ["-m", "comment", "--comment", "cnikit nat 10.0.0.0/24", "-j", chain]),
        ("filter", "FORWARD", ["-m", "comment", "--comment", "cnikit nat 10.0.0.0/24", "-j", chain])]
    for _, _, spec in rules:
        assert spec[spec.index("--comment") + 1] == "cnikit nat 10.0.0.0/24"
    assert rules[0][2][-2:] == ["-j", "MASQUERADE"]


def test_every_iptables_call_waits_for_the_lock():
    r = cnikit.Runner(dry_run=True, out=io.StringIO())
    cnikit.veth_add(r, "v0", "p0")
    cnikit.nat_add(r, "10.0.0.0/24", "v0")
    calls = [a for a in r.commands() if "iptables" in a]
    assert calls and all(a[a.index("iptables") + 1] == "-w" for a in calls)
    assert cnikit.iptables("-S", ns="h1") == ["ip", "netns", "exec", "h1", "iptables", "-w", "-S"]


def test_echo_is_a_pasteable_line_and_colour_only_on_request():
    out = io.StringIO()
    r = cnikit.Runner(dry_run=True, out=out)
    r.run(["ip", "addr", "add", "10.0.0.1/24", "dev", "my if"])
    r.note("why")
    assert out.getvalue() == "ip addr add 10.0.0.1/24 dev 'my if'\n# why\n"
    tty = io.StringIO()
    cnikit.Runner(dry_run=True, out=tty, color=True).run(["ip", "link"])
    assert "\033[" in tty.getvalue() and "ip link" in tty.getvalue()
    quiet = io.StringIO()
    cnikit.Runner(dry_run=True, out=quiet, quiet=True).run(["ip", "link"])
    assert quiet.getvalue() == ""


def test_dry_run_executes_nothing(monkeypatch):
    # Every way cnikit starts a process is recorded: a dry run must start none.
    started = []
    for name in ("run", "Popen", "call"):
        monkeypatch.setattr(subprocess, name, lambda argv, *a, **kw: started.append(argv))
    for name in ("posix_spawn", "posix_spawnp", "fork", "execv", "execvp", "execvpe", "system"):
        monkeypatch.setattr(os, name, lambda *a, **kw: started.append(a))
    out = io.StringIO()
    r = cnikit.Runner(dry_run=True, out=out)
    cnikit.netns_add(r, "ns1")
    cnikit.veth_add(r, "v0", "eth0", netns="ns1", addr="10.0.0.1/24", peer_addr="10.0.0.2/24")
    cnikit.nat_add(r, "10.0.0.0/24", "v0")
    assert started == []
    assert len(r.commands()) > 5
    assert out.getvalue().splitlines()[2] == "ip link add v0 type veth peer name eth0 netns ns1"
    assert "iptables -w -t nat -A POSTROUTING -m comment --comment 'cnikit nat 10.0.0.0/24' -j CNIKIT-NAT-" \
        in out.getvalue()


def test_usage_errors_are_one_line(capsys):
    assert cnikit.main(["veth"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cnikit: error:")
    assert cnikit.main(["frobnicate"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_help_documents_examples(capsys):
    with pytest.raises(SystemExit) as e:
        cnikit.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for word in ("netns", "veth", "bridge", "nat", "vxlan", "show", "sandbox", "cleanup", "--dry-run", "examples:"):
        assert word in out


def test_no_command_cnikit_runs_goes_through_a_shell():
    # Every verb's plan, kind-install's included: plain argv lists, never `sh -c`.
    r = cnikit.Runner(dry_run=True, out=io.StringIO())
    cnikit.netns_add(r, "ns1", lo_up=True)
    cnikit.veth_add(r, "v0", "eth0", netns="ns1", addr="10.0.0.1/24", peer_addr="10.0.0.2/24", mtu=1400)
    cnikit.bridge_add(r, "br0", addr="10.0.0.1/24")
    cnikit.bridge_attach(r, "br0", ["v0"])
    cnikit.nat_add(r, "10.0.0.0/24", "v0")
    cnikit.vxlan_add(r, "vx0", 42, remote="192.0.2.2", dev="v0", bridge_name="br0")
    cnikit.vxlan_fdb_add(r, "vx0", "02:00:00:00:00:02", "192.0.2.2")
    cnikit.cni_install(r, subnet="10.244.1.0/24")
    cnikit.kind_install(r, "demo")
    assert len(r.commands()) > 40
    for argv in r.commands():
        assert argv[0] not in ("sh", "bash", "/bin/sh") and "-c" not in argv[:3], argv
        if argv[:2] == ["docker", "exec"]:
            assert "sh" not in argv and "bash" not in argv, argv


def test_a_plan_is_typed_records_of_what_it_creates():
    # What rollback, a lesson's --host refusal and its summary read: kinds and names, not argv.
    r = cnikit.Runner(dry_run=True, out=io.StringIO())
    cnikit.netns_add(r, "ns1")
    cnikit.veth_add(r, "v0", "eth0", netns="ns1", mtu=1400)
    cnikit.route_add(r, "192.0.2.0/24", via="10.0.0.2")
    cnikit.cni_install(r, subnet="10.244.1.0/24")
    made = [(c.kind, c.name, c.ns) for c in r.changes() if c.kind != "up"]
    assert made[:3] == [("netns", "ns1", None), ("link", "v0", None), ("link", "eth0", "ns1")]
    assert ("file", "/opt/cni/bin/cnikit", None) in made and ("file", "/etc/cni/net.d/10-cnikit.conflist", None) in made
    assert any(k == "route" and n.startswith("192.0.2.0/24 via 10.0.0.2") for k, n, _ in made)
    assert cnikit.get_link(r, "eth0", "ns1")["mtu"] == 1400 and r.made("up", "v0")
    # A dry run plans; nothing is there to roll back.
    assert r.rollback() == []
    # each link is brought up once in a plan, however often a verb asks
    cnikit.ensure_up(r, "v0")
    assert [a for a in r.commands() if a == ["ip", "link", "set", "dev", "v0", "up"]] == [["ip", "link", "set", "dev", "v0", "up"]]


def test_change_kinds_are_closed():
    with pytest.raises(ValueError):
        cnikit.Change("gadget", "x")


def test_a_plan_checks_its_input_against_what_it_planned():
    # A fresh host's plan (a lesson's, the library's): what it neither planned nor finds is
    # refused with the live run's error, before anything is planned.
    r = cnikit.Runner(dry_run=True, out=io.StringIO())
    for verb, err in [(lambda: cnikit.veth_add(r, "v0", "eth0", netns="ns1"), "namespace 'ns1' does not exist"),
                      (lambda: cnikit.bridge_attach(r, "br0", ["v0"]), "bridge br0 does not exist"),
                      (lambda: cnikit.nat_add(r, "10.0.0.0/24", "up0"), "--out interface up0 does not exist"),
                      (lambda: cnikit.vxlan_add(r, "vx0", 42, dev="up0"), "--dev up0 does not exist")]:
        with pytest.raises(cnikit.UsageError, match=err):
            verb()
    assert r.commands() == [] and r.changes() == []
    cnikit.netns_add(r, "ns1")
    cnikit.veth_add(r, "v0", "eth0", netns="ns1", peer_addr="10.0.0.2/24", mtu=1400)
    cnikit.bridge_add(r, "br0", addr="10.0.0.1/24")
    cnikit.bridge_attach(r, "br0", ["v0"])
    cnikit.vxlan_add(r, "vx0", 42, dev="v0", bridge_name="br0")
    assert cnikit.get_link(r, "v0")["master"] == "br0" and cnikit.get_link(r, "vx0")["mtu"] == 1350
    assert cnikit.link_addrs(r, "eth0", "ns1") == {"10.0.0.2/24"}
    # the same commands again plan nothing more: the plan is what exists by then
    mark = r.mark()
    cnikit.veth_add(r, "v0", "eth0", netns="ns1", peer_addr="10.0.0.2/24", mtu=1400)
    cnikit.bridge_attach(r, "br0", ["v0"])
    assert not r.ran_since(mark)
    cnikit.nat_add(r, "10.0.0.0/24", "br0")
    cnikit.nat_del(r, "10.0.0.0/24")
    assert cnikit._cnikit_rules(r) == [] and cnikit._cnikit_chains(r) == []
    cnikit.netns_del(r, "ns1")
    assert not r.state.netns_exists("ns1") and cnikit.get_link(r, "eth0", "ns1") is None
    with pytest.raises(cnikit.UsageError, match="namespace 'ns1' does not exist"):
        cnikit.netns_exec(r, "ns1", ["true"])


def test_the_clis_plan_is_a_step_of_a_script_and_takes_missing_input_as_made_before():
    out = io.StringIO()
    r = cnikit.Runner(dry_run=True, out=out, plan_for="this host")
    cnikit.veth_add(r, "ckt-absent0", "eth0", netns="cnikit-test-absent")
    assert "# namespace 'cnikit-test-absent' does not exist" in out.getvalue()
    assert ["ip", "link", "add", "ckt-absent0", "type", "veth", "peer", "name", "eth0", "netns", "cnikit-test-absent"] \
        in r.commands()


@pytest.mark.noroot
@pytest.mark.parametrize("word", ["", "a", "it's", "a b", "$x", "é", "x_y-z.1:2,3@4%5+6=7/8", "\n", "*", '"', "\\",
                                  "--comment", "cnikit nat 10.0.0.0/24", "'", "a'b'c", "~root"])
def test_shell_quote_says_what_shlex_quote_says(word):
    assert cnikit.shell_quote(word) == shlex.quote(word)
    assert cnikit.shell_join(["ip", word, "x"]) == shlex.join(["ip", word, "x"])
