"""Each verb against the real kernel, inside the test's sandbox."""
import json
import os
import subprocess
import time

import pytest
import sh

import cnikit

from kernel import CLI, addrs, cli, cli_as_nobody, cli_env, iptables_rules, links, netns_list, ping, snapshot


def run(*args):
    return cli(*args, check=True)


def pair(ns, host_end, addr=None, peer_addr=None, host=None):
    run(*(["-n", host] if host else []), "veth", "add", host_end, "eth0", "--netns", ns,
        *(["--addr", addr] if addr else []), *(["--peer-addr", peer_addr] if peer_addr else []))


def test_netns_add_list_lo_del():
    proc = run("netns", "add", "ns1")
    assert proc.stdout.splitlines()[:2] == ["ip netns add ns1", "ip -n ns1 link set dev lo alias cnikit"]
    assert netns_list() == ["ns1"]
    lo = links("ns1")["lo"]
    assert "UP" not in lo["flags"] and lo["ifalias"] == "cnikit"
    assert list(links("ns1")) == ["lo"]
    assert "already exists" in run("netns", "add", "ns1").stdout
    assert "ns1" in run("netns", "list").stdout
    run("netns", "lo", "ns1")
    assert "UP" in links("ns1")["lo"]["flags"]
    assert ping("127.0.0.1", ns="ns1")
    assert run("netns", "exec", "ns1", "--", "ip", "-br", "link").returncode == 0
    run("netns", "del", "ns1")
    assert netns_list() == []
    again = run("netns", "del", "ns1")
    assert again.returncode == 0 and "does not exist" in again.stdout


def test_veth_pair_carries_a_ping_both_ways_and_reruns_are_noops():
    run("netns", "add", "ns1", "--lo-up")
    pair("ns1", "veth-ns1", "10.0.0.1/24", "10.0.0.2/24")
    host_end, peer = links()["veth-ns1"], links("ns1")["eth0"]
    assert host_end["linkinfo"]["info_kind"] == "veth" and "UP" in host_end["flags"] and "UP" in peer["flags"]
    assert addrs("veth-ns1") == ["10.0.0.1/24"] and addrs("eth0", "ns1") == ["10.0.0.2/24"]
    assert ping("10.0.0.2") and ping("10.0.0.1", ns="ns1")
    again = run("veth", "add", "veth-ns1", "eth0", "--netns", "ns1", "--addr", "10.0.0.1/24",
                "--peer-addr", "10.0.0.2/24")
    assert "nothing to do" in again.stdout and "ip link add" not in again.stdout
    conflict = cli("veth", "add", "veth-ns1", "eth9", "--netns", "ns1")
    assert conflict.returncode == 2 and "peer is not eth9" in conflict.stderr
    run("veth", "del", "veth-ns1")
    assert "veth-ns1" not in links() and "eth0" not in links("ns1")
    assert "does not exist" in run("veth", "del", "veth-ns1").stdout


def test_veth_mtu_applies_to_both_ends():
    run("netns", "add", "ns1")
    run("veth", "add", "v0", "eth0", "--netns", "ns1", "--mtu", "1400")
    assert links()["v0"]["mtu"] == 1400 and links("ns1")["eth0"]["mtu"] == 1400


def test_bridge_joins_two_namespaces_and_learns_their_macs():
    run("bridge", "add", "br0", "--addr", "10.0.0.1/24")
    for i in (1, 2):
        run("netns", "add", f"ns{i}", "--lo-up")
        pair(f"ns{i}", f"veth-ns{i}", peer_addr=f"10.0.0.{i + 1}/24")
    run("bridge", "attach", "br0", "veth-ns1", "veth-ns2")
    assert links()["veth-ns1"]["master"] == "br0" and links()["veth-ns2"]["master"] == "br0"
    assert addrs("br0") == ["10.0.0.1/24"]
    assert ping("10.0.0.3", ns="ns1") and ping("10.0.0.2", ns="ns2") and ping("10.0.0.2") and ping("10.0.0.3")
    shown = run("bridge", "show", "br0").stdout
    mac1 = links("ns1")["eth0"]["address"]
    assert "bridge fdb show br br0" in shown and f"{mac1} dev veth-ns1 master br0" in shown
    assert "already a port of br0" in run("bridge", "attach", "br0", "veth-ns1").stdout
    assert "nothing to do" in run("bridge", "add", "br0", "--addr", "10.0.0.1/24").stdout
    wrong = cli("veth", "del", "br0")
    assert wrong.returncode == 2 and "not a veth" in wrong.stderr and "br0" in links()
    run("bridge", "del", "br0")
    assert "br0" not in links()


def test_vxlan_overlay_between_two_host_namespaces_carries_a_ping():
    # Two "hosts" on an underlay veth (MTU 1400), each with br0 + vxlan0 + a pod.
    run("netns", "add", "host1", "--lo-up")
    run("netns", "add", "host2", "--lo-up")
    run("-n", "host1", "veth", "add", "under1", "under2", "--netns", "host2", "--mtu", "1400",
        "--addr", "192.0.2.1/24", "--peer-addr", "192.0.2.2/24")
    for h, peer, pod_ip in (("host1", "192.0.2.2", "10.10.0.1/24"), ("host2", "192.0.2.1", "10.10.0.2/24")):
        run("netns", "add", f"pod-{h}", "--lo-up")
        run("-n", h, "bridge", "add", "br0")
        run("-n", h, "veth", "add", "veth-pod", "eth0", "--netns", f"pod-{h}", "--peer-addr", pod_ip)
        run("-n", h, "bridge", "attach", "br0", "veth-pod")
        dev = "under1" if h == "host1" else "under2"
        run("-n", h, "vxlan", "add", "vxlan0", "--id", "42", "--remote", peer, "--dev", dev, "--bridge", "br0")
    vx = links("host1")["vxlan0"]
    assert vx["mtu"] == 1400 - 50
    assert vx["master"] == "br0" and vx["linkinfo"]["info_data"]["id"] == 42
    assert vx["linkinfo"]["info_data"]["port"] == 4789
    assert ping("10.10.0.2", ns="pod-host1", count=2)
    tx = json.loads(str(sh.ip("-n", "host1", "-s", "-j", "link", "show", "vxlan0")))[0]["stats64"]["tx"]["packets"]
    assert tx > 0
    assert "already exists" in run("-n", "host1", "vxlan", "add", "vxlan0", "--id", "42",
                                   "--remote", "192.0.2.2").stdout
    assert cli("-n", "host1", "vxlan", "add", "vxlan0", "--id", "43", "--remote", "192.0.2.2").returncode == 2
    run("-n", "host1", "vxlan", "del", "vxlan0")
    assert "vxlan0" not in links("host1")


def test_vxlan_fdb_entries_for_a_remote_less_device():
    run("netns", "add", "h1")
    run("-n", "h1", "veth", "add", "u1", "u2", "--addr", "198.51.100.1/24")
    run("-n", "h1", "vxlan", "add", "vx0", "--id", "7", "--dev", "u1", "--mtu", "1400")
    run("-n", "h1", "vxlan", "fdb", "add", "vx0", "00:00:00:00:00:00", "--dst", "198.51.100.2")
    run("-n", "h1", "vxlan", "fdb", "add", "vx0", "02:00:00:00:00:02", "--dst", "198.51.100.2")
    fdb = json.loads(str(sh.bridge("-n", "h1", "-j", "fdb", "show", "dev", "vx0")))
    assert {("00:00:00:00:00:00", "198.51.100.2"), ("02:00:00:00:00:02", "198.51.100.2")} <= \
        {(e["mac"], e.get("dst")) for e in fdb}
    assert "already present" in run("-n", "h1", "vxlan", "fdb", "add", "vx0", "02:00:00:00:00:02",
                                    "--dst", "198.51.100.2").stdout
    assert links("h1")["vx0"]["mtu"] == 1400


def test_nat_lets_a_namespace_reach_the_internet_namespace_masqueraded():
    # ns1 (10.0.0.2) -> br0 (10.0.0.1) -> this "host" -> uplink 203.0.113.1 -> inet (203.0.113.10)
    run("bridge", "add", "br0", "--addr", "10.0.0.1/24")
    run("netns", "add", "ns1", "--lo-up")
    pair("ns1", "veth-ns1", peer_addr="10.0.0.2/24")
    run("bridge", "attach", "br0", "veth-ns1")
    sh.ip("-n", "ns1", "route", "add", "default", "via", "10.0.0.1")
    run("netns", "add", "inet", "--lo-up")
    run("veth", "add", "uplink", "eth0", "--netns", "inet", "--addr", "203.0.113.1/24",
        "--peer-addr", "203.0.113.10/24")
    # An unrelated rule that nat del must leave alone.
    sh.iptables("-t", "nat", "-A", "POSTROUTING", "-s", "10.99.0.0/24", "-j", "RETURN")
    assert not ping("203.0.113.10", ns="ns1")      # inet has no route back to 10.0.0.0/24
    run("nat", "add", "10.0.0.0/24", "--out", "uplink")
    assert open("/proc/sys/net/ipv4/ip_forward").read().strip() == "1"
    assert ping("203.0.113.10", ns="ns1")
    # The far side sees the uplink address, not 10.0.0.2.
    server = subprocess.Popen(["ip", "netns", "exec", "inet", "socat", "-u",
                               "TCP-LISTEN:8080,reuseaddr", "SYSTEM:echo $SOCAT_PEERADDR >&2"],
                              stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(100):
            if "8080" in str(sh.ip("netns", "exec", "inet", "ss", "-ltn")):
                break
            time.sleep(0.05)
        else:
            pytest.fail("socat in inet never listened on 8080 (5 s)")
        sh.ip("netns", "exec", "ns1", "socat", "-u", "OPEN:/dev/null", "TCP:203.0.113.10:8080")
        seen = server.communicate(timeout=5)[1].strip()
    finally:
        server.kill()
    assert seen == "203.0.113.1"
    # One chain per table, one jump into each: three rules in the chains, two jumps.
    chain = cnikit.nat_chain("10.0.0.0/24")
    tagged = [r for r in iptables_rules("nat") + iptables_rules("filter") if "cnikit nat 10.0.0.0/24" in r]
    assert len(tagged) == 5 and sum(r.startswith(f"-A {chain} ") for r in tagged) == 3
    assert [r for r in tagged if r.endswith(f"-j {chain}")] == [
        f'-A POSTROUTING -m comment --comment "cnikit nat 10.0.0.0/24" -j {chain}',
        f'-A FORWARD -m comment --comment "cnikit nat 10.0.0.0/24" -j {chain}']
    shown = run("nat", "show").stdout
    assert "masquerade" in shown.lower() and f"iptables -w -t nat -N {chain}" in shown
    assert f"iptables -w -t filter -N {chain}" in shown and "2 chain(s), 5 rule(s)" in shown
    again = run("nat", "add", "10.0.0.0/24", "--out", "uplink").stdout
    assert "already present" in again and "iptables -w -t nat -A" not in again
    other = cli("nat", "add", "10.0.0.0/24", "--out", "br0")
    assert other.returncode == 2 and "already leaves through uplink" in other.stderr
    deleted = run("nat", "del", "10.0.0.0/24").stdout.splitlines()
    assert deleted == [f"iptables -w -t nat -D POSTROUTING -m comment --comment 'cnikit nat 10.0.0.0/24' -j {chain}",
                       f"iptables -w -t filter -D FORWARD -m comment --comment 'cnikit nat 10.0.0.0/24' -j {chain}",
                       f"iptables -w -t nat -F {chain}", f"iptables -w -t nat -X {chain}",
                       f"iptables -w -t filter -F {chain}", f"iptables -w -t filter -X {chain}"]
    assert iptables_rules("nat") == ["-A POSTROUTING -s 10.99.0.0/24 -j RETURN"]
    assert iptables_rules("filter") == []
    assert chain not in str(sh.iptables("-t", "nat", "-S")) + str(sh.iptables("-S"))
    assert "nothing to delete" in run("nat", "del", "10.0.0.0/24").stdout


def test_show_draws_peers_masters_addresses_routes_and_nat():
    run("bridge", "add", "br0", "--addr", "10.0.0.1/24")
    run("netns", "add", "ns1", "--lo-up")
    pair("ns1", "veth-ns1", peer_addr="10.0.0.2/24")
    run("bridge", "attach", "br0", "veth-ns1")
    run("nat", "add", "10.0.0.0/24", "--out", "br0")
    state = json.loads(run("show", "--json").stdout)
    spaces = {s["name"]: s for s in state["namespaces"]}
    host_links = {l["name"]: l for l in spaces["host"]["links"]}
    assert host_links["veth-ns1"]["peer"] == "ns1:eth0" and host_links["veth-ns1"]["master"] == "br0"
    assert {l["name"]: l for l in spaces["ns1"]["links"]}["eth0"]["peer"] == "host:veth-ns1"
    assert host_links["br0"]["addrs"] == ["10.0.0.1/24"] and host_links["br0"]["cnikit"]
    assert len(spaces["host"]["nat"]) == 5          # the chain's three rules and the two jumps into it
    picture = run("show").stdout
    for text in ("host", "ns1", "br0", "`-- veth-ns1", "<=> ns1:eth0", "10.0.0.2/24", "masquerade out br0"):
        assert text in picture


def test_cleanup_removes_exactly_cnikits_objects_and_is_safe_twice():
    run("netns", "add", "ns1")
    run("bridge", "add", "br0")
    run("veth", "add", "v0", "eth0", "--netns", "ns1")
    run("nat", "add", "10.0.0.0/24", "--out", "br0")
    # Things cnikit did not create.
    sh.ip("netns", "add", "theirs")
    sh.ip("link", "add", "their-br", "type", "bridge")
    sh.iptables("-A", "FORWARD", "-s", "10.5.0.0/16", "-j", "ACCEPT")
    first = run("cleanup").stdout
    assert "removed" in first
    assert netns_list() == ["theirs"]
    assert set(links()) == {"lo", "their-br"}
    assert iptables_rules("filter") == ["-A FORWARD -s 10.5.0.0/16 -j ACCEPT"] and iptables_rules("nat") == []
    assert "nothing of cnikit's is left" in run("cleanup").stdout
    sh.ip("netns", "del", "theirs")


def test_sandbox_runs_a_command_and_leaves_nothing():
    before = snapshot()
    proc = cli("sandbox", "--", "sh", "-c", "ip netns add inside && ip link add br9 type bridge && ip netns list")
    assert proc.returncode == 0 and "inside" in proc.stdout
    one = cli("--sandbox", "netns", "add", "gone")
    assert one.returncode == 0 and "ip netns add gone" in one.stdout
    assert snapshot() == before
    assert cli("sandbox", "--", "sh", "-c", "exit 3").returncode == 3


def test_not_root_says_so_and_shows_what_would_run():
    proc = cli_as_nobody("bridge", "add", "br0", "--addr", "10.0.0.1/24")
    assert proc.returncode == 2
    assert "root is needed" in proc.stderr
    mac = cnikit.bridge_mac("br0", machine_id=cnikit.machine_id())
    assert f"ip link add br0 address {mac} type bridge" in proc.stdout
    assert "br0" not in links()


def test_sandbox_keeps_what_cni_writes_private():
    # A plugin install, its config, address files and log inside a sandbox never reach
    # the namespace that started it (here: the test's own sandbox, standing for the host).
    marks = [os.path.join(cnikit.CNI_CONF_DIR, "10-x.conflist"), os.path.join(cnikit.CNI_PLUGIN_DIR, "x"),
             os.path.join(cnikit.CNI_DATA_DIR, "x", "10.0.0.2"), cnikit.CNI_LOG, cnikit.NODE_SUBNET_FILE,
             os.path.join(cnikit.NETNS_DIR, "x")]
    script = " && ".join(f"mkdir -p {os.path.dirname(m)} && touch {m}" for m in marks)
    proc = cli("sandbox", "--", "sh", "-c", script + " && ls " + " ".join(marks))
    assert proc.returncode == 0, proc.stderr
    assert all(not os.path.exists(m) for m in marks)


def test_interactive_sandbox_shell_has_a_clear_prompt_and_leaves_nothing():
    before = snapshot()
    proc = cli("sandbox", input="ip netns add inside\nip netns list\nexit 0\n")
    assert proc.returncode == 0
    assert "(cnikit-sandbox)" in proc.stderr and "inside" in proc.stdout
    assert snapshot() == before


def test_echo_is_highlighted_on_a_terminal_and_plain_when_piped_or_silenced():
    import os
    import pty
    master, slave = pty.openpty()
    proc = subprocess.Popen([*CLI, "netns", "add", "t1"], env=cli_env(), stdout=slave, stderr=slave)
    proc.wait(timeout=10)
    os.close(slave)
    tty_out = os.read(master, 65536).decode()
    os.close(master)
    assert "\033[" in tty_out and "ip netns add t1" in tty_out
    piped = run("netns", "add", "t2").stdout
    assert "\033[" not in piped and piped.splitlines()[0] == "ip netns add t2"
    assert run("-q", "netns", "add", "t3").stdout == ""
    assert netns_list() == ["t1", "t2", "t3"]


def test_show_and_cleanup_with_n_act_on_that_namespace_only():
    run("netns", "add", "h1")
    run("netns", "add", "h2")
    run("-n", "h1", "bridge", "add", "br1", "--addr", "10.1.0.1/24")
    run("-n", "h2", "bridge", "add", "br2")
    run("-n", "h1", "nat", "add", "10.1.0.0/24", "--out", "br1")
    shown = json.loads(run("-n", "h1", "show", "--json").stdout)
    assert [sp["name"] for sp in shown["namespaces"]] == ["h1"]
    assert "br1" in run("-n", "h1", "show").stdout and "br2" not in run("-n", "h1", "show").stdout
    out = run("-n", "h1", "cleanup").stdout
    assert "ip -n h1 link del br1" in out and "ip netns exec h1 iptables -w -t nat -D POSTROUTING" in out
    assert netns_list() == ["h1", "h2"]                   # the namespaces stay
    assert "br1" not in links("h1") and "br2" in links("h2")
    assert iptables_rules("nat", "h1") == []


def test_cleanup_dry_run_lists_what_exists_and_without_root_says_what_it_cannot_see():
    run("netns", "add", "ns1")
    run("bridge", "add", "br0")
    plan = run("--dry-run", "cleanup").stdout
    assert "ip link del br0" in plan and "ip netns del ns1" in plan and "would remove 2" in plan
    assert "br0" in links() and netns_list() == ["ns1"]
    proc = cli_as_nobody("cleanup")
    assert proc.returncode == 2 and "ip link del br0" in proc.stdout
    assert "could not look at" in proc.stdout and "namespace ns1" in proc.stdout


def test_a_second_address_on_a_rerun_is_said_out_loud():
    run("bridge", "add", "br0", "--addr", "10.0.0.1/24")
    out = run("bridge", "add", "br0", "--addr", "10.0.0.5/24").stdout
    assert "br0 already has 10.0.0.1/24; adding 10.0.0.5/24 as another address" in out
    assert addrs("br0") == ["10.0.0.1/24", "10.0.0.5/24"]


def test_a_reader_that_leaves_early_gets_no_traceback():
    run("bridge", "add", "br0")
    # 40 ports as `veth add vI pI` + `bridge attach br0 vI` make them (their dry runs' commands),
    # in one `ip -batch`: what is read here is `bridge show`, not how the ports were made
    batch = "".join(f"link add v{i} type veth peer name p{i}\nlink set dev v{i} alias cnikit\nlink set dev v{i} up\n"
                    f"link set dev p{i} up\nlink set dev v{i} master br0\n" for i in range(40))
    subprocess.run(["ip", "-batch", "-"], input=batch, text=True, check=True)
    proc = subprocess.Popen([*CLI, "bridge", "show", "br0"], env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=10)
    assert "Traceback" not in err and "BrokenPipe" not in err


def test_cleanup_removes_cni_state_too_so_the_next_pod_starts_fresh():
    # The repro of issue 14: after cleanup nothing of the attachment or the install is left,
    # the same pod can be added again and gets the first address again (none leaked).
    run("cni", "install")
    run("netns", "add", "pod1")
    first = json.loads(run("-q", "cni", "add", "pod1").stdout)
    assert first["ips"][0]["address"] == "10.244.0.2/24"
    out = run("cleanup").stdout
    assert "CNI_COMMAND=DEL" in out and "rm -f /etc/cni/net.d/10-cnikit.conflist" in out
    assert "ip link del cni0" in out and "rm -rf /var/lib/cni/networks/cnikit" in out
    assert "nothing of cnikit's is left" in run("cleanup").stdout
    for d in ("/var/lib/cni/results", cnikit.CNI_DATA_DIR, "/etc/cni/net.d", "/opt/cni/bin"):
        assert not os.path.isdir(d) or os.listdir(d) == [], (d, os.listdir(d))
    assert "cni0" not in links() and netns_list() == []
    assert cnikit.CHAIN_PREFIX not in str(sh.iptables("-t", "nat", "-S")) + str(sh.iptables("-S"))
    run("cni", "install")
    run("netns", "add", "pod1")
    again = json.loads(run("-q", "cni", "add", "pod1").stdout)
    assert again["ips"][0]["address"] == "10.244.0.2/24"


def test_cleanup_leaves_what_another_runtime_still_uses_on_the_bridge():
    run("cni", "install")
    run("netns", "add", "pod1")
    run("cni", "add", "pod1")
    # An attachment cnikit did not cache (a runtime of its own): its port and address stay.
    sh.ip("netns", "add", "theirs")
    env = dict(os.environ, CNI_COMMAND="ADD", CNI_CONTAINERID="theirs", CNI_NETNS="/run/netns/theirs",
               CNI_IFNAME="eth0", CNI_PATH="/opt/cni/bin")
    conf = json.load(open("/etc/cni/net.d/10-cnikit.conflist"))
    stdin = json.dumps(dict(conf["plugins"][0], name=conf["name"], cniVersion=conf["cniVersion"]))
    assert subprocess.run(["/opt/cni/bin/cnikit"], input=stdin, env=env, capture_output=True, text=True).returncode == 0
    out = run("cleanup").stdout
    assert "cni0 stays: 1 port(s)" in out and "/var/lib/cni/networks/cnikit stays" in out
    assert "cni0" in links() and "theirs" in netns_list()
    sh.ip("netns", "del", "theirs")


def test_route_add_is_tagged_and_a_different_route_is_a_conflict():
    run("netns", "add", "ns1")
    sh.ip("-n", "ns1", "link", "add", "d0", "type", "veth", "peer", "name", "d1")
    sh.ip("-n", "ns1", "addr", "add", "10.0.0.1/24", "dev", "d0")
    sh.ip("-n", "ns1", "link", "set", "d0", "up")
    r = cnikit.Runner(out=__import__("io").StringIO())
    cnikit.route_add(r, "192.0.2.0/24", via="10.0.0.2", ns="ns1")
    assert r.commands()[-1] == ["ip", "-n", "ns1", "route", "add", "192.0.2.0/24", "via", "10.0.0.2",
                                "proto", str(cnikit.ROUTE_PROTO)]
    cnikit.route_add(r, "192.0.2.0/24", via="10.0.0.2", ns="ns1")          # the same: nothing to do
    assert "already exists as asked" in r.out.getvalue() and len(r.commands()) == 1
    with pytest.raises(cnikit.UsageError, match="already exists .via 10.0.0.2 dev d0., not via 10.0.0.3"):
        cnikit.route_add(r, "192.0.2.0/24", via="10.0.0.3", ns="ns1")
    # cleanup -n finds it by its protocol, and leaves the kernel's own route
    out = run("-n", "ns1", "cleanup").stdout
    assert f"ip -n ns1 route del 192.0.2.0/24 proto {cnikit.ROUTE_PROTO}" in out
    assert [x["dst"] for x in json.loads(str(sh.ip("-n", "ns1", "-j", "route", "show")))] == ["10.0.0.0/24"]


def addr_assign_type(dev, ns=None):
    return int(str(sh.ip("netns", "exec", ns, "cat", f"/sys/class/net/{dev}/addr_assign_type") if ns else
                   open(f"/sys/class/net/{dev}/addr_assign_type").read()))


def neigh_lladdr(addr, ns):
    entries = json.loads(str(sh.ip("-n", ns, "-j", "neigh", "show", addr, "dev", "eth0")))
    return entries[0].get("lladdr") if entries else None


def test_bridge_keeps_its_own_mac_when_its_lowest_ports_leave():
    # Without a MAC of its own a bridge takes its lowest port's: ports 1 and 2 get the lowest
    # MACs there are, so leaving would move it twice.
    proc = run("bridge", "add", "br0", "--addr", "10.0.0.1/24")
    br = links()["br0"]
    assert f"ip link add br0 address {br['address']} type bridge" in proc.stdout
    assert addr_assign_type("br0") == 3
    mac = br["address"]
    assert int(mac[:2], 16) & 3 == 2                    # locally administered, unicast
    for i in (1, 2, 3):
        run("netns", "add", f"ns{i}", "--lo-up")
        pair(f"ns{i}", f"veth-ns{i}", peer_addr=f"10.0.0.{i + 1}/24")
        sh.ip("link", "set", "dev", f"veth-ns{i}", "address", f"02:00:00:00:00:0{i}")
        run("bridge", "attach", "br0", f"veth-ns{i}")
    assert links()["br0"]["address"] == mac
    assert ping("10.0.0.1", ns="ns3") and neigh_lladdr("10.0.0.1", "ns3") == mac
    run("veth", "del", "veth-ns1")
    run("veth", "del", "veth-ns2")
    assert links()["br0"]["address"] == mac
    assert ping("10.0.0.1", ns="ns3")                    # at once: the neighbour entry is still right


def test_bridge_add_rerun_gives_a_bridge_made_without_a_mac_its_current_one():
    sh.ip("link", "add", "br0", "type", "bridge")
    mac = links()["br0"]["address"]
    assert addr_assign_type("br0") != 3
    out = run("bridge", "add", "br0").stdout
    assert f"ip link set dev br0 address {mac}" in out
    assert addr_assign_type("br0") == 3 and links()["br0"]["address"] == mac
    assert "nothing to do" in run("bridge", "add", "br0").stdout
    run("netns", "add", "node1")
    sh.ip("-n", "node1", "link", "add", "br1", "type", "bridge")
    mac1 = links("node1")["br1"]["address"]
    assert f"ip -n node1 link set dev br1 address {mac1}" in run("-n", "node1", "bridge", "add", "br1").stdout
    assert addr_assign_type("br1", "node1") == 3
    assert "nothing to do" in run("-n", "node1", "bridge", "add", "br1").stdout


def test_bridge_macs_differ_per_node_and_name_and_are_the_dry_runs():
    macs = {cnikit.bridge_mac(name, host, "id") for name in ("br0", "br1") for host in (None, "node1", "node2")}
    assert len(macs) == 6 and all(int(m[:2], 16) & 3 == 2 for m in macs)
    plan = run("--dry-run", "-n", "node1", "bridge", "add", "br0").stdout
    run("netns", "add", "node1")
    real = run("-n", "node1", "bridge", "add", "br0").stdout
    # (the plan says first that node1 is not here yet: planned as made by an earlier command)
    command = [l for l in plan.splitlines() if not l.startswith("#")][0]
    assert command == real.splitlines()[0]
    assert command == f"ip -n node1 link add br0 address {links('node1')['br0']['address']} type bridge"


@pytest.mark.parametrize("backend", ["iptables", "nftables"])
def test_cleanup_removes_the_plugins_rules_in_either_masquerade_backend(backend):
    """ipMasqBackend iptables or nftables (and macspoofchk's nft table): cleanup DELs the attachment
    through the plugin, and neither iptables chains nor nft tables of ours are left."""
    run("cni", "install")
    path = "/etc/cni/net.d/10-cnikit.conflist"
    with open(path) as f:
        conf = json.load(f)
    conf["plugins"][0].update(ipMasqBackend=backend, macspoofchk=True)
    with open(path, "w") as f:
        json.dump(conf, f)
    run("netns", "add", "pod1")
    run("-q", "cni", "add", "pod1")

    def ours():
        tables = json.loads(str(sh.nft("-j", "list", "tables")))["nftables"]
        nft = [t["table"]["name"] for t in tables if "table" in t and t["table"]["name"].startswith("cnikit-")]
        rules = str(sh.iptables("-t", "nat", "-S")) + str(sh.iptables("-S"))
        return nft, cnikit.CHAIN_PREFIX in rules
    nft, chains = ours()
    assert len(nft) == (2 if backend == "nftables" else 1) and chains == (backend == "iptables")
    run("cleanup")
    assert ours() == ([], False)
