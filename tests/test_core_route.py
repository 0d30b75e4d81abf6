"""`cnikit route add/del` against the real kernel, inside the test's sandbox: cnikit's routes
carry protocol 157, a re-run changes nothing, and only cnikit's own routes are ever removed."""
import json

import pytest
import sh

from kernel import cli, routes, snapshot

PROTO = "157"


def run(*args):
    return cli(*args, check=True)


def route_to(dst, ns=None):
    """The routes to DST in NS as `ip -j route` reports them (all protocols)."""
    return [r for r in routes(ns) if r["dst"] == dst]


@pytest.fixture
def ns1():
    """ns1 wired to the sandbox by a veth pair: 10.0.0.1 here, 10.0.0.2 in ns1."""
    run("netns", "add", "ns1", "--lo-up")
    run("veth", "add", "veth-ns1", "eth0", "--netns", "ns1", "--addr", "10.0.0.1/24", "--peer-addr", "10.0.0.2/24")
    return "ns1"


def test_route_add_tags_it_with_protocol_157_and_a_rerun_changes_nothing(ns1):
    run("-n", ns1, "route", "add", "default", "--via", "10.0.0.1")
    run("route", "add", "198.51.100.0/24", "--dev", "veth-ns1")
    (default,) = route_to("default", ns1)
    assert default["gateway"] == "10.0.0.1" and default["protocol"] == PROTO
    (here,) = route_to("198.51.100.0/24")
    assert here["dev"] == "veth-ns1" and here["protocol"] == PROTO
    before = snapshot([ns1])
    again = run("-n", ns1, "route", "add", "default", "--via", "10.0.0.1")
    assert again.stdout.startswith("#") and not [l for l in again.stdout.splitlines() if l.startswith("ip ")]
    assert snapshot([ns1]) == before


def test_a_conflicting_route_is_refused_before_anything_changes(ns1):
    run("-n", ns1, "route", "add", "default", "--via", "10.0.0.1")
    before = snapshot([ns1])
    proc = cli("-n", ns1, "route", "add", "default", "--via", "10.0.0.3")
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1 and "10.0.0.1" in proc.stderr
    assert proc.stdout == ""
    assert snapshot([ns1]) == before


def test_route_del_removes_cnikits_route_and_says_when_there_is_none(ns1):
    run("-n", ns1, "route", "add", "203.0.113.0/24", "--via", "10.0.0.1")
    proc = run("route", "del", "203.0.113.0/24", "-n", ns1)
    assert proc.stdout.splitlines() == ["ip -n ns1 route del 203.0.113.0/24 proto 157"]
    assert route_to("203.0.113.0/24", ns1) == []
    again = run("-n", ns1, "route", "del", "203.0.113.0/24")
    assert "nothing to delete" in again.stdout and "route del" not in again.stdout


def test_route_del_refuses_a_route_cnikit_did_not_make_and_leaves_it(ns1):
    sh.ip("-n", ns1, "route", "add", "192.0.2.0/24", "via", "10.0.0.1")     # another program's (proto boot)
    before = snapshot([ns1])
    proc = cli("-n", ns1, "route", "del", "192.0.2.0/24")
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1 and "not cnikit's" in proc.stderr
    assert proc.stdout == ""
    assert snapshot([ns1]) == before and route_to("192.0.2.0/24", ns1)


@pytest.mark.parametrize("args", [
    ["route", "add", "10.1.0.1/24", "--dev", "veth-ns1"],              # host bits set: not a CIDR
    ["route", "add", "10.1.0/24", "--dev", "veth-ns1"],
    ["route", "add", "10.1.0.0/24", "--dev", "a" * 16],                 # IFNAMSIZ is 16 with its NUL
    ["route", "add", "10.1.0.0/24", "--via", "10.0.0.300"],
    ["route", "add", "10.1.0.0/24"],                                    # neither a gateway nor a device
    ["-n", "nosuch", "route", "add", "10.1.0.0/24", "--via", "10.0.0.1"],
    ["route", "del", "not-a-cidr"],
    ["-n", "nosuch", "route", "del", "10.1.0.0/24"],
])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(ns1, args):
    before = snapshot([ns1])
    # A dry run plans for a host where -n's namespace exists by then: only a real run checks it.
    for dry in ([], ["--dry-run"]) if "nosuch" not in args else ([],):
        proc = cli(*dry, *args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("cnikit: error: "), proc.stderr
        assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert snapshot([ns1]) == before


def test_dry_run_prints_the_exact_lines_and_changes_nothing(ns1):
    before = snapshot([ns1])
    add = run("--dry-run", "-n", ns1, "route", "add", "default", "--via", "10.0.0.1")
    assert add.stdout.splitlines() == ["ip -n ns1 route add default via 10.0.0.1 proto 157"]
    dev = run("route", "add", "198.51.100.0/24", "--dev", "veth-ns1", "--dry-run")
    assert dev.stdout.splitlines() == ["ip route add 198.51.100.0/24 dev veth-ns1 proto 157"]
    # a dry run plans against this host: no such route here, nothing to delete
    delete = run("--dry-run", "route", "del", "198.51.100.0/24")
    assert [line for line in delete.stdout.splitlines() if not line.startswith("#")] == []
    assert snapshot([ns1]) == before
    # the printed lines are the commands: run by a shell they make and remove the route
    sh.sh("-e", "-c", add.stdout)
    assert route_to("default", ns1)[0]["protocol"] == PROTO
    delete = run("--dry-run", "-n", ns1, "route", "del", "default")
    assert delete.stdout.splitlines() == ["ip -n ns1 route del default proto 157"]
    sh.sh("-e", "-c", delete.stdout)
    assert route_to("default", ns1) == []


def test_cleanup_removes_cnikits_routes_and_leaves_other_routes():
    sh.ip("link", "add", "keep0", "type", "bridge")       # not cnikit's: cleanup leaves it, and its routes
    sh.ip("link", "set", "keep0", "up")
    sh.ip("route", "add", "192.0.2.0/24", "dev", "keep0")
    run("route", "add", "198.51.100.0/24", "--dev", "keep0")
    assert route_to("198.51.100.0/24")[0]["protocol"] == PROTO
    proc = run("cleanup")
    assert "ip route del 198.51.100.0/24 proto 157" in proc.stdout.splitlines()
    assert route_to("198.51.100.0/24") == []
    (foreign,) = route_to("192.0.2.0/24")
    assert foreign["dev"] == "keep0" and foreign.get("protocol") != PROTO


def test_an_ipv6_route_is_found_again_on_a_rerun_and_deleted(ns1):
    sh.ip("-n", ns1, "-6", "addr", "add", "2001:db8::2/64", "dev", "eth0", "nodad")
    run("-n", ns1, "route", "add", "2001:db8:1::/64", "--via", "2001:db8::1")
    v6 = lambda: [r for r in json.loads(str(sh.ip("-n", ns1, "-6", "-j", "route", "show"))) if r["dst"] == "2001:db8:1::/64"]
    assert [r["protocol"] for r in v6()] == [PROTO]
    again = run("-n", ns1, "route", "add", "2001:db8:1::/64", "--via", "2001:db8::1")
    assert not [l for l in again.stdout.splitlines() if l.startswith("ip ")] and len(v6()) == 1
    assert run("-n", ns1, "route", "del", "2001:db8:1::/64").stdout.splitlines() == \
        ["ip -n ns1 -6 route del 2001:db8:1::/64 proto 157"]
    assert v6() == []


def test_cleanup_removes_cnikits_ipv6_routes_too(ns1):
    sh.ip("-n", ns1, "-6", "addr", "add", "2001:db8::2/64", "dev", "eth0", "nodad")
    sh.ip("-n", ns1, "-6", "route", "add", "2001:db8:2::/64", "via", "2001:db8::1")      # not cnikit's
    run("-n", ns1, "route", "add", "2001:db8:1::/64", "--via", "2001:db8::1")
    v6 = lambda: {r["dst"]: r.get("protocol") for r in json.loads(str(sh.ip("-n", ns1, "-6", "-j", "route", "show")))}
    assert v6()["2001:db8:1::/64"] == PROTO
    proc = run("-n", ns1, "cleanup")
    assert "ip -n ns1 -6 route del 2001:db8:1::/64 proto 157" in proc.stdout.splitlines()
    assert "2001:db8:1::/64" not in v6() and v6()["2001:db8:2::/64"] != PROTO
