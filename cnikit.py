#!/usr/bin/env python3
"""cnikit: container networking from first principles.

cnikit builds what a CNI plugin builds (network namespaces, veth pairs, a bridge,
NAT egress, a VXLAN overlay) by running iproute2 and iptables, and prints every
command that changes the kernel as a line you can paste into a shell. It also plays
the container runtime (`cnikit cni`): it calls a CNI plugin the way libcni does.

    sudo ./cnikit.py netns add ns1
    sudo ./cnikit.py veth add veth-ns1 eth0 --netns ns1 --addr 10.0.0.1/24 --peer-addr 10.0.0.2/24
    sudo ./cnikit.py show
    sudo ./cnikit.py --dry-run bridge add br0 --addr 10.0.0.1/24 | sh -e

It needs only python3's standard library plus iproute2 (ip, bridge), iptables and
procps (sysctl).  As a library, the stages/ lessons call the same functions:

    r = cnikit.Runner()
    cnikit.netns_add(r, "ns1")

Contents, top to bottom; each part uses only the parts above it (the CLI, last, uses all):

    constants        every name, path, number and limit, once
    errors           CnikitError, UsageError (exit 2), CommandFailed (exit 1)
    validation       pure checks of what a user typed, before anything changes
    argv builders    pure functions: the ip, bridge, iptables and sysctl lines
    changes          Change, the record of what a command makes; the Journal that undoes it
    state            what exists: the live kernel (LiveState) or a plan's picture (PlanState
                     over a FreshHost or over this host, read-only)
    executor         Runner: the only place that runs and echoes a command
    look-ups         the questions and ensure-steps the verbs share
    netns, veth, bridge, route, nat, vxlan
                     the verbs: validate, look up, transaction, ensure, say
    show, cleanup    a picture of what exists; remove exactly what cnikit made
    cni              play the container runtime: call plugins as libcni does, install them
    kind             the same on a kind cluster's nodes (docker exec)
    doctor           walk a packet's path and name what drops it (reads only)
    sandbox          a throwaway network + mount namespace
    CLI              the verb table (VERBS): parser, help, dispatch; main
"""
import os
import sys
import time


class _Lazy:
    """A module imported on its first use, then bound in its place: `cnikit netns list` must
    not pay for what only some verbs use (a CLI start is a few ms; see bench/cli_start.py)."""

    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        module = __import__(self._name)
        globals()[self._name] = module
        return getattr(module, attr)


argparse, base64, ctypes, hashlib, ipaddress, json, re, shlex, subprocess, textwrap = map(_Lazy, (
    "argparse", "base64", "ctypes", "hashlib", "ipaddress", "json", "re", "shlex", "subprocess", "textwrap"))

# ---------------------------------------------------------------- constants

# the kernel objects cnikit makes, and how it tags them
TAG = "cnikit"                    # ifalias on cnikit's links and lo of its netns; iptables comment prefix
VXLAN_PORT = 4789                 # IANA port for VXLAN
VXLAN_OVERHEAD = 50               # inner Ethernet 14 + VXLAN 8 + UDP 8 + outer IPv4 20 (outer Ethernet: not in the MTU)
DEFAULT_MTU = 1500
NETNS_DIR = "/run/netns"
IFNAME_MAX = 15                   # IFNAMSIZ - 1
VNI_MAX = 2 ** 24 - 1
# The routing protocol number cnikit's routes carry (unassigned in rt_protos): the route's
# ownership tag, as the ifalias is a link's, so cleanup finds exactly them.
ROUTE_PROTO = 157
# Prefix of every iptables chain cnikit makes: the plugin's per-attachment chains and the
# CLI's per-subnet NAT chains (CNIKIT-NAT-<hash>). A chain has no comment: its name is its tag.
CHAIN_PREFIX = "CNIKIT-"
NAT_CHAIN_PREFIX = CHAIN_PREFIX + "NAT-"
PORTS_CHAIN = CHAIN_PREFIX + "PORTS"     # `nat publish`'s DNAT rules (nat table); Docker's is DOCKER
PORT_PROTOS = ("tcp", "udp")
IPTABLES_TABLES = ("nat", "filter")
BR_NF_CALL_IPTABLES = "/proc/sys/net/bridge/bridge-nf-call-iptables"   # br_netfilter, per namespace
IPTABLES_TOOL = {4: "iptables", 6: "ip6tables"}    # by IP family
# br_netfilter's switch per family: bridged IPv4 / IPv6 frames go through (ip6)tables FORWARD.
BR_NF_CALL = {4: BR_NF_CALL_IPTABLES, 6: "/proc/sys/net/bridge/bridge-nf-call-ip6tables"}
# the sandbox's and the process's
SANDBOX_PROMPT = r"(cnikit-sandbox) \w # "
# What a sandbox gets empty and private besides /run/netns: everything a CNI plugin or
# runtime writes (configs, plugins, address files, results, the plugin's log), so a lesson
# or a test that installs and runs a plugin never writes to the host.
SANDBOX_DIRS = ("/etc/cni", "/opt/cni/bin", "/var/lib/cni", "/run/cni", "/run/cnikit", "/var/log")
PACKAGES = {"ip": "iproute2", "bridge": "iproute2", "iptables": "iptables", "sysctl": "procps",
            "ping": "iputils-ping", "socat": "socat", "tcpdump": "tcpdump", "conntrack": "conntrack",
            "ss": "iproute2", "nsenter": "util-linux"}
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")      # on root's PATH, not on a user's
# The oldest Python cnikit runs on (shlex.join, as pyproject's requires-python says); 3.6 and 3.7
# still parse this file, so main() tells them in one line.
PYTHON_MIN = (3, 8)

# Namespace and mount flags for the sandbox (linux/sched.h, linux/mount.h).
CLONE_NEWNS, CLONE_NEWNET = 0x00020000, 0x40000000
MS_REC, MS_PRIVATE = 0x4000, 1 << 18

# What a shell reads as itself, unquoted (shlex.quote's set: ASCII word characters and @%+=:,./-).
SHELL_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_@%+=:,./-")

_NETNS_RE = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}\Z"     # a name `ip netns add` takes
_MAC_RE = r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}\Z"
PORTS_COMMENT = f"{TAG} ports"            # the rules every published port shares
# What a Change can be. "up", "addr" and "master" are states of a link (no object of their own);
# "del" removes an object (FACTS["what"]: its kind); "scratch" is a temporary file a later step
# renames or removes (neither summarised nor refused); "cluster" is a kind cluster a lesson creates.
CHANGE_KINDS = ("netns", "link", "up", "addr", "master", "route", "rule", "chain", "sysctl", "file", "scratch",
                "cluster", "del")
HOST_NAME = "host"     # how show names the namespace cnikit runs in

# the CNI runtime's (cnikit cni) and the plugin's names, paths and versions
CNI_PLUGIN_DIR = "/opt/cni/bin"
CNI_CONF_DIR = "/etc/cni/net.d"
CNI_PATH = "/opt/cni/bin:/usr/lib/cni"     # where containerd and podman look (Debian ships the reference ones in the 2nd)
CNI_CACHE_DIR = "/var/lib/cni/results"      # libcni's cache: <network>-<container id>-<ifname>
CNI_NET = "cnikit"                          # default network name
CNI_TYPE = "cnikit"                         # the `type` our conflist uses, so the plugin's file name
CNI_LOG = "/var/log/cni.log"                # the plugin's log unless its config says `log`
CNI_DATA_DIR = "/var/lib/cni/networks"      # the plugin's address files: <dataDir>/<network>/<address>
CNI_DEFAULT_BRIDGE = "cni0"                 # the plugin's bridge unless its config says `bridge`
CNI_PLUGIN_MARK = b"cni-bash-compatible"    # in our plugin's first lines, installed as script or zipapp
CNI_VERSION = "1.0.0"                       # what install writes: podman 4.3/containerd 1.6 know no 1.1.0
# The installed plugin's interpreter, fixed at install time as pip does for scripts: a runtime
# runs it with the runtime's PATH, where `env python3` may be a slow shim (pyenv: ~80 ms a start).
# -I -S: no user site, no site-packages scan (the plugin is stdlib only), ~10 ms less per call.
CNI_PYTHON = "/usr/bin/python3"
CNI_PYTHON_FLAGS = "-IS"
CNI_CONF_EXT = (".conf", ".conflist", ".json")
CNI_CHAINABLE = {"portmap": {"type": "portmap", "capabilities": {"portMappings": True}},
                 "loopback": {"type": "loopback"}}
CNI_SHOW_MAX = 240                          # stdin longer than this is shortened when echoed (-v: never)
CNI_TIMEOUT = 60
CNI_VERSION_CHECK, CNI_VERSION_STATUS = (0, 4, 0), (1, 1, 0)   # CHECK needs 0.4.0, STATUS and GC 1.1.0
CNI_VERSION_ENV = {"CNI_NETNS": "dummy", "CNI_IFNAME": "dummy", "CNI_PATH": "dummy"}  # libcni's VERSION call
# A name the plugin accepts (container id, network name, plugin type): what its valid_name takes.
CNI_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]*\Z"     # \Z: no trailing newline
CNI_NET_NAME_MAX = 63                       # a network name becomes a file name and part of a conflist's

# kind's
KIND_NODE_LABEL = "io.x-k8s.kind.cluster"
KIND_POD_CIDR = "10.244.0.0/16"             # kind's default podSubnet; node i gets 10.244.i.0/24
KIND_PYTHON_PKG = "python3-minimal"
KIND_NODE_IMAGE = "cnikit/kind-node:latest" # built from kind/Dockerfile (kindest/node + python3)
NODE_SUBNET_FILE = "/run/cnikit/subnet.env" # flannel-style: the node's pod subnet, read by our plugin
KIND_BUILD_DIR = "/run/cnikit/build"        # in a node: the plugin's source while the node's python3 compiles it

# doctor's
DOCTOR_MAX_HOPS = 16
# The restore tool of each iptables backend: other-backend's fix moves rules into iptables' own.
BACKEND_RESTORE = {"nf_tables": "iptables-nft-restore", "legacy": "iptables-legacy-restore"}
DOCTOR_PROTOS = ("icmp", "tcp", "udp")
# Protocol numbers and the other names `iptables -S` may print for a protocol.
PROTO_NAMES = {"1": "icmp", "6": "tcp", "17": "udp", "58": "ipv6-icmp", "icmpv6": "ipv6-icmp"}
# ICMPv6 types by the names ip6tables accepts (it prints the number); NDP's own are 135/136.
ICMPV6_TYPES = {"echo-request": "128", "neighbour-solicitation": "135", "neighbor-solicitation": "135",
                "neighbour-advertisement": "136", "neighbor-advertisement": "136"}
EXIT_BROKEN = 1
RPFILTER_FLAGS = ("--loose", "--invert", "--validmark", "--accept-local")


# ---------------------------------------------------------------- errors

class CnikitError(Exception):
    """Anything cnikit reports to a user: one line, and an exit code."""
    code = EXIT_FAILED


class UsageError(CnikitError):
    """Bad input or usage, found before anything changed (exit 2)."""
    code = EXIT_USAGE


class CommandFailed(CnikitError):
    """A command returned non-zero: carries the argv and the kernel's message (exit 1)."""

    def __init__(self, argv, returncode, stderr):
        self.argv, self.returncode, self.stderr = argv, returncode, (stderr or "").strip()
        msg = self.stderr.splitlines()[-1] if self.stderr else f"exit status {returncode}"
        super().__init__(f"command failed: {shell_join(argv)}: {msg}")


# ---------------------------------------------------------------- validation (pure)




def check_ifname(name, what="interface name"):
    """Linux accepts 1-15 bytes without '/', ':' or whitespace, and not '.' or '..'."""
    if not isinstance(name, str) or not name:
        raise UsageError(f"{what} is empty")
    if len(name.encode()) > IFNAME_MAX:
        raise UsageError(f"{what} {name!r} is {len(name.encode())} characters; Linux allows at most {IFNAME_MAX}")
    if name in (".", "..") or any(c in name for c in "/:") or any(c.isspace() for c in name):
        raise UsageError(f"{what} {name!r} is invalid: no '/', ':', whitespace, and not '.' or '..'")
    return name


def check_netns(name):
    """Namespace names become files in /run/netns: keep them to a safe alphabet."""
    if not isinstance(name, str) or not re.match(_NETNS_RE, name):
        raise UsageError(f"namespace name {name!r} is invalid: use letters, digits, '_', '.', '-' "
                         "(not starting with '.' or '-'), at most 64 characters")
    return name


def check_ifaddr(text, what="address"):
    """An interface address with its prefix, e.g. 10.0.0.1/24 (the host part may be set)."""
    try:
        iface = ipaddress.ip_interface(text)
    except ValueError:
        raise UsageError(f"{what} {text!r} is not an address with a prefix such as 10.0.0.1/24") from None
    if "/" not in text:
        raise UsageError(f"{what} {text!r} needs a prefix length, e.g. {text}/24")
    if iface.ip == iface.network.network_address and iface.network.prefixlen < iface.max_prefixlen - 1:
        raise UsageError(f"{what} {text!r} is the network address of {iface.network}; pick a host address")
    return str(iface)


def check_subnet(text, what="subnet"):
    """A network in CIDR form with no host bits set, e.g. 10.0.0.0/24."""
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        raise UsageError(f"{what} {text!r} is not a CIDR network such as 10.0.0.0/24 ({e})") from None
    if "/" not in text:
        raise UsageError(f"{what} {text!r} needs a prefix length, e.g. {text}/24")
    return str(net)


def check_ip(text, what="address"):
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise UsageError(f"{what} {text!r} is not an IP address") from None


def check_int(value, low, high, what):
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise UsageError(f"{what} {value!r} is not a number") from None
    if not low <= n <= high:
        raise UsageError(f"{what} {n} is out of range {low}-{high}")
    return n


def check_mtu(value):
    return None if value is None else check_int(value, 68, 65535, "MTU")


def check_mac(text):
    if not re.match(_MAC_RE, text or ""):
        raise UsageError(f"MAC address {text!r} is invalid; expected six hex pairs such as 02:42:0a:00:00:02")
    return text.lower()


# ---------------------------------------------------------------- argv builders (pure)




def shell_quote(word):
    """WORD as a shell reads it back, quoted as shlex.quote does; here because every command
    cnikit runs is echoed, and shlex would make each CLI start import re for it."""
    if word and all(c in SHELL_SAFE for c in word):
        return word
    return "'" + word.replace("'", "'\"'\"'") + "'"


def shell_join(argv):
    """ARGV as one line a shell runs (shlex.join's line)."""
    return " ".join(shell_quote(word) for word in argv)


def ip(*args, ns=None):
    """`ip [-n NS] ARGS...`: iproute2 enters the namespace itself."""
    return ["ip"] + (["-n", ns] if ns else []) + [str(a) for a in args]


def bridge(*args, ns=None):
    return ["bridge"] + (["-n", ns] if ns else []) + [str(a) for a in args]


def in_netns(argv, ns=None):
    """Run any other tool inside NS: `ip netns exec NS ARGV...`."""
    return (["ip", "netns", "exec", ns] if ns else []) + list(argv)


def iptables(*args, ns=None, family=4):
    """`iptables -w ARGS` (FAMILY 6: ip6tables): -w waits for the xtables lock instead of failing
    when another program (a CNI plugin, kube-proxy, docker) holds it."""
    return in_netns([IPTABLES_TOOL[family], "-w"] + [str(a) for a in args], ns)


def sysctl_set(key, value, ns=None):
    return in_netns(["sysctl", "-w", f"{key}={value}"], ns)


def kv(**options):
    """Keyword args become iproute2's `key value` pairs; None is left out."""
    out = []
    for key, value in options.items():
        if value is not None:
            out += [key, str(value)]
    return out


def tag_link(name, ns=None):
    """Mark a link as cnikit's in the kernel itself, so cleanup finds it by its ifalias."""
    return ip("link", "set", "dev", name, "alias", TAG, ns=ns)


def link_up(name, ns=None):
    return ip("link", "set", "dev", name, "up", ns=ns)


def addr_add(cidr, dev, ns=None):
    return ip("addr", "add", cidr, "dev", dev, ns=ns)


def netns_add_argv(name):
    # lo carries the tag: a namespace has no label of its own in the kernel.
    return [ip("netns", "add", name), tag_link("lo", ns=name)]


def veth_add_argv(name, peer, netns=None, mtu=None, ns=None):
    peer_opts = ["peer", "name", peer] + kv(mtu=mtu, netns=netns)
    return ip("link", "add", name, *kv(mtu=mtu), "type", "veth", *peer_opts, ns=ns)


def bridge_add_argv(name, mtu=None, ns=None, mac=None):
    # With an address of its own (addr_assign_type 3, NET_ADDR_SET) a bridge keeps its MAC;
    # without one it takes its lowest port's and moves when ports come and go, and pods keep
    # the gateway's old MAC in their neighbour table for tens of seconds.
    return ip("link", "add", name, *kv(address=mac, mtu=mtu), "type", "bridge", ns=ns)


def bridge_mac(name, ns=None, machine_id=""):
    """The MAC cnikit gives bridge NAME: locally administered unicast, derived from this
    machine's id, the namespace and the name (as systemd's MACAddressPolicy=persistent does
    for virtual links), so the dry run prints the very line the real run runs, and bridges
    on two machines or in two simulated nodes get different MACs."""
    digest = bytearray(hashlib.sha256(f"{TAG} bridge {machine_id} {ns or ''} {name}".encode()).digest()[:6])
    digest[0] = digest[0] & 0xfe | 0x02         # clear the multicast bit, set the local one
    return ":".join(f"{b:02x}" for b in digest)


def machine_id():
    """/etc/machine-id, or the host name where there is none (a minimal container)."""
    try:
        with open("/etc/machine-id") as f:
            return f.read().strip() or os.uname().nodename
    except OSError:
        return os.uname().nodename


def vxlan_add_argv(name, vni, mtu, remote=None, group=None, local=None, dev=None, dstport=VXLAN_PORT, ns=None,
                   learning=True):
    opts = kv(id=vni, dstport=dstport, remote=remote, group=group, local=local, dev=dev)
    return ip("link", "add", name, "mtu", mtu, "type", "vxlan", *opts, *([] if learning else ["nolearning"]), ns=ns)


def nat_comment(subnet):
    return f"{TAG} nat {subnet}"


def nat_chain(subnet):
    """The chain `nat add SUBNET` owns, in the nat and in the filter table: CNIKIT-NAT- and
    12 hex digits of the subnet's hash (a chain name holds at most 28 characters)."""
    return NAT_CHAIN_PREFIX + hashlib.sha256(subnet.encode()).hexdigest()[:12]


def nat_rules(subnet, out_iface):
    """(table, chain, rule spec) for a subnet's egress, in its own chain: masquerade what
    leaves OUT, and let it be forwarded out and its replies back in."""
    tag, chain = ["-m", "comment", "--comment", nat_comment(subnet)], nat_chain(subnet)
    return [
        ("nat", chain, ["-s", subnet, "-o", out_iface] + tag + ["-j", "MASQUERADE"]),
        ("filter", chain, ["-s", subnet, "-o", out_iface] + tag + ["-j", "ACCEPT"]),
        ("filter", chain, ["-d", subnet, "-i", out_iface, "-m", "conntrack", "--ctstate",
                           "RELATED,ESTABLISHED"] + tag + ["-j", "ACCEPT"]),
    ]


def nat_jumps(subnet):
    """The one jump rule per table into SUBNET's chain (table, built-in chain, spec)."""
    tag, chain = ["-m", "comment", "--comment", nat_comment(subnet)], nat_chain(subnet)
    return [("nat", "POSTROUTING", tag + ["-j", chain]), ("filter", "FORWARD", tag + ["-j", chain])]


def port_comment(port, proto="tcp"):
    return f"{TAG} port {proto}/{port}"





def port_rules(port, to_ip, to_port, bridge, proto="tcp"):
    """{name: (table, chain, spec)}: what dockerd 20.10 writes for `docker run -p PORT:TO_PORT`
    with its userland proxy off, in the order it must go in: the DNAT in cnikit's chain (Docker's
    DOCKER), filled before the jumps into it from PREROUTING and OUTPUT for any local destination;
    the FORWARD accept of exactly that connection; the masquerade of the host's own sources
    leaving BRIDGE (localhost:PORT, with route_localnet) and the hairpin masquerade (the
    container calling its own published port). Shared rules carry PORTS_COMMENT, the port's
    own its port_comment."""
    own = ["-m", "comment", "--comment", port_comment(port, proto)]
    shared = ["-m", "comment", "--comment", PORTS_COMMENT]
    local = ["-m", "addrtype", "--dst-type", "LOCAL"]
    dport = ["-p", proto, "-m", proto, "--dport"]
    return {
        "dnat": ("nat", PORTS_CHAIN, dport + [str(port)] + own + ["-j", "DNAT", "--to-destination",
                                                                  f"{to_ip}:{to_port}"]),
        "prerouting": ("nat", "PREROUTING", local + shared + ["-j", PORTS_CHAIN]),
        "forward": ("filter", "FORWARD", ["-d", f"{to_ip}/32", "!", "-i", bridge, "-o", bridge] + dport
                    + [str(to_port)] + own + ["-j", "ACCEPT"]),
        "output": ("nat", "OUTPUT", local + shared + ["-j", PORTS_CHAIN]),
        "local-masquerade": ("nat", "POSTROUTING", ["-o", bridge, "-m", "addrtype", "--src-type", "LOCAL"]
                             + shared + ["-j", "MASQUERADE"]),
        "hairpin": ("nat", "POSTROUTING", ["-s", f"{to_ip}/32", "-d", f"{to_ip}/32"] + dport + [str(to_port)]
                    + own + ["-j", "MASQUERADE"]),
    }


def iptables_rule(action, table, chain, spec, ns=None, family=4):
    return iptables("-t", table, action, chain, *spec, ns=ns, family=family)


def bridge_forward_rule(name):
    """(table, chain, rule spec) accepting what a bridge switches between its own ports."""
    return ("filter", "FORWARD", ["-i", name, "-o", name, "-m", "comment", "--comment",
                                  f"{TAG} bridge {name}", "-j", "ACCEPT"])


# ---------------------------------------------------------------- changes: what a command makes, and the journal

def which(tool):
    """TOOL's path on PATH, else in the sbin directories root's PATH has (an ordinary user's PATH
    on Debian lacks them, and iptables and sysctl live there: a dry run plans for root), or None.
    shutil.which's answer for a plain name, without importing shutil (a CLI start counts every
    module; see bench/cli_start.py)."""
    path = os.environ.get("PATH", os.defpath).split(os.pathsep)
    for directory in [""] if os.path.dirname(tool) else path + [d for d in SBIN_DIRS if d not in path]:
        path = os.path.join(directory or os.curdir, tool) if directory else tool
        if os.access(path, os.X_OK) and not os.path.isdir(path):
            return path
    return None


def require_tools(*tools):
    """Fail before anything runs when a tool is missing, naming its Debian package."""
    for tool in tools:
        if not which(tool):
            pkg = PACKAGES.get(tool, tool)
            raise UsageError(f"{tool} not found: install it with `apt-get install {pkg}` (Debian package {pkg})")


class Change:
    """What one command makes (or removes): the typed record the runner keeps of it, so
    rollback, a lesson's --host refusal and its summary read kinds and names, never argv
    patterns, and a plan's State learns from it what exists once the command has run.

    KIND is one of CHANGE_KINDS; NAME says the object in the kernel's words (a link or
    namespace name, a path, a route as `DST via GW dev DEV`, an iptables rule as
    `-t TABLE -A CHAIN SPEC`, `key=value` of a sysctl); NS is the namespace it lives in
    (None: where cnikit runs); UNDO is the argv that removes it (None: nothing to undo);
    FACTS are what a plan's model of the kernel needs besides the name (a link's type, MTU
    and peer; a route's gateway and device; a rule's table, chain and spec; a file's text)."""
    __slots__ = ("kind", "name", "ns", "undo", "facts")

    def __init__(self, kind, name, ns=None, undo=None, **facts):
        if kind not in CHANGE_KINDS:
            raise ValueError(f"change kind {kind!r} is not one of {', '.join(CHANGE_KINDS)}")
        self.kind, self.name, self.ns, self.undo, self.facts = kind, name, ns, undo, facts

    def __repr__(self):
        return f"Change({self.kind!r}, {self.name!r}, ns={self.ns!r})"

    def same(self, kind, name, ns=None):
        return (self.kind, self.name, self.ns) == (kind, name, ns)

    def gone(self):
        """The Change that removes this object again (`ip link del`, `iptables -D`...)."""
        return Change("del", self.name, self.ns, what=self.kind, **self.facts)

    @classmethod
    def netns(cls, name):
        return cls("netns", name, undo=ip("netns", "del", name))

    @classmethod
    def link(cls, name, ns=None, type=None, mtu=None, **facts):
        """A new link of TYPE (veth, bridge, vxlan); FACTS: peer and peer_ns (a veth), vni, address."""
        return cls("link", name, ns, undo=ip("link", "del", name, ns=ns), type=type, mtu=mtu, **facts)

    @classmethod
    def up(cls, name, ns=None):
        """A link brought up: state, not an object (nothing to undo; goes with the link)."""
        return cls("up", name, ns)

    @classmethod
    def addr(cls, cidr, dev, ns=None):
        """An address on DEV (goes with the link)."""
        return cls("addr", f"{cidr} dev {dev}", ns, cidr=cidr, dev=dev)

    @classmethod
    def master(cls, dev, master, ns=None):
        """DEV made a port of bridge MASTER."""
        return cls("master", f"{dev} master {master}", ns, dev=dev, master=master)

    @classmethod
    def route(cls, dst, ns=None, protocol=None, **how):
        """A route to DST; HOW (via, dev) only names it, the undo deletes DST's route."""
        return cls("route", " ".join([dst] + kv(**how)), ns, undo=ip("route", "del", dst, ns=ns), dst=dst,
                   gateway=how.get("via"), dev=how.get("dev"), protocol=protocol)

    @classmethod
    def rule(cls, table, chain, spec, ns=None, family=4):
        name = shell_join(["-t", table, "-A", chain] + list(spec))
        return cls("rule", name if family == 4 else f"{IPTABLES_TOOL[family]} {name}", ns,
                   undo=iptables_rule("-D", table, chain, spec, ns, family), table=table, chain=chain,
                   spec=list(spec), family=family)

    @classmethod
    def chain(cls, table, chain, ns=None):
        """A chain of cnikit's own; undone after the rules in it, so empty by then."""
        return cls("chain", f"-t {table} {chain}", ns, undo=iptables("-t", table, "-X", chain, ns=ns),
                   table=table, chain=chain, family=4)

    @classmethod
    def sysctl(cls, key, value, ns=None, old=None):
        """KEY set to VALUE; undone (back to OLD) only when OLD is known and differs."""
        undo = sysctl_set(key, old, ns) if old is not None and str(old) != str(value) else None
        return cls("sysctl", f"{key}={value}", ns, undo=undo, key=key, value=str(value))

    @classmethod
    def file(cls, path, undo=True, data=None):
        """A file written where a runtime looks; UNDO False: it was there before (replaced).
        DATA: its text, when a later step of a plan reads it."""
        return cls("file", path, undo=["rm", "-f", path] if undo is True else (undo or None), data=data)

    @classmethod
    def scratch(cls, *paths):
        """Temporary files or directories a later command renames or removes."""
        return cls("scratch", " ".join(paths), undo=["rm", "-rf", *paths])





class Journal:
    """The Changes this invocation made (in a plan: planned), oldest first, and the rollback
    of those that ran: it records and undoes, nothing else."""

    def __init__(self):
        self.changes = []         # every Change recorded
        self.undo = []            # the Changes a rollback undoes, oldest first

    def record(self, change, ran):
        self.changes.append(change)
        if change.undo and ran:
            self.undo.append(change)

    def forget(self, match):
        self.undo[:] = [c for c in self.undo if not match(c)]

    def rollback(self, executor, since=0, why="rolling back what this command created"):
        if len(self.undo) <= since:
            return []
        executor.note(why)
        failed = []
        while len(self.undo) > since:
            change = self.undo.pop()
            executor.echo(change.undo)
            try:
                proc = executor.execute(change.undo)
                why_not = None if proc.returncode == 0 else \
                    (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
            except CnikitError as e:
                why_not = str(e)
            if why_not:
                failed.append(change)
                print(f"cnikit: warning: could not undo {change.kind} {change.name}"
                      f"{' in ' + change.ns if change.ns else ''}: {shell_join(change.undo)}: {why_not}",
                      file=sys.stderr, flush=True)
        return failed


# ---------------------------------------------------------------- state: the live kernel, or a plan's picture

def json_answer(ok, out):
    """A look-up's (ok, stdout) read as JSON (`ip -j ...`); None when it failed or said nothing."""
    if not ok or not out.strip():
        return None
    try:
        return json.loads(out)
    except ValueError:
        return None


def _route_covers(cidr, addr):
    try:
        return ipaddress.ip_address(addr) in ipaddress.ip_interface(cidr).network
    except ValueError:
        return False


def parse_rules(listing):
    """`iptables -S` lines as (user chains, [(chain, spec)])."""
    chains, rules = [], []
    for line in listing.splitlines():
        words = shlex.split(line)
        if len(words) >= 2 and words[0] == "-N":
            chains.append(words[1])
        elif len(words) >= 3 and words[0] == "-A":
            rules.append((words[1], words[2:]))
    return chains, rules


class State:
    """What exists, as the verbs ask it: every look-up a verb makes. LiveState reads the
    kernel (through the Executor, echoed with -v); PlanState is a plan's picture, a base
    (FreshHost, or this host's LiveState read-only) overlaid with the Changes planned so far.
    The verbs ask and never know which one answers."""

    def missing(self, error, made=None, exc=UsageError, said=None):
        """A command's input names something that is not there (a namespace, a link): ERROR
        (an EXC). MADE: the Change that would have made it (what a plan can assume); SAID: what
        a plan that assumes says instead of the usual note."""
        raise exc(error)

    def unknown(self, error, said):
        """A fact a command cannot do without is not to be had (no docker answer): ERROR;
        a plan notes SAID and goes on with its defaults."""
        raise UsageError(error)

    def record(self, change):
        """A Change the Executor ran or planned (a live kernel knows it already)."""

    def netns_exists(self, name):
        return name in self.netns_names()

    def addrs(self, name, ns=None):
        return set()

    def links(self, ns=None):
        return []

    def link_records(self, ns=None):
        """Every link of NS with its addresses (`ip -j -d addr show`'s records)."""
        return []

    def nsids(self, ns=None):
        """`ip -j netns list-id` of NS: which namespace each peer's nsid is."""
        return []

    def ports(self, master, ns=None):
        return [l for l in self.links(ns) if l.get("master") == master]

    def routes(self, dst=None, ns=None, proto=None, family=4):
        """`ip -j route` records: the route to DST (its family), or every route of FAMILY."""
        return []

    def route_dev(self, addr, ns=None):
        return None

    def rules(self, table, ns=None, family=4):
        """[(chain, spec)] of TABLE; None: they cannot be read here."""
        return []

    def chains(self, table, ns=None, family=4):
        """The user-defined chains of TABLE; None: they cannot be read here."""
        return []

    def has_rule(self, table, chain, spec, ns=None, family=4):
        return (chain, list(spec)) in (self.rules(table, ns, family) or [])

    def has_chain(self, table, chain, ns=None, family=4):
        return chain in (self.chains(table, ns, family) or [])

    def forward_policy(self, ns=None, family=4):
        return "ACCEPT"

    def bridged_frames_filtered(self, ns=None, family=4):
        return False

    def sysctl(self, key, ns=None):
        return None

    def addr_assign_type(self, name, link, ns=None):
        return None

    def fdb(self, name, ns=None):
        return []

    def file_text(self, path):
        """The text of the file at PATH (a runtime's config, cache, plugin); None: absent."""
        return None

    def file_exists(self, path):
        return self.file_text(path) is not None

    def file_head(self, path, size=-1):
        """The first SIZE bytes of the file at PATH (-1: all); None: absent or unreadable."""
        return None

    def executable(self, path):
        return False

    def is_dir(self, path):
        return False

    def listdir(self, path):
        """The names in directory PATH, sorted; none when it cannot be read."""
        return []

    def find_plugin(self, ptype, cni_path):
        """libcni's FindInPath: the first executable TYPE in the CNI_PATH directories."""
        return cni_find_plugin(ptype, cni_path)

    def ask(self, argv):
        """(ok, stdout) of a read-only look-up outside the kernel's objects (docker, kubectl:
        a kind cluster's nodes), which every plan reads as it is."""
        return False, ""

    def in_node(self, node, argv):
        """(ok, stdout) of ARGV run read-only in kind NODE; None: not known (a plan's node)."""
        return None


class FreshHost(State):
    """A host where nothing has been made yet: the root namespace holds lo, there are no named
    namespaces, rules or routes of anyone's. FACTS, a LiveState: the host-wide settings that decide
    a plan (the FORWARD policy, br_netfilter) are read from this host (a lesson's --host plan)."""

    def __init__(self, facts=None):
        self.facts = facts

    def netns_names(self):
        return []

    def link(self, name, ns=None):
        return {"ifname": "lo", "link_type": "loopback", "flags": ["LOOPBACK", "UP"], "mtu": 65536} \
            if name == "lo" and ns is None else None

    def links(self, ns=None):
        return [self.link("lo")] if ns is None else []

    def link_records(self, ns=None):
        return [dict(self.link("lo"), addr_info=[{"family": "inet", "local": "127.0.0.1", "prefixlen": 8,
                                                  "scope": "host"}])] if ns is None else []

    def forward_policy(self, ns=None, family=4):
        return self.facts.forward_policy(ns, family) if self.facts else "ACCEPT"

    def bridged_frames_filtered(self, ns=None, family=4):
        return self.facts.bridged_frames_filtered(ns, family) if self.facts else False


class LiveState(State):
    """The kernel as it is, read through the Executor. READ_ONLY: the base of a plan (a look-up
    the user may not make, as without root, says so once and answers 'absent')."""

    def __init__(self, executor, read_only=False):
        self.x, self.read_only, self._blind = executor, read_only, set()

    def query(self, argv, what=None):
        """(ok, stdout) of a read-only look-up."""
        proc = self.x.read(argv)
        # a failed look-up without root is taken as one root alone may make (not by its words)
        if proc.returncode != 0 and self.read_only and what and what not in self._blind and os.geteuid() != 0:
            self._blind.add(what)
            self.x.note(f"cannot read {what} here (root needed): planning as if there were none")
        return proc.returncode == 0, proc.stdout

    def query_json(self, argv, what=None):
        return json_answer(*self.query(argv, what))

    def netns_names(self):
        return sorted(n["name"] for n in self.query_json(ip("-j", "netns", "list")) or [])

    def netns_exists(self, name):
        return netns_exists(name)

    def ask(self, argv):
        return self.query(argv) if which(argv[0]) else (False, "")

    def in_node(self, node, argv):
        return self.query(docker_exec(node, *argv))

    def link(self, name, ns=None):
        data = self.query_json(ip("-j", "-d", "link", "show", "dev", name, ns=ns), f"namespace {ns}" if ns else None)
        return data[0] if data else None

    def addrs(self, name, ns=None):
        data = self.query_json(ip("-j", "addr", "show", "dev", name, ns=ns)) or []
        return {f"{a['local']}/{a['prefixlen']}" for rec in data for a in rec.get("addr_info", [])
                if a.get("family") == "inet" or a.get("family") == "inet6" and a.get("scope") == "global"}

    def links(self, ns=None):
        return self.query_json(ip("-j", "link", "show", ns=ns), f"namespace {ns}" if ns else None) or []

    def link_records(self, ns=None):
        return self.query_json(ip("-j", "-d", "addr", "show", ns=ns), f"namespace {ns}" if ns else None) or []

    def nsids(self, ns=None):
        return self.query_json(ip("-j", "netns", "list-id", ns=ns)) or []

    def ports(self, master, ns=None):
        return self.query_json(ip("-j", "link", "show", "master", master, ns=ns)) or []

    def routes(self, dst=None, ns=None, proto=None, family=4):
        how = (["exact", dst] if dst else []) + (["proto", proto] if proto else [])
        # `ip route show` looks in one family: DST's, or FAMILY's
        six = ["-6"] if (":" in dst if dst else family == 6) else []
        return self.query_json(ip(*six, "-j", "route", "show", *how, ns=ns)) or []

    def route_dev(self, addr, ns=None):
        route = self.query_json(ip("-j", "route", "get", addr, ns=ns))
        return route[0].get("dev") if route else None

    def _listing(self, table, ns=None, family=4, chain=None):
        if not which(IPTABLES_TOOL[family]):
            return False, ""
        return self.query(iptables("-t", table, "-S", *([chain] if chain else []), ns=ns, family=family),
                          f"{IPTABLES_TOOL[family]} rules")

    def rules(self, table, ns=None, family=4):
        ok, out = self._listing(table, ns, family)
        return parse_rules(out)[1] if ok else None

    def chains(self, table, ns=None, family=4):
        ok, out = self._listing(table, ns, family)
        return parse_rules(out)[0] if ok else None

    def has_rule(self, table, chain, spec, ns=None, family=4):
        return which(IPTABLES_TOOL[family]) is not None and \
            self.query(iptables_rule("-C", table, chain, spec, ns, family))[0]

    def has_chain(self, table, chain, ns=None, family=4):
        return self._listing(table, ns, family, chain)[0]

    def forward_policy(self, ns=None, family=4):
        ok, out = self._listing("filter", ns, family, "FORWARD")
        return "DROP" if ok and "-P FORWARD DROP" in out.splitlines() else "ACCEPT"

    def bridged_frames_filtered(self, ns=None, family=4):
        """Does br_netfilter pass bridged frames of FAMILY through (ip6)tables here (per namespace)?"""
        if ns is None:
            try:
                with open(BR_NF_CALL[family]) as f:
                    return f.read().strip() == "1"
            except OSError:            # no br_netfilter: bridged frames never see iptables
                return False
        ok, out = self.query(in_netns(["cat", BR_NF_CALL[family]], ns))
        return ok and out.strip() == "1"

    def sysctl(self, key, ns=None):
        ok, value = self.query(in_netns(["sysctl", "-n", key], ns))
        return value.strip() if ok else None

    def addr_assign_type(self, name, link, ns=None):
        """How the kernel got LINK's MAC (0 permanent, 1 random, 2 stolen, 3 set), from sysfs
        (rtnetlink does not tell); None when this namespace's sysfs cannot say."""
        path = f"/sys/class/net/{name}/addr_assign_type"
        if ns:
            ok, out = self.query(in_netns(["cat", path], ns))
            return int(out) if ok and out.strip().isdigit() else None
        try:
            # A sysfs mounted in another network namespace shows its own links: check the index.
            with open(f"/sys/class/net/{name}/ifindex") as f:
                if int(f.read()) != link.get("ifindex"):
                    return None
            with open(path) as f:
                return int(f.read())
        except (OSError, ValueError):
            return None

    def fdb(self, name, ns=None):
        return self.query_json(bridge("-j", "fdb", "show", "dev", name, ns=ns)) or []

    def file_text(self, path):
        try:
            with open(path) as f:
                return f.read()
        except (OSError, UnicodeDecodeError):
            return None

    def file_exists(self, path):
        return os.path.exists(path)

    def file_head(self, path, size=-1):
        try:
            with open(path, "rb") as f:
                return f.read(size)
        except OSError:
            return None

    def executable(self, path):
        return os.access(path, os.X_OK)

    def is_dir(self, path):
        return os.path.isdir(path)

    def listdir(self, path):
        return _listdir(path)


class PlanState(State):
    """A plan's picture of the kernel: BASE (a FreshHost, or this host's LiveState read-only)
    overlaid with every Change planned so far, so a plan checks its input against what it
    planned itself. ASSUME: a plan that is one step of a longer script (the CLI's --dry-run)
    takes input it cannot find as made by an earlier step, and says so, instead of refusing."""

    def __init__(self, base, say, assume=False, facts=None):
        self.base, self.say, self.assume, self.facts = base, say, assume, facts
        self._netns = {}          # name -> True (planned) / False (deleted)
        self._links = {}          # (ns, name) -> the link's record as `ip -j -d link` has it; None: deleted
        self._addrs = {}          # (ns, name) -> [cidr] of a link the plan touched
        self._routes = {}         # ns -> [route record] planned
        self._gone_routes = set()  # (ns, dst)
        self._rules = {}          # (ns, family, table) -> {"chains": {chain: bool}, "rules": [(chain, spec, bool)]}
        self._sysctls = {}        # (ns, key) -> value
        self._files = {}          # path -> its planned content; None: removed
        self._assumed = set()     # the missing input already said
        self._index = 1000        # ifindex of planned links

    def missing(self, error, made=None, exc=UsageError, said=None):
        made = [made] if isinstance(made, Change) else list(made or [])
        given = self._given_here(made)
        if given:
            # a plan of what a lesson will do to this host (--host): the uplink or namespace it
            # names is this host's own, there before the plan; the plan builds on it
            for change in given:
                self.record(change)
            return
        if not self.assume:
            raise exc(error)
        if error not in self._assumed:
            self._assumed.add(error)
            self.say(said or f"{error}; planned as if an earlier command made it")
        for change in made:
            self.record(change)

    def _given_here(self, made):
        """MADE as this host has them, when every one exists here and this plan is a fresh host's
        that reads this host's facts (a lesson's --host plan); else []."""
        here = getattr(self.base, "facts", None)
        if not here or not made:
            return []
        given = []
        for change in made:
            if change.kind == "netns" and here.netns_exists(change.name):
                given.append(change)
            elif change.kind == "link" and here.link(change.name, change.ns):
                link = here.link(change.name, change.ns)
                given.append(Change.link(change.name, change.ns, link_kind(link) or None, link.get("mtu")))
            else:
                return []
        return given

    def unknown(self, error, said):
        self.say(said)

    def ask(self, argv):
        return self.facts.ask(argv) if self.facts else (False, "")

    # -- what the base knows, unless the plan made or removed the namespace since
    def _base_has(self, ns):
        if ns is None:
            return True
        if ns in self._netns:
            return False
        return self.base.netns_exists(ns)

    def netns_names(self):
        names = {n for n in self.base.netns_names() if self._netns.get(n, True)}
        return sorted(names | {n for n, there in self._netns.items() if there})

    def netns_exists(self, name):
        return self._netns[name] if name in self._netns else self.base.netns_exists(name)

    def link(self, name, ns=None):
        if ns is not None and not self.netns_exists(ns):
            return None
        if (ns, name) in self._links:
            return self._links[(ns, name)]
        return self.base.link(name, ns) if self._base_has(ns) else None

    def addrs(self, name, ns=None):
        if (ns, name) in self._addrs:
            return set(self._addrs[(ns, name)])
        return self.base.addrs(name, ns) if self._base_has(ns) and self.link(name, ns) else set()

    def links(self, ns=None):
        found = {l["ifname"]: l for l in (self.base.links(ns) if self._base_has(ns) else [])}
        for (where, name), rec in self._links.items():
            if where == ns:
                found[name] = rec
        return [l for l in found.values() if l]

    def link_records(self, ns=None):
        found = {l["ifname"]: l for l in (self.base.link_records(ns) if self._base_has(ns) else [])}
        for (where, name), rec in self._links.items():
            if where == ns:
                found[name] = rec and dict(rec, addr_info=[
                    {"family": "inet6" if ":" in c else "inet", "local": c.split("/")[0],
                     "prefixlen": int(c.split("/")[1]), "scope": "global"} for c in self._addrs.get((ns, name), [])])
        return [l for l in found.values() if l]

    def nsids(self, ns=None):
        return self.base.nsids(ns) if self._base_has(ns) else []

    def ports(self, master, ns=None):
        return [l for l in self.links(ns) if l.get("master") == master]

    def routes(self, dst=None, ns=None, proto=None, family=4):
        base = self.base.routes(dst, ns, proto, family) if self._base_has(ns) else []
        planned = [rt for rt in self._routes.get(ns, []) if (rt["dst"] == dst if dst else
                   (":" in rt["dst"]) == (family == 6)) and (not proto or str(rt.get("protocol")) == str(proto))]
        return [rt for rt in base if (ns, rt.get("dst")) not in self._gone_routes] + planned

    def route_dev(self, addr, ns=None):
        for (where, name), cidrs in self._addrs.items():
            if where == ns and self.link(name, ns) and any(_route_covers(c, addr) for c in cidrs):
                return name
        return self.base.route_dev(addr, ns) if self._base_has(ns) else None

    def _table(self, table, ns, family):
        return self._rules.setdefault((ns, family, table), {"chains": {}, "rules": []})

    def rules(self, table, ns=None, family=4):
        base = self.base.rules(table, ns, family) if self._base_has(ns) else []
        t = self._rules.get((ns, family, table), {"chains": {}, "rules": []})
        if base is None and not t["rules"] and not t["chains"]:
            return None               # unreadable here, and nothing planned: not known
        found = [] if base is None else [(c, s) for c, s in base if t["chains"].get(c, True)]
        for chain, spec, there in t["rules"]:
            if there:
                found.append((chain, spec))
            elif (chain, spec) in found:
                found.remove((chain, spec))
        return found

    def chains(self, table, ns=None, family=4):
        base = self.base.chains(table, ns, family) if self._base_has(ns) else []
        t = self._rules.get((ns, family, table), {"chains": {}})
        if base is None and not t["chains"]:
            return None
        found = [c for c in base or [] if t["chains"].get(c, True)]
        return found + [c for c, there in t["chains"].items() if there and c not in found]

    def has_rule(self, table, chain, spec, ns=None, family=4):
        t = self._rules.get((ns, family, table), {"chains": {}, "rules": []})
        for c, s, there in reversed(t["rules"]):
            if (c, s) == (chain, list(spec)):
                return there
        if chain in t["chains"] or not self._base_has(ns):
            return False
        return self.base.has_rule(table, chain, spec, ns, family)

    def has_chain(self, table, chain, ns=None, family=4):
        t = self._rules.get((ns, family, table), {"chains": {}})
        if chain in t["chains"]:
            return t["chains"][chain]
        return self._base_has(ns) and self.base.has_chain(table, chain, ns, family)

    def forward_policy(self, ns=None, family=4):
        return self.base.forward_policy(ns, family) if self._base_has(ns) else "ACCEPT"

    def bridged_frames_filtered(self, ns=None, family=4):
        return self._base_has(ns) and self.base.bridged_frames_filtered(ns, family)

    def sysctl(self, key, ns=None):
        if (ns, key) in self._sysctls:
            return self._sysctls[(ns, key)]
        return self.base.sysctl(key, ns) if self._base_has(ns) else None

    def addr_assign_type(self, name, link, ns=None):
        if (ns, name) in self._links:
            return 3 if (self._links[(ns, name)] or {}).get("address") else None
        return self.base.addr_assign_type(name, link, ns) if self._base_has(ns) else None

    def fdb(self, name, ns=None):
        return self.base.fdb(name, ns) if self._base_has(ns) and (ns, name) not in self._links else []

    def file_text(self, path):
        return self._files[path] if path in self._files else self.base.file_text(path)

    def file_exists(self, path):
        if path in self._files:
            return self._files[path] is not None
        if path.startswith(NETNS_DIR + "/"):
            return self.netns_exists(path[len(NETNS_DIR) + 1:])
        return self.base.file_exists(path)

    def file_head(self, path, size=-1):
        if path not in self._files:
            return self.base.file_head(path, size)
        data = self._files[path]
        if data is None:
            return None
        data = data if isinstance(data, bytes) else data.encode() if isinstance(data, str) else json.dumps(
            data, default=str).encode()
        return data if size < 0 else data[:size]

    def executable(self, path):
        return self._files[path] is not None if path in self._files else self.base.executable(path)

    def is_dir(self, path):
        # Only what the plan itself put there: its script makes its own directories (mkdir -p
        # costs nothing where they exist), so it also runs where they do not.
        return any(p.startswith(path.rstrip("/") + "/") and data is not None for p, data in self._files.items())

    def listdir(self, path):
        names = set(self.base.listdir(path))
        for p, data in self._files.items():
            if os.path.dirname(p) == path.rstrip("/"):
                (names.add if data is not None else names.discard)(os.path.basename(p))
        return sorted(names)

    def find_plugin(self, ptype, cni_path):
        for d in cni_path.split(":"):
            if d and self._files.get(os.path.join(d, ptype)) is not None:
                return os.path.join(d, ptype)
        try:
            return cni_find_plugin(ptype, cni_path)
        except UsageError as e:
            path = os.path.join(cni_path.split(":")[0], ptype)     # where a planned install puts it
            self.missing(str(e), Change.file(path))
            return path

    # -- learning from a Change
    def _touch(self, name, ns):
        """LINK's record, copied into the plan so the plan can change it."""
        if (ns, name) not in self._links:
            rec = self.link(name, ns)
            self._links[(ns, name)] = dict(rec, flags=list(rec.get("flags", []))) if rec else None
            self._addrs[(ns, name)] = sorted(self.addrs(name, ns)) if rec else []
        return self._links[(ns, name)]

    def record(self, change):
        f, ns, name = change.facts, change.ns, change.name
        if change.kind == "netns":
            self._netns[name] = True
            for key in [k for k in self._links if k[0] == name]:
                del self._links[key]
            self._links[(name, "lo")] = {"ifname": "lo", "link_type": "loopback", "flags": ["LOOPBACK"],
                                         "mtu": 65536, "ifalias": TAG}
        elif change.kind == "link":
            self._index += 1
            info = {"info_kind": f.get("type") or ""}
            if f.get("vni") is not None:
                info["info_data"] = {"id": f["vni"]}
            self._links[(ns, name)] = {k: v for k, v in {
                "ifname": name, "ifindex": self._index, "mtu": f.get("mtu") or DEFAULT_MTU, "flags": [],
                "linkinfo": info, "link": f.get("peer"), "address": f.get("address"), "ifalias": TAG}.items()
                if v is not None}
            self._addrs[(ns, name)] = []
        elif change.kind == "up":
            rec = self._touch(name, ns)
            if rec is not None and "UP" not in rec["flags"]:
                rec["flags"].append("UP")
        elif change.kind == "addr":
            if self._touch(f["dev"], ns) is not None:
                self._addrs[(ns, f["dev"])].append(f["cidr"])
        elif change.kind == "master":
            rec = self._touch(f["dev"], ns)
            if rec is not None:
                rec["master"] = f["master"]
        elif change.kind == "route":
            self._routes.setdefault(ns, []).append({k: f[k] for k in ("dst", "gateway", "dev", "protocol") if f.get(k)})
        elif change.kind in ("rule", "chain"):
            t = self._table(f["table"], ns, f["family"])
            if change.kind == "rule":
                t["rules"].append((f["chain"], list(f["spec"]), True))
            else:
                t["chains"][f["chain"]] = True
        elif change.kind == "sysctl" and "key" in f:
            self._sysctls[(ns, f["key"])] = f["value"]
        elif change.kind == "file":
            self._files[name] = f.get("data") if f.get("data") is not None else ""
        elif change.kind == "del":
            self._remove(f.get("what"), name, ns, f)

    def _remove(self, what, name, ns, f):
        if what == "netns":
            self._netns[name] = False
            for key in [k for k in self._links if k[0] == name]:
                del self._links[key]
        elif what == "link":
            rec = self.link(name, ns)
            self._links[(ns, name)] = None
            if rec and f.get("peer"):
                self._links[(f.get("peer_ns"), f["peer"])] = None
        elif what == "route":
            self._gone_routes.add((ns, f["dst"]))
            self._routes[ns] = [rt for rt in self._routes.get(ns, []) if rt["dst"] != f["dst"]]
        elif what == "rule":
            self._table(f["table"], ns, f["family"])["rules"].append((f["chain"], list(f["spec"]), False))
        elif what == "chain":
            t = self._table(f["table"], ns, f["family"])
            t["chains"][f["chain"]] = False
            t["rules"] = [r for r in t["rules"] if r[0] != f["chain"]]
        elif what == "file":
            self._files[name] = None


# ---------------------------------------------------------------- executor: the only place that runs

class Finished:
    """What a process cnikit waited for did, as subprocess.CompletedProcess says it: args,
    returncode (-N: killed by signal N), stdout and stderr as text; NOT_UTF8: either held
    bytes that are not UTF-8 (read as U+FFFD, so printing it never fails)."""

    def __init__(self, args, returncode, stdout, stderr, not_utf8=False):
        self.args, self.returncode, self.stdout, self.stderr = args, returncode, stdout, stderr
        self.not_utf8 = not_utf8


def _spawn_and_wait(argv, input=None, env=None, timeout=None):
    """Run ARGV to its end and return its Finished, as subprocess.run(capture_output=True,
    text=True) would, with os.posix_spawnp and pipes: `subprocess` alone costs a CLI start
    more than the rest of its imports (bench/cli_start.py). stdin is /dev/null unless INPUT
    (text, written while the output is read: no deadlock on big outputs); ENV is the whole
    environment (None: cnikit's; ARGV[0] is looked up in cnikit's own PATH). A binary that
    cannot start raises its OSError; a TIMEOUT or Ctrl-C kills and reaps the child, then
    raises (TimeoutError, KeyboardInterrupt)."""
    import select
    import _signal          # signal's C half: the `signal` module would import enum
    deadline = None if timeout is None else time.monotonic() + timeout
    ends = [fd for _ in range(2 if input is None else 3) for fd in os.pipe()]   # all close-on-exec
    if min(ends) < 3:       # cnikit started with 0, 1 or 2 closed: a dup2 onto itself keeps close-on-exec
        import fcntl
        low, ends = ends, [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3) for fd in ends]
        for fd in low:
            os.close(fd)
    out_r, out_w, err_r, err_w = ends[:4]
    in_r, in_w = ends[4:] or (None, None)
    # The child gets its three pipes and no other descriptor: close the inheritable ones cnikit
    # itself inherited (subprocess's close_fds).
    actions = []
    for fd in map(int, os.listdir("/proc/self/fd")):
        try:
            if fd > 2 and os.get_inheritable(fd):
                actions.append((os.POSIX_SPAWN_CLOSE, fd))
        except OSError:
            pass            # listdir's own descriptor, closed by now
    actions += [(os.POSIX_SPAWN_DUP2, out_w, 1), (os.POSIX_SPAWN_DUP2, err_w, 2),
                (os.POSIX_SPAWN_DUP2, in_r, 0) if input is not None
                else (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0)]
    pid, status, chunks = None, None, {out_r: [], err_r: []}
    # Ctrl-C is held until the child's pid is kept (a KeyboardInterrupt raised as posix_spawnp
    # returns would lose it); the child starts with no signal blocked, and gets SIGPIPE and SIGXFSZ
    # back, which Python ignores (as subprocess does).
    held = _signal.pthread_sigmask(_signal.SIG_BLOCK, {_signal.SIGINT})
    try:
        try:
            how = dict(file_actions=actions, setsigmask=(), setsigdef=(_signal.SIGPIPE, _signal.SIGXFSZ))
            try:
                pid = os.posix_spawnp(argv[0], argv, os.environ if env is None else env, **how)
            except FileNotFoundError:
                # a tool in sbin, for a user whose PATH lacks it (`sysctl -n` reads as anyone)
                sbin = [os.path.join(d, argv[0]) for d in SBIN_DIRS if "/" not in argv[0]]
                exe = next((p for p in sbin if os.access(p, os.X_OK)), None)
                if not exe:
                    raise
                pid = os.posix_spawn(exe, argv, os.environ if env is None else env, **how)
        finally:
            _signal.pthread_sigmask(_signal.SIG_SETMASK, held)
        for fd in (out_w, err_w, in_r):
            if fd is not None:
                os.close(fd)
                ends.remove(fd)
        poller = select.poll()
        for fd in chunks:
            poller.register(fd, select.POLLIN)
        data = memoryview(input.encode()) if input is not None else b""
        if in_w is not None:
            os.set_blocking(in_w, False)
            poller.register(in_w, select.POLLOUT)
        open_fds = set(chunks) | ({in_w} if in_w is not None else set())
        while open_fds:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError
            for fd, _ in poller.poll(None if left is None else int(left * 1000) + 1):
                if fd == in_w:
                    try:
                        data = data[os.write(fd, data[:65536]):]
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:
                        data = b""      # the child stopped reading: so be it (as subprocess)
                    done = not data
                else:
                    chunk = os.read(fd, 65536)
                    chunks[fd].append(chunk)
                    done = not chunk
                if done:
                    poller.unregister(fd)
                    open_fds.discard(fd)
                    os.close(fd)
                    ends.remove(fd)
        while status is None:   # the pipes are closed: the child is exiting, or closed them early
            done_pid, st = os.waitpid(pid, 0 if deadline is None else os.WNOHANG)
            if done_pid:
                status = st
            elif time.monotonic() >= deadline:
                raise TimeoutError
            else:
                time.sleep(0.002)
    except BaseException:
        if pid is not None and status is None:
            try:
                os.kill(pid, 9)             # SIGKILL
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        raise
    finally:
        for fd in ends:
            try:
                os.close(fd)
            except OSError:
                pass        # closed already: Ctrl-C came between its close and its removal
    texts, not_utf8 = [], False
    for fd in (out_r, err_r):
        raw = b"".join(chunks[fd])
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            text, not_utf8 = raw.decode(errors="replace"), True
        texts.append(text.replace("\r\n", "\n").replace("\r", "\n"))    # text=True's universal newlines
    code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    return Finished(argv, code, texts[0], texts[1], not_utf8)


class Runner:
    """The Executor: executes and echoes argv lists, the only place cnikit runs anything,
    and the owner of the State the verbs ask and of the Journal of what they changed.

    `run` is for commands that change the kernel: always echoed (unless quiet); in a plan
    (DRY_RUN) only echoed. CREATES, a Change (or several), says what it makes: the journal
    keeps it (rollback undoes it, a lesson summarises and refuses with it) and the State
    learns it (a plan's later steps see it).
    `state` answers every look-up a verb makes: the live kernel, or a plan's picture. A plan
    (DRY_RUN) is made for a fresh host (a lesson's script, the library's default) or, with
    PLAN_FOR "this host", against this host's kernel read-only (the CLI's --dry-run).
    `live` always reads the kernel (doctor only reads).
    `show` is for commands whose output is the point (echoed, output printed).
    `probe`, `spawn` and `hand_over` run checks, background tools and terminal programs.

    Documented exceptions, which do not go through a runner: the sandbox's own set-up
    (enter_sandbox: syscalls, mount points, `ip link set lo up` inside the new namespace,
    before any runner exists, gone with it) and the shell or CMD a sandbox hands over to;
    the runtime's result cache (cni_cache_write/cni_cache_drop write in-process as libcni
    does, noted as comments and recorded here as a Change.file so rollback removes it).
    """

    def __init__(self, dry_run=False, quiet=False, verbose=False, out=None, color=None, plan_for="fresh host"):
        self.quiet, self.verbose = quiet, verbose
        if plan_for not in ("fresh host", "this host"):
            raise ValueError(f"plan_for {plan_for!r} is not 'fresh host' or 'this host'")
        self.plan_for, self._host_facts = plan_for, False
        self.out = out or sys.stdout
        self.color = self.out.isatty() if color is None else color
        self._log = []            # every argv echoed by run/show/probe/spawn/hand_over
        self.journal = Journal()
        self.live = LiveState(self)
        self.dry_run = dry_run

    # -- the mode: the only place it is decided what a look-up reads
    @property
    def dry_run(self):
        """True: a plan (echo, run nothing)."""
        return self._plan

    @dry_run.setter
    def dry_run(self, plan):
        self._plan = bool(plan)
        if not plan:
            self.state = self.live
        elif self.plan_for == "this host":
            self.state = PlanState(LiveState(self, read_only=True), self.note, assume=True, facts=self.live)
        else:
            self.state = PlanState(FreshHost(LiveState(self, read_only=True) if self._host_facts else None),
                                   self.note, facts=self.live)

    @property
    def plans_this_host(self):
        """A fresh-host plan that reads this host's FORWARD policy and br_netfilter (what
        --host will find): a lesson's plan of what it will change here."""
        return self._host_facts

    @plans_this_host.setter
    def plans_this_host(self, value):
        self._host_facts = bool(value)
        self.dry_run = self._plan

    # -- printing
    def _print(self, text):
        print(text, file=self.out, flush=True)

    def echo(self, argv, suffix=""):
        """Print ARGV as one shell-quoted line (SUFFIX such as ' &' after it)."""
        self._log.append(list(argv))
        if self.quiet:
            return
        self.print_command(self.shell_line(argv) + suffix)

    def shell_line(self, argv):
        """ARGV as one line a shell runs: every word quoted as it needs."""
        return shell_join(argv)

    def print_command(self, line):
        """How a command appears: one line, highlighted on a terminal (a lesson's presenter
        mode types it out instead)."""
        self._print(f"\033[2m$\033[0m \033[1;36m{line}\033[0m" if self.color else line)

    def note(self, text):
        """A remark between commands, as a shell comment so a dry run stays a script."""
        if not self.quiet:
            self._print(f"\033[2m# {text}\033[0m" if self.color else f"# {text}")

    def output(self, text, ansi=None):
        """Print TEXT as it is (even with -q); ANSI, an SGR code such as "33", colours it."""
        if text:
            text = text.rstrip("\n")
            self._print(f"\033[{ansi}m{text}\033[0m" if ansi and self.color else text)

    def result(self, obj):
        """A CNI result, what the user asked for: the JSON in full (a lesson shows its gist)."""
        self.output(json.dumps(obj, indent=2))

    def needs(self, *tools):
        """The tools the commands ahead run: missing ones fail before anything runs (a plan
        runs none)."""
        if not self._plan:
            require_tools(*tools)

    def tense(self, done, planned):
        """DONE, or in a plan PLANNED ("removed", "would remove"): how a summary speaks."""
        return planned if self._plan else done

    # -- what this invocation did
    def mark(self):
        """A position in the commands echoed so far, for `ran_since`."""
        return len(self._log)

    def ran_since(self, mark):
        return len(self._log) > mark

    def commands(self):
        """Every argv echoed so far (copies), in order."""
        return [list(argv) for argv in self._log]

    def changes(self, kind=None):
        """The Change records so far (a dry run: the planned ones), oldest first."""
        return [c for c in self.journal.changes if kind is None or c.kind == kind]

    def made(self, kind, name, ns=None):
        """The newest Change of KIND called NAME in NS that this invocation made or planned."""
        return next((c for c in reversed(self.journal.changes) if c.same(kind, name, ns)), None)

    def record(self, *changes):
        """Remember CHANGES as this invocation's: made by a command `run` just ran, by
        another program cnikit started (the plugin makes cni0), or by cnikit in-process
        (a cache file). A plan's State learns them; otherwise rollback undoes them."""
        for change in changes:
            self.journal.record(change, ran=not self._plan)
            self.state.record(change)

    def forget(self, match):
        """A later command removed these objects itself (a pod that left): rollback must not undo
        the Changes MATCH(change) picks again."""
        self.journal.forget(match)

    # -- executing
    def execute(self, argv, input=None, env=None, timeout=None):
        """Run ARGV without echo and return its Finished (args, returncode, stdout, stderr):
        every process cnikit waits for starts here. It never reads the user's terminal (stdin
        is /dev/null unless INPUT is given); ENV adds variables to cnikit's own environment."""
        try:
            return _spawn_and_wait(argv, input=input, env=dict(os.environ, **env) if env else None,
                                   timeout=timeout)
        except FileNotFoundError:
            pkg = PACKAGES.get(argv[0], argv[0])
            raise CnikitError(f"{argv[0]} not found: install the Debian package {pkg}") from None
        except TimeoutError:
            raise CnikitError(f"{shell_join(argv)} did not finish within {timeout}s") from None
        except OSError as e:        # not executable, not a program (ENOEXEC), ...
            raise CnikitError(f"cannot run {argv[0]}: {e.strerror}") from None

    def run(self, argv, creates=None, check=True, input=None):
        """Echo ARGV, then run it; on success record CREATES (a Change or a list of
        them). INPUT goes to its stdin and is echoed as a here-document, so the line
        still pastes."""
        self.echo(argv, " <<'EOF'" if input is not None else "")
        if input is not None and not self.quiet:
            self._print(input.rstrip("\n") + "\nEOF")
        changes = [] if creates is None else [creates] if isinstance(creates, Change) else list(creates)
        if self._plan:
            self.record(*changes)
            return ""
        proc = self.execute(argv, input=input)
        if proc.returncode != 0:
            if check:
                raise CommandFailed(argv, proc.returncode, proc.stderr)
        else:
            self.record(*changes)
        if not self.quiet:
            self.output(proc.stdout)
        return proc.stdout

    def show(self, argv):
        """Echo ARGV and print its output even with -q: it is what the user asked to see."""
        self.echo(argv)
        if self._plan:
            return ""
        proc = self.execute(argv)
        if proc.returncode != 0:
            raise CommandFailed(argv, proc.returncode, proc.stderr)
        self.output(proc.stdout)
        return proc.stdout

    def probe(self, argv, timeout=30):
        """Echo and run a check (ping, ss, socat...): returns (ok, output) and never
        raises, so a lesson can print PASS or FAIL. A dry run prints it and answers
        (True, "")."""
        self.echo(argv)
        if self._plan:
            return True, ""
        try:
            proc = self.execute(argv, timeout=timeout)
        except CnikitError as e:
            return False, str(e)
        out = (proc.stdout + proc.stderr).rstrip("\n")
        if not self.quiet:
            self.output(out)
        return proc.returncode == 0, out

    def spawn(self, argv, stdin=False):
        """Start a background process (a listener, tcpdump), echoed with a trailing `&`.
        Returns the Popen (None in a dry run); the caller stops it. STDIN=True gives it
        a pipe to write to; it runs in its own session so its whole group can be stopped."""
        self.echo(argv, " &")
        if self._plan:
            return None
        try:
            return subprocess.Popen(argv, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    start_new_session=True)
        except FileNotFoundError:
            raise CnikitError(f"{argv[0]} not found: install the Debian package {PACKAGES.get(argv[0], argv[0])}")

    def exchange(self, shown, argv, stdin_obj, env=None, keep=None, limit=None, timeout=None):
        """Hand STDIN_OBJ as JSON to ARGV (a CNI plugin) and return the Finished, echoed
        as SHOWN with the JSON as a here-document (LIMIT: cut to that many characters unless -v).
        A plan echoes the JSON whole, so its script replays the call; KEEP names the shell
        variable the script keeps the answer in, and the answer is PlannedResult(KEEP) (None
        without KEEP)."""
        if self._plan:
            body, expands = heredoc_json(stdin_obj)
            echo_heredoc(self, shown, body, expands, capture=keep)
            return PlannedResult(keep) if keep else None
        stdin = json.dumps(stdin_obj, separators=(",", ":"))
        echo_heredoc(self, shown, cni_shorten(stdin, None if self.verbose else limit))
        return self.execute(argv, input=stdin, env=env, timeout=timeout)

    def write_json(self, path, obj, why, error):
        """Write OBJ as JSON to PATH atomically and record it: in-process (a runtime's cache,
        the documented exception to echoing), after the note WHY; a plan prints the commands
        that write it (a PlannedResult inside expands from its shell variable), so its script
        does what the real run does. A disk error is a CnikitError starting with ERROR."""
        self.note(why)
        change = Change.file(path, data=obj)
        if self._plan:
            body, expands = heredoc_json(obj, separators=None)
            self.run(["mkdir", "-p", os.path.dirname(path)])
            echo_heredoc(self, ["install", "-m", "0644", "/dev/stdin", path + ".tmp"], body, expands)
            self.run(["mv", "-f", path + ".tmp", path], creates=change)
            return
        tmp = path + ".tmp"
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(tmp, "w") as f:
                json.dump(obj, f)
            os.replace(tmp, path)
        except OSError as e:
            _remove_quietly(tmp)
            raise CnikitError(f"{error}: {e.strerror or e}") from None
        self.record(change)

    def remove_file(self, path, said, error):
        """Remove PATH in-process if it is there (SAID, ERROR: the note and the error, with
        {} for the path); a plan prints `rm -f PATH`, which its script runs whatever is there."""
        change = Change.file(path).gone()
        if self._plan:
            self.run(["rm", "-f", path], creates=change)
        elif os.path.exists(path):
            try:
                os.unlink(path)
            except OSError as e:
                raise CnikitError(f"{error.format(path)}: {e.strerror or e}") from None
            self.record(change)
            self.note(said.format(path))

    def read(self, argv):
        """Run a read-only look-up and return the Finished (echoed with -v only):
        the States read the kernel through this."""
        if self.verbose:
            self.note("look-up: " + shell_join(argv))
        return self.execute(argv)

    def query(self, argv):
        """A lesson's own read-only look-up: (ok, stdout). A plan skips it (answering
        'absent'); a look-up a plan may make reads `live`. cnikit's verbs ask `state` instead."""
        if self._plan:
            return False, ""
        proc = self.read(argv)
        return proc.returncode == 0, proc.stdout

    def query_json(self, argv):
        return json_answer(*self.query(argv))

    def rollback(self, since=0, why="rolling back what this command created"):
        """Undo, newest first, what this invocation made (the changes recorded after the
        first SINCE); keep going past failures, and report each one on stderr. Returns
        the changes that could not be undone (a plan has nothing to undo)."""
        return self.journal.rollback(self, since, why)

    def hand_over(self, argv):
        """Echo ARGV and run it attached to the user's terminal (a shell, `tail -F`);
        returns its exit code. Ctrl-C stops it, not cnikit."""
        self.echo(argv)
        if self._plan:
            return 0
        try:
            return subprocess.call(argv)
        except FileNotFoundError:
            raise CnikitError(f"{argv[0]} not found: install the Debian package "
                              f"{PACKAGES.get(argv[0], argv[0])}") from None
        except KeyboardInterrupt:
            return 130

    def transaction(self):
        return _Transaction(self)


Executor = Runner


class _Transaction:
    """`with runner.transaction():` rolls back this block's objects if it fails, for
    any reason: a failed command, Ctrl-C, an OSError, a bug."""

    def __init__(self, runner):
        self.runner, self.mark = runner, None

    def __enter__(self):
        self.mark = len(self.runner.journal.undo)
        return self.runner

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.runner.rollback(since=self.mark)
        return False


# ---------------------------------------------------------------- look-ups the verbs share
# Each asks the runner's State: the live kernel, or a plan's picture of it.

def get_link(r, name, ns=None):
    """The link's `ip -j -d link show` record, or None when it does not exist."""
    return r.state.link(name, ns)


def link_addrs(r, name, ns=None):
    return r.state.addrs(name, ns)


def link_kind(link):
    return (link or {}).get("linkinfo", {}).get("info_kind", "")


def netns_names(r):
    """Named namespaces, in name order."""
    return r.state.netns_names()


def netns_exists(name):
    """Does NAME exist in the live kernel (its file in /run/netns)? Verbs ask r.state."""
    return os.path.exists(os.path.join(NETNS_DIR, name))


def require_netns(r, name, what="namespace"):
    """A namespace this command needs."""
    if name and not r.state.netns_exists(name):
        r.state.missing(f"{what} {name!r} does not exist (create it with: cnikit netns add {name})",
                        Change.netns(name))


def ensure_addrs(r, dev, cidrs, ns=None, fresh=False):
    """Add the addresses DEV lacks; an address already there is left as is.
    FRESH: DEV was just created, so it has none (no look-up needed)."""
    wanted = [c for c in cidrs if c]
    have = link_addrs(r, dev, ns) if wanted and not fresh else set()
    for cidr in wanted:
        if cidr not in have:
            same_family = [h for h in have if ":" in h] if ":" in cidr else [h for h in have if ":" not in h]
            if same_family:
                r.note(f"{dev} already has {', '.join(sorted(same_family))}; adding {cidr} as another address")
            r.run(addr_add(cidr, dev, ns), creates=Change.addr(cidr, dev, ns))
            have = have | {cidr}


def say_if_unchanged(r, mark, what):
    """After a re-run: tell the user when nothing needed doing (no command since MARK)."""
    if not r.ran_since(mark):
        r.note(f"{what} already exists as asked; nothing to do")


def ensure_up(r, dev, ns=None, link=None, fresh=False):
    """Bring DEV up unless it is up. FRESH: just created, so down (no look-up)."""
    link = {} if fresh else link if link is not None else get_link(r, dev, ns)
    if "UP" not in (link or {}).get("flags", []):
        r.run(link_up(dev, ns), creates=Change.up(dev, ns))


# ---------------------------------------------------------------- netns

def netns_add(r, name, lo_up=False):
    """Create netns NAME (tagged as cnikit's). Re-run: an existing NAME is left as is."""
    check_netns(name)
    if r.state.netns_exists(name):
        r.note(f"netns {name} already exists; nothing to do")
    else:
        add, tag = netns_add_argv(name)
        r.run(add, creates=Change.netns(name))
        r.run(tag)
    if lo_up:
        netns_lo_up(r, name)


def netns_lo_up(r, name):
    """Bring up lo in NAME: without it even 127.0.0.1 is unreachable inside."""
    check_netns(name)
    require_netns(r, name)
    ensure_up(r, "lo", ns=name)


def netns_del(r, name):
    """Delete netns NAME and everything inside it. Re-run: absent is fine."""
    check_netns(name)
    if not r.state.netns_exists(name):
        r.note(f"netns {name} does not exist; nothing to delete")
        return
    r.run(ip("netns", "del", name), creates=Change.netns(name).gone())


def netns_list(r):
    return r.show(ip("netns", "list"))


def netns_exec(r, name, cmd):
    """Run CMD inside NAME with the terminal attached; returns its exit code."""
    check_netns(name)
    require_netns(r, name)
    if not cmd:
        raise UsageError("netns exec needs a command after --, e.g. cnikit netns exec ns1 -- ip addr")
    return r.hand_over(ip("netns", "exec", name, *cmd))


# ---------------------------------------------------------------- veth

def veth_add(r, name, peer, netns=None, addr=None, peer_addr=None, mtu=None, ns=None):
    """A veth pair NAME <-> PEER, PEER moved into NETNS, addresses set, both ends up.

    Re-run contract: if NAME already is a veth whose peer is PEER (in NETNS), only
    what is missing (addresses, up) is done; any other NAME or PEER is a conflict.
    """
    check_ifname(name)
    check_ifname(peer, "peer name")
    if netns:
        check_netns(netns)
    if ns:
        check_netns(ns)
    addr = check_ifaddr(addr, "--addr") if addr else None
    peer_addr = check_ifaddr(peer_addr, "--peer-addr") if peer_addr else None
    mtu = check_mtu(mtu)
    if netns is None and name == peer:
        raise UsageError("a veth's two ends in one namespace need two different names")
    require_netns(r, ns)
    require_netns(r, netns)
    peer_ns = netns or ns
    link, mark = get_link(r, name, ns), r.mark()
    with r.transaction():
        if link:
            _check_veth_peer(r, link, name, peer, peer_ns, ns)
            r.note(f"veth {name} already exists with peer {peer}; checking the rest")
        else:
            if get_link(r, peer, peer_ns):
                raise UsageError(f"{peer} already exists{' in ' + peer_ns if peer_ns else ''}; "
                                 "pick another peer name")
            # The peer goes with NAME: only NAME is undone.
            r.run(veth_add_argv(name, peer, netns, mtu, ns),
                  creates=[Change.link(name, ns, "veth", mtu, peer=peer, peer_ns=peer_ns),
                           Change("link", peer, peer_ns, type="veth", mtu=mtu, peer=name, peer_ns=ns)])
            r.run(tag_link(name, ns))
        fresh = link is None
        ensure_addrs(r, name, [addr], ns, fresh)
        ensure_addrs(r, peer, [peer_addr], peer_ns, fresh)
        ensure_up(r, name, ns, fresh=fresh)
        ensure_up(r, peer, peer_ns, fresh=fresh)
    say_if_unchanged(r, mark, f"veth {name} <=> {peer}")


def _check_veth_peer(r, link, name, peer, peer_ns, ns):
    if link_kind(link) != "veth":
        raise UsageError(f"{name} already exists as a {link_kind(link) or 'non-veth'} link, not a veth")
    if not is_veth_pair(link, get_link(r, peer, peer_ns)):
        where = f" in {peer_ns}" if peer_ns else ""
        raise UsageError(f"veth {name} already exists but its peer is not {peer}{where}")


def is_veth_pair(link, other):
    """Two link records are the ends of one veth: by name in one namespace, by
    ifindex across namespaces (ip -j shows the peer's index there)."""
    if not link or not other:
        return False
    if link.get("link") == other["ifname"] and other.get("link") == link["ifname"]:
        return True
    return link.get("link_index") == other["ifindex"] and other.get("link_index") == link["ifindex"]


def link_del(r, name, kind, ns=None):
    """Delete link NAME, which must be a KIND (veth, bridge, vxlan): cnikit never
    deletes a link of another kind by mistake. Re-run: absent is fine."""
    check_ifname(name, f"{kind} name")
    require_netns(r, ns)
    link = get_link(r, name, ns)
    if not link:
        r.note(f"{kind} {name} does not exist; nothing to delete")
        return
    if link_kind(link) != kind:
        raise UsageError(f"{name} is a {link_kind(link) or 'plain'} link, not a {kind}; not deleting it")
    r.run(ip("link", "del", name, ns=ns), creates=Change.link(name, ns, kind, peer=link.get("link")).gone())


def veth_del(r, name, ns=None):
    """Delete veth NAME (its peer goes with it). Re-run: absent is fine."""
    link_del(r, name, "veth", ns)


# ---------------------------------------------------------------- bridge

def bridge_add(r, name, addr=None, mtu=None, ns=None):
    """A Linux bridge NAME, optionally holding the gateway ADDR, up.

    Re-run contract: an existing bridge NAME gets only what is missing; a non-bridge
    link called NAME is a conflict.
    """
    check_ifname(name, "bridge name")
    addr = check_ifaddr(addr, "--addr") if addr else None
    mtu = check_mtu(mtu)
    if ns:
        check_netns(ns)
    require_netns(r, ns)
    link, mark = get_link(r, name, ns), r.mark()
    with r.transaction():
        if link:
            if link_kind(link) != "bridge":
                raise UsageError(f"{name} already exists as a {link_kind(link) or 'non-bridge'} link")
            r.note(f"bridge {name} already exists; checking the rest")
            pin_bridge_mac(r, name, link, ns)
        else:
            mac = bridge_mac(name, ns, machine_id())
            r.run(bridge_add_argv(name, mtu, ns, mac), creates=Change.link(name, ns, "bridge", mtu, address=mac))
            r.run(tag_link(name, ns))
        ensure_addrs(r, name, [addr], ns, fresh=link is None)
        ensure_up(r, name, ns, link, fresh=link is None)
        bridge_forward_accept(r, name, ns)
    say_if_unchanged(r, mark, f"bridge {name}")


def addr_assign_type(r, name, link, ns=None):
    """How the kernel got LINK's MAC (0 permanent, 1 random, 2 stolen, 3 set); None: unknown."""
    return r.state.addr_assign_type(name, link, ns)


def pin_bridge_mac(r, name, link, ns=None):
    """A bridge made without a MAC of its own (by an older cnikit or by hand) follows its
    lowest port's: give it its current MAC for good, which changes nothing now."""
    kind = addr_assign_type(r, name, link, ns)
    if kind is None or kind == 3 or not link.get("address"):
        return
    r.note(f"{name}'s MAC follows its lowest port (addr_assign_type {kind}): keep {link['address']} for good")
    r.run(ip("link", "set", "dev", name, "address", link["address"], ns=ns))


def bridge_attach(r, name, ifaces, ns=None):
    """Enslave each IFACE to bridge NAME and bring it up. Re-run: ports stay."""
    check_ifname(name, "bridge name")
    for iface in ifaces:
        check_ifname(iface)
    if not ifaces:
        raise UsageError("bridge attach needs at least one interface")
    require_netns(r, ns)
    br = get_link(r, name, ns)
    ports = {iface: get_link(r, iface, ns) for iface in ifaces}     # one look-up each
    if link_kind(br) != "bridge":
        r.state.missing(f"bridge {name} does not exist (create it with: cnikit bridge add {name})",
                        Change.link(name, ns, "bridge"))
    for iface, link in ports.items():
        if not link:
            r.state.missing(f"interface {iface} does not exist{' in ' + ns if ns else ''}", Change.link(iface, ns))
    for iface, link in ports.items():
        if link and link.get("master") == name:
            r.note(f"{iface} is already a port of {name}")
        else:
            r.run(ip("link", "set", "dev", iface, "master", name, ns=ns), creates=Change.master(iface, name, ns))
        ensure_up(r, iface, ns, link)


def bridge_del(r, name, ns=None):
    """Delete bridge NAME (its ports stay, detached) and the FORWARD accepts bridge add
    gave it on a Docker host. Re-run: absent is fine."""
    link_del(r, name, "bridge", ns)
    table, chain, spec = bridge_forward_rule(name)
    for family in IPTABLES_TOOL:
        if r.state.has_rule(table, chain, spec, ns, family):
            r.run(iptables_rule("-D", table, chain, spec, ns, family),
                  creates=Change.rule(table, chain, spec, ns, family).gone())


def bridge_forward_accept(r, name, ns=None):
    """A Docker host drops bridged traffic: its (ip6)tables FORWARD policy is DROP, and with
    br_netfilter (net.bridge.bridge-nf-call-iptables=1, -ip6tables=1) even frames switched
    between two ports of one bridge traverse FORWARD. There, and only in the family where
    both hold, accept what moves between NAME's own ports (tagged, so bridge del and cleanup
    remove it), nothing else. Re-run: a rule already present is not added twice."""
    table, chain, spec = bridge_forward_rule(name)
    for family, tool in IPTABLES_TOOL.items():
        if not (forward_drops(r, ns, family) and bridged_frames_filtered(r, ns, family)):
            continue
        which_ = "" if family == 4 else f"{tool} "
        r.note(f"this host's {which_}FORWARD policy is DROP (Docker sets it) and br_netfilter sends {name}'s "
               f"switched frames through it (bridge-nf-call-{tool}=1): accept traffic between {name}'s own ports")
        if r.state.has_rule(table, chain, spec, ns, family):
            r.note(f"the {tool} FORWARD accept rule for {name} is already present")
            continue
        r.run(iptables_rule("-A", table, chain, spec, ns, family),
              creates=Change.rule(table, chain, spec, ns, family))


def forward_drops(r, ns=None, family=4):
    """Is this host's (ip6)tables FORWARD policy DROP (as Docker sets it)? A plan for a fresh
    host: no (unless it plans what a lesson's --host will find); without the tool: no."""
    return which(IPTABLES_TOOL[family]) is not None and r.state.forward_policy(ns, family) == "DROP"


def bridged_frames_filtered(r, ns=None, family=4):
    """Does br_netfilter pass bridged frames of FAMILY through (ip6)tables here (per namespace)?"""
    return r.state.bridged_frames_filtered(ns, family)


def bridge_show(r, name, ns=None):
    """Print the bridge's ports and the MAC addresses it has learned (its fdb)."""
    check_ifname(name, "bridge name")
    require_netns(r, ns)
    if link_kind(get_link(r, name, ns)) != "bridge":
        r.state.missing(f"bridge {name} does not exist")
    ports = r.show(ip("-br", "link", "show", "master", name, ns=ns))
    fdb = r.show(bridge("fdb", "show", "br", name, ns=ns))
    return ports, fdb


# ---------------------------------------------------------------- route

def route_add(r, dst, via=None, dev=None, ns=None):
    """A route to DST ("default" or a CIDR) via a gateway and/or out of DEV, tagged with
    cnikit's protocol number (`proto 157`) so cleanup finds it.

    Re-run contract: the same route (the same gateway and device, where given) already
    there is left alone; a route to DST through another gateway or device is a conflict,
    never replaced (cnikit does not take over a route it did not make): delete it first."""
    if dst != "default":
        dst = check_subnet(dst, "route destination")
    via = check_ip(via, "gateway") if via else None
    if dev:
        check_ifname(dev)
    if not via and not dev:
        raise UsageError("a route needs a gateway (via) or a device")
    if ns:
        check_netns(ns)
        require_netns(r, ns)
    where = f" in {ns}" if ns else ""
    for route in r.state.routes(dst, ns):
        if (via and route.get("gateway") != via) or (dev and route.get("dev") != dev):
            have = " ".join(kv(via=route.get("gateway"), dev=route.get("dev")))
            raise UsageError(f"a route to {dst}{where} already exists ({have}), not "
                             f"{' '.join(kv(via=via, dev=dev))}: delete it first (ip route del {dst})")
        r.note(f"the route to {dst}{where} already exists as asked")
        return
    r.run(ip("route", "add", dst, *kv(via=via, dev=dev, proto=ROUTE_PROTO), ns=ns),
          creates=Change.route(dst, ns, protocol=ROUTE_PROTO, via=via, dev=dev))


def route_del(r, dst, ns=None):
    """Delete the route to DST ("default" or a CIDR) that route_add made, and only that one:
    a route to DST that cnikit did not make (any protocol but ROUTE_PROTO) is refused and
    stays. Re-run: no route to DST is fine. The delete names `proto 157`, so even a script
    run elsewhere than it was planned cannot remove another program's route: the kernel
    matches the protocol."""
    if dst != "default":
        dst = check_subnet(dst, "route destination")
    if ns:
        check_netns(ns)
        require_netns(r, ns)
    where = f" in {ns}" if ns else ""
    family = ["-6"] if ":" in dst else []       # `ip route show exact` looks in one family
    delete = ip(*family, "route", "del", dst, "proto", ROUTE_PROTO, ns=ns)
    routes = r.state.routes(dst, ns)
    ours = [route for route in routes if str(route.get("protocol")) == str(ROUTE_PROTO)]
    if routes and not ours:
        theirs = routes[0].get("protocol", "boot")    # ip -j leaves out the default, boot
        raise UsageError(f"the route to {dst}{where} is not cnikit's (protocol {theirs}, not {ROUTE_PROTO}): "
                         f"left as is")
    if not ours:
        r.note(f"no route to {dst}{where}; nothing to delete")
    for _ in ours:
        r.run(delete, creates=Change.route(dst, ns).gone())


# ---------------------------------------------------------------- nat

def _cnikit_rules(r, ns=None, subnet=None, tagged=None, family=4):
    """cnikit's rules as (table, chain, spec), as `iptables -S` lists them: those its
    comment tags (the jumps, the CLI's NAT rules, the plugin's) and, with no SUBNET, every
    rule inside a chain of cnikit's. TAGGED: only the rules whose comment is exactly that."""
    found = []
    for table in IPTABLES_TABLES:
        for chain, spec in r.state.rules(table, ns, family) or []:
            comment = _comment_of(spec) or None
            ours = comment is not None and (comment == TAG or comment.startswith(TAG + " "))
            if subnet is not None or tagged is not None:
                ours = comment == (tagged if tagged is not None else nat_comment(subnet))
            elif chain.startswith(CHAIN_PREFIX):
                ours = True
            if ours:
                found.append((table, chain, spec))
    return found


def _cnikit_chains(r, ns=None):
    """The chains cnikit made, as (table, chain): their names carry its prefix."""
    return [(table, chain) for table in IPTABLES_TABLES for chain in r.state.chains(table, ns) or []
            if chain.startswith(CHAIN_PREFIX)]


def _remove_chains(r, chains, ns=None, check=True):
    """Empty, then delete, each (table, chain): the jumps into them must be gone first."""
    for table, chain in chains:
        r.run(iptables("-t", table, "-F", chain, ns=ns), check=check)
        r.run(iptables("-t", table, "-X", chain, ns=ns), check=check, creates=Change.chain(table, chain, ns).gone())


def ensure_sysctl(r, key, value, ns=None):
    """Set KEY to VALUE unless it is already (recorded with the old value, so rollback restores it)."""
    old = r.state.sysctl(key, ns)
    if old == str(value):
        r.note(f"{key} is already {value}")
    else:
        r.run(sysctl_set(key, value, ns), creates=Change.sysctl(key, value, ns, old=old))


def ensure_rule(r, table, chain, spec, ns=None, family=4, said=None):
    """Append a rule unless it is there (SAID: the note when it is)."""
    if r.state.has_rule(table, chain, spec, ns, family):
        r.note(said or f"{table} {chain} rule already present")
        return
    r.run(iptables_rule("-A", table, chain, spec, ns, family), creates=Change.rule(table, chain, spec, ns, family))


def ensure_chain(r, table, chain, ns=None, said=None):
    if r.state.has_chain(table, chain, ns):
        r.note(said or f"chain {chain} ({table}) already exists")
    else:
        r.run(iptables("-t", table, "-N", chain, ns=ns), creates=Change.chain(table, chain, ns))


def delete_rule(r, table, chain, spec, ns=None, family=4, check=True):
    r.run(iptables_rule("-D", table, chain, spec, ns, family), check=check,
          creates=Change.rule(table, chain, spec, ns, family).gone())


def nat_add(r, subnet, out_iface, ns=None):
    """Egress for SUBNET through OUT: ip_forward on; in a chain of its own per table
    (CNIKIT-NAT-<hash>), MASQUERADE and the FORWARD accepts; one jump into each chain.

    Re-run contract: what is already present is not added twice; the same subnet
    through another interface is a conflict (nat del it first).
    """
    subnet = check_subnet(subnet)
    check_ifname(out_iface, "--out interface")
    if ns:
        check_netns(ns)
    require_netns(r, ns)
    require_tools("iptables", "sysctl")
    if not get_link(r, out_iface, ns):
        r.state.missing(f"--out interface {out_iface} does not exist{' in ' + ns if ns else ''}: "
                        "the rules would never match", Change.link(out_iface, ns))
    existing = _cnikit_rules(r, ns, subnet)
    for _, _, spec in existing:
        if "-o" in spec and spec[spec.index("-o") + 1] != out_iface:
            raise UsageError(f"NAT for {subnet} already leaves through {spec[spec.index('-o') + 1]}; "
                             f"run `cnikit nat del {subnet}` first")
    if forward_drops(r, ns):
        r.note(f"this host's FORWARD policy is DROP (Docker sets it): only the FORWARD accept rules "
               f"below let {subnet}'s packets and their replies through")
    chain = nat_chain(subnet)
    with r.transaction():
        # Forwarding is what turns the host into a router; nat del leaves it on (others may rely on it).
        ensure_sysctl(r, "net.ipv4.ip_forward", 1, ns)
        for table in IPTABLES_TABLES:
            ensure_chain(r, table, chain, ns, said=f"chain {chain} ({table}) for {subnet} already exists")
            # The chain is filled before the jump into it: no packet sees it half made.
            for t, c, spec in [rule for rule in nat_rules(subnet, out_iface) if rule[0] == table] + \
                    [jump for jump in nat_jumps(subnet) if jump[0] == table]:
                ensure_rule(r, t, c, spec, ns, said=f"{t} {c} {spec[-1]} rule for {subnet} already present")


def nat_del(r, subnet, ns=None):
    """Remove what `nat add SUBNET` made: the jumps, then its chains (flush, delete).
    Re-run: none left is fine."""
    subnet = check_subnet(subnet)
    if ns:
        check_netns(ns)
    require_netns(r, ns)
    require_tools("iptables")
    chain = nat_chain(subnet)
    # Rules in the chain go with it; tagged rules elsewhere (the jumps) are deleted one by one.
    rules = [(t, c, spec) for t, c, spec in _cnikit_rules(r, ns, subnet) if c != chain]
    chains = [(t, c) for t, c in _cnikit_chains(r, ns) if c == chain]
    if not rules and not chains:
        r.note(f"no cnikit NAT rules for {subnet}; nothing to delete")
    for table, c, spec in rules:
        delete_rule(r, table, c, spec, ns)
    _remove_chains(r, chains, ns)


def nat_show(r, ns=None):
    """Print cnikit's chains and rules, as iptables commands that would make them."""
    if ns:
        check_netns(ns)
    require_netns(r, ns)
    require_tools("iptables")
    chains = _cnikit_chains(r, ns)
    rules = _cnikit_rules(r, ns)
    lines = [shell_join(iptables("-t", table, "-N", chain)) for table, chain in chains]
    lines += [shell_join(iptables_rule("-A", table, chain, spec)) for table, chain, spec in rules]
    r.note(f"cnikit's iptables chains and rules{' in ' + ns if ns else ''}: "
           f"{len(chains)} chain(s), {len(rules)} rule(s)")
    r.output("\n".join(lines))
    return lines


def check_port_to(text):
    """--to of `nat publish`: an IPv4 address and a port, e.g. 10.0.5.2:80."""
    addr, sep, port = (text or "").rpartition(":")
    if not sep:
        raise UsageError(f"--to {text!r} needs an address and a port, e.g. 10.0.5.2:80")
    addr = check_ip(addr, "--to address")
    if ":" in addr:
        raise UsageError(f"--to address {addr} is IPv6: nat publish writes iptables (IPv4) rules")
    return addr, check_int(port, 1, 65535, "--to port")


def nat_publish(r, port, to, bridge, proto="tcp", ns=None):
    """Publish PORT of this host as `docker run -p PORT:...` does with its userland proxy off:
    connections to PORT on any of the host's addresses (localhost and the host's own included)
    go to TO (IP:PORT) on BRIDGE; ip_forward and BRIDGE's route_localnet on (port_rules says
    what each rule is for).

    Re-run contract: what is already present is not added twice; PORT already published to
    another destination is a conflict (nat unpublish it first)."""
    port = check_int(port, 1, 65535, "port")
    to_ip, to_port = check_port_to(to)
    if proto not in PORT_PROTOS:
        raise UsageError(f"protocol {proto!r} is not one of {', '.join(PORT_PROTOS)}")
    check_ifname(bridge, "--bridge")
    if ns:
        check_netns(ns)
    require_netns(r, ns)
    require_tools("iptables", "sysctl")
    if link_kind(get_link(r, bridge, ns)) != "bridge":
        r.state.missing(f"bridge {bridge} does not exist{' in ' + ns if ns else ''}: the container "
                        f"behind --to is on a bridge (create it with: cnikit bridge add {bridge})",
                        Change.link(bridge, ns, "bridge"))
    for _, _, spec in _cnikit_rules(r, ns, tagged=port_comment(port, proto)):
        if "DNAT" in spec and spec[-1] != f"{to_ip}:{to_port}":
            raise UsageError(f"port {proto}/{port} is already published to {spec[-1]}; "
                             f"run `cnikit nat unpublish {port}` first")
    if forward_drops(r, ns):
        r.note(f"this host's FORWARD policy is DROP (Docker sets it): the FORWARD accept below lets "
               f"connections to {to_ip}:{to_port} through, and only them")
    with r.transaction():
        for key in ("net.ipv4.ip_forward", f"net.ipv4.conf.{bridge}.route_localnet"):
            ensure_sysctl(r, key, 1, ns)
        ensure_chain(r, "nat", PORTS_CHAIN, ns)
        for name, (table, chain, spec) in port_rules(port, to_ip, to_port, bridge, proto).items():
            ensure_rule(r, table, chain, spec, ns, said=f"the {name} rule for {proto}/{port} is already present")
    r.note(f"{proto}/{port} on every address of this host now leads to {to_ip}:{to_port}. Where br_netfilter is on, "
           f"the container calling its own published port also needs hairpin mode on its port of {bridge} "
           f"(bridge link set dev PORT hairpin on)")


def nat_unpublish(r, port, proto="tcp", ns=None):
    """Remove what `nat publish PORT` made; with no port published any more, also the shared
    rules (the jumps, the local masquerades) and the chain. The sysctls stay (others may rely
    on them). Re-run: nothing left is fine."""
    port = check_int(port, 1, 65535, "port")
    if proto not in PORT_PROTOS:
        raise UsageError(f"protocol {proto!r} is not one of {', '.join(PORT_PROTOS)}")
    if ns:
        check_netns(ns)
    require_netns(r, ns)
    require_tools("iptables")
    rules = _cnikit_rules(r, ns, tagged=port_comment(port, proto))
    if not rules:
        r.note(f"{proto}/{port} is not published by cnikit; nothing to delete")
        return
    for table, chain, spec in rules:
        delete_rule(r, table, chain, spec, ns)
    if any(_comment_of(spec).startswith(f"{TAG} port ") for _, _, spec in _cnikit_rules(r, ns)):
        r.note("other ports stay published: the rules they share stay too")
        return
    for table, chain, spec in _cnikit_rules(r, ns, tagged=PORTS_COMMENT):
        delete_rule(r, table, chain, spec, ns)
    if r.state.has_chain("nat", PORTS_CHAIN, ns):
        _remove_chains(r, [("nat", PORTS_CHAIN)], ns)


def _comment_of(spec):
    return spec[spec.index("--comment") + 1] if "--comment" in spec[:-1] else ""


# ---------------------------------------------------------------- vxlan

def underlay_mtu(r, dev=None, remote=None, ns=None):
    """The MTU of the device the overlay rides on: DEV, else the route to REMOTE (a plan
    knows the links it planned itself, and reads this host's read-only)."""
    if not dev and remote:
        dev = r.state.route_dev(remote, ns)
    link = get_link(r, dev, ns) if dev else None
    if link and link.get("mtu"):
        return link["mtu"]
    r.note(f"underlay MTU unknown here; assuming {DEFAULT_MTU}")
    return DEFAULT_MTU


def vxlan_add(r, name, vni, remote=None, group=None, local=None, dev=None, dstport=VXLAN_PORT,
              bridge_name=None, mtu=None, ns=None, learning=True):
    """A VXLAN device NAME (VNI, UDP DSTPORT) to REMOTE or multicast GROUP, its MTU
    the underlay's minus 50, optionally a port of BRIDGE, up. LEARNING=False: its
    forwarding table holds only the entries it is given (flannel's `nolearning`).

    Without --remote or --group, peers come from `vxlan fdb add` (flannel's way).
    Re-run contract: an existing vxlan NAME with the same VNI gets only what is
    missing; any other link NAME, or another VNI, is a conflict.
    """
    check_ifname(name, "vxlan name")
    vni = check_int(vni, 1, VNI_MAX, "VNI")
    dstport = check_int(dstport, 1, 65535, "--dstport")
    if remote and group:
        raise UsageError("give --remote (unicast peer) or --group (multicast), not both")
    remote = check_ip(remote, "--remote") if remote else None
    group = check_ip(group, "--group") if group else None
    if group and not ipaddress.ip_address(group).is_multicast:
        raise UsageError(f"--group {group} is not a multicast address (224.0.0.0/4)")
    if group and not dev:
        raise UsageError("--group needs --dev: the interface to join the multicast group on")
    local = check_ip(local, "--local") if local else None
    if dev:
        check_ifname(dev, "--dev")
    if bridge_name:
        check_ifname(bridge_name, "--bridge")
    mtu = check_mtu(mtu)
    if ns:
        check_netns(ns)
    require_netns(r, ns)
    if dev and not get_link(r, dev, ns):
        r.state.missing(f"--dev {dev} does not exist{' in ' + ns if ns else ''}", Change.link(dev, ns))
    link, mark = get_link(r, name, ns), r.mark()
    with r.transaction():
        if link:
            have = link.get("linkinfo", {}).get("info_data", {}).get("id")
            if link_kind(link) != "vxlan" or have != vni:
                raise UsageError(f"{name} already exists as {link_kind(link) or 'a link'}"
                                 f"{' with VNI ' + str(have) if have else ''}; not VNI {vni}")
            r.note(f"vxlan {name} (VNI {vni}) already exists; checking the rest")
        else:
            mtu = mtu or underlay_mtu(r, dev, remote or group, ns) - VXLAN_OVERHEAD
            r.run(vxlan_add_argv(name, vni, mtu, remote, group, local, dev, dstport, ns, learning),
                  creates=Change.link(name, ns, "vxlan", mtu, vni=vni))
            r.run(tag_link(name, ns))
        if bridge_name:
            if link_kind(get_link(r, bridge_name, ns)) != "bridge":
                r.state.missing(f"bridge {bridge_name} does not exist", Change.link(bridge_name, ns, "bridge"))
            if not link or link.get("master") != bridge_name:
                r.run(ip("link", "set", "dev", name, "master", bridge_name, ns=ns),
                      creates=Change.master(name, bridge_name, ns))
        ensure_up(r, name, ns, link, fresh=link is None)
    say_if_unchanged(r, mark, f"vxlan {name}")


def vxlan_fdb_add(r, name, mac, dst, ns=None):
    """Tell vxlan NAME that MAC lives behind underlay address DST. The all-zeros MAC
    is the flood entry (broadcast, ARP): it may have several destinations, so it is
    appended; re-run: an entry already there is left alone."""
    check_ifname(name, "vxlan name")
    mac = check_mac(mac)
    dst = check_ip(dst, "--dst")
    if ns:
        check_netns(ns)
    require_netns(r, ns)
    if link_kind(get_link(r, name, ns)) != "vxlan":
        r.state.missing(f"vxlan {name} does not exist", Change.link(name, ns, "vxlan"))
    entries = r.state.fdb(name, ns)
    if any(e.get("mac") == mac and e.get("dst") == dst for e in entries):
        r.note(f"fdb entry {mac} dst {dst} on {name} already present")
        return
    r.run(bridge("fdb", "append", mac, "dev", name, "dst", dst, ns=ns))


def vxlan_del(r, name, ns=None):
    """Delete vxlan NAME. Re-run: absent is fine."""
    link_del(r, name, "vxlan", ns)


# ---------------------------------------------------------------- show




def collect(r, only=None):
    """What exists now: every namespace's links (with peers and masters), addresses,
    routes, and cnikit's NAT rules, as plain data. ONLY: just that namespace."""
    if only:
        check_netns(only)
        if not r.state.netns_exists(only):
            raise UsageError(f"namespace {only!r} does not exist")
    names = [None] + netns_names(r)
    spaces = []
    for ns in names:
        links = r.state.link_records(ns)
        routes = r.state.routes(ns=ns)
        ids = {i.get("nsid"): i.get("name") or HOST_NAME for i in r.state.nsids(ns)}
        nat = [{"table": t, "chain": c, "rule": shell_join(s)} for t, c, s in _cnikit_rules(r, ns)] \
            if which("iptables") else []
        spaces.append({"name": ns or HOST_NAME, "links": [_link_record(l, ids) for l in links],
                       "routes": [_route_text(rt) for rt in routes], "nat": nat})
    _resolve_peers(spaces)
    return {"namespaces": [sp for sp in spaces if not only or sp["name"] == only]}


def _link_record(link, nsids):
    info = link.get("linkinfo", {})
    rec = {"name": link["ifname"], "index": link["ifindex"], "kind": info.get("info_kind") or
           ("loopback" if link.get("link_type") == "loopback" else "device"),
           "state": "UP" if "UP" in link.get("flags", []) else "DOWN", "mtu": link.get("mtu"),
           "mac": link.get("address"), "master": link.get("master"), "cnikit": link.get("ifalias") == TAG,
           "addrs": [f"{a['local']}/{a['prefixlen']}" for a in link.get("addr_info", [])
                     if a.get("family") == "inet" or a.get("scope") == "global"]}
    if rec["kind"] == "veth":
        rec["peer_index"] = link.get("link_index")
        rec["peer_name"] = link.get("link")      # set when the peer is in the same namespace
        rec["peer_netns"] = nsids.get(link.get("link_netnsid")) if "link_netnsid" in link else None
    if rec["kind"] == "vxlan":
        data = info.get("info_data", {})
        rec["vxlan"] = {k: data.get(k) for k in ("id", "remote", "group", "local", "port", "link") if data.get(k)}
    return rec


def _route_text(route):
    words = [route.get("dst", "?")]
    for key in ("gateway", "dev", "protocol", "scope", "prefsrc"):
        if route.get(key) and not (key == "protocol" and route[key] == "kernel"):
            words += ["via" if key == "gateway" else "src" if key == "prefsrc" else key, route[key]]
    return " ".join(str(w) for w in words)


def _resolve_peers(spaces):
    by_index = {(s["name"], l["index"]): l for s in spaces for l in s["links"]}
    for space in spaces:
        for link in space["links"]:
            if link["kind"] != "veth":
                continue
            peer_ns = link.pop("peer_netns") or space["name"]
            peer_index, peer_name = link.pop("peer_index"), link.pop("peer_name")
            peer = by_index.get((peer_ns, peer_index))
            name = peer["name"] if peer else peer_name
            link["peer"] = f"{peer_ns}:{name}" if name else None


def draw(state):
    """The topology as text: a box per namespace, bridge ports under their bridge,
    veth peers named across boxes, routes and NAT rules at the bottom of each box."""
    pictures = []
    for space in state["namespaces"]:
        rows = []
        links = space["links"]
        ports = {}
        for link in links:
            if link.get("master"):
                ports.setdefault(link["master"], []).append(link)
        for link in links:
            if link.get("master") and any(l["name"] == link["master"] for l in links):
                continue
            rows.append(_link_row(link, ""))
            for i, port in enumerate(ports.get(link["name"], [])):
                rows.append(_link_row(port, "  `-- " if i == len(ports[link["name"]]) - 1 else "  |-- "))
        rows += [f"route  {rt}" for rt in space["routes"]]
        rows += [f"nat    {line}" for line in _nat_summary(space["nat"])]
        title = f" {space['name']} " + ("(netns)" if space["name"] != HOST_NAME else "(where cnikit runs)")
        width = max([len(row) for row in rows] + [len(title) + 4])
        box = ["+-" + title + "-" * (width - len(title) + 1) + "+"]
        box += [f"| {row.ljust(width)} |" for row in rows]
        box.append("+" + "-" * (width + 2) + "+")
        pictures.append("\n".join(box))
    return "\n".join(pictures)


def _nat_summary(rules):
    """One line per NATed subnet: what a reader wants, not the three raw rules."""
    lines = []
    for n in rules:
        words = shlex.split(n["rule"])
        # A masquerade with a destination too (a published port's hairpin) is not a subnet's egress.
        if "MASQUERADE" in words and "-s" in words and "-d" not in words:
            out = words[words.index("-o") + 1] if "-o" in words else "any"
            lines.append(f"{words[words.index('-s') + 1]} masquerade out {out} (+ FORWARD accept)")
        elif "DNAT" in words and "--dport" in words and "-p" in words:
            lines.append(f"{words[words.index('-p') + 1]}/{words[words.index('--dport') + 1]} published to "
                         f"{words[-1]} (DNAT)")
    return lines


def _link_row(link, prefix):
    words = [prefix + link["name"], link["kind"], link["state"], f"mtu {link['mtu']}"] + link["addrs"]
    if link.get("peer"):
        words.append(f"<=> {link['peer']}")
    if link.get("vxlan"):
        v = link["vxlan"]
        words.append("vni {id} -> {to}:{port}".format(id=v.get("id"), to=v.get("remote") or v.get("group") or
                                                      "fdb", port=v.get("port", VXLAN_PORT)))
    return "  ".join(str(w) for w in words)


def show(r, as_json=False, only=None):
    """Print what exists now: a picture, or JSON on stdout (echoes then go to stderr)."""
    state = collect(r, only)
    if as_json:
        print(json.dumps(state, indent=2), flush=True)
    else:
        r.output(draw(state))
    return state


# ---------------------------------------------------------------- cleanup

def cleanup(r, ns=None):
    """Remove exactly what cnikit created: the attachments `cni add` made (DEL through the
    plugin, as libcni's GC does, so it releases addresses, veths and chains), what
    `cni install` put (conflists, plugin, the plugin's bridge once it has no ports, the
    network's empty address directory), its tagged iptables rules and CNIKIT- chains,
    routes carrying its protocol number, its tagged links, and namespaces whose lo
    carries the tag. Anything else stays. NS: only the rules, routes and links inside
    that namespace. Re-run: a second cleanup finds nothing and says so. Unlike other
    verbs, a dry run looks (read-only) at what exists now: its plan is what this cleanup
    would remove here."""
    if ns:
        check_netns(ns)
        if not r.state.netns_exists(ns):
            raise UsageError(f"namespace {ns!r} does not exist")
    removed, blind = 0, []
    if not ns:
        removed += cleanup_cni(r)
    if which("iptables"):
        if r.state.rules("filter", ns) is None:
            blind.append("iptables rules")
        # Jumps and tagged rules in built-in chains one by one; cnikit's own chains whole.
        for table, chain, spec in _cnikit_rules(r, ns):
            if not chain.startswith(CHAIN_PREFIX):
                delete_rule(r, table, chain, spec, ns, check=False)
                removed += 1
        chains = _cnikit_chains(r, ns)
        _remove_chains(r, chains, ns, check=False)
        removed += len(chains)
    if which("ip6tables"):
        # IPv6: only the tagged accepts bridge add leaves in FORWARD (the CLI's NAT is IPv4).
        for chain, spec in r.state.rules("filter", ns, family=6) or []:
            if chain == "FORWARD" and _comment_of(spec).startswith(f"{TAG} bridge "):
                delete_rule(r, "filter", "FORWARD", spec, ns, family=6, check=False)
                removed += 1
    for family in (4, 6):       # route add makes both
        for route in r.state.routes(ns=ns, proto=ROUTE_PROTO, family=family):
            r.run(ip(*(["-6"] if family == 6 else []), "route", "del", route["dst"], "proto", ROUTE_PROTO, ns=ns),
                  check=False, creates=Change.route(route["dst"], ns).gone())
            removed += 1
    for link in r.state.links(ns):
        if link.get("ifalias") == TAG and link["ifname"] != "lo":
            r.run(ip("link", "del", link["ifname"], ns=ns), check=False,
                  creates=Change.link(link["ifname"], ns, peer=link.get("link")).gone())
            removed += 1
    for space in [] if ns else netns_names(r):
        lo = r.state.link("lo", space)
        if lo is None:
            blind.append(f"namespace {space}")
        elif lo.get("ifalias") == TAG:
            r.run(ip("netns", "del", space), check=False, creates=Change.netns(space).gone())
            removed += 1
    if blind:
        r.note("could not look at " + ", ".join(blind) + " (root needed): what cnikit made there is not listed")
    verb = r.tense("removed", "would remove")
    inside = f" inside namespace {ns} (the namespace itself stays: `cnikit cleanup` without -n removes it)" \
        if ns else ""
    r.note(f"cleanup: {verb} {removed} object(s) cnikit had created{inside}" if removed
           else "cleanup: nothing of cnikit's is left" + (" that could be seen" if blind else "") + inside)
    return removed


def cni_installed_networks(conf_dir=None, plugin_dir=None):
    """The networks `cni install` wrote, as parsed configs: a conflist whose first
    plugin is cnikit's (a script or zipapp in PLUGIN_DIR that says so, never a binary)."""
    conf_dir, plugin_dir = conf_dir or CNI_CONF_DIR, plugin_dir or CNI_PLUGIN_DIR
    found = []
    for name in _listdir(conf_dir):
        path = os.path.join(conf_dir, name)
        if not (name.startswith("10-") and name.endswith(".conflist")):
            continue
        try:
            net = cni_load(path)
        except UsageError:
            continue
        if is_cnikit_plugin(os.path.join(plugin_dir, net["plugins"][0]["type"])):
            found.append(net)
    return found


def is_cnikit_plugin(path):
    """Is PATH a plugin cnikit installed: a script or zipapp (`#!`) of cnikit's plugin?"""
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 20)
    except OSError:
        return False
    return data.startswith(b"#!") and CNI_PLUGIN_MARK in data


def _listdir(path):
    """The names in directory PATH, sorted; none when it cannot be read."""
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def cni_cached_attachments():
    """Every attachment in the runtime cache, as (path, record)."""
    found = []
    for name in _listdir(CNI_CACHE_DIR):
        path = os.path.join(CNI_CACHE_DIR, name)
        if name.endswith(".tmp") or not os.path.isfile(path):
            continue
        try:
            with open(path) as f:
                rec = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict):
            found.append((path, rec))
    return found


def cleanup_cni(r, conf_dir=None, plugin_dir=None):
    """The CNI part of cleanup: DEL every cached attachment of cnikit's plugin with its
    cached config and arguments (as libcni's GC), then uninstall what `cni install`
    wrote, the plugin's bridge once no port is left on it, and the network's address
    directory once it holds no address. Returns how many things it removed."""
    conf_dir, plugin_dir = conf_dir or CNI_CONF_DIR, plugin_dir or CNI_PLUGIN_DIR
    removed = 0
    networks = cni_installed_networks(conf_dir, plugin_dir)
    for path, rec in cni_cached_attachments():
        try:
            net = cni_parse(base64.b64decode(rec.get("config") or ""), path)
        except (UsageError, ValueError):
            r.note(f"{path}: the cached config cannot be read; left alone")
            continue
        if not (net["name"] in {n["name"] for n in networks} or
                is_cnikit_plugin(os.path.join(plugin_dir, net["plugins"][0]["type"]))):
            continue
        args = ";".join(f"{k}={v}" for k, v in rec.get("cniArgs") or [] if k != "IgnoreUnknown")
        try:
            call = CniCall(rec.get("netns") or None, ifname=rec.get("ifName") or "eth0",
                           cid=rec.get("containerId"), net=net, args=args or None,
                           runtime_config=rec.get("capabilityArgs") or None, print_result=False)
            cni_del(r, call)
            removed += 1
        except CnikitError as e:
            r.note(f"cleanup: could not DEL the attachment cached in {path}: {e}")
    for net in networks:
        plugin = net["plugins"][0]
        cni_uninstall(r, net["name"], plugin_dir, conf_dir)
        removed += 1
        bridge_name = plugin.get("bridge") or CNI_DEFAULT_BRIDGE
        if isinstance(bridge_name, str) and plugin.get("mode", "bridge") == "bridge":
            br = get_link(r, bridge_name)
            ports = r.state.ports(bridge_name) if br else []
            if link_kind(br) == "bridge" and not ports:
                r.run(ip("link", "del", bridge_name), check=False, creates=Change.link(bridge_name).gone())
                removed += 1
            elif br and ports:
                r.note(f"{bridge_name} stays: {len(ports)} port(s) still on it (attachments cnikit did not make)")
        ipam = plugin.get("ipam") if isinstance(plugin.get("ipam"), dict) else {}
        data_dir = os.path.join(ipam.get("dataDir") or CNI_DATA_DIR, net["name"])
        if os.path.isdir(data_dir):
            held = [n for n in os.listdir(data_dir) if _is_ip(n)]
            if held:
                r.note(f"{data_dir} stays: {len(held)} address(es) still allocated there")
            else:
                r.run(["rm", "-rf", data_dir], check=False)
                removed += 1
    return removed


def _is_ip(text):
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


# ---------------------------------------------------------------- cni: play the container runtime
#
# What kubelet's container runtime (containerd, CRI-O) or podman does with a CNI plugin, done in
# the open the way libcni does it: read the network config (a .conf or a .conflist), set the CNI_*
# variables, run each plugin of the chain with the previous plugin's result as prevResult, run
# DEL in reverse order, and cache the result of ADD so CHECK and DEL get it as prevResult.
# Every plugin invocation is printed as lines you can paste into any POSIX sh: env ... PLUGIN <<'EOF',
# the stdin, EOF. A dry run keeps each ADD result in a shell variable, so the script it prints
# hands it on as the next plugin's prevResult, caches it, and gives it back to CHECK and DEL.




def cni_plugin_src():
    """Our plugin's source: beside this file in a checkout (plugins/), else where `pip install`
    put it, pyproject's data-files: <prefix>/share/cnikit/plugins, this file being in
    <prefix>/lib/pythonX.Y/site-packages (a venv, --user, /usr/local alike)."""
    here, name = os.path.dirname(os.path.abspath(__file__)), "cni-bash-compatible.py"
    found = [os.path.join(here, "plugins", name),
             os.path.normpath(os.path.join(here, "..", "..", "..", "share", "cnikit", "plugins", name)),
             os.path.join(sys.prefix, "share", "cnikit", "plugins", name)]
    return next((path for path in found if os.path.isfile(path)), found[0])


CNI_PLUGIN_SRC = cni_plugin_src()


_CNI_PLUGIN = {}


def cni_plugin():
    """Our plugin's module, imported from CNI_PLUGIN_SRC once (Python caches its bytecode as for
    any import).  The plugin owns the facts both programs use: how a cniVersion reads, where
    its log goes, what its compiled form's first lines say; cnikit asks it, never restates them."""
    if "module" not in _CNI_PLUGIN:
        import importlib.util
        if not os.path.isfile(CNI_PLUGIN_SRC):
            raise UsageError(f"plugin source {CNI_PLUGIN_SRC} not found (cnikit's CNI plugin, plugins/ in a checkout)")
        spec = importlib.util.spec_from_file_location("cni_bash_compatible", CNI_PLUGIN_SRC)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _CNI_PLUGIN["module"] = module
    return _CNI_PLUGIN["module"]


def cni_version_tuple(text):
    """'1.0.0' -> (1, 0, 0), read as the plugin reads it (three numbers: "1.0" is no version)."""
    version = cni_plugin().version_tuple(text)
    if version is None:
        raise UsageError(f"cniVersion {text!r} is not a version such as 1.0.0")
    return version


def cni_load(path):
    """The network config at PATH as a list {cniVersion, name, plugins[]}, plus its raw bytes.
    A single-plugin .conf becomes a list of one, as libcni does."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UsageError(f"cannot read network config {path}: {e.strerror}") from None
    return cni_parse(raw, path)


def cni_parse(raw, path):
    """Network config bytes RAW (from PATH) as cni_load returns them."""
    try:
        conf = json.loads(raw)
    except ValueError as e:
        raise UsageError(f"network config {path} is not JSON: {e}") from None
    if not isinstance(conf, dict):
        raise UsageError(f"network config {path} is not a JSON object")
    single = "plugins" not in conf
    plugins = [conf] if single else conf["plugins"]
    if not isinstance(plugins, list) or not plugins or not all(isinstance(p, dict) for p in plugins):
        raise UsageError(f"network config {path}: `plugins` must be a non-empty list of objects")
    for p in plugins:
        if not isinstance(p.get("type"), str) or not p["type"] or "/" in p["type"]:
            raise UsageError(f"network config {path}: every plugin needs a `type` (a file name in CNI_PATH)")
        caps = p.get("capabilities")
        if caps is not None and not (isinstance(caps, dict) and all(isinstance(v, bool) for v in caps.values())):
            raise UsageError(f"network config {path}: `capabilities` of plugin {p['type']} must be an object "
                             'of true/false, such as {"portMappings": true}')
    flags = {}
    for key in ("disableCheck", "disableGC"):      # libcni: a boolean, or the string "true"/"false"
        value = conf.get(key, False) if not single else False
        if isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        if not isinstance(value, bool):
            raise UsageError(f"network config {path}: `{key}` must be true or false, not {value!r}")
        flags[key] = value
    if not isinstance(conf.get("name"), str) or not conf["name"]:
        raise UsageError(f"network config {path} has no `name`")
    version = conf.get("cniVersion")
    if "cniVersions" in conf and not single:
        # spec 1.1.0: a list of versions; libcni takes the highest it implements (with cniVersion, if any)
        listed = conf["cniVersions"]
        if not isinstance(listed, list) or not all(isinstance(v, str) for v in listed):
            raise UsageError(f"network config {path}: `cniVersions` must be a list of versions such as [\"1.0.0\"]")
        known = [v for v in listed + ([version] if isinstance(version, str) else [])
                 if cni_version_tuple(v) <= CNI_VERSION_STATUS]
        version = max(known, key=cni_version_tuple) if known else version
    if not isinstance(version, str):
        raise UsageError(f"network config {path} has no `cniVersion` (or none this runtime knows in `cniVersions`)")
    cni_version_tuple(version)
    return {"path": path, "raw": raw, "name": conf["name"], "cniVersion": version,
            "plugins": plugins, "single": single, **flags}


def cni_default_conf(conf_dir=CNI_CONF_DIR):
    """The file a runtime would pick: the alphabetically first .conf/.conflist/.json."""
    try:
        names = sorted(n for n in os.listdir(conf_dir) if n.endswith(CNI_CONF_EXT) and not n.startswith("."))
    except OSError:
        names = []
    if not names:
        raise UsageError(f"no network config in {conf_dir} (write one with: cnikit cni install)")
    return os.path.join(conf_dir, names[0])


def cni_plugin_stdin(net, plugin, prev=None, runtime_config=None):
    """What one plugin of the chain reads on stdin (libcni's buildOneConfig): its own object
    with the list's name and cniVersion, prevResult from the plugin before it, and the
    runtimeConfig entries for the capabilities it declares."""
    if net["single"]:
        conf = dict(plugin)
    else:
        conf = dict(plugin, name=net["name"], cniVersion=net["cniVersion"])
    if prev is not None:
        conf["prevResult"] = prev
    caps = {k for k, on in (plugin.get("capabilities") or {}).items() if on}
    rc = {k: v for k, v in (runtime_config or {}).items() if k in caps}
    if rc:
        conf["runtimeConfig"] = rc
    return conf


def cni_find_plugin(ptype, cni_path):
    """libcni's FindInPath: the first executable TYPE in the CNI_PATH directories."""
    for d in cni_path.split(":"):
        candidate = os.path.join(d, ptype)
        if d and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise UsageError(f"CNI plugin {ptype!r} not found in CNI_PATH {cni_path} "
                     f"(install ours with: cnikit cni install; reference ones: apt-get install containernetworking-plugins)")


def cni_shorten(text, limit=CNI_SHOW_MAX):
    return text if limit is None or len(text) <= limit else text[:limit - 1] + "…"


def _one_line(text):
    """A plugin's words inside cnikit's one-line error: line breaks become spaces."""
    return " ".join(str(text).split())


def cni_invocation_argv(env, plugin, ns=None):
    """One plugin call as a command a person can run: `env CNI_...=... PLUGIN`."""
    return in_netns(["env"] + [f"{k}={v}" for k, v in env.items()] + [plugin], ns)


class PlannedResult:
    """A plugin's result that a dry run cannot know: the script it prints keeps it in the
    shell variable NAME. Put in a stdin object (as prevResult), it is printed as $NAME."""

    def __init__(self, name):
        self.name = name


def heredoc_json(obj, separators=(",", ":")):
    """OBJ as JSON for a here-document: (text, expands). A PlannedResult inside becomes
    $NAME; then the document must expand (<<EOF), so JSON's own \\, $ and ` are escaped."""
    names = []

    def planned(o):
        if isinstance(o, PlannedResult):
            names.append(o.name)
            return f"\0{o.name}\0"
        raise TypeError(f"{type(o).__name__} is not JSON")
    text = json.dumps(obj, separators=separators, default=planned)
    if not names:
        return text, False
    text = re.sub(r"[\\$`]", r"\\\g<0>", text)
    for name in names:
        text = text.replace(f'"\\\\u0000{name}\\\\u0000"', "$" + name)
    return text, True


def echo_heredoc(r, argv, body, expands=False, capture=None):
    """Echo ARGV with BODY as its here-document, lines any POSIX sh (dash) runs. EXPANDS:
    BODY names shell variables (<<EOF, not <<'EOF'). CAPTURE: the script keeps what ARGV
    prints in that shell variable (NAME=$( ... ))."""
    if capture and not r.quiet:
        r.output(f"{capture}=$(")
    r.echo(argv, " <<EOF" if expands else " <<'EOF'")
    if not r.quiet:
        r.output(body + "\nEOF" + ("\n)" if capture else ""))


def cni_exec(r, ptype, command, env, stdin_obj, cni_path=CNI_PATH, ns=None, keep=None):
    """Run plugin TYPE for COMMAND the way a runtime does; echo the call, print what it
    answers. Returns the parsed result (None when the plugin prints nothing, and in a dry
    run, where KEEP names the shell variable the script keeps the answer in: then a
    PlannedResult). A CNI error (non-zero exit, JSON error on stdout) raises CnikitError."""
    plugin = r.state.find_plugin(ptype, cni_path)
    env = {"CNI_COMMAND": command, **env, "CNI_PATH": env.get("CNI_PATH", cni_path)}
    started = time.monotonic()
    # Echoed with its stdin as a here-document: the lines paste into any sh (-v: stdin in full).
    proc = r.exchange(cni_invocation_argv(env, plugin, ns), in_netns([plugin], ns), stdin_obj, env, keep,
                      CNI_SHOW_MAX, CNI_TIMEOUT)
    if not isinstance(proc, Finished):
        return proc                 # a plan's: the script keeps the answer
    if proc.not_utf8:
        raise CnikitError(f"CNI plugin {ptype} {command} printed bytes that are not UTF-8 text "
                          "(a CNI answer is JSON)")
    ms = (time.monotonic() - started) * 1000
    out = proc.stdout.strip()
    try:
        answer = json.loads(out) if out else None
    except ValueError:
        answer = None
        if proc.returncode == 0:
            raise CnikitError(f"CNI plugin {ptype} {command} printed something that is not JSON: "
                              f"{cni_shorten(out, 120)!r}") from None
    if proc.stderr.strip() and (r.verbose or proc.returncode != 0):
        r.note(f"{ptype} stderr: " + " | ".join(proc.stderr.strip().splitlines()[-5:]))
    if proc.returncode != 0:
        if isinstance(answer, dict) and "code" in answer:
            details = f" ({answer['details']})" if answer.get("details") else ""
            raise CnikitError(_one_line(f"CNI plugin {ptype} {command} failed with CNI error {answer['code']}: "
                                        f"{answer.get('msg', '')}{details}"))
        # the last line says why (a traceback's last line is the exception); the note above has more
        last = (out or proc.stderr.strip()).splitlines()[-1:] or [""]
        raise CnikitError(f"CNI plugin {ptype} {command} failed (exit {proc.returncode}): "
                          f"{cni_shorten(_one_line(last[0]), 200)}")
    if answer is not None and not isinstance(answer, dict):
        raise CnikitError(f"CNI plugin {ptype} {command} printed JSON that is not a CNI result (an object): "
                          f"{cni_shorten(_one_line(out), 120)!r}")
    r.note(f"{ptype} {command}: exit 0 in {ms:.0f} ms" + ("" if answer is not None else ", no output"))
    return answer


def cni_netns_path(netns):
    """NETNS as a runtime passes it: a path; a bare name means /run/netns/NAME."""
    if netns is None or netns == "":
        return ""
    if "/" in netns:
        return netns
    return os.path.join(NETNS_DIR, check_netns(netns))


def cni_check_id(cid):
    if not isinstance(cid, str) or not re.match(CNI_NAME_RE, cid):
        raise UsageError(f"container id {cid!r} is invalid: letters, digits, '_', '.', '-', "
                         "starting with a letter or digit")
    return cid


def cni_parse_args(text):
    """CNI_ARGS `K=V;K=V` as pairs; IgnoreUnknown=1 first, as every runtime sends it."""
    pairs = [("IgnoreUnknown", "1")]
    for item in (text or "").split(";"):
        if not item:
            continue
        if "=" not in item:
            raise UsageError(f"--args item {item!r} is not KEY=VALUE")
        k, v = item.split("=", 1)
        if not k or any(c.isspace() for c in k):
            raise UsageError(f"--args item {item!r} has no KEY (KEY=VALUE, the key without spaces)")
        if k == "IgnoreUnknown":
            continue
        pairs.append((k, v))
    return pairs


def cni_cache_path(net_name, cid, ifname):
    return os.path.join(CNI_CACHE_DIR, f"{net_name}-{cid}-{ifname}")


def cni_cache_read(r, net_name, cid, ifname):
    """The cached ADD record (a planned ADD's holds its PlannedResult), or None."""
    data = r.state.file_text(cni_cache_path(net_name, cid, ifname))
    if isinstance(data, dict) or data is None:
        return data
    try:
        return json.loads(data)
    except ValueError:
        return None


def cni_cache_write(r, net, cid, ifname, cni_args, runtime_config, result, netns=""):
    """Store the ADD result as libcni does (cniCacheV1), atomically: in-process, as a
    runtime does (a documented exception to "everything runs through the runner"), and
    recorded as this invocation's file. A disk error is a CnikitError (the caller rolls back)."""
    path = cni_cache_path(net["name"], cid, ifname)
    record = {"kind": "cniCacheV1", "containerId": cid, "ifName": ifname, "networkName": net["name"],
              "config": base64.b64encode(net["raw"]).decode(), "cniArgs": [list(p) for p in cni_args],
              **({"netns": netns} if netns else {}),
              "capabilityArgs": runtime_config or {}, "result": result}
    # a plan's script caches the result it kept, as the real run does (CHECK and DEL read it)
    r.write_json(path, record, f"cache the result in {path} (CHECK and DEL get it as prevResult)",
                 f"cannot cache the ADD result in {path}")
    return path


def cni_cache_drop(r, net_name, cid, ifname):
    r.remove_file(cni_cache_path(net_name, cid, ifname), "cached result {} removed",
                  "cannot remove the cached result {}")


def _remove_quietly(path):
    """Remove a temporary file a failed write may have left; absent is fine."""
    try:
        os.unlink(path)
    except OSError:
        pass


class CniCall:
    """One attachment as a runtime sees it: network config, container id, netns, ifname."""

    def __init__(self, netns=None, conf=None, ifname="eth0", cid=None, conf_dir=CNI_CONF_DIR,
                 cni_path=CNI_PATH, args=None, runtime_config=None, ns=None, net=None, print_result=True):
        # NET: an already parsed config (cni_parse), e.g. for a dry run of a config not yet written
        self.net = net or cni_load(conf or cni_default_conf(conf_dir))
        self.print_result = print_result
        self.ifname = check_ifname(ifname, "--ifname")
        self.netns = cni_netns_path(netns)
        # The default id is the netns name; a path elsewhere (/proc/PID/ns/net, always `net`) names no container.
        default_id = os.path.basename(self.netns) if os.path.dirname(self.netns) == NETNS_DIR else None
        self.cid = cni_check_id(cid or default_id) if (cid or default_id) else None
        self.cni_path = cni_path
        self.args = cni_parse_args(args)
        self.args_given = args is not None
        if runtime_config is not None and not isinstance(runtime_config, dict):
            raise UsageError("--runtime-config must be a JSON object such as {\"portMappings\": [...]}")
        self.runtime_config = runtime_config or {}
        self.ns = check_netns(ns) if ns else None

    def env(self, netns=None):
        return {"CNI_CONTAINERID": self.cid, "CNI_NETNS": self.netns if netns is None else netns,
                "CNI_IFNAME": self.ifname, "CNI_ARGS": ";".join(f"{k}={v}" for k, v in self.args)}

    def version_at_least(self, wanted):
        return cni_version_tuple(self.net["cniVersion"]) >= wanted


def cni_result_var(call):
    """The shell variable a dry run's script keeps this attachment's ADD result in."""
    return re.sub(r"[^A-Za-z0-9_]", "_", f"result_{call.cid}_{call.ifname}")


def _cni_need_attachment(r, call, verb):
    if not call.cid and call.netns:
        raise UsageError(f"cni {verb} {call.netns}: a path outside {NETNS_DIR} names no container "
                         "(every /proc/PID/ns/net ends in `net`): give the container's --id")
    if not call.cid:
        raise UsageError(f"cni {verb} needs a NETNS (a name in {NETNS_DIR} or a path)")
    if call.ns:
        require_netns(r, call.ns, "node namespace")


def cni_add(r, call):
    """ADD the container to the network: each plugin in order, each getting the result
    of the one before; the last result is cached and printed.

    Re-run contract: an attachment already added (cached result) is refused, exit 2;
    if a plugin fails, the chain is DELeted as a runtime does, so nothing is left."""
    _cni_need_attachment(r, call, "add")
    if not r.state.file_exists(call.netns):
        r.state.missing(f"network namespace {call.netns} does not exist "
                        f"(a runtime creates it first: cnikit netns add {os.path.basename(call.netns)})",
                        Change.netns(call.netns[len(NETNS_DIR) + 1:]) if call.netns.startswith(NETNS_DIR + "/")
                        else Change.file(call.netns))
    net = call.net
    if cni_cache_read(r, net["name"], call.cid, call.ifname):
        raise UsageError(f"{call.cid} {call.ifname} is already attached to {net['name']} "
                         f"(cached result in {cni_cache_path(net['name'], call.cid, call.ifname)}); "
                         "run cnikit cni del first")
    for plugin in net["plugins"]:      # a missing plugin is bad input: say so before anything runs
        r.state.find_plugin(plugin["type"], call.cni_path)
    r.note(f"ADD {call.cid} {call.ifname} to network {net['name']} ({net['path']}): "
           + " -> ".join(p["type"] for p in net["plugins"]))
    if forward_drops(r, call.ns):
        r.note("this host's FORWARD policy is DROP (Docker sets it): a pod's forwarded traffic needs accept "
               "rules; cnikit's plugin adds them per pod in its own chain (forwardAccept), the reference bridge does not")
    prev = None
    keep = cni_result_var(call)          # a plan's script keeps each answer in this shell variable
    try:
        for i, plugin in enumerate(net["plugins"]):
            prev = cni_exec(r, plugin["type"], "ADD", call.env(),
                            cni_plugin_stdin(net, plugin, prev, call.runtime_config), call.cni_path, call.ns,
                            keep=keep)
            if isinstance(prev, PlannedResult):
                continue
            if prev is not None and not r.quiet and i < len(net["plugins"]) - 1:
                r.note(f"{plugin['type']} result (the next plugin's prevResult): "
                       + cni_shorten(json.dumps(prev, separators=(",", ":")), 160))
        cni_cache_write(r, net, call.cid, call.ifname, call.args, call.runtime_config, prev, call.netns)
    except (CnikitError, KeyboardInterrupt):
        r.note("ADD failed: DEL the whole chain, as a runtime does, so nothing is left behind")
        _cni_del_chain(r, call, None, best_effort=True)
        raise
    if isinstance(prev, PlannedResult):
        if call.print_result and not r.quiet:
            r.output(f"printf '%s\\n' \"${keep}\"")     # the result, as the real run prints it
        return None
    if prev is not None and call.print_result:
        r.result(prev)
    return prev


def _cni_del_chain(r, call, prev, best_effort=False):
    """DEL each plugin, last first. BEST_EFFORT (cleaning up after a failed ADD) goes on
    past a failing plugin so the others still release what they hold."""
    net = call.net
    # DEL may come after the netns is gone (containerd's second DEL passes ""): still release.
    netns = call.netns if call.netns and r.state.file_exists(call.netns) else ""
    for plugin in reversed(net["plugins"]):
        try:
            cni_exec(r, plugin["type"], "DEL", call.env(netns),
                     cni_plugin_stdin(net, plugin, prev, call.runtime_config), call.cni_path, call.ns)
        except CnikitError as e:
            if not best_effort:
                raise
            r.note(f"cleanup DEL: {e}")


def cni_del(r, call):
    """DEL the attachment: the plugins in reverse order, with the cached ADD result as
    prevResult (cniVersion >= 0.4.0), then drop the cache.

    Re-run contract: DEL is repeatable; without a cached result the plugins are still
    asked (without prevResult) so they release whatever they hold."""
    _cni_need_attachment(r, call, "del")
    net = call.net
    cached = cni_cache_read(r, net["name"], call.cid, call.ifname)
    prev = None
    if call.version_at_least(CNI_VERSION_CHECK):
        prev = (cached or {}).get("result")
    # As libcni's cached config: what ADD was given (CNI_ARGS, capability args) unless given again now.
    if cached and call.runtime_config == {} and isinstance(cached.get("capabilityArgs"), dict):
        call.runtime_config = cached["capabilityArgs"]
    cached_args = cached.get("cniArgs") if cached else None
    if not call.args_given and isinstance(cached_args, list) and \
            all(isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in cached_args):
        call.args = [tuple(p) for p in cached_args]
    why = "" if cached else (" (no cached result: plugins get no prevResult and release what they hold "
                             "by container id, as on containerd's second DEL)")
    r.note(f"DEL {call.cid} {call.ifname} from network {net['name']}, in reverse order{why}")
    _cni_del_chain(r, call, prev)
    cni_cache_drop(r, net["name"], call.cid, call.ifname)


def cni_check(r, call):
    """CHECK: each plugin verifies that what the cached result says is really there.
    Needs cniVersion >= 0.4.0 and a cached result (an ADD before it)."""
    _cni_need_attachment(r, call, "check")
    net = call.net
    if not call.version_at_least(CNI_VERSION_CHECK):
        raise UsageError(f"CHECK needs cniVersion 0.4.0 or later; {net['path']} says {net['cniVersion']}")
    if net.get("disableCheck"):
        r.note(f"{net['path']} says disableCheck: a runtime skips CHECK for network {net['name']}, and so does this")
        return True
    # a planned ADD's record holds the result its script keeps in a shell variable
    cached = cni_cache_read(r, net["name"], call.cid, call.ifname)
    if not cached:
        # A plan that is one step of a script cannot know a result an earlier step's ADD keeps:
        # CHECK without it is an error, so it is not printed.
        r.state.missing(f"no cached result for {call.cid} {call.ifname} on {net['name']}: "
                        f"was it added? (looked for {cni_cache_path(net['name'], call.cid, call.ifname)})",
                        exc=CnikitError, said=f"CHECK {call.cid} {call.ifname}: needs the ADD result as prevResult "
                        "(the runtime's cache), which this plan cannot know: not printed")
        return True
    r.note(f"CHECK {call.cid} {call.ifname} on network {net['name']} against its cached result")
    for plugin in net["plugins"]:
        cni_exec(r, plugin["type"], "CHECK", call.env(),
                 cni_plugin_stdin(net, plugin, cached["result"], cached.get("capabilityArgs")),
                 call.cni_path, call.ns)
    r.note(r.tense("CHECK passed: every plugin found its part in place",
                   "CHECK passes when every plugin finds its part in place"))
    return True


def cni_status(r, call):
    """STATUS (cniVersion >= 1.1.0): is each plugin ready to ADD? Older configs: libcni
    does not ask, and neither does this."""
    net = call.net
    if not call.version_at_least(CNI_VERSION_STATUS):
        r.note(f"STATUS needs cniVersion 1.1.0; {net['path']} says {net['cniVersion']}: a runtime does not ask")
        return None
    for plugin in net["plugins"]:
        cni_exec(r, plugin["type"], "STATUS", {}, cni_plugin_stdin(net, plugin), call.cni_path, call.ns)
    r.note(f"STATUS: network {net['name']} is ready")
    return True


def cni_valid_attachments(net_name):
    """The attachments the cache knows for NET_NAME: what GC must keep."""
    return [{"containerID": rec.get("containerId"), "ifname": rec.get("ifName")}
            for _, rec in cni_cached_attachments() if rec.get("networkName") == net_name]


def cni_gc(r, call):
    """GC (cniVersion >= 1.1.0): tell each plugin which attachments are still valid (the
    cached ones) so it releases everything else."""
    net = call.net
    if not call.version_at_least(CNI_VERSION_STATUS):
        r.note(f"GC needs cniVersion 1.1.0; {net['path']} says {net['cniVersion']}: a runtime does not ask")
        return None
    if net.get("disableGC"):
        r.note(f"{net['path']} says disableGC: a runtime skips GC for network {net['name']}, and so does this")
        return None
    keep = cni_valid_attachments(net["name"])
    r.note(f"GC on network {net['name']}: {len(keep)} valid attachment(s) to keep")
    for plugin in net["plugins"]:
        conf = cni_plugin_stdin(net, plugin)
        conf["cni.dev/valid-attachments"] = keep
        conf["cni.dev/attachments"] = keep      # the key of the 1.1.0 draft some plugins read
        cni_exec(r, plugin["type"], "GC", {}, conf, call.cni_path, call.ns)
    return keep


def cni_version(r, call):
    """VERSION: ask each plugin which spec versions it speaks."""
    answers = {}
    for plugin in call.net["plugins"]:
        # As libcni (and so podman, before every ADD and DEL) asks: no pod, dummy values.
        answers[plugin["type"]] = cni_exec(r, plugin["type"], "VERSION", CNI_VERSION_ENV,
                                           {"cniVersion": call.net["cniVersion"]}, call.cni_path, call.ns)
        if answers[plugin["type"]] is not None and call.print_result:
            r.output(json.dumps(answers[plugin["type"]]))
    return answers


def cni_log_path(conf_dir=CNI_CONF_DIR, conf=None):
    """The plugin's log, as the plugin picks it (its log_path: CNIKIT_LOG, the `log` key of its
    config, /var/log/cni.log)."""
    try:
        net = cni_load(conf or cni_default_conf(conf_dir))
    except UsageError:
        net = None
    ours = [plugin for plugin in (net or {}).get("plugins", []) if isinstance(plugin.get("log"), str)]
    return cni_plugin().log_path(os.environ, ours[0] if ours else {})


def cni_log(r, conf_dir=CNI_CONF_DIR, conf=None, lines=20, follow=True):
    """Print the plugin's log; with FOLLOW keep printing as it grows (Ctrl-C stops)."""
    lines = check_int(lines, 0, 1000000, "--lines")
    path = cni_log_path(conf_dir, conf)
    if not r.state.file_exists(path):
        r.state.missing(f"no plugin log at {path} yet (the plugin writes it on its first call)")
    if not follow:
        return r.show(["tail", "-n", str(lines), path])
    return r.hand_over(["tail", "-n", str(lines), "-F", path])


# -- install: put the plugin and a conflist where a runtime looks

def cni_conflist(name=CNI_NET, subnet=None, ptype=CNI_TYPE, chain=(), version=None, extra=None):
    """The conflist `install` writes: our plugin, then the chained reference plugins.
    Default cniVersion 1.0.0: what the runtimes in use speak (podman 4.3 and containerd
    1.6 refuse a 1.1.0 result, as do reference plugins 1.1.x); 1.1.0 adds STATUS and GC."""
    ours = {"type": ptype}
    if subnet:
        ours["ipam"] = {"subnet": subnet}
    ours.update(extra or {})
    plugins = [ours] + [dict(CNI_CHAINABLE[c]) for c in chain]
    return {"cniVersion": version or CNI_VERSION, "name": name, "plugins": plugins}


def cni_conf_file(conf_dir, name):
    return os.path.join(conf_dir, f"10-{name}.conflist")


def write_file_atomic(r, path, text, node=None):
    """Write TEXT to PATH atomically (a temp file in the same directory, then a rename),
    so a runtime never reads half a config: three plain commands, the text on stdin.
    NODE: inside that kind node container (docker exec)."""
    here = docker_exec(node) if node else []
    stdin_here = docker_exec(node, stdin=True) if node else []
    directory = os.path.dirname(path)
    tmp = os.path.join(directory, "." + os.path.basename(path) + ".tmp")
    if node or not r.state.is_dir(directory):
        r.run(here + ["mkdir", "-p", directory])
    # A file in a node is the node's (it goes with the cluster); here, one that was not
    # there before is this invocation's, and rollback removes it.
    made = None if node else Change.file(path, undo=not r.state.file_exists(path), data=text)
    r.run(stdin_here + ["install", "-m", "0644", "/dev/stdin", tmp], input=text,
          creates=None if node else Change.scratch(tmp))
    r.run(here + ["mv", "-f", tmp, path], creates=made)


def _cni_plugin_source(plugin_src):
    src = plugin_src or CNI_PLUGIN_SRC
    if not os.path.isfile(src):
        raise UsageError(f"plugin source {src} not found (the CNI plugin of plugins/; or give --plugin FILE)")
    return src


def cni_shebang(python):
    """The first line install gives the plugin: None keeps the plugin's own ("keep")."""
    if python == "keep":
        return None
    python = CNI_PYTHON if python is None else python
    if not os.path.isabs(python) or any(c.isspace() for c in python):
        raise UsageError(f"--python {python!r} must be an absolute path without spaces (or 'keep')")
    return f"#!{python} {CNI_PYTHON_FLAGS}"


def cni_plugin_bytes(src, shebang):
    """The plugin as install writes it: SRC with its first line replaced by SHEBANG."""
    with open(src, "rb") as f:
        data = f.read()
    if shebang and data.startswith(b"#!"):
        data = shebang.encode() + b"\n" + data.split(b"\n", 1)[1]
    return data


def python_magic(r, python, node=None):
    """The bytecode magic of PYTHON (in kind NODE when given), as compile_plugin writes it on
    the compiled plugin's second line ('' when not known)."""
    argv = [python, "-I", "-S", "-c", "import importlib.util; print(importlib.util.MAGIC_NUMBER)"]
    ok, out = r.query(docker_exec(node, *argv) if node else argv)
    return out.strip() if ok else ""


def _installed_matches(state, src, dst, shebang, compiled=False, magic=None):
    """Is DST (as STATE sees it) already SRC installed this way (same interpreter line; compiled
    from the same source when COMPILED: its second line names the source's sha256, and the
    bytecode MAGIC of the interpreter now, so a python3 upgrade gets the plugin built again)?"""
    try:
        data = state.file_head(dst)
        if data is None or not state.executable(dst):
            return False
        if compiled:
            head = "".join(line.decode() + "\n" for line in data.split(b"\n")[:2])
            with open(src, "rb") as f:
                sha = hashlib.sha256(f.read()).hexdigest()
            return compiled_from(head, shebang, sha, magic)
        return data == cni_plugin_bytes(src, shebang)
    except (OSError, ValueError):
        return False


def compiled_from(head, shebang, sha, magic=None):
    """Do HEAD, the first two lines of a plugin file, say it is the compiled form run by SHEBANG,
    built from the source whose sha256 is SHA (and, given MAGIC, for that bytecode)?  The
    plugin's compile_plugin writes them there and its compiled_stamp reads them back (a file
    hash would differ per interpreter)."""
    stamp = cni_plugin().compiled_stamp(head)      # read with the plugin's own template
    python = shebang.split()[0][2:] if shebang else ""
    return (bool(shebang) and stamp.get("python") == python and stamp.get("sha") == sha
            and (magic is None or stamp.get("magic") == magic))


def is_binary_plugin(path, state=None):
    """A binary plugin (an ELF executable, such as the reference ones): never cnikit's to
    overwrite or remove. cnikit installs Python scripts, plain or compiled (its own bytecode
    form), which start with `#!`.
    STATE: as a runner's State sees it (a plan's planned files); else on disk."""
    try:
        if state is not None:
            return state.file_head(path, 4) == b"\x7fELF"
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def _is_python_script(path):
    """Only a Python plugin can be compiled; any other (--plugin FILE) is installed as it is."""
    try:
        with open(path, "rb") as f:
            first = f.readline()
    except OSError:
        return False
    return first.startswith(b"#!") and b"python" in first or path.endswith(".py")


def cni_compile_argv(src, python, tmp, compiler=CNI_PLUGIN_SRC):
    """The command that writes SRC, compiled for PYTHON, to TMP: the plugin (COMPILER, its
    path where PYTHON runs) builds its own installed form (`--compile`, see compile_plugin in
    the plugin): one executable Python file carrying its bytecode, so no call compiles the
    script again (~15 ms each)."""
    return [python, "-I", "-S", compiler, "--compile", src, tmp]


def _set_shebang_argv(path, shebang):
    return ["sed", "-i", f"1s|^#!.*|{shebang}|", path]


def cni_install(r, name=CNI_NET, subnet=None, plugin_dir=CNI_PLUGIN_DIR, conf_dir=CNI_CONF_DIR,
                chain=(), plugin_src=None, ptype=CNI_TYPE, version=None, extra=None, python=None,
                plain=False, precompiled=None):
    """Install the plugin as PLUGIN_DIR/TYPE and write CONF_DIR/10-NAME.conflist, each atomically
    (temp file + rename).  By default the plugin is compiled for PYTHON (default /usr/bin/python3,
    run -IS): one file that carries its bytecode, the fastest form.  PLAIN (or PYTHON "keep",
    which keeps the file's own first line) installs the readable file itself, a drop-in that is
    slower by the compile of the script on every call.  PRECOMPILED is the old name of the default.

    Re-run contract: files already as asked are left alone; a changed plugin or
    config is replaced whole."""
    name = _cni_check_name(name)
    subnet = check_subnet(subnet, "--subnet") if subnet else None
    for c in chain:
        if c not in CNI_CHAINABLE:
            raise UsageError(f"--chain {c!r}: cnikit chains {', '.join(CNI_CHAINABLE)}")
    if version:
        cni_version_tuple(version)
    if not re.match(CNI_NAME_RE, ptype or ""):
        raise UsageError(f"--type {ptype!r} is not a plain file name")
    src = _cni_plugin_source(plugin_src)
    shebang = cni_shebang(python)
    if precompiled and (plain or not shebang):
        raise UsageError("--precompiled (compiled, the default) needs an interpreter to compile for; "
                         "not --plain or --python keep")
    if shebang and python is None and not os.path.exists(CNI_PYTHON):
        if precompiled:
            raise UsageError(f"--precompiled: {CNI_PYTHON} not found; give --python PATH")
        r.note(f"{CNI_PYTHON} not found: the plugin is installed plain, keeping its own first line")
        shebang = None
    compiled = bool(shebang) and not plain and _is_python_script(src)
    dst = os.path.join(plugin_dir, ptype)
    if is_binary_plugin(dst, r.state):
        raise UsageError(f"{dst} is a binary plugin that cnikit did not install; not replacing it "
                         f"(choose another --type)")
    conf_path = cni_conf_file(conf_dir, name)
    text = json.dumps(cni_conflist(name, subnet, ptype, chain, version, extra), indent=2) + "\n"
    mark = r.mark()
    if not r.state.is_dir(plugin_dir):
        r.run(["mkdir", "-p", plugin_dir])
    magic = python_magic(r, shebang[2:].split()[0]) if compiled else None     # a plan does not ask
    if _installed_matches(r.state, src, dst, shebang, compiled, magic or None):
        r.note(f"{dst} is already this plugin")
    else:
        tmp = os.path.join(plugin_dir, f".{ptype}.tmp")
        if compiled:
            r.run(cni_compile_argv(src, shebang[2:].split()[0], tmp), creates=Change.scratch(tmp))
        else:
            r.run(["install", "-m", "0755", src, tmp], creates=Change.scratch(tmp))
            if shebang:
                r.run(_set_shebang_argv(tmp, shebang))
        r.run(["mv", "-f", tmp, dst], creates=Change.file(dst, undo=not r.state.file_exists(dst)))
    if r.state.file_text(conf_path) == text:
        r.note(f"{conf_path} already says this")
    else:
        write_file_atomic(r, conf_path, text)
    say_if_unchanged(r, mark, f"plugin {dst} and {conf_path}")
    return conf_path


def _cni_check_name(name):
    if not isinstance(name, str) or not re.match(CNI_NAME_RE, name) or len(name) > CNI_NET_NAME_MAX:
        raise UsageError(f"network name {name!r} is invalid: letters, digits, '_', '.', '-'")
    return name


def cni_uninstall(r, name=CNI_NET, plugin_dir=CNI_PLUGIN_DIR, conf_dir=CNI_CONF_DIR):
    """Remove exactly what `install --name NAME` wrote: its conflist, and its plugin file
    unless another config in CONF_DIR still uses that type. Re-run: absent is fine."""
    name = _cni_check_name(name)
    conf_path = cni_conf_file(conf_dir, name)
    text = r.state.file_text(conf_path)
    if text is None:
        r.note(f"{conf_path} does not exist; nothing to uninstall")
        return False
    ptype = cni_parse(text.encode(), conf_path)["plugins"][0]["type"]
    r.run(["rm", "-f", conf_path], creates=Change.file(conf_path).gone())
    in_use = []
    for other in r.state.listdir(conf_dir):
        path = os.path.join(conf_dir, other)
        if path == conf_path or not other.endswith(CNI_CONF_EXT):
            continue
        try:
            if any(p["type"] == ptype for p in cni_parse((r.state.file_text(path) or "").encode(), path)["plugins"]):
                in_use.append(other)
        except UsageError:
            continue
    dst = os.path.join(plugin_dir, ptype)
    if in_use:
        r.note(f"{dst} stays: {', '.join(in_use)} still uses type {ptype}")
    elif is_binary_plugin(dst, r.state):
        r.note(f"{dst} stays: a binary plugin, not one cnikit installed")
    elif r.state.file_exists(dst):
        r.run(["rm", "-f", dst], creates=Change.file(dst).gone())
    return True


# -- kind: the same install into every node of a kind cluster, through docker

# ---------------------------------------------------------------- kind: the runtime's part on kind nodes

def docker(*args):
    return ["docker"] + [str(a) for a in args]


def docker_exec(node, *argv, stdin=False):
    return ["docker", "exec"] + (["-i"] if stdin else []) + [node] + [str(a) for a in argv]


def kubectl(cluster, *args):
    return ["kubectl", "--context", f"kind-{cluster}"] + [str(a) for a in args]


def kind_nodes(r, cluster):
    """The cluster's node containers, from docker's kind label (no kind binary needed).
    A dry run without docker plans for kind.yaml's two nodes."""
    ok, out = r.state.ask(docker("ps", "--filter", f"label={KIND_NODE_LABEL}={cluster}", "--format", "{{.Names}}"))
    nodes = sorted(out.split()) if ok else []
    if not nodes:
        nodes = [f"{cluster}-control-plane", f"{cluster}-worker"]
        r.state.unknown(f"kind cluster {cluster!r} has no node containers (create it: make kind-up)",
                        f"dry run: no docker answer, planning for kind.yaml's nodes {' '.join(nodes)}")
    # The control plane first, the workers in order: node i gets 10.244.i.0/24 if kubectl is silent.
    return sorted(nodes, key=lambda n: (not n.endswith("-control-plane"), n))


def kind_pod_cidr(r, cluster, node, index):
    """The node's spec.podCIDR from the API server, else 10.244.INDEX.0/24 (kind's default split)."""
    if which("kubectl"):
        ok, out = r.state.ask(kubectl(cluster, "get", "node", node, "-o", "jsonpath={.spec.podCIDR}"))
        if ok and out.strip():
            return check_subnet(out.strip(), f"podCIDR of {node}")
    cidr = str(list(ipaddress.ip_network(KIND_POD_CIDR).subnets(new_prefix=24))[index])
    r.note(f"podCIDR of {node} not known from kubectl: using {cidr}")
    return cidr


def kind_node_ip(r, node):
    ok, out = r.state.ask(docker("inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}", node))
    addrs = out.split() if ok else []
    return addrs[0] if addrs else None


def kind_ensure_python(r, node, installed=()):
    """kind node images carry no python3, and our plugin is Python: detect it and, when
    missing, install python3-minimal in the node. Returns what it did, in words. A node
    that cannot get it is one CnikitError line naming the node, the cause and the fix
    (INSTALLED: the nodes that got python3 before it, the only change made so far)."""
    ok, _ = r.state.ask(docker_exec(node, "test", "-x", CNI_PYTHON))
    if ok:
        r.note(f"{node}: {CNI_PYTHON} is there (e.g. the derived image of kind/Dockerfile): nothing to install")
        return "present"
    r.note(f"{node}: no python3 (kind node images carry none): installing {KIND_PYTHON_PKG} in the node")
    try:
        # Error-Mode=any: apt-get update otherwise exits 0 although no mirror answered, and
        # the install then fails with a misleading "Unable to locate package" (older apt
        # ignores the option: that case is explained below too).
        r.run(docker_exec(node, "apt-get", "update", "-qq", "-o", "APT::Update::Error-Mode=any"))
        r.run(docker("exec", "-e", "DEBIAN_FRONTEND=noninteractive", node, "apt-get", "install", "-y", "-qq",
                     "--no-install-recommends", KIND_PYTHON_PKG))
    except CommandFailed as e:
        raise CnikitError(kind_python_failure(node, e, installed)) from None
    return "installed"


def kind_python_failure(node, err, installed=()):
    """One line for a failed python3 install in NODE: apt's own words for the cause, then the fix."""
    lines = [line.strip() for line in err.stderr.splitlines() if line.strip()]
    fetch = [line for line in lines if "Failed to fetch" in line]
    fix = (f"use the derived node image that carries python3 (make kind-up KIND_NODE=derived builds "
           f"{KIND_NODE_IMAGE} from kind/Dockerfile), or give the nodes a package mirror")
    if fetch or any("Unable to locate package" in line for line in lines):
        # apt's line is "E: Failed to fetch URL  REASON"; no line at all: update got no lists
        cause = fetch[0].split("  ", 1)[-1] if fetch else "apt-get update fetched no package lists"
        why = f"cannot reach a package mirror ({cause})"
    else:
        why = f"apt-get failed ({lines[-1] if lines else f'exit {err.returncode}'})"
    changed = (f"nothing but python3 on {', '.join(installed)} was written" if installed
               else "no node was changed")
    return f"{node} has no python3 (the plugin's interpreter) and {why}: {changed}; fix: {fix}"


def _kind_check_cluster(cluster):
    if not re.match(r"^[a-z0-9][a-z0-9.-]*$", cluster or ""):
        raise UsageError(f"kind cluster name {cluster!r} is invalid: lower-case letters, digits, '-', '.'")


def kind_plan(r, cluster):
    """{node: {podCIDR, ip}} for every node of CLUSTER, the control plane first (look-ups only)."""
    return {node: {"podCIDR": kind_pod_cidr(r, cluster, node, i), "ip": kind_node_ip(r, node)}
            for i, node in enumerate(kind_nodes(r, cluster))}


def kind_cluster_cidrs(plan):
    """The cluster's whole pod range, never masqueraded (as kindnet): kind's podSubnet when
    every node's podCIDR lies in it, else the nodes' podCIDRs merged."""
    nets = [ipaddress.ip_network(p["podCIDR"]) for p in plan.values()]
    whole = ipaddress.ip_network(KIND_POD_CIDR)
    if all(n.version == whole.version and n.subnet_of(whole) for n in nets):
        return [KIND_POD_CIDR]
    return [str(n) for v in (4, 6) for n in ipaddress.collapse_addresses(n for n in nets if n.version == v)]


def kind_routes(plan):
    """(node, podCIDR of another node, that node's address): the routes between nodes (as kindnet's)."""
    return [(node, plan[other]["podCIDR"], plan[other]["ip"]) for node in plan for other in plan if other != node]


def kind_node_files(r, node, paths):
    """{path: sha256} of those of PATHS that exist in NODE (one look-up); None: not known (a plan)."""
    answer = r.state.in_node(node, ["sha256sum", *paths])
    if answer is None:
        return None
    found, out = {}, answer[1]
    for line in out.splitlines():
        digest, _, path = line.partition("  ")
        if path in paths:
            found[path] = digest
    return found


def kind_has_route(r, node, cidr, via):
    """Has NODE the route to CIDR via VIA? None: not known (a plan)."""
    answer = r.state.in_node(node, ["ip", "-j", "route", "show", cidr])
    if answer is None:
        return None
    try:
        routes = json.loads(answer[1]) if answer[0] and answer[1].strip() else []
    except ValueError:
        routes = []
    return any(rt.get("dst") == cidr and rt.get("gateway") == via for rt in routes)


def kind_python_magic(r, node):
    """The bytecode magic of NODE's python3, as compile_plugin writes it ('' when not known)."""
    return python_magic(r, CNI_PYTHON, node)


def kind_plugin_current(r, node, dst, src, sha, compiled, have):
    """Is DST in NODE already SRC in the form asked?  Plain: the same bytes (HAVE: the node's
    sha256 of its files).  Compiled: a file hash differs per interpreter, so its first two
    lines must say it was built from SRC (sha256 SHA) for the bytecode of the node's python3
    now, so a node whose python3 changed gets it built again."""
    if not compiled:
        return have.get(dst) == hashlib.sha256(cni_plugin_bytes(src, cni_shebang(None))).hexdigest()
    if dst not in have:
        return False
    ok, head = r.state.in_node(node, ["head", "-n", "2", dst]) or (False, "")
    if not (ok and compiled_from(head, cni_shebang(None), sha)):
        return False
    return compiled_from(head, cni_shebang(None), sha, kind_python_magic(r, node) or None)


def kind_compile_plugin(r, node, src, tmp, dst, installed=()):
    """Build the compiled plugin in NODE, by NODE's own python3 (its bytecode may not be this
    machine's): the source copied into KIND_BUILD_DIR, compiled to TMP by the plugin's own
    `--compile` (cni_compile_argv), the copy removed, TMP renamed to DST (what DST holds is
    always a whole plugin).  A python3 that cannot compile it is one CnikitError line; the
    node keeps what it had (INSTALLED: the nodes already done)."""
    ours = os.path.basename(CNI_PLUGIN_SRC)
    staged = f"{KIND_BUILD_DIR}/{os.path.basename(src)}"
    # another Python plugin (--plugin FILE) is compiled by ours, as cni install does
    compiler = staged if os.path.realpath(src) == os.path.realpath(CNI_PLUGIN_SRC) \
        else f"{KIND_BUILD_DIR}/compiler/{ours}"
    r.run(docker_exec(node, "mkdir", "-p", os.path.dirname(compiler)))
    r.run(docker("cp", src, f"{node}:{staged}"))
    if compiler != staged:
        r.run(docker("cp", CNI_PLUGIN_SRC, f"{node}:{compiler}"))
    try:
        r.run(docker_exec(node, *cni_compile_argv(staged, CNI_PYTHON, tmp, compiler)))
    except CommandFailed as e:
        r.run(docker_exec(node, "rm", "-rf", KIND_BUILD_DIR, tmp), check=False)
        lines = [line.strip() for line in e.stderr.splitlines() if line.strip()]
        why = lines[-1] if lines else f"exit {e.returncode}"
        done = f"; {', '.join(installed)} got it already" if installed else ""
        raise CnikitError(f"{node}: its {CNI_PYTHON} cannot compile the plugin ({why}): {dst} on {node} is "
                          f"unchanged{done}; fix: --plain installs the readable file") from None
    r.run(docker_exec(node, "rm", "-rf", KIND_BUILD_DIR))
    r.run(docker_exec(node, "mv", "-f", tmp, dst))


def kind_install(r, cluster, name=CNI_NET, plugin_src=None, ptype=CNI_TYPE, chain=("portmap",),
                 plugin_dir=CNI_PLUGIN_DIR, conf_dir=CNI_CONF_DIR, plain=False):
    """Install the plugin into every node of kind cluster CLUSTER: python3 in every node
    first (a node that cannot get it stops everything before any node is written), then on
    each node the plugin, the node's own podCIDR in /run/cnikit/subnet.env (flannel-style)
    and the same conflist (both written atomically; the cluster's pod range exempt from
    masquerade: no NAT between pods), and a route on every node to every other node's pods
    (as kindnet does).  The plugin is by default the compiled form (as `cni install` puts
    it on a host), built in each node by the node's own python3, whose bytecode may differ
    from this machine's (kind_compile_plugin); PLAIN: the readable file (docker cp to a temp
    name, its interpreter fixed, then renamed).

    Re-run contract: what is already as asked (the same plugin in the same form, the same
    file contents, the same route) is left alone and said so; running it twice changes
    nothing more.  The other form of the plugin is replaced."""
    _kind_check_cluster(cluster)
    name = _cni_check_name(name)
    src = _cni_plugin_source(plugin_src)
    compiled = not plain and _is_python_script(src)
    r.needs("docker")
    plan = kind_plan(r, cluster)
    for node in plan:
        plan[node]["python3"] = kind_ensure_python(
            r, node, [n for n in plan if plan[n].get("python3") == "installed"])
    dst, tmp = os.path.join(plugin_dir, ptype), os.path.join(plugin_dir, f".{ptype}.tmp")
    with open(src, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    form = "compiled by the node's python3" if compiled else "plain"
    conf_path = cni_conf_file(conf_dir, name)
    conflist = json.dumps(cni_conflist(name, None, ptype, chain,
                                       extra={"nonMasqueradeCIDRs": kind_cluster_cidrs(plan)}), indent=2) + "\n"
    mark = r.mark()
    done = []
    for node, p in plan.items():
        subnet = f"CNIKIT_SUBNET={p['podCIDR']}\n"
        want = {path: hashlib.sha256(text.encode()).hexdigest()
                for path, text in ((NODE_SUBNET_FILE, subnet), (conf_path, conflist))}
        have = kind_node_files(r, node, [dst] + list(want)) or {}    # a plan's node: nothing known
        if kind_plugin_current(r, node, dst, src, sha, compiled, have):
            r.note(f"{node}: {dst} is already this plugin ({form})")
        elif compiled:
            kind_compile_plugin(r, node, src, tmp, dst, done)
        else:
            r.run(docker("cp", src, f"{node}:{tmp}"))
            # python3-minimal is /usr/bin/python3: fix the interpreter, then rename into place.
            r.run(docker_exec(node, *_set_shebang_argv(tmp, cni_shebang(None))))
            r.run(docker_exec(node, "chmod", "0755", tmp))
            r.run(docker_exec(node, "mv", "-f", tmp, dst))
        done.append(node)
        for path, text in ((NODE_SUBNET_FILE, subnet), (conf_path, conflist)):
            if have.get(path) == want[path]:
                r.note(f"{node}: {path} already says this")
            else:
                write_file_atomic(r, path, text, node=node)
    for node, cidr, via in kind_routes(plan):
        if not via:
            r.note(f"address of the node with pods {cidr} unknown (no docker answer): route on {node} left out")
        elif kind_has_route(r, node, cidr, via):
            r.note(f"{node}: route to {cidr} via {via} is there")
        else:
            r.run(docker_exec(node, "ip", "route", "replace", cidr, "via", via))
    for node, p in plan.items():
        r.note(f"{node}: pods in {p['podCIDR']}, python3 {p['python3']}, the plugin {form}")
    say_if_unchanged(r, mark, f"kind cluster {cluster}: the plugin, {conf_path}, {NODE_SUBNET_FILE} "
                              "and the routes on every node")
    return plan


def kind_uninstall(r, cluster, name=CNI_NET, plugin_dir=CNI_PLUGIN_DIR, conf_dir=CNI_CONF_DIR):
    """Remove from every node of CLUSTER what kind_install wrote: the conflist, the plugin
    it names (plain or compiled, both scripts that start with `#!`; never a binary plugin), the
    subnet file, the routes to the other nodes' pods, and a build directory a killed
    kind-install left. python3 stays (other things may use it). Pods still attached keep
    their veths until kubelet DELs them. Re-run: absent is fine."""
    _kind_check_cluster(cluster)
    name = _cni_check_name(name)
    r.needs("docker")
    plan = kind_plan(r, cluster)
    conf_path = cni_conf_file(conf_dir, name)
    mark = r.mark()
    for node in plan:
        ok, text = r.state.in_node(node, ["cat", conf_path]) or (False, "")
        try:
            ptype = json.loads(text)["plugins"][0]["type"] if ok else CNI_TYPE
        except (ValueError, KeyError, IndexError, TypeError):
            ptype = CNI_TYPE
        if not re.match(CNI_NAME_RE, str(ptype)):
            ptype = CNI_TYPE
        dst = os.path.join(plugin_dir, ptype)
        files = [conf_path, NODE_SUBNET_FILE]
        # What is not known (a plan's node) is removed as if there: `rm -f` minds no absence.
        head = r.state.in_node(node, ["head", "-c", "2", dst])
        if head is None or head[1] == "#!":
            files.append(dst)
        elif head[0]:
            r.note(f"{node}: {dst} stays: not a script (a binary plugin), not one cnikit installed")
        have = kind_node_files(r, node, files)
        present = files if have is None else [f for f in files if f in have]
        if present:
            r.run(docker_exec(node, "rm", "-f", *present))
        # what a kind-install killed while the node compiled the plugin left (the next one replaces it)
        if (r.state.in_node(node, ["test", "-d", KIND_BUILD_DIR]) or (True, ""))[0]:
            r.run(docker_exec(node, "rm", "-rf", KIND_BUILD_DIR))
    for node, cidr, via in kind_routes(plan):
        if via and kind_has_route(r, node, cidr, via) is not False:
            r.run(docker_exec(node, "ip", "route", "del", cidr, "via", via))
    if not r.ran_since(mark):
        r.note(f"kind cluster {cluster}: no plugin, {conf_path}, {NODE_SUBNET_FILE} or route of ours "
               "on any node; nothing to do")
    return plan


# ---------------------------------------------------------------- doctor
#
# `cnikit doctor FROM TO` walks the path a packet from FROM to TO would take, the way
# the kernel decides it: a route look-up in each namespace it enters, the L2 segment to
# the next hop (veth peer, bridge port, vxlan tunnel), and at each hop the settings
# that silently drop packets. It reports the first broken hop, the read-only command
# that shows the problem and the command that would fix it. It only reads (the Runner's
# query methods): it never changes the kernel. The family (IPv4 or IPv6) is the walk's:
# an IPv6 walk reads `ip -6` routes and neighbours (NDP), net.ipv6.conf.*.forwarding and
# ip6tables, and, IPv6 having no rp_filter sysctl, ip6tables' rpfilter match in its stead.




class _Broken(Exception):
    """The first broken hop, found deep in the walk: carries the finding."""

    def __init__(self, cause, where, what, see, fix):
        super().__init__(what)
        self.finding = {"cause": cause, "hop": where, "what": what, "see": see, "fix": fix}


def _ns_name(ns):
    return ns or HOST_NAME


def _as_shell(argv_list):
    return [shell_join(argv) for argv in argv_list]


class _View:
    """Read-only look-ups of kernel state, each made once per doctor run."""

    def __init__(self, r, namespaces, family=4):
        self.r, self.namespaces, self.family, self._cache = r, namespaces, family, {}
        # the address family's names: ip's JSON, the iptables twin that filters it
        self.inet = "inet6" if family == 6 else "inet"
        self.iptables = "ip6tables" if family == 6 else "iptables"

    def _q(self, key, argv, as_json=True):
        # doctor only reads, and reads the live kernel whatever the mode (a dry run looks too)
        if key not in self._cache:
            if as_json:
                self._cache[key] = self.r.live.query_json(argv)
            else:
                ok, out = self.r.live.query(argv)
                self._cache[key] = out if ok else None
        return self._cache[key]

    def links(self, ns):
        return self._q(("links", ns), ip("-j", "-d", "addr", "show", ns=ns)) or []

    def link(self, ns, name):
        return next((l for l in self.links(ns) if l.get("ifname") == name), None)

    def nsids(self, ns):
        data = self._q(("nsids", ns), ip("-j", "netns", "list-id", ns=ns)) or []
        return {i.get("nsid"): i.get("name") for i in data}

    def sysctl(self, ns, key):
        out = self._q(("sysctl", ns, key), in_netns(["sysctl", "-n", key], ns), as_json=False)
        return out.strip() if out is not None else None

    def route_get(self, ns, dst, src=None, iif=None):
        extra = (["from", src] if src else []) + (["iif", iif] if iif else [])
        data = self._q(("route", ns, dst, src, iif), ip("-j", "route", "get", dst, *extra, ns=ns))
        return data[0] if data else None

    def neigh(self, ns, addr, dev):
        data = self._q(("neigh", ns, addr, dev), ip("-j", "neigh", "show", "to", addr, "dev", dev, ns=ns)) or []
        return data[0] if data else None

    def addr_assign_type(self, ns, dev):
        """How DEV got its MAC (3: set, it stays; else the kernel's choice, which a bridge
        changes with its ports); sysfs only, rtnetlink does not say. None: cannot tell."""
        out = self._q(("aat", ns, dev), in_netns(["cat", f"/sys/class/net/{dev}/addr_assign_type"], ns),
                      as_json=False)
        return int(out) if out and out.strip().isdigit() else None

    def fdb(self, ns, dev):
        return self._q(("fdb", ns, dev), bridge("-j", "fdb", "show", "dev", dev, ns=ns)) or []

    def rules(self, ns, table, tool=None):
        """{chain: {"policy": P, "packets": N, "rules": [words...]}} from `TOOL -S -v` (TOOL: iptables
        or ip6tables by the family, or the other backend's iptables-legacy / ip6tables-nft ...)."""
        tool = tool or self.iptables
        if not which(tool):
            return {}
        out = self._q(("rules", ns, table, tool), in_netns([tool, "-w", "-t", table, "-S", "-v"], ns),
                      as_json=False)
        return _parse_iptables(out or "")

    def backend(self):
        """Where `iptables` (`ip6tables`) writes: "nf_tables" (iptables-nft) or "legacy" (x_tables)."""
        version = self._q((self.iptables + " -V",), [self.iptables, "-V"], as_json=False) or ""
        return "legacy" if "legacy" in version else "nf_tables"

    def restore_tool(self):
        """The restore tool of `iptables`' own backend: other-backend's fix moves rules there."""
        return self.iptables + BACKEND_RESTORE[self.backend()][len("iptables"):]

    def other_backend(self, ns):
        """The iptables of the backend `iptables` does not show, when it holds tables in NS, else None.
        iptables-nft writes nf_tables and iptables-legacy the older x_tables; both apply to every
        packet, and each tool lists only its own. Asked without creating a table: listing one with
        the other tool would load it (and its hooks) into NS."""
        xt, legacy, nft = self.iptables, self.iptables + "-legacy", self.iptables + "-nft"
        if self.backend() == "nf_tables":
            names = self._q(("x_tables", ns, xt), in_netns(["cat", f"/proc/net/{xt[:-6]}_tables_names"], ns),
                            as_json=False)
            return legacy if (names or "").split() and which(legacy) else None
        if not which("nft") or not which(nft):
            return None
        family = "ip6" if self.family == 6 else "ip"
        tables = self._q(("nf_tables", ns, family), in_netns(["nft", "list", "tables", family], ns),
                         as_json=False) or ""
        return nft if re.search(rf"^table {family} (filter|nat)$", tables, re.M) else None

    def conntrack(self, ns, proto, dst):
        if not which("conntrack"):
            return None
        out = self._q(("ct", ns, proto, dst), in_netns(["conntrack", "-L", *_ct_select(self, proto), "--orig-dst", dst],
                                                       ns), as_json=False)
        return [_parse_conntrack(line) for line in (out or "").splitlines() if "src=" in line]

    def addrs(self, ns, name, family=None):
        """NAME's addresses of the walk's family (IPv6: link-local ones too, a next hop may be one),
        or of FAMILY ("inet", "inet6", "any": an underlay's may differ from the overlay's)."""
        family = family or self.inet
        link = self.link(ns, name) or {}
        return [a["local"] for a in link.get("addr_info", []) if family in ("any", a.get("family"))]

    def owner(self, addr):
        """(namespace, link) that has ADDR, among the namespaces doctor can see."""
        for ns in self.namespaces:
            for link in self.links(ns):
                if addr in self.addrs(ns, link["ifname"], "any"):
                    return ns, link["ifname"]
        return None

    def peer(self, ns, link):
        """(namespace, name) of a veth's other end, or None when doctor cannot see it."""
        peer_ns = ns
        if "link_netnsid" in link:
            peer_ns = self.nsids(ns).get(link["link_netnsid"])
            if peer_ns is None and (ns is None or None not in self.namespaces):
                return None         # a namespace without a name: not one doctor can look into
        for l in self.links(peer_ns):
            if l.get("ifindex") == link.get("link_index"):
                return peer_ns, l["ifname"]
        return None

    def local(self, ns, addr):
        return any(addr in self.addrs(ns, l["ifname"], "any") for l in self.links(ns)) or \
            bool(_address(addr) and _address(addr).is_loopback)


def _ipf(v, *args, ns=None):
    """`ip` for the walk's family: IPv6 routes and neighbours are listed only with -6."""
    return ip(*(["-6"] if v.family == 6 else []), *args, ns=ns)


def _xt(v, *args, ns=None):
    """`iptables -w ARGS`, or `ip6tables -w ARGS` on an IPv6 walk: same options, other tables."""
    return in_netns([v.iptables, "-w"] + [str(a) for a in args], ns)


def _ct_select(v, proto):
    """conntrack's family and protocol options (it lists IPv4 unless told; ICMPv6 is icmpv6)."""
    if v.family == 6:
        return ["-f", "ipv6", "-p", "icmpv6" if proto == "ipv6-icmp" else proto]
    return ["-p", proto]


def _global(a):
    """An address to reach or route for: IPv6 link-local ones name a link, not a host."""
    return a.get("family") != "inet6" or a.get("scope") != "link"


def _parse_iptables(text):
    chains = {}
    for line in text.splitlines():
        words = shlex.split(line)
        if len(words) >= 3 and words[0] == "-P":
            counts = words[words.index("-c") + 1] if "-c" in words else "0"
            chains.setdefault(words[1], {"rules": []}).update(policy=words[2], packets=int(counts))
        elif len(words) >= 2 and words[0] == "-N":
            chains.setdefault(words[1], {"rules": []})
        elif len(words) >= 2 and words[0] == "-A":
            if "-c" in words:           # the rule's counters: not part of what it matches
                at = words.index("-c")
                words = words[:at] + words[at + 3:]
            chains.setdefault(words[1], {"rules": []})["rules"].append(words[2:])
    return chains


def _parse_conntrack(line):
    """{"proto", "orig": {src, dst, sport, dport}, "reply": {...}} from one `conntrack -L` line."""
    words = line.split()
    tuples, cur = [], None
    for w in words:
        key, _, value = w.partition("=")
        if key == "src":
            cur = {}
            tuples.append(cur)
        if cur is not None and key in ("src", "dst", "sport", "dport"):
            cur[key] = value
    return {"proto": words[0], "orig": tuples[0] if tuples else {}, "reply": tuples[1] if len(tuples) > 1 else {},
            "line": line.strip()}


def _iface_match(pattern, name):
    if name is None:
        return False
    return name.startswith(pattern[:-1]) if pattern.endswith("+") else name == pattern


def _rule_matches(words, pkt):
    """Does an iptables rule (its -S words, after the chain) match PKT? Returns (matches,
    target words); a match option doctor does not know makes the rule not count."""
    i, negate, target = 0, False, []
    ok = True
    while i < len(words):
        w = words[i]
        if w == "!":
            negate, i = True, i + 1
            continue
        arg = words[i + 1] if i + 1 < len(words) else ""
        if w in ("-j", "-g"):
            target = words[i + 1:]
            break
        if w == "-c":
            i += 3
            continue
        if w == "-m":
            hit = None
        elif w in ("-s", "-d"):
            addr = pkt.get("src" if w == "-s" else "dst")
            hit = addr is not None and ipaddress.ip_address(addr) in ipaddress.ip_network(arg, strict=False)
        elif w in ("-i", "-o"):
            hit = _iface_match(arg, pkt.get("iif" if w == "-i" else "oif"))
        elif w == "-p":
            hit = arg == "all" or PROTO_NAMES.get(arg, arg) == pkt.get("proto")
        elif w in ("--dport", "--sport"):
            port = pkt.get("dport" if w == "--dport" else "sport")
            low, _, high = arg.partition(":")
            hit = port is not None and int(low) <= int(port) <= int(high or low)
        elif w in ("--ctstate", "--state"):
            hit = pkt.get("ctstate", "NEW") in arg.split(",")
        elif w == "--comment":
            hit = None
        elif w == "--physdev-is-bridged":
            hit, arg = bool(pkt.get("bridged")), None
        elif w == "--hl-eq" and "hl" in pkt:        # firewalls accept NDP only at hop limit 255
            hit = int(arg) == pkt["hl"]
        elif w == "--icmpv6-type" and pkt.get("proto") == "ipv6-icmp":
            hit = ICMPV6_TYPES.get(arg, arg).split("/")[0] == pkt.get("icmp_type", ICMPV6_TYPES["echo-request"])
        else:
            return False, []            # an option doctor cannot judge: do not count on this rule
        if hit is not None and hit == negate:
            ok = False
        negate = False
        i += 1 if arg is None else 2
    return ok, target


def _chain_verdict(chains, chain, pkt, depth=0):
    """The target (ACCEPT, DROP, DNAT ...) with its words, and the rule that decided,
    of a packet through CHAIN; (None, ..) when it falls off the end of CHAIN."""
    for words in chains.get(chain, {}).get("rules", []):
        ok, target = _rule_matches(words, pkt)
        if not ok or not target:
            continue
        if target[0] in chains and depth < 8:
            verdict, rule = _chain_verdict(chains, target[0], pkt, depth + 1)
            if verdict and verdict[0] != "RETURN":
                return verdict, rule
            continue
        if target[0] in ("LOG", "MARK", "CONNMARK", "NFLOG", "TRACE"):
            continue
        return target, words
    return None, None


def _filter_verdict(chains, chain, pkt):
    target, rule = _chain_verdict(chains, chain, pkt)
    if target:
        return target[0], rule
    return chains.get(chain, {}).get("policy", "ACCEPT"), None


def _to_address(target):
    """The address of a DNAT/SNAT target's --to-destination/--to-source (port left off:
    1.2.3.4:80, [fd00::2]:80 or a bare fd00::2; the first of a range)."""
    for key in ("--to-destination", "--to-source"):
        if key in target:
            to = target[target.index(key) + 1]
            if to.startswith("["):
                return to[1:].split("]")[0].split("-")[0]
            return (to if to.count(":") > 1 else to.split(":")[0]).split("-")[0]
    return None


def _address(text):
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def doctor_walk(r, frm, to, proto="icmp", port=None, ns=None, family=4):
    """Walk the path from FROM ("host", a namespace, or an address of one: its source) to TO
    (an address or a namespace) and return the report: {"from", "to", "dst", "src", "hops":
    [...], "healthy", "broken"}. FAMILY (4 or 6): the addresses', when FROM or TO is one.
    Read-only: every look-up goes through r.live, the live kernel whatever the mode."""
    names = r.live.netns_names()
    namespaces = [ns] + [n for n in names if n != ns] if ns else [None] + names
    v = _View(r, namespaces, family)
    src_ns, src = (ns if frm == HOST_NAME else frm), None
    if frm != HOST_NAME and _address(frm):
        src = str(_address(frm))
        owner = v.owner(src)
        if owner is None:
            raise UsageError(f"FROM {frm}: no namespace doctor can see has this address")
        src_ns = owner[0]
    dst = _doctor_target(v, to, ns)
    report = {"from": frm if src else _ns_name(src_ns), "to": to, "dst": dst, "src": None, "proto": proto,
              "port": port, "hops": [], "healthy": False, "broken": None}
    try:
        _walk(v, report, src_ns, dst, proto, port, src)
        report["healthy"] = True
    except _Broken as b:
        report["broken"] = b.finding
    for hop in report["hops"]:
        hop.pop("_ns", None)
    return report


def _doctor_target(v, to, ns):
    """TO as an address: itself, or the first address of the walk's family (IPv6: not a
    link-local one) of namespace TO on an up link."""
    if to != HOST_NAME:
        try:
            return str(ipaddress.ip_address(to))
        except ValueError:
            pass
    to_ns = ns if to == HOST_NAME else to
    for link in v.links(to_ns):
        for a in link.get("addr_info", []):
            if a.get("family") == v.inet and _global(a) and link.get("ifname") != "lo" \
                    and "UP" in link.get("flags", []):
                return a["local"]
    what = "global IPv6" if v.family == 6 else "IPv4"
    raise UsageError(f"namespace {_ns_name(to_ns)} has no {what} address on an up interface: nothing to reach"
                     + ("" if v.family == 6 else " (-6 walks IPv6)"))


def _subnets(v, ns):
    """The subnets of the walk's family NS's up interfaces are on, with its address on
    each: [(network, addr)] (IPv6: link-local ones left out, every link has fe80::/64)."""
    return [(ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}").network, a["local"])
            for link in v.links(ns) if link.get("ifname") != "lo" and "UP" in link.get("flags", [])
            for a in link.get("addr_info", []) if a.get("family") == v.inet and _global(a)]


def _forwarding_key(v):
    """The sysctl that turns forwarding on in a namespace, for the walk's family."""
    return "net.ipv6.conf.all.forwarding" if v.family == 6 else "net.ipv4.ip_forward"


def _route_fix(v, ns, dst, default=False):
    """The route to suggest in NS toward DST: via a namespace NS shares a subnet with, the one
    best placed (DST is its own address, then DST is on one of its subnets: route that subnet,
    then it forwards).  DEFAULT: a default route, as a pod has.  None when NS has no neighbour
    doctor can see that could carry it (the fix then says GATEWAY)."""
    target = ipaddress.ip_address(dst)
    mine = [net for net, _ in _subnets(v, ns)]
    best = None
    for other in v.namespaces:
        if other == ns:
            continue
        theirs = _subnets(v, other)
        for _, addr in theirs:
            if not any(ipaddress.ip_address(addr) in m for m in mine):
                continue                    # not a neighbour: NS shares no subnet with it
            owns = any(str(target) == a for _, a in theirs)
            on = next((str(n) for n, _ in theirs if target in n), None)
            rank = 0 if owns else 1 if on else 2 if v.sysctl(other, _forwarding_key(v)) == "1" else None
            if rank is not None and (best is None or rank < best[0]):
                best = (rank, "default" if default else dst if owns or not on else on, addr)
    return _ipf(v, "route", "add", best[1], "via", best[2], ns=ns) if best else None


def _walk(v, report, ns, dst, proto, port, src=None):
    """Hop by hop, as the kernel decides: FROM's own route (from SRC, when FROM is an address),
    then in each namespace the packet enters: conntrack/DNAT, rp_filter, local delivery or
    forwarding, FORWARD, masquerade; between hops the L2 segment and the neighbour entry."""
    route = v.route_get(ns, dst, src)
    if not route or route.get("type") in ("unreachable", "prohibit", "blackhole"):
        raise _Broken("no-route", _ns_name(ns), f"{_ns_name(ns)} has no route to {dst}",
                      _as_shell([_ipf(v, "route", "show", ns=ns)]),
                      _as_shell([_route_fix(v, ns, dst, default=True)
                                 or _ipf(v, "route", "add", "default", "via", "GATEWAY", ns=ns)]))
    if route.get("type") == "local":
        report["hops"].append({"ns": _ns_name(ns), "note": f"{dst} is an address of {_ns_name(ns)} itself"})
        return
    src = src or route.get("prefsrc")
    report["src"] = src
    # the names iptables and ip6tables print: ICMP of IPv6 is a protocol of its own (58)
    pkt = {"src": src, "dst": dst, "proto": "ipv6-icmp" if proto == "icmp" and v.family == 6 else proto,
           "dport": port}
    iif = None
    for _ in range(DOCTOR_MAX_HOPS):
        where = _ns_name(ns)
        hop = {"ns": where, "_ns": ns}
        report["hops"].append(hop)
        if iif is not None:
            hop["in"] = iif
            dnat = _check_conntrack_and_dnat(v, ns, pkt, iif)
            if dnat != pkt["dst"]:
                hop["dnat"] = {"from": pkt["dst"], "to": dnat}
            pkt["dst"] = dnat
            _check_rp_filter(v, ns, pkt, iif, where)
            if v.local(ns, pkt["dst"]):
                _check_filter(v, ns, "INPUT", dict(pkt, iif=iif, oif=None), where)
                hop["note"] = f"{pkt['dst']} is here: delivered"
                _check_return(v, report, ns, pkt)
                return
            _check_forwarding(v, ns, pkt, iif, where)
            route = v.route_get(ns, pkt["dst"], pkt["src"], iif)
            if not route:
                raise _Broken("no-route", where, f"{where} has no route to {pkt['dst']} (for packets in from {iif})",
                              _as_shell([_ipf(v, "route", "get", pkt["dst"], "from", pkt["src"], "iif", iif, ns=ns)]),
                              _as_shell([_route_fix(v, ns, pkt["dst"])
                                         or _ipf(v, "route", "add", pkt["dst"], "via", "GATEWAY", ns=ns)]))
            _check_filter(v, ns, "FORWARD", dict(pkt, iif=iif, oif=route.get("dev")), where)
            pkt["src"] = _postrouting(v, ns, pkt, iif, route, hop)
        out, nh = route.get("dev"), route.get("gateway") or pkt["dst"]
        hop.update(out=out, via=nh)
        link = v.link(ns, out) or {"ifname": out}
        _check_up(ns, link, where)
        ref = {"mtu": link.get("mtu") or DEFAULT_MTU, "ns": ns, "ifname": out}
        found = _l2(v, ns, link, nh, ref, hop)
        if found is None:
            hop["note"] = f"leaves {where} through {out} towards {nh}: beyond what doctor can see from here"
            return
        next_ns, next_dev = found
        _check_neighbour(v, ns, out, nh, next_ns, next_dev, where)
        ns, iif = next_ns, next_dev
    raise _Broken("loop", _ns_name(ns), f"the path to {dst} is longer than {DOCTOR_MAX_HOPS} hops: a routing loop",
                  _as_shell([ip("route", "get", dst, ns=ns)]), [])


def _check_up(ns, link, where):
    name = link.get("ifname", "?")
    if "UP" not in link.get("flags", []):
        raise _Broken("link-down", where, f"{name} in {where} is down",
                      _as_shell([ip("link", "show", "dev", name, ns=ns)]),
                      _as_shell([ip("link", "set", "dev", name, "up", ns=ns)]))
    # A veth's or a bridge's missing carrier is its peer's or its ports' state, checked there.
    if "NO-CARRIER" in link.get("flags", []) and link_kind(link) not in ("veth", "bridge"):
        raise _Broken("link-down", where, f"{name} in {where} is up but has no carrier: whatever is at its "
                      "other end (a cable, a switch, the program behind a tap) is not there",
                      _as_shell([ip("link", "show", "dev", name, ns=ns)]), [])


def _check_mtu(ns, link, ref):
    """REF: the routing hop's out link, whose MTU sets the biggest packet on this L2
    segment; a smaller MTU inside the segment drops bigger frames without a word."""
    if (link.get("mtu") or ref["mtu"]) >= ref["mtu"]:
        return
    name, where, sender = link.get("ifname"), _ns_name(ns), _ns_name(ref["ns"])
    raise _Broken("mtu", where,
                  f"packets up to {ref['mtu']} bytes (the MTU of {ref['ifname']} in {sender}) must cross {name} "
                  f"in {where}, whose MTU is {link['mtu']}: bigger ones are dropped silently (small pings pass, "
                  "bulk transfers stall)",
                  _as_shell([ip("link", "show", "dev", name, ns=ns), ip("link", "show", "dev", ref["ifname"], ns=ref["ns"])]),
                  _as_shell([ip("link", "set", "dev", ref["ifname"], "mtu", link["mtu"], ns=ref["ns"])]))


def _l2(v, ns, link, nh, ref, hop):
    """The namespace and link that answer for next hop NH on LINK's segment: through a veth
    to its peer, across a bridge to the port that leads there, through a vxlan to the
    remote node. None when the segment leaves what doctor can see."""
    kind, where = link_kind(link), _ns_name(ns)
    if kind == "veth":
        peer = v.peer(ns, link)
        if not peer:
            return None
        pns, pname = peer
        plink = v.link(pns, pname) or {}
        _check_up(pns, plink, _ns_name(pns))
        _check_mtu(pns, plink, ref)
        if nh in v.addrs(pns, pname):
            return pns, pname
        if plink.get("master"):
            return _bridge(v, pns, plink["master"], pname, nh, ref, hop)
        bridges = [l["ifname"] for l in v.links(pns) if link_kind(l) == "bridge"]
        raise _Broken("no-l2-path", _ns_name(pns),
                      f"{pname} in {_ns_name(pns)} (the other end of {link['ifname']}) is not a bridge port and "
                      f"does not have {nh}: frames from {where} go nowhere",
                      _as_shell([ip("-br", "link", "show", "type", "bridge", ns=pns)]),
                      _as_shell([ip("link", "set", "dev", pname, "master",
                                    bridges[0] if len(bridges) == 1 else "BRIDGE", ns=pns)]))
    if kind == "bridge":
        return _bridge(v, ns, link["ifname"], None, nh, ref, hop)
    if kind == "vxlan":
        return _vxlan(v, ns, link, nh, ref, hop)
    return None


def _leads_to(v, ns, link, nh):
    """Does port LINK (in NS) lead to NH: its veth peer, or a remote vxlan's side, has it?"""
    kind = link_kind(link)
    if kind == "veth":
        peer = v.peer(ns, link)
        return bool(peer) and nh in v.addrs(*peer)
    if kind == "vxlan":
        return _vxlan_remote(v, ns, link, nh) is not None
    return False


def _vxlan_remote(v, ns, link, nh):
    """(remote address, remote namespace, remote vxlan) of the node behind LINK that has NH."""
    data = link.get("linkinfo", {}).get("info_data", {})
    remotes = [data["remote"]] if data.get("remote") else []
    remotes += [e["dst"] for e in v.fdb(ns, link["ifname"]) if e.get("dst") and e["dst"] not in remotes]
    for remote in remotes:
        owner = v.owner(remote)
        if not owner or owner[0] == ns:
            continue
        rns = owner[0]
        for rvx in v.links(rns):
            if link_kind(rvx) != "vxlan" or rvx.get("linkinfo", {}).get("info_data", {}).get("id") != data.get("id"):
                continue
            if nh in v.addrs(rns, rvx["ifname"]) or rvx.get("master") and any(
                    _leads_to(v, rns, p, nh) for p in v.links(rns)
                    if p.get("master") == rvx["master"] and link_kind(p) == "veth"):
                return remote, rns, rvx
    return None


def _bridge(v, ns, br, in_port, nh, ref, hop):
    where = _ns_name(ns)
    _check_up(ns, v.link(ns, br) or {"ifname": br}, where)
    hop.setdefault("l2", []).append(f"bridge {br} in {where}")
    if in_port is not None and nh in v.addrs(ns, br):
        return ns, br
    for port in v.links(ns):
        if port.get("master") != br or port.get("ifname") == in_port or not _leads_to(v, ns, port, nh):
            continue
        _check_up(ns, port, where)
        _check_mtu(ns, port, ref)
        if in_port is not None:
            _check_bridged_forward(v, ns, br, nh, hop)
        return _l2(v, ns, port, nh, ref, hop)
    for port in v.links(ns):
        data = port.get("linkinfo", {}).get("info_data", {})
        if port.get("master") == br and link_kind(port) == "vxlan" and not data.get("remote") \
                and not any(e.get("dst") for e in v.fdb(ns, port["ifname"])):
            raise _Broken("no-l2-path", where,
                          f"{port['ifname']} in {where} has no remote and no fdb entry: it does not know where "
                          f"to send frames ({_nd(v)} for {nh} included), so nothing crosses the overlay",
                          _as_shell([bridge("fdb", "show", "dev", port["ifname"], ns=ns)]),
                          _as_shell([bridge("fdb", "append", "00:00:00:00:00:00", "dev", port["ifname"],
                                            "dst", "REMOTE_NODE", ns=ns)]))
    raise _Broken("no-l2-path", where, f"no port of bridge {br} in {where} leads to {nh}: "
                  "the veth or vxlan that should reach it is not attached",
                  _as_shell([ip("-br", "link", "show", "master", br, ns=ns)]),
                  _as_shell([ip("link", "set", "dev", "PORT", "master", br, ns=ns)]))


def _vxlan(v, ns, link, nh, ref, hop):
    where, name = _ns_name(ns), link["ifname"]
    found = _vxlan_remote(v, ns, link, nh)
    if not found:
        return None
    remote, rns, rvx = found
    under = v.route_get(ns, remote)
    udev = v.link(ns, under.get("dev")) if under else None
    if not udev:
        raise _Broken("no-route", where, f"{where} has no underlay route to {remote}, the far end of {name}",
                      _as_shell([ip("route", "get", remote, ns=ns)]),
                      _as_shell([(_route_fix(v, ns, remote) if ipaddress.ip_address(remote).version == v.family
                                  else None)       # an underlay of the other family: doctor's subnets are not its
                                 or ip("route", "add", remote, "via", "GATEWAY", ns=ns)]))
    # an IPv6 underlay's outer header is 40 bytes, not 20
    overhead = VXLAN_OVERHEAD + (20 if ":" in remote else 0)
    if link.get("mtu", 0) + overhead > udev.get("mtu", DEFAULT_MTU):
        raise _Broken("mtu", where,
                      f"{name} in {where} has MTU {link['mtu']}, but its packets gain {overhead} bytes "
                      f"of VXLAN headers on {udev['ifname']} (MTU {udev['mtu']}): the overlay has no headroom",
                      _as_shell([ip("-d", "link", "show", "dev", name, ns=ns),
                                 ip("link", "show", "dev", udev["ifname"], ns=ns)]),
                      _as_shell([ip("link", "set", "dev", name, "mtu", udev["mtu"] - overhead, ns=ns)]))
    hop.setdefault("l2", []).append(f"{name} (VNI {link['linkinfo']['info_data'].get('id')}) in {where} "
                                    f"over {udev['ifname']} to {remote} ({_ns_name(rns)})")
    _check_up(rns, rvx, _ns_name(rns))
    _check_mtu(rns, rvx, ref)
    if nh in v.addrs(rns, rvx["ifname"]):
        return rns, rvx["ifname"]
    return _bridge(v, rns, rvx["master"], rvx["ifname"], nh, ref, hop)


def _check_bridged_forward(v, ns, br, nh, hop):
    """With br_netfilter, frames a bridge passes between two of its ports go through
    iptables FORWARD (in and out are the bridge): Docker's policy DROP kills them.
    IPv6 frames go through ip6tables, when bridge-nf-call-ip6tables says so."""
    call = f"bridge-nf-call-{v.iptables}"
    if v.sysctl(ns, f"net/bridge/{call}") != "1":
        return
    where = _ns_name(ns)
    chains = v.rules(ns, "filter")
    verdict, rule = _filter_verdict(chains, "FORWARD", {"iif": br, "oif": br, "dst": nh, "bridged": True})
    if verdict in ("DROP", "REJECT"):
        table, chain, spec = bridge_forward_rule(br)
        raise _Broken("forward-drop", where, _drop_text(chains, "FORWARD", rule, where, v.iptables) +
                      f"; {call}=1 (br_netfilter) sends {br}'s bridged frames through it",
                      _as_shell([_xt(v, "-L", "FORWARD", "-v", "-n", "-x", ns=ns),
                                 in_netns(["sysctl", f"net.bridge.{call}"], ns)]),
                      _as_shell([_xt(v, "-t", table, "-I", chain, *spec, ns=ns)]))
    hop.setdefault("l2", []).append(f"br_netfilter: FORWARD accepts {br}'s bridged frames")


def _nd(v):
    """What finds a neighbour's MAC: ARP, or IPv6's neighbour discovery."""
    return "neighbour discovery (NDP)" if v.family == 6 else "ARP"


def _drop_text(chains, chain, rule, where, tool="iptables"):
    if rule is None:
        return (f"{tool} {chain} in {where} has policy {chains[chain]['policy']} and no rule accepts this "
                f"traffic (the policy has dropped {chains[chain].get('packets', 0)} packets so far)")
    return f"the {tool} {chain} rule `{shell_join(rule)}` in {where} drops this traffic"


def _check_filter(v, ns, chain, pkt, where):
    """CHAIN's verdict in `iptables` (`ip6tables`), then in the other backend's tables if NS has
    any: a packet must pass both, and a DROP there is one that `iptables -S` cannot explain."""
    for tool in (v.iptables, v.other_backend(ns)):
        chains = v.rules(ns, "filter", tool) if tool else {}
        if chain not in chains:
            continue
        verdict, rule = _filter_verdict(chains, chain, pkt)
        if verdict not in ("DROP", "REJECT"):
            continue
        if tool != v.iptables:
            raise _Broken("other-backend", where,
                          _drop_text(chains, chain, rule, where, tool) + f"; `{v.iptables}` shows none of it: {tool} "
                          "keeps its rules in the other backend, which applies as well",
                          _as_shell([in_netns([tool, "-w", "-L", chain, "-v", "-n", "-x"], ns)]),
                          [f"{shell_join(in_netns([tool + '-save', '-t', 'filter'], ns))} | "
                           f"{shell_join(in_netns([v.restore_tool(), '--noflush'], ns))}",
                           shell_join(in_netns([tool, "-w", "-F"], ns)) + " && "
                           + shell_join(in_netns([tool, "-w", "-P", chain, "ACCEPT"], ns))])
        iif, oif = pkt.get("iif"), pkt.get("oif")
        narrow = (["-i", iif] if iif else []) + (["-o", oif] if oif else []) + ["-d", pkt["dst"]]
        raise _Broken("forward-drop" if chain == "FORWARD" else "input-drop", where,
                      _drop_text(chains, chain, rule, where, v.iptables),
                      _as_shell([_xt(v, "-L", chain, "-v", "-n", "-x", ns=ns)]),
                      _as_shell([_xt(v, "-I", chain, *narrow, "-j", "ACCEPT", ns=ns)]))


def _check_rp_filter(v, ns, pkt, iif, where):
    """Reverse-path filtering: the route back to the source must leave through the
    link the packet came in on (strict, 1), or at least exist (loose, 2). IPv4's sysctl:
    IPv6 has none, ip6tables' rpfilter match does that work."""
    if v.family == 6:
        _check_rpfilter_match(v, ns, pkt, iif, where)
        return
    modes = [v.sysctl(ns, f"net/ipv4/conf/{k}/rp_filter") for k in ("all", iif)]
    mode = max([int(m) for m in modes if m and m.isdigit()] or [0])
    if mode == 0:
        return
    back = v.route_get(ns, pkt["src"])
    back_dev = back.get("dev") if back and back.get("type") not in ("unreachable", "prohibit", "blackhole") else None
    if back_dev is None or (mode == 1 and back_dev != iif):
        how = f"leaves through {back_dev}" if back_dev else "does not exist"
        raise _Broken("rp-filter", where,
                      f"{pkt['src']} arrives on {iif} in {where}, but the route back to it {how}: reverse-path "
                      f"filtering (rp_filter={mode}{', strict' if mode == 1 else ''}) drops it as a spoofed source",
                      _as_shell([ip("route", "get", pkt["src"], ns=ns),
                                 in_netns(["sysctl", "net.ipv4.conf.all.rp_filter", f"net.ipv4.conf.{iif}.rp_filter"], ns),
                                 in_netns(["nstat", "-asz", "TcpExtIPReversePathFilter"], ns)]),
                      _as_shell([sysctl_set(f"net.ipv4.conf.{iif}.rp_filter", 2, ns)]))





def _check_rpfilter_match(v, ns, pkt, iif, where):
    """IPv6's reverse-path filter: a raw PREROUTING rule `-m rpfilter --invert -j DROP` (as
    firewalld writes it) drops what arrives on a link the route back to the source does not
    leave through (--loose: only what has no route back at all)."""
    for n, words in enumerate(v.rules(ns, "raw").get("PREROUTING", {}).get("rules", []), 1):
        at = next((i for i in range(len(words) - 1) if words[i:i + 2] == ["-m", "rpfilter"]), None)
        if at is None or "--invert" not in words or words[-2:] != ["-j", "DROP"]:
            continue
        rest = [w for w in words[:at] + words[at + 2:] if w not in RPFILTER_FLAGS]
        if not _rule_matches(rest, dict(pkt, iif=iif))[0]:
            continue                    # the rule's other matches leave this packet alone
        loose = "--loose" in words
        back = v.route_get(ns, pkt["src"])
        back_dev = back.get("dev") if back and back.get("type") not in ("unreachable", "prohibit", "blackhole") \
            else None
        if back_dev is not None and (loose or back_dev == iif):
            return
        how = f"leaves through {back_dev}" if back_dev else "does not exist"
        fix = [_xt(v, "-t", "raw", "-R", "PREROUTING", n, *words[:at + 2], "--loose", *words[at + 2:], ns=ns)] \
            if back_dev else [_route_fix(v, ns, pkt["src"]) or _ipf(v, "route", "add", pkt["src"], "via", "GATEWAY",
                                                                    ns=ns)]
        raise _Broken("rp-filter", where,
                      f"{pkt['src']} arrives on {iif} in {where}, but the route back to it {how}: the ip6tables "
                      f"raw PREROUTING rule `{shell_join(words)}` (reverse-path filter"
                      f"{', loose' if loose else ', strict'}) drops it as a spoofed source",
                      _as_shell([_ipf(v, "route", "get", pkt["src"], ns=ns),
                                 _xt(v, "-t", "raw", "-L", "PREROUTING", "-v", "-n", "-x", "--line-numbers", ns=ns)]),
                      _as_shell(fix))


def _check_forwarding(v, ns, pkt, iif, where):
    """IPv4 forwards what comes in on a link whose forwarding is on (ip_forward sets them
    all); IPv6 looks at `all` only (its per-link forwarding is about being a router in NDP),
    or since Linux 6.17 at the in-link's force_forwarding."""
    if v.family == 6:
        if v.sysctl(ns, "net/ipv6/conf/all/forwarding") == "0" and \
                v.sysctl(ns, f"net/ipv6/conf/{iif}/force_forwarding") != "1":
            raise _Broken("ip-forward", where,
                          f"{where} must route {pkt['src']} -> {pkt['dst']} (in on {iif}), but forwarding is off "
                          "(net.ipv6.conf.all.forwarding=0): it drops every packet not addressed to itself",
                          _as_shell([in_netns(["sysctl", "net.ipv6.conf.all.forwarding",
                                               f"net.ipv6.conf.{iif}.forwarding"], ns)]),
                          _as_shell([sysctl_set("net.ipv6.conf.all.forwarding", 1, ns)]))
        return
    if v.sysctl(ns, f"net/ipv4/conf/{iif}/forwarding") == "0":
        raise _Broken("ip-forward", where,
                      f"{where} must route {pkt['src']} -> {pkt['dst']} (in on {iif}), but forwarding is off "
                      "(net.ipv4.ip_forward=0): it drops every packet not addressed to itself",
                      _as_shell([in_netns(["sysctl", "net.ipv4.ip_forward", f"net.ipv4.conf.{iif}.forwarding"], ns)]),
                      _as_shell([sysctl_set("net.ipv4.ip_forward", 1, ns)]))


def _check_conntrack_and_dnat(v, ns, pkt, iif):
    """The destination after PREROUTING: a conntrack entry for the flow wins over the
    DNAT rules (that is how conntrack works); one that disagrees with them is stale."""
    where = _ns_name(ns)
    target, _ = _chain_verdict(v.rules(ns, "nat"), "PREROUTING", dict(pkt, iif=iif))
    by_rule = (_to_address(target) if target and target[0] == "DNAT" else None) or pkt["dst"]
    flows = [f for f in (v.conntrack(ns, pkt["proto"], pkt["dst"]) or [])
             if f["orig"].get("src") == pkt["src"] and f["orig"].get("dst") == pkt["dst"]
             and (pkt.get("dport") is None or f["orig"].get("dport") == str(pkt["dport"]))]
    for flow in flows:
        pinned = flow["reply"].get("src")
        if pinned and pinned != by_rule:
            sel = _ct_select(v, pkt["proto"]) + ["--orig-src", pkt["src"], "--orig-dst", pkt["dst"]] + \
                (["--dport", str(pkt["dport"])] if pkt.get("dport") else [])
            raise _Broken("stale-conntrack", where,
                          f"conntrack in {where} still sends the flow {pkt['src']} -> {pkt['dst']} to {pinned}, "
                          f"but the NAT rules now say {by_rule}: the entry predates the rule change and lives "
                          "as long as packets keep coming",
                          _as_shell([in_netns(["conntrack", "-L"] + sel, ns),
                                     _xt(v, "-t", "nat", "-S", "PREROUTING", ns=ns)]),
                          _as_shell([in_netns(["conntrack", "-D"] + sel, ns)]))
    return flows[0]["reply"].get("src") or by_rule if flows else by_rule


def _postrouting(v, ns, pkt, iif, route, hop):
    """The source after POSTROUTING: MASQUERADE (the out link's address) or SNAT."""
    target, rule = _chain_verdict(v.rules(ns, "nat"), "POSTROUTING", dict(pkt, iif=iif, oif=route.get("dev")))
    if not target or target[0] not in ("MASQUERADE", "SNAT"):
        return pkt["src"]
    addrs = [a["local"] for a in (v.link(ns, route["dev"]) or {}).get("addr_info", [])
             if a.get("family") == v.inet and _global(a)]
    new = _to_address(target) if target[0] == "SNAT" else route.get("prefsrc") or (addrs[0] if addrs else None)
    if not new:
        return pkt["src"]
    hop["nat"] = {"from": pkt["src"], "to": new, "rule": shell_join(rule)}
    return new


def _src_subnet(v, ns, src):
    for link in v.links(ns):
        for a in link.get("addr_info", []):
            if a.get("local") == src:
                return str(ipaddress.ip_interface(f"{src}/{a['prefixlen']}").network)
    return f"{src}/{128 if v.family == 6 else 32}"


def _check_return(v, report, ns, pkt):
    """At the destination: can the reply find its way back to the source it sees? And
    if a hop masqueraded the flow though the destination could reach the real source,
    the NAT only hides the pod: pod-to-pod traffic must keep its address."""
    where, seen, src = _ns_name(ns), pkt["src"], report["src"]
    hops = report["hops"]
    if not v.route_get(ns, seen):
        routers = [h for h in hops if h.get("in") and h.get("out")]
        subnet = _src_subnet(v, hops[0]["_ns"], src)
        if routers and v.family == 6:       # `cnikit nat` is IPv4's: ip6tables' MASQUERADE itself
            fix = _as_shell([_xt(v, "-t", "nat", "-A", "POSTROUTING", "-s", subnet, "-o", routers[-1]["out"],
                                 "-j", "MASQUERADE", ns=routers[-1]["_ns"])])
        elif routers:
            fix = ["cnikit" + (f" -n {routers[-1]['_ns']}" if routers[-1]["_ns"] else "") +
                   f" nat add {subnet} --out {routers[-1]['out']}"]
        else:
            fix = _as_shell([_route_fix(v, ns, seen) or _ipf(v, "route", "add", seen, "via", "GATEWAY", ns=ns)])
        raise _Broken("no-return-route", where,
                      f"{where} gets the request from {seen} and has no route back to it: the reply is lost "
                      "(a network that does not know the pod subnet must see the node's address: MASQUERADE)",
                      _as_shell([_ipf(v, "route", "get", seen, ns=ns)]), fix)
    if seen != src and v.route_get(ns, src):
        nat_hop = next(h for h in hops if h.get("nat"))
        node = nat_hop["_ns"]
        raise _Broken("masquerade", nat_hop["ns"],
                      f"{nat_hop['ns']} masquerades {src} -> {pkt['dst']} to {seen}: {where} sees the node, "
                      f"not the pod, though it has a route back to {src} (the rule `{nat_hop['nat']['rule']}` "
                      "lacks the pod-to-pod exemption)",
                      _as_shell([_xt(v, "-t", "nat", "-S", "POSTROUTING", ns=node),
                                 in_netns(["conntrack", "-L", *(["-f", "ipv6"] if v.family == 6 else []),
                                           "--orig-src", src, "--orig-dst", pkt["dst"]], node)]),
                      _as_shell([_xt(v, "-t", "nat", "-I", "POSTROUTING", "-s", _src_subnet(v, hops[0]["_ns"], src),
                                     "-d", _src_subnet(v, ns, pkt["dst"]), "-j", "RETURN", ns=node)]))


def _check_neighbour(v, ns, dev, nh, owner_ns, owner_dev, where):
    entry = v.neigh(ns, nh, dev)
    owner = v.link(owner_ns, owner_dev) or {}
    # NOARP silences IPv6's neighbour discovery as well as ARP
    arp_off = "ARP off" + (" (NOARP: no neighbour discovery either)" if v.family == 6 else "")
    if v.family == 6 and not any(s in (entry or {}).get("state", []) for s in ("PERMANENT", "NOARP")):
        _check_ndp_filter(v, ns, dev, nh, owner_ns, owner_dev, where)
    if not entry:
        if "NOARP" in owner.get("flags", []):
            raise _Broken("neighbour", _ns_name(owner_ns),
                          f"{owner_dev} in {_ns_name(owner_ns)} has {arp_off}: {where} never learns {nh}'s MAC",
                          _as_shell([ip("link", "show", "dev", owner_dev, ns=owner_ns)]),
                          _as_shell([ip("link", "set", "dev", owner_dev, "arp", "on", ns=owner_ns)]))
        return
    mac, state = entry.get("lladdr"), entry.get("state", [])
    # A bridge also answers for its ports' MACs (local fdb entries). A static entry (PERMANENT,
    # NOARP) stays wrong; a learned one is used without asking while REACHABLE (up to 1.5x
    # base_reachable_time) and, once STALE, is probed at the old MAC first: tens of seconds lost.
    macs = {owner.get("address")} | {l.get("address") for l in v.links(owner_ns)
                                     if link_kind(owner) == "bridge" and l.get("master") == owner_dev}
    static = any(s in state for s in ("PERMANENT", "NOARP"))
    used = static or any(s in state for s in ("REACHABLE", "STALE", "DELAY", "PROBE"))
    if mac and owner.get("address") and mac not in macs and used and link_kind(owner) != "vxlan":
        see = [_ipf(v, "neigh", "show", nh, "dev", dev, ns=ns), ip("link", "show", "dev", owner_dev, ns=owner_ns)]
        fix = []
        why = "" if static else " until the kernel gives up on the entry and asks again"
        kind = v.addr_assign_type(owner_ns, owner_dev) if link_kind(owner) == "bridge" else None
        if kind is not None and kind != 3:
            # NET_ADDR_SET pins the MAC where it is now; the old entry still has to go.
            why += (f"; {owner_dev} has no MAC of its own (addr_assign_type {kind}): it takes its lowest port's "
                    "and changes it as ports come and go")
            see.append(in_netns(["cat", f"/sys/class/net/{owner_dev}/addr_assign_type"], owner_ns))
            fix.append(ip("link", "set", "dev", owner_dev, "address", owner["address"], ns=owner_ns))
        raise _Broken("neighbour", where,
                      f"{where}'s neighbour entry says {nh} is at {mac} ({'/'.join(state)}), but {owner_dev} in "
                      f"{_ns_name(owner_ns)}, which has {nh}, is {owner['address']}: frames go to a MAC nobody has"
                      + why, _as_shell(see), _as_shell(fix + [_ipf(v, "neigh", "del", nh, "dev", dev, ns=ns)]))
    unanswered = ("FAILED", "INCOMPLETE") if v.family == 6 else ("FAILED",)
    if any(s in state for s in unanswered) and "NOARP" in owner.get("flags", []):
        raise _Broken("neighbour", _ns_name(owner_ns),
                      f"{_nd(v)} for {nh} from {where} gets no reply: {owner_dev} in {_ns_name(owner_ns)} "
                      f"has {arp_off}",
                      _as_shell([_ipf(v, "neigh", "show", nh, "dev", dev, ns=ns)]),
                      _as_shell([ip("link", "set", "dev", owner_dev, "arp", "on", ns=owner_ns)]))


def _check_ndp_filter(v, ns, dev, nh, owner_ns, owner_dev, where):
    """IPv6 learns a MAC with ICMPv6: a neighbour solicitation (135) to NH's solicited-node
    multicast group, into the owner's INPUT, and an advertisement (136) back into the
    asker's, both at hop limit 255. Conntrack does not track them (UNTRACKED): an ip6tables
    INPUT that drops ICMPv6 without letting these through leaves the entry INCOMPLETE, then FAILED."""
    low24 = int(ipaddress.IPv6Address(nh)) & 0xffffff
    group = str(ipaddress.IPv6Address(int(ipaddress.IPv6Address("ff02::1:ff00:0")) | low24))
    mine = v.addrs(ns, dev)
    # the solicitation's source: the asker's address of NH's scope on DEV
    src = next((a for a in mine if (a.startswith("fe80:") == nh.startswith("fe80:"))), mine[0] if mine else None)
    for at, iif, pkt, what in ((owner_ns, owner_dev, {"src": src, "dst": group, "icmp_type": "135"},
                                f"the neighbour solicitations (ICMPv6 135) {_ns_name(ns)} sends to learn {nh}'s MAC"),
                               (ns, dev, {"src": nh, "dst": src, "icmp_type": "136"},
                                f"the neighbour advertisements (ICMPv6 136) that tell {_ns_name(ns)} {nh}'s MAC")):
        chains = v.rules(at, "filter")
        if "INPUT" not in chains:
            continue
        verdict, rule = _filter_verdict(chains, "INPUT", dict(pkt, proto="ipv6-icmp", iif=iif, ctstate="UNTRACKED",
                                                              hl=255))
        if verdict not in ("DROP", "REJECT"):
            continue
        there = _ns_name(at)
        raise _Broken("neighbour", there,
                      _drop_text(chains, "INPUT", rule, there, v.iptables) + f", {what} among it: {where} never "
                      f"learns where {nh} is (its neighbour entry stays INCOMPLETE, then FAILED)",
                      _as_shell([_xt(v, "-L", "INPUT", "-v", "-n", "-x", ns=at),
                                 _ipf(v, "neigh", "show", nh, "dev", dev, ns=ns)]),
                      _as_shell([_xt(v, "-I", "INPUT", "-i", iif, "-p", "ipv6-icmp", "--icmpv6-type",
                                     pkt["icmp_type"], "-j", "ACCEPT", ns=at)]))


def doctor_text(report):
    """The report in plain words: the hops, then HEALTHY or the first broken hop."""
    head = f"doctor: {report['from']} -> {report['to']}"
    if report["to"] != report["dst"]:
        head += f" ({report['dst']})"
    head += f", {report['proto']}" + (f" port {report['port']}" if report.get("port") else "")
    lines = [head]
    for i, hop in enumerate(report["hops"], 1):
        parts = [f"in {hop['in']}" if hop.get("in") else "",
                 f"destination {hop['dnat']['from']} becomes {hop['dnat']['to']} (DNAT)" if hop.get("dnat") else "",
                 f"out {hop['out']} to {hop['via']}" if hop.get("out") else "",
                 f"source {hop['nat']['from']} becomes {hop['nat']['to']} (masquerade)" if hop.get("nat") else "",
                 hop.get("note", "")]
        lines.append(f"  hop {i}  {hop['ns']}: " + ", ".join(p for p in parts if p)
                     + "".join(f" [{step}]" for step in hop.get("l2", [])))
    b = report["broken"]
    if not b:
        beyond = report["hops"] and report["hops"][-1].get("note", "").startswith("leaves ")
        lines.append(f"HEALTHY as far as doctor can see: nothing drops {report['from']}'s packets for "
                     f"{report['dst']} before they leave through {report['hops'][-1]['out']}" if beyond else
                     f"HEALTHY: {report['from']} reaches {report['dst']} along these hops; nothing on the path "
                     "drops the packet")
        return "\n".join(lines)
    lines.append(f"BROKEN at {b['hop']}: {b['cause']}")
    lines.append(f"  what: {b['what']}")
    for cmd in b["see"]:
        lines.append(f"  see:  {cmd}")
    for cmd in b["fix"]:
        lines.append(f"  fix:  {cmd}")
    return "\n".join(lines)


def doctor(r, frm, to, proto=None, port=None, ns=None, as_json=False, family=None):
    """`cnikit doctor FROM TO`: print the path and its first broken hop; exit 0 when
    healthy, 1 when broken, 2 on bad input. Read-only: it changes nothing. FAMILY (4, 6,
    None): -4/-6, the walk's family when FROM and TO are names; an address decides itself."""
    if frm != HOST_NAME and _address(frm) is None:
        check_netns(frm)
        if not netns_exists(frm):
            raise UsageError(f"FROM namespace {frm!r} does not exist (use '{HOST_NAME}' for where cnikit runs)")
    if to != HOST_NAME and _address(to) is None:
        check_netns(to)
        if not netns_exists(to):
            raise UsageError(f"TO {to!r} is neither an IPv4 or IPv6 address nor an existing namespace")
    said = f"-{family} asks for IPv{family}" if family else None     # who decided the family
    for what, name in (("FROM", frm), ("TO", to)):
        addr = _address(name) if name != HOST_NAME else None
        if addr is None:
            continue
        if family and addr.version != family:
            raise UsageError(f"{what} {name} is an IPv{addr.version} address, but {said}")
        if addr.version == 6 and (addr.is_link_local or addr.scope_id):
            raise UsageError(f"{what} {name} is valid on one link only (link-local, or with a %zone): "
                             "give a global address, or the namespace")
        family, said = addr.version, said or f"FROM {name} is IPv{addr.version}: a path has one family"
    port = check_int(port, 1, 65535, "--port") if port is not None else None
    proto = proto or ("tcp" if port else "icmp")
    if proto not in DOCTOR_PROTOS:
        raise UsageError(f"--proto {proto!r}: use one of {', '.join(DOCTOR_PROTOS)}")
    if port and proto == "icmp":
        raise UsageError("--port goes with --proto tcp or udp, not icmp")
    if ns:
        require_netns(r, ns)
    if os.geteuid() != 0:
        raise UsageError("doctor looks inside namespaces and at iptables: run it as root (sudo)")
    require_tools("ip", "sysctl")
    report = doctor_walk(r, frm, to, proto, port, ns, family or 4)
    if as_json:
        print(json.dumps(report, indent=2), flush=True)
    else:
        r.output(doctor_text(report))
    return EXIT_OK if report["healthy"] else EXIT_BROKEN

# ---------------------------------------------------------------- sandbox

def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _check_libc(result, what):
    if result != 0:
        err = ctypes.get_errno()
        raise CnikitError(f"sandbox: {what} failed: {os.strerror(err)}")


def enter_sandbox(private_dirs=SANDBOX_DIRS):
    """Move this process into a fresh network namespace and a private mount
    namespace with an empty /run/netns and empty PRIVATE_DIRS (the CNI directories
    and /var/log by default), /sys showing the new namespace. Whatever is created
    afterwards vanishes when the last process in the sandbox exits; the host is never
    touched (a private directory missing on the host is created there, empty, as its
    mount point)."""
    if os.geteuid() != 0:
        raise UsageError("the sandbox needs root (it creates namespaces): run with sudo")
    libc = _libc()
    _check_libc(libc.unshare(CLONE_NEWNS | CLONE_NEWNET), "unshare(CLONE_NEWNS|CLONE_NEWNET)")
    # Mounts made from now on must not propagate back to the host.
    _check_libc(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "making / private")
    for path in (NETNS_DIR,) + tuple(private_dirs):
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise CnikitError(f"sandbox: cannot create the mount point {path}: {e.strerror or e}") from None
        _check_libc(libc.mount(b"tmpfs", path.encode(), b"tmpfs", 0, b"mode=755"), f"tmpfs on {path}")
    # A sysfs mounted now shows this namespace's interfaces under /sys/class/net. It may
    # fail where /sys is read-only (some containers): ip and netlink work without it.
    libc.mount(b"sysfs", b"/sys", b"sysfs", 0, None)
    subprocess.run(["ip", "link", "set", "dev", "lo", "up"], capture_output=True)


def sandbox_shell(ns=None):
    """An interactive shell inside the sandbox this process is in, on its host side or in
    namespace NS (`ip netns exec NS`), its prompt saying where; returns its exit code."""
    shell = os.environ.get("SHELL") or "/bin/bash"
    prompt = SANDBOX_PROMPT.replace("cnikit-sandbox", f"cnikit-sandbox {ns}") if ns else SANDBOX_PROMPT
    env = dict(os.environ, PS1=prompt, CNIKIT_SANDBOX="1")
    argv = [shell, "--norc", "-i"] if shell.endswith("bash") else [shell, "-i"]
    return subprocess.call(in_netns(argv, ns), env=env)


def sandbox(cmd=None, quiet=False):
    """Run CMD (default: an interactive shell) in a fresh sandbox; returns its exit code."""
    enter_sandbox()
    if not quiet:
        print("# sandbox: a fresh network + mount namespace; /run/netns is private; "
              "everything created here is gone on exit", file=sys.stderr)
    if not cmd:
        return sandbox_shell()
    try:
        return subprocess.call(cmd, env=dict(os.environ, CNIKIT_SANDBOX="1"))
    except FileNotFoundError:
        raise UsageError(f"{cmd[0]}: command not found") from None


# ---------------------------------------------------------------- CLI
#
# One table, VERBS, declares every command: a Verb row per verb (and per object without
# verbs), with its arguments, help, examples, the tools it needs and whether it only looks.
# The parser, --help at every level, dispatch (keyword arguments) and the tool list are
# read from it, and main builds only the parsers on the path of the command being run:
# adding a verb is one function plus one row.

EPILOG = """examples:
  cnikit netns add ns1 --lo-up
  cnikit veth add veth-ns1 eth0 --netns ns1 --addr 10.0.0.1/24 --peer-addr 10.0.0.2/24
  cnikit bridge add br0 --addr 10.0.0.1/24 && cnikit bridge attach br0 veth-ns1
  cnikit nat add 10.0.0.0/24 --out eth0
  cnikit -n node1 vxlan add vxlan0 --id 42 --remote 192.0.2.2 --dev eth0 --bridge br0
  cnikit cni install && cnikit netns add pod1 && cnikit cni add pod1   # be the container runtime
  cnikit show                     # a picture of what exists now (--json for data)
  cnikit --dry-run bridge add br0 # print the commands only; pipe into `sh -e`
  cnikit sandbox                  # a throwaway shell: nothing you build there survives it
  cnikit --sandbox show           # one command in a throwaway sandbox
  cnikit cleanup                  # remove exactly what cnikit created

Options such as --dry-run, -q, -v and -n NS go before OBJECT or after VERB. Run as
root (`sudo` where it is installed; a root shell without sudo: drop the `sudo`).
Every command that changes the kernel is printed before it runs (-q hides it; -v
also prints the look-ups cnikit makes to decide). Exit codes: 0 done, 1 a command
failed (what this invocation created is rolled back), 2 bad usage or input."""


# What each attachment verb reads besides --conf, --conf-dir and --cni-path (as libcni
# passes them): an option a verb would ignore is refused, never silently dropped.
CNI_VERB_READS = {"add": {"netns", "ifname", "cid", "cni_args", "runtime_config"},
                  "del": {"netns", "ifname", "cid", "cni_args", "runtime_config"},
                  "check": {"netns", "ifname", "cid", "cni_args"},
                  "status": set(), "gc": set(), "version": set()}
CNI_VERB_DEFAULTS = {"ifname": "eth0"}      # the parser's defaults that are not None
CNI_ATTACHMENT_OPTIONS = ("netns", "ifname", "cid", "cni_args", "runtime_config")   # what names an attachment
# Why a verb takes fewer of them (its parser has only what it reads; main names what it refused).
CNI_VERB_WHY_NOT = {"status": "STATUS and VERSION ask about the network, not an attachment",
                    "version": "STATUS and VERSION ask about the network, not an attachment",
                    "gc": "GC acts on every attachment of the network",
                    "check": "CHECK uses the capability args cached by ADD"}
CNI_FLAGS = {"netns": "NETNS", "cid": "--id", "cni_args": "--args", "plugin_src": "--plugin", "ptype": "--type"}


def _cni_flag(dest):
    return CNI_FLAGS.get(dest, "--" + dest.replace("_", "-"))


def cni_check_options(args):
    """Every option of a `cni` verb, before anything runs: no empty values, absolute
    directories where a runtime reads them, and nothing a verb would ignore."""
    for dest, value in sorted(vars(args).items()):
        # DEL may name no netns (a runtime's second DEL, after the netns is gone: CNI_NETNS="")
        if dest == "netns" and args.verb == "del" and value == "":
            continue
        if isinstance(value, str) and not value.strip():
            raise UsageError(f"cni {args.verb}: {_cni_flag(dest)} is empty")
    for dest in ("plugin_dir", "conf_dir"):
        value = getattr(args, dest, None)
        if args.verb in ("install", "uninstall") and value is not None and not os.path.isabs(value):
            raise UsageError(f"cni {args.verb}: {_cni_flag(dest)} {value!r} must be an absolute path "
                             "(where a runtime looks)")
    if getattr(args, "cni_args", None) is not None:
        cni_parse_args(args.cni_args)
    cni_runtime_config(getattr(args, "runtime_config", None))
    if getattr(args, "cni_path", None) is not None and not any(d for d in args.cni_path.split(":")):
        raise UsageError(f"cni {args.verb}: --cni-path {args.cni_path!r} names no directory")


def cni_runtime_config(text):
    """--runtime-config: a JSON object (capability name -> value), or None when not given."""
    if text is None:
        return None
    try:
        rc = json.loads(text)
    except ValueError as e:
        raise UsageError(f"--runtime-config is not JSON: {e}") from None
    if not isinstance(rc, dict):
        raise UsageError("--runtime-config must be a JSON object such as {\"portMappings\": [...]}, "
                         f"not {text.strip()!r}")
    return rc


def cni_planned_conf(r, conf, conf_dir):
    """A plan that finds no network config (and none named with --conf but the default
    one) plans against the one a plain `cni install` writes (a live run: the error),
    says so, and prints a guard that stops the script if another config is in place when it
    runs. Returns that parsed config, or None (the config on disk is read as usual)."""
    path = cni_conf_file(conf_dir, CNI_NET)
    if (conf or path) != path or r.state.file_exists(path):
        return None
    try:
        cni_load(conf) if conf else cni_default_conf(conf_dir)
        return None
    except UsageError as e:
        # a live run stops here, with the error it would meet reading the config
        r.state.unknown(str(e), f"no network config in {conf_dir} yet: planned against the one `cnikit cni "
                        f"install` writes by default ({path}); the script stops here if another one is in place")
    text = json.dumps(cni_conflist(), indent=2) + "\n"
    r.echo(["cmp", "-s", path, "-"], " <<'EOF' || { echo " + shell_quote(
        f"{path} is not the config this script was planned against: the default of cnikit cni install")
        + " >&2; exit 1; }")
    if not r.quiet:
        r.output(text + "EOF")
    return cni_parse(text.encode(), path)


class Arg:
    """One argument of a verb: argparse's add_argument(*FLAGS, **KW). DEST is the verb
    function's parameter it fills; POST turns the parsed value into what that takes;
    arguments sharing a GROUP exclude each other."""
    __slots__ = ("flags", "kw", "dest", "post", "group")

    def __init__(self, *flags, post=None, group=None, **kw):
        self.flags, self.kw, self.post, self.group = flags, kw, post, group
        name = next((f for f in flags if f.startswith("--")), flags[0])
        self.dest = kw.get("dest") or name.lstrip("-").replace("-", "_")


class Verb:
    """One row of the verb table: `cnikit PATH...` calls FUNC(r, **arguments).

    ARGS: its Args; HELP: one line; EXAMPLES: command lines (a `# why` after one is kept);
    DESCRIPTION: a paragraph for an object without verbs; TOOLS: what must be installed
    for it to change anything; READ_ONLY: it only looks (no root needed); NS: the
    parameter that receives -n/--in (None: the verb refuses it); FIXED: keyword arguments
    of its own; CHECK(args): a check of the parsed options before anything runs;
    RETURNS_CODE: what FUNC returns is the exit code (an int; anything else is 0);
    RUNNER: FUNC takes a Runner first; OPTIONS: the common options are accepted after it."""
    __slots__ = ("path", "func", "help", "args", "examples", "description", "tools", "read_only", "ns", "fixed",
                 "check", "returns_code", "runner", "options")

    def __init__(self, path, func, help, args=(), examples=(), description=None, tools=("ip",), read_only=False,
                 ns="ns", fixed=None, check=None, returns_code=False, runner=True, options=True):
        self.path, self.func, self.help, self.args, self.examples = tuple(path.split()), func, help, args, examples
        self.description, self.tools, self.read_only, self.ns = description, tools, read_only, ns
        self.fixed, self.check, self.returns_code = fixed or {}, check, returns_code
        self.runner, self.options = runner, options


def _after_dashes(cmd):
    """`-- CMD...` -> CMD: the `--` only ends cnikit's options."""
    return cmd[1:] if cmd[:1] == ["--"] else cmd


def cni_call(r, command, netns=None, conf=None, ifname=CNI_VERB_DEFAULTS["ifname"], cid=None,
             conf_dir=CNI_CONF_DIR, cni_path=CNI_PATH, cni_args=None, runtime_config=None, ns=None):
    """`cnikit cni add|del|check|status|gc|version`: COMMAND (cni_add...) on one attachment,
    or on the network, called as libcni calls the plugin."""
    call = CniCall(netns=netns, conf=conf, ifname=ifname, cid=cid, conf_dir=conf_dir, cni_path=cni_path,
                   args=cni_args, runtime_config=cni_runtime_config(runtime_config), ns=ns,
                   net=cni_planned_conf(r, conf, conf_dir))
    return command(r, call)


def cni_install_cli(r, name=CNI_NET, subnet=None, plugin_dir=CNI_PLUGIN_DIR, conf_dir=CNI_CONF_DIR, chain=(),
                    plugin_src=None, ptype=CNI_TYPE, cni_version=None, python=None, plain=False, precompiled=False,
                    kind=None):
    """`cnikit cni install`: here, or into every node of kind cluster KIND."""
    if not kind:
        return cni_install(r, name=name, subnet=subnet, plugin_dir=plugin_dir, conf_dir=conf_dir, chain=tuple(chain),
                           plugin_src=plugin_src, ptype=ptype, version=cni_version, python=python, plain=plain,
                           precompiled=precompiled)
    ignored = [opt for opt, given in (("--subnet", subnet), ("--cni-version", cni_version),
                                      ("--precompiled", precompiled), ("--python", python)) if given]
    if ignored:
        raise UsageError(f"{', '.join(ignored)} does not apply with --kind (each node's subnet is its "
                         "podCIDR; the nodes get cniVersion 1.0.0 and the plugin compiled by their "
                         "/usr/bin/python3 unless --plain)")
    return kind_install(r, kind, name=name, plugin_src=plugin_src, ptype=ptype, chain=tuple(chain) or ("portmap",),
                        plugin_dir=plugin_dir, conf_dir=conf_dir, plain=plain)


def cni_uninstall_cli(r, name=CNI_NET, plugin_dir=CNI_PLUGIN_DIR, conf_dir=CNI_CONF_DIR, kind=None):
    """`cnikit cni uninstall`: here, or from every node of kind cluster KIND."""
    if kind:
        return kind_uninstall(r, kind, name=name, plugin_dir=plugin_dir, conf_dir=conf_dir)
    return cni_uninstall(r, name=name, plugin_dir=plugin_dir, conf_dir=conf_dir)


def _cni_attachment_args(verb):
    """The arguments of `cni VERB` (add, del, ...): only those of an attachment it reads, so its
    --help lists exactly what it accepts (main names the rest as not applying)."""
    reads = CNI_VERB_READS[verb]
    args = [Arg("netns", metavar="NETNS", help=f"a name in {NETNS_DIR} or a path such as /proc/PID/ns/net")] \
        if "netns" in reads else []
    args.append(Arg("--conf", help="network config (default: the first in --conf-dir)"))
    args.append(Arg("--conf-dir", default=CNI_CONF_DIR))
    if "ifname" in reads:
        args.append(Arg("--ifname", default=CNI_VERB_DEFAULTS["ifname"]))
    if "cid" in reads:
        args.append(Arg("--id", dest="cid", help="container id (default: the netns name)"))
    args.append(Arg("--cni-path", default=CNI_PATH, help=f"where plugins are looked up (default {CNI_PATH})"))
    if "cni_args" in reads:
        args.append(Arg("--args", dest="cni_args", metavar="K=V;...", help="extra CNI_ARGS (IgnoreUnknown=1 is always sent)"))
    if "runtime_config" in reads:
        args.append(Arg("--runtime-config", metavar="JSON", help="capability args, e.g. '{\"portMappings\": [...]}'"))
    return args


def _cni_verb(verb, command, help_text, examples=()):
    return Verb(f"cni {verb}", cni_call, help_text, _cni_attachment_args(verb), examples, fixed={"command": command},
                check=cni_check_options, read_only=verb == "version")


# What an object with verbs is, in `cnikit --help` (its verbs are listed after it from VERBS).
GROUP_HELP = {("netns",): "network namespaces", ("veth",): "veth pairs", ("bridge",): "Linux bridges",
              ("route",): "routes cnikit makes (proto 157)",
              ("nat",): "egress NAT and published ports", ("vxlan",): "VXLAN overlay",
              ("vxlan", "fdb"): "forwarding entries (fdb add NAME MAC --dst IP)",
              ("cni",): "play the container runtime: install the plugin, call it like libcni"}
NAT_TOOLS, L2_TOOLS = ("ip", "iptables", "sysctl"), ("ip", "bridge")
NAME = Arg("name")
PORT_PROTO = Arg("--proto", default="tcp", choices=PORT_PROTOS)

VERBS = [
    Verb("netns add", netns_add, "create a namespace (tagged as cnikit's)",
         [NAME, Arg("--lo-up", action="store_true", help="also bring lo up inside")],
         ["cnikit netns add ns1 --lo-up            # a namespace, tagged as cnikit's, lo up"], ns=None),
    Verb("netns del", netns_del, "delete a namespace", [NAME], ["cnikit netns del ns1"], ns=None),
    Verb("netns list", netns_list, "list namespaces", examples=["cnikit netns list"], read_only=True, ns=None),
    Verb("netns lo", netns_lo_up, "bring lo up inside a namespace", [NAME], ["cnikit netns lo ns1"], ns=None),
    Verb("netns exec", netns_exec, "run a command inside: netns exec NAME -- CMD...",
         [NAME, Arg("cmd", nargs="...", post=_after_dashes)],
         ["cnikit netns exec ns1 -- ip addr        # any command inside it"], ns=None, returns_code=True),

    Verb("veth add", veth_add, "create a veth pair, optionally moving the peer into a namespace",
         [NAME, Arg("peer"), Arg("--netns", help="move the peer into this namespace"),
          Arg("--addr", help="address for NAME, e.g. 10.0.0.1/24"),
          Arg("--peer-addr", help="address for PEER, e.g. 10.0.0.2/24"), Arg("--mtu", help="MTU for both ends")],
         ["cnikit veth add veth-ns1 eth0 --netns ns1 --addr 10.0.0.1/24 --peer-addr 10.0.0.2/24",
          "cnikit -n node1 veth add eth0 eth0 --netns node2   # both ends inside namespaces (hosts)"]),
    Verb("veth del", veth_del, "delete a veth pair", [NAME],
         ["cnikit veth del veth-ns1                # its peer goes with it"]),

    Verb("bridge add", bridge_add, "create a bridge",
         [NAME, Arg("--addr", help="gateway address on the bridge, e.g. 10.0.0.1/24"), Arg("--mtu")],
         ["cnikit bridge add br0 --addr 10.0.0.1/24   # the address goes on the bridge, never on a port"],
         tools=L2_TOOLS),
    Verb("bridge attach", bridge_attach, "make interfaces ports of the bridge",
         [NAME, Arg("ifaces", nargs="+", metavar="IFACE")], ["cnikit bridge attach br0 veth-ns1 veth-ns2"],
         tools=L2_TOOLS),
    Verb("bridge del", bridge_del, "delete a bridge", [NAME], ["cnikit bridge del br0"], tools=L2_TOOLS),
    Verb("bridge show", bridge_show, "ports and learned MACs (fdb)", [NAME],
         ["cnikit bridge show br0                  # its ports and the MACs it learned on each"],
         tools=L2_TOOLS, read_only=True),

    Verb("route add", route_add, "add a route to DST via a gateway and/or out of a device, tagged proto 157",
         [Arg("dst", metavar="DST", help="a CIDR such as 10.1.0.0/24, or default"),
          Arg("--via", metavar="GW", help="the gateway's address"),
          Arg("--dev", metavar="DEV", help="the interface it leaves through")],
         ["cnikit -n ns1 route add default --via 10.0.0.1   # a route cleanup will find",
          "cnikit route add 10.1.0.0/24 --dev br0"], ns="ns"),
    Verb("route del", route_del, "delete a route cnikit made (proto 157); any other route is refused",
         [Arg("dst", metavar="DST", help="the CIDR (or default) that route add was given")],
         ["cnikit -n ns1 route del default"], ns="ns"),

    Verb("nat add", nat_add, "masquerade SUBNET leaving through --out",
         [Arg("subnet"), Arg("--out", dest="out_iface", required=True, metavar="IFACE", help="the uplink interface")],
         ["cnikit nat add 10.0.0.0/24 --out eth0   # MASQUERADE + two FORWARD accepts, ip_forward on"],
         tools=NAT_TOOLS),
    Verb("nat del", nat_del, "remove the rules nat add made", [Arg("subnet")], ["cnikit nat del 10.0.0.0/24"],
         tools=NAT_TOOLS),
    Verb("nat show", nat_show, "cnikit's iptables rules", examples=["cnikit nat show"], tools=NAT_TOOLS,
         read_only=True),
    Verb("nat publish", nat_publish, "publish PORT of this host to --to IP:PORT, as `docker run -p` does (DNAT)",
         [Arg("port"), Arg("--to", required=True, metavar="IP:PORT", help="the container's address and port"),
          Arg("--bridge", required=True, metavar="BR", help="the bridge it is on"), PORT_PROTO],
         ["cnikit nat publish 8080 --to 10.0.0.2:80 --bridge br0   # docker run -p 8080:80, its iptables rules"],
         tools=NAT_TOOLS),
    Verb("nat unpublish", nat_unpublish, "remove the rules nat publish made for PORT", [Arg("port"), PORT_PROTO],
         ["cnikit nat unpublish 8080"], tools=NAT_TOOLS),

    Verb("vxlan add", vxlan_add, "create a VXLAN device",
         [NAME, Arg("--id", required=True, dest="vni", metavar="VNI", help="VXLAN network id, 1-16777215"),
          Arg("--remote", help="unicast underlay address of the peer host"),
          Arg("--group", help="multicast group (needs --dev)"), Arg("--local", help="source underlay address"),
          Arg("--dev", help="underlay interface"),
          Arg("--dstport", default=VXLAN_PORT, help=f"UDP port (default {VXLAN_PORT})"),
          Arg("--bridge", dest="bridge_name", metavar="BR", help="attach to this bridge"),
          Arg("--mtu", help=f"default: the underlay's MTU minus {VXLAN_OVERHEAD}")],
         ["cnikit -n node1 vxlan add vxlan0 --id 42 --remote 192.0.2.2 --dev eth0 --bridge br0",
          "cnikit -n node1 vxlan add vxlan0 --id 1 --local 192.0.2.1 --dev eth0   # peers from fdb entries:"],
         tools=L2_TOOLS),
    Verb("vxlan fdb add", vxlan_fdb_add, "send frames for MAC to underlay address --dst",
         [NAME, Arg("mac"), Arg("--dst", required=True)],
         ["cnikit -n node1 vxlan fdb add vxlan0 00:00:00:00:00:00 --dst 192.0.2.2  # flood to a peer"],
         tools=L2_TOOLS),
    Verb("vxlan del", vxlan_del, "delete a VXLAN device", [NAME], ["cnikit -n node1 vxlan del vxlan0"],
         tools=L2_TOOLS),

    Verb("cni install", cni_install_cli, "copy the plugin to --plugin-dir and write a .conflist (atomically)",
         [Arg("--name", default=CNI_NET, help=f"network name (default {CNI_NET})"),
          Arg("--subnet", help="pod subnet for the plugin's IPAM (default: the plugin's own choice)"),
          Arg("--plugin-dir", default=CNI_PLUGIN_DIR), Arg("--conf-dir", default=CNI_CONF_DIR),
          Arg("--chain", action="append", default=[], choices=sorted(CNI_CHAINABLE),
              help="append a reference plugin after ours (repeatable)"),
          Arg("--plugin", dest="plugin_src", metavar="FILE", help="plugin to install (default: ours)"),
          Arg("--type", dest="ptype", default=CNI_TYPE, help=f"the plugin's type, its file name (default {CNI_TYPE})"),
          Arg("--cni-version", help=f"cniVersion of the conflist (default {CNI_VERSION}; 1.1.0 adds STATUS and GC)"),
          Arg("--python", help=f"the plugin's interpreter (default {CNI_PYTHON} {CNI_PYTHON_FLAGS}; "
              "'keep' keeps its own first line)"),
          Arg("--plain", action="store_true",
              help="install the readable plugin file itself (a drop-in; ~15 ms slower per call: Python "
              "compiles a script on every run) instead of the default compiled form"),
          Arg("--precompiled", action="store_true",
              help="the default now (one file carrying the plugin's bytecode); kept for old scripts"),
          Arg("--kind", metavar="CLUSTER", help="install into every node of this kind cluster instead")],
         ["cnikit cni install --subnet 10.244.1.0/24 --chain portmap   # plugin + conflist, atomically"],
         ns=None, check=cni_check_options),
    Verb("cni uninstall", cni_uninstall_cli, "remove exactly what install wrote",
         [Arg("--name", default=CNI_NET), Arg("--plugin-dir", default=CNI_PLUGIN_DIR),
          Arg("--conf-dir", default=CNI_CONF_DIR),
          Arg("--kind", metavar="CLUSTER", help="from every node of this kind cluster: plugin, conflist, "
              "subnet file and the routes between nodes (what install --kind wrote)")],
         ["cnikit cni uninstall"], ns=None, check=cni_check_options),
    _cni_verb("add", cni_add, "ADD a netns to the network, each plugin of the chain in order",
              ["cnikit netns add pod1 --lo-up && cnikit cni add pod1         # be the container runtime"]),
    _cni_verb("del", cni_del, "DEL it: the chain in reverse, with the cached result as prevResult",
              ["cnikit cni check pod1 && cnikit cni del pod1"]),
    _cni_verb("check", cni_check, "CHECK it against the cached result"),
    _cni_verb("status", cni_status, "STATUS: is the network ready (cniVersion 1.1.0)"),
    _cni_verb("gc", cni_gc, "GC: release all but the cached attachments (cniVersion 1.1.0)"),
    _cni_verb("version", cni_version, "VERSION: which spec versions each plugin speaks"),
    Verb("cni log", cni_log, "follow the plugin's log",
         [Arg("--conf", help="network config whose `log` key names the file"), Arg("--conf-dir", default=CNI_CONF_DIR),
          Arg("--lines", default=20, help="lines to show first (default 20)"),
          Arg("--no-follow", dest="follow", action="store_false", help="print and exit")],
         ["cnikit cni log --no-follow                                   # the plugin's own log"],
         ns=None, check=cni_check_options, read_only=True, returns_code=True),
    Verb("cni kind-install", kind_install, "install into every node of a kind cluster (docker cp/exec)",
         [Arg("cluster"), Arg("--name", default=CNI_NET), Arg("--plugin", dest="plugin_src", metavar="FILE"),
          Arg("--plain", action="store_true", help="install the readable plugin file itself instead of the "
              "default compiled form (built in each node by the node's python3)")],
         ns=None, check=cni_check_options),

    Verb("doctor", doctor, "walk the path FROM -> TO and name its first broken hop (read-only)",
         [Arg("frm", metavar="FROM", help=f"a namespace, '{HOST_NAME}' (where cnikit runs, or -n NS), or an "
              "address of one (the packets' source)"),
          Arg("to", metavar="TO", help=f"an IPv4 or IPv6 address, a namespace, or '{HOST_NAME}'"),
          Arg("-4", dest="family", action="store_const", const=4, group="family",
              help="walk IPv4 (the default when FROM and TO are names)"),
          Arg("-6", dest="family", action="store_const", const=6, group="family",
              help="walk IPv6, to TO's global IPv6 address (an address decides by itself)"),
          Arg("--proto", choices=DOCTOR_PROTOS, help="the flow's protocol (default icmp; tcp with --port)"),
          Arg("--port", help="the flow's destination port (tcp/udp): DNAT and conntrack are per port"),
          Arg("--json", dest="as_json", action="store_true", help="print the report as JSON")],
         ["cnikit doctor ns1 10.0.0.2 --proto tcp --port 80   # which hop drops ns1's connection",
          "cnikit -n node1 doctor pod1 host"],
         description="Walk the path the kernel would use from FROM to TO, hop by hop (routes, links, bridge "
         "ports, vxlan, neighbours, forwarding, rp_filter, iptables FORWARD/INPUT, NAT, MTU, conntrack) and "
         "print the first broken hop, the command that shows it and the command that would fix it; IPv4 or "
         "IPv6 (ip -6, NDP, net.ipv6 sysctls, ip6tables). It changes nothing. Exit 0 healthy, 1 broken, 2 bad "
         "input.", read_only=True, returns_code=True),
    Verb("show", show, "a picture of namespaces, links, addresses, routes, NAT",
         [Arg("--json", dest="as_json", action="store_true", help="print data instead of a picture")],
         ["cnikit show                             # every namespace: links, addresses, routes, NAT",
          "cnikit -n node1 show                    # only inside node1", "cnikit show --json"],
         description="A picture of what exists now: each namespace with its links (veth peers, bridge ports), "
         "addresses, routes and cnikit's NAT rules. Looks only; changes nothing.", read_only=True, ns="only"),
    Verb("cleanup", cleanup, "remove exactly what cnikit created", (),
         ["cnikit cleanup                          # everything cnikit made, here and in its namespaces",
          "cnikit cleanup --dry-run                # what it would remove, nothing removed",
          "cnikit -n node1 cleanup                 # only what cnikit made inside node1"],
         description="Remove exactly what cnikit created: links and namespaces tagged with the ifalias "
         "`cnikit`, iptables rules whose comment starts with `cnikit`, routes with protocol 157. Nothing else "
         "is touched. With -n NS: only inside NS (the namespace itself stays)."),
    Verb("sandbox", sandbox, "run a shell or CMD in a throwaway network + mount namespace",
         [Arg("cmd", nargs="...", post=_after_dashes, help="-- CMD... (default: an interactive shell)")],
         ["cnikit sandbox                          # a throwaway shell",
          "cnikit sandbox -- python3 stages/03_bridge.py",
          "cnikit --sandbox show                   # one cnikit command in a throwaway sandbox"],
         description="Run a shell, or CMD, in a fresh network namespace and a private mount namespace (empty "
         "/run/netns and CNI directories): whatever is built there vanishes when it exits, and the host's "
         "network is never touched.", ns=None, returns_code=True, runner=False, options=False),
]


def tools():
    """Every tool some verb needs, in table order (`doctor`'s look-ups, the runtime's plugins aside)."""
    return list(dict.fromkeys(tool for row in VERBS for tool in row.tools))


def _children(prefix):
    """The words that may follow PREFIX, in table order: {word: its Verb, or None for a group}."""
    n, out = len(prefix), {}
    for row in VERBS:
        if row.path[:n] == prefix and len(row.path) > n and row.path[n] not in out:
            out[row.path[n]] = row if len(row.path) == n + 1 else None
    return out


# The common options as they can appear before OBJECT, spelled out (abbreviations, -qv and
# the like are left to the whole parser).
_FLAGS = ("--dry-run", "-q", "--quiet", "-v", "--verbose", "--sandbox")
_VALUED = ("-n", "--in", "--color")
_HELP = ("-h", "--help")


def _command_words(argv):
    """(WORDS, SHALLOW, AT): the OBJECT [VERB...] words of ARGV that name a group or a verb
    of the table, found without a parser, and where they start; SHALLOW: what follows the
    last of them is nothing or --help, so the parsers under it need no arguments. (None,
    False, AT) when an option before OBJECT is not spelled as _FLAGS/_VALUED: then the
    whole parser decides."""
    i = 0
    while i < len(argv):
        word = argv[i]
        if word in _FLAGS or word.startswith(("--in=", "--color=")) or (word.startswith("-n") and len(word) > 2):
            i += 1
        elif word in _VALUED:
            i += 2
        elif word in _HELP:
            return (), True, i
        elif word.startswith("-"):
            return None, False, i
        else:
            break
    words, at = (), i
    while i < len(argv) and argv[i] in _children(words):
        words += (argv[i],)
        i += 1
    return words, i == len(argv) or argv[i] in _HELP, at


class _Args:
    """A parsed command line, as argparse's Namespace reads (attributes)."""

    def __init__(self, **values):
        self.__dict__.update(values)


_SIMPLE_ACTIONS = (None, "store_true", "store_false", "store_const", "append")


def _parse_simple(argv):
    """ARGV parsed without argparse when it is plainly spelled: a verb of the table, its
    positionals (no nargs) and options (exact names, valid choices), the common options;
    None for anything else (--help, abbreviations, a missing or doubtful value...), which
    the whole parser reads. What it returns is what argparse would: tests check both agree."""
    words, _, at_verb = _command_words(argv)
    row = _children(words[:-1]).get(words[-1]) if words else None
    if row is None or any(arg.kw.get("nargs") or arg.kw.get("action") not in _SIMPLE_ACTIONS for arg in row.args):
        return None
    values = {"ns": None, "dry_run": False, "quiet": False, "verbose": False, "sandbox": False, "color": "auto",
              "row": row}
    values.update(zip(("obj", "verb", f"{words[1]}_verb" if len(words) > 2 else ""), words))
    values.pop("", None)
    options, positionals = {}, [arg for arg in row.args if not arg.flags[0].startswith("-")]
    for arg in row.args:
        action = arg.kw.get("action")
        values[arg.dest] = arg.kw.get("default", {"store_true": False, "store_false": True}.get(action))
        options.update(dict.fromkeys(arg.flags, arg) if arg.flags[0].startswith("-") else {})
    common = {"-n": "ns", "--in": "ns", "--color": "color", "--dry-run": "dry_run", "-q": "quiet",
              "--quiet": "quiet", "-v": "verbose", "--verbose": "verbose", "--sandbox": "sandbox"}
    given, tokens = set(), list(argv)
    i, taken = 0, 0
    while i < len(tokens):
        word = tokens[i]
        if at_verb <= i < at_verb + len(words):
            i += 1
            continue
        flag, eq, value = word.partition("=") if word.startswith("--") else (word, "", "")
        if word.startswith("-n="):
            return None                 # argparse reads -n=X as X: leave it to it
        if word.startswith("-n") and len(word) > 2 and not word.startswith("--"):
            flag, eq, value = "-n", "=", word[2:]
        if not word.startswith("-"):
            if i < at_verb or taken == len(positionals):
                return None
            values[positionals[taken].dest] = word
            taken += 1
        elif flag in common and (i < at_verb or row.options):
            dest = common[flag]
            if dest in ("ns", "color"):
                if not eq:
                    i += 1
                    value = tokens[i] if i < len(tokens) else "-"
                if value.startswith("-") or dest == "color" and value not in ("auto", "always", "never"):
                    return None
                values[dest] = value
            elif eq:
                return None
            else:
                values[dest] = True
        elif flag in options and i > at_verb:
            arg = options[flag]
            action = arg.kw.get("action")
            if action in ("store_true", "store_false", "store_const"):
                if eq:
                    return None
                value = {"store_true": True, "store_false": False}.get(action, arg.kw.get("const"))
            elif not eq:
                i += 1
                value = tokens[i] if i < len(tokens) else "-"
            if action not in ("store_true", "store_false", "store_const") and (
                    value.startswith("-") or "choices" in arg.kw and value not in arg.kw["choices"]):
                return None
            if arg.group and any(a.group == arg.group and a is not arg for a in given):
                return None
            given.add(arg)
            values[arg.dest] = values[arg.dest] + [value] if action == "append" else value
        else:
            return None
        i += 1
    if taken < len(positionals) or any(a.kw.get("required") and a not in given for a in row.args):
        return None
    return _Args(**values)


def _parser_class():
    """argparse's parser, but a usage error is one line, not a usage dump (a class made on
    first use: argparse is imported only when a parser is built)."""
    class _Parser(argparse.ArgumentParser):
        def error(self, message):
            raise UsageError(f"{message} (see: {self.prog} --help)")
    return _Parser


def _common_options(p, top=True):
    """The options every command takes; TOP: the main parser's defaults. A subcommand
    repeats them without defaults, so `cnikit cleanup --dry-run` and `cnikit --dry-run
    cleanup` say the same."""
    d = {} if top else {"default": argparse.SUPPRESS}
    p.add_argument("-n", "--in", dest="ns", metavar="NS",
                   help="act inside namespace NS, standing for a host (like `ip -n NS`)", **d)
    p.add_argument("--dry-run", action="store_true", help="print the commands this host needs (it only reads); run nothing", **d)
    p.add_argument("-q", "--quiet", action="store_true", help="do not echo commands", **d)
    p.add_argument("-v", "--verbose", action="store_true", help="also echo read-only look-ups", **d)
    p.add_argument("--sandbox", action="store_true", help="run this one command in a throwaway sandbox", **d)
    p.add_argument("--color", choices=("auto", "always", "never"), **(d or {"default": "auto"}))


def _examples(prefix):
    """`examples:` and the example lines of every verb under PREFIX, for an epilog."""
    lines = [line for row in VERBS if row.path[:len(prefix)] == prefix for line in row.examples]
    return "examples:\n" + "\n".join("  " + line for line in lines) if lines else None


def _group_help(prefix):
    return f"{GROUP_HELP[prefix]}: {', '.join(_children(prefix))}"


def _add_level(parser, prefix, words, shallow):
    """The subparsers under PREFIX: only WORDS' next one when it names one; else all of them,
    without their own arguments when SHALLOW (only --help or nothing follows), with
    everything under them otherwise (argparse then says what is wrong)."""
    level = parser.add_subparsers(dest=("obj", "verb")[len(prefix)] if len(prefix) < 2 else f"{prefix[1]}_verb",
                                  metavar="OBJECT" if not prefix else "VERB")
    level.required = True
    chosen = words[len(prefix)] if words is not None and len(words) > len(prefix) else None
    for word, row in _children(prefix).items():
        if chosen and word != chosen:
            continue
        path = prefix + (word,)
        help_text = row.help if row else _group_help(path)
        description = textwrap.fill(row.description, 80) if row and row.description else help_text
        sub = level.add_parser(word, help=help_text, description=description, epilog=_examples(path),
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        if not chosen and shallow:
            continue
        below = words if chosen else None
        if row is None:
            _add_level(sub, path, below, shallow)
        else:
            _add_verb(sub, row)


def _add_verb(p, row):
    """ROW's arguments, then the common options (unless everything after it is its own)."""
    groups = {}
    for arg in row.args:
        if arg.group and arg.group not in groups:
            groups[arg.group] = p.add_mutually_exclusive_group()
        groups.get(arg.group, p).add_argument(*arg.flags, **arg.kw)
    if row.options:
        _common_options(p, top=False)
    p.set_defaults(row=row)


def build_parser(argv=None):
    """The parser for ARGV: only the parsers on the path of the command it names (every
    parser when ARGV is None, or when it cannot be read without a parser)."""
    words, shallow, _ = _command_words(argv) if argv is not None else (None, False, 0)
    p = _parser_class()(prog="cnikit", description=__doc__.split("\n\n")[1].replace("\n", " "), epilog=EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    _common_options(p)
    _add_level(p, (), words, shallow)
    return p


def _leaf_parsers(p):
    """Every parser that ends a command line (a verb, or an object without verbs)."""
    subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield p
    for action in subs:
        for sub in dict.fromkeys(action.choices.values()):
            yield from _leaf_parsers(sub)


def verb_kwargs(row, args):
    """The keyword arguments ROW's function gets from the parsed ARGS."""
    kwargs = dict(row.fixed)
    for arg in row.args:
        value = getattr(args, arg.dest)
        kwargs[arg.dest] = arg.post(value) if arg.post else value
    if row.ns:
        kwargs[row.ns] = args.ns
    return kwargs


def dispatch(args, r):
    """Call the function the parsed command's row names, by keyword; returns an exit code."""
    row = args.row
    if row.check:
        row.check(args)
    out = row.func(r, **verb_kwargs(row, args))
    return out if row.returns_code and isinstance(out, int) else EXIT_OK


def _refuse_extra(parser, args, extra):
    """What no parser took: for a cni verb that does not read it, say why; else argparse's words."""
    if args.obj == "cni" and getattr(args, "verb", None) in CNI_VERB_WHY_NOT:
        word = extra[0].split("=", 1)[0]
        flags = {flag: dest for dest, flag in CNI_FLAGS.items()}
        if word.startswith("-") and flags.get(word, word[2:].replace("-", "_")) in CNI_ATTACHMENT_OPTIONS \
                or not word.startswith("-"):
            what = word if word.startswith("-") else "NETNS"
            raise UsageError(f"cni {args.verb}: {what} does not apply ({CNI_VERB_WHY_NOT[args.verb]})")
    parser.error(f"unrecognized arguments: {' '.join(extra)}")


def main(argv=None):
    if sys.version_info < PYTHON_MIN:
        print(f"cnikit: error: needs Python {'.'.join(map(str, PYTHON_MIN))} or newer; "
              f"{sys.executable or 'python3'} is {'.'.join(map(str, sys.version_info[:3]))}", file=sys.stderr)
        return EXIT_USAGE
    r = None
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        args = _parse_simple(argv)      # the common case, without argparse's import and parsers
        if args is None:
            parser = build_parser(argv)
            args, extra = parser.parse_known_args(argv)
            if extra:
                _refuse_extra(parser, args, extra)
        row = args.row
        if args.ns:
            check_netns(args.ns)
        if args.ns and not row.ns:
            takes = dict.fromkeys(v.path[0] for v in VERBS if v.ns)
            raise UsageError(f"-n/--in does not apply to {' '.join(row.path)}"
                             + (": namespace names are global (/run/netns)" if row.path[0] == "netns" else "")
                             + f"; use it with {', '.join(takes)}")
        if not row.runner:
            return row.func(quiet=args.quiet, **verb_kwargs(row, args))
        json_out = getattr(args, "as_json", False)
        color = {"always": True, "never": False}.get(args.color)
        r = Runner(dry_run=args.dry_run, quiet=args.quiet, verbose=args.verbose,
                   out=sys.stderr if json_out else sys.stdout, color=color, plan_for="this host")
        if not args.dry_run and os.geteuid() != 0 and not row.read_only:
            # Validate first, then show what would run: the user learns either way.
            print("cnikit: root is needed to change the kernel (try sudo); this is what would run:",
                  file=sys.stderr)
            r.dry_run = True
            dispatch(args, r)
            return EXIT_USAGE
        if not args.dry_run:
            require_tools(*row.tools)
        if args.sandbox:
            enter_sandbox()
            r.note("in a throwaway sandbox: nothing below survives this command")
        return dispatch(args, r)
    except CnikitError as e:
        if r is not None:
            r.rollback()
        print(f"cnikit: error: {e}", file=sys.stderr)
        return e.code
    except OSError as e:
        # A disk or system error cnikit did not foresee: still one line, and undone.
        if r is not None:
            r.rollback()
        where = f" ({e.filename})" if e.filename else ""
        print(f"cnikit: error: {e.strerror or e}{where}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        if r is not None:
            r.rollback()
        print("cnikit: interrupted", file=sys.stderr)
        return 130


def main_exit():
    """Console-script entry point (`pip install .` puts `cnikit` on PATH)."""
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # `cnikit show | head -1`: the reader left; say nothing more, like other tools.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = EXIT_FAILED
    try:
        sys.stderr.flush()
    except OSError:
        pass
    # Out without the interpreter's teardown (freeing every module and object one by one:
    # ~4 ms of a ~25 ms start, see bench/cli_start.py): the output is flushed, the runner
    # waited for every command, and nothing else is left to close.
    os._exit(code if isinstance(code, int) else EXIT_FAILED if code else EXIT_OK)


if __name__ == "__main__":
    main_exit()
