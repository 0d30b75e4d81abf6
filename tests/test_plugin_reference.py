"""Differential tests: each scenario (a network config and a sequence of CNI calls) runs once
with our plugin (the compiled form `cni install` gives a host) and once with the Go reference
`bridge` + `host-local` (Debian's containernetworking-plugins 1.1.1 in /usr/lib/cni), each in a
fresh sandbox.  After every call the kernel state is read back (`ip -j`, `bridge -j`, sysctls,
iptables-save, nft, the IPAM directory; PING steps send real pings between the pods) with
everything that is random or named differently by design normalized away: host veth names,
chain hashes, MACs both pick at random, counters.  The two runs must
match, except for the differences docs/plugin.md lists ("Where we differ from the reference,
and why"): each scenario names the ones it shows, and the test asserts exactly those, so a pinned
difference that goes away (or a new one) fails too.

Configs spell every key the two plugins default differently (ipMasq, isGateway,
isDefaultGateway, forwardAccept); the defaults themselves are pinned by their own scenario."""
import atexit
import json
import os
import re
import shutil
import subprocess
import tempfile
import time

import pytest
import sh

import conftest
from plugin_helpers import PLUGIN, REFERENCE, cni, netns

# Ours runs with its built-in allocator: an empty CNI_PATH has no host-local to delegate to,
# and the documented fallback is the built-in one, which writes host-local's files.
NO_IPAM_PLUGINS = tempfile.mkdtemp(prefix="cnikit-empty-cni-path-")
atexit.register(shutil.rmtree, NO_IPAM_PLUGINS, True)
PLUGINS = {"ours": (PLUGIN, NO_IPAM_PLUGINS, "cni-bash-compatible"),
           "reference": (f"{REFERENCE}/bridge", REFERENCE, "bridge"),
           "reference ptp": (f"{REFERENCE}/ptp", REFERENCE, "ptp")}   # for our routed mode
PLUGIN_DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "plugin.md")
NETWORK = "diffnet"
DATA_DIR = "/var/lib/cni/networks"


# ---------------------------------------------------------------- reading the kernel back

def _json(*argv):
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return json.loads(out) if out.strip() else []


def _in(ns, *argv):
    """ARGV run in namespace NS (None: here); `ip -n` enters it itself, cheaper than `ip netns exec`."""
    if not ns:
        return list(argv)
    return ["ip", "-n", ns, *argv[1:]] if argv[0] == "ip" else ["ip", "netns", "exec", ns, *argv]


def _sysctls(ns, ifnames, baseline=None):
    """{family/ifname/key: value} of the sysctls a plugin wrote in namespace NS: an interface's
    where they differ from the namespace's conf/default (what a new interface starts with),
    all/default where they differ from BASELINE (this function's answer before any call)."""
    dirs = [f"/proc/sys/net/{fam}/conf/{i}" for fam in ("ipv4", "ipv6") for i in ("all", "default", *ifnames)]
    # grep -r prints path:value; -s skips what cannot be read (ipv6 stable_secret when unset)
    out = subprocess.run(_in(ns, "grep", "-rs", ".", *dirs), capture_output=True, text=True).stdout
    values = {}
    for line in out.splitlines():
        path, _, value = line.partition(":")
        fam, _, ifname, key = path.split("/")[4:8]
        values[(fam, ifname, key)] = value
    if baseline is None:
        return values
    return {k: v for k, v in values.items() if k[2] != "mtu"           # the link's mtu, compared there
            and v != (baseline.get(k) if k[1] in ("all", "default") else values.get((k[0], "default", k[2])))}


def _addr_assign_type(ns, ifname):
    """0 permanent, 1 random, 2 stolen, 3 set by userspace (the kernel's NET_ADDR_*)."""
    return int(subprocess.run(_in(ns, "cat", f"/sys/class/net/{ifname}/addr_assign_type"),
                              capture_output=True, text=True, check=True).stdout)


def _addresses(ns, ifname):
    out = []
    for a in _json(*_in(ns, "ip", "-j", "addr", "show", "dev", ifname))[0]["addr_info"]:
        local = "fe80::(link-local)" if a["local"].startswith("fe80:") else a["local"]
        flags = sorted(k for k in ("nodad", "noprefixroute", "home", "mngtmpaddr") if a.get(k))
        out.append(f"{local}/{a['prefixlen']} scope {a['scope']}"
                   + (f" brd {a['broadcast']}" if a.get("broadcast") else "") + "".join(" " + f for f in flags))
    return sorted(out)


def _routes(ns):
    out = []
    for fam in ("-4", "-6"):
        for r in _json(*_in(ns, "ip", "-j", fam, "route", "show", "table", "all")):
            if r.get("table") == "local":
                continue
            r.pop("expires", None)
            out.append(json.dumps(r, sort_keys=True))
    return sorted(out)


PORT_KEYS = ("hairpin", "isolated", "learning", "flood", "mcast_flood", "bcast_flood", "guard",
             "root_block", "fastleave", "proxy_arp", "neigh_suppress", "locked", "state", "cost", "priority")


def _vlans(ifname):
    for entry in _json("bridge", "-j", "vlan", "show", "dev", ifname):
        return sorted(json.dumps(v, sort_keys=True) for v in entry.get("vlans", []))
    return []


def _host_links():
    """{name: `ip -j -d link` record} of the host, read right after the call: both plugins return
    only once the bridge has taken a new port's carrier (out of "disabled"), so its state is a
    result, not a race (ours polls the port's state, the reference the veth's operstate)."""
    return {l["ifname"]: l for l in _json("ip", "-j", "-d", "link", "show")}


def _flags(link):
    """The link's flags but its carrier: a bridge's follows its ports' states, which the kernel
    updates on its own time (linkwatch)."""
    return sorted(f for f in link["flags"] if f not in ("LOWER_UP", "NO-CARRIER"))


def _is_random_mac(mac):
    first = int(mac.split(":")[0], 16)
    return bool(first & 2) and not first & 1      # locally administered, unicast


def snapshot(pods, first_bridge_mac, baselines):
    """The normalized state of the host and of the pods' namespaces.  PODS: [(cid, ifname)]
    added so far (those whose netns is gone are skipped).  BASELINES: {netns or None: its
    sysctls before any call}.  FIRST_BRIDGE_MAC: {} filled with each bridge's MAC the first time
    it is seen, so a later change shows as "mac_stable": False."""
    host_links = _host_links()
    names = {}                      # kernel name -> role
    pod_state = {}
    for cid, ifname in pods:
        if not os.path.exists(f"/run/netns/{cid}"):
            continue
        pl = {l["ifname"]: l for l in _json(*_in(cid, "ip", "-j", "-d", "link", "show"))}
        if ifname not in pl:
            pod_state[f"{cid}/{ifname}"] = None
            continue
        l = pl[ifname]
        peer = next((h for h in host_links.values() if h["ifindex"] == l.get("link_index")), None)
        if peer:
            names[peer["ifname"]] = f"<veth {cid}/{ifname}>"
        pod_state[f"{cid}/{ifname}"] = {
            "kind": l.get("linkinfo", {}).get("info_kind"), "mtu": l["mtu"], "flags": _flags(l),
            "mac_random": _is_random_mac(l["address"]), "addr_assign_type": _addr_assign_type(cid, ifname),
            "addrs": _addresses(cid, ifname), "routes": _routes(cid),
            "sysctl": {"/".join(k): v for k, v in _sysctls(cid, [ifname], baselines[cid]).items()}}
    bridges = [n for n, l in host_links.items() if l.get("linkinfo", {}).get("info_kind") == "bridge"]
    ports = {}
    bridge_state = {}
    for name in bridges:
        names[name] = name
        b = host_links[name]
        if name not in first_bridge_mac:
            first_bridge_mac[name] = b["address"]
        its_ports = [p for p in host_links.values() if p.get("master") == name]
        bridge_state[name] = {
            "mtu": b["mtu"], "flags": _flags(b), "promiscuity": b["promiscuity"],
            "vlan_filtering": b["linkinfo"]["info_data"]["vlan_filtering"],
            "addr_assign_type": _addr_assign_type(None, name),
            "mac_stable": b["address"] == first_bridge_mac[name],
            "mac_of_a_port": any(p["address"] == b["address"] for p in its_ports),
            "addrs": _addresses(None, name), "vlans": _vlans(name)}
    for name, l in host_links.items():
        if l.get("linkinfo", {}).get("info_kind") != "veth":
            continue
        role = names.setdefault(name, "<veth without a pod>")
        slave = l["linkinfo"].get("info_slave_data", {})
        ports[role] = {
            "mtu": l["mtu"], "flags": _flags(l), "master": l.get("master"),
            "mac_random": _is_random_mac(l["address"]), "addr_assign_type": _addr_assign_type(None, name),
            "port": {k: slave.get(k) for k in PORT_KEYS}, "vlans": _vlans(name), "addrs": _addresses(None, name)}
    host_sysctl = {(fam, names.get(i, i), key): v for (fam, i, key), v
                   in _sysctls(None, [n for n in names if n in host_links], baselines[None]).items()}
    return {"bridges": bridge_state, "host veths": ports, "pods": pod_state,
            "host sysctl": {"/".join(k): v for k, v in host_sysctl.items()},
            "ipam": _ipam_files(), "iptables": _iptables(), "nft": _nft(),
            "links": sorted(names.get(n, n) for n in host_links)}


def _ipam_files():
    d = os.path.join(DATA_DIR, NETWORK)
    if not os.path.isdir(d):
        return None
    out = {}
    for name in sorted(os.listdir(d)):
        if name.startswith("."):          # ours keeps its ownership records in .cnikit/
            continue
        with open(os.path.join(d, name), "rb") as f:
            out[name] = f.read().decode()
    return out


CHAIN = re.compile(r"\b(CNI-[0-9a-f]{8,}|CNIKIT-[0-9a-f]{8,})\b")
COMMENT = re.compile(r' -m comment --comment ("(?:[^"\\]|\\.)*"|\S+)')
JUMP = re.compile(r"^-A (?:PREROUTING|INPUT|FORWARD|OUTPUT|POSTROUTING) .*?-[sd] (\S+).* -j (\S+)$")
BUILTIN = {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"}


def _iptables():
    """Each family's tables, each chain a plugin made named after the pod address that jumps
    to it (the hashes differ by design), comments cut (both tag their rules, in their own
    words), rules grouped by chain in their order; a table holding nothing is left out."""
    out = {}
    for family, save in (("4", "iptables-save"), ("6", "ip6tables-save")):
        text = subprocess.run([save], capture_output=True, text=True).stdout
        lines = [COMMENT.sub("", line) for line in text.splitlines() if not line.startswith(("#", "COMMIT"))]
        names = {}
        for line in lines:
            m = JUMP.match(line)
            if m and CHAIN.fullmatch(m.group(2)):
                names.setdefault(m.group(2), f"<chain:{m.group(1)}>")
        tables, table = {}, None
        for line in lines:
            if line.startswith("*"):
                table = tables.setdefault(line[1:], [])
                continue
            if line.startswith(":"):
                name, policy = line[1:].split()[:2]
                if name in BUILTIN and policy == "ACCEPT":
                    continue
                line = f":{name} {policy}"
            table.append(CHAIN.sub(lambda m: names.setdefault(m.group(1), f"<chain:{len(names) + 1}>"), line))
        def by_chain(rule):       # declarations first, then each chain's rules in their order
            return not rule.startswith(":"), rule.split()[1] if rule.startswith("-A") else rule
        out[family] = {t: sorted(rules, key=by_chain) for t, rules in tables.items() if rules}
    return out


XTABLES = re.compile(r"table (ip|ip6) (filter|nat|mangle|raw|security)")
MAC = re.compile(r"\b[0-9a-f]{2}(:[0-9a-f]{2}){5}\b")
HASH = re.compile(r"[0-9a-f]{12,}|\bveth[0-9a-f]{8,}")


def _nft():
    """The nftables tables that are not iptables-nft's (those are read as iptables above),
    with hashes and MACs cut: {"family name": [lines]}."""
    out = {}
    for table in subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout.splitlines():
        if XTABLES.fullmatch(table.strip()):
            continue
        text = subprocess.run(["nft", "list", *table.split()], capture_output=True, text=True).stdout
        lines = [HASH.sub("<hash>", MAC.sub("<mac>", line.strip())) for line in text.splitlines() if line.strip()]
        out[HASH.sub("<hash>", table.split(None, 1)[1])] = lines
    return out


# ---------------------------------------------------------------- running a scenario

def _result(res, kernel_names, own):
    """A call's outcome: the result JSON with the host veth's name replaced by its role and
    each interface's MAC by "<its own>" when it is that interface's MAC in the kernel (else
    by whose it is), so two random MACs compare equal; or the error's code."""
    if res.rc != 0:
        return {"error": res.code}
    if res.json is None:
        return None
    text = json.dumps(res.json, sort_keys=True)
    for name, role in kernel_names.items():
        text = text.replace(f'"{name}"', f'"{role}"')
    out = json.loads(text)
    macs = {mac: role for role, mac in own.items()}
    for i in out.get("interfaces") or []:
        role = f"{i['name'] if not i.get('sandbox') else os.path.basename(i['sandbox']) + '/' + i['name']}"
        if i.get("mac") == own.get(role):
            i["mac"] = "<its own>"
        elif i.get("mac") in macs:
            i["mac"] = f"<mac of {macs[i['mac']]}>"
    return out


def _kernel_names_and_macs(pods):
    """({host veth name: role}, {role: MAC}) of the host links and the pods' interfaces."""
    names, macs = {}, {}
    host = {l["ifname"]: l for l in _json("ip", "-j", "link", "show")}
    for cid, ifname in pods:
        if not os.path.exists(f"/run/netns/{cid}"):
            continue
        for l in _json(*_in(cid, "ip", "-j", "link", "show")):
            if l["ifname"] == ifname:
                macs[f"{cid}/{ifname}"] = l["address"]
                peer = next((h for h in host.values() if h["ifindex"] == l.get("link_index")), None)
                if peer:
                    names[peer["ifname"]] = f"<veth {cid}/{ifname}>"
    for n, l in host.items():
        macs[names.get(n, n)] = l["address"]
    return names, macs


def _wait_gone(names, timeout=10):
    """The kernel dismantles a namespace nobody holds in a work queue: wait until the host
    end of its veth has gone with it, so the next step starts from the same state."""
    deadline = time.monotonic() + timeout
    while any(os.path.exists(f"/sys/class/net/{n}") for n in names):
        assert time.monotonic() < deadline, f"{names} still there {timeout} s after their namespace was deleted"
        time.sleep(0.02)


def _dad_done(ns, timeout=3):
    """Wait until no IPv6 address in NS is tentative: an address answers (and neighbour discovery
    can use it as a source) only once the kernel's duplicate address detection is done with it,
    a second or two after it was added, on the kernel's clock."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(
            a.get("tentative") and not a.get("dadfailed") for link in _json(*_in(ns, "ip", "-j", "-6", "addr", "show"))
            for a in link.get("addr_info", [])):
        time.sleep(0.02)


def _reaches(ns, addr):
    """Does ADDR answer a ping from inside NS (a real packet, within our own namespaces)?"""
    return subprocess.run(_in(ns, "ping", "-c", "1", "-W", "1", addr), capture_output=True).returncode == 0


def _pings(cid, results, settle):
    """{"gateway <ip>" or "<pod> <ip>": answered} for every address POD CID should reach.
    RESULTS: the ADD results of the pods attached now.  SETTLE: wait for IPv6 DAD first, for a
    plugin that leaves addresses tentative when it answers: both bridges their gateway on the
    bridge, ptp its gateway on the host veth; ours in routed mode adds that one nodad."""
    targets = [(f"gateway {ip['gateway']}", ip["gateway"])
               for ip in (results.get(cid) or {}).get("ips", []) if ip.get("gateway")]
    targets += [(f"{other} {ip['address'].split('/')[0]}", ip["address"].split("/")[0])
                for other, res in results.items() if other != cid and os.path.exists(f"/run/netns/{other}")
                for ip in res.get("ips", [])]
    if settle and any(":" in addr for _, addr in targets):
        _dad_done(None)
        _dad_done(cid)
    return {name: _reaches(cid, addr) for name, addr in targets}


def run(which, conf, steps):
    """Run STEPS with plugin WHICH in the current sandbox; returns [(step, outcome, state)].
    A step is (verb, container id[, CNI_ARGS]) with verb ADD, CHECK, DEL (netns and prevResult,
    as containerd's StopPodSandbox), DEL-bare (no netns, no prevResult: the second DEL of
    RemovePodSandbox), RMNS (the runtime removes the pod's namespace), PING (the pod pings its
    gateways and the other pods), or ("SH", shell command) to set the host up beforehand."""
    plugin, path, ptype = PLUGINS[which]
    conf = dict(conf, cniVersion=conf.get("cniVersion", "1.0.0"), name=NETWORK, type=ptype)
    results, attached, pods, first_mac, out = {}, {}, [], {}, []
    baselines = {None: _sysctls(None, [])}
    for verb, cid, *args in steps:
        ifname = "eth0"
        if verb == "SH":
            subprocess.run(["sh", "-ec", cid], check=True)
            outcome = None
        elif verb == "PING":
            outcome = _pings(cid, attached, settle=not (which == "ours" and conf.get("mode") == "routed"))
        elif verb == "RMNS":
            veths = [n for n, role in _kernel_names_and_macs(pods)[0].items() if role == f"<veth {cid}/{ifname}>"]
            sh.ip("netns", "del", cid)
            _wait_gone(veths)
            outcome = None
        else:
            if verb == "ADD":
                if not os.path.exists(f"/run/netns/{cid}"):
                    netns(cid)
                    baselines[cid] = _sysctls(cid, [])
                if (cid, ifname) not in pods:
                    pods.append((cid, ifname))
            c = dict(conf)
            kw = {"cid": cid, "ifname": ifname, "path": path, "plugin": plugin, "args": "IgnoreUnknown=1",
                  **(args[0] if args else {})}
            if verb in ("CHECK", "DEL") and results.get(cid) is not None:
                c["prevResult"] = results[cid]
            if verb == "DEL-bare" or not os.path.exists(f"/run/netns/{cid}"):
                kw["netns"] = ""
            res = cni(verb.split("-")[0], c, **kw)
            if verb == "ADD" and res.rc == 0:
                results[cid] = attached[cid] = res.json
            if verb.startswith("DEL") and res.rc == 0:
                attached.pop(cid, None)
            outcome = _result(res, *_kernel_names_and_macs(pods))
        out.append((f"{verb} {cid}", outcome, snapshot(pods, first_mac, baselines)))
    return out


def _diff(a, b, path, out):
    """Record where A and B differ: down to the leaves where both sides are dicts, else the
    whole value (a pod present on one side only is one difference, not a hundred)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            _diff(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{path}.{k}" if path else str(k), out)
    elif a != b:
        def show(v):
            return v if isinstance(v, (str, int, float, bool, type(None))) else json.dumps(v, sort_keys=True)
        out.setdefault(path, set()).add((show(a), show(b)))


def differences(ours, ref):
    """{path: {(ours, reference), ...}} over all steps, where the two differ."""
    diff = {}
    for (step, o_out, o_state), (_, r_out, r_state) in zip(ours, ref):
        _diff({"outcome": o_out, "state": o_state}, {"outcome": r_out, "state": r_state}, "", diff)
    return diff


def compare(conf, steps, reference="reference"):
    """Run the scenario with ours and the REFERENCE, each in a fresh sandbox; returns the differences."""
    ours = run("ours", conf, steps)
    conftest.leave_test_sandbox()
    conftest.enter_test_sandbox()
    ref = run(reference, conf, steps)
    return differences(ours, ref)


# ---------------------------------------------------------------- the differences we keep (docs/plugin.md)
# name: (why, {path pattern: the (ours, reference) pairs it shows over all steps, None: any}).
# A scenario lists the pins it shows; each must match at least one difference, and every
# difference must be matched by one of them with exactly the pairs given.

BRIDGE = r"state\.bridges\.cni0\."
VETH = r"state\.host veths\.<veth \w/eth0>\."
PINS = {
    "host veth MAC set": (
        "ours picks the host end's random MAC itself (the veth is born on the bridge, up, in one "
        "netlink call), so the kernel marks it set (3) where the reference's is random (1)",
        {VETH + "addr_assign_type": {(3, 1)}}),
    "bridge MAC set without a gateway": (
        "ours sets the bridge's MAC to itself when it creates the bridge, so it never changes with "
        "its ports; the reference does so only when it adds a gateway address (isGateway)",
        {BRIDGE + "addr_assign_type": {(3, 1)}, BRIDGE + "mac_of_a_port": {(False, True)},
         BRIDGE + "mac_stable": {(True, False)}}),
    "accept_dad on IPv4-only pods": (
        "without enabledad the reference sets the pod interface's accept_dad to 0 whatever the "
        "family; ours does so only on a pod that gets an IPv6 address",
        {r"state\.pods\.\w/eth0\.sysctl\.ipv6/eth0/accept_dad": {("<absent>", "0")}}),
    "pod MAC set with macspoofchk": (
        "with macspoofchk ours sets the pod interface's (random) MAC itself, so it knows it before "
        "the rule goes in: addr_assign_type 3, the reference's 1",
        {r"state\.pods\.\w/eth0\.addr_assign_type": {(3, 1)}}),
    "portIsolation": (
        "portIsolation is newer than the reference 1.1.1, which ignores it; ours isolates the port",
        {VETH + "port\\.isolated": {(True, False)}}),
    "isolated pods do not reach each other": (
        "with portIsolation two pods on the bridge cannot reach each other (with the reference, which "
        "ignores the key, they can); their gateway they still reach",
        {r"outcome\.\w [0-9.]+": {(False, True)}}),
    "accept_ra on a bridge made by someone else": (
        "ours sets accept_ra=0 on a bridge only when it creates it; the reference on every ADD",
        {r"state\.host sysctl\.ipv6/cni0/accept_ra": {("<absent>", "0")}}),
    "a second address without forceAddress": (
        "without forceAddress, another address of the subnet on the bridge: the reference refuses "
        "the ADD (999); ours adds the gateway beside it (networks may share a bridge)",
        {r"outcome": {(None, '{"error": 999}')}, r"outcome\.(cniVersion|dns|error|ips|interfaces)": None,
         r"outcome\.gateway 10\.22\.0\.1": {(True, "<absent>")}, r"state\..*": None}),
    "hairpinMode with promiscMode": (
        "both refuse the ADD, ours as an invalid config (7), the reference with 999; both DELs of "
        "that config succeed, the reference's making the IPAM directory, ours nothing",
        {r"outcome\.error": {(7, 999)}, r"state\.ipam": {(None, '{"lock": ""}')}}),
    "two IPv4 gateways": (
        "two IPv4 range sets: the reference fails the ADD (999: it holds one IPv4 gateway per "
        "bridge without forceAddress) and leaves the veth, the pod's addresses and the first "
        "gateway behind; ours gives the pod an address from each set, both gateways on the bridge",
        {r"outcome\.error": {("<absent>", 999)}, r"(outcome|state)(\..*)?": None}),
    "pool exhausted": (
        "no address left: ours answers 11 (try again later) and has made nothing; the reference "
        "answers 999 and leaves the pod's veth pair (without addresses) until its DEL",
        {r"outcome\.error": {(11, 999)}, r"state\.links": None, r"state\.pods\.b/eth0": None,
         r"state\.host veths\.<veth b/eth0>": None, r"state\.host sysctl\.ipv6/<veth b/eth0>/accept_ra": None}),
    "ADD twice": (
        "a second ADD of the same attachment: ours answers 103 (it exists), the reference 999; "
        "neither touches the live pod",
        {r"outcome\.error": {(103, 999)}}),
    "routed: host-sized pod addresses": (
        "our routed mode gives the pod its address as /32 (/128) with a link route to the gateway, "
        "as Calico does; ptp keeps the subnet's prefix and routes the subnet via the gateway. The "
        "host side (veth addresses, routes, masquerading) is the same",
        {r"outcome\.(ips|routes)": None, r"state\.pods\.\w/eth0\.(addrs|routes)": None}),
    "routed: host gateway without DAD": (
        "ours adds the IPv6 gateway to the host veth nodad, and sets the veth's accept_dad to 0 "
        "before its link-local address comes, so both are usable at once; ptp's are tentative for "
        "the second or two DAD takes",
        {VETH + "addrs": {('["10.22.0.1/32 scope global", "fd00:22::1/128 scope global nodad", '
                           '"fe80::(link-local)/64 scope link"]',
                           '["10.22.0.1/32 scope global", "fd00:22::1/128 scope global", '
                           '"fe80::(link-local)/64 scope link"]')},
         r"state\.host sysctl\.ipv6/<veth \w/eth0>/accept_dad": {("0", "<absent>")}}),
    "routed: pod sysctls": (
        "ours sets arp_notify (and, with IPv6, accept_dad 0) on the pod interface in routed mode "
        "as in bridge mode; ptp sets neither",
        {r"state\.pods\.\w/eth0\.sysctl\.ipv4/eth0/arp_notify": {("1", "<absent>")},
         r"state\.pods\.\w/eth0\.sysctl\.ipv6/eth0/accept_dad": {("0", "<absent>")}}),
    "routed: pod sysctls (IPv4)": (
        "the same on an IPv4-only pod: arp_notify",
        {r"state\.pods\.\w/eth0\.sysctl\.ipv4/eth0/arp_notify": {("1", "<absent>")}}),
    "ipMasqBackend": (
        "ipMasqBackend is newer than the reference 1.1.1, which ignores it (iptables); ours with "
        "nftables masquerades from a table of the attachment's own",
        {r"state\.iptables\.4\.nat": None, r"state\.nft\.inet cnikit-<hash>": None}),
    "vlanTrunk without vlan filtering": (
        "vlanTrunk is newer than the reference 1.1.1, which ignores it and attaches the pod; ours "
        "fails the ADD on this kernel without bridge VLAN filtering (101) and makes nothing",
        {r"outcome\.error": None, r"(outcome|state)(\..*)?": None}),
    "disableContainerInterface": (
        "disableContainerInterface is newer than the reference 1.1.1, which ignores it and attaches "
        "the pod; ours refuses it (7): it needs a network without IPAM",
        {r"outcome\.error": {(7, "<absent>")}, r"(outcome|state)(\..*)?": None}),
    "CHECK finds it": (
        "CHECK of a pod whose address or veth was removed by hand: both fail it, ours with 100 "
        "(the spec's code for a CHECK that found a difference), the reference with 999",
        {r"outcome\.error": {(100, 999)}}),
    "DEL removes the chain the pod's addresses no longer name": (
        "DEL of a pod whose interface lost its address (or went): ours removes the attachment's "
        "masquerade chain from its record; the reference finds its addresses on the interface, "
        "finds none, and leaves the chain behind",
        {r"state\.iptables\.4\.nat": None}),
    "not a bridge": (
        "a link named like the bridge that is not one: ours refuses as an invalid config (7), the "
        "reference with 999",
        {r"outcome\.error": None, r"state\.ipam(\..*)?": None}),
    "macspoofchk": (
        "ours drops frames from another MAC with one rule in a table of the attachment's own; the "
        "reference uses chains in a shared bridge nat table, which stays (empty) after DEL",
        {r"state\.nft\.bridge cnikit-<hash>": None, r"state\.nft\.bridge nat": None}),
    "no vlan filtering here": (
        "this kernel has no CONFIG_BRIDGE_VLAN_FILTERING: both fail ADD and leave nothing, ours with "
        "101 (a kernel error) and the reference with 999; ours then refuses CHECK without a prevResult "
        "(7, the reference 999), and keeps the round-robin cursor of the address it gave back",
        {r"outcome\.error": {(101, 999), (7, 999)}, r"state\.ipam": None, r"state\.ipam\.last_reserved_ip\.0": None}),
    "reference CHECK fails on a route without gw": (
        "the reference adds an ipam route without gw via the gateway, then its CHECK looks for it "
        "without one and fails (999); ours passes",
        {r"outcome": {(None, '{"error": 999}')}}),
    "defaults": (
        "ours defaults isGateway, isDefaultGateway, ipMasq and forwardAccept to true; the reference's "
        "are false (forwardAccept it does not have)",
        {r"outcome\.routes": {('[{"dst": "0.0.0.0/0", "gw": "10.22.0.1"}]', "<absent>")},
         BRIDGE + "addrs": None, r"state\.pods\.a/eth0\.routes": None, r"state\.iptables\.4\.(nat|filter)": None,
         r"state\.host sysctl\.ipv4/(all|default)/(forwarding|accept_redirects)": None,
         r"outcome\.gateway 10\.22\.0\.1": {(True, False)}}),
    "DEL without netns removes the veth and rules": (
        "a DEL without CNI_NETNS: ours removes the host veth (its name is stable) and the "
        "attachment's chains (its record); the reference cannot find the veth and only releases "
        "the address, leaving the pod's veth pair and its masquerade chain",
        {r"state\.links": None, r"state\.iptables\.4\.nat": None, r"state\.pods\.b/eth0": None,
         r"state\.host veths(\.<veth b/eth0>)?": None, r"state\.host sysctl\.ipv6/<veth b/eth0>/accept_ra": None}),
}


def unexplained(diff, pins):
    """The differences no pin of PINS explains, and the pins that explain nothing or show
    other pairs than they say: both empty when the scenario matches the reference as documented."""
    left, wrong = dict(diff), []
    for name in pins:
        for pattern, pairs in PINS[name][1].items():
            hit = {path: diff[path] for path in diff if re.fullmatch(pattern, path)}
            seen = set().union(*hit.values()) if hit else set()
            if not hit or (pairs is not None and seen != pairs):
                wrong.append(f"{name}: {pattern} shows {sorted(seen, key=str)}, pinned {pairs}")
            for path in hit:
                left.pop(path, None)
    return left, wrong


# ---------------------------------------------------------------- scenarios

SPELLED = {"bridge": "cni0", "isGateway": True, "isDefaultGateway": False, "ipMasq": False,
           "forwardAccept": False, "hairpinMode": False, "ipam": {"type": "host-local", "subnet": "10.22.0.0/24"}}
CLASSIC = dict(SPELLED, isDefaultGateway=True, ipMasq=True)
V6 = {"type": "host-local", "ranges": [[{"subnet": "fd00:22::/64"}]]}
DUAL = {"type": "host-local", "ranges": [[{"subnet": "10.22.0.0/24"}], [{"subnet": "fd00:22::/64"}]]}
# ptp has no bridge and no default route of its own: ours in routed mode, the routes spelled
ROUTED = {"mode": "routed", "isGateway": True, "isDefaultGateway": False, "ipMasq": True, "forwardAccept": False,
          "ipam": {"type": "host-local", "subnet": "10.22.0.0/24", "routes": [{"dst": "0.0.0.0/0"}]}}
LIFE = [("ADD", "a"), ("CHECK", "a"), ("PING", "a"), ("DEL", "a"), ("DEL", "a")]
TWO = [("ADD", "a"), ("ADD", "b"), ("PING", "a"), ("PING", "b"), ("CHECK", "b"), ("DEL", "b"), ("DEL", "a")]
CHURN = [("ADD", "a"), ("ADD", "b"), ("ADD", "c"), ("DEL", "b"), ("ADD", "d"), ("CHECK", "c"), ("PING", "c"),
         ("DEL", "a"), ("ADD", "b"), ("DEL", "d"), ("DEL", "c"), ("DEL", "b"), ("DEL", "b")]
LIFO = [("ADD", p) for p in "abcde"] + [("PING", "e")] + [("DEL", p) for p in "edcba"] + [("ADD", "f"), ("DEL", "f")]
GONE = [("ADD", "a"), ("ADD", "b"), ("RMNS", "a"), ("DEL", "a"), ("DEL-bare", "a"), ("DEL-bare", "b"), ("DEL", "b")]

EVERY_ADD = ("host veth MAC set", "accept_dad on IPv4-only pods")
V6_ADD = ("host veth MAC set",)

# name: (config, steps, the pinned differences it shows)
SCENARIOS = {
    "gateway only": (SPELLED, LIFE, EVERY_ADD),
    "no gateway": (dict(SPELLED, isGateway=False), LIFE, EVERY_ADD + ("bridge MAC set without a gateway",)),
    "classic: isGateway isDefaultGateway ipMasq": (CLASSIC, LIFE, EVERY_ADD),
    "isGateway ipMasq": (dict(SPELLED, ipMasq=True), LIFE, EVERY_ADD),
    "isDefaultGateway alone": (dict(SPELLED, isGateway=False, isDefaultGateway=True), LIFE, EVERY_ADD),
    "hairpinMode mtu": (dict(SPELLED, hairpinMode=True, mtu=1400), LIFE, EVERY_ADD),
    "promiscMode": (dict(SPELLED, promiscMode=True), LIFE, EVERY_ADD),
    "vlan": (dict(SPELLED, vlan=100), LIFE, ("no vlan filtering here",)),
    "macspoofchk": (dict(SPELLED, macspoofchk=True), LIFE, EVERY_ADD + ("macspoofchk", "pod MAC set with macspoofchk")),
    "forceAddress": (dict(SPELLED, forceAddress=True), LIFE, EVERY_ADD),
    "portIsolation": (dict(SPELLED, portIsolation=True), LIFE, EVERY_ADD + ("portIsolation",)),
    "ipv6 classic": (dict(CLASSIC, ipam=V6), LIFE, V6_ADD),
    "ipv6 enabledad": (dict(SPELLED, enabledad=True, ipam=V6), LIFE, ("host veth MAC set",)),
    "dual-stack classic": (dict(CLASSIC, ipam=DUAL), LIFE, V6_ADD),
    "ranges, routes, gateway": (dict(CLASSIC, ipam={"type": "host-local", "ranges": [[
        {"subnet": "10.22.0.0/24", "rangeStart": "10.22.0.100", "rangeEnd": "10.22.0.102", "gateway": "10.22.0.254"}]],
        "routes": [{"dst": "198.51.100.0/24"}, {"dst": "203.0.113.0/24", "gw": "10.22.0.254"}]}), LIFE,
        EVERY_ADD + ("reference CHECK fails on a route without gw",)),
    "churn classic": (CLASSIC, CHURN, EVERY_ADD),
    "churn dual-stack hairpin": (dict(CLASSIC, hairpinMode=True, ipam=DUAL), CHURN, V6_ADD),
    "netns gone, DEL twice": (CLASSIC, GONE, EVERY_ADD + ("DEL without netns removes the veth and rules",)),
    "cniVersion 0.4.0": (dict(CLASSIC, cniVersion="0.4.0"), LIFE, EVERY_ADD),
    "two pods, hairpinMode": (dict(CLASSIC, hairpinMode=True), TWO, EVERY_ADD),
    "two pods, portIsolation": (dict(CLASSIC, portIsolation=True), TWO,
                                EVERY_ADD + ("portIsolation", "isolated pods do not reach each other")),
    "two pods, macspoofchk": (dict(CLASSIC, macspoofchk=True), TWO,
                              EVERY_ADD + ("macspoofchk", "pod MAC set with macspoofchk")),
    "five pods, deleted last first, ipv6 mtu": (dict(CLASSIC, mtu=1400, ipam=V6), LIFO, V6_ADD),
    "requested IP and MAC (CNI_ARGS)": (
        CLASSIC, [("ADD", "a", {"args": "IgnoreUnknown=1;IP=10.22.0.42;MAC=0a:58:0a:16:00:2a"}),
                  ("ADD", "b"), ("CHECK", "a"), ("PING", "b"), ("DEL", "a"), ("DEL", "b")], EVERY_ADD),
    "bridge made by someone else": (CLASSIC, [("SH", "ip link add cni0 type bridge")] + LIFE,
                                    EVERY_ADD + ("accept_ra on a bridge made by someone else",)),
    "forceAddress replaces another address": (
        dict(SPELLED, forceAddress=True), [("SH", "ip link add cni0 type bridge && ip addr add 10.22.0.99/24 dev cni0")]
        + LIFE, EVERY_ADD + ("accept_ra on a bridge made by someone else",)),
    "without forceAddress another address is kept": (
        SPELLED, [("SH", "ip link add cni0 type bridge && ip addr add 10.22.0.99/24 dev cni0")] + LIFE,
        ("a second address without forceAddress",)),
    "cni0 is not a bridge": (CLASSIC, [("SH", "ip link add cni0 type veth peer name cni0peer")] + LIFE,
                             ("not a bridge",)),
    "hairpinMode with promiscMode": (dict(SPELLED, hairpinMode=True, promiscMode=True), LIFE,
                                     ("hairpinMode with promiscMode",)),
    "cniVersion 0.3.1 (no CHECK)": (dict(CLASSIC, cniVersion="0.3.1"), LIFE, EVERY_ADD),
    "runtimeConfig mac": (dict(CLASSIC, runtimeConfig={"mac": "0a:58:0a:16:00:07"}), LIFE, EVERY_ADD),
    "two IPv4 range sets": (dict(CLASSIC, ipam={"type": "host-local", "ranges": [
        [{"subnet": "10.22.0.0/24"}], [{"subnet": "10.23.0.0/24"}]]}), TWO, ("two IPv4 gateways",)),
    "pool exhausted": (dict(CLASSIC, ipam={"type": "host-local", "subnet": "10.22.0.0/30"}),
                       [("ADD", "a"), ("ADD", "b"), ("DEL", "b"), ("DEL", "a"), ("ADD", "b"), ("DEL", "b")],
                       EVERY_ADD + ("pool exhausted",)),
    "ADD twice": (CLASSIC, [("ADD", "a"), ("ADD", "a"), ("CHECK", "a"), ("PING", "a"), ("DEL", "a")],
                  EVERY_ADD + ("ADD twice",)),
    "routed mode against ptp": (ROUTED, TWO, ("routed: host-sized pod addresses", "routed: pod sysctls (IPv4)"),
                                "reference ptp"),
    "routed mode against ptp, dual-stack": (
        dict(ROUTED, ipam=dict(DUAL, routes=[{"dst": "0.0.0.0/0"}, {"dst": "::/0"}])), TWO,
        ("routed: host-sized pod addresses", "routed: pod sysctls", "routed: host gateway without DAD"),
        "reference ptp"),
    "ipMasqBackend nftables (newer than the reference)": (dict(CLASSIC, ipMasqBackend="nftables"), LIFE,
                                                          EVERY_ADD + ("ipMasqBackend",)),
    "vlanTrunk (newer than the reference)": (dict(SPELLED, vlanTrunk=[{"id": 100}]), LIFE,
                                             ("vlanTrunk without vlan filtering",)),
    "disableContainerInterface (newer than the reference)": (dict(SPELLED, disableContainerInterface=True), LIFE,
                                                             ("disableContainerInterface",)),
    "CHECK after the pod lost its address": (
        CLASSIC, [("ADD", "a"), ("SH", "ip -n a addr flush dev eth0"), ("CHECK", "a"), ("DEL", "a")],
        EVERY_ADD + ("CHECK finds it", "DEL removes the chain the pod's addresses no longer name")),
    "CHECK after the host veth went": (
        CLASSIC, [("ADD", "a"), ("ADD", "b"), ("SH", "ip -n a link del eth0"), ("CHECK", "a"), ("CHECK", "b"),
                  ("DEL", "a"), ("DEL", "b")],
        EVERY_ADD + ("CHECK finds it", "DEL removes the chain the pod's addresses no longer name")),
    "defaults": ({"bridge": "cni0", "ipam": {"type": "host-local", "subnet": "10.22.0.0/24"}}, LIFE,
                 EVERY_ADD + ("defaults", "bridge MAC set without a gateway")),
}


def _vlan_filtering():
    """Can this kernel filter VLANs on a bridge (CONFIG_BRIDGE_VLAN_FILTERING)?  Asked in the
    test's own sandbox."""
    if subprocess.run(["ip", "link", "add", "vlanprobe", "type", "bridge", "vlan_filtering", "1"],
                      capture_output=True).returncode != 0:
        return False
    subprocess.run(["ip", "link", "del", "vlanprobe"], check=True)
    return True


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_same_as_reference_but_the_documented_differences(name):
    conf, steps, pins, *reference = SCENARIOS[name]
    if {"no vlan filtering here", "vlanTrunk without vlan filtering"} & set(pins) and _vlan_filtering():
        pytest.skip("this kernel filters VLANs: the vlan scenario's differences were measured on one that does not")
    diff = compare(conf, steps, *reference)
    for path, pairs in sorted(diff.items()):   # shown with -s, or when it fails
        print(f"{path}: {sorted(pairs, key=str)}")
    left, wrong = unexplained(diff, pins)
    assert not left and not wrong, "\n".join(
        [f"not as the reference: {path}: {sorted(pairs, key=str)}" for path, pairs in sorted(left.items())] + wrong)


def test_a_pin_must_show_exactly_what_it_says():
    """The comparison's own rules: an unpinned difference, a pin that matches nothing and a pin
    whose pairs changed are each reported."""
    assert unexplained({"state.links": {("a", "b")}}, ()) == ({"state.links": {("a", "b")}}, [])
    assert unexplained({}, ("ADD twice",))[1]
    assert unexplained({"outcome.error": {(103, 1)}}, ("ADD twice",))[1]
    assert unexplained({"outcome.error": {(103, 999)}}, ("ADD twice",)) == ({}, [])


def test_every_pin_is_documented_and_used():
    with open(PLUGIN_DOC) as f:
        doc = f.read()
    used = {p for _, _, pins, *_ in SCENARIOS.values() for p in pins}
    assert used == set(PINS)
    missing = [name for name in PINS if f"`{name}`" not in doc]
    assert not missing, f"docs/plugin.md lacks a row for {missing}"
