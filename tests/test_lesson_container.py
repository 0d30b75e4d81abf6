"""Lesson 07e (your container is a namespace): it PASSes in its sandbox and leaves nothing (no
process, namespace, link or rule); what it says it found is what the kernel has, looked up here
independently (ip -j, /proc, nsenter, a real TCP connection over the pod's localhost); each
--skip makes the proof it names FAIL; --host refuses a namespace name it would reuse.

Its dry run under `dash -e` (tests/test_dryrun_dash.py) and its --host runs on the Docker-host
and kind-node profiles (tests/test_host_profiles.py) are covered where every lesson is.
"""
import ipaddress
import json
import os
import re
import shutil
import subprocess
import uuid

import pytest

from docker_daemon import WEB, docker_daemon, iptables_save  # noqa: F401  (docker_real's daemon)
from host_profiles import docker_real  # noqa: F401
from host_state import host_state
from kernel import ROOT, kill_left, load_file, run_stage
from test_stages import _assigned_and_targets      # the same reading of a dry run as every lesson's

SCRIPT = "07e_container.py"
TIMEOUT = 60
MARK = "CNIKIT_LESSON_07E"       # every process a lesson run starts inherits it


def load():
    return load_file(os.path.join(ROOT, "stages", SCRIPT), "lesson_07e")


def verdict(proc):
    lines = [l for l in proc.stdout.splitlines() if l.startswith(("PASS lesson", "FAIL lesson"))]
    return lines[-1] if lines else ""




def assert_no_process_left(mark):
    left = kill_left(MARK, mark)
    assert not left, f"the lesson left {len(left)} process(es) running: {left}"


def ip_json(*args, pid=None):
    argv = (["nsenter", "-t", str(pid), "-n"] if pid else []) + ["ip", "-j", *args]
    return json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)


def netns_inode(pid="self"):
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def run_marked(*args, env=None, input=None):
    mark = uuid.uuid4().hex
    proc = run_stage(SCRIPT, *args, env=dict(os.environ, **{MARK: mark}, **(env or {})), input=input,
                     timeout=TIMEOUT)
    assert_no_process_left(mark)
    return proc


# ---------------------------------------------------------------- the lesson as a learner runs it

def test_lesson_passes_in_its_sandbox_and_leaves_nothing():
    before = host_state()
    proc = run_marked()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    assert verdict(proc).startswith("PASS lesson 07e container")
    out = proc.stdout
    assert "FAILED" not in out and "Traceback" not in proc.stderr
    # found from the outside, step by step: the PID's namespace, nsenter, identify, the peer index
    assert re.search(r"^readlink /proc/\d+/ns/net /proc/self/ns/net\nnet:\[\d+\]\nnet:\[\d+\]$", out, re.M)
    assert re.search(r"^nsenter -t \d+ -n ip -br addr$", out, re.M)
    identify = re.search(r"^ip netns identify (\d+)\n\nip netns attach c1 \1\nip netns identify \1\nc1$", out, re.M)
    assert identify, out
    peer = re.search(r"^\d+: eth0@if(\d+):", out, re.M)
    assert peer and re.search(rf"^{peer.group(1)}: veth-c1@if\d+: .* master br0 ", out, re.M)
    assert re.search(r"^-A CNIKIT-NAT-\w+ -s 10\.0\.9\.0/24 -o uplink0 .*-j MASQUERADE$", out, re.M)
    assert re.search(r"^nsenter -t \d+ -n socat -u TCP:127\.0\.0\.1:8080,connect-timeout=2 -\n"
                     r"hello-from-app-over-localhost$", out, re.M)
    assert host_state() == before


def test_what_the_lesson_finds_is_what_the_kernel_has():
    """build() in this test's sandbox, then every fact its proofs rest on looked up here
    independently, before its own verify() runs and tears the containers down."""
    mod = load()
    L = mod.LESSON.start(quiet=True)
    rt = mod.Runtime()
    try:
        mod.build(L, rt)
        record, procs = rt.record, rt.pod_procs
        pid = int(record["pid"])
        assert netns_inode(pid) != netns_inode()
        eth0 = ip_json("addr", "show", "dev", "eth0", pid=pid)[0]
        assert [a["local"] for a in eth0["addr_info"] if a["family"] == "inet"] == ["10.0.9.2"] == [record["ip"]]
        assert eth0["address"] == record["mac"] == "02:42:0a:00:09:02"
        host = ip_json("-d", "link", "show", "dev", "veth-c1")[0]
        assert eth0["link_index"] == host["ifindex"] and host["link_index"] == eth0["ifindex"]
        assert host["master"] == "br0" and rt.host_end == "veth-c1"
        assert not os.listdir("/run/netns")                 # the name c1 was dropped again
        inodes = {netns_inode(int(p)) for p in procs.values()}
        assert len(inodes) == 1 and inodes != {netns_inode()}
        got = subprocess.run(["nsenter", "-t", str(procs["sidecar"]), "-n", "socat", "-u",
                              "TCP:127.0.0.1:8080,connect-timeout=2", "-"], capture_output=True, text=True, timeout=10)
        assert got.stdout.strip() == "hello-from-app-over-localhost"
        mod.verify(L, rt)
        assert L.passed(), [c for c in L.checks if not c[1]]
        # the runtime's stop: the host ends are gone and no process of the lesson is left
        names = {link["ifname"] for link in ip_json("link", "show")}
        assert not names & {"veth-c1", "veth-pod1"}
        assert not L.r.procs
    finally:
        L.r.stop_all()


# ---------------------------------------------------------------- each essential step, left out

@pytest.mark.parametrize("step,broken", [
    ("master", "its master is a bridge holding the gateway the bare runtime reports, 10.0.9.1"),
    ("nat", "iptables-save masquerades 10.0.9.0/24"),
    ("join", "the sidecar reaches the app on 127.0.0.1:8080"),
])
def test_leaving_out_a_step_fails_the_proof_it_names(step, broken):
    proc = run_marked("--skip", step)
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert verdict(proc).startswith("FAIL lesson 07e container: ")
    assert broken in verdict(proc)
    assert f"skipped (--skip {step})" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_without_join_the_sidecar_has_a_namespace_of_its_own():
    proc = run_marked("--skip", "join")
    assert "# check: pause, app and sidecar share one network namespace (one net:[inode]): FAILED" in proc.stdout
    inodes = re.search(r"pause (net:\[\d+\]), app (net:\[\d+\]), sidecar (net:\[\d+\])", proc.stdout)
    assert inodes and inodes.group(1) == inodes.group(2) != inodes.group(3)


# ---------------------------------------------------------------- bad input, --host

@pytest.mark.noroot
def test_an_unknown_step_is_one_line_and_exit_2():
    proc = run_stage(SCRIPT, "--skip", "nosuch", timeout=TIMEOUT)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "nosuch" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_host_mode_refuses_a_namespace_name_it_would_use_and_changes_nothing():
    subprocess.run(["ip", "netns", "add", "c1"], check=True)
    before = host_state()
    proc = run_marked("--host")
    assert proc.returncode == 2, proc.stdout[-2000:]
    assert "namespace c1 already exists" in proc.stderr
    assert host_state() == before


def test_container_needs_host_a_real_name_and_a_runtime_that_has_containers():
    for args, said in ((("--container", "web"), "--container needs --host"),
                       (("--host", "--container", "web", "--runtime", "bare"), "--runtime docker or podman"),
                       (("--host", "--container", "../x"), "invalid container name"),
                       (("--host", "--container", "nosuch", "--runtime", "podman"), "no running container nosuch")):
        before = kernel_state()
        proc = run_stage(SCRIPT, *args, timeout=TIMEOUT)
        assert proc.returncode == 2, (args, proc.stdout[-1000:], proc.stderr)
        assert said in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert proc.stdout == "" and kernel_state() == before


def kernel_state():
    """host_state() but for CNI's files: any podman command, `podman inspect` included, makes
    its lock file /etc/cni/net.d/cni.lock (the lesson's look-up asks podman)."""
    return {k: v for k, v in host_state().items() if k != "cni_files"}


# ---------------------------------------------------------------- --host --container: the learner's own container

LEARNER_SUBNET, LEARNER_GATEWAY = "10.244.14.0/24", "10.244.14.1"


@pytest.fixture
def learner_container():
    """A running podman container (CNI backend) on a network of the reference bridge plugin
    (isGateway, ipMasq: its masquerade sits in a chain per container, jumped to for its /32), as
    a learner's host has one. Podman's store is a scratch dir of this sandbox; the environment
    that makes a plain `podman` find it is yielded for the lesson."""
    import runtimes
    if not shutil.which("podman") or not runtimes.busybox() or not os.path.exists("/usr/lib/cni/bridge"):
        pytest.skip("needs podman, busybox-static and containernetworking-plugins")
    runtimes.mount_cgroups()
    cgroups = runtimes.cgroup_dirs()
    directory = runtimes.scratch_dir("le")
    conf, storage = os.path.join(directory, "containers.conf"), os.path.join(directory, "storage.conf")
    with open(conf, "w") as f:
        f.write(runtimes.CONTAINERS_CONF.replace("[engine]\n", f'[engine]\ntmp_dir = "{directory}/tmp"\n', 1))
    with open(storage, "w") as f:
        f.write(f'[storage]\ndriver = "overlay"\ngraphroot = "{directory}/root"\nrunroot = "{directory}/runroot"\n')
    env = dict(os.environ, CONTAINERS_CONF=conf, CONTAINERS_STORAGE_CONF=storage)
    os.makedirs("/etc/cni/net.d", exist_ok=True)
    with open("/etc/cni/net.d/30-learner.conflist", "w") as f:
        json.dump({"cniVersion": "1.0.0", "name": "learner", "plugins": [
            {"type": "bridge", "bridge": "cni-learner", "isGateway": True, "ipMasq": True,
             "ipam": {"type": "host-local", "subnet": LEARNER_SUBNET}}]}, f)

    def podman(*args, check=True):
        return subprocess.run(["podman", *args], capture_output=True, text=True, env=env, check=check, timeout=120)
    try:
        tar = os.path.join(directory, "rootfs.tar")
        with open(tar, "wb") as f:
            f.write(runtimes.rootfs_tar())
        podman("import", "--change", 'CMD ["/bin/sh"]', tar, runtimes.IMAGE)
        started = podman("run", "-d", "--name", "web", "--network", "learner", runtimes.IMAGE, "sleep", "600",
                         check=False)
        if started.returncode != 0:
            pytest.skip("podman cannot start a container here: " + started.stderr.strip()[-300:])
        yield podman, env
    finally:
        podman("rm", "-a", "-f", "-t", "0", check=False)
        runtimes.drop_scratch_dir(directory)
        runtimes.drop_new_cgroups(cgroups)


def test_host_container_finds_the_learners_container_and_never_changes_it(learner_container):
    podman, env = learner_container
    inspect = lambda: json.loads(podman("inspect", "web").stdout)[0]      # noqa: E731
    before, seen = host_state(), inspect()
    pid = seen["State"]["Pid"]
    net = seen["NetworkSettings"]["Networks"]["learner"]
    inside = ip_json("addr", pid=pid)
    proc = run_marked("--host", "--container", "web", env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr
    assert verdict(proc).startswith("PASS lesson 07e container")
    out = proc.stdout
    assert f"podman runtime's record of web (what `docker inspect` reports): pid {pid}, " \
           f"IPAddress {net['IPAddress']}/24, MacAddress {net['MacAddress']}, Gateway {LEARNER_GATEWAY}" in out
    assert f"# check: eth0 found through PID {pid} has the address podman reports, {net['IPAddress']}: ok" in out
    assert f"# check: its master is a bridge holding the gateway podman reports, {LEARNER_GATEWAY}: ok" in out
    # the reference plugin's masquerade: the rule for the container's /32 jumps to its own chain
    assert re.search(rf"^-A POSTROUTING -s {re.escape(net['IPAddress'])}/32 .*-j (CNI-\w+)$", out, re.M)
    assert not re.search(r"^ip netns attach", out, re.M) and f"nsenter -t {pid} -n ping" not in out
    # read-only: the container, its namespace and the host are as they were
    after = inspect()
    assert after["State"]["Running"] and after["State"]["Pid"] == pid
    assert after["NetworkSettings"]["Networks"] == seen["NetworkSettings"]["Networks"]
    strip = lambda links: [{k: v for k, v in l.items() if k != "stats"} for l in links]    # noqa: E731
    assert strip(ip_json("addr", pid=pid)) == strip(inside)
    assert ipv4_only(host_state()) == ipv4_only(before)


def ipv4_only(state):
    """STATE without IPv6: the kernel adds link-local addresses and their routes to the bridge and
    veth of a container that just started, in its own time (DAD), whatever the lesson does."""
    state = dict(state)
    state["routes"] = [line for line in state["routes"].splitlines() if ":" not in line.split()[1 if line.startswith(
        ("local", "multicast", "broadcast", "anycast", "unreachable")) else 0]]
    state["addrs"] = [[w for w in line.split() if ":" not in w] for line in state["addrs"].splitlines()]
    return state


def test_host_container_finds_a_real_docker_container_and_leaves_docker_as_it_was(docker_real):
    """The Docker host learners have (tests/docker_daemon.py: dockerd 20.10, its container WEB on
    docker0 with a published port): the lesson asks docker, finds WEB from the outside and its
    masquerade in Docker's own rule for the subnet; Docker's rules stay byte-identical."""
    docker = docker_real.daemon
    seen, rules, before = docker.inspect(WEB), iptables_save(), host_state()
    pid, net = seen["State"]["Pid"], seen["NetworkSettings"]["Networks"]["bridge"]
    proc = run_marked("--host", "--container", WEB, env={"DOCKER_HOST": docker.host})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr
    assert verdict(proc).startswith("PASS lesson 07e container")
    out = proc.stdout
    assert f"docker runtime's record of {WEB} (what `docker inspect` reports): pid {pid}, " \
           f"IPAddress {net['IPAddress']}/{net['IPPrefixLen']}, MacAddress {net['MacAddress']}, " \
           f"Gateway {net['Gateway']}" in out
    assert f"# check: its master is a bridge holding the gateway docker reports, {net['Gateway']}: ok" in out
    assert re.search(r"^-A POSTROUTING -s 172\.17\.0\.0/16 ! -o docker0 -j MASQUERADE$", out, re.M), out[-3000:]
    assert not re.search(r"^ip netns attach", out, re.M) and f"nsenter -t {pid} -n ping" not in out
    after = docker.inspect(WEB)
    assert after["State"]["Running"] and after["State"]["Pid"] == pid
    assert after["NetworkSettings"]["Networks"] == seen["NetworkSettings"]["Networks"]
    assert iptables_save() == rules and host_state() == before
    assert docker.broken() is None


def test_host_mode_interrupted_mid_build_leaves_the_host_as_it_was():
    """q at a --step pause, with the container started and half wired: everything goes."""
    before = host_state()
    proc = run_marked("--host", "--step", input="\n" * 22 + "q\n")
    assert proc.returncode == 130, proc.stdout[-2000:] + proc.stderr
    assert "unshare --net --uts --ipc sleep infinity &" in proc.stdout       # it got that far
    assert "Traceback" not in proc.stderr
    assert host_state() == before


def test_runtime_podman_starts_c1_with_podman_in_the_sandbox_and_leaves_nothing():
    if not shutil.which("podman") or not os.path.exists("/usr/lib/cni/bridge"):
        pytest.skip("needs podman and containernetworking-plugins")
    before = host_state()
    proc = run_marked("--runtime", "podman")
    if "podman run" in proc.stdout and "runtime's record" not in proc.stdout:
        pytest.skip("podman cannot start a container here: " + (proc.stdout + proc.stderr)[-300:])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr
    out = proc.stdout
    record = re.search(r"^# the podman runtime's record of c1 \(what `docker inspect` reports\): pid (\d+), "
                       r"IPAddress (10\.0\.19\.\d+)/24, MacAddress ([0-9a-f:]{17}), Gateway 10\.0\.19\.1$", out, re.M)
    assert record, out[:4000]
    pid, addr = record.group(1), record.group(2)
    assert re.search(rf"^ip netns identify {pid}\nnetns-[0-9a-f-]+$", out, re.M)      # podman names it
    assert not re.search(r"^ip netns attach", out, re.M)
    assert re.search(rf"^-A POSTROUTING -s {re.escape(addr)}/32 .*-j CNI-\w+$", out, re.M)
    assert "# check: the sidecar reaches the app on 127.0.0.1:8080 (localhost is the pod's): ok" in out
    assert re.search(r"^podman rm -f -t 0 c1$", out, re.M)
    assert host_state() == before


@pytest.mark.noroot
@pytest.mark.parametrize("args,said", [
    (("--runtime", "docker"), "starts no Docker daemon of its own"),
    (("--runtime", "podman", "--host"), "no --host"),
    (("--runtime", "podman", "--dry-run"), "no --dry-run"),
    (("--runtime", "podman", "--skip", "nat"), "--skip join only"),
])
def test_runtime_podman_or_docker_where_it_cannot_be_is_one_line_and_exit_2(args, said):
    proc = run_stage(SCRIPT, *args, timeout=TIMEOUT)
    assert proc.returncode == 2 and proc.stdout == ""
    assert said in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_host_container_on_two_networks_follows_the_interface_that_holds_the_reported_address(learner_container):
    """inspect's first network need not be eth0's: the lesson follows the interface holding its address."""
    podman, env = learner_container
    with open("/etc/cni/net.d/31-zz.conflist", "w") as f:
        json.dump({"cniVersion": "1.0.0", "name": "zz", "plugins": [
            {"type": "bridge", "bridge": "cni-zz", "isGateway": True, "ipMasq": True,
             "ipam": {"type": "host-local", "subnet": "10.244.15.0/24"}}]}, f)
    import runtimes
    podman("run", "-d", "--name", "multi", "--network", "zz,learner", runtimes.IMAGE, "sleep", "600")
    seen = json.loads(podman("inspect", "multi").stdout)[0]
    pid, addr = seen["State"]["Pid"], seen["NetworkSettings"]["Networks"]["learner"]["IPAddress"]
    holder = [l["ifname"] for l in ip_json("-4", "addr", pid=pid)
              if any(a["local"] == addr for a in l.get("addr_info", []))]
    assert len(holder) == 1 and len(ip_json("link", pid=pid)) == 3      # lo and two interfaces
    proc = run_marked("--host", "--container", "multi", "--runtime", "podman", env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr
    assert f"# check: {holder[0]} found through PID {pid} has the address podman reports, {addr}: ok" in proc.stdout
    assert f"# check: its master is a bridge holding the gateway podman reports, {LEARNER_GATEWAY}: ok" in proc.stdout


@pytest.mark.noroot
def test_the_lesson_sends_packets_only_to_addresses_it_made_or_loopback():
    script = run_stage(SCRIPT, "--dry-run", timeout=TIMEOUT).stdout
    assigned, targets = _assigned_and_targets(script)
    assert targets, "the lesson sends nothing: nothing to prove"
    for addr in targets:
        assert ipaddress.ip_address(addr).is_loopback or addr in assigned, f"{addr} is not the lesson's own"


def test_runtime_podman_without_podman_says_what_to_install_before_anything_changes():
    before = host_state()
    proc = run_stage(SCRIPT, "--runtime", "podman", env=dict(os.environ, PATH="/nonexistent"), timeout=TIMEOUT)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "--runtime podman needs podman (apt-get install podman)" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and host_state() == before
