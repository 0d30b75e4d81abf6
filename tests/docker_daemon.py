"""A real Docker daemon (Debian's docker.io, dockerd 20.10) in a sandbox of its own, for the
"docker_real" host profile (tests/host_profiles.py).

dockerd runs in a fresh network namespace and a private mount namespace (cnikit's sandbox)
with tmpfs on /etc/docker, /var/lib/docker, /run/docker and /run/containerd and its data,
exec root, pid file and socket on a scratch tmpfs; it writes its real rules there (FORWARD
policy DROP, DOCKER-USER, DOCKER-ISOLATION-STAGE-1/2, MASQUERADE, DNAT for published ports,
bridge-nf-call-iptables=1) and never sees the real host's iptables or interfaces.

Starting it costs seconds, so a module shares one (the `docker_daemon` fixture); a test joins
its network namespace only (`join`), keeping the private mount namespace of its own sandbox,
and reaches the socket through /proc/<dockerd>/root.  The daemon is started detached (setsid
--fork): the sandbox fixture kills a test's descendants at its end and must not kill it.
At the end of the module: its containers, dockerd (by pid), its containerd and shims (by
their command lines, which name the scratch dir) and the cgroups they made are gone.

Images: no registry is reachable, so `docker import` of a tar holding a few directories and
the links bin -> usr/bin, sbin, lib, lib64; containers run with the host's /usr bind-mounted
read-only (python3, iproute2, busybox are then there).
"""
import ctypes
import io
import json
import os
import re
import shutil
import signal
import subprocess
import tarfile
import time

import pytest

import cnikit
from sandbox_runtime import cgroup_dirs, drop_new_cgroups, drop_scratch_dir, mount_cgroups, pids_with_arg, \
    scratch_dir

IMAGE = "cnikit/usr:latest"
# The containers a Docker host has running: one serving HTTP on a published port, one idle.
# Docker's published port: not 8080, which lesson 05b publishes itself (it refuses a host where it is taken).
WEB, IDLE, PUBLISHED, SERVED = "web", "idle", 8088, 8000
# Where dockerd looks besides its flags (key.json, default roots): tmpfs in its sandbox.
PRIVATE = ("/etc/docker", "/var/lib/docker", "/run/docker", "/run/containerd")
CLONE_FS = 0x00000200
START_SECONDS = 60          # a loaded 2-CPU machine; `docker info` answers in ~1 s when idle


def docker_binary():
    """docker.io's client (/usr/bin/docker) before any other `docker` on PATH."""
    return "/usr/bin/docker" if os.access("/usr/bin/docker", os.X_OK) else shutil.which("docker")


def image_tar():
    """A root filesystem for `docker import`: directories and the links a merged-/usr system
    has; the containers get /usr itself from the host (-v /usr:/usr:ro)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for d in ("usr", "tmp", "etc", "proc", "sys", "dev", "root", "run", "var"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755
            t.addfile(info)
        for link in ("bin", "sbin", "lib", "lib64"):
            info = tarfile.TarInfo(link)
            info.type, info.linkname = tarfile.SYMTYPE, "usr/" + link
            t.addfile(info)
    return buf.getvalue()


def _libc_call(name, *args):
    if getattr(ctypes.CDLL(None, use_errno=True), name)(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}{args}: {os.strerror(err)}")


def enter(net=None, mnt=None):
    """This thread into the namespaces whose file descriptors are NET and MNT (either may be
    None). Entering a mount namespace needs a filesystem context of its own and moves the
    working directory to its root: keep it."""
    cwd = os.getcwd()
    if mnt is not None:
        _libc_call("unshare", CLONE_FS)
        _libc_call("setns", mnt, 0)
    if net is not None:
        _libc_call("setns", net, 0)
    os.chdir(cwd)


def _namespaces():
    return os.open("/proc/self/ns/net", os.O_RDONLY), os.open("/proc/self/ns/mnt", os.O_RDONLY)


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _kill_cgroups(tops, seconds=10):
    """Kill whatever still runs in the cgroups under TOPS (a container whose shim was killed
    keeps running), until they are empty or SECONDS have passed."""
    deadline = time.monotonic() + seconds
    while True:
        pids = set()
        for top in tops:
            for root, _, files in os.walk(top):
                if "cgroup.procs" in files:
                    with open(os.path.join(root, "cgroup.procs")) as f:
                        pids.update(int(p) for p in f.read().split())
        if not pids or time.monotonic() > deadline:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


class DockerDaemon:
    """dockerd in a sandbox of its own; `self(...)` runs the docker client against it."""

    def __init__(self):
        self.net = self.mnt = None
        self.pid = None
        self.dir = None
        self.log = ""
        self.baseline = None

    # ------------------------------------------------------------ start / stop

    def start(self):
        """Start dockerd in a fresh sandbox and come back to the namespaces this ran in.
        Returns None, or why Docker cannot run here (the tests then skip, saying so)."""
        if not shutil.which("dockerd") or not docker_binary():
            return "Docker is not installed (make deps installs docker.io)"
        here = _namespaces()
        try:
            cnikit.enter_sandbox(private_dirs=PRIVATE)
            self.net, self.mnt = _namespaces()
            mount_cgroups()                  # the sandbox's fresh /sys hides them; runc needs them
            self.dir = scratch_dir("dkr")
            return self._spawn()
        finally:
            enter(*here)
            for fd in here:
                os.close(fd)

    def _spawn(self):
        argv = ["dockerd", "-H", f"unix://{self.dir}/d.sock", "--data-root", f"{self.dir}/data",
                "--exec-root", f"{self.dir}/exec", "--pidfile", f"{self.dir}/d.pid",
                # containers under a cgroup of this daemon's own, not the machine-wide "docker"
                # another dockerd may share: what stop() kills and removes is this daemon's only
                "--cgroup-parent", "/" + os.path.basename(self.dir)]
        with open(f"{self.dir}/d.log", "w") as log:
            # setsid --fork: dockerd is nobody's child here, so no test's teardown kills it
            subprocess.run(["setsid", "--fork", *argv], stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                           check=True)
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if self.pid is None and os.path.exists(f"{self.dir}/d.pid"):
                with open(f"{self.dir}/d.pid") as f:
                    self.pid = int(f.read().strip() or 0) or None
            if self.pid and self("info", check=False, timeout=10).returncode == 0:
                return None
            if self.pid and not _alive(self.pid):
                break
            time.sleep(0.2)
        with open(f"{self.dir}/d.log") as f:
            self.log = f.read()
        return "dockerd did not come up: " + (self.log.strip()[-400:] or "no output")

    def stop(self):
        """Its containers, dockerd by pid, then whatever it started (containerd and its shims name
        the scratch dir in their command lines, containers are in the cgroups it made), then
        those cgroups."""
        if self.pid and _alive(self.pid):
            ids = self("ps", "-aq", check=False, timeout=30).stdout.split()
            if ids:
                self("rm", "-f", *ids, check=False, timeout=60)
            os.kill(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + 20
            while _alive(self.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
        for pid in ([self.pid] if self.pid else []) + (pids_with_arg(self.dir) if self.dir else []):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.mnt is not None:
            here = _namespaces()
            try:
                enter(mnt=self.mnt)
                # runc removes a container's cgroup as the container goes: retry until ours are gone
                deadline = time.monotonic() + 10
                while self._cgroups() and time.monotonic() < deadline:
                    _kill_cgroups(self._cgroups())
                    drop_new_cgroups(cgroup_dirs() - set(self._cgroups()))
                    time.sleep(0.1)
                drop_scratch_dir(self.dir)
            finally:
                enter(*here)
                for fd in here + (self.net, self.mnt):
                    os.close(fd)
            self.net = self.mnt = None

    def _cgroups(self):
        """The top-level cgroups of this daemon's containers (--cgroup-parent), one per hierarchy."""
        return [d for d in cgroup_dirs() if os.path.basename(d) == os.path.basename(self.dir)]

    # ------------------------------------------------------------ the client

    @property
    def host(self):
        """The socket as seen from any mount namespace: through dockerd's own root."""
        return f"unix:///proc/{self.pid}/root{self.dir}/d.sock"

    def __call__(self, *args, check=True, timeout=120):
        proc = subprocess.run([docker_binary(), "-H", self.host, *args], capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def import_image(self):
        proc = subprocess.run([docker_binary(), "-H", self.host, "import", "-", IMAGE], input=image_tar(),
                              capture_output=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"docker import exited {proc.returncode}: {proc.stderr.decode().strip()}")

    def run(self, name, *cmd, publish=None):
        """A detached container NAME running CMD from the host's /usr; PUBLISH "host:container"."""
        extra = ["-p", publish] if publish else []
        self("run", "-d", "--name", name, "-v", "/usr:/usr:ro", *extra, IMAGE, *cmd)
        return self.inspect(name)

    def inspect(self, name):
        return json.loads(self("inspect", name).stdout)[0]

    def address(self, name):
        return self.inspect(name)["NetworkSettings"]["Networks"]["bridge"]["IPAddress"]

    def start_containers(self):
        self.run(WEB, "python3", "-m", "http.server", "--bind", "0.0.0.0", str(SERVED),
                 publish=f"{PUBLISHED}:{SERVED}")
        self.run(IDLE, "sleep", "infinity")

    # ------------------------------------------------------------ a test inside it

    def join(self):
        """Move the calling test into dockerd's network namespace (its mount namespace stays the
        test sandbox's own); /sys is mounted again so that it shows this namespace's links."""
        enter(net=self.net)
        subprocess.run(["mount", "-t", "sysfs", "sysfs", "/sys"], capture_output=True)
        # A container port's IPv6 link-local address (and its routes) comes after duplicate
        # address detection: the host a test sees before and after must be a settled one.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and subprocess.run(
                ["ip", "-6", "addr", "show", "tentative"], capture_output=True, text=True).stdout.strip():
            time.sleep(0.1)
        if self.baseline is None:
            self.baseline = self.state()

    def state(self):
        """What the tests sharing this daemon must leave as they found it: links, addresses,
        routes, every table's rules."""
        out = {what: subprocess.run(["ip", *argv], capture_output=True, text=True).stdout
               for what, argv in (("links", ["-br", "link"]), ("addrs", ["-br", "addr"]),
                                  ("routes", ["route", "show", "table", "all"]))}
        out["links"] = "\n".join(sorted(line.split()[0] for line in out["links"].splitlines()))
        out["rules"] = iptables_save()
        return out

    def changed(self):
        """What differs from the host the first test found (empty: nothing)."""
        now = self.state()
        return [f"{key}: before {self.baseline[key]!r}, now {now[key]!r}" for key in now
                if now[key] != self.baseline[key]]

    def gateway(self):
        """docker0's address: where the host reaches its published ports (DNAT in OUTPUT)."""
        return self.inspect(WEB)["NetworkSettings"]["Networks"]["bridge"]["Gateway"]

    def broken(self, wait=20):
        """From a joined test: why Docker does not work (None when it does): every container
        answers a ping and the published port answers HTTP. The server may still be starting:
        retried until WAIT seconds have passed."""
        deadline = time.monotonic() + wait
        while True:
            why = self._broken()
            if not why or time.monotonic() > deadline:
                return why
            time.sleep(0.2)

    def _broken(self):
        for name in (WEB, IDLE):
            if not self.inspect(name)["State"]["Running"]:
                return f"container {name} is not running"
            addr = self.address(name)
            if subprocess.run(["ping", "-c", "1", "-W", "2", addr], capture_output=True).returncode:
                return f"container {name} ({addr}) does not answer a ping"
        return http_get(self.gateway(), PUBLISHED)


def http_get(addr, port, ns=None):
    """None when http://ADDR:PORT/ answers 200 (from namespace NS), else what happened."""
    code = ("import sys, urllib.request\n"
            "try:\n    print(urllib.request.urlopen(sys.argv[1], timeout=3).status)\n"
            "except Exception as e:\n    print(e)\n")
    argv = (["ip", "netns", "exec", ns] if ns else []) + ["python3", "-I", "-c", code, f"http://{addr}:{port}/"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip()
    return None if out == "200" else f"http://{addr}:{port}/ from {ns or 'the host'}: {out or 'no answer'}"


def iptables_save():
    """Every table's rules (IPv4 and IPv6) as iptables-save -c prints them, with only the packet
    and byte counters (and the dated comment lines) taken out: equal means byte-identical rules."""
    text = ""
    for tool in ("iptables-save", "ip6tables-save"):
        out = subprocess.run([tool, "-c"], capture_output=True, text=True).stdout
        text += "".join(re.sub(r"\[\d+:\d+\]", "[0:0]", line) + "\n" for line in out.splitlines()
                        if not line.startswith("#"))
    return text


@pytest.fixture(scope="module")
def docker_daemon():
    """One real dockerd for the tests of a module, with containers running (WEB publishing a
    port, IDLE); skips, saying why, where Docker cannot run. Each test cleans what it made in
    its network namespace."""
    daemon = DockerDaemon()
    try:
        reason = daemon.start()
        if not reason:
            try:
                daemon.import_image()
                daemon.start_containers()
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                reason = f"dockerd runs but cannot run a container here: {e}"
        if reason:
            pytest.skip(reason)
        yield daemon
    finally:
        daemon.stop()
