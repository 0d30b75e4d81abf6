"""Host profiles: the machines learners really have, reproduced inside the test's sandbox.

"docker_host": what installing Docker does to a host's network: the iptables FORWARD policy
is DROP (both families), br_netfilter is on and net.bridge.bridge-nf-call-iptables=1 (so
frames switched between two ports of one Linux bridge traverse iptables FORWARD), and the
distribution's rp_filter=1.  "kind_node": a kind node's sysctl, rp_filter=1.

The sandbox is a fresh network namespace, so the policy and these sysctls are its own: the
real host is never touched.  br_netfilter's sysctls are per network namespace on Linux >= 5.3;
where the module is neither built in nor loadable, the profile says so in its `missing` list
and the rest of it still applies.

Use: `from host_profiles import docker_host, kind_node, host_profile  # noqa: F401` in a test
module, then ask for `docker_host`, `kind_node`, or the parametrized `host_profile` (both).
"""
import os
import shutil
import subprocess

import pytest

BR_NF = "/proc/sys/net/bridge/bridge-nf-call-iptables"
RP_FILTER = {"net.ipv4.conf.all.rp_filter": "1", "net.ipv4.conf.default.rp_filter": "1"}
PROFILES = {
    "docker_host": {"forward_policy": "DROP", "br_netfilter": True, "sysctls": RP_FILTER},
    "kind_node": {"forward_policy": None, "br_netfilter": False, "sysctls": RP_FILTER},
}


class Profile:
    def __init__(self, name, missing):
        self.name, self.missing = name, missing
        self.forward_drop = PROFILES[name]["forward_policy"] == "DROP"

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


@pytest.fixture(params=sorted(PROFILES))
def host_profile(request, sandbox):
    return apply(request.param)
