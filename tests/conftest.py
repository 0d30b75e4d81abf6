"""Every test runs as root in a throwaway sandbox: a fresh network namespace and a
private mount namespace whose /run/netns and CNI directories are empty tmpfs.

Nothing a test creates can reach the host, and nothing is left behind: the
namespaces die with the sandbox.  The host's state is snapshotted before the first
sandbox and compared after the last test (tests/test_zz_hygiene.py).
"""
import os
import signal
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cnikit  # noqa: E402
from host_state import host_state  # noqa: E402

# Directories a CNI plugin or runtime writes to: private (empty tmpfs) in every sandbox.
PRIVATE_DIRS = cnikit.SANDBOX_DIRS

# File descriptors of the namespaces pytest started in, and their state then.
HOST = {}


def pytest_configure(config):
    if os.geteuid() != 0:
        raise pytest.UsageError("cnikit's tests need root (they build real namespaces in a sandbox): sudo make test")
    if "net" not in HOST:
        HOST["net"] = os.open("/proc/self/ns/net", os.O_RDONLY)
        HOST["mnt"] = os.open("/proc/self/ns/mnt", os.O_RDONLY)
        HOST["before"] = host_state()


@pytest.fixture(autouse=True)
def sandbox():
    """A fresh sandbox for each test; yields the directories that are private in it."""
    cnikit.enter_sandbox(private_dirs=PRIVATE_DIRS)
    yield PRIVATE_DIRS
    # A process a test started and forgot would keep its namespaces alive.
    for pid in _descendants(os.getpid()):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _descendants(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(p) for p in f.read().split()]
    except OSError:
        return []
    return kids + [g for k in kids for g in _descendants(k)]
