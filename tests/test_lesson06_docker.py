"""Lesson 06 with Docker containers as the nodes (`stages/06_vxlan.py --docker`), against a
real dockerd started inside this test's sandbox: its own network namespace, tmpfs on the
directories dockerd writes (shared/notes/runtimes.md, "A real Docker daemon"), stopped by
its pid at the end. The lesson reaches it through DOCKER_HOST, as any docker client would.

Proof is taken from outside the lesson: the containers' kernel objects with `ip -j`, a ping
between the pods, tcpdump on the docker network's bridge (the underlay, in this namespace),
and, after the lesson, no labelled container, network or image, and this namespace's links,
namespaces and iptables rules as they were before it ran.
"""
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest

import cnikit
from sandbox_runtime import cgroup_dirs, drop_new_cgroups, drop_scratch_dir, mount_cgroups, pids_with_arg, \
    scratch_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LESSON = os.path.join(ROOT, "stages", "06_vxlan.py")
LABEL = "org.cnikit.lesson=06"
NODE1, NODE2 = "cnikit-06-node1", "cnikit-06-node2"
# Where dockerd writes besides its flags: tmpfs in the sandbox (empty, gone with it).
DOCKERD_PRIVATE = ("/etc/docker", "/var/lib/docker", "/run/docker", "/run/containerd")
START_SECONDS = 90          # a loaded 2-CPU machine; dockerd answers in about a second when idle
LESSON_SECONDS = 300
DASH = shutil.which("dash") or "/bin/dash"

needs_docker = pytest.mark.skipif(not (shutil.which("dockerd") and shutil.which("docker")),
                                  reason="Docker is not installed (Debian package docker.io)")


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class Dockerd:
    """dockerd in this test's sandbox; `self(...)` runs the docker client against it."""

    def __init__(self):
        cnikit.enter_sandbox(private_dirs=DOCKERD_PRIVATE)     # a fresh netns, tmpfs where dockerd writes
        mount_cgroups()                          # the sandbox's fresh /sys hides them; runc needs them
        self.cgroups = cgroup_dirs()
        self.dir = scratch_dir("d06")
        self.env = dict(os.environ, DOCKER_HOST=f"unix://{self.dir}/d.sock")
        self.log = open(f"{self.dir}/d.log", "w")
        self.proc = subprocess.Popen(
            ["dockerd", "-H", f"unix://{self.dir}/d.sock", "--data-root", f"{self.dir}/data",
             "--exec-root", f"{self.dir}/exec", "--pidfile", f"{self.dir}/d.pid"],
            stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL, start_new_session=True)

    def ready(self):
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline and self.proc.poll() is None:
            if self("info", check=False, timeout=20).returncode == 0:
                return True
            time.sleep(0.2)
        return False

    def __call__(self, *args, check=True, timeout=120, input=None):
        proc = subprocess.run(["docker", *args], capture_output=True, timeout=timeout, env=self.env,
                              input=input, stdin=None if input is not None else subprocess.DEVNULL,
                              text=input is None)
        if check and proc.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
        return proc

    def lesson(self, *args):
        return subprocess.run([sys.executable, LESSON, "--color", "never", *args], capture_output=True, text=True,
                              env=self.env, timeout=LESSON_SECONDS, stdin=subprocess.DEVNULL)

    def labelled(self):
        """Ids of whatever carries the lesson's label: containers, networks, images."""
        return [self(*cmd, "-q", "--filter", f"label={LABEL}").stdout.split()
                for cmd in (("ps", "-a"), ("network", "ls"), ("image", "ls"))]

    def stop(self):
        """Its containers, dockerd by its pid, then what it started (containerd and the shims
        name the scratch dir on their command lines), the cgroups they made, the scratch dir."""
        if self.proc.poll() is None:
            ids = self("ps", "-aq", check=False, timeout=30).stdout.split()
            if ids:
                self("rm", "-f", *ids, check=False, timeout=60)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in pids_with_arg(self.dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in pids_with_arg(self.dir)) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.log.close()
        drop_new_cgroups(self.cgroups)
        drop_scratch_dir(self.dir)


@pytest.fixture
def dockerd():
    daemon = Dockerd()
    try:
        if not daemon.ready():
            with open(f"{daemon.dir}/d.log") as f:
                pytest.fail("dockerd did not come up: " + f.read()[-1500:])
        yield daemon
    finally:
        daemon.stop()


def kernel_state():
    """This namespace's links, namespaces and iptables rules (what docker's network adds)."""
    links = sorted(link["ifname"] for link in json.loads(subprocess.run(
        ["ip", "-j", "link", "show"], capture_output=True, text=True, check=True).stdout))
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    rules = {table: subprocess.run(["iptables", "-t", table, "-S"], capture_output=True, text=True).stdout
             for table in ("filter", "nat")}
    return {"links": links, "netns": netns, "iptables": rules}


def in_node(daemon, node, *argv, check=True):
    return daemon("exec", node, *argv, check=check)


def bystander_tar():
    """An image of someone else's: the lesson's removal must leave it, it carries no label."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for d in ("usr", "tmp", "etc", "proc", "sys", "dev"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            t.addfile(info)
        for link in ("bin", "lib", "lib64"):
            info = tarfile.TarInfo(link)
            info.type, info.linkname = tarfile.SYMTYPE, "usr/" + link
            t.addfile(info)
    return buf.getvalue()


# ---------------------------------------------------------------- with a real dockerd

@needs_docker
def test_docker_run_passes_and_removes_everything_it_made(dockerd):
    before = kernel_state()
    run = dockerd.lesson("--docker")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr
    assert any(line.startswith("PASS lesson 06 vxlan-docker") for line in run.stdout.splitlines())
    # the docker commands are part of what the learner learns: they are printed
    for command in ("docker import ", "docker network create ", f"docker exec {NODE1} python3 ",
                    f"docker exec {NODE2} python3 "):
        assert any(line.startswith(command) for line in run.stdout.splitlines()), command
    if shutil.which("tcpdump"):
        assert "# check: the underlay carried pod1's ping inside UDP 4789 (VNI 42) to 192.0.2.12: ok" in run.stdout
    assert dockerd.labelled() == [[], [], []]
    assert dockerd("ps", "-aq").stdout.split() == []
    assert kernel_state() == before


@needs_docker
def test_docker_run_that_fails_or_is_interrupted_leaves_nothing(dockerd):
    before = kernel_state()
    failed = dockerd.lesson("--docker", "--skip", "vxlan")           # no vxlan0 in either half: no overlay
    assert failed.returncode == 1, failed.stdout[-3000:] + failed.stderr
    assert any(line.startswith("FAIL lesson 06 vxlan-docker") for line in failed.stdout.splitlines())
    assert dockerd.labelled() == [[], [], []]
    assert kernel_state() == before

    # Ctrl-C once the nodes run: SIGINT as a terminal sends it, when the lesson has printed node1's half
    run = subprocess.Popen([sys.executable, LESSON, "--color", "never", "--docker"], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, env=dockerd.env, stdin=subprocess.DEVNULL)
    try:
        seen = []
        for line in run.stdout:
            seen.append(line)
            if line.startswith(f"docker exec {NODE1} python3 "):
                run.send_signal(signal.SIGINT)
                break
        out, _ = run.communicate(timeout=LESSON_SECONDS)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 130, "".join(seen)[-2000:] + out[-2000:]
    assert "FAIL lesson 06 vxlan-docker: interrupted" in out
    assert dockerd.labelled() == [[], [], []]
    assert dockerd("ps", "-aq").stdout.split() == []
    assert kernel_state() == before


@needs_docker
def test_docker_keep_then_down_removes_only_what_carries_the_label(dockerd):
    before = kernel_state()
    run = dockerd.lesson("--docker", "--keep")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr
    assert "--docker --down" in run.stdout
    containers, networks, images = dockerd.labelled()
    assert len(containers) == 2 and len(networks) == 1 and len(images) == 1

    # The overlay, seen from outside the lesson: vxlan0 in node1 (VNI 42, UDP 4789, a port of br0),
    # pod1 pinging pod2, and on the docker network's bridge (the underlay, in this namespace) the
    # ping inside UDP 4789 between the two containers' addresses.
    vxlan = json.loads(in_node(dockerd, NODE1, "ip", "-j", "-d", "link", "show", "dev", "vxlan0").stdout)[0]
    assert vxlan["linkinfo"]["info_data"]["id"] == 42 and vxlan["linkinfo"]["info_data"]["port"] == 4789
    assert vxlan["master"] == "br0" and vxlan["mtu"] == 1450
    underlay = "br-" + dockerd("network", "inspect", "-f", "{{.Id}}", "cnikit-06").stdout.strip()[:12]
    capture = subprocess.Popen(["timeout", "20", "tcpdump", "-lni", underlay, "-c", "2",
                                "udp port 4789 and host 192.0.2.11 and host 192.0.2.12"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 15
        listening = ""
        while "listening on" not in listening and time.monotonic() < deadline:
            listening += capture.stderr.readline()
        ping = in_node(dockerd, NODE1, "ip", "netns", "exec", "pod1", "ping", "-c", "1", "-W", "2", "10.0.6.12",
                       check=False)
        assert ping.returncode == 0, ping.stdout + ping.stderr
        out, _ = capture.communicate(timeout=25)
    finally:
        if capture.poll() is None:
            capture.kill()
            capture.wait()
    assert "192.0.2.11" in out and "192.0.2.12.4789" in out, out

    # Another run while these are up refuses, in one line, and touches nothing.
    again = dockerd.lesson("--docker")
    assert again.returncode == 2 and again.stdout == ""
    assert len(again.stderr.strip().splitlines()) == 1 and "--docker --down" in again.stderr
    assert dockerd.labelled() == [containers, networks, images]

    # Someone else's container, network and image, without the label: --down leaves them.
    dockerd("import", "-", "bystander:local", input=bystander_tar())
    dockerd("network", "create", "bystander")
    dockerd("run", "-d", "--name", "bystander", "--network", "bystander", "-v", "/usr:/usr:ro",
            "bystander:local", "sleep", "infinity")
    down = dockerd.lesson("--docker", "--down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert dockerd.labelled() == [[], [], []]
    assert dockerd("ps", "-q", "--filter", "name=^bystander$").stdout.strip()
    assert dockerd("network", "ls", "-q", "--filter", "name=^bystander$").stdout.strip()
    assert dockerd("image", "ls", "-q", "bystander:local").stdout.strip()
    dockerd("rm", "-f", "bystander")
    dockerd("network", "rm", "bystander")
    dockerd("image", "rm", "bystander:local")
    assert kernel_state() == before


# ---------------------------------------------------------------- no daemon needed

def test_docker_dry_run_is_a_posix_sh_script_and_needs_no_docker(tmp_path):
    """PATH without docker: a dry run only prints."""
    dry = subprocess.run([sys.executable, LESSON, "--docker", "--dry-run"], capture_output=True, text=True,
                         env=dict(os.environ, PATH=str(tmp_path)), timeout=60)
    assert dry.returncode == 0, dry.stderr
    script = tmp_path / "lesson06-docker.sh"
    script.write_text(dry.stdout)
    assert subprocess.run([DASH, "-n", str(script)]).returncode == 0
    lines = dry.stdout.splitlines()
    assert any(line.startswith("docker import ") for line in lines)
    # it removes what it makes by label when it ends, however it ends
    assert any(line.startswith("trap cleanup EXIT") for line in lines)
    assert any(f"--filter label={LABEL}" in line for line in lines)


@pytest.mark.parametrize("args", [("--docker",), ("--docker", "--down")])
def test_docker_without_docker_fails_in_one_line_before_anything(args, tmp_path):
    """PATH without docker (the real lesson, no mock): exit 2, one line, nothing printed."""
    run = subprocess.run([sys.executable, LESSON, *args], capture_output=True, text=True,
                         env=dict(os.environ, PATH=str(tmp_path)), timeout=60)
    assert run.returncode == 2 and run.stdout == ""
    assert len(run.stderr.strip().splitlines()) == 1 and "docker" in run.stderr


@needs_docker
def test_docker_with_no_daemon_fails_in_one_line(tmp_path):
    """A docker client, but nothing listens where DOCKER_HOST points."""
    run = subprocess.run([sys.executable, LESSON, "--docker"], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, DOCKER_HOST=f"unix://{tmp_path}/none.sock"))
    assert run.returncode == 2 and run.stdout == ""
    assert len(run.stderr.strip().splitlines()) == 1 and "not reachable" in run.stderr


@pytest.mark.parametrize("args", [("--role", "node1", "--peer", "192.0.2.12"), ("--verify",), ("--host",)])
def test_docker_refuses_flags_of_the_other_modes(args):
    run = subprocess.run([sys.executable, LESSON, "--docker", *args], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stdout == ""
    assert len(run.stderr.strip().splitlines()) == 1
