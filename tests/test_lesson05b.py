"""Lesson 05b (published ports, as `docker run -p 8080:80` does it): the rules it builds are
Docker's, real TCP from outside, from the host, from localhost and from the container itself
reaches the container's server, each left-out step fails exactly the proof it names, and
`cnikit cleanup` finds every rule the lesson tagged. With --with-docker a real dockerd's
`docker run -p` writes the same rules (compared rule by rule), and `cnikit nat publish` writes
them in one command.

The lesson's build() runs in the test's sandbox (conftest), so what it made is still there to
look at with the kernel's own tools; the --skip runs are the lesson as a learner runs it."""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import sh

from kernel import cli, iptables_rules, kill_left, run_stage

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
# What dockerd 20.10 (userland proxy off) writes for -p 8080:80, in cnikit's names and tags.
JUMP = '-m addrtype --dst-type LOCAL -m comment --comment "cnikit ports" -j CNIKIT-PORTS'
NAT_RULES = [f"-A PREROUTING {JUMP}", f"-A OUTPUT {JUMP}",
             '-A POSTROUTING -o br0 -m addrtype --src-type LOCAL -m comment --comment "cnikit ports" -j MASQUERADE',
             "-A POSTROUTING -s 10.0.5.2/32 -d 10.0.5.2/32 -p tcp -m tcp --dport 80 -m comment --comment "
             '"cnikit port tcp/8080" -j MASQUERADE',                                 # the hairpin masquerade
             '-A CNIKIT-PORTS -p tcp -m tcp --dport 8080 -m comment --comment "cnikit port tcp/8080" -j DNAT '
             "--to-destination 10.0.5.2:80"]
FILTER_RULES = ['-A FORWARD -d 10.0.5.2/32 ! -i br0 -o br0 -p tcp -m tcp --dport 80 -m comment --comment '
                '"cnikit port tcp/8080" -j ACCEPT']


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
    docker = mod.WithDocker()
    try:
        mod.build(L, docker)
        yield mod, L, docker
    finally:
        L.r.stop_all()


def test_the_rules_are_dockers_and_real_tcp_from_every_side_reaches_the_container(built):
    mod, L, docker = built
    nat = iptables_rules("nat")
    assert sorted(r for r in nat if "cnikit port" in r) == sorted(NAT_RULES)
    assert [r for r in iptables_rules("filter") if "cnikit port" in r] == FILTER_RULES
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

    mod.verify(L, docker)
    assert L.passed(), L.checks


def test_verify_fails_exactly_the_proofs_that_need_a_rule_removed_by_hand(built):
    """The lesson's own verification reads the kernel: take the OUTPUT jump away after the
    build, and only the host's own connections fail."""
    mod, L, docker = built
    sh.iptables("-t", "nat", "-D", "OUTPUT", "-m", "addrtype", "--dst-type", "LOCAL", "-m", "comment",
                "--comment", "cnikit ports", "-j", "CNIKIT-PORTS")
    mod.verify(L, docker)
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
COMMANDS = r"^(ip|iptables|sysctl|mkdir|mount|dockerd|timeout|socat|bridge|sh|ln|docker|conntrack|ss) "




def test_with_docker_a_real_docker_run_writes_the_rules_the_lesson_writes_and_leaves_nothing_running():
    if not (shutil.which("dockerd") and shutil.which("docker")):
        pytest.skip("dockerd is not installed (Debian package docker.io)")
    mark = os.urandom(8).hex()
    proc = run_stage("05b_ports.py", "--with-docker", env=dict(os.environ, **{MARK: mark}), timeout=240)
    left = kill_left(MARK, mark, grace=0)  # never leak a daemon out of the test, then report it
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert not left, f"{len(left)} process(es) of the lesson's Docker still running"
    out = proc.stdout
    # Docker's own rules, read from the kernel by the lesson, with their twins among ours
    assert "\n-A DOCKER -p tcp -m tcp --dport 9080 -j DNAT --to-destination 172.17.0.2:80\n" in out
    assert "# Docker: -A POSTROUTING -s 172.17.0.2/32 -d 172.17.0.2/32 -p tcp -m tcp --dport 80 -j MASQUERADE\n" \
           "#   ours: -A POSTROUTING -s 10.0.5.2/32 -d 10.0.5.2/32 -p tcp -m tcp --dport 80 -m comment " \
           "--comment \"cnikit port tcp/8080\" -j MASQUERADE\n" in out
    assert "#   ours: (none)" not in out
    assert "\ndocker 203.0.113.10\n" in out              # real TCP to Docker's published port from outside
    assert "# check: each rule the real `docker run -p` wrote for its port has its twin among ours: ok" in out

    # Interrupted (q in --step) once Docker's container runs: dockerd still stops cleanly, nothing stays.
    # --step pauses on every command the lesson echoes but cnikit's ownership tags.
    before_exec = out.split(" exec cnikit-web ")[0].splitlines()[:-1]
    pauses = sum(1 for line in before_exec if re.match(COMMANDS, line) and not line.endswith(" alias cnikit"))
    mark = os.urandom(8).hex()
    stopped = run_stage("05b_ports.py", "--with-docker", "--step", input="\n" * pauses + "q\n",
                        env=dict(os.environ, **{MARK: mark}), timeout=240)
    left = kill_left(MARK, mark, grace=0)
    assert stopped.returncode == 130, stopped.stdout[-3000:]
    head, tail = stopped.stdout.split("FAIL lesson 05b ports: interrupted")
    assert " run -d --name cnikit-web " in head and "# verification" not in head   # stopped with it running
    assert "rm -f cnikit-web" in tail and not left, (tail, left)


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


# ---------------------------------------------------------------- `cnikit nat publish`: the same rules in one verb

@pytest.fixture
def container():
    """The lesson's topology made with the CLI: web (10.0.5.2) on br0 with a server on port 80 that
    answers "web <peer>", and outside (203.0.113.10) behind uplink0 (203.0.113.1)."""
    for argv in (["netns", "add", "web", "--lo-up"], ["bridge", "add", "br0", "--addr", "10.0.5.1/24"],
                 ["veth", "add", "veth-web", "eth0", "--netns", "web", "--peer-addr", "10.0.5.2/24"],
                 ["bridge", "attach", "br0", "veth-web"], ["netns", "add", "outside", "--lo-up"],
                 ["veth", "add", "uplink0", "eth0", "--netns", "outside", "--addr", "203.0.113.1/24",
                  "--peer-addr", "203.0.113.10/24"]):
        cli(*argv, check=True)
    sh.ip("-n", "web", "route", "add", "default", "via", "10.0.5.1")
    server = subprocess.Popen(["ip", "netns", "exec", "web", "socat", "TCP-LISTEN:80,reuseaddr,fork",
                               "SYSTEM:echo web $SOCAT_PEERADDR"], start_new_session=True)
    try:
        subprocess.run(["ip", "netns", "exec", "web", "timeout", "5", "sh", "-c",
                        'until ss -Htln "sport = :80" | grep -q .; do sleep 0.02; done'], check=True)
        yield
    finally:
        server.kill()
        server.wait()


def ours():
    return {t: [r for r in iptables_rules(t) if "cnikit port" in r] for t in ("nat", "filter")}


def test_nat_publish_writes_the_lessons_rules_and_the_port_answers_until_unpublished(container):
    sh.sysctl("-w", "net.ipv4.ip_forward=0")
    out = cli("nat", "publish", "8080", "--to", "10.0.5.2:80", "--bridge", "br0", check=True).stdout
    assert sorted(ours()["nat"]) == sorted(NAT_RULES) and ours()["filter"] == FILTER_RULES
    assert str(sh.sysctl("-n", "net.ipv4.ip_forward", "net.ipv4.conf.br0.route_localnet")).split() == ["1", "1"]
    assert "hairpin mode" in out                                  # what the verb leaves to the learner
    assert call("203.0.113.1", 8080, "outside") == "web 203.0.113.10"
    assert call("127.0.0.1", 8080) == "web 10.0.5.1"
    assert "tcp/8080 published to 10.0.5.2:80 (DNAT)" in cli("show", check=True).stdout

    before = ours()
    again = cli("nat", "publish", "8080", "--to", "10.0.5.2:80", "--bridge", "br0", check=True)
    assert "already present" in again.stdout and "iptables" not in again.stdout and ours() == before
    other = cli("nat", "publish", "8080", "--to", "10.0.5.3:80", "--bridge", "br0")
    assert other.returncode == 2 and "already published to 10.0.5.2:80" in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1 and ours() == before

    cli("nat", "publish", "9090", "--to", "10.0.5.2:80", "--bridge", "br0", check=True)
    cli("nat", "unpublish", "8080", check=True)
    assert call("127.0.0.1", 8080) == "" and call("127.0.0.1", 9090) == "web 10.0.5.1"   # shared rules stay
    cli("nat", "unpublish", "9090", check=True)
    assert ours() == {"nat": [], "filter": []} and "CNIKIT-PORTS" not in str(sh.iptables("-t", "nat", "-S"))
    assert "nothing to delete" in cli("nat", "unpublish", "9090", check=True).stdout
    assert call("203.0.113.1", 9090, "outside") == ""

    cli("nat", "publish", "8080", "--to", "10.0.5.2:80", "--bridge", "br0", check=True)
    cli("cleanup", check=True)
    assert "CNIKIT-PORTS" not in str(sh.iptables("-t", "nat", "-S")) and iptables_rules("nat") == []


@pytest.mark.parametrize("args,message", [
    (["0", "--to", "10.0.5.2:80"], "port 0 is out of range 1-65535"),
    (["8080", "--to", "10.0.5.2"], "--to '10.0.5.2' needs an address and a port"),
    (["8080", "--to", "10.0.5.2:70000"], "--to port 70000 is out of range 1-65535"),
    (["8080", "--to", "web:80"], "--to address 'web' is not an IP address"),
    (["8080", "--to", "[fd00::2]:80"], "is not an IP address"),
    (["8080", "--to", "fd00::2:80"], "is IPv6"),
    (["8080", "--to", "10.0.5.2:80", "--bridge", "nobr0"], "bridge nobr0 does not exist"),
    (["8080", "--to", "10.0.5.2:80", "--proto", "sctp"], "invalid choice: 'sctp'"),
])
def test_nat_publish_refuses_bad_input_in_one_line_before_changing_anything(args, message):
    sh.ip("link", "add", "br0", "type", "bridge")
    sh.sysctl("-w", "net.ipv4.ip_forward=0")
    if "--bridge" not in args:
        args = args + ["--bridge", "br0"]
    proc = cli("nat", "publish", *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert iptables_rules("nat") == [] and str(sh.sysctl("-n", "net.ipv4.ip_forward")).strip() == "0"


def test_nat_publish_dry_run_replays_under_dash_to_the_same_rules(tmp_path):
    sh.ip("link", "add", "br0", "type", "bridge")
    dry = cli("--dry-run", "nat", "publish", "8080", "--to", "10.0.5.2:80", "--bridge", "br0", check=True).stdout
    assert iptables_rules("nat") == []                                     # nothing ran
    (tmp_path / "publish.sh").write_text(dry)
    subprocess.run(["dash", "-e", str(tmp_path / "publish.sh")], check=True, capture_output=True)
    assert sorted(ours()["nat"]) == sorted(NAT_RULES) and ours()["filter"] == FILTER_RULES


def test_host_mode_refuses_a_host_whose_port_8080_is_already_published_and_changes_nothing():
    """A learner's machine where `docker run -p 8080:...` already runs: the first DNAT would win,
    so the lesson says so in one line instead of failing half way."""
    from host_state import host_state
    spec = ["-p", "tcp", "--dport", "8080", "-j", "DNAT", "--to-destination", "192.0.2.7:80"]
    sh.iptables("-w", "-t", "nat", "-N", "DOCKER")
    sh.iptables("-w", "-t", "nat", "-A", "DOCKER", *spec)
    before = host_state()
    proc = run_stage("05b_ports.py", "--host", timeout=60)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr
    assert "port 8080 (published: -A DOCKER -p tcp -m tcp --dport 8080 -j DNAT" in proc.stderr
    assert "run it in the sandbox (without --host)" in proc.stderr and host_state() == before
