"""Real container runtimes (podman with its CNI backend, containerd + ctr) inside a sandbox,
for the runtime tests and bench/container_start.py.

Everything they write goes to a temp dir (root, runroot, state, socket) or to the sandbox's
private tmpfs (/etc/cni, /var/lib/cni, /opt/cni/bin, /run/netns); nothing reaches the host's
runtime configuration. Images come from busybox-static: no registry is needed.
"""
import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import cnikit

# What any runtime needs in the sandbox lives next to the lessons (lesson 07 --kind-like runs
# podman too); bench/container_start.py imports it from here as well.
STAGES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "stages")
if STAGES not in sys.path:
    sys.path.append(STAGES)
from sandbox_runtime import CONTAINERS_CONF, cgroup_dirs, drop_new_cgroups, drop_scratch_dir, \
    mount_cgroups, pids_with_arg, scratch_dir  # noqa: E402,F401

BUSYBOX = "/bin/busybox"
APPLETS = ("sh", "ping", "ip", "sleep", "cat", "true", "ifconfig", "route")
IMAGE = "localhost/bb:latest"
# containerd's CRI runs every pod's sandbox ("pause") container from this image: busybox
# sleeping, imported into the k8s.io namespace, so nothing is ever pulled.
PAUSE_IMAGE = "localhost/pause:cnikit"
PAUSE_CMD = ["/bin/sleep", "2147483647"]
CRI_NAMESPACE = "k8s.io"


def busybox():
    for path in (BUSYBOX, "/usr/bin/busybox"):
        if os.path.exists(path):
            return path
    return None


def rootfs_tar():
    """A root filesystem with busybox and a few applet links, as tar bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for d in ("bin", "tmp", "etc", "proc", "sys", "dev"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            t.addfile(info)
        t.add(busybox(), "bin/busybox")
        for applet in APPLETS:
            info = tarfile.TarInfo("bin/" + applet)
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            t.addfile(info)
    return buf.getvalue()


def docker_archive(path, tag=IMAGE, cmd=("/bin/sh",)):
    """A docker-archive image (what `docker save` writes; `ctr images import` reads it)."""
    layer = rootfs_tar()
    layer_id = hashlib.sha256(layer).hexdigest()
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": list(cmd)},
                         "rootfs": {"type": "layers", "diff_ids": ["sha256:" + layer_id]}}).encode()
    config_id = hashlib.sha256(config).hexdigest()
    manifest = json.dumps([{"Config": config_id + ".json", "RepoTags": [tag],
                            "Layers": [layer_id + "/layer.tar"]}]).encode()
    with tarfile.open(path, "w") as t:
        for name, data in ((layer_id + "/layer.tar", layer), (config_id + ".json", config),
                           ("manifest.json", manifest)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def allocations(net):
    """{container id: address} from the IPAM files (host-local format: id on the first line)."""
    d = os.path.join(cnikit.CNI_DATA_DIR, net)
    found = {}
    for name in os.listdir(d) if os.path.isdir(d) else []:
        if name[0].isdigit() or ":" in name:
            with open(os.path.join(d, name)) as f:
                found[f.read().split()[0]] = name
    return found


class Podman:
    """podman with its own root, runroot and tmpdir under DIR, and a containers.conf there."""

    def __init__(self, directory):
        self.dir = directory
        conf = os.path.join(directory, "containers.conf")
        with open(conf, "w") as f:
            f.write(CONTAINERS_CONF)
        self.env = dict(os.environ, CONTAINERS_CONF=conf)
        self.base = ["podman", "--root", os.path.join(directory, "root"), "--runroot",
                     os.path.join(directory, "runroot"), "--tmpdir", os.path.join(directory, "tmp")]

    def __call__(self, *args, check=True, timeout=120):
        proc = subprocess.run(self.base + list(args), capture_output=True, text=True, env=self.env,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"podman {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def import_busybox(self):
        tar = os.path.join(self.dir, "rootfs.tar")
        with open(tar, "wb") as f:
            f.write(rootfs_tar())
        self("import", "--change", 'CMD ["/bin/sh"]', tar, IMAGE)

    def cannot_start(self):
        """Why podman cannot run a container at all here (None when it can)."""
        if not shutil.which("podman"):
            return "podman is not installed (apt-get install podman runc)"
        if not busybox():
            return "busybox-static is not installed (apt-get install busybox-static)"
        try:
            self.import_busybox()
            proc = self("run", "--rm", "--network", "none", IMAGE, "true", check=False)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            return f"podman cannot start: {e}"
        if proc.returncode != 0:
            return f"podman cannot start a container here (even without a network): {proc.stderr.strip()[-300:]}"
        return None

    def close(self):
        """Remove every container it still has (their DEL runs through the plugins)."""
        if shutil.which("podman"):
            self("rm", "-a", "-f", "-t", "0", check=False)


def cri_config(bin_dir, conf_dir):
    """containerd 1.6's CRI plugin section (what kubelet talks to): the pause image we
    import, the CNI directories, and restrict_oom_score_adj (without it runc fails here:
    no CAP_SYS_RESOURCE). Its streaming server (exec/attach) listens on loopback only."""
    cri = '[plugins."io.containerd.grpc.v1.cri"]'
    return (f'{cri}\n  sandbox_image = "{PAUSE_IMAGE}"\n  restrict_oom_score_adj = true\n'
            f'  stream_server_address = "127.0.0.1"\n  stream_server_port = "0"\n'
            f'{cri[:-1]}.cni]\n  bin_dir = "{bin_dir}"\n  conf_dir = "{conf_dir}"\n  max_conf_num = 1\n')


class Containerd:
    """A containerd of our own (root, state, socket under DIR), started with setsid and
    stopped by its pid; `ctr` talks to it. CRI=(bin_dir, conf_dir): its CRI service uses
    those CNI directories, with our pause image (tests/cri.py speaks to it)."""

    def __init__(self, directory, cri=None):
        self.dir = directory
        self.sock = os.path.join(directory, "containerd.sock")
        self.proc = None
        self.log = os.path.join(directory, "containerd.log")
        self.cri = cri

    def start(self):
        config = os.path.join(self.dir, "config.toml")
        with open(config, "w") as f:
            f.write(f'version = 2\nroot = "{self.dir}/root"\nstate = "{self.dir}/state"\n'
                    f'[grpc]\n  address = "{self.sock}"\n[ttrpc]\n  address = "{self.sock}.ttrpc"\n')
            if self.cri:
                f.write(cri_config(*self.cri))
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(["containerd", "--config", config], stdout=log, stderr=log,
                                         start_new_session=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if os.path.exists(self.sock) and self("version", check=False).returncode == 0:
                return True
            if self.proc.poll() is not None:
                return False
            time.sleep(0.1)
        return False

    def stop(self):
        """Stop what still runs in it (a test that failed half-way leaves pods and containers:
        their processes would outlive the shims), then containerd by its pid, and its shims."""
        if self.proc and self.proc.poll() is None:
            for ns in ("default", CRI_NAMESPACE):
                tasks = self("-n", ns, "tasks", "ls", "-q", check=False, timeout=30).stdout.split()
                for task in tasks:
                    self("-n", ns, "tasks", "kill", "-s", "KILL", task, check=False, timeout=30)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # its shims run in their own sessions: stop the ones under our state dir by pid
        for pid in pids_with_arg(self.dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    close = stop

    def argv(self, *args):
        return ["ctr", "--address", self.sock] + list(args)

    def __call__(self, *args, check=True, timeout=120):
        proc = subprocess.run(self.argv(*args), capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def cannot_start(self):
        if not shutil.which("containerd") or not shutil.which("ctr"):
            return "containerd is not installed (apt-get install containerd runc)"
        if not busybox():
            return "busybox-static is not installed (apt-get install busybox-static)"
        if not self.start():
            with open(self.log) as f:
                return "containerd did not start: " + f.read().strip()[-300:]
        self("images", "import", docker_archive(os.path.join(self.dir, "bb.tar")))
        if self.cri:
            self("-n", CRI_NAMESPACE, "images", "import",
                 docker_archive(os.path.join(self.dir, "pause.tar"), PAUSE_IMAGE, PAUSE_CMD))
        # runc keeps its state under /run/containerd/runc/<namespace>/<id> whatever containerd's own
        # state dir: an id of this process's, or two containerds at once (two workers) collide there
        proc = self("run", "--rm", IMAGE, f"probe-{os.getpid()}", "true", check=False)
        if proc.returncode != 0:
            return f"containerd cannot start a container here (even without a network): {proc.stderr.strip()[-300:]}"
        return None


def wait_for(predicate, seconds=20):
    """True as soon as PREDICATE() is (polled every 0.1 s), False after SECONDS."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


@contextlib.contextmanager
def runtime_session(make, tag):
    """A runtime of the test's own (MAKE(scratch dir): Podman or Containerd) with cgroups
    mounted in the sandbox. Skips, saying why, only when it cannot start even a container
    without a network. Afterwards: its containers gone, its scratch dir and the empty
    cgroups it left removed."""
    mount_cgroups()
    cgroups = cgroup_dirs()
    directory = scratch_dir(tag)
    rt = make(directory)
    try:
        reason = rt.cannot_start()
        if reason:
            import pytest        # only the tests use this; the bench imports this module too
            pytest.skip(reason)
        yield rt
    finally:
        rt.close()
        drop_scratch_dir(directory)
        drop_new_cgroups(cgroups)
