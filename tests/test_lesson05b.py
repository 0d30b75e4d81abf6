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
