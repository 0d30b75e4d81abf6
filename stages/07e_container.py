#!/usr/bin/env python3
"""Lesson 07e: your container is a namespace. Find a running container's network from the
outside, then a pod: a pause process holding one network namespace and two containers in it.

    sudo python3 stages/07e_container.py           # in a throwaway sandbox
    python3 stages/07e_container.py --dry-run      # the lesson as a shell script
    sudo python3 stages/07e_container.py --runtime podman         # c1 started by podman, in the sandbox
    sudo python3 stages/07e_container.py --host --container web   # YOUR running container "web"

It comes after 07 because it reads back, from a running container, what the earlier lessons
built by hand: the veth (02), the bridge (03), the NAT rules (05) and a runtime's wiring (07).

The container is made by a "bare" runtime, the way Docker, podman and containerd make one
underneath: a process started in fresh namespaces (`unshare --net --uts --ipc`), a veth pair
whose container end is moved into the process's network namespace by its PID and named eth0,
its host end on a bridge, and NAT for the bridge's subnet. Like Docker (before 25.0) it
derives eth0's MAC from the address (02:42 + the IPv4 bytes) and names no namespace under
/run/netns; it records what it gave the container (PID, address, MAC, host end, bridge),
as `docker inspect` reports it, and the lesson's proofs match what it found from the outside
against that record. Nothing here depends on a daemon, so the lesson runs in its sandbox in a
second or two and leaves nothing behind.

With --runtime podman, podman starts c1 instead, for real, in a store of the sandbox's own,
on a network it makes with the reference plugins (bridge with ipMasq): what the lesson finds is
then matched against `podman inspect`.

With --host --container NAME it looks at your own running container instead (Docker's if its
daemon answers and knows NAME, else podman's; --runtime picks): `inspect` gives its PID and its
first network's address, MAC and gateway, and every step after that only reads. It never gives
that container's namespace a name (the name would keep the namespace alive after the container)
and never sends a packet from it (it is not the lesson's); the pod part still uses the lesson's
own processes.
"""
import contextlib
import ipaddress
import os
import re
import sys
from dataclasses import dataclass, field

from lesson import PING, Expand, Lesson, cnikit, ip
import kindlike  # noqa: E402  (after lesson: it puts cnikit on the path)

BRIDGE, GATEWAY, SUBNET = "br0", "10.0.9.1/24", "10.0.9.0/24"
# Stands for the host's uplink, the interface NAT masquerades out of: one end of a veth pair whose
# other end goes nowhere (a dummy link would do, but not every kernel has the module).
UPLINK, UPLINK_FAR = "uplink0", "uplink0-far"
GATEWAY_IP = GATEWAY.split("/")[0]
CONTAINER, POD = "c1", "pod1"
ADDRS = {CONTAINER: "10.0.9.2/24", POD: "10.0.9.3/24"}
NAME = "c1"                 # what `ip netns attach` names the container's namespace, for a moment
# What a pod's containers share with its pause container (Kubernetes: network, IPC, UTS).
SHARED = ("--net", "--uts", "--ipc")
PORT = 8080
GREETING = "hello-from-app-over-localhost"
WAIT = "5"                  # seconds a process gets to start (exec after entering its namespaces)
# --host --container NAME: the learner's own running container, looked at and never changed.
# What `docker inspect` and `podman inspect` both answer (a container's first network).
INSPECT = ("{{.State.Pid}} {{.State.Running}} {{range .NetworkSettings.Networks}}{{.IPAddress}} "
           "{{.IPPrefixLen}} {{.MacAddress}} {{.Gateway}} {{end}}")
RUNTIMES = ("docker", "podman")
# --runtime podman: the lesson's c1 is podman's, on a network podman makes with the reference
# plugins (bridge with ipMasq, portmap, firewall, tuning), in a store of the sandbox's own.
PODMAN_NET, PODMAN_SUBNET = "lesson07e", "10.0.19.0/24"


def host_end(name):
    return f"veth-{name}"


def mac_of(cidr):
    """Docker's MAC before 25.0: 02:42 and the four bytes of the IPv4 address."""
    return "02:42:" + ":".join(f"{int(b):02x}" for b in cidr.split("/")[0].split("."))


@dataclass
class Runtime:
    """The lesson's container runtime: how it was asked to run (RUNTIME: "bare" or "podman"; PICKED:
    the record of the learner's own container, --container NAME), what goes when the lesson ends
    (CLEANUP: podman's store), what it started (PROCS, newest last; ENDS, the host ends of its
    veths; PODMAN: podman's c1 and network), and what build found for verify: c1's RECORD (as
    `docker inspect` reports it), `ip netns identify` before and after the name, the HOST_END
    found by index and its MASTER, c1's SUBNET and the iptables-save lines for it, POD_PROCS."""
    runtime: str = "bare"
    picked: dict = None
    cleanup: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    procs: list = field(default_factory=list)
    ends: list = field(default_factory=list)
    podman: bool = False
    record: dict = None
    pod: dict = None
    identify_before: str = ""
    identify_after: str = ""
    host_end: str = None
    master: str = None
    subnet: str = ""
    nat_lines: list = field(default_factory=list)
    masquerade: list = field(default_factory=list)
    pod_procs: dict = field(default_factory=dict)

    @property
    def own(self):
        """c1 is the bare runtime's, started by the lesson."""
        return self.runtime == "bare" and not self.picked

    @property
    def started(self):
        """The lesson started c1 (packets from it are its own)."""
        return not self.picked


LESSON = Lesson(
    "07e", "container",
    goal="a running container is a process in its own network namespace: found from the outside by its "
         "PID, its eth0 and address match what the runtime reports, its host end is eth0's veth peer on "
         "its bridge, with NAT for the subnet; a pod's two containers share the pause process's namespace and "
         "talk over localhost",
    picture=r"""
   +--------------------------------- host -----------------------------------+
   |  /proc/PID/ns/net: net:[inode]    (the host's own, and one per container) |
   |  uplink0  <- MASQUERADE -s 10.0.9.0/24 (NAT for the bridge's subnet)      |
   |  br0  10.0.9.1/24                                                         |
   |     |-- veth-c1  (index N)             |-- veth-pod1                      |
   +-----|---------------------------------------|-------------------------- +
         | eth0@ifN: peer index N                |
   +-- c1: PID (sleep) ---+   +-- pod1: pause PID holds the namespace -------+
   | eth0 10.0.9.2/24     |   | eth0 10.0.9.3/24, lo                          |
   | 02:42:0a:00:09:02    |   |   app: socat on 127.0.0.1:8080  (nsenter -t)  |
   +----------------------+   |   sidecar: connects to 127.0.0.1:8080         |
                              +-----------------------------------------------+
""",
    skips={"master": "veth-c1 is not a port of br0: the container's host end has no master bridge, and c1 "
                     "cannot reach its gateway",
           "nat": "no NAT for 10.0.9.0/24: iptables-save has no line for the container's subnet",
           "join": "the sidecar starts in a namespace of its own instead of the pause process's: it has another "
                   "netns inode, other interfaces, and 127.0.0.1:8080 does not answer there"},
    tools=("ip", "ping", "iptables", "iptables-save", "nsenter", "unshare", "socat", "ss", "readlink", "timeout"),
    state=Runtime,
)


# ---------------------------------------------------------------- the bare runtime

def pid_word(L, proc):
    """A started process's PID as a command word: its number; in a dry run the shell variable
    the script keeps it in ($! of the job), known only when the script runs."""
    return str(proc.pid) if proc is not None else Expand("$" + L.r.jobs[-1])


def proc_path(pid, what):
    """/proc/PID/WHAT as a command word (one the script expands when PID is its variable)."""
    path = f"/proc/{pid}/{what}"
    return Expand(path) if isinstance(pid, Expand) else path


def ip_pid(*args):
    """`ip ARGS` where a word may be a PID the script expands (cnikit's ip() makes each a plain str)."""
    return ["ip", *args]


def in_ns_of(pid, argv, *namespaces):
    """ARGV inside the namespaces of process PID (default: its network namespace)."""
    return ["nsenter", "-t", pid, *(namespaces or ("-n",))] + list(argv)


def wait_exec(L, pid, comm):
    """Wait until process PID has become COMM: it execs only after entering its namespaces,
    so from then on /proc/PID/ns/ shows where it lives (a runtime waits for its start too)."""
    script = 'until grep -qx "$2" /proc/$1/comm; do sleep 0.02; done'
    L.r.run(["timeout", WAIT, "sh", "-c", script, "sh", pid, comm])


def start(L, rt, argv, comm):
    """Start a container's process in the background; returns (Popen or None, its PID word)."""
    proc = L.r.spawn(argv)
    rt.procs.append(proc)
    pid = pid_word(L, proc)
    wait_exec(L, pid, comm)
    return proc, pid


def plug(L, name):
    L.r.run(ip("link", "set", "dev", host_end(name), "master", BRIDGE))


def wire(L, rt, name, pid, master=True):
    """What a runtime (or its CNI plugin) does for a container's network: a veth pair made on
    the host, its container end moved into the namespace of PID as eth0 (MAC from the address),
    the address and default route inside, the host end up and (MASTER) a port of the bridge.
    Returns the record the runtime keeps, as `docker inspect` reports it."""
    r, cidr = L.r, ADDRS[name]
    # The host end is the runtime's: stop_containers deletes it with the container (also after a
    # failure), so it is listed for --host but not rolled back (it would be gone by then).
    r.run(ip_pid("link", "add", host_end(name), "type", "veth", "peer", "name", "eth0", "address", mac_of(cidr),
             "netns", pid), creates=cnikit.Change("link", host_end(name)))
    rt.ends.append(host_end(name))
    r.run(cnikit.tag_link(host_end(name)))
    for argv in (ip("addr", "add", cidr, "dev", "eth0"), ip("link", "set", "dev", "eth0", "up"),
                 ip("link", "set", "dev", "lo", "up"), ip("route", "add", "default", "via", GATEWAY_IP)):
        r.run(in_ns_of(pid, argv))
    r.run(cnikit.link_up(host_end(name)))
    if master:
        plug(L, name)
    return {"name": name, "runtime": "bare", "pid": pid, "ip": cidr.split("/")[0], "prefix": cidr.split("/")[1],
            "mac": mac_of(cidr), "gateway": GATEWAY_IP, "host_end": host_end(name)}


# ---------------------------------------------------------------- the lesson

def build(L, rt):
    try:
        _build(L, rt)
    except BaseException:
        stop_containers(L, rt, failed=True)
        raise


def _build(L, rt):
    r = L.r
    L.step("the bare runtime's network on the host (for its containers and the pod below), as Docker makes "
           f"docker0: a bridge with the gateway address, and NAT for its subnet out of the uplink ({UPLINK} "
           "stands for it here)")
    cnikit.bridge_add(r, BRIDGE, addr=GATEWAY)
    r.run(ip("link", "add", UPLINK, "type", "veth", "peer", "name", UPLINK_FAR), creates=cnikit.Change.link(UPLINK))
    r.run(cnikit.tag_link(UPLINK))
    r.run(cnikit.link_up(UPLINK))
    if L.step(f"masquerade what {SUBNET} sends out of {UPLINK} (lesson 05), as Docker does for docker0's subnet",
              skip="nat"):
        cnikit.nat_add(r, SUBNET, UPLINK)

    if rt.picked:
        record = dict(rt.picked)
        L.step(f"your container {record['name']}, as {record['runtime']} reports it: its PID and its first "
               "network's address, MAC and gateway (the lesson only looks at it: it changes nothing there)")
        r.show([record["runtime"], "inspect", "-f", INSPECT, record["name"]])
    elif rt.runtime == "podman":
        record = start_podman(L, rt)
    else:
        L.step("start a container the way every runtime does underneath: a process in fresh network, UTS and IPC "
               "namespaces (`unshare`, what runc does with clone flags). Nothing names its network namespace: "
               "it lives as long as a process (or a mount) holds it. (This bare runtime needs no daemon, so it "
               "runs anywhere, the sandbox included; `--runtime podman` has podman start c1, `--host --container "
               "NAME` looks at your own Docker or podman container)")
        _, pid = start(L, rt, ["unshare", *SHARED, "sleep", "infinity"], "sleep")
        L.step("wire it as a runtime's network driver does: the veth is made on the host and its peer moved into "
               "the namespace of the container's PID (`netns PID`), named eth0, given the address and a default "
               "route")
        record = wire(L, rt, CONTAINER, pid, master=False)
        if L.step(f"its host end becomes a port of {BRIDGE}", skip="master"):
            plug(L, CONTAINER)
    record.setdefault("ifname", "eth0")
    if record["runtime"] != "bare" and not r.dry_run:
        # A container on several networks has eth0, eth1...: the interface that holds the address
        # the runtime reports is the one whose veth this is about.
        for link in r.query_json(in_ns_of(record["pid"], ip("-j", "-4", "addr"))) or []:
            if any(a.get("local") == record["ip"] for a in link.get("addr_info", [])):
                record["ifname"] = link["ifname"]
    rt.record = record
    pid, name, dev = record["pid"], record["name"], record["ifname"]
    L.say(f"the {record['runtime']} runtime's record of {name} (what `docker inspect` reports): pid {pid}, "
          f"IPAddress {record['ip']}/{record['prefix']}, MacAddress {record['mac']}, Gateway {record['gateway']}")

    # From here on the lesson only looks: everything below is what you can do to any container.
    L.step("find it from the outside. Its PID is the key (Docker: `docker inspect -f '{{.State.Pid}}' NAME`); "
           "/proc/PID/ns/net is its network namespace, an inode: compare it with the host's own")
    r.show(["readlink", proc_path(pid, "ns/net"), "/proc/self/ns/net"])

    L.step("enter only its network namespace and look: `nsenter -t PID -n` runs a host tool (ip) in there, "
           "so it works even for an image without ip")
    r.show(in_ns_of(pid, ip("-br", "addr")))

    L.step("`ip netns identify PID` names a process's namespace only if it is bound under /run/netns. Docker "
           "and the bare runtime never put it there: no answer. podman and containerd's CRI do (/run/netns/"
           "netns-..., cni-...): a name. `ip netns attach NAME PID` binds one there, and `ip -n NAME` works on it")
    rt.identify_before = r.show(ip_pid("netns", "identify", pid))
    if rt.picked:
        L.say("(your container gets no name from the lesson: a name under /run/netns would keep its namespace "
              "alive after it stops)")
    elif rt.runtime == "podman":
        L.say("podman made the namespace first, named under /run/netns, then started the container in it")
    else:
        r.run(ip_pid("netns", "attach", NAME, pid), creates=cnikit.Change("netns", NAME))
        try:
            rt.identify_after = r.show(ip_pid("netns", "identify", pid))
        finally:
            # The name would keep the namespace (and its veth) alive after the container: drop it now.
            r.run(ip("netns", "del", NAME))

    L.step(f"{dev}'s @ifN is its veth peer's interface index (iflink) in the namespace it links to: here, the host")
    link = r.show(in_ns_of(pid, ip("-o", "link", "show", "dev", dev)))
    peer_index = _iflink_from_o_line(link)
    L.say(f"{dev}@if{peer_index}: the host interface with index {peer_index} is its other end" if peer_index else
          f"{dev}@ifN: the host interface with index N is its other end")

    L.step(f"the host's veths with their indexes: the one with {dev}'s N is the host end; `master` names its bridge")
    veths = r.show(ip("-o", "link", "show", "type", "veth"))
    found, master = _with_index(veths, peer_index)
    rt.host_end, rt.master = found, master
    if found:
        L.say(f"index {peer_index} is {found}" + (f", a port of {master}" if master else ", a port of no bridge"))
    elif r.dry_run:
        found, master = host_end(CONTAINER), BRIDGE
        L.say(f"here it is {found}, a port of {master}")
    if master:
        r.show(ip("-br", "link", "show", "master", master))
        r.show(ip("-br", "addr", "show", "dev", master))

    subnet = str(ipaddress.ip_network(f"{record['ip']}/{record['prefix']}", strict=False))
    rt.subnet = subnet
    L.step(f"the NAT and forward rules for its subnet {subnet}: the lines of `iptables-save` that name it or its "
           "address, and the MASQUERADE they lead to (directly, or in the chain they jump to)")
    save = ["iptables-save"]
    r.echo(save)
    if not r.dry_run:
        lines, masq = rules_for(r.execute(save).stdout, subnet, record["ip"])
        rt.nat_lines, rt.masquerade = lines, masq
        if not r.quiet:
            r.output("\n".join(dict.fromkeys(lines + masq)) or "(no line names it)")

    L.step("a pod: its pause container is only a process holding fresh namespaces; the runtime wires that "
           "namespace once (one eth0 for the whole pod)")
    _, pause = start(L, rt, ["unshare", *SHARED, "sleep", "infinity"], "sleep")
    rt.pod = wire(L, rt, POD, pause)

    L.step("the app container joins the pause process's namespaces (`nsenter -t PAUSE_PID --net --uts --ipc`, "
           "what runc does for a pod's containers with the pause's /proc/PID/ns/ paths) and listens on 127.0.0.1")
    app_proc = r.spawn(in_ns_of(pause, ["socat", f"TCP-LISTEN:{PORT},bind=127.0.0.1,reuseaddr,fork",
                                        f"SYSTEM:echo {GREETING}"], *SHARED))
    rt.procs.append(app_proc)
    app = pid_word(L, app_proc)
    script = f'until ss -Htln "sport = :{PORT}" | grep -q .; do sleep 0.02; done'
    r.run(in_ns_of(pause, ["timeout", WAIT, "sh", "-c", script]))

    if L.step("the sidecar container joins the same namespaces", skip="join"):
        _, side = start(L, rt, in_ns_of(pause, ["sleep", "infinity"], *SHARED), "sleep")
    else:
        L.say("instead, it starts as a container of its own: fresh namespaces")
        _, side = start(L, rt, ["unshare", *SHARED, "sleep", "infinity"], "sleep")
    rt.pod_procs = {"pause": pause, "app": app, "sidecar": side}

    L.step("look from each container of the pod: one network namespace, so one `ip addr` (the pod's eth0 and "
           "its own lo, where 127.0.0.1 is)")
    for who in (app, side):
        r.show(in_ns_of(who, ip("-br", "addr")))


def verify(L, rt):
    try:
        _verify(L, rt)
    except BaseException:
        stop_containers(L, rt, failed=True)
        raise
    stop_containers(L, rt)


def stop_containers(L, rt, failed=False):
    """Stop what the lesson's runtime started, as a runtime does: CNI DEL's part first (deleting the
    host end of a veth takes its peer with it), then the processes, newest first; their namespaces
    go with the last of them. After a failure (FAILED, Ctrl-C or q included) without pausing, and
    only the host ends that exist: the kernel would dismantle them too, but only after the lesson
    has ended, and the host must be as it was when it ends."""
    r = L.r
    if failed:
        r.stepping, r.present = None, None
    else:
        L.say("")
        L.say("stop the pod and the container as a runtime does: CNI DEL's part first (deleting the host end "
              "of a veth takes its peer with it), then the processes; their namespaces go with the last of them")
    for end in reversed(rt.ends):
        if not failed or (not r.dry_run and cnikit.get_link(r, end)):
            r.run(ip("link", "del", end), check=not failed)
    rt.ends = []
    for proc in reversed(rt.procs):
        r.stop(proc)
    rt.procs = []
    if rt.podman:
        rt.podman = False
        r.run(["podman", "rm", "-f", "-t", "0", CONTAINER], check=not failed)
        r.run(["podman", "network", "rm", PODMAN_NET], check=not failed)


def _verify(L, rt):
    r = L.r
    record, own = rt.record, rt.own
    pid, name = record["pid"], record["name"]
    runtime = "the bare runtime" if own else record["runtime"]
    host_ns, c1_ns = _readlink(L, "/proc/self/ns/net"), _readlink(L, proc_path(pid, "ns/net"))
    L.check(f"{name} lives in a network namespace of its own (its net:[inode] is not the host's)",
            c1_ns and host_ns and c1_ns != host_ns, f"{c1_ns} vs {host_ns}")

    dev = record["ifname"]
    eth0 = _link_json(r, in_ns_of(pid, ip("-j", "addr", "show", "dev", dev)))
    found_ip = [a["local"] for a in eth0.get("addr_info", []) if a.get("family") == "inet"]
    L.check(f"{dev} found through PID {pid} has the address {runtime} reports, {record['ip']}",
            record["ip"] in found_ip, f"found {found_ip}")
    L.check(f"{dev} found through PID {pid} has the MAC {runtime} reports, {record['mac']}",
            eth0.get("address") == record["mac"], f"found {eth0.get('address')}")
    if own:
        L.check("`ip netns identify PID` was empty (no name under /run/netns) until `ip netns attach` named it",
                not (rt.identify_before or "").strip() and (rt.identify_after or "").split() == [NAME],
                f"before {rt.identify_before!r}, after {rt.identify_after!r}")

    found = rt.host_end
    host = _link_json(r, ip("-j", "-d", "link", "show", "dev", found)) if found else {}
    if own:
        L.check(f"the host interface with {dev}'s peer index is the runtime's host end {record['host_end']}",
                found == record["host_end"], f"found {found}")
    L.check(f"the host end {found} and {dev} are each other's peer (iflink = the other's ifindex, both ways)",
            host and eth0 and eth0.get("link_index") == host.get("ifindex")
            and host.get("link_index") == eth0.get("ifindex"))
    master = host.get("master")
    bridge = _link_json(r, ip("-j", "-d", "addr", "show", "dev", master)) if master else {}
    on_bridge = [a["local"] for a in bridge.get("addr_info", []) if a.get("family") == "inet"]
    L.check(f"its master is a bridge holding the gateway {runtime} reports, {record['gateway']}",
            bridge.get("linkinfo", {}).get("info_kind") == "bridge" and record["gateway"] in on_bridge,
            f"master {master}, addresses {on_bridge}")
    if rt.started:     # a packet from the learner's container would leave namespaces the lesson made
        L.check(f"{name} reaches its gateway {record['gateway']} through veth and bridge",
                r.probe(in_ns_of(pid, [*PING, record["gateway"]]))[0])
    L.check(f"iptables-save masquerades {rt.subnet} (a MASQUERADE rule names it or is jumped to for it)",
            rt.masquerade, "no such line")

    procs = rt.pod_procs
    inodes = {role: _readlink(L, proc_path(p, "ns/net")) for role, p in procs.items()}
    L.check("pause, app and sidecar share one network namespace (one net:[inode])",
            len(set(inodes.values())) == 1 and all(inodes.values()) and inodes["pause"] != host_ns,
            ", ".join(f"{k} {v}" for k, v in inodes.items()))
    seen = {role: _interfaces(r, procs[role]) for role in ("app", "sidecar")}
    L.check("`ip addr` seen from the app and from the sidecar shows the same interfaces",
            seen["app"] and seen["app"] == seen["sidecar"], f"app {seen['app']}, sidecar {seen['sidecar']}")
    ok, out = r.probe(in_ns_of(procs["sidecar"], ["socat", "-u", f"TCP:127.0.0.1:{PORT},connect-timeout=2", "-"]))
    L.check(f"the sidecar reaches the app on 127.0.0.1:{PORT} (localhost is the pod's)", ok and GREETING in out,
            out.strip().splitlines()[-1] if out.strip() else "no answer")

    L.suggest(f"nsenter -t {pid} -n ip -br addr   # {name}'s network namespace, entered by its PID",
              f"nsenter -t {procs['sidecar']} -n ss -tln   # the pod's listener, seen from the sidecar",
              f"readlink /proc/{procs['app']}/ns/net /proc/{procs['sidecar']}/ns/net")
    # The containers are processes of this lesson: they end with it, --keep or not (a host keeps br0 and NAT).
    L.explore("then the containers stop and everything goes")


# ---------------------------------------------------------------- reading what was found

def _iflink_from_o_line(line):
    """N of `IFNAME@ifN:` in an `ip -o link` line (None when there is none)."""
    head = (line or "").split(":")
    if len(head) > 1 and "@if" in head[1]:
        n = head[1].split("@if", 1)[1].strip()
        return int(n) if n.isdigit() else None
    return None


def _with_index(lines, index):
    """(name, master) of the interface whose index is INDEX in `ip -o link` output."""
    for line in (lines or "").splitlines():
        parts = line.split(":")
        if index is not None and len(parts) > 1 and parts[0].strip() == str(index):
            master = re.search(r" master (\S+) ", line)
            return parts[1].strip().split("@")[0], master.group(1) if master else None
    return None, None


def rules_for(save, subnet, addr):
    """The `iptables-save` lines that name SUBNET or ADDR (/32), and the MASQUERADE lines they
    lead to: among them, or one jump away (cnikit's CNIKIT-NAT-..., the reference bridge plugin's
    CNI-... chain per container; Docker's rule masquerades the subnet itself)."""
    table, named, jumps, rules = None, [], set(), []
    for line in save.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith("-A "):
            rules.append((table, line))
            if subnet in line or f"{addr}/32" in line:
                named.append(line)
                target = re.search(r" -j (\S+)", line)
                if target:
                    jumps.add((table, target.group(1)))
    masq = [line for table, line in rules if line.endswith("-j MASQUERADE") or " -j MASQUERADE " in line
            if line in named or (table, line.split()[1]) in jumps]
    return named, masq


def _readlink(L, path):
    ok, out = L.r.probe(["readlink", path])
    return out.strip() if ok else ""


def _link_json(r, argv):
    data = r.query_json(argv)
    return data[0] if data else {}


def _interfaces(r, pid):
    """(name, IPv4 addresses) of every interface `ip -j addr` shows inside PID's network namespace
    (IPv6 link-local addresses come and go with DAD: not what tells namespaces apart)."""
    data = r.query_json(in_ns_of(pid, ip("-j", "addr"))) or []
    return sorted((l["ifname"], tuple(sorted(a["local"] for a in l.get("addr_info", []) if a.get("family") == "inet")))
                  for l in data)


# ---------------------------------------------------------------- --runtime podman

def start_podman(L, rt):
    """c1 as podman makes it, in the sandbox: a network (a conflist of the reference plugins that
    libcni runs at `podman run`), the container, then what `podman inspect` reports of it."""
    r = L.r
    L.step("podman, in a store of this sandbox's own: a network first (podman writes a CNI conflist: bridge "
           "with isGateway and ipMasq, portmap, firewall, tuning), then a container on it (its filesystem an "
           "overlay of this machine's, --rootfs /:O: no image to fetch); podman makes the namespace, libcni "
           "calls the plugins, runc starts the process in it")
    rt.cleanup.enter_context(kindlike.podman_as_docker("c7e"))
    rt.podman = True
    r.run(["podman", "network", "create", "--subnet", PODMAN_SUBNET, PODMAN_NET])
    r.run(["podman", "run", "-d", "--name", CONTAINER, "--network", PODMAN_NET, "--rootfs", "/:O",
           "sleep", "infinity"])
    L.step("what podman reports of it: its PID and its network's address, MAC and gateway")
    r.show(["podman", "inspect", "-f", INSPECT, CONTAINER])
    return pick(r, CONTAINER, ("podman",))


# ---------------------------------------------------------------- --host --container NAME

def pick(r, name, runtimes=RUNTIMES):
    """The record of the learner's running container NAME, from the first of RUNTIMES that knows
    it (docker only if its daemon answers); a read-only look-up. UsageError when none does."""
    tried = []
    for runtime in runtimes:
        if not cnikit.which(runtime):
            tried.append(f"{runtime} is not installed")
            continue
        ok, out = r.query([runtime, "inspect", "-f", INSPECT, name])
        words = out.split()
        if not ok or len(words) < 2:
            tried.append(f"{runtime} knows no container {name}" if ok or runtime != "docker" else
                         f"docker knows no container {name} (or its daemon does not answer)")
            continue
        if words[1] != "true" or words[0] in ("", "0"):
            raise cnikit.UsageError(f"{runtime} container {name} is not running: start it, or pick a running one")
        if len(words) < 6:
            raise cnikit.UsageError(f"{runtime} container {name} has no network of its own (host or none): "
                                    "there is no namespace of its own to find")
        return {"name": name, "runtime": runtime, "pid": words[0], "ip": words[2], "prefix": words[3],
                "mac": words[4].lower(), "gateway": words[5], "host_end": None}
    raise cnikit.UsageError(f"no running container {name}: " + "; ".join(tried))


NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")      # Docker's and podman's container names


def main(argv=None):
    p = LESSON.parser()
    p.add_argument("--container", metavar="NAME",
                   help="with --host: find YOUR running container NAME (Docker's or podman's) instead of starting "
                        "one; read-only, the lesson never changes it (the pod part still uses its own)")
    p.add_argument("--runtime", choices=("bare",) + RUNTIMES,
                   help="who starts c1 in the sandbox: bare (default: unshare and cnikit, as runtimes do "
                        "underneath) or podman (for real, in a store of the sandbox's own); with --container: "
                        "which runtime to ask (default: docker if its daemon answers, else podman)")
    args = p.parse_args(argv)
    rt = Runtime()
    if args.container is None and args.runtime == "docker":
        p.error("the lesson starts no Docker daemon of its own: run your container, then --host --container NAME")
    if args.container is None and args.runtime == "podman":
        if args.host or args.dry_run:
            p.error("--runtime podman runs podman for real in the lesson's sandbox: no --host (name your own "
                    "container with --container) and no --dry-run (the bare runtime's prints as a script)")
        if set(args.skip) & {"master", "nat"}:
            p.error("with --runtime podman, podman's plugins plug the veth and masquerade: --skip join only")
        missing = [what for what, there in (("podman (apt-get install podman)", cnikit.which("podman")),
                                            ("runc (apt-get install runc)", cnikit.which("runc")),
                                            ("the reference plugins (apt-get install containernetworking-plugins)",
                                             os.path.exists(os.path.join(kindlike.REF_PLUGIN_DIR, "bridge"))))
                   if not there]
        if missing:
            p.error("--runtime podman needs " + ", ".join(missing))
        rt.runtime = "podman"
    if args.container is not None and args.runtime == "bare":
        p.error("--container looks at a docker or podman container: --runtime docker or podman")
    if args.container is not None:
        if not args.host or args.dry_run:
            p.error("--container needs --host and a live run: it looks at a container running on this host")
        if not NAME_RE.match(args.container):
            p.error(f"invalid container name {args.container!r}: letters, digits, '_', '.', '-'")
        if os.geteuid() == 0:     # without root the lesson itself says it needs it
            try:
                rt.picked = pick(cnikit.Runner(quiet=True), args.container,
                                         (args.runtime,) if args.runtime else RUNTIMES)
            except cnikit.UsageError as e:
                p.error(str(e))
    # What the lesson sets up outside the kernel (podman's store) goes when it ends, also on failure.
    with rt.cleanup:
        return LESSON.run(build, verify, args, state=rt)


if __name__ == "__main__":
    sys.exit(main())
