"""Lesson 06 with Docker containers as the nodes (`stages/06_vxlan.py --docker`), against a
real dockerd in a sandbox of its own (tests/docker_daemon.py: its own network namespace,
tmpfs where dockerd writes, stopped by its pid), which already runs two containers of its
own that the lesson must leave alone. The lesson reaches it through DOCKER_HOST, as any
docker client would; each test joins the daemon's network namespace.

Proof is taken from outside the lesson: the containers' kernel objects with `ip -j`, a ping
between the pods, tcpdump on the docker network's bridge (the underlay), and, after the
lesson, no labelled container, network or image, the daemon's own containers and image still
there and working, and its namespace's links, addresses, routes and rules as before.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from docker_daemon import IDLE, IMAGE, WEB, docker_daemon  # noqa: F401  (docker_daemon: the fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LESSON = os.path.join(ROOT, "stages", "06_vxlan.py")
LABEL = "org.cnikit.lesson=06"
NODE1, NODE2 = "cnikit-06-node1", "cnikit-06-node2"
LESSON_SECONDS = 300
DASH = shutil.which("dash") or "/bin/dash"


def lesson(daemon, *args):
    return subprocess.run([sys.executable, LESSON, "--color", "never", *args], capture_output=True, text=True,
                          env=dict(os.environ, DOCKER_HOST=daemon.host), timeout=LESSON_SECONDS,
                          stdin=subprocess.DEVNULL)


def labelled(daemon):
    """Ids of whatever carries the lesson's label: containers, networks, images."""
    return [daemon(*cmd, "-q", "--filter", f"label={LABEL}").stdout.split()
            for cmd in (("ps", "-a"), ("network", "ls"), ("image", "ls"))]


def containers(daemon):
    return sorted(daemon("ps", "-a", "--format", "{{.Names}}").stdout.split())


def left_as_found(daemon):
    """Nothing of the lesson's is left; the daemon's own containers and image are, and work."""
    assert labelled(daemon) == [[], [], []]
    assert containers(daemon) == sorted([WEB, IDLE])
    assert daemon("image", "ls", "-q", IMAGE).stdout.strip()
    assert not daemon.changed()
    assert not daemon.broken()


# ---------------------------------------------------------------- with a real dockerd

def test_docker_run_passes_and_removes_everything_it_made(docker_daemon):
    docker_daemon.join()
    run = lesson(docker_daemon, "--docker")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr
    assert any(line.startswith("PASS lesson 06 vxlan-docker") for line in run.stdout.splitlines())
    # the docker commands are part of what the learner learns: they are printed
    for command in ("docker import ", "docker network create ", f"docker exec {NODE1} python3 ",
                    f"docker exec {NODE2} python3 "):
        assert any(line.startswith(command) for line in run.stdout.splitlines()), command
    if shutil.which("tcpdump"):
        assert "# check: the underlay carried pod1's ping inside UDP 4789 (VNI 42) to 192.0.2.12: ok" in run.stdout
    left_as_found(docker_daemon)


def test_docker_run_that_fails_or_is_interrupted_leaves_nothing(docker_daemon):
    docker_daemon.join()
    failed = lesson(docker_daemon, "--docker", "--skip", "vxlan")     # no vxlan0 in either half: no overlay
    assert failed.returncode == 1, failed.stdout[-3000:] + failed.stderr
    assert any(line.startswith("FAIL lesson 06 vxlan-docker") for line in failed.stdout.splitlines())
    left_as_found(docker_daemon)

    # Ctrl-C once the nodes run: SIGINT as a terminal sends it, when the lesson has printed node1's half
    run = subprocess.Popen([sys.executable, LESSON, "--color", "never", "--docker"], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, env=dict(os.environ, DOCKER_HOST=docker_daemon.host),
                           stdin=subprocess.DEVNULL)
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
    left_as_found(docker_daemon)


def test_docker_keep_then_down_removes_only_what_carries_the_label(docker_daemon):
    docker_daemon.join()
    run = lesson(docker_daemon, "--docker", "--keep")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr
    assert "--docker --down" in run.stdout
    made = labelled(docker_daemon)
    assert [len(ids) for ids in made] == [2, 1, 1]

    # The overlay, seen from outside the lesson: vxlan0 in node1 (VNI 42, UDP 4789, a port of br0),
    # pod1 pinging pod2, and on the docker network's bridge (the underlay, in this namespace) the
    # ping inside UDP 4789 between the two containers' addresses.
    vxlan = json.loads(docker_daemon("exec", NODE1, "ip", "-j", "-d", "link", "show", "dev", "vxlan0").stdout)[0]
    assert vxlan["linkinfo"]["info_data"]["id"] == 42 and vxlan["linkinfo"]["info_data"]["port"] == 4789
    assert vxlan["master"] == "br0" and vxlan["mtu"] == 1450
    underlay = "br-" + docker_daemon("network", "inspect", "-f", "{{.Id}}", "cnikit-06").stdout.strip()[:12]
    # Only the ping inside (inner IPv4 carrying ICMP, lesson 06's filter): the pods' own IPv6
    # chatter (router solicitations, MLD reports) crosses the overlay too and would fill the count.
    capture = subprocess.Popen(["timeout", "20", "tcpdump", "-lni", underlay, "-c", "2",
                                "udp port 4789 and host 192.0.2.11 and host 192.0.2.12 and udp[28:2] = 0x0800 "
                                "and udp[39] = 1"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 15
        listening = ""
        while "listening on" not in listening and time.monotonic() < deadline:
            listening += capture.stderr.readline()
        ping = docker_daemon("exec", NODE1, "ip", "netns", "exec", "pod1", "ping", "-c", "1", "-W", "2", "10.0.6.12",
                             check=False)
        assert ping.returncode == 0, ping.stdout + ping.stderr
        out, _ = capture.communicate(timeout=25)
    finally:
        if capture.poll() is None:
            capture.kill()
            capture.wait()
    assert "192.0.2.11" in out and "192.0.2.12.4789" in out, out

    # Another run while these are up refuses, in one line, and touches nothing.
    again = lesson(docker_daemon, "--docker")
    assert again.returncode == 2 and again.stdout == ""
    assert len(again.stderr.strip().splitlines()) == 1 and "--docker --down" in again.stderr
    assert labelled(docker_daemon) == made

    # The daemon's own containers and image carry no label, nor does a network of someone
    # else's on it: --down leaves them all.
    docker_daemon("network", "create", "bystander")
    down = lesson(docker_daemon, "--docker", "--down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert docker_daemon("network", "ls", "-q", "--filter", "name=^bystander$").stdout.strip()
    docker_daemon("network", "rm", "bystander")
    left_as_found(docker_daemon)


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


@pytest.mark.skipif(not shutil.which("docker"), reason="no docker client (Debian package docker.io)")
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
