"""`cnikit doctor` on IPv6 paths (issue #20).

Raw-built with `ip` in this test's sandbox: pod1 on a bridge in node1 (fd94:1::/64, its
gateway the bridge's link-local fe80::1, as IPv6 gateways often are), pod2 behind a veth of
node1 (fd94:2::/64); node1 routes between the two. Each IPv6 break that doctor knows for
IPv4 is made by hand (a missing route, forwarding off, an ip6tables drop, a neighbour entry
at a MAC nobody has, neighbour discovery blocked); doctor names it at the right hop and
changes nothing (IPv6 addresses, routes, neighbours, ip6tables, forwarding sysctls and
conntrack compared before and after), and its printed fix really fixes the path (ping -6).
"""
import json
import re
import subprocess

import pytest
import sh

from kernel import changes, cli, command_output, ping

BRIDGE_MAC = "02:00:00:00:94:01"       # a MAC of its own: a wrong neighbour entry's fix is only to drop it
NOBODY_MAC = "02:00:00:00:99:99"
POD2 = "fd94:2::2"
FORWARDING = re.compile(r"^net\.ipv6\.conf\.\S+\.(force_)?forwarding = ")
MULTICAST6 = re.compile(r"\bdst=ff[0-9a-f]{2}:")


def ns_ip(ns, *args):
    command_output("ip", "-n", ns, *args)


def in_ns(ns, *argv):
    command_output("ip", "netns", "exec", ns, *argv)


@pytest.fixture
def net():
    """pod1 -- br0 [node1] veth-pod2 -- pod2, IPv6 only, without DAD so nothing waits, and
    without router solicitations: node1, a router, would learn the pods' link-local
    addresses from them on the kernel's timers, a change to the neighbours nobody made."""
    for ns in ("node1", "pod1", "pod2"):
        sh.ip("netns", "add", ns)
        in_ns(ns, "sysctl", "-qw", *(f"net.ipv6.conf.{c}.{k}=0" for c in ("all", "default")
                                     for k in ("accept_dad", "router_solicitations")))
        ns_ip(ns, "link", "set", "lo", "up")
    ns_ip("node1", "link", "add", "br0", "address", BRIDGE_MAC, "type", "bridge")
    ns_ip("node1", "link", "set", "br0", "addrgenmode", "none")       # fe80::1 its only link-local address
    ns_ip("node1", "addr", "add", "fd94:1::1/64", "dev", "br0", "nodad")
    ns_ip("node1", "addr", "add", "fe80::1/64", "dev", "br0", "nodad")
    ns_ip("node1", "link", "set", "br0", "up")
    ns_ip("node1", "link", "add", "veth-pod1", "type", "veth", "peer", "name", "eth0", "netns", "pod1")
    ns_ip("node1", "link", "set", "veth-pod1", "master", "br0", "up")
    ns_ip("pod1", "addr", "add", "fd94:1::2/64", "dev", "eth0", "nodad")
    ns_ip("pod1", "link", "set", "eth0", "up")
    ns_ip("pod1", "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0")
    ns_ip("node1", "link", "add", "veth-pod2", "type", "veth", "peer", "name", "eth0", "netns", "pod2")
    ns_ip("node1", "addr", "add", "fd94:2::1/64", "dev", "veth-pod2", "nodad")
    ns_ip("node1", "link", "set", "veth-pod2", "up")
    ns_ip("pod2", "addr", "add", f"{POD2}/64", "dev", "eth0", "nodad")
    ns_ip("pod2", "link", "set", "eth0", "up")
    ns_ip("pod2", "-6", "route", "add", "default", "via", "fd94:2::1")
    in_ns("node1", "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")


def doctor(*args):
    """`cnikit doctor ARGS --json`: (exit code, report or None, stderr)."""
    proc = cli("doctor", *args, "--json")
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else None, proc.stderr


def _out(argv):
    return subprocess.run(argv, capture_output=True, text=True).stdout


def _save(argv):
    """An ip6tables-save without counters and comments."""
    return re.sub(r"\[\d+:\d+\]|^#.*$", "", _out(argv), flags=re.M)


def kernel_state6():
    """What doctor could change on an IPv6 path, in every namespace: links, IPv6 addresses
    and routes, IPv6 neighbours (address, MAC, device; not the NUD state, which ages by
    itself), ip6tables of both backends, the forwarding sysctls, IPv6 conntrack flows
    (their tuples; the kernel's own multicast left out)."""
    state = {}
    names = [n["name"] for n in json.loads(_out(["ip", "-j", "netns", "list"]) or "[]")]
    for ns in [None] + sorted(names):
        ip_ = ["ip", *(["-n", ns] if ns else []), "-j"]
        pre = ["ip", "netns", "exec", ns] if ns else []
        state[ns or "host"] = {
            "links": sorted((l["ifname"], tuple(l.get("flags", [])), l.get("mtu"), l.get("master"), l.get("address"))
                            for l in json.loads(_out(ip_ + ["link", "show"]) or "[]")),
            "addrs": sorted((l["ifname"], a["local"], a["prefixlen"]) for l in json.loads(_out(ip_ + ["-6", "addr"]))
                            for a in l.get("addr_info", [])),
            "routes": _out(ip_[:-1] + ["-6", "route", "show", "table", "all"]),
            "neigh": {(n.get("dst"), n.get("lladdr"), n.get("dev"))
                      for n in json.loads(_out(ip_ + ["-6", "neigh", "show"]) or "[]")},
            "ip6tables": _save(pre + ["ip6tables-save"]),
            "ip6tables-legacy": _save(pre + ["ip6tables-legacy-save"]),
            "x_tables": _out(pre + ["cat", "/proc/net/ip6_tables_names"]),
            "sysctls": sorted(l for l in _out(pre + ["sysctl", "-a"]).splitlines() if FORWARDING.match(l)),
            "conntrack": {(l.split()[0],) + tuple(re.findall(r"\b(?:src|dst|sport|dport|type|code|id)=\S+", l))
                          for l in _out(pre + ["conntrack", "-L", "-f", "ipv6"]).splitlines()
                          if "src=" in l and not MULTICAST6.search(l)},
        }
    return state




def read_only_doctor(*args):
    """doctor ARGS, with proof that it changed nothing."""
    before = kernel_state6()
    result = doctor(*args)
    assert not changes(before, kernel_state6()), "doctor changed the kernel's state"
    return result


def test_changes_sees_what_doctor_could_do_and_not_what_ages_by_itself():
    before = {"pod1": {"routes": "a", "neigh": {("fe80::1", "aa", "eth0")}, "conntrack": set()}}
    assert changes(before, {"pod1": {"routes": "a", "neigh": set(), "conntrack": set()}}) == []
    moved = {"pod1": {"routes": "a", "neigh": {("fe80::1", "bb", "eth0")}, "conntrack": set()}}
    assert [c.split(":")[0] for c in changes(before, moved)] == ["pod1 neigh"]
    assert changes(before, {"pod1": dict(before["pod1"], routes="b")}) == ["pod1 routes: 'a' -> 'b'"]


def test_healthy_ipv6_path_through_a_link_local_gateway(net):
    code, report, err = read_only_doctor("pod1", "pod2", "-6")
    assert code == 0, (report or {}).get("broken") or err
    assert report["dst"] == POD2 and report["src"] == "fd94:1::2"
    assert [(h["ns"], h.get("in"), h.get("out"), h.get("via")) for h in report["hops"]] == [
        ("pod1", None, "eth0", "fe80::1"), ("node1", "br0", "veth-pod2", POD2), ("pod2", "eth0", None, None)]
    assert report["hops"][0]["l2"] == ["bridge br0 in node1"]
    # the way back, to an address: the family is the address's, no -6 needed
    code, report, _ = read_only_doctor("pod2", "fd94:1::2")
    assert code == 0 and [h["ns"] for h in report["hops"]] == ["pod2", "node1", "pod1"], report["broken"]
    assert ping(POD2, ns="pod1") and ping("fd94:1::2", ns="pod2")
    # a dry run of doctor reads just the same
    text = cli("doctor", "-6", "pod1", "pod2")
    assert text.returncode == 0 and "\nHEALTHY: pod1 reaches fd94:2::2" in text.stdout, text.stdout
    assert cli("--dry-run", "doctor", "-6", "pod1", "pod2").stdout == text.stdout


# (what breaks, by hand) -> the cause doctor names, where, and words of what it says
BREAKS = {
    "pod-route": ([["ip", "-n", "pod1", "-6", "route", "del", "default"]],
                  "no-route", "pod1", "pod1 has no route to fd94:2::2"),
    "forwarding": ([["ip", "netns", "exec", "node1", "sysctl", "-qw", "net.ipv6.conf.all.forwarding=0"]],
                   "ip-forward", "node1", "forwarding is off (net.ipv6.conf.all.forwarding=0)"),
    "forward-policy": ([["ip", "netns", "exec", "node1", "ip6tables", "-P", "FORWARD", "DROP"]],
                       "forward-drop", "node1", "ip6tables FORWARD in node1 has policy DROP"),
    "forward-rule": ([["ip", "netns", "exec", "node1", "ip6tables", "-A", "FORWARD", "-d", "fd94:2::/64",
                       "-j", "DROP"]],
                     "forward-drop", "node1", "rule `-d fd94:2::/64 -j DROP`"),
    "input-rule": ([["ip", "netns", "exec", "pod2", "ip6tables", "-A", "INPUT", "-s", "fd94:1::/64", "-p", "icmpv6",
                     "-j", "DROP"]],
                   "input-drop", "pod2", "rule `-s fd94:1::/64 -p ipv6-icmp -j DROP`"),
    "neighbour-mac": ([["ip", "-n", "pod1", "-6", "neigh", "replace", "fe80::1", "lladdr", NOBODY_MAC, "dev", "eth0",
                        "nud", "permanent"]],
                      "neighbour", "pod1", f"fe80::1 is at {NOBODY_MAC} (PERMANENT)"),
    "neighbour-stale": ([["ip", "-n", "node1", "-6", "neigh", "replace", POD2, "lladdr", NOBODY_MAC, "dev", "veth-pod2",
                          "nud", "stale"]],
                        "neighbour", "node1", f"fd94:2::2 is at {NOBODY_MAC} (STALE)"),
    "ndp-blocked": ([["ip", "netns", "exec", "pod2", "ip6tables", "-A", "INPUT", "-p", "icmpv6", "--icmpv6-type",
                      "neighbour-solicitation", "-j", "DROP"]],
                    "neighbour", "pod2", "neighbour solicitations (ICMPv6 135) node1 sends to learn fd94:2::2's MAC"),
    "arp-off": ([["ip", "-n", "pod2", "link", "set", "dev", "eth0", "arp", "off"]],
                "neighbour", "pod2", "eth0 in pod2 has ARP off (NOARP: no neighbour discovery either)"),
    "return-route": ([["ip", "-n", "pod2", "-6", "route", "del", "default"]],
                     "no-return-route", "pod2", "has no route back to it"),
}


@pytest.mark.parametrize("name", sorted(BREAKS))
def test_each_ipv6_break_is_named_at_its_hop_read_only_and_its_fix_fixes_it(net, name):
    argvs, cause, hop, words = BREAKS[name]
    for argv in argvs:
        subprocess.run(argv, check=True)
    code, report, err = read_only_doctor("pod1", "pod2", "-6")
    assert code == 1, report or err
    broken = report["broken"]
    assert (broken["cause"], broken["hop"]) == (cause, hop), broken
    assert words in broken["what"], broken["what"]
    assert broken["see"] and broken["fix"] and not any("GATEWAY" in line for line in broken["fix"]), broken
    assert not ping(POD2, ns="pod1"), "the break is not one: pod1 still reaches pod2"
    for line in broken["fix"]:
        subprocess.run(line, shell=True, check=True)
    code, report, _ = doctor("pod1", "pod2", "-6")
    assert code == 0, report["broken"]
    if name == "forward-policy":
        # doctor walks one way: the replies cross node1's FORWARD too, and the policy drops them
        code, report, _ = doctor("pod2", "pod1", "-6")
        assert code == 1 and report["broken"]["cause"] == "forward-drop", report
        for line in report["broken"]["fix"]:
            subprocess.run(line, shell=True, check=True)
    assert ping(POD2, ns="pod1")


def test_a_drop_in_the_other_ip6tables_backend(net):
    """ip6tables-legacy's x_tables beside ip6tables-nft: its DROP applies, `ip6tables` does not
    show it. The fix moves it where `ip6tables` shows it, and there doctor names it again."""
    other = "ip6tables-legacy" if "nf_tables" in _out(["ip6tables", "-V"]) else "ip6tables-nft"
    in_ns("node1", other, "-P", "FORWARD", "DROP")
    code, report, _ = read_only_doctor("pod1", "pod2", "-6")
    assert code == 1 and (report["broken"]["cause"], report["broken"]["hop"]) == ("other-backend", "node1"), report
    assert f"`ip6tables` shows none of it: {other}" in report["broken"]["what"]
    assert not ping(POD2, ns="pod1")
    for line in report["broken"]["fix"]:
        subprocess.run(line, shell=True, check=True)
    code, report, _ = doctor("pod1", "pod2", "-6")
    assert code == 1 and report["broken"]["cause"] == "forward-drop", report["broken"]


def test_reverse_path_filter_is_ip6tables_rpfilter_not_the_ipv4_sysctl(net):
    """node1's route back to pod1 leaves through veth-pod2. IPv4's rp_filter does not apply
    to IPv6; a raw `-m rpfilter --invert -j DROP` does, and drops pod1's packets for real
    (its counter); its loose form, the fix, lets them through."""
    ns_ip("node1", "-6", "route", "add", "fd94:1::2/128", "via", POD2, "dev", "veth-pod2")
    in_ns("node1", "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=1", "net.ipv4.conf.br0.rp_filter=1")
    assert doctor("pod1", "pod2", "-6")[0] == 0
    in_ns("node1", "ip6tables", "-t", "raw", "-A", "PREROUTING", "-m", "rpfilter", "--invert", "-j", "DROP")
    code, report, _ = read_only_doctor("pod1", "pod2", "-6")
    assert code == 1 and (report["broken"]["cause"], report["broken"]["hop"]) == ("rp-filter", "node1"), report
    assert "the route back to it leaves through veth-pod2" in report["broken"]["what"]
    ping(POD2, ns="pod1")
    saved = _out(["ip", "netns", "exec", "node1", "ip6tables-save", "-c", "-t", "raw"])
    assert int(re.search(r"^\[(\d+):\d+\] -A PREROUTING -m rpfilter", saved, re.M)[1]) > 0, saved
    for line in report["broken"]["fix"]:
        subprocess.run(line, shell=True, check=True)
    assert "--loose" in _out(["ip", "netns", "exec", "node1", "ip6tables", "-t", "raw", "-S", "PREROUTING"])
    assert doctor("pod1", "pod2", "-6")[0] == 0


def test_fixes_speak_ipv6(net):
    """Routes and neighbours shown and fixed with ip -6; filters with ip6tables."""
    ns_ip("pod1", "-6", "route", "del", "default")
    _, report, _ = doctor("pod1", "pod2", "-6")
    assert report["broken"]["see"] == ["ip -n pod1 -6 route show"]
    assert report["broken"]["fix"] == ["ip -n pod1 -6 route add default via fd94:1::1"]
    ns_ip("pod1", "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0")
    ns_ip("pod1", "-6", "neigh", "replace", "fe80::1", "lladdr", NOBODY_MAC, "dev", "eth0", "nud", "stale")
    _, report, _ = doctor("pod1", "pod2", "-6")
    assert report["broken"]["fix"] == ["ip -n pod1 -6 neigh del fe80::1 dev eth0"]     # br0 keeps its MAC
    ns_ip("pod1", "-6", "neigh", "del", "fe80::1", "dev", "eth0")
    in_ns("node1", "ip6tables", "-P", "FORWARD", "DROP")
    text = cli("doctor", "pod1", POD2).stdout
    assert "BROKEN at node1: forward-drop" in text
    assert "  fix:  ip netns exec node1 ip6tables -w -I FORWARD -i br0 -o veth-pod2 -d fd94:2::2 -j ACCEPT" in text
    in_ns("node1", "ip6tables", "-P", "FORWARD", "ACCEPT")
    in_ns("node1", "sysctl", "-qw", "net.ipv6.conf.all.forwarding=0")
    text = cli("doctor", "pod1", POD2).stdout
    assert "  see:  ip netns exec node1 sysctl net.ipv6.conf.all.forwarding net.ipv6.conf.br0.forwarding" in text
    assert "  fix:  ip netns exec node1 sysctl -w net.ipv6.conf.all.forwarding=1" in text


def test_from_an_address_its_namespace_and_that_source(net):
    """FROM may be an address: the walk starts in the namespace that has it, from it, and
    the address sets the family (TO a name needs no -6)."""
    ns_ip("pod1", "addr", "add", "fd94:1::3/64", "dev", "eth0", "nodad")
    code, report, _ = read_only_doctor("fd94:1::3", "pod2")
    assert code == 0, report["broken"]
    assert (report["from"], report["src"], report["dst"]) == ("fd94:1::3", "fd94:1::3", POD2)
    assert [h["ns"] for h in report["hops"]] == ["pod1", "node1", "pod2"]
    # pod2 routes back only to pod1's first address: the second's replies are lost
    ns_ip("pod2", "-6", "route", "del", "default")
    ns_ip("pod2", "-6", "route", "add", "fd94:1::2/128", "via", "fd94:2::1")
    assert doctor("fd94:1::2", "pod2")[0] == 0
    code, report, _ = doctor("fd94:1::3", "pod2")
    assert code == 1 and (report["broken"]["cause"], report["broken"]["hop"]) == ("no-return-route", "pod2")

    def ping_from(src):
        return subprocess.run(["ip", "netns", "exec", "pod1", "ping", "-c1", "-W2", "-I", src, POD2],
                              capture_output=True).returncode == 0
    assert ping_from("fd94:1::2") and not ping_from("fd94:1::3")


def test_per_link_forwarding_off_is_not_a_break_but_all_is(net):
    """IPv6 forwards by net.ipv6.conf.all.forwarding alone: a link's own forwarding=0 only
    makes it a host in neighbour discovery. Doctor says what the kernel does."""
    in_ns("node1", "sysctl", "-qw", "net.ipv6.conf.br0.forwarding=0", "net.ipv6.conf.veth-pod2.forwarding=0")
    assert doctor("pod1", "pod2", "-6")[0] == 0
    assert ping(POD2, ns="pod1")


def test_a_firewall_that_lets_ndp_and_echo_through(net):
    """pod2 drops all input but neighbour discovery (at hop limit 255, as firewalls accept it)
    and pings: nothing on the path drops the ping; without its echo rule, INPUT does."""
    for rule in (["-p", "ipv6-icmp", "-m", "icmp6", "--icmpv6-type", "neighbour-solicitation", "-m", "hl",
                  "--hl-eq", "255", "-j", "ACCEPT"],
                 ["-p", "ipv6-icmp", "-m", "icmp6", "--icmpv6-type", "neighbour-advertisement", "-m", "hl",
                  "--hl-eq", "255", "-j", "ACCEPT"],
                 ["-p", "ipv6-icmp", "-m", "icmp6", "--icmpv6-type", "echo-request", "-j", "ACCEPT"]):
        in_ns("pod2", "ip6tables", "-A", "INPUT", *rule)
    in_ns("pod2", "ip6tables", "-P", "INPUT", "DROP")
    code, report, _ = read_only_doctor("pod1", "pod2", "-6")
    assert code == 0, report["broken"]
    assert ping(POD2, ns="pod1")
    in_ns("pod2", "ip6tables", "-D", "INPUT", "3")
    code, report, _ = read_only_doctor("pod1", "pod2", "-6")
    assert code == 1 and (report["broken"]["cause"], report["broken"]["hop"]) == ("input-drop", "pod2"), report
    assert not ping(POD2, ns="pod1")


def test_a_router_without_a_route_onwards(net):
    """pod1's default route leads to node1, which knows no way to 2001:db8:99::/64."""
    code, report, _ = read_only_doctor("pod1", "2001:db8:99::1")
    assert code == 1 and report["broken"]["cause"] == "no-route" and report["broken"]["hop"] == "node1"
    assert report["broken"]["see"] == ["ip -n node1 -6 route get 2001:db8:99::1 from fd94:1::2 iif br0"]


def test_masquerade_and_dnat_in_ip6tables(net):
    """node1's ip6tables NAT: pod2 without a way back sees node1's address; a DNAT on
    node1's address leads to pod2."""
    ns_ip("pod2", "-6", "route", "del", "default")
    in_ns("node1", "ip6tables", "-t", "nat", "-A", "POSTROUTING", "-s", "fd94:1::/64", "-o", "veth-pod2",
          "-j", "MASQUERADE")
    code, report, _ = read_only_doctor("pod1", "pod2", "-6")
    assert code == 0, report["broken"]
    assert report["hops"][1]["nat"]["to"] == "fd94:2::1"
    in_ns("node1", "ip6tables", "-t", "nat", "-A", "PREROUTING", "-d", "fd94:1::1", "-p", "tcp", "--dport", "80",
          "-j", "DNAT", "--to-destination", f"[{POD2}]:8080")
    code, report, _ = read_only_doctor("pod1", "fd94:1::1", "--port", "80")
    assert code == 0, report["broken"]
    assert report["hops"][1]["dnat"] == {"from": "fd94:1::1", "to": POD2} and report["hops"][-1]["ns"] == "pod2"


@pytest.mark.parametrize("args,message", [
    (("pod1", "192.0.2.1", "-6"), "TO 192.0.2.1 is an IPv4 address, but -6 asks for IPv6"),
    (("pod1", POD2, "-4"), "TO fd94:2::2 is an IPv6 address, but -4 asks for IPv4"),
    (("pod1", "fe80::1"), "TO fe80::1 is valid on one link only"),
    (("pod1", "fd94:2::2%eth0"), "valid on one link only"),
    (("pod1", "pod2"), "namespace pod2 has no IPv4 address on an up interface"),
    (("pod1", "pod2", "-4", "-6"), "-6"),
    (("pod1", "node2", "-6"), "TO 'node2' is neither an IPv4 or IPv6 address nor an existing namespace"),
    (("fd94:1::2", "192.0.2.1"), "TO 192.0.2.1 is an IPv4 address, but FROM fd94:1::2 is IPv6"),
    (("fd94:1::2", "pod2", "-4"), "FROM fd94:1::2 is an IPv6 address, but -4 asks for IPv4"),
    (("fd94:9::2", "pod2"), "FROM fd94:9::2: no namespace doctor can see has this address"),
])
def test_bad_family_input_is_one_line_and_exit_2(net, args, message):
    proc = cli("doctor", *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_a_namespace_without_a_global_ipv6_address_is_exit_2(net):
    """Link-local addresses do not count: they name no host beyond its link."""
    ns_ip("pod2", "addr", "del", f"{POD2}/64", "dev", "eth0")
    proc = cli("doctor", "-6", "pod1", "pod2")
    assert proc.returncode == 2 and "pod2 has no global IPv6 address" in proc.stderr, proc.stderr


# ---------------------------------------------------------------- the pure parts, in IPv6's words

@pytest.mark.noroot
@pytest.mark.parametrize("rule,pkt,matches", [
    (["-s", "fd94:1::/64", "-p", "ipv6-icmp", "-j", "DROP"], {"src": "fd94:1::2", "proto": "ipv6-icmp"}, True),
    (["-s", "fd94:1::/64", "-j", "DROP"], {"src": "10.0.0.1"}, False),             # the other family
    (["-p", "icmpv6", "-j", "DROP"], {"proto": "ipv6-icmp"}, True),
    (["-p", "58", "-j", "DROP"], {"proto": "ipv6-icmp"}, True),
    (["-p", "ipv6-icmp", "-m", "icmp6", "--icmpv6-type", "135", "-j", "DROP"], {"proto": "ipv6-icmp"}, False),
    (["-p", "ipv6-icmp", "-m", "icmp6", "--icmpv6-type", "135", "-j", "DROP"],
     {"proto": "ipv6-icmp", "icmp_type": "135"}, True),
    (["-p", "ipv6-icmp", "-m", "icmp6", "--icmpv6-type", "echo-request", "-j", "ACCEPT"], {"proto": "ipv6-icmp"},
     True),
    (["-m", "hl", "--hl-eq", "255", "-j", "ACCEPT"], {"hl": 255}, True),
    (["-m", "hl", "--hl-eq", "255", "-j", "ACCEPT"], {}, False),                     # a hop limit doctor cannot know
    (["-m", "conntrack", "--ctstate", "NEW", "-j", "ACCEPT"], {"ctstate": "UNTRACKED"}, False),
])
def test_rule_matcher_in_ipv6_words(rule, pkt, matches):
    import cnikit
    assert cnikit._rule_matches(rule, pkt)[0] is matches


@pytest.mark.noroot
@pytest.mark.parametrize("target,address", [
    (["DNAT", "--to-destination", "[fd94::2]:8080"], "fd94::2"),
    (["DNAT", "--to-destination", "fd94::2"], "fd94::2"),
    (["DNAT", "--to-destination", "fd94::2-fd94::5"], "fd94::2"),
    (["DNAT", "--to-destination", "[fd94::2-fd94::5]:80-90"], "fd94::2"),
    (["DNAT", "--to-destination", "10.0.0.2:80"], "10.0.0.2"),
    (["SNAT", "--to-source", "10.0.0.2"], "10.0.0.2"),
])
def test_nat_target_addresses_of_both_families(target, address):
    import cnikit
    assert cnikit._to_address(target) == address
