"""Lesson 05b (published ports, as `docker run -p 8080:80` does it): the rules it builds are
Docker's, real TCP from outside, from the host, from localhost and from the container itself
reaches the container's server, each left-out step fails exactly the proof it names, and
`cnikit cleanup` finds every rule the lesson tagged.

The lesson's build() runs in the test's sandbox (conftest), so what it made is still there to
look at with the kernel's own tools; the --skip runs are the lesson as a learner runs it."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import sh

from kernel import cli, iptables_rules, run_stage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = os.path.join(ROOT, "stages")
TIMEOUT = 90

# The proofs, by the start of each check's text.
OUTSIDE = "outside reaches 203.0.113.1:8080"
CONNTRACK = "conntrack maps 203.0.113.10 -> 203.0.113.1:8080"
OWN = "the host reaches its own address 203.0.113.1:8080"
LOCAL = "the host reaches localhost:8080"
HAIRPIN = "hairpin: web reaches its own published port"
PROXY = "outside reaches the proxy at 203.0.113.1:8081"
PROOFS = (OUTSIDE, CONNTRACK, OWN, LOCAL, HAIRPIN, PROXY)


def load():
    sys.path.insert(0, STAGES)
    spec = importlib.util.spec_from_file_location("lesson_05b", os.path.join(STAGES, "05b_ports.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def failed_proofs(checks):
    """The proofs (PROOFS) among the failed checks; any other failed check is named as it is."""
    names = set()
    for what, ok in checks:
        if not ok:
            names.add(next((p for p in PROOFS if what.startswith(p)), what))
    return names


def call(target, port, ns=None):
    """One TCP connection made by the test itself; the container's answer ("web <peer>") or ""."""
    argv = ["socat", "-u", f"TCP:{target}:{port},connect-timeout=2", "-"]
    proc = subprocess.run((["ip", "netns", "exec", ns] if ns else []) + argv, capture_output=True, text=True,
                          timeout=20, stdin=subprocess.DEVNULL)
    return proc.stdout.strip() if proc.returncode == 0 else ""


@pytest.fixture
def built():
    """Lesson 05b built in the test's sandbox; its background processes stopped at the end."""
    mod = load()
    L = mod.LESSON.start(quiet=True)
    try:
        mod.build(L)
        yield mod, L
    finally:
        L.r.stop_all()


def test_the_rules_are_dockers_and_real_tcp_from_every_side_reaches_the_container(built):
    mod, L = built
    nat = iptables_rules("nat")
    jump = '-m addrtype --dst-type LOCAL -m comment --comment "cnikit ports" -j CNIKIT-PORTS'
    assert f"-A PREROUTING {jump}" in nat and f"-A OUTPUT {jump}" in nat       # Docker: -j DOCKER
    assert "-A CNIKIT-PORTS -p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.0.5.2:80" in nat
    assert ('-A POSTROUTING -s 10.0.5.2/32 -d 10.0.5.2/32 -p tcp -m tcp --dport 80 -m comment --comment '
            '"cnikit ports" -j MASQUERADE') in nat                                # the hairpin masquerade
    assert '-A POSTROUTING -o br0 -m addrtype --src-type LOCAL -m comment --comment "cnikit ports" -j MASQUERADE' \
        in nat
    assert ('-A FORWARD -d 10.0.5.2/32 ! -i br0 -o br0 -p tcp -m tcp --dport 80 -m comment --comment '
            '"cnikit ports" -j ACCEPT') in iptables_rules("filter")
    assert str(sh.sysctl("-n", "net.ipv4.conf.br0.route_localnet")).strip() == "1"
    port = json.loads(str(sh.bridge("-j", "-d", "link", "show", "dev", "veth-web")))[0]
    assert port["master"] == "br0" and port["hairpin"] is True
    assert str(sh.ss("-Htln", "sport = :8080")).strip() == ""                   # only rules, no listener

    # Real TCP, made by the test: who answered, and whom the container saw.
    assert call("203.0.113.1", 8080, "outside") == "web 203.0.113.10"        # DNAT keeps the client's address
    assert call("203.0.113.1", 8080) == "web 10.0.5.1"                       # the host to its own address
    assert call("127.0.0.1", 8080) == "web 10.0.5.1"                         # localhost, masqueraded
    assert call("203.0.113.1", 8080, "web") == "web 10.0.5.1"                # hairpin
    assert call("203.0.113.1", 8081, "outside") == "web 10.0.5.1"            # the proxy hides the client
    if shutil.which("conntrack"):
        flows = str(sh.conntrack("-L", "-p", "tcp", "--orig-src", "203.0.113.10", "--orig-port-dst", "8080"))
        assert mod.translated(flows, "203.0.113.10", "203.0.113.1"), flows

    mod.verify(L)
    assert L.passed(), L.checks


def test_verify_fails_exactly_the_proofs_that_need_a_rule_removed_by_hand(built):
    """The lesson's own verification reads the kernel: take the OUTPUT jump away after the
    build, and only the host's own connections fail."""
    mod, L = built
    sh.iptables("-t", "nat", "-D", "OUTPUT", "-m", "addrtype", "--dst-type", "LOCAL", "-m", "comment",
                "--comment", "cnikit ports", "-j", "CNIKIT-PORTS")
    mod.verify(L)
    assert failed_proofs(L.checks) == {OWN, LOCAL}, L.checks


def test_cleanup_removes_every_rule_and_chain_the_lesson_tagged(built):
    assert any("cnikit ports" in rule for rule in iptables_rules("nat"))
    out = cli("cleanup", check=True).stdout
    assert "removed" in out
    for table in ("nat", "filter"):
        assert not [r for r in iptables_rules(table) if "cnikit" in r or "CNIKIT-" in r], iptables_rules(table)
    assert "CNIKIT-PORTS" not in str(sh.iptables("-t", "nat", "-S"))


@pytest.mark.parametrize("step,broken", [
    ("prerouting", {OUTSIDE, CONNTRACK, HAIRPIN}),      # the container's own connection arrives too
    ("output", {OWN, LOCAL}),
    ("route-localnet", {LOCAL}),
    ("local-masquerade", {LOCAL}),
    ("hairpin", {HAIRPIN}),
    ("proxy", {PROXY}),
])
def test_each_skipped_step_fails_the_proof_it_names_and_only_that(step, broken):
    proc = run_stage("05b_ports.py", "--skip", step, timeout=TIMEOUT)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr
    assert f"skipped (--skip {step})" in proc.stdout
    failed = {line[len("# check: "):].rsplit(": FAILED", 1)[0] for line in proc.stdout.splitlines()
              if line.startswith("# check: ") and ": FAILED" in line}
    if not shutil.which("conntrack"):
        broken = broken - {CONNTRACK}
    assert failed_proofs((what, False) for what in failed) == broken, failed
    assert "Traceback" not in proc.stderr


def test_demo_lists_05b_after_05_and_selects_it_by_its_number():
    sys.path.insert(0, STAGES)
    import demo
    names = [os.path.basename(p)[:-3] for p in demo.lessons()]
    assert names.index("05b_ports") == names.index("05_egress") + 1
    assert [os.path.basename(p)[:-3] for p in demo.lessons(["05b"])] == ["05b_ports"]
    assert [os.path.basename(p)[:-3] for p in demo.lessons(["05"])] == ["05_egress", "05b_ports"]


# ---------------------------------------------------------------- --with-docker: a real dockerd beside ours

MARK = "CNIKIT_05B_DOCKER"      # every process the lesson starts inherits it (dockerd, containerd, shims)


def marked(mark):
    """PIDs of live processes (not zombies) whose environment carries MARK=<mark>."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        if f"{MARK}={mark}".encode() in env and stat[stat.rindex(")") + 2:][:1] != "Z":
            found.append(int(pid))
    return found


def test_with_docker_a_real_docker_run_writes_the_rules_the_lesson_writes_and_leaves_nothing_running():
    if not (shutil.which("dockerd") and shutil.which("docker")):
        pytest.skip("dockerd is not installed (Debian package docker.io)")
    mark = os.urandom(8).hex()
    proc = run_stage("05b_ports.py", "--with-docker", env=dict(os.environ, **{MARK: mark}), timeout=240)
    left = marked(mark)
    for pid in left:                      # never leak a daemon out of the test, then report it
        try:
            os.kill(pid, 9)
        except OSError:
            pass
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert not left, f"{len(left)} process(es) of the lesson's Docker still running"
    out = proc.stdout
    # Docker's own rules, read from the kernel by the lesson, with their twins among ours
    assert "\n-A DOCKER -p tcp -m tcp --dport 9080 -j DNAT --to-destination 172.17.0.2:80\n" in out
    assert "# Docker: -A POSTROUTING -s 172.17.0.2/32 -d 172.17.0.2/32 -p tcp -m tcp --dport 80 -j MASQUERADE\n" \
           "#   ours: -A POSTROUTING -s 10.0.5.2/32 -d 10.0.5.2/32 -p tcp -m tcp --dport 80 -m comment " \
           "--comment \"cnikit ports\" -j MASQUERADE\n" in out
    assert "#   ours: (none)" not in out
    assert "\ndocker 203.0.113.10\n" in out              # real TCP to Docker's published port from outside
    assert "# check: each rule the real `docker run -p` wrote for its port has its twin among ours: ok" in out


def test_with_docker_is_refused_with_host_and_left_out_of_a_dry_run():
    proc = run_stage("05b_ports.py", "--with-docker", "--host", timeout=TIMEOUT)
    assert proc.returncode == 2 and "--with-docker" in proc.stderr and "leave out --host" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    dry = run_stage("05b_ports.py", "--with-docker", "--dry-run", timeout=TIMEOUT)
    assert dry.returncode == 0 and "dockerd" not in dry.stdout.replace("--with-docker", "")
    assert "# --with-docker: the Docker step runs only in the lesson's sandbox" in dry.stdout


def test_beside_pairs_each_of_dockers_rules_with_ours_and_names_the_missing():
    mod = load()
    docker_nat = ["-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER",
                  "-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE",        # egress: lesson 05's
                  "-A POSTROUTING -s 172.17.0.3/32 -d 172.17.0.3/32 -p tcp -m tcp --dport 80 -j MASQUERADE",
                  "-A DOCKER -p tcp -m tcp --dport 9080 -j DNAT --to-destination 172.17.0.3:80"]
    docker_filter = ["-N DOCKER",
                     "-A DOCKER -d 172.17.0.3/32 ! -i docker0 -o docker0 -p tcp -m tcp --dport 80 -j ACCEPT"]
    ours = ['-A PREROUTING -m addrtype --dst-type LOCAL -m comment --comment "cnikit ports" -j CNIKIT-PORTS',
            "-A CNIKIT-PORTS -p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.0.5.2:80",
            '-A FORWARD -d 10.0.5.2/32 ! -i br0 -o br0 -p tcp -m tcp --dport 80 -m comment --comment "cnikit ports" '
            '-j ACCEPT']
    pairs = dict(mod.beside(docker_nat, docker_filter, ours))
    assert set(pairs) == set(docker_nat[:1] + docker_nat[2:] + docker_filter[1:])
    assert pairs[docker_nat[0]] == ours[0] and pairs[docker_nat[3]] == ours[1] and pairs[docker_filter[1]] == ours[2]
    assert pairs[docker_nat[2]] is None                  # no hairpin masquerade among ours: named as missing
