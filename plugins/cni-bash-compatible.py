#!/usr/bin/env python3
"""cni-bash-compatible: a spec-conformant CNI bridge plugin with host-local style IPAM.

A drop-in replacement for the classic "CNI from scratch" bash plugin: the same
minimal config works ({"cniVersion":"1.0.0","name":"fromScratch","type":"demystifying"})
and every call is logged the same way (command, CNI_* env, stdin, then what it did).
Python 3.8+ standard library only (an older one gets error 50); needs iproute2-free Linux
(it talks netlink itself) and iptables only when ipMasq or forwardAccept is on.  It never
imports cnikit.py.

Verbs: VERSION, ADD, DEL, CHECK (>= 0.4.0), STATUS and GC (>= 1.1.0).
Config versions: 0.3.0 0.3.1 0.4.0 1.0.0 1.1.0; results are printed in the config's version.

Config keys (defaults in brackets; the classic minimal config gets all defaults):
  mode [bridge]            "bridge": pods share a bridge (one layer-2 segment, the gateway on the
                           bridge); "routed": no bridge, point-to-point as the reference ptp plugin
                           lays it out: the pod gets <ip>/32 and `default via <gateway>`, the host
                           end of its veth holds the gateway as /32 and the host routes <ip>/32 to it
  bridge [cni0]            created when missing (bridge mode only)
  isGateway [true]         gateway address on the bridge, ip_forward on
  isDefaultGateway [true]  default route in the pod via the gateway (implies isGateway)
  ipMasq [true]            masquerade pod traffic leaving the subnet (own nat chain
                           CNIKIT-<hash> per attachment, rules commented
                           "cnikit name: <net> id: <container> if: <ifname>")
  nonMasqueradeCIDRs [[]]  destinations never masqueraded besides the pod's own subnet, e.g.
                           the whole cluster pod range (Kubernetes: no NAT between pods; as
                           kindnet and ip-masq-agent do); forwardAccept lets connections from them in
  forwardAccept [true]     accept the pod's forwarded traffic in its own filter chain (same name,
                           same comment), so a host whose FORWARD policy is DROP (Docker) passes it
  mtu [kernel default]     on the bridge and both ends of the veth
  hairpinMode [false]      a pod may reach itself through a service address
  promiscMode [false]      the bridge promiscuous (not with hairpinMode)
  portIsolation [false]    the pod's bridge port isolated: it reaches the gateway, not isolated peers
  vlan [0]                 1-4094: vlan_filtering on a new bridge, the pod's port untagged in the VLAN
                           (pvid); with isGateway the gateway goes on a link <bridge>.<vlan>
  vlanTrunk [none]         [{"minID", "maxID"} or {"id"}]: VLANs tagged on the port
  preserveDefaultVlan [false]  keep the bridge's default VLAN on a port with vlan or vlanTrunk
  macspoofchk [false]      drop what the pod sends with another source MAC (nft table
                           "bridge cnikit-<hash>", commented like the iptables rules; needs nft)
  ipMasqBackend [iptables] "nftables": ipMasq and forwardAccept as an nft table "inet cnikit-<hash>"
  enabledad [false]        a pod with IPv6 gets accept_dad 0 (no DAD); true: DAD runs and ADD waits (5 s)
  forceAddress [false]     the gateway replaces the bridge's other IPv4 (overlapping IPv6) addresses
  disableContainerInterface  true is refused (7): the reference allows it only without IPAM
  dns                      passed through to the result
  log [/var/log/cni.log]   the call log; env CNIKIT_LOG overrides it; an unwritable log is ignored
  ipam.type                absent / "cnikit" / "builtin": the built-in allocator; the name of an
                           IPAM plugin found in CNI_PATH (e.g. "host-local"): ADD/DEL/CHECK are
                           delegated to it, like the reference bridge.  "host-local" not found in
                           CNI_PATH falls back to the built-in allocator (same on-disk format).
  ipam.subnet / ipam.ranges, rangeStart, rangeEnd, gateway, routes, dataDir
                           as host-local: gateway [first address] is never handed out, rangeStart
                           [first address], rangeEnd [last usable address], dataDir
                           [/var/lib/cni/networks]; routes [none, plus the default route].
Subnet precedence: ipam config > CNI_ARGS CNIKIT_SUBNET=<cidr> > node file
/run/cnikit/subnet.env (flannel-style line CNIKIT_SUBNET=10.244.1.0/24, written per node by
`cnikit cni kind-install`) > 10.244.0.0/24.

Runtime input: CNI_ARGS IP=<addr> (specific address), MAC=<mac>, IgnoreUnknown=1, K8S_POD_*;
runtimeConfig keys (ips, mac, dns) matched case-insensitively; args.cni.mac.  The bridge is
created with a MAC of its own, so it never takes its ports' (issue #18).  Where this differs
from the reference bridge: docs/plugin.md, "Where we differ from the reference, and why".

Allocations (host-local format, so either can take over the other's):
<dataDir>/<network>/<ip> holds "<container id>\\r\\n<ifname>"; last_reserved_ip.<n> remembers where
round-robin continues; <dataDir>/<network>/lock is flock'ed around every change.  Beside them,
.cnikit/attachments/<key> records what each attachment owns (addresses, veth, iptables chains),
so DEL reads one file instead of scanning (see Store and Record).

Host-side veth name: "veth" + 11 hex digits of sha256(container id / ifname): unique per
attachment and stable, so DEL finds it without the netns.

Error codes: 1 incompatible version, 2 unsupported field, 4 bad environment variable,
5 I/O failure, 6 decoding failure, 7 invalid network config, 11 try again later (no address
left), 50 plugin not available (STATUS; every verb on a Python older than MIN_PYTHON);
plugin-specific: 100 CHECK found a difference, 101 a kernel (netlink) operation failed, 102 an
external command failed, 103 the interface already exists in the container or the attachment
is already attached, 999 internal error (a bug, answered in CNI's terms instead of a traceback).

Installed by `cnikit cni install` as one file carrying its bytecode (`--compile`, see
compile_plugin); everything above the VERSION head's end is all a VERSION call loads.
"""
import posix  # os without its ~2 ms of imports (os.path, _collections_abc): see "files" below
import sys

MIN_PYTHON = (3, 8)  # compile_plugin needs code.replace(); 3.6 and 3.7 still parse this file: one line
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST = "1.1.0"
DEFAULT_BRIDGE = "cni0"
MODES = ("bridge", "routed")
DEFAULT_SUBNET = "10.244.0.0/24"
NODE_SUBNET_FILE = "/run/cnikit/subnet.env"
DEFAULT_DATA_DIR = "/var/lib/cni/networks"
DEFAULT_LOG = "/var/log/cni.log"
BUILTIN_IPAM = ("", "cnikit", "builtin")
CHAIN_PREFIX = "CNIKIT-"
SYSTEM_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
STDIN_LIMIT = 1 << 20  # a network config is a few KiB; refuse to buffer more than 1 MiB
MULTICAST = {2: "224.0.0.0/4", 10: "ff00::/8"}  # never masqueraded, like the reference bridge
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
KNOWN_ARGS = ("IGNOREUNKNOWN", "IP", "MAC", "CNIKIT_SUBNET", "K8S_POD_NAMESPACE", "K8S_POD_NAME",
              "K8S_POD_INFRA_CONTAINER_ID", "K8S_POD_UID")
MASQ_BACKENDS = ("iptables", "nftables")
NFT_FAMILIES = ("bridge", "inet")
NFT_PREFIX = "cnikit-"
DAD_WAIT = 5.0  # seconds enabledad waits for IPv6 duplicate address detection, as the reference does
PORT_WAIT = 2.5  # seconds ADD waits for the bridge to take the new port's carrier (the reference: 2.55)

# CNI error codes (spec) and ours (100+)
E_VERSION, E_FIELD, E_UNKNOWN_CONTAINER, E_ENV, E_IO, E_DECODE, E_CONFIG, E_TRY_LATER = 1, 2, 3, 4, 5, 6, 7, 11
E_NOT_AVAILABLE = 50  # STATUS: cannot serve ADD; also this interpreter being too old (python_too_old)
E_CHECK, E_KERNEL, E_COMMAND, E_EXISTS = 100, 101, 102, 103
E_INTERNAL = 999  # a bug in this plugin; libcni's Go types call the same code ErrInternal

AF_INET, AF_INET6, AF_BRIDGE, AF_NETLINK = 2, 10, 7, 16
CLONE_NEWNET = 0x40000000
NS_GET_NSTYPE = 0xB703


class CNIError(Exception):
    def __init__(self, code, msg, details=""):
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details


# ---------------------------------------------------------------- log

LOG = []


def log(line):
    LOG.append(line)


def write_log(path):
    """Append this call's record in one write; a log we cannot write never fails the plugin."""
    try:
        flags = posix.O_WRONLY | posix.O_APPEND | posix.O_CREAT | posix.O_CLOEXEC | posix.O_NONBLOCK | posix.O_NOCTTY
        fd = posix.open(path, flags, 0o640)
        try:
            posix.write(fd, ("\n".join(LOG) + "\n").encode("utf-8", "replace"))
        finally:
            posix.close(fd)
    except (OSError, ValueError):  # ValueError: a NUL in the path
        pass


# ---------------------------------------------------------------- JSON without the json package

def _refuse_constant(name):
    raise ValueError(f"{name} is not JSON")  # json accepts NaN and Infinity; CNI (Go) does not


def _json_codec():
    """The C scanner/encoder behind the json package, without its 10 ms of imports."""
    try:
        import _json

        class Ctx:
            strict, object_hook, object_pairs_hook, parse_float, parse_int = True, None, None, float, int
            parse_constant = staticmethod(_refuse_constant)
        scan = _json.make_scanner(Ctx())
        enc = _json.make_encoder(None, None, _json.encode_basestring_ascii, None, ": ", ", ", False, False, False)
        if "".join(enc({"a": [1, None, "\u00e9"]}, 0)) != '{"a": [1, null, "\\u00e9"]}':
            raise ValueError("unexpected encoder")

        def loads(text):
            try:
                obj, end = scan(text, len(text) - len(text.lstrip(" \t\n\r")))
                if text[end:].strip(" \t\n\r"):
                    raise ValueError("extra data")
                return obj
            except Exception:
                return slow_loads(text)  # the same answer, with json's error message

        return loads, lambda obj: "".join(enc(obj, 0))
    except Exception:  # an interpreter without _json (not CPython): the json package
        import json
        return slow_loads, json.dumps


def slow_loads(text):
    import json
    return json.loads(text, parse_constant=_refuse_constant)


json_loads, json_dumps = _json_codec()


# ---------------------------------------------------------------- the call, and VERSION

def read_stdin():
    chunks, size = [], 0
    try:
        while True:
            chunk = posix.read(0, 65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > STDIN_LIMIT:
                raise CNIError(E_DECODE, f"network config on stdin is larger than {STDIN_LIMIT} bytes")
    except OSError:
        pass
    return b"".join(chunks)


def decode_config(raw):
    try:
        conf = json_loads(raw.decode("utf-8"))
    except Exception as e:
        raise CNIError(E_DECODE, f"cannot decode the network config: {e}")
    if not isinstance(conf, dict):
        raise CNIError(E_DECODE, "the network config is not a JSON object")
    return conf


def version_tuple(text):
    """'1.0.0' -> (1, 0, 0); anything else -> None (versions compare as tuples, never as strings)."""
    parts = text.split(".") if isinstance(text, str) else ()
    if len(parts) != 3 or not all(p.isascii() and p.isdigit() for p in parts):
        return None
    return tuple(int(p) for p in parts)


def log_path(environ, conf):
    """Where a call's record goes: env CNIKIT_LOG, else the config's `log`, else DEFAULT_LOG.
    (cnikit's `cni log` asks this function, so both always name the same file.)"""
    if environ.get("CNIKIT_LOG"):
        return environ["CNIKIT_LOG"]
    return conf["log"] if isinstance(conf.get("log"), str) else DEFAULT_LOG


class Call:
    """One invocation, read once: CNI_COMMAND, the CNI_* environment, stdin and what it says.
    version is the one every answer is printed in: the config's when it is supported."""

    def __init__(self, environ):
        self.command = environ.get("CNI_COMMAND", "")
        self.env = {k: v for k, v in environ.items() if k.startswith("CNI_")}
        self.raw, self.conf, self.error = b"", {}, None
        self.version = LATEST
        self.log_path = log_path(environ, {})
        log(f"=== {self.command or '(no CNI_COMMAND)'} pid {posix.getpid()}")
        for key in sorted(self.env):
            log(f"  {key}={self.env[key]}")
        if not self.command:
            return  # nothing to do: do not wait for stdin a terminal may never close
        try:
            self.raw = read_stdin()
            log(f"  stdin: {self.raw.decode('utf-8', 'replace').strip()}")
            self.conf = decode_config(self.raw) if self.raw.strip() or self.command != "VERSION" else {}
        except CNIError as e:  # reported after the environment: an env error is the more useful one
            self.error = e
        if self.conf.get("cniVersion") in SUPPORTED_VERSIONS:
            self.version = self.conf["cniVersion"]
        self.log_path = log_path(environ, self.conf)


def cmd_version(call):
    if call.error:
        raise call.error
    asked = call.conf.get("cniVersion")
    return {"cniVersion": asked if asked in SUPPORTED_VERSIONS else LATEST, "supportedVersions": list(SUPPORTED_VERSIONS)}


def answer(call, verb):
    """Run VERB(call); print its result or its error JSON (stdout carries nothing else), write
    the log record, return the exit code.  A bug still answers in CNI's terms, never a traceback."""
    code, out = 0, ""
    try:
        result = verb(call)
        out = json_dumps(result) if result is not None else ""
        log(f"  result: {out or '(none)'}")
    except Exception as e:
        if not isinstance(e, CNIError):
            e = CNIError(E_IO if isinstance(e, OSError) else E_INTERNAL, f"internal error: {type(e).__name__}: {e}")
        out = json_dumps({"cniVersion": call.version, "code": e.code, "msg": e.msg, "details": str(e.details)})
        log(f"  error: {out}")
        code = 1
    write_log(call.log_path)
    if out:
        sys.stdout.write(out + "\n")
    sys.stdout.flush()
    return code


def environ():
    """The environment as str, read now (os.environ, where loaded, writes through to posix.environ)."""
    return {k.decode("utf-8", "surrogateescape"): v.decode("utf-8", "surrogateescape") for k, v in posix.environ.items()}


def getenv(name, default=""):
    value = posix.environ.get(name.encode())
    return default if value is None else value.decode("utf-8", "surrogateescape")


def leave(code):
    """Exit without the interpreter's teardown (a quarter of a bare python3's run: freeing every
    module and object one by one, for a process that is about to vanish).  All we wrote is
    flushed first; the log went out in one write; files and locks close with the process."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    posix._exit(code)


def python_too_old():
    """On a Python older than MIN_PYTHON: one line (--compile) or a CNI error, never a traceback."""
    need, have = ".".join(map(str, MIN_PYTHON)), ".".join(map(str, sys.version_info[:3]))
    msg = f"cni-bash-compatible needs Python {need} or newer; {sys.executable or 'python'} is {have}"
    if sys.argv[1:2] == ["--compile"]:
        sys.stderr.write(f"cannot compile: {msg}\n")
        return 1

    def refuse(call):
        raise CNIError(E_NOT_AVAILABLE, msg)
    return answer(Call(environ()), refuse)


if __name__ == "__main__" and sys.version_info < MIN_PYTHON:
    leave(python_too_old())
# Podman asks VERSION before every ADD and DEL: answer it before the rest of this file is even
# loaded (`cnikit cni install` compiles what is above this point and what is below it apart).
if __name__ == "__main__" and posix.environ.get(b"CNI_COMMAND") == b"VERSION":
    leave(answer(Call(environ()), cmd_version))
# ==== end of the VERSION head ====

import _socket  # noqa: E402  (the body's C modules: socket and struct without their pure-Python layers)
import _struct as struct  # noqa: E402  (struct.py only re-exports _struct, which is built in)
from errno import EADDRNOTAVAIL, EEXIST, EINVAL, ENODEV, ENOENT, ENOTDIR, EOPNOTSUPP  # noqa: E402  (errno is built in: free)


# ---------------------------------------------------------------- files: posix and these few helpers
# The os module costs ~2 ms to import (os.path, _collections_abc) on every call: the body calls
# posix directly, and these stand in for the few os.path and os functions it needs.

S_IFMT, S_IFDIR, S_IFREG = 0o170000, 0o040000, 0o100000


def join(path, *names):
    """os.path.join, for str."""
    for name in names:
        if name.startswith("/"):
            path = name
        elif not path or path.endswith("/"):
            path += name
        else:
            path += "/" + name
    return path


def file_type(path, follow=True):
    """The S_IFMT bits of PATH, or None when it is not there (or cannot be looked at)."""
    try:
        return (posix.stat(path) if follow else posix.lstat(path)).st_mode & S_IFMT
    except (OSError, ValueError):
        return None


def isdir(path):
    return file_type(path) == S_IFDIR


def exists(path):
    return file_type(path) is not None


def makedirs(path, mode=0o755):
    """os.makedirs(path, mode, exist_ok=True)."""
    try:
        posix.mkdir(path, mode)
    except FileNotFoundError:
        parent = path.rstrip("/").rpartition("/")[0]
        if not parent:
            raise
        makedirs(parent, mode)
        try:
            posix.mkdir(path, mode)  # once: a parent that refuses children (/proc) fails here
        except FileExistsError:
            if not isdir(path):
                raise
    except FileExistsError:
        if not isdir(path):
            raise


# ---------------------------------------------------------------- commands

def run(argv, stdin=None, env=None):
    """Every external command passes here: echoed to stderr and the log, one error type.
    Returns its stdout once it has exited."""
    return start(argv, stdin, env).wait()


def start(argv, stdin=None, env=None):
    """run, without waiting: the command works while we do (its Job.wait() says how it ended)."""
    line = "+ " + " ".join(argv)
    log(line)
    sys.stderr.write(line + "\n")
    try:
        if "subprocess" in sys.modules:  # already paid for (embedding, tests): use it
            pipe = sys.modules["subprocess"].PIPE
            return Job(argv, proc=sys.modules["subprocess"].Popen(argv, stdin=pipe, stdout=pipe, stderr=pipe, env=env),
                       stdin=stdin)
        return Job(argv, *spawn(argv, stdin, env))  # importing subprocess costs 14 ms of start-up
    except OSError as e:
        raise CNIError(E_COMMAND, f"cannot run {argv[0]}: {e.strerror}")


def spawn(argv, stdin, env):
    """Start argv with stdin, stdout and stderr in memory files: (pid, out fd, err fd).  No pipe
    can fill up and block it while we are busy elsewhere."""
    inp, out, err = (posix.memfd_create(name, posix.MFD_CLOEXEC) for name in ("stdin", "stdout", "stderr"))
    try:
        posix.write(inp, stdin or b"")
        posix.lseek(inp, 0, 0)
        pid = posix.posix_spawnp(argv[0], argv, env if env is not None else environ(), file_actions=[
            (posix.POSIX_SPAWN_DUP2, inp, 0), (posix.POSIX_SPAWN_DUP2, out, 1), (posix.POSIX_SPAWN_DUP2, err, 2)])
    except BaseException:
        for fd in (out, err):
            posix.close(fd)
        raise
    finally:
        posix.close(inp)
    return pid, out, err


class Job:
    """A command started by start(): wait() reaps it and returns its stdout, or raises
    CNIError with its stderr; a second wait() gives the same answer.  Every job is waited
    for: nothing we start outlives the call."""

    def __init__(self, argv, pid=None, out=None, err=None, proc=None, stdin=None):
        self.argv, self.pid, self.out, self.err, self.proc, self.stdin = argv, pid, out, err, proc, stdin
        self.ended = None  # (rc, stdout, stderr) once reaped

    def wait(self):
        if self.ended is None:
            rc, out, err = self.reap()
            out = out.decode("utf-8", "replace")
            err = err.decode("utf-8", "replace").strip() or out.strip()
            if rc != 0:
                log(f"  exit {rc}: {err}")
            self.ended = rc, out, err
        rc, out, err = self.ended
        if rc != 0:
            raise CNIError(E_COMMAND, f"{self.argv[0]} failed (exit {rc})", err)
        return out

    def reap(self):
        if self.proc is not None:
            try:
                out, err = self.proc.communicate(self.stdin)
            except OSError as e:
                raise CNIError(E_COMMAND, f"cannot run {self.argv[0]}: {e.strerror}")
            return self.proc.returncode, out or b"", err or b""
        try:
            status = posix.waitpid(self.pid, 0)[1]  # waitstatus_to_exitcode is 3.9+
            rc = posix.WEXITSTATUS(status) if posix.WIFEXITED(status) else -posix.WTERMSIG(status)
            return rc, read_all(self.out), read_all(self.err)
        finally:
            posix.close(self.out)
            posix.close(self.err)


def read_all(fd):
    posix.lseek(fd, 0, 0)
    chunks = []
    while True:
        chunk = posix.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def which(name, path=None):
    for d in (path if path is not None else getenv("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")).split(":"):
        p = join(d or ".", name)
        if file_type(p) == S_IFREG and posix.access(p, posix.X_OK):
            return p
    return None




# ---------------------------------------------------------------- addresses (no ipaddress module: 5 ms)

def parse_ip(text):
    """'10.0.0.1' -> (family, int); raises ValueError."""
    if not isinstance(text, str):
        raise ValueError(f"not an address: {text!r}")
    for family in (AF_INET, AF_INET6):
        try:
            return family, int.from_bytes(_socket.inet_pton(family, text), "big")
        except (OSError, ValueError):
            pass
    raise ValueError(f"not an address: {text!r}")


def fmt_ip(family, n):
    return _socket.inet_ntop(family, n.to_bytes(4 if family == AF_INET else 16, "big"))


def ip_bytes(family, n):
    return n.to_bytes(4 if family == AF_INET else 16, "big")


def bits(family):
    return 32 if family == AF_INET else 128


def parse_cidr(text):
    """'10.0.0.5/24' -> (family, address int, prefix)."""
    if not isinstance(text, str) or "/" not in text:
        raise ValueError(f"not a CIDR: {text!r}")
    addr, _, plen = text.partition("/")
    family, n = parse_ip(addr)
    if not (plen.isascii() and plen.isdigit()) or int(plen) > bits(family):  # isdigit() alone takes '２４'
        raise ValueError(f"not a CIDR: {text!r}")
    return family, n, int(plen)


def network_of(family, n, plen):
    host_bits = bits(family) - plen
    return (n >> host_bits) << host_bits


def in_subnet(family, n, subnet):
    sfam, snet, splen = subnet
    return family == sfam and network_of(family, n, splen) == snet


def fmt_cidr(family, n, plen):
    return f"{fmt_ip(family, n)}/{plen}"


# ---------------------------------------------------------------- netlink (rtnetlink through _socket)

NLMSG_ERROR, NLMSG_DONE = 2, 3
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK, RTM_SETLINK = 16, 17, 18, 19
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR, RTM_NEWROUTE, RTM_GETROUTE = 20, 21, 22, 24, 26
F_REQUEST, F_ACK, F_DUMP, F_REPLACE, F_EXCL, F_CREATE = 1, 4, 0x300, 0x100, 0x200, 0x400
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_MASTER, IFLA_PROTINFO = 1, 3, 4, 10, 12
IFLA_LINKINFO, IFLA_NET_NS_FD, IFLA_INFO_KIND, IFLA_INFO_DATA, VETH_INFO_PEER = 18, 28, 1, 2, 1
IFLA_AF_SPEC, IFLA_INET_CONF, IPV4_DEVCONF_ARP_NOTIFY = 26, 1, 22
IFLA_BR_VLAN_FILTERING, IFLA_BR_VLAN_DEFAULT_PVID = 7, 39  # in a bridge's IFLA_INFO_DATA
IFLA_BRPORT_STATE, IFLA_BRPORT_MODE, IFLA_BRPORT_ISOLATED = 1, 4, 33  # hairpin, isolated
IFLA_INFO_SLAVE_DATA, BR_STATE_DISABLED = 5, 0  # a port's IFLA_BRPORT_* in its IFLA_LINKINFO
RTMGRP_LINK = 1  # the multicast group of link announcements (RTM_NEWLINK, RTM_DELLINK)
SOL_SOCKET, SO_ATTACH_FILTER = 1, 26
BPF_LD_W_ABS, BPF_JEQ_K, BPF_RET_K = 0x20, 0x15, 0x06  # classic BPF: ld [k]; jeq #k; ret #k
IFLA_BRIDGE_VLAN_INFO, BRIDGE_VLAN_INFO_PVID, BRIDGE_VLAN_INFO_UNTAGGED = 2, 2, 4
IFA_ADDRESS, IFA_LOCAL, IFA_BROADCAST, IFA_FLAGS = 1, 2, 4, 8
IFA_F_NODAD, IFA_F_DADFAILED, IFA_F_TENTATIVE = 0x02, 0x08, 0x40
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_TABLE = 1, 4, 5, 15
IFF_UP, IFF_PROMISC, NLA_F_NESTED = 1, 0x100, 0x8000
RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_LINK, RTN_UNICAST = 254, 3, 253, 1


def nla(kind, data):
    if isinstance(data, str):
        data = data.encode() + b"\0"
    n = 4 + len(data)
    return struct.pack("=HH", n, kind) + data + b"\0" * ((4 - n % 4) % 4)


def parse_nla(buf, off=0):
    attrs = {}
    while off + 4 <= len(buf):
        n, kind = struct.unpack_from("=HH", buf, off)
        if n < 4:
            break
        attrs[kind & 0x3FFF] = buf[off + 4:off + n]
        off += (n + 3) & ~3
    return attrs


def ifinfo(index=0, flags=0, change=0, family=0):
    return struct.pack("=BxHiII", family, 0, index, flags, change)


class Netlink:
    """One rtnetlink socket, bound to the network namespace it was opened in."""

    def __init__(self):
        self.sock = _socket.socket(AF_NETLINK, _socket.SOCK_RAW | _socket.SOCK_CLOEXEC, 0)
        self.sock.bind((0, 0))
        self.seq = 0

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def request(self, mtype, flags, body, what):
        """Send one message; return the reply payloads (a dump's or a get's); raise on error."""
        self.seq += 1
        msg = struct.pack("=IHHII", 16 + len(body), mtype, F_REQUEST | flags, self.seq, 0) + body
        if what:
            log("  netlink: " + what)
        self.sock.send(msg)
        replies = []
        while True:
            data = self.sock.recv(1 << 16)
            off = 0
            while off + 16 <= len(data):
                n, rtype, _, seq, _ = struct.unpack_from("=IHHII", data, off)
                payload = data[off + 16:off + n]
                off += (n + 3) & ~3
                if seq != self.seq:
                    continue
                if rtype == NLMSG_ERROR:
                    err = -struct.unpack_from("=i", payload)[0]
                    if err:
                        raise OSError(err, posix.strerror(err))
                    return replies
                if rtype == NLMSG_DONE:
                    return replies
                replies.append((rtype, payload))
                if not flags & F_DUMP and not flags & F_ACK:
                    return replies

    # links
    def link(self, name=None, index=0):
        """The link called name (or with index) as a dict, or None if there is none."""
        body = ifinfo(index) + (nla(IFLA_IFNAME, name) if name else b"")
        try:
            (_, payload), = self.request(RTM_GETLINK, 0, body, None)
        except OSError as e:
            if e.errno in (ENODEV, ENOENT):
                return None
            raise
        return parse_link(payload)

    def links(self):
        return [parse_link(p) for t, p in self.request(RTM_GETLINK, F_DUMP, ifinfo(), None) if t == RTM_NEWLINK]

    def add_bridge(self, name, mtu, mac, promisc=False, vlan_filtering=False):
        """MAC given at birth is the bridge's own (addr_assign_type 3, "set"): it never follows its
        ports, so pods' neighbour entries for the gateway stay right as pods come and go."""
        data = nla(IFLA_INFO_DATA | NLA_F_NESTED, nla(IFLA_BR_VLAN_FILTERING, b"\1")) if vlan_filtering else b""
        info = nla(IFLA_LINKINFO | NLA_F_NESTED, nla(IFLA_INFO_KIND, "bridge") + data)
        flags = IFF_PROMISC if promisc else 0
        body = (ifinfo(0, flags, flags) + nla(IFLA_IFNAME, name) + (nla(IFLA_MTU, struct.pack("=I", mtu)) if mtu else b"")
                + nla(IFLA_ADDRESS, mac) + info)
        what = f"ip link add {name} address {fmt_mac(mac)}{' promisc on' * promisc} type bridge" \
            + " vlan_filtering 1" * vlan_filtering
        self.request(RTM_NEWLINK, F_ACK | F_CREATE | F_EXCL, body, what)

    def set_mac(self, index, name, mac):
        """Set MAC, even the one the link has: the kernel then counts it as chosen (addr_assign_type 3)."""
        self.request(RTM_SETLINK, F_ACK, ifinfo(index) + nla(IFLA_ADDRESS, mac), f"ip link set {name} address {fmt_mac(mac)}")

    def set_promisc(self, index, name):
        self.request(RTM_SETLINK, F_ACK, ifinfo(index, IFF_PROMISC, IFF_PROMISC), f"ip link set {name} promisc on")

    def add_veth(self, host_name, peer_name, mtu, netns_fd, peer_mac, host_mac=None, master=None):
        """Create the veth pair with its peer born inside the container's namespace.  MASTER
        ((index, name) of a bridge): the host end is born enslaved and up, with HOST_MAC, so no
        look-up or set follows (each would wait for RTNL behind every other pod's ADD and DEL)."""
        mtu_attr = nla(IFLA_MTU, struct.pack("=I", mtu)) if mtu else b""
        peer = (ifinfo() + nla(IFLA_IFNAME, peer_name) + mtu_attr + nla(IFLA_NET_NS_FD, struct.pack("=I", netns_fd))
                + (nla(IFLA_ADDRESS, peer_mac) if peer_mac else b""))
        data = nla(IFLA_INFO_DATA | NLA_F_NESTED, nla(VETH_INFO_PEER | NLA_F_NESTED, peer))
        info = nla(IFLA_LINKINFO | NLA_F_NESTED, nla(IFLA_INFO_KIND, "veth") + data)
        up = IFF_UP if master is not None else 0
        body = (ifinfo(0, up, up) + nla(IFLA_IFNAME, host_name) + mtu_attr + info
                + (nla(IFLA_ADDRESS, host_mac) if host_mac else b"")
                + (nla(IFLA_MASTER, struct.pack("=I", master[0])) if master is not None else b""))
        what = f"ip link add {host_name}" + (f" master {master[1]} up" if master is not None else "")
        self.request(RTM_NEWLINK, F_ACK | F_CREATE | F_EXCL, body, f"{what} type veth peer name {peer_name} netns <container>")

    def set_link(self, index, name, up=False, master=None, arp_notify=False):
        """master: (index, name) of the bridge to enslave the link to.  ARP_NOTIFY: the link's
        net.ipv4.conf.<name>.arp_notify = 1 in the same request (a gratuitous ARP as it comes up)."""
        body = ifinfo(index, IFF_UP if up else 0, IFF_UP if up else 0)
        if master is not None:
            body += nla(IFLA_MASTER, struct.pack("=I", master[0]))
        if arp_notify:
            conf = nla(IFLA_INET_CONF | NLA_F_NESTED, nla(IPV4_DEVCONF_ARP_NOTIFY, struct.pack("=I", 1)))
            body += nla(IFLA_AF_SPEC | NLA_F_NESTED, nla(AF_INET | NLA_F_NESTED, conf))
        what = f"ip link set {name}" + (f" master {master[1]}" if master is not None else "") + (" up" if up else "")
        self.request(RTM_SETLINK, F_ACK, body, what + " (arp_notify 1)" * arp_notify)

    def set_port(self, index, name, hairpin=False, isolated=False):
        """The bridge port's flags, in one request."""
        flags = (nla(IFLA_BRPORT_MODE, b"\1") if hairpin else b"") + (nla(IFLA_BRPORT_ISOLATED, b"\1") if isolated else b"")
        body = ifinfo(index, family=AF_BRIDGE) + nla(IFLA_PROTINFO | NLA_F_NESTED, flags)
        what = " hairpin on" * hairpin + " isolated on" * isolated
        self.request(RTM_SETLINK, F_ACK, body, f"bridge link set dev {name}{what}")

    def port_vlans(self, index, name, vlans, delete=False):
        """Add (or DELETE) the bridge port's VLANs, [(vid, pvid and untagged)], in one request."""
        info = b"".join(nla(IFLA_BRIDGE_VLAN_INFO, struct.pack("=HH", (BRIDGE_VLAN_INFO_PVID | BRIDGE_VLAN_INFO_UNTAGGED)
                                                                 * native, vid)) for vid, native in vlans)
        body = ifinfo(index, family=AF_BRIDGE) + nla(IFLA_AF_SPEC | NLA_F_NESTED, info)
        what = "; ".join(f"bridge vlan {'del' if delete else 'add'} dev {name} vid {vid}" + " pvid untagged" * native
                         for vid, native in vlans)
        self.request(RTM_DELLINK if delete else RTM_SETLINK, F_ACK, body, what)

    def del_link(self, index, name):
        """By INDEX, or by NAME when the index is not known (None)."""
        body = ifinfo(index) if index is not None else ifinfo() + nla(IFLA_IFNAME, name)
        self.request(RTM_DELLINK, F_ACK, body, f"ip link del {name}")

    # addresses
    def add_addr(self, index, name, family, n, plen, exclusive=False, nodad=False):
        """EXCLUSIVE: EEXIST if the link has it already (so the caller knows whether it added it).
        NODAD: an IPv6 address usable at once, without duplicate address detection."""
        flags = IFA_F_NODAD if nodad else 0
        body = struct.pack("=BBBBI", family, plen, flags, 0, index) + nla(IFA_LOCAL, ip_bytes(family, n)) \
            + nla(IFA_ADDRESS, ip_bytes(family, n))
        if family == AF_INET and plen < 31:
            body += nla(IFA_BROADCAST, ip_bytes(family, n | ((1 << (32 - plen)) - 1)))
        self.request(RTM_NEWADDR, F_ACK | F_CREATE | (F_EXCL if exclusive else F_REPLACE), body,
                     f"ip addr add {fmt_cidr(family, n, plen)} dev {name}" + " nodad" * nodad)

    def del_addr(self, index, name, family, n, plen):
        body = struct.pack("=BBBBI", family, plen, 0, 0, index) + nla(IFA_LOCAL, ip_bytes(family, n)) \
            + nla(IFA_ADDRESS, ip_bytes(family, n))
        self.request(RTM_DELADDR, F_ACK, body, f"ip addr del {fmt_cidr(family, n, plen)} dev {name}")

    def addrs(self, index, family=0, flags=False):
        """[(family, address int, prefix)] on the link; FLAGS: (family, int, prefix, IFA_F_* flags)."""
        out = []
        for t, p in self.request(RTM_GETADDR, F_DUMP, struct.pack("=BBBBI", family, 0, 0, 0, 0), None):
            fam, plen, fl, _, idx = struct.unpack_from("=BBBBI", p)
            if t != RTM_NEWADDR or idx != index:
                continue
            a = parse_nla(p, 8)
            raw = a.get(IFA_LOCAL) or a.get(IFA_ADDRESS)
            if raw:
                fl = struct.unpack("=I", a[IFA_FLAGS])[0] if IFA_FLAGS in a else fl
                out.append((fam, int.from_bytes(raw, "big"), plen) + ((fl,) if flags else ()))
        return out

    # routes
    def add_route(self, family, dst, plen, gw, oif, name):
        scope = RT_SCOPE_LINK if gw is None else 0
        body = struct.pack("=BBBBBBBBI", family, plen, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, scope, RTN_UNICAST, 0)
        if plen:
            body += nla(RTA_DST, ip_bytes(family, dst))
        if gw is not None:
            body += nla(RTA_GATEWAY, ip_bytes(family, gw))
        body += nla(RTA_OIF, struct.pack("=I", oif))
        via = f" via {fmt_ip(family, gw)}" if gw is not None else ""
        self.request(RTM_NEWROUTE, F_ACK | F_CREATE | F_EXCL, body, f"ip route add {fmt_cidr(family, dst, plen)}{via} dev {name}")

    def routes(self, family):
        """[(dst int, prefix, gw int or None, oif)] in the main table."""
        out = []
        body = struct.pack("=BBBBBBBBI", family, 0, 0, 0, 0, 0, 0, 0, 0)
        for t, p in self.request(RTM_GETROUTE, F_DUMP, body, None):
            fam, plen, _, _, table = struct.unpack_from("=BBBBB", p)
            a = parse_nla(p, 12)
            if RTA_TABLE in a:
                table = struct.unpack("=I", a[RTA_TABLE])[0]
            if fam != family or table != RT_TABLE_MAIN:
                continue
            dst = int.from_bytes(a[RTA_DST], "big") if RTA_DST in a else 0
            gw = int.from_bytes(a[RTA_GATEWAY], "big") if RTA_GATEWAY in a else None
            oif = struct.unpack("=I", a[RTA_OIF])[0] if RTA_OIF in a else 0
            out.append((dst, plen, gw, oif))
        return out


def parse_link(payload):
    _, _, index, flags, _ = struct.unpack_from("=BxHiII", payload)
    a = parse_nla(payload, 16)
    info = parse_nla(a.get(IFLA_LINKINFO, b""))
    kind = info.get(IFLA_INFO_KIND, b"").rstrip(b"\0").decode()
    data = parse_nla(info.get(IFLA_INFO_DATA, b"")) if kind == "bridge" else {}
    port = parse_nla(info.get(IFLA_INFO_SLAVE_DATA, b""))
    return {
        "index": index,
        "name": a.get(IFLA_IFNAME, b"").rstrip(b"\0").decode(),
        "up": bool(flags & IFF_UP),
        "promisc": bool(flags & IFF_PROMISC),
        "default_pvid": struct.unpack("=H", data[IFLA_BR_VLAN_DEFAULT_PVID][:2])[0] if IFLA_BR_VLAN_DEFAULT_PVID in data else 0,
        "mac": ":".join(f"{b:02x}" for b in a.get(IFLA_ADDRESS, b"")),
        "mtu": struct.unpack("=I", a[IFLA_MTU])[0] if IFLA_MTU in a else 0,
        "master": struct.unpack("=I", a[IFLA_MASTER])[0] if IFLA_MASTER in a else 0,
        "kind": kind,
        "port_state": port[IFLA_BRPORT_STATE][0] if IFLA_BRPORT_STATE in port else None,
    }


def fmt_mac(raw):
    return ":".join(f"{b:02x}" for b in raw)


def kernel(what, fn, *args):
    """A netlink call whose failure is a CNI error naming what we were doing."""
    try:
        return fn(*args)
    except OSError as e:
        raise CNIError(E_KERNEL, f"{what}: {e.strerror or e}")


def libc_setns():
    """setns(2) for Python < 3.12 through _ctypes, the C half of ctypes: the ctypes package
    costs ~6 ms of imports, _ctypes under 1 ms."""
    import _ctypes

    class CInt(_ctypes._SimpleCData):
        _type_ = "i"

    class CFunction(_ctypes.CFuncPtr):
        _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
        _restype_ = CInt

    class Libc:
        _handle = _ctypes.dlopen(None, posix.RTLD_NOW)

    call = CFunction(("setns", Libc))

    def setns(fd, nstype):
        if call(fd, nstype) != 0:
            err = _ctypes.get_errno()
            raise OSError(err, posix.strerror(err))
    return setns


def setns(fd):
    (posix.setns if hasattr(posix, "setns") else libc_setns())(fd, CLONE_NEWNET)


def open_netns(path):
    """Open a namespace file: nsfs files are regular files, so a FIFO (open would block) or a
    device (open may have side effects) is refused before it is opened."""
    if posix.stat(path).st_mode & S_IFMT != S_IFREG:
        raise OSError(EINVAL, "not a regular file")
    return posix.open(path, posix.O_RDONLY | posix.O_CLOEXEC | posix.O_NONBLOCK | posix.O_NOCTTY)


def check_netns(path, must_exist):
    """CNI_NETNS must be a network namespace file (NS_GET_NSTYPE says so); DEL may find it gone."""
    import fcntl
    try:
        fd = open_netns(path)
    except OSError as e:
        if must_exist or e.errno not in (ENOENT, ENOTDIR):  # the pod is gone: fine for DEL
            raise CNIError(E_ENV, f"CNI_NETNS {path!r} cannot be opened: {e.strerror}")
        return
    try:
        kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError:
        kind = None
    finally:
        posix.close(fd)
    if kind != CLONE_NEWNET:
        raise CNIError(E_ENV, f"CNI_NETNS {path!r} is not a network namespace")


class Container:
    """The pod's network namespace, held open: its fd (veths are born in it through
    IFLA_NET_NS_FD) and a netlink socket opened inside it.  Closed on leaving the with block."""

    def __init__(self, netns):
        try:
            self.fd = open_netns(netns)
        except OSError as e:
            raise CNIError(E_ENV, f"CNI_NETNS {netns!r} cannot be opened: {e.strerror}")
        try:
            self.nl = self.netlink_inside(netns)
        except BaseException:
            posix.close(self.fd)
            raise

    def netlink_inside(self, netns):
        host = posix.open("/proc/self/ns/net", posix.O_RDONLY | posix.O_CLOEXEC)
        try:
            try:
                setns(self.fd)
            except OSError as e:
                raise CNIError(E_ENV, f"CNI_NETNS {netns!r} is not a network namespace: {e.strerror}")
            try:
                return Netlink()
            finally:
                setns(host)
        finally:
            posix.close(host)

    def sysctls(self, values):
        """Write {/proc/sys path: value} inside the pod's namespace (/proc/sys/net is the opener's)."""
        host = posix.open("/proc/self/ns/net", posix.O_RDONLY | posix.O_CLOEXEC)
        try:
            setns(self.fd)
            try:
                for path, value in values.items():
                    sysctl_set(path, value)
            finally:
                setns(host)
        finally:
            posix.close(host)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.nl.close()
        posix.close(self.fd)


# ---------------------------------------------------------------- input

def valid_name(text, max_len=None):
    return (isinstance(text, str) and text != "" and text[0].isascii() and text[0].isalnum()
            and all(c in NAME_CHARS for c in text) and (max_len is None or len(text) <= max_len))


def valid_ifname(name):
    return (0 < len(name.encode("utf-8", "surrogateescape")) <= 15 and name not in (".", "..")
            and not any(c in "/:" or c.isspace() for c in name) and name.isprintable())


def parse_cni_args(text):
    args, unknown = {}, []
    for pair in filter(None, text.split(";")):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CNIError(E_ENV, f"CNI_ARGS: {pair!r} is not KEY=VALUE")
        args[key.upper()] = value
        if key.upper() not in KNOWN_ARGS:
            unknown.append(key)
    for text in filter(None, args.get("IP", "").split(",")):
        try:
            parse_ip(text.split("/")[0].strip())
        except ValueError:
            raise CNIError(E_ENV, f"CNI_ARGS: IP={text!r} is not an address")
    if unknown and args.get("IGNOREUNKNOWN", "").lower() not in ("1", "true"):
        raise CNIError(E_FIELD, f"CNI_ARGS: unknown key(s) {', '.join(unknown)} (set IgnoreUnknown=1)")
    return args


def lower_keys(obj):
    return {k.lower(): v for k, v in obj.items()} if isinstance(obj, dict) else {}


TYPE_NAMES = {str: "a string", bool: "true or false", int: "an integer", dict: "an object", list: "a list"}


def conf_value(obj, key, kind, default, where=""):
    """obj[key] when it is of type KIND; absent or null (and "" for a string) mean DEFAULT; any
    other value is error 7 naming the key: a wrong type never silently becomes the default."""
    value = obj.get(key)
    if value is None or (kind is str and value == ""):
        return default
    if type(value) is not kind:  # type(): True is not an int, and 1 is not true
        raise CNIError(E_CONFIG, f"{where}{key} must be {TYPE_NAMES[kind]}, not {json_dumps(value)}")
    return value


class Net:
    """The network config, validated and with the defaults applied."""

    def __init__(self, conf, cni_args, teardown=False):
        """TEARDOWN (DEL, GC): judge only what is read to find what to remove (see buildable)."""
        self.raw = conf
        self.version = conf.get("cniVersion", "")
        self.name = conf.get("name")
        if not valid_name(self.name, 200):
            raise CNIError(E_CONFIG, f"invalid network name {self.name!r}: [a-zA-Z0-9][a-zA-Z0-9_.-]*")
        self.mode = conf_value(conf, "mode", str, "bridge")
        self.routed = self.mode == "routed"
        self.bridge = conf_value(conf, "bridge", str, DEFAULT_BRIDGE)
        self.default_gw = conf_value(conf, "isDefaultGateway", bool, True)
        self.is_gw = conf_value(conf, "isGateway", bool, True) or self.default_gw
        self.masq = conf_value(conf, "ipMasq", bool, True)
        self.forward = conf_value(conf, "forwardAccept", bool, True)
        self.no_masq = self.cidr_list("nonMasqueradeCIDRs")
        self.hairpin = conf_value(conf, "hairpinMode", bool, False)
        self.promisc = conf_value(conf, "promiscMode", bool, False)
        self.isolated = conf_value(conf, "portIsolation", bool, False)
        self.spoofchk = conf_value(conf, "macspoofchk", bool, False)
        self.dad = conf_value(conf, "enabledad", bool, False)
        self.force_addr = conf_value(conf, "forceAddress", bool, False)
        self.vlan = conf_value(conf, "vlan", int, 0)
        self.trunk = self.vlan_trunk()
        self.keep_default_vlan = conf_value(conf, "preserveDefaultVlan", bool, False)
        self.masq_backend = conf_value(conf, "ipMasqBackend", str, "iptables")
        if self.masq_backend not in MASQ_BACKENDS:
            raise CNIError(E_CONFIG, f"invalid ipMasqBackend {self.masq_backend!r}: one of " + ", ".join(MASQ_BACKENDS))
        self.no_l3 = conf_value(conf, "disableContainerInterface", bool, False)
        self.nft = self.spoofchk or (self.masq_backend == "nftables" and (self.masq or self.forward))
        self.mtu = conf_value(conf, "mtu", int, 0)
        self.dns = conf_value(conf, "dns", dict, {})
        self.ipam = conf_value(conf, "ipam", dict, {})
        self.ipam_type = conf_value(self.ipam, "type", str, "", "ipam.")
        if self.ipam_type and not valid_name(self.ipam_type):
            raise CNIError(E_CONFIG, f"invalid ipam type {self.ipam_type!r}")
        if self.ipam_type and self.ipam_type not in BUILTIN_IPAM and self.ipam_type == conf.get("type"):
            raise CNIError(E_CONFIG, f"ipam.type {self.ipam_type!r} is this plugin itself (it would call itself forever)")
        self.runtime = lower_keys(conf.get("runtimeConfig"))
        self.args = cni_args
        self.prev = conf_value(conf, "prevResult", dict, None)
        self.data_dir = conf_value(self.ipam, "dataDir", str, DEFAULT_DATA_DIR, "ipam.")
        if not self.data_dir.startswith("/") or "\0" in self.data_dir:
            raise CNIError(E_CONFIG, f"ipam.dataDir must be an absolute path, not {self.data_dir!r}")
        self.routes = conf_value(self.ipam, "routes", list, [], "ipam.")
        for i, route in enumerate(self.routes):
            if type(route) is not dict:
                raise CNIError(E_CONFIG, f"ipam.routes[{i}] must be an object, not {json_dumps(route)}")
            for key in ("dst", "gw"):
                conf_value(route, key, str, None, f"ipam.routes[{i}].")
        self.subnet = conf_value(self.ipam, "subnet", str, None, "ipam.")
        self.ranges = conf_value(self.ipam, "ranges", list, [], "ipam.")
        if self.ipam_type in BUILTIN_IPAM or self.ipam_type == "host-local":
            self.range_sets()  # every key checked now, before anything is changed
        if not teardown:
            self.buildable()

    def buildable(self):
        """The values and combinations only ADD (and CHECK, STATUS) act on, refused (7) before
        anything changes.  DEL and GC do not judge them: a runtime retries a failing DEL (kubelet
        and containerd until it succeeds), and an attachment of a config ADD refused owns nothing
        these keys would find, while what DEL removes is named by the attachment's record and the
        IPAM keys, still checked.  The spec asks DEL to succeed "to the fullest extent possible";
        a config that cannot be decoded, or a value of the wrong type, is still refused (6, 7),
        as by the reference's DEL: nothing it names can be trusted to be ours."""
        if self.mode not in MODES:
            raise CNIError(E_CONFIG, f"invalid mode {self.mode!r}: one of " + ", ".join(MODES))
        if not valid_ifname(self.bridge):
            raise CNIError(E_CONFIG, f"invalid bridge name {self.bridge!r}")
        if self.hairpin and self.promisc:  # the reference refuses the pair
            raise CNIError(E_CONFIG, "hairpinMode and promiscMode cannot both be true")
        if not 0 <= self.vlan <= 4094:
            raise CNIError(E_CONFIG, f"invalid vlan {self.vlan}: must be between 0 and 4094")
        if self.vlan and self.is_gw and not valid_ifname(f"{self.bridge}.{self.vlan}"):
            raise CNIError(E_CONFIG, f"vlan {self.vlan} on bridge {self.bridge!r}: its gateway link "
                                     f"{self.bridge}.{self.vlan} would be longer than 15 characters")
        if self.no_l3:  # the reference allows it only without IPAM
            raise CNIError(E_CONFIG, "disableContainerInterface is not supported: it needs a network without IPAM "
                                     "(layer 2 only), and this plugin always assigns addresses")
        if self.routed:
            for key, on in (("promiscMode", self.promisc), ("portIsolation", self.isolated), ("vlan", self.vlan),
                            ("vlanTrunk", self.trunk is not None), ("macspoofchk", self.spoofchk)):
                if on:
                    raise CNIError(E_CONFIG, f"{key} needs a bridge: it is not supported in routed mode")
        if not 0 <= self.mtu <= 65535:
            raise CNIError(E_CONFIG, f"invalid mtu {self.mtu!r}")

    def vlan_trunk(self):
        """vlanTrunk as the sorted VLAN ids it lists ([{"minID", "maxID"} ranges and {"id"}s]), None when
        absent.  Present, even empty, it turns vlan_filtering on for a new bridge, as in the reference."""
        trunk = conf_value(self.raw, "vlanTrunk", list, None)
        if trunk is None:
            return None
        ids = set()
        for i, item in enumerate(trunk):
            if type(item) is not dict:
                raise CNIError(E_CONFIG, f"vlanTrunk[{i}] must be an object, not {json_dumps(item)}")
            lo, hi, one = (conf_value(item, key, int, None, f"vlanTrunk[{i}].") for key in ("minID", "maxID", "id"))
            if (lo is None) != (hi is None):
                raise CNIError(E_CONFIG, f"vlanTrunk[{i}]: minID and maxID go together")
            for key, vid in (("minID", lo), ("maxID", hi), ("id", one)):
                if vid is not None and not 1 <= vid <= 4094:
                    raise CNIError(E_CONFIG, f"vlanTrunk[{i}].{key} {vid} must be between 1 and 4094")
            if lo is not None:
                if hi < lo:
                    raise CNIError(E_CONFIG, f"vlanTrunk[{i}]: minID {lo} is greater than maxID {hi}")
                ids.update(range(lo, hi + 1))
            if one is not None:
                ids.add(one)
        return sorted(ids)

    def cidr_list(self, key):
        """KEY as a list of (family, network, prefix); absent is an empty list."""
        value = conf_value(self.raw, key, list, [])
        try:
            return [(f, network_of(f, n, plen), plen) for f, n, plen in map(parse_cidr, value)]
        except ValueError as e:
            raise CNIError(E_CONFIG, f"{key}: {e}") from None

    def range_sets(self):
        """[[range dict]]: one address is allocated from each set."""
        for i, rset in enumerate(self.ranges):
            if type(rset) is not list or not rset:
                raise CNIError(E_CONFIG, f"ipam.ranges[{i}] must be a non-empty list of ranges")
        if self.ranges:
            sets = [[dict(self.ipam, subnet=self.subnet)]] * bool(self.subnet) + self.ranges  # host-local: subnet first
        else:
            subnet = self.subnet or self.args.get("CNIKIT_SUBNET") or node_subnet() or DEFAULT_SUBNET
            sets = [[dict(self.ipam, subnet=subnet)]]
        return [[parse_range(r) for r in s] for s in sets]


def node_subnet():
    try:
        with open(NODE_SUBNET_FILE) as f:
            for line in f:
                key, _, value = line.strip().partition("=")
                if key == "CNIKIT_SUBNET" and value:
                    return value.strip("'\"")
    except OSError:
        pass
    return None


# Never a pod subnet: the kernel or the routing would treat these addresses specially.
RESERVED_SUBNETS = {AF_INET: (("0.0.0.0/8", "this network"), ("127.0.0.0/8", "loopback"), ("224.0.0.0/4", "multicast"),
                              ("240.0.0.0/4", "reserved")),
                    AF_INET6: (("::/128", "unspecified"), ("::1/128", "loopback"), ("ff00::/8", "multicast"))}


def reserved_overlap(family, net, plen):
    """The name of the reserved block the subnet overlaps, or None."""
    for text, what in RESERVED_SUBNETS[family]:
        _, rnet, rplen = parse_cidr(text)
        shorter = min(plen, rplen)
        if network_of(family, net, shorter) == network_of(family, rnet, shorter):
            return what
    return None


def parse_range(r):
    """host-local's range: subnet, rangeStart, rangeEnd, gateway (never handed out)."""
    if type(r) is not dict:
        raise CNIError(E_CONFIG, f"invalid ipam range {json_dumps(r)}: must be an object")
    subnet_text = conf_value(r, "subnet", str, None, "ipam range ")
    texts = {key: conf_value(r, key, str, None, "ipam range ") for key in ("rangeStart", "rangeEnd", "gateway")}
    try:
        family, addr, plen = parse_cidr(subnet_text)
        net = network_of(family, addr, plen)
        reserved = reserved_overlap(family, net, plen)
        if reserved:
            raise ValueError(f"subnet {subnet_text} overlaps the {reserved} block")
        last = net | ((1 << (bits(family) - plen)) - 1)
        if family == AF_INET and plen < 31:
            last -= 1  # the broadcast address
        if last - net < 2:
            raise ValueError(f"subnet {subnet_text} is too small")
        subnet = (family, net, plen)
        start = parse_ip(texts["rangeStart"])[1] if texts["rangeStart"] else net + 1
        end = parse_ip(texts["rangeEnd"])[1] if texts["rangeEnd"] else last
        gw = parse_ip(texts["gateway"])[1] if texts["gateway"] else net + 1
        for what, n in (("rangeStart", start), ("rangeEnd", end), ("gateway", gw)):
            if not in_subnet(family, n, subnet):
                raise ValueError(f"{what} {fmt_ip(family, n)} is outside {subnet_text}")
        if not net < start <= end <= last:
            raise ValueError(f"range {fmt_ip(family, start)}-{fmt_ip(family, end)} is not inside {subnet_text}")
    except ValueError as e:
        raise CNIError(E_CONFIG, f"invalid ipam range: {e}")
    return {"family": family, "subnet": subnet, "start": start, "end": end, "gw": gw}


# ---------------------------------------------------------------- IPAM: built-in, host-local format

class Store:
    """host-local's disk layout, plus this plugin's ownership records beside it:

        <dataDir>/<network>/<ip>                      "<container id>\\r\\n<ifname>" (host-local's)
        <dataDir>/<network>/last_reserved_ip.<n>      round-robin cursor of range set n (host-local's)
        <dataDir>/<network>/lock                      flock'ed around every change (shared with host-local)
        <dataDir>/<network>/.cnikit/attachments/<key> what one attachment owns (JSON, see Record)
        <dataDir>/<network>/.cnikit/tmp/              files being written; only ever under the lock

    Every temporary file is written under the lock, so any found while holding it belongs to a
    call that died (kill -9): entering sweeps them.  The attachments directory appears, by one
    rename, once every older allocation has a record, so from then on "no record" means "owns
    nothing" and DEL needs no scan."""

    def __init__(self, data_dir, network):
        self.dir = join(data_dir, network)
        self.records = join(self.dir, ".cnikit", "attachments")
        self.tmp = join(self.dir, ".cnikit", "tmp")
        self.lock = None

    def __enter__(self):
        import fcntl
        try:
            try:
                self.lock = posix.open(join(self.dir, "lock"), posix.O_RDWR | posix.O_CREAT | posix.O_CLOEXEC, 0o600)
            except FileNotFoundError:
                makedirs(self.dir)
                self.lock = posix.open(join(self.dir, "lock"), posix.O_RDWR | posix.O_CREAT | posix.O_CLOEXEC, 0o600)
            fcntl.flock(self.lock, fcntl.LOCK_EX)
            makedirs(self.tmp)
            for name in posix.listdir(self.tmp):  # only files of calls that died: see the class comment
                log(f"  ipam: sweep {name} (left by a call that died)")
                posix.unlink(join(self.tmp, name))
            if not isdir(self.records):
                self.start_records()
        except OSError as e:
            self.__exit__()
            raise CNIError(E_IO, f"cannot lock {self.dir}: {e.strerror}")
        return self

    def has_leftovers(self):
        """A temporary file outside the lock: a call died (a DEL after a killed ADD sweeps it).
        One look at a directory that is empty but for calls in flight."""
        try:
            return bool(posix.listdir(self.tmp))
        except OSError:
            return False

    def __exit__(self, *exc):
        if self.lock is not None:
            posix.close(self.lock)  # closing releases the flock
            self.lock = None

    def start_records(self):
        """Once per network directory: a record for each attachment that predates records (from
        its allocation files, with its rules marked unknown), then the directory appears."""
        building = self.records + ".new"
        rmtree(building)
        posix.mkdir(building, 0o755)
        owners = {}
        for key, who in self.allocations().items():
            owners.setdefault(who, []).append(key)
        for who, keys in owners.items():
            cid, _, ifname = who.partition("\r\n")
            rec = Record(cid, ifname, [fmt_ip(*k) for k in keys], rules=None)
            self.write_file(join(building, rec.key), json_dumps(rec.fields()))
        for name in posix.listdir(self.dir):  # older versions' temporary files (named by pid)
            if name.startswith((".tmp-", ".last-")):
                log(f"  ipam: sweep {name} (left by a call that died)")
                posix.unlink(join(self.dir, name))
        posix.rename(building, self.records)

    def write_file(self, path, text):
        """Write a whole file atomically: a temporary file under the lock, then rename."""
        tmp = join(self.tmp, f"{posix.getpid()}")
        with open(tmp, "w") as f:
            f.write(text)
        posix.rename(tmp, path)

    def path(self, family, n):
        return join(self.dir, fmt_ip(family, n))

    def owner(self, family, n):
        return read_owner(self.path(family, n))

    def free(self, family, n):
        return file_type(self.path(family, n), follow=False) is None

    def reserve(self, family, n, cid, ifname):
        """Create <ip> holding 'id\\r\\nifname' atomically (link fails if it exists)."""
        tmp = join(self.tmp, f"ip-{posix.getpid()}")
        try:
            with open(tmp, "wb") as f:
                f.write(f"{cid}\r\n{ifname}".encode())
            try:
                posix.link(tmp, self.path(family, n))
                return True
            except FileExistsError:
                return False
            finally:
                posix.unlink(tmp)
        except OSError as e:
            raise CNIError(E_IO, f"cannot write allocation in {self.dir}: {e.strerror}")

    def set_last(self, index, family, n):
        try:
            self.write_file(join(self.dir, f"last_reserved_ip.{index}"), fmt_ip(family, n))
        except OSError as e:
            raise CNIError(E_IO, f"cannot write {self.dir}: {e.strerror}")

    def last(self, index):
        try:
            with open(join(self.dir, f"last_reserved_ip.{index}")) as f:
                return parse_ip(f.read().strip())
        except (OSError, ValueError):
            return None

    def allocations(self):
        """{(family, int): 'id\\r\\nifname'} of every address file: a scan, for GC, STATUS and
        the first use of records only."""
        out = {}
        try:
            names = posix.listdir(self.dir)
        except OSError:
            return out
        for name in names:
            try:
                key = parse_ip(name)
            except ValueError:
                continue
            owner = self.owner(*key)
            if owner is not None:
                out[key] = owner
        return out

    def release(self, family, n, cid=None, ifname=None):
        """Remove <ip>; with CID and IFNAME only if it is still theirs (never someone else's)."""
        if cid is not None and self.owner(family, n) != f"{cid}\r\n{ifname}":
            return
        log(f"  ipam: release {fmt_ip(family, n)}")
        try:
            posix.unlink(self.path(family, n))
        except FileNotFoundError:
            pass

    def save(self, rec):
        try:
            self.write_file(join(self.records, rec.key), json_dumps(rec.fields()))
        except OSError as e:
            raise CNIError(E_IO, f"cannot write the record of {rec.cid} {rec.ifname} in {self.records}: {e.strerror}")
        log(f"  record: {rec.cid} {rec.ifname} owns {', '.join(rec.ips) or 'no address'}")

    def drop(self, rec):
        try:
            posix.unlink(join(self.records, rec.key))
        except FileNotFoundError:
            pass

    def all_records(self):
        """Every record (GC and a failed ADD's gateway question only: a scan)."""
        out = []
        for name in posix.listdir(self.records) if isdir(self.records) else ():
            rec = load_record(join(self.records, name))
            if rec is not None:
                out.append(rec)
        return out


def read_owner(path):
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace").strip()
    except OSError:
        return None


def rmtree(path):
    """Remove a directory of plain files (our half-built records directory), if it is there."""
    try:
        names = posix.listdir(path)
    except FileNotFoundError:
        return
    for name in names:
        posix.unlink(join(path, name))
    posix.rmdir(path)


class Record:
    """What one attachment owns, written when ADD reserves its addresses (before it creates
    anything, so a call killed half-way is still undone by DEL) and read by DEL instead of
    scanning: {"containerID", "ifname", "ips": ["10.244.0.2/24"], "veth",
    "iptables": [{"family": 4, "table": "nat", "chains": [...], "jumps": [...], "rules": [...]}],
    "nft": [{"family": "bridge", "table": "cnikit-<hash>"}]} (nft absent: none; records before it).
    null means unknown (a record made from allocations that predate records, or an unreadable
    one): DEL then looks for the rules (iptables-save) and the addresses (a scan) as before."""

    def __init__(self, cid, ifname, ips, rules, veth=None, nft=()):
        self.cid, self.ifname, self.ips, self.rules, self.nft = cid, ifname, ips, rules, list(nft)
        self.veth = veth or host_veth_name(cid, ifname)
        self.key = attachment_hash(cid, ifname)[:32]

    def fields(self):
        out = {"containerID": self.cid, "ifname": self.ifname, "ips": self.ips, "veth": self.veth,
               "iptables": self.rules}
        if self.nft:
            out["nft"] = self.nft
        return out

    def addresses(self):
        """{(family, int)} of the recorded addresses."""
        out = set()
        for text in self.ips or ():
            try:
                out.add(parse_ip(text.split("/")[0]))
            except ValueError:
                pass
        return out


def load_record(path, cid=None, ifname=None):
    """The record at PATH, or None when there is none.  An unreadable one (edited by hand, a full
    disk) is a record of CID IFNAME that knows nothing, so DEL looks at the kernel and files."""
    try:
        with open(path) as f:
            d = json_loads(f.read())
        rec = Record(d["containerID"], d["ifname"], list(d["ips"]), d["iptables"], d["veth"], d.get("nft") or ())
        if not all(isinstance(x, str) for x in [rec.cid, rec.ifname, rec.veth] + rec.ips):
            raise TypeError("not strings")
        if not all(isinstance(t, dict) and t.get("family") in NFT_FAMILIES and valid_name(t.get("table"))
                   for t in rec.nft):
            raise TypeError("nft must be a list of {family, table}")
        if rec.rules is not None and not (isinstance(rec.rules, list) and all(isinstance(e, dict) for e in rec.rules)):
            raise TypeError("iptables must be a list of objects")
        return rec
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        log(f"  record {path} is unreadable ({e}): looking at the kernel and the allocations instead")
        return Record(cid, ifname, None, None) if cid is not None else None


def record_path(net, cid, ifname):
    return join(Store(net.data_dir, net.name).records, attachment_hash(cid, ifname)[:32])


def hold_record(path, inherit=False):
    """flock the attachment's record, the lock of one attachment (None if it has no record).
    ADD holds it with INHERIT: the commands it starts inherit the lock, so after a kill -9 of
    the ADD, its DEL waits for the orphaned helpers (an iptables-restore that outlived the ADD
    would otherwise add its rules after DEL removed them).  Closing the fd releases it."""
    import fcntl
    try:
        fd = posix.open(path, posix.O_RDONLY | posix.O_CLOEXEC)
    except FileNotFoundError:
        return None
    posix.set_inheritable(fd, inherit)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def record_of(net, cid, ifname):
    """This attachment's record, and the held lock of it: (record or None, fd or None).  No
    record: it owns nothing (the first use of a network directory records older attachments)."""
    store = Store(net.data_dir, net.name)
    if not isdir(store.records) or store.has_leftovers():
        with store:  # entering records older attachments and sweeps what a killed call left
            pass
    path = record_path(net, cid, ifname)
    fd = hold_record(path)
    return load_record(path, cid, ifname), fd


def candidates(rset, after):
    """Addresses of a range set in round-robin order, as host-local walks it: from just after
    the last reserved one to the end of its range, through the later ranges, round to the
    earlier ones, and last the start of its own range (the last reserved one itself at the end).
    Each address once, the gateway never."""
    spans = [(r, r["start"], r["end"]) for r in rset]
    for i, (r, lo, hi) in enumerate(spans):
        if after is not None and after[0] == r["family"] and lo <= after[1] <= hi:
            spans = [(r, after[1] + 1, hi)] + spans[i + 1:] + spans[:i] + [(r, lo, after[1])]
            break
    for r, lo, hi in spans:
        for n in range(lo, hi + 1):
            if n != r["gw"]:
                yield r, n


def requested_ips(net):
    """Specific addresses asked for in CNI_ARGS IP= or runtimeConfig ips."""
    wanted = []
    if net.args.get("IP"):
        wanted += net.args["IP"].split(",")
    ips = net.runtime.get("ips")
    if isinstance(ips, list):
        wanted += [i for i in ips if isinstance(i, str)]
    out = []
    for text in wanted:
        try:
            out.append(parse_ip(text.split("/")[0].strip()))
        except ValueError:
            raise CNIError(E_ENV, f"requested IP {text!r} is not an address")
    return out


def builtin_add(net, cid, ifname, make_record):
    """Choose an address from each range set, write the attachment's record (MAKE_RECORD(ips)),
    then reserve the addresses: all under the lock.  A failure releases only what this call
    reserved; a duplicate ADD (the attachment has a record) is refused before anything."""
    sets = net.range_sets()
    wanted = requested_ips(net)
    with Store(net.data_dir, net.name) as store:
        if exists(join(store.records, attachment_hash(cid, ifname)[:32])):
            raise CNIError(E_EXISTS, f"{cid} {ifname} is already attached to network {net.name}: DEL it first")
        ips = []
        for index, rset in enumerate(sets):
            ips.append(choose(store, index, rset, wanted, ips))
        for w in wanted:
            if not any(w == (ip["family"], ip["n"]) for ip in ips):
                raise CNIError(E_CONFIG, f"requested IP {fmt_ip(*w)} is in none of the ranges")
        rec = make_record(ips)
        store.save(rec)
        reserved = []
        try:
            for ip in ips:
                log(f"  ipam: reserve {fmt_cidr(ip['family'], ip['n'], ip['plen'])} for {cid} {ifname}")
                if not store.reserve(ip["family"], ip["n"], cid, ifname):  # a writer that ignores the lock
                    raise CNIError(E_TRY_LATER, f"IP {fmt_ip(ip['family'], ip['n'])} was taken meanwhile; try again")
                reserved.append(ip)
                store.set_last(ip["index"], ip["family"], ip["n"])
        except BaseException:
            for ip in reserved:
                store.release(ip["family"], ip["n"], cid, ifname)
            store.drop(rec)
            raise
    return ips, rec


def choose(store, index, rset, wanted, chosen):
    """The address for range set INDEX: the requested one, else the next free one round-robin."""
    def lease(r, n):
        return {"family": r["family"], "n": n, "plen": r["subnet"][2], "gw": r["gw"], "subnet": r["subnet"], "index": index}

    for family, n in wanted:
        for r in rset:
            if family == r["family"] and r["start"] <= n <= r["end"]:
                if n == r["gw"]:
                    raise CNIError(E_CONFIG, f"requested IP {fmt_ip(family, n)} is the gateway")
                if not store.free(family, n) or any(c["n"] == n and c["family"] == family for c in chosen):
                    raise CNIError(E_TRY_LATER, f"requested IP {fmt_ip(family, n)} is already allocated")
                return lease(r, n)
    for r, n in candidates(rset, store.last(index)):
        if store.free(r["family"], n) and not any(c["n"] == n and c["family"] == r["family"] for c in chosen):
            return lease(r, n)
    subnets = ", ".join(fmt_cidr(*r["subnet"]) for r in rset)
    raise CNIError(E_TRY_LATER, f"no IP addresses left in range set {subnets} of network {store.dir}")


def release_owned(store, rec):
    """Release what the record lists, each only while it is still this attachment's.  A record
    that does not know its addresses (unreadable): a scan of the allocations."""
    if rec.ips is not None:
        keys = rec.addresses()
    else:
        owner = f"{rec.cid}\r\n{rec.ifname}"
        keys = [key for key, who in store.allocations().items() if who == owner]
    for key in keys:
        store.release(*key, rec.cid, rec.ifname)


def use_builtin(net):
    if net.ipam_type in BUILTIN_IPAM:
        return True
    if net.ipam_type == "host-local" and not find_plugin("host-local"):
        return True  # same on-disk format: take over
    return False


def find_plugin(name):
    return which(name, getenv("CNI_PATH"))


def delegate(net, command, raw):
    """Run the IPAM plugin named in ipam.type, as the reference bridge does."""
    path = find_plugin(net.ipam_type)
    if not path:
        raise CNIError(E_CONFIG, f"IPAM plugin {net.ipam_type!r} not found in CNI_PATH")
    if getenv("CNIKIT_DELEGATED"):  # we are the IPAM plugin of ourselves (another name): stop the loop
        raise CNIError(E_CONFIG, f"ipam.type {net.ipam_type!r} leads back to this plugin")
    env = dict(environ(), CNI_COMMAND=command, CNIKIT_DELEGATED="1")
    try:
        out = run([path], stdin=raw, env=env)
    except CNIError as e:
        try:  # the plugin's own CNI error, when it printed one
            err = json_loads(e.details)
            e.code, e.msg, e.details = err.get("code", e.code), f"{net.ipam_type}: {err.get('msg', e.msg)}", err.get("details", "")
        except (ValueError, AttributeError):  # not JSON, or JSON but not an object: keep its text
            pass
        raise
    return out


def ipam_plugin_add(net, raw):
    """Delegated ADD: a failing plugin cleaned up after itself; an unusable answer is released here."""
    out = delegate(net, "ADD", raw)
    try:
        res = json_loads(out)
        if not isinstance(res, dict):
            raise ValueError("not a JSON object")
        ips = ipam_result_ips(res)
        if not isinstance(res.get("routes") or [], list) or not isinstance(res.get("dns") or {}, dict):
            raise ValueError("routes must be a list and dns an object")
    except (KeyError, ValueError, TypeError) as e:
        try:
            delegate(net, "DEL", raw)
        except CNIError as e2:
            log(f"  IPAM DEL after an unusable ADD result failed: {e2.msg}")
        raise CNIError(E_COMMAND, f"{net.ipam_type}: unusable ADD result: {e}", out[:1000])
    return res, ips


def ipam_result_ips(res):
    ips = []
    if not isinstance(res.get("ips") or [], list) or not all(isinstance(ip, dict) for ip in res.get("ips") or []):
        raise ValueError("ips must be a list of objects")
    for ip in res.get("ips") or []:
        family, n, plen = parse_cidr(ip["address"])
        gw = parse_ip(ip["gateway"])[1] if ip.get("gateway") else None
        ips.append({"family": family, "n": n, "plen": plen, "gw": gw, "subnet": (family, network_of(family, n, plen), plen)})
    return ips


def ipam_add(net, cid, ifname, raw, make_record):
    """Addresses for the attachment, and its record saved: (ips, routes, dns, record)."""
    if use_builtin(net):
        ips, rec = builtin_add(net, cid, ifname, make_record)
        return ips, net.routes, {}, rec
    res, ips = ipam_plugin_add(net, raw)
    for ip in ips:  # like the reference bridge: a gateway is the subnet's first address when unset
        if ip["gw"] is None:
            ip["gw"] = ip["subnet"][1] + 1
    rec = make_record(ips)
    try:
        with Store(net.data_dir, net.name) as store:
            store.save(rec)
    except BaseException:
        delegate(net, "DEL", raw)  # not a duplicate (cmd_add refused those): the plugin's answer is ours
        raise
    return ips, res.get("routes") or [], res.get("dns") or {}, rec


def ipam_undo(net, rec, ips, raw):
    """A failed ADD gives back exactly what it got, and its record."""
    if use_builtin(net):
        with Store(net.data_dir, net.name) as store:
            for ip in ips:
                store.release(ip["family"], ip["n"], rec.cid, rec.ifname)
            store.drop(rec)
    else:
        delegate(net, "DEL", raw)
        with Store(net.data_dir, net.name) as store:
            store.drop(rec)


def ipam_del(net, rec, raw):
    """DEL's addresses: the IPAM plugin's DEL, or ours from the record; the record goes last."""
    if not use_builtin(net):
        delegate(net, "DEL", raw)
    if rec is not None:  # delegated too: recorded files still ours after a take-over
        with Store(net.data_dir, net.name) as store:
            release_owned(store, rec)
            store.drop(rec)


# ---------------------------------------------------------------- iptables: masquerade and forward accept
#
# Each attachment owns one chain, CNIKIT-<hash>, in each table it uses (a chain name is per table):
#   nat:    POSTROUTING -s <pod> jumps to it; peers stay as they are, the rest is masqueraded (ipMasq);
#   filter: FORWARD -i <bridge> -s <pod> and -o <bridge> -d <pod> jump to it; it accepts what the pod
#           sends, replies and port-mapped (DNAT) connections to it, and connections from its peers
#           (forwardAccept).  A host whose FORWARD policy is DROP (Docker sets it; with br_netfilter,
#           bridge-nf-call-iptables=1, even frames between two ports of one bridge traverse FORWARD)
#           then passes the pod's traffic, and nobody else's.  The jumps are appended: an admin's own
#           rules earlier in FORWARD (Docker's DOCKER-USER) still decide first.
# Every rule carries the attachment's comment; the record lists them all (attachment_rules), and
# they go in, and come out, with one iptables-restore per family.

def attachment_hash(*parts):
    try:
        from _sha256 import sha256  # Python <= 3.11; hashlib costs 4 ms to import
    except ImportError:
        try:
            from _sha2 import sha256
        except ImportError:
            from hashlib import sha256
    return sha256("/".join(parts).encode()).hexdigest()


def host_veth_name(cid, ifname):
    return "veth" + attachment_hash(cid, ifname)[:11]


def chain_name(network, cid, ifname):
    return CHAIN_PREFIX + attachment_hash(network, cid, ifname)[:20]


def rule_comment(network, cid, ifname):
    """At most 255 characters (xt_comment); the network part always fits (names <= 200)."""
    return f"cnikit name: {network} id: {cid} if: {ifname}"[:255]


def tool(family, name):
    return name.replace("iptables", "ip6tables") if family == AF_INET6 else name


def rule_tables(net):
    """The iptables tables an attachment of NET has a chain in (none with ipMasqBackend nftables)."""
    if net.masq_backend == "nftables":
        return []
    return [table for table, on in (("nat", net.masq), ("filter", net.forward)) if on]


def peer_subnets(net, ips, family):
    """Where the pod's peers live: its own subnets and nonMasqueradeCIDRs (the cluster's pod
    range).  Traffic to them is never masqueraded, and connections from them are let in."""
    own = [fmt_cidr(*ip["subnet"]) for ip in ips if ip["family"] == family]
    return list(dict.fromkeys(own + [fmt_cidr(f, n, plen) for f, n, plen in net.no_masq if f == family]))


def attachment_rules(net, cid, ifname, ips):
    """What the attachment will own in iptables: the record's "iptables", one entry per family
    and table: {"family": 4 or 6, "table", "chains": [its own chains], "rules": [what goes in
    them], "jumps": [rules in built-in chains that lead to them]}.  ipMasq: the nat chain
    CNIKIT-<hash>, where traffic to its peers stays as is and the rest leaves masqueraded.
    forwardAccept: the filter chain of the same name, jumped to from FORWARD only for the pod's
    address through its link on the host (the bridge, or in routed mode its veth)."""
    chain = chain_name(net.name, cid, ifname)
    tag = '-m comment --comment "' + rule_comment(net.name, cid, ifname) + '"'
    dev = host_veth_name(cid, ifname) if net.routed else net.bridge
    entries = []
    for family in sorted({ip["family"] for ip in ips}):
        pods = [fmt_cidr(family, ip["n"], bits(family)) for ip in ips if ip["family"] == family]
        peers = peer_subnets(net, ips, family)
        for table in rule_tables(net):
            if table == "nat":
                rules = [f"-A {chain} -d {peer} {tag} -j ACCEPT" for peer in peers]
                rules.append(f"-A {chain} ! -d {MULTICAST[family]} {tag} -j MASQUERADE")
                jumps = [f"POSTROUTING -s {pod} {tag} -j {chain}" for pod in pods]
            else:
                rules = [rule for pod in pods for rule in
                         [f"-A {chain} -s {pod} {tag} -j ACCEPT",
                          f"-A {chain} -d {pod} -m conntrack --ctstate RELATED,ESTABLISHED,DNAT {tag} -j ACCEPT"]
                         + [f"-A {chain} -s {peer} -d {pod} {tag} -j ACCEPT" for peer in peers]]
                jumps = [f"FORWARD {flags} {tag} -j {chain}" for pod in pods
                         for flags in (f"-s {pod} -i {dev}", f"-d {pod} -o {dev}")]
            entries.append({"family": 4 if family == AF_INET else 6, "table": table, "chains": [chain],
                            "rules": rules, "jumps": jumps})
    return entries


def rules_by_family(entries):
    out = {}
    for e in entries:
        out.setdefault(AF_INET if e.get("family") == 4 else AF_INET6, []).append(e)
    return sorted(out.items())


def start_applying_rules(entries):
    """Create the chains, their rules and the jumps: one iptables-restore per family, started
    (wait_all waits): ADD makes the veth meanwhile."""
    jobs = []
    try:
        for family, group in rules_by_family(entries):
            lines = []
            for e in group:
                lines += [f"*{e['table']}"] + [f":{c} - [0:0]" for c in e["chains"]] + e["rules"]
                lines += ["-A " + j for j in e["jumps"]] + ["COMMIT"]
            jobs.append(start([tool(family, "iptables-restore"), "-w", "--noflush"],
                              stdin=("\n".join(lines) + "\n").encode()))
    except BaseException:
        wait_all(jobs, quiet=True)
        raise
    return jobs


def wait_all(jobs, quiet=False):
    """Wait for every job, then raise the first failure (QUIET: none; rollback has its own)."""
    first = None
    for job in jobs:
        try:
            job.wait()
        except CNIError as e:
            first = first or e
    if first is not None and not quiet:
        raise first


def remove_rules(entries):
    finish_removing_rules(start_removing_rules(entries))


def start_removing_rules(entries):
    """The fast way out: the rules are known, so one iptables-restore per family deletes the
    jumps, then flushes and deletes the chains.  It is only started: a commit that deletes
    costs the kernel ~15 ms, as deleting a veth does, and the two can wait side by side.
    finish_removing_rules waits for it."""
    started = []
    for family, group in rules_by_family(entries):
        lines = []
        for e in group:
            lines += [f"*{e['table']}"] + ["-D " + j for j in e["jumps"]]
            lines += [f"{op} {c}" for c in e["chains"] for op in ("-F", "-X")] + ["COMMIT"]
        try:
            job = start([tool(family, "iptables-restore"), "-w", "--noflush"], stdin=("\n".join(lines) + "\n").encode())
        except CNIError:
            job = None
        started.append((family, group, job))
    return started


def finish_removing_rules(started):
    """Wait for start_removing_rules' commands.  Where one failed (already gone, edited by hand,
    no iptables-restore), look at what is really there (iptables-save) and remove that."""
    for family, group, job in started:
        try:
            if job is None:
                raise CNIError(E_COMMAND, "iptables-restore did not start")
            job.wait()
        except CNIError:
            teardown_chains(sorted({c for e in group for c in e["chains"]}), (family,))


def teardown_chains(chains, families=(AF_INET, AF_INET6)):
    """Remove every rule jumping to our chains, then the chains, in every table (one
    iptables-save and one iptables-restore per family).  Missing ones are fine."""
    for family in families:
        if not which(tool(family, "iptables-save")):
            continue
        lines, table, present = [], None, []
        for line in run([tool(family, "iptables-save")]).splitlines():
            if line.startswith("*"):
                table, present = line, []
            elif line.startswith(":") and line[1:].split(" ", 1)[0] in chains:
                present.append(line[1:].split(" ", 1)[0])
                if len(present) == 1:
                    lines.append(table)
            elif line.startswith("-A ") and any(line.endswith(f" -j {c}") for c in present):
                lines.append("-D " + line[3:])
            elif line == "COMMIT" and present:
                lines += [f"-F {c}" for c in present] + [f"-X {c}" for c in present] + ["COMMIT"]
        if lines:
            run([tool(family, "iptables-restore"), "-w", "--noflush"], stdin=("\n".join(lines) + "\n").encode())


def teardown_unrecorded(net, cid, ifname):
    """Rules of an attachment whose record does not know them (older state): look for its chains
    in both families; a family we only guess at (no IPv6 tables) never fails DEL."""
    for family in (AF_INET, AF_INET6):
        try:
            teardown_chains([chain_name(net.name, cid, ifname)], (family,))
        except CNIError as e:
            log(f"  ignored: {e.msg} {e.details}")


def our_chains(network):
    """The CNIKIT- chains (any table) of this network's attachments, from the comments on the jumps."""
    found = set()
    for family in (AF_INET, AF_INET6):
        if not which(tool(family, "iptables-save")):
            continue
        for line in run([tool(family, "iptables-save")]).splitlines():
            if not line.startswith(("-A POSTROUTING ", "-A FORWARD ")) or f" -j {CHAIN_PREFIX}" not in line:
                continue
            if f'--comment "cnikit name: {network} id: ' in line:
                found.add(line.rsplit(" -j ", 1)[1])
    return found


# ---------------------------------------------------------------- nftables: macspoofchk, ipMasqBackend "nftables"
#
# Each attachment owns whole tables, cnikit-<hash> (the hash of its chains), commented like its
# iptables rules: macspoofchk a bridge-family table, ipMasqBackend "nftables" an inet one (masquerade
# and forward accept).  Removing one is one "delete table": nothing shared is edited.  nft runs
# only for a config that asks for these.

def nft_name(network, cid, ifname):
    return NFT_PREFIX + attachment_hash(network, cid, ifname)[:20]


def nft_comment(network, cid, ifname):
    return rule_comment(network, cid, ifname).replace('"', "")[:128]  # nft keeps 128 bytes of a comment


def attachment_nft(net, cid, ifname, ips, mac):
    """[(family, table, [lines of its body])] the attachment will own."""
    name, veth = nft_name(net.name, cid, ifname), host_veth_name(cid, ifname)
    head = [f'comment "{nft_comment(net.name, cid, ifname)}"']
    tables = []
    if net.spoofchk:  # the reference's rule: frames from the pod's port carry the pod's MAC, or are dropped
        tables.append(("bridge", name, head + [
            "chain prerouting {", "type filter hook prerouting priority -300; policy accept;",
            f'iifname "{veth}" ether saddr != {fmt_mac(mac)} drop', "}"]))
    if net.masq_backend == "nftables" and (net.masq or net.forward):
        dev = veth if net.routed else net.bridge
        lines = list(head)
        families = sorted({ip["family"] for ip in ips})
        if net.masq:
            lines += ["chain postrouting {", "type nat hook postrouting priority srcnat; policy accept;"]
            for family in families:
                kw = "ip" if family == AF_INET else "ip6"
                for pod in (fmt_ip(family, ip["n"]) for ip in ips if ip["family"] == family):
                    lines += [f"{kw} saddr {pod} {kw} daddr {peer} return" for peer in peer_subnets(net, ips, family)]
                    lines.append(f"{kw} saddr {pod} {kw} daddr != {MULTICAST[family]} masquerade")
            lines.append("}")
        if net.forward:
            lines += ["chain forward {", "type filter hook forward priority filter; policy accept;"]
            for family in families:
                kw = "ip" if family == AF_INET else "ip6"
                for pod in (fmt_ip(family, ip["n"]) for ip in ips if ip["family"] == family):
                    lines += [f'iifname "{dev}" {kw} saddr {pod} accept',
                              f'oifname "{dev}" {kw} daddr {pod} ct state established,related accept',
                              f'oifname "{dev}" {kw} daddr {pod} ct status dnat accept']
                    lines += [f'oifname "{dev}" {kw} saddr {peer} {kw} daddr {pod} accept'
                              for peer in peer_subnets(net, ips, family)]
            lines.append("}")
        tables.append(("inet", name, lines))
    return tables


def nft_forget(tables):
    """Script lines that remove TABLES whether or not they exist ("add" first: one transaction)."""
    return [line for family, name in tables for line in (f"add table {family} {name}", f"delete table {family} {name}")]


def start_nft(script):
    return start(["nft", "-f", "-"], stdin=("\n".join(script) + "\n").encode())


def start_applying_nft(tables):
    """The attachment's tables, made anew in one transaction (started: ADD goes on meanwhile)."""
    script = nft_forget([(f, n) for f, n, _ in tables])
    for family, name, body in tables:
        script += [f"table {family} {name} {{"] + body + ["}"]
    return [start_nft(script)] if tables else []


def remove_nft(entries):
    if entries:
        start_nft(nft_forget([(e["family"], e["table"]) for e in entries])).wait()


def our_nft_tables(network):
    """[(family, table)] of this network's attachments (any attachment), by their comments."""
    if not which("nft"):
        return []
    prefix = 'comment "' + f"cnikit name: {network} id: ".replace('"', "")[:128]
    found, table = [], None
    try:
        ruleset = run(["nft", "list", "ruleset"])
    except CNIError as e:  # no nf_tables here: then none of ours either
        log(f"  ignored: {e.msg} {e.details}")
        return []
    for line in ruleset.splitlines():  # a table's comment is the line after its head
        words = line.split()
        if table and line.strip().startswith(prefix):
            found.append(table)
        table = (words[1], words[2]) if len(words) == 4 and words[0] == "table" and words[2].startswith(NFT_PREFIX) \
            else None
    return found


# ---------------------------------------------------------------- host side

def sysctl_set(path, value):
    """Best effort, as the reference's: a missing file (no IPv6) is fine."""
    try:
        with open(path, "w") as f:
            f.write(value)
        log(f"  sysctl: {path} = {value}")
    except OSError as e:
        log(f"  sysctl: cannot set {path}: {e.strerror}")


def sysctl_on(path):
    try:
        with open(path, "r+") as f:
            if f.read().strip() != "1":
                log(f"  sysctl: {path} = 1")
                f.seek(0)
                f.write("1")
    except OSError as e:
        raise CNIError(E_KERNEL, f"cannot enable {path}: {e.strerror}")


def ensure_bridge(nl, net, ips):
    """The bridge, up, with the gateway addresses (with vlan: on the VLAN's gateway link, as the
    reference does): (bridge, [gateways this call added], the link holding them)."""
    br, created = nl.link(net.bridge), False
    if br is None:
        try:
            nl.add_bridge(net.bridge, net.mtu, random_mac(), net.promisc, net.vlan != 0 or net.trunk is not None)
            created = True
        except OSError as e:
            if e.errno == EOPNOTSUPP and (net.vlan or net.trunk is not None):
                raise CNIError(E_KERNEL, f"cannot create bridge {net.bridge} with vlan_filtering (for vlan, vlanTrunk): "
                                         "this kernel has no bridge VLAN filtering (CONFIG_BRIDGE_VLAN_FILTERING)")
            if e.errno != EEXIST:  # a parallel ADD created it first
                raise CNIError(E_KERNEL, f"cannot create bridge {net.bridge}: {e.strerror}")
        br = nl.link(net.bridge)
    if br is None or br["kind"] != "bridge":
        raise CNIError(E_CONFIG, f"{net.bridge} exists and is not a bridge")
    if created:  # we own the bridge's routes, as the reference does (only on creation: no cost per pod)
        sysctl_set(f"/proc/sys/net/ipv6/conf/{net.bridge}/accept_ra", "0")
    if net.promisc and not br["promisc"]:
        kernel(f"cannot set {net.bridge} promiscuous", nl.set_promisc, br["index"], net.bridge)
    if not br["up"]:
        kernel(f"cannot bring {net.bridge} up", nl.set_link, br["index"], net.bridge, True)
    added, holder = [], br
    if net.is_gw:
        if net.vlan:
            holder = ensure_vlan_gateway(nl, net, br)
        if net.force_addr:
            make_room(nl, holder, [(ip["family"], ip["gw"], ip["plen"]) for ip in ips])
        for ip in ips:  # no dump of the addresses (it grows with the pods' link-local ones): EEXIST says it
            gw = (ip["family"], ip["gw"], ip["plen"])
            try:
                nl.add_addr(holder["index"], holder["name"], *gw, exclusive=True)
                added.append(gw)
            except OSError as e:
                if e.errno != EEXIST:
                    undo_gateways(nl, holder, added)
                    raise CNIError(E_KERNEL, f"cannot add gateway address to {holder['name']}: {e.strerror}")
        if added and not created and holder is br:  # a bridge made by someone else: its MAC stops following its ports
            kernel(f"cannot set the MAC of {net.bridge}", nl.set_mac, br["index"], net.bridge,
                   bytes(int(x, 16) for x in br["mac"].split(":")))
        for family in {ip["family"] for ip in ips}:
            sysctl_on("/proc/sys/net/ipv4/ip_forward" if family == AF_INET else "/proc/sys/net/ipv6/conf/all/forwarding")
    return br, added, holder


def make_room(nl, holder, gateways):
    """forceAddress: the reference's rule that the gateway link holds one IPv4 address, and IPv6
    ones that do not overlap: the others go, before a missing gateway is added.  Removed after,
    an old primary address would take the new gateway with it (a secondary of the same subnet:
    the kernel drops those with their primary unless promote_secondaries is on).  Without
    forceAddress the reference refuses a second gateway; we keep both (several networks may
    share a bridge): see docs/plugin.md."""
    have = nl.addrs(holder["index"])
    for family, gw, plen in gateways:
        if (family, gw, plen) in have:  # already there: nothing to replace (as the reference)
            continue
        for f, n, p in have:
            if f != family or (f, n, p) in gateways or \
                    (f == AF_INET6 and network_of(f, n, min(p, plen)) != network_of(f, gw, min(p, plen))):
                continue
            try:
                nl.del_addr(holder["index"], holder["name"], f, n, p)
            except OSError as e:
                if e.errno != EADDRNOTAVAIL:  # gone already (with its primary, or a parallel ADD took it)
                    raise CNIError(E_KERNEL, f"cannot remove {fmt_cidr(f, n, p)} from {holder['name']}: {e.strerror}")


def undo_gateways(nl, holder, added):
    for gw in added:
        try:
            nl.del_addr(holder["index"], holder["name"], *gw)
        except OSError as e:
            log(f"  rollback: cannot remove gateway {fmt_cidr(*gw)}: {e.strerror}")


def ensure_vlan_gateway(nl, net, br):
    """The link "<bridge>.<vlan>" that holds the gateway of a VLAN: one end of a veth whose other
    end is a port of the bridge, untagged in the VLAN.  Shared by the VLAN's pods, so, like the
    bridge, it stays when they go."""
    name = f"{net.bridge}.{net.vlan}"
    link = nl.link(name)
    if link is None:
        port = "veth" + attachment_hash(net.bridge, str(net.vlan))[:11]
        host = posix.open("/proc/self/ns/net", posix.O_RDONLY | posix.O_CLOEXEC)
        try:
            nl.add_veth(port, name, br["mtu"], host, random_mac(), random_mac(), (br["index"], net.bridge))
            port_vlans(nl, br, nl.link(port), net.vlan, None, net.keep_default_vlan)
        except OSError as e:
            if e.errno != EEXIST:  # a parallel ADD made it
                raise CNIError(E_KERNEL, f"cannot create the VLAN gateway link {name}: {e.strerror}")
        finally:
            posix.close(host)
        link = nl.link(name)
        if link is None:
            raise CNIError(E_KERNEL, f"the VLAN gateway link {name} did not appear")
    if not link["up"]:
        kernel(f"cannot bring {name} up", nl.set_link, link["index"], name, True)
    return link


def port_vlans(nl, br, port, vlan, trunk, keep_default):
    """The reference's VLANs of a bridge port: the bridge's default VLAN removed (unless
    preserveDefaultVlan), VLAN as its untagged pvid, the trunk's ids tagged, and VLAN 1 untagged
    when there is a trunk but no VLAN."""
    if not vlan and not trunk:
        return
    if not keep_default and br["default_pvid"]:
        kernel(f"cannot remove the default VLAN of {port['name']}", nl.port_vlans, port["index"], port["name"],
               [(br["default_pvid"], False)], True)
    wanted = [(vlan, True)] * bool(vlan) + [(vid, False) for vid in trunk or ()] + [(1, True)] * (not vlan)
    kernel(f"cannot set the VLANs of {port['name']}", nl.port_vlans, port["index"], port["name"], wanted)


def drop_gateways(nl, net, br, gateways, rec):
    """A failed ADD takes back the gateway addresses it added, unless another attachment of the
    network has an address in that subnet by now (decided under the lock, which every ADD takes
    to reserve its address before it looks for the gateway)."""
    if not gateways:
        return
    with Store(net.data_dir, net.name) as store:
        others = {k for r in store.all_records() if r.key != rec.key for k in r.addresses()}
        if use_builtin(net):
            others |= {k for k, who in store.allocations().items() if who != f"{rec.cid}\r\n{rec.ifname}"}
        for family, gw, plen in gateways:
            if any(f == family and network_of(f, n, plen) == network_of(family, gw, plen) for f, n in others):
                log(f"  keeping gateway {fmt_cidr(family, gw, plen)}: another attachment uses the subnet")
                continue
            try:
                nl.del_addr(br["index"], br["name"], family, gw, plen)
            except OSError as e:
                log(f"  rollback: cannot remove gateway {fmt_cidr(family, gw, plen)}: {e.strerror}")


def container_routes(net, ips, ipam_routes):
    """[(family, dst, plen, gw)] for the pod: the IPAM routes plus the default route."""
    gws = {}
    for ip in ips:
        gws.setdefault(ip["family"], ip["gw"])
    routes = []
    for r in ipam_routes:
        try:
            family, dst, plen = parse_cidr(r["dst"])
            gw = parse_ip(r["gw"])[1] if r.get("gw") else gws.get(family)
        except (KeyError, ValueError, TypeError) as e:
            raise CNIError(E_CONFIG, f"invalid route {r!r}: {e}")
        routes.append((family, network_of(family, dst, plen), plen, gw, bool(r.get("gw"))))
    if net.default_gw:
        for family, gw in gws.items():
            if not any(r[0] == family and r[2] == 0 for r in routes):
                routes.append((family, 0, 0, gw, True))
    return routes


# ---------------------------------------------------------------- routed mode (point-to-point, no bridge)
# The pod's only neighbour is the host end of its veth: the pod holds <ip>/32, reaches the gateway
# address through a link route and everything else via it; the host end holds the gateway as /32
# (every host end holds the same one: an address is per interface) and the host routes <ip>/32 to
# it. Every packet between pods is routed by the host, never switched.

def routed_ips(ips):
    """The IPAM addresses as the pod holds them: host-sized (/32, /128), same gateway."""
    return [dict(ip, plen=bits(ip["family"])) for ip in ips]


def routed_container_routes(net, ips, ipam_routes):
    """A link route to each gateway first (it is on no subnet of the pod), then the usual routes."""
    gws = {(ip["family"], ip["gw"]) for ip in ips}
    return [(family, gw, bits(family), None, False) for family, gw in sorted(gws)] \
        + container_routes(net, ips, ipam_routes)


def routed_host_side(nl, veth, name, ips):
    """The host end: up, holding each gateway address as /32 (/128).  An IPv6 gateway without
    DAD (nodad): tentative, it would answer no neighbour solicitation for the second or two DAD
    takes, and the pod's first packets would wait (ptp leaves it tentative, but answers ADD only
    after the pod's own DAD, about as long).  Nothing to detect: the link reaches only the pod,
    which never holds the gateway."""
    kernel(f"cannot bring {name} up", nl.set_link, veth["index"], name, True)
    for family, gw in sorted({(ip["family"], ip["gw"]) for ip in ips}):
        kernel(f"cannot add gateway address to {name}", nl.add_addr, veth["index"], name, family, gw, bits(family),
               False, family == AF_INET6)
    for ip in ips:
        sysctl_on("/proc/sys/net/ipv4/ip_forward" if ip["family"] == AF_INET else "/proc/sys/net/ipv6/conf/all/forwarding")


def routed_host_routes(nl, veth, name, ips):
    """On the host: <pod ip>/32 dev <host end> (after the pod's end is up: a route needs a live link)."""
    for ip in ips:
        try:
            nl.add_route(ip["family"], ip["n"], bits(ip["family"]), None, veth["index"], name)
        except OSError as e:
            if e.errno != EEXIST:
                raise CNIError(E_KERNEL, f"cannot add route {fmt_cidr(ip['family'], ip['n'], bits(ip['family']))} "
                               f"dev {name}: {e.strerror}")


def routed_check(nl, veth, name, ips):
    """What CHECK verifies on the host in routed mode: the gateway on the host end, the /32 route to it."""
    have = set(nl.addrs(veth["index"]))
    tables = {}
    for ip in ips:
        family, host = ip["family"], bits(ip["family"])
        if (family, ip["gw"], host) not in have:
            return f"host veth {name} lacks the gateway address {fmt_cidr(family, ip['gw'], host)}"
        table = tables.setdefault(family, nl.routes(family))
        if not any(d == ip["n"] and p == host and o == veth["index"] for d, p, _, o in table):
            return f"host route {fmt_cidr(family, ip['n'], host)} dev {name} is missing"
    return ""


# ---------------------------------------------------------------- results

def build_result(net, br, veth, cont, netns, ips, routes, dns, vlan_link=None):
    with_mtu = net.version == "1.1.0"

    def iface(link, sandbox=None):
        out = {"name": link["name"], "mac": link["mac"]}
        if with_mtu:
            out["mtu"] = link["mtu"]
        if sandbox:
            out["sandbox"] = sandbox
        return out

    links = ([br] if br else []) + [veth]
    res = {"cniVersion": net.version, "interfaces": [iface(link) for link in links] + [iface(cont, netns)]
           + [iface(link) for link in [vlan_link] if link], "ips": [], "routes": []}
    for ip in ips:
        entry = {"address": fmt_cidr(ip["family"], ip["n"], ip["plen"]), "gateway": fmt_ip(ip["family"], ip["gw"]),
                 "interface": len(links)}
        if version_tuple(net.version) < (1, 0, 0):
            entry["version"] = "4" if ip["family"] == AF_INET else "6"
        res["ips"].append(entry)
    for family, dst, plen, gw, explicit in routes:
        route = {"dst": fmt_cidr(family, dst, plen)}
        if explicit:
            route["gw"] = fmt_ip(family, gw)
        res["routes"].append(route)
    if not res["routes"]:  # optional in the spec: left out, as the reference does, rather than []
        del res["routes"]
    res["dns"] = result_dns(net, dns)
    return res


def result_dns(net, ipam_dns):
    dns = {}
    rt = lower_keys(net.runtime.get("dns"))
    for src in (ipam_dns, net.dns):
        for key in ("nameservers", "domain", "search", "options"):
            if src.get(key):
                dns[key] = src[key]
    for rt_key, key in (("servers", "nameservers"), ("searches", "search"), ("domain", "domain"), ("options", "options")):
        if rt.get(rt_key):
            dns[key] = rt[rt_key]
    return dns


def requested_mac(net):
    """The pod's MAC as the reference reads it: runtimeConfig mac > args.cni.mac > CNI_ARGS MAC."""
    args_mac = lower_keys(lower_keys(net.raw.get("args")).get("cni")).get("mac")
    mac = net.runtime.get("mac") or args_mac or net.args.get("MAC") or ""
    if not mac:
        return None
    try:
        raw = bytes(int(x, 16) for x in mac.split(":"))
        if len(raw) != 6:
            raise ValueError
    except (ValueError, AttributeError):
        raise CNIError(E_CONFIG, f"invalid mac {mac!r}")
    return raw


# ---------------------------------------------------------------- verbs

def cmd_add(net, call):
    cid, ifname, netns = call.env["CNI_CONTAINERID"], call.env["CNI_IFNAME"], call.env["CNI_NETNS"]
    mac = requested_mac(net)
    if net.nft and not which("nft"):
        raise CNIError(E_CONFIG, "macspoofchk and ipMasqBackend \"nftables\" need the nft binary, not found in PATH")
    if net.spoofchk and mac is None:
        mac = random_mac()  # chosen here, as the kernel would: the spoof check knows it before the pod exists
    veth_name = host_veth_name(cid, ifname)
    with Container(netns) as pod, Netlink() as nl:
        if pod.nl.link(ifname):
            raise CNIError(E_EXISTS, f"interface {ifname} already exists in {netns}")
        if record_exists(net, cid, ifname):  # a duplicate ADD: never touch the live one
            raise CNIError(E_EXISTS, f"{cid} {ifname} is already attached to network {net.name} ({veth_name}): DEL it first")
        # (an attachment older than records fails below, on its veth's name, and gives back only its own)

        tables = []

        def make_record(ips):
            tables[:] = attachment_nft(net, cid, ifname, ips, mac)
            return Record(cid, ifname, [fmt_cidr(ip["family"], ip["n"], ip["plen"]) for ip in ips],
                          attachment_rules(net, cid, ifname, ips), veth_name,
                          [{"family": f, "table": t} for f, t, _ in tables])

        undo, held = [], None
        try:
            ips, ipam_routes, ipam_dns, rec = ipam_add(net, cid, ifname, call.raw, make_record)
            held = hold_record(record_path(net, cid, ifname), inherit=True)
            undo.append(lambda: ipam_undo(net, rec, ips, call.raw))
            adding = []
            if rec.rules:  # the record knows them already; iptables-restore inherits the record's lock
                undo.append(lambda: (wait_all(adding, quiet=True), remove_rules(rec.rules)))
                adding += start_applying_rules(rec.rules)
            if tables:
                undo.append(lambda: (wait_all(adding, quiet=True), remove_nft(rec.nft)))
                adding += start_applying_nft(tables)
            vlan_link = None
            if net.routed:
                ips, routes = routed_ips(ips), routed_container_routes(net, ips, ipam_routes)
                br = None
            else:
                routes = container_routes(net, ips, ipam_routes)
                br, gateways, holder = ensure_bridge(nl, net, ips)
                vlan_link = holder if holder is not br else None
                undo.append(lambda: drop_gateways(nl, net, holder, gateways, rec))
            mtu = net.mtu or (br or {}).get("mtu")
            if net.routed:
                kernel(f"cannot create veth {veth_name}", nl.add_veth, veth_name, ifname, mtu, pod.fd, mac)
                undo.append(lambda: nl.del_link(None, veth_name))
                veth = nl.link(veth_name)
                routed_host_side(nl, veth, veth_name, ips)
            else:  # born on the bridge and up, its MAC chosen here: nothing to look up or set after
                host_mac = random_mac()
                kernel(f"cannot create veth {veth_name} on {net.bridge}", nl.add_veth, veth_name, ifname, mtu, pod.fd,
                       mac, host_mac, (br["index"], net.bridge))
                undo.append(lambda: nl.del_link(None, veth_name))
                veth = {"name": veth_name, "mac": ":".join(f"{b:02x}" for b in host_mac), "mtu": mtu or br["mtu"],
                        "index": None}
            # as the reference: the host end takes no router advertisements (a pod's could give the host routes)
            sysctl_set(f"/proc/sys/net/ipv6/conf/{veth_name}/accept_ra", "0")
            if net.routed and any(ip["family"] == AF_INET6 for ip in ips):
                # before the pod's end is up, which gives the veth its carrier and its link-local
                # address: a tentative one, and the host sends no neighbour solicitation on the
                # link (it needs a usable link-local source) to forward a pod's packet to a pod
                sysctl_set(f"/proc/sys/net/ipv6/conf/{veth_name}/accept_dad", "0")
            if not net.routed and (net.hairpin or net.isolated or net.vlan or net.trunk):
                veth = dict(nl.link(veth_name), mac=veth["mac"])
                if net.hairpin or net.isolated:
                    kernel(f"cannot set the bridge port flags of {veth_name}", nl.set_port, veth["index"], veth_name,
                           net.hairpin, net.isolated)
                port_vlans(nl, br, veth, net.vlan, net.trunk, net.keep_default_vlan)
            cont = configure_container(pod, ifname, ips, routes, net.dad)
            if net.routed:
                routed_host_routes(nl, veth, veth_name, ips)
            wait_all(adding)  # started with the record: committed while the veth was made
            if br:
                port_ready(nl, veth_name)
            br = nl.link(net.bridge) if br else None  # its MAC follows its ports
        except BaseException as e:
            log(f"  ADD failed ({e}); rolling back")
            for step in reversed(undo):
                try:
                    step()
                except Exception as e2:
                    log(f"  rollback step failed: {e2}")
            raise
        finally:
            if held is not None:
                posix.close(held)
        return build_result(net, br, veth, cont, netns, ips, routes, ipam_dns, vlan_link)


def port_ready(nl, name):
    """Wait until the bridge has taken the port's carrier, so the pod's first frames pass: the
    veth has one once the pod's end is up, and the kernel tells the bridge from its linkwatch
    work queue, later, and only then moves the port out of "disabled" (to forwarding; with STP
    to listening, whose delays are the bridge's own).  The reference waits likewise, for the
    host end's operstate, which the same work sets.  Usually the port is ready at the first
    look (32 ADDs at once: every time).  Otherwise woken by the kernel, not by polling: a socket
    in the link group, joined before a second look, hears the bridge announce each change of
    the port (a poll's growing pauses overshoot, and each poll takes RTNL from the other ADDs).
    PORT_WAIT at most: a port that never gets there is an error, as in the reference."""
    import time
    start = time.monotonic()
    events = None
    try:
        while True:
            link = nl.link(name)
            if link is None:
                raise CNIError(E_KERNEL, f"{name} went away")
            if link["port_state"] != BR_STATE_DISABLED:
                if events is not None:
                    log(f"  bridge port {name} ready after {(time.monotonic() - start) * 1000:.1f} ms")
                return
            left = start + PORT_WAIT - time.monotonic()
            if left <= 0:
                raise CNIError(E_KERNEL, f"bridge port {name} still disabled after {PORT_WAIT:g} s (no carrier?)")
            if events is None:  # joined, then looked at again: no change falls between the two
                events = _socket.socket(AF_NETLINK, _socket.SOCK_RAW | _socket.SOCK_CLOEXEC, 0)
                events.bind((0, RTMGRP_LINK))
                only_link(events, link["index"])
                continue
            link_event(events, link["index"], left)
    finally:
        if events is not None:
            events.close()


def only_link(sock, index):
    """Let the kernel drop, before it wakes us, the announcements of other links (every other
    ADD's veth and port make theirs): a classic BPF filter passing only messages whose ifinfomsg
    names link INDEX.  The
    filter program is handed over by address, hence _ctypes; without it every announcement wakes
    the wait, which then skips the others itself (link_event), so failing here costs only CPU."""
    try:
        import _ctypes
    except ImportError:
        return
    want = int.from_bytes(struct.pack("=i", index), "big")  # BPF loads words in network order
    code = b"".join(struct.pack("=HBBI", *insn) for insn in (
        (BPF_LD_W_ABS, 0, 0, 20),                  # ifi_index: 16 bytes of nlmsghdr, then family, type
        (BPF_JEQ_K, 0, 1, want),
        (BPF_RET_K, 0, 0, 0xFFFFFFFF),              # the whole message
        (BPF_RET_K, 0, 0, 0)))                      # nothing: dropped

    class Byte(_ctypes._SimpleCData):
        _type_ = "B"

    class Program(_ctypes.Array):
        _type_, _length_ = Byte, len(code)

    program = Program.from_buffer_copy(code)
    try:  # struct sock_fprog: the instruction count, then a pointer to them (the kernel copies them)
        sock.setsockopt(SOL_SOCKET, SO_ATTACH_FILTER, struct.pack("@HP", len(code) // 8, _ctypes.addressof(program)))
    except OSError:
        pass


def link_event(sock, index, timeout):
    """Block until the kernel announces a change of link INDEX on SOCK: True; False when TIMEOUT
    seconds passed or the socket overflowed (an event may be lost).  The caller looks again."""
    import time
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        sock.settimeout(left)
        try:
            data = sock.recv(1 << 16)
        except _socket.timeout:
            return False
        except OSError:  # ENOBUFS: more announcements than the socket holds
            return False
        off = 0
        while off + 32 <= len(data):
            n, rtype = struct.unpack_from("=IH", data, off)
            if rtype in (RTM_NEWLINK, RTM_DELLINK) and struct.unpack_from("=i", data, off + 20)[0] == index:
                return True
            if n < 16:
                break
            off += (n + 3) & ~3


def random_mac():
    """A random unicast, locally administered MAC, as the kernel picks for a new veth."""
    raw = bytearray(posix.urandom(6))
    raw[0] = (raw[0] & 0xFE) | 0x02
    return bytes(raw)


def record_exists(net, cid, ifname):
    return exists(record_path(net, cid, ifname))


def configure_container(pod, ifname, ips, routes, dad=False):
    """Up (arp_notify on, as the reference), addresses, routes.  A pod with an IPv6 address gets
    the reference's DAD setting first: accept_dad 0 (its addresses usable at once), or with DAD
    (enabledad) accept_dad and enhanced_dad 1, and we wait for the detection to end."""
    cnl = pod.nl
    cont = cnl.link(ifname)
    if cont is None:
        raise CNIError(E_KERNEL, f"{ifname} did not appear in the container")
    v6 = any(ip["family"] == AF_INET6 for ip in ips)
    if v6:  # a namespace switch (~35 us): only where it matters, IPv6
        conf = f"/proc/sys/net/ipv6/conf/{ifname}/"
        pod.sysctls({conf + "enhanced_dad": "1", conf + "accept_dad": "1"} if dad else {conf + "accept_dad": "0"})
    kernel(f"cannot bring {ifname} up", cnl.set_link, cont["index"], ifname, True, None, True)
    for ip in ips:
        kernel(f"cannot add address to {ifname}", cnl.add_addr, cont["index"], ifname, ip["family"], ip["n"], ip["plen"])
    if dad and v6:
        settle(cnl, cont["index"], ifname)
    for family, dst, plen, gw, _ in routes:
        try:
            cnl.add_route(family, dst, plen, gw, cont["index"], ifname)
        except OSError as e:
            if e.errno != EEXIST:  # already there (e.g. the subnet's own route)
                raise CNIError(E_KERNEL, f"cannot add route {fmt_cidr(family, dst, plen)} in the container: {e.strerror}")
    return cont


def settle(cnl, index, ifname):
    """Wait until IPv6 duplicate address detection is over on the link (DAD_WAIT at most)."""
    import time
    deadline = time.monotonic() + DAD_WAIT
    while True:
        flags = [(f, n, p, fl) for f, n, p, fl in cnl.addrs(index, AF_INET6, flags=True)]
        for f, n, p, fl in flags:
            if fl & IFA_F_DADFAILED:
                raise CNIError(E_KERNEL, f"{fmt_cidr(f, n, p)} on {ifname} failed duplicate address detection")
        if not any(fl & IFA_F_TENTATIVE for *_, fl in flags):
            return
        if time.monotonic() > deadline:
            raise CNIError(E_KERNEL, f"{ifname} still has tentative addresses after {DAD_WAIT:g} seconds")
        time.sleep(0.05)


def cmd_del(net, call):
    """Best effort and repeatable: rules, veth, then the addresses - each may already be gone.
    What to remove comes from the attachment's record; no record means it owns nothing (unless
    records started after it: then iptables-save and the allocations are looked at)."""
    cid, ifname = call.env["CNI_CONTAINERID"], call.env["CNI_IFNAME"]
    rec, held = record_of(net, cid, ifname)
    try:
        del_attachment(net, call, rec)
    finally:
        if held is not None:
            posix.close(held)


def del_attachment(net, call, rec):
    cid, ifname = call.env["CNI_CONTAINERID"], call.env["CNI_IFNAME"]
    removing = start_removing_rules(rec.rules) if rec is not None and rec.rules is not None else []
    forgetting = [start_nft(nft_forget([(e["family"], e["table"]) for e in rec.nft]))] if rec is not None and rec.nft else []
    try:
        if rec is not None and rec.rules is None and (net.masq or net.forward):
            teardown_unrecorded(net, cid, ifname)
        veth_name = rec.veth if rec is not None else host_veth_name(cid, ifname)
        with Netlink() as nl:
            veth = nl.link(veth_name)
            if veth is not None:  # deleting our end removes the pod's end too, netns or not
                try:
                    nl.del_link(veth["index"], veth_name)
                except OSError as e:
                    if e.errno not in (ENODEV, ENOENT):
                        raise CNIError(E_KERNEL, f"cannot delete {veth_name}: {e.strerror}")
    finally:
        finish_removing_rules(removing)  # even when the veth failed: nothing we start outlives DEL
        wait_all(forgetting)  # a failure keeps the record (raised before ipam_del): a repeated DEL retries
    if rec is None and net.prev and use_builtin(net):  # prevResult's addresses, if still this attachment's
        rec = Record(cid, ifname, [ip["address"] for ip in net.prev.get("ips") or [] if isinstance(ip, dict)
                                   and isinstance(ip.get("address"), str)], [])
    ipam_del(net, rec, call.raw)


def cmd_check(net, call):
    prev = net.prev
    if prev is None:
        raise CNIError(E_CONFIG, "CHECK needs prevResult")
    if not use_builtin(net):
        delegate(net, "CHECK", call.raw)
    with Container(call.env["CNI_NETNS"]) as pod, Netlink() as nl:
        check_attachment(net, call.env, prev, pod.nl, nl)


def check_attachment(net, env, prev, cnl, nl):
    cid, ifname, netns = env["CNI_CONTAINERID"], env["CNI_IFNAME"], env["CNI_NETNS"]

    def fail(msg):
        raise CNIError(E_CHECK, msg)

    veth_name = host_veth_name(cid, ifname)
    veth = nl.link(veth_name)
    if net.routed:
        if veth is None:
            fail(f"host veth {veth_name} is missing")
    else:
        br = nl.link(net.bridge)
        if br is None or br["kind"] != "bridge":
            fail(f"bridge {net.bridge} is missing")
        if veth is None or veth["master"] != br["index"]:
            fail(f"host veth {veth_name} is missing or not attached to {net.bridge}")
    cont = cnl.link(ifname)
    if cont is None:
        fail(f"interface {ifname} is missing in {netns}")
    ifaces = prev.get("interfaces") or []
    if not isinstance(ifaces, list) or not all(isinstance(i, dict) and isinstance(i.get("mac", ""), str) for i in ifaces):
        raise CNIError(E_CONFIG, "invalid prevResult: interfaces must be a list of objects with string macs")
    if not isinstance(prev.get("routes") or [], list):
        raise CNIError(E_CONFIG, "invalid prevResult: routes must be a list")
    for i in ifaces:
        if i.get("name") == ifname and i.get("sandbox") and i.get("mac") and i["mac"].lower() != cont["mac"]:
            fail(f"{ifname} has MAC {cont['mac']}, prevResult says {i['mac']}")
    have = set(cnl.addrs(cont["index"]))
    try:
        ips = ipam_result_ips(prev)
    except (KeyError, ValueError, TypeError) as e:
        raise CNIError(E_CONFIG, f"invalid prevResult: {e}")
    for ip in ips:
        if (ip["family"], ip["n"], ip["plen"]) not in have:
            fail(f"{ifname} lacks address {fmt_cidr(ip['family'], ip['n'], ip['plen'])}")
    if use_builtin(net):
        store = Store(net.data_dir, net.name)
        for ip in ips:  # each allocation file read directly: no scan
            if store.owner(ip["family"], ip["n"]) != f"{cid}\r\n{ifname}":
                fail(f"address {fmt_ip(ip['family'], ip['n'])} is not allocated to {cid} {ifname}")
    tables = {}
    for r in prev.get("routes") or []:
        try:
            family, dst, plen = parse_cidr(r["dst"])
            gw = parse_ip(r["gw"])[1] if r.get("gw") else None
        except (KeyError, ValueError, TypeError) as e:
            raise CNIError(E_CONFIG, f"invalid route in prevResult {r!r}: {e}")
        table = tables.setdefault(family, cnl.routes(family))
        dst = network_of(family, dst, plen)
        if not any(d == dst and p == plen and (gw is None or g == gw) for d, p, g, _ in table):
            fail(f"route {r['dst']}{' via ' + r['gw'] if r.get('gw') else ''} is missing in {netns}")
    if net.routed:
        problem = routed_check(nl, veth, veth_name, ips)
        if problem:
            fail(problem)
    rec = load_record(record_path(net, cid, ifname), cid, ifname)
    if rec is not None and rec.rules:
        owned = [(AF_INET if e.get("family") == 4 else AF_INET6, e["table"], c) for e in rec.rules for c in e["chains"]]
    elif net.masq or net.forward:
        owned = [(family, table, chain_name(net.name, cid, ifname))
                 for family in sorted({ip["family"] for ip in ips}) for table in rule_tables(net)]
    else:
        owned = []
    for family, table, chain in owned:  # each chain listed on its own: no dump of the whole table
        try:
            run([tool(family, "iptables"), "-w", "-t", table, "-S", chain])
        except CNIError:
            fail(f"{table} chain {chain} is missing")
    for e in rec.nft if rec is not None else ():
        try:
            run(["nft", "list", "table", e["family"], e["table"]])
        except CNIError:
            fail(f"nft table {e['family']} {e['table']} is missing")
    if not net.routed and br["promisc"] != net.promisc:  # as the reference's CHECK
        fail(f"bridge {net.bridge} is{' not' * net.promisc} promiscuous, promiscMode is {str(net.promisc).lower()}")


def cmd_status(net, call):
    problems = []
    if net.nft and not which("nft"):
        problems.append("nft is not installed (needed for " + " and ".join(
            key for key, on in (("macspoofchk", net.spoofchk), ('ipMasqBackend "nftables"', net.masq_backend == "nftables"
                                                                and (net.masq or net.forward))) if on) + ")")
    if rule_tables(net) and not which("iptables-restore"):
        problems.append("iptables-restore is not installed (needed for " + " and ".join(
            key for key, on in (("ipMasq", net.masq), ("forwardAccept", net.forward)) if on) + ")")
    if use_builtin(net):
        try:
            sets = net.range_sets()
        except CNIError as e:
            problems.append(e.msg)
            sets = []
        try:
            with Store(net.data_dir, net.name) as store:
                taken = set(store.allocations())
        except CNIError as e:
            problems.append(e.msg)
            taken, sets = set(), []
        for rset in sets:
            if not any((r["family"], n) not in taken for r, n in candidates(rset, None)):
                problems.append("no IP addresses left in " + ", ".join(fmt_cidr(*r["subnet"]) for r in rset))
    elif not find_plugin(net.ipam_type):
        problems.append(f"IPAM plugin {net.ipam_type!r} not found in CNI_PATH")
    if problems:
        raise CNIError(E_NOT_AVAILABLE, "; ".join(problems))


def cmd_gc(net, call):
    valid = net.raw.get("cni.dev/valid-attachments", net.raw.get("cni.dev/attachments"))
    if not isinstance(valid, list):
        raise CNIError(E_CONFIG, "GC needs cni.dev/valid-attachments")
    if not all(isinstance(a, dict) and isinstance(a.get("containerID"), str) and isinstance(a.get("ifname"), str)
               for a in valid):
        raise CNIError(E_CONFIG, "cni.dev/valid-attachments: every entry needs string containerID and ifname")
    keep = {(a["containerID"], a["ifname"]) for a in valid}
    with Store(net.data_dir, net.name) as store:
        gone = [r for r in store.all_records() if (r.cid, r.ifname) not in keep]
    with Netlink() as nl:
        for rec in gone:  # what records know is removed without looking; the scans below find the rest
            if rec.rules:
                remove_rules(rec.rules)
            veth = nl.link(rec.veth)
            if veth is not None:
                kernel(f"cannot delete {rec.veth}", nl.del_link, veth["index"], rec.veth)
    keep_tables = {nft_name(net.name, cid, ifname) for cid, ifname in keep}
    stale_tables = {(e["family"], e["table"]) for rec in gone for e in rec.nft}
    stale_tables |= {t for t in our_nft_tables(net.name) if t[1] not in keep_tables}  # any config may have made them
    if stale_tables:
        start_nft(nft_forget(sorted(stale_tables))).wait()
    if net.masq or net.forward or which("iptables-save"):
        keep_chains = {chain_name(net.name, cid, ifname) for cid, ifname in keep}
        stale = [c for c in our_chains(net.name) if c not in keep_chains]
        if stale:
            teardown_chains(stale)
    if use_builtin(net) or net.ipam_type == "host-local":  # host-local's files are ours too
        with Store(net.data_dir, net.name) as store:
            for key, who in store.allocations().items():
                cid, _, ifname = who.partition("\r\n")
                if (cid, ifname) not in keep:
                    store.release(*key)
    with Store(net.data_dir, net.name) as store:
        for rec in gone:
            if rec.ips:
                release_owned(store, rec)  # a take-over's files under another IPAM type
            store.drop(rec)


class Verb:
    """A row of the verb table: the CNI_* variables it needs, the first cniVersion that has it."""

    def __init__(self, needs, since, run):
        self.needs, self.since, self.run = needs, since, run


POD_ENV = ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH")
VERBS = {  # VERSION is answered by the head, before this part of the file is loaded
    "ADD": Verb(POD_ENV, (0, 3, 0), cmd_add),
    "DEL": Verb(("CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"), (0, 3, 0), cmd_del),
    "CHECK": Verb(POD_ENV, (0, 4, 0), cmd_check),
    "STATUS": Verb((), (1, 1, 0), cmd_status),
    "GC": Verb((), (1, 1, 0), cmd_gc),
}


def check_env(call, needs):
    """The pod's CNI_* variables, present and well-formed (STATUS and GC have no pod)."""
    env = {}
    for name in needs:
        if not call.env.get(name):
            raise CNIError(E_ENV, f"required environment variable {name} is missing")
        env[name] = call.env[name]
    env["CNI_NETNS"] = call.env.get("CNI_NETNS", "") if needs else ""
    if "CNI_CONTAINERID" in env and not valid_name(env["CNI_CONTAINERID"]):
        raise CNIError(E_ENV, "invalid CNI_CONTAINERID: must match [a-zA-Z0-9][a-zA-Z0-9_.-]*")
    if "CNI_IFNAME" in env and not valid_ifname(env["CNI_IFNAME"]):
        raise CNIError(E_ENV, "invalid CNI_IFNAME: 1-15 characters, not . or .., no / : or whitespace")
    netns = env["CNI_NETNS"]
    if netns and (not netns.startswith("/") or "\0" in netns):
        raise CNIError(E_ENV, "invalid CNI_NETNS: must be an absolute path to a network namespace")
    if netns:
        try:
            check_netns(netns, must_exist=call.command != "DEL")
        except CNIError as e:
            if call.command != "DEL":
                raise
            # DEL never enters the namespace (removing our veth end removes the pod's), and
            # a runtime must be able to clean up after a half-removed pod: go on without it.
            log(f"  {e.msg}: DEL goes on without entering it")
    return env


def dispatch(call):
    """Look the verb up, check the environment, then the config, then run it."""
    if not call.command:
        raise CNIError(E_ENV, "required environment variable CNI_COMMAND is missing")
    verb = VERBS.get(call.command)
    if verb is None:
        raise CNIError(E_ENV, f"unknown CNI_COMMAND {call.command!r}")
    call.env.update(check_env(call, verb.needs))
    if call.error:
        raise call.error
    asked = call.conf.get("cniVersion")
    if asked not in SUPPORTED_VERSIONS:
        raise CNIError(E_VERSION, f"unsupported cniVersion {asked!r}", "supported: " + ", ".join(SUPPORTED_VERSIONS))
    if version_tuple(asked) < verb.since:
        raise CNIError(E_VERSION, f"{call.command} is not supported in cniVersion {asked}")
    net = Net(call.conf, parse_cni_args(call.env.get("CNI_ARGS", "")), teardown=call.command in ("DEL", "GC"))
    return verb.run(net, call)


HEAD_END = "# ==== end of the VERSION head ====\n"
# The compiled form (compile_plugin).  Its first line runs Python with a -c program instead of
# on the file, so Python never tokenizes what the file carries (tokenizing 100 kB of base64
# cost ~4 ms a call): the program reads the file and runs its text part, the lines above the
# first line that is only "#"; that text runs the marshalled code after it.
COMPILED_LOADER = "import sys;sys.argv[:1]=[];d=open(sys.argv[0],'rb').read();exec(d[:d.index(b'\\n#\\n')])"
COMPILED_TEXT = """#!{python} -ISc{loader}
# {name} compiled for {python} (bytecode {magic}) by `{python} -I -S {name} --compile`; source sha256 {sha}.
# The plain file does the same, slower: `cnikit cni install --plain`.  Run this file; `python3 FILE` cannot
# read it (below the line "#" is bytecode).
import marshal
_at = d.index(b"\\n#\\n") + 3
_head, _body, _source = d[_at:_at + {head}], d[_at + {head}:_at + {head} + {body}], d[_at + {head} + {body}:]
del d
if getattr(sys.modules.get("_frozen_importlib_external"), "MAGIC_NUMBER", None) == {magic!r}:
    exec(marshal.loads(_head))  # VERSION is answered here
    exec(marshal.loads(_body))
else:  # another Python: compile the source carried here (slower, the same plugin)
    from zlib import decompress
    exec(compile(decompress(_source), {name!r}, "exec"))
#
"""


def compiled_stamp(head):
    """What HEAD, the first two lines of a compiled plugin, says: {"python", "name", "magic",
    "sha"} ({} when they are not COMPILED_TEXT's), read back with COMPILED_TEXT itself, so the
    reader (cnikit, deciding whether an installed plugin is current) never restates it."""
    import re
    from string import Formatter
    fields = {"python": r"\S+", "name": r"\S+", "loader": r".+", "magic": r"b(?:'.*?'|\".*?\")",
              "sha": r"[0-9a-f]+"}
    pattern, seen = "", set()
    for literal, field, _, _ in Formatter().parse("\n".join(COMPILED_TEXT.split("\n")[:2])):
        pattern += re.escape(literal)
        if field:
            pattern += f"(?P={field})" if field in seen else f"(?P<{field}>{fields[field]})"
            seen.add(field)
    found = re.fullmatch(pattern, "\n".join(head.split("\n")[:2]))
    return {k: v for k, v in found.groupdict().items() if k != "loader"} if found else {}


SHEBANG_MAX = 127  # bytes of a #! line the kernel reads (255 since Linux 5.1; 127 before)


def compile_plugin(src, out):
    """Write OUT: SRC as one executable file that carries its bytecode for this interpreter
    (see COMPILED_LOADER): the part above HEAD_END (all VERSION loads), then the rest, each
    marshalled; then the source, compressed, which another Python (other bytecode) compiles.
    Python compiles a script it runs on every start (~15 ms for this one), and a zipapp costs
    ~7 ms of runpy imports.  No docstrings, no line tables: the bytecode is kept small
    (tracebacks never reach a user: see answer())."""
    import hashlib
    import marshal
    import zlib
    from importlib.util import MAGIC_NUMBER
    with open(src, "rb") as f:
        data = f.read()
    text = data.decode("utf-8")
    head, sep, body = text.partition(HEAD_END)
    if not sep:
        head, body = "", text
    name = src.rpartition("/")[2]

    lines = "co_linetable" if hasattr(compile("", "", "exec"), "co_linetable") else "co_lnotab"  # 3.10 renamed it

    def small(code):
        consts = tuple(small(c) if isinstance(c, type(code)) else c for c in code.co_consts)
        return code.replace(co_consts=consts, **{lines: b""})

    head_code = marshal.dumps(small(compile(head, name, "exec", dont_inherit=True, optimize=2)))
    body_code = marshal.dumps(small(compile("\n" * (head.count("\n") + 1) + body, name, "exec",
                                            dont_inherit=True, optimize=2)))  # the file's line numbers
    stub = COMPILED_TEXT.format(
        python=sys.executable, loader=COMPILED_LOADER, name=name, magic=MAGIC_NUMBER,
        sha=hashlib.sha256(data).hexdigest(), head=len(head_code), body=len(body_code)).encode()
    if len(stub.split(b"\n", 1)[0]) > SHEBANG_MAX:
        raise ValueError(f"the interpreter's path is too long for the first line ({SHEBANG_MAX} bytes): install --plain")
    fd = posix.open(out, posix.O_WRONLY | posix.O_CREAT | posix.O_TRUNC | posix.O_CLOEXEC, 0o755)
    with open(fd, "wb") as f:
        f.write(stub + head_code + body_code + zlib.compress(data, 9))
    posix.chmod(out, 0o755)
    return 0


def main():
    """The runtime's way in: PATH completed with the system directories (runtimes pass odd ones).
    `--compile SRC OUT` (never sent by a runtime) builds the installed form: see compile_plugin."""
    if sys.argv[1:2] == ["--compile"]:
        if len(sys.argv) != 4:
            sys.stderr.write("usage: python3 -I -S cni-bash-compatible.py --compile SRC OUT\n")
            return 2
        try:
            return compile_plugin(sys.argv[2], sys.argv[3])
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError) as e:
            sys.stderr.write(f"cannot compile {sys.argv[2]}: {e}\n")
            return 1
    path = getenv("PATH")
    path = ":".join([path] * bool(path) + [d for d in SYSTEM_PATH if d not in path.split(":")])
    posix.putenv("PATH", path)  # posix_spawnp searches the process's own PATH
    posix.environ[b"PATH"] = path.encode("utf-8", "surrogateescape")
    call = Call(environ())
    return answer(call, cmd_version if call.command == "VERSION" else dispatch)


if __name__ == "__main__":
    leave(main())
