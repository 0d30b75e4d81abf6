"""A container runtime (podman, containerd) inside cnikit's sandbox: what it needs there and
what it must leave behind. Used by stages/kindlike.py (lesson 07 --kind-like), the runtime
tests (tests/runtimes.py) and bench/container_start.py.

The sandbox's fresh /sys hides the cgroup mounts runc needs (mount_cgroups); a runtime's
state goes to a scratch tmpfs of the sandbox's private mount namespace (scratch_dir); the
cgroups a runtime creates outlive its containers (drop_new_cgroups).
"""
import os
import shutil
import subprocess
import tempfile

# The settings podman 4.3 needs on these machines (hybrid cgroups, no systemd, no
# CAP_SYS_RESOURCE), from shared/notes/runtimes.md, plus the CNI backend looking where we install.
CONTAINERS_CONF = """[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
runtime = "runc"
[network]
network_backend = "cni"
cni_plugin_dirs = ["/opt/cni/bin", "/usr/lib/cni"]
network_config_dir = "/etc/cni/net.d"
"""


def scratch_dir(prefix):
    """A short-path temp dir (podman refuses a runroot over 50 characters) on a tmpfs of this
    private mount namespace: whatever the runtime mounts or leaves there dies with it."""
    path = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=700", "scratch", path], check=True)
    return path


def drop_scratch_dir(path):
    subprocess.run(["umount", "-l", path], capture_output=True)
    shutil.rmtree(path, ignore_errors=True)


def mount_cgroups():
    """The sandbox mounted a fresh sysfs on /sys, which hides the cgroup mounts under it;
    runc needs them: mount the same hierarchies again (in this private mount namespace)."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, post = line.split(" - ", 1)
            mountpoint = pre.split()[4]
            fstype, _, options = post.split()[:3]
            if fstype in ("cgroup", "cgroup2") and mountpoint.startswith("/sys/fs/cgroup/") \
                    and (mountpoint, fstype, options) not in found:
                found.append((mountpoint, fstype, options))
    if os.path.isdir("/sys/fs/cgroup") and os.listdir("/sys/fs/cgroup"):
        return                                   # still visible: nothing hid them
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=755", "cgroup", "/sys/fs/cgroup"], check=True)
    if not found:                                # a pure cgroup2 host: one mount
        subprocess.run(["mount", "-t", "cgroup2", "cgroup2", "/sys/fs/cgroup"], check=False)
    for mountpoint, fstype, options in found:
        os.makedirs(mountpoint, exist_ok=True)
        opts = ",".join(o for o in options.split(",") if o != "rw")
        subprocess.run(["mount", "-t", fstype] + (["-o", opts] if opts else []) + [fstype, mountpoint],
                       capture_output=True)


def cgroup_dirs():
    """The top-level cgroups of every hierarchy: runtimes create parents (libpod_parent,
    default) that outlive their containers."""
    found = set()
    for root, dirs, _ in os.walk("/sys/fs/cgroup"):
        if root.count("/") > 4:
            dirs[:] = []
            continue
        if os.path.exists(os.path.join(root, "cgroup.procs")):
            found.update(os.path.join(root, d) for d in dirs)
            dirs[:] = []
    return found


def drop_new_cgroups(before):
    """Remove the (empty) cgroups a runtime created since BEFORE, deepest first."""
    for top in cgroup_dirs() - before:
        for root, dirs, _ in sorted(os.walk(top, topdown=False), key=lambda w: -w[0].count("/")):
            try:
                os.rmdir(root)
            except OSError:
                pass


def pids_with_arg(text):
    """The pids of the processes (this one excepted) whose command line holds TEXT."""
    pids = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        pids.append(int(pid))
            except OSError:
                continue
    return [p for p in pids if p != os.getpid()]
