"""Host profiles: the machines learners really have, reproduced inside the test's sandbox.

"docker_host": what installing Docker does to a host's network: the iptables FORWARD policy
is DROP (both families), br_netfilter is on and net.bridge.bridge-nf-call-iptables=1 (so
frames switched between two ports of one Linux bridge traverse iptables FORWARD), and the
distribution's rp_filter=1.  "kind_node": a kind node's sysctl, rp_filter=1.

"docker_real": a real dockerd (Debian's docker.io) with containers running, one publishing a
port, in a sandbox of its own (tests/docker_daemon.py); the test joins its network namespace,
so what Docker wrote there (its chains, policy, NAT, docker0 and its container ports, br_netfilter)
is the host the test sees. It skips, saying why, where Docker is missing.

The sandbox is a fresh network namespace, so the policy and these sysctls are its own: the
real host is never touched.  br_netfilter's sysctls are per network namespace on Linux >= 5.3;
where the module is neither built in nor loadable, the profile says so in its `missing` list
and the rest of it still applies.

Use: `from host_profiles import docker_host, docker_real, kind_node, host_profile  # noqa: F401`
and `from docker_daemon import docker_daemon  # noqa: F401` in a test module, then ask for
`docker_host`, `docker_real`, `kind_node`, or the parametrized `host_profile` (all three).
"""
import os
import shutil
import subprocess
import time

import pytest

from kernel import CLI, cli_env

BR_NF = "/proc/sys/net/bridge/bridge-nf-call-iptables"
RP_FILTER = {"net.ipv4.conf.all.rp_filter": "1", "net.ipv4.conf.default.rp_filter": "1"}
PROFILES = {
    "docker_host": {"forward_policy": "DROP", "br_netfilter": True, "sysctls": RP_FILTER},
    "kind_node": {"forward_policy": None, "br_netfilter": False, "sysctls": RP_FILTER},
}


# Real hosts: the daemon makes them what they are; the profile only looks.
REAL = ("docker_real",)


class Profile:
    def __init__(self, name, missing, forward_drop=None, daemon=None):
        self.name, self.missing, self.daemon = name, missing, daemon
        self.forward_drop = PROFILES[name]["forward_policy"] == "DROP" if forward_drop is None else forward_drop

    def __repr__(self):
        return f"<host profile {self.name}{' without ' + ', '.join(self.missing) if self.missing else ''}>"


def _sh(*argv):
    subprocess.run(argv, check=True, capture_output=True)


def br_netfilter():
    """True when bridge-nf-call-iptables exists in this namespace (loading the module if need be)."""
    if not os.path.exists(BR_NF) and shutil.which("modprobe"):
        subprocess.run(["modprobe", "br_netfilter"], capture_output=True)
    return os.path.exists(BR_NF)


def apply(name):
    """Turn the current (sandbox) network namespace into host NAME; returns its Profile."""
    spec, missing = PROFILES[name], []
    if spec["forward_policy"]:
        for tool in ("iptables", "ip6tables"):
            _sh(tool, "-P", "FORWARD", spec["forward_policy"])
    if spec["br_netfilter"]:
        if br_netfilter():
            _sh("sysctl", "-w", "net.bridge.bridge-nf-call-iptables=1", "net.bridge.bridge-nf-call-ip6tables=1")
        else:
            missing.append("br_netfilter (not built in and not loadable here)")
    for key, value in spec["sysctls"].items():
        _sh("sysctl", "-w", f"{key}={value}")
    return Profile(name, missing)


def forward_policy(tool="iptables"):
    out = subprocess.run([tool, "-S", "FORWARD"], capture_output=True, text=True, check=True).stdout
    return out.splitlines()[0].split()[-1]


@pytest.fixture
def docker_host(sandbox):
    return apply("docker_host")


@pytest.fixture
def kind_node(sandbox):
    return apply("kind_node")


def join_docker(daemon):
    """This test into the real Docker host DAEMON runs (tests/docker_daemon.py); its Profile."""
    daemon.join()
    with open(BR_NF) if os.path.exists(BR_NF) else open(os.devnull) as f:
        missing = [] if f.read().strip() == "1" else ["br_netfilter (Docker could not turn it on here)"]
    return Profile("docker_real", missing, forward_drop=forward_policy() == "DROP", daemon=daemon)


def leave_docker(daemon):
    """After a test on the shared Docker host: remove what cnikit made there (its cleanup judges
    by ownership: Docker's objects stay), then make sure the next test finds the same host."""
    subprocess.run([*CLI, "-q", "cleanup"], capture_output=True, timeout=120, env=cli_env())
    # The namespaces in the test sandbox's private /run/netns are all the test's own; the links
    # they hold on the host go with them, once the kernel has dismantled them (asynchronously).
    for name in os.listdir("/run/netns") if os.path.isdir("/run/netns") else []:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    deadline = time.monotonic() + 10
    while daemon.changed() and time.monotonic() < deadline:
        time.sleep(0.1)
    changed = daemon.changed()
    if changed:
        pytest.fail("the test left the shared Docker host changed:\n" + "\n".join(changed), pytrace=False)


@pytest.fixture
def docker_real(sandbox, docker_daemon):
    yield join_docker(docker_daemon)
    leave_docker(docker_daemon)


@pytest.fixture(params=sorted(PROFILES) + list(REAL))
def host_profile(request, sandbox):
    if request.param == "docker_real":
        daemon = request.getfixturevalue("docker_daemon")
        yield join_docker(daemon)
        leave_docker(daemon)
    else:
        yield apply(request.param)
