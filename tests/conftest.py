"""Every test that needs root runs in a throwaway sandbox: a fresh network namespace and a
private mount namespace whose /run/netns and CNI directories are empty tmpfs.

Nothing a test creates can reach the host, and nothing is left behind: the
namespaces die with the sandbox.  pytest itself leaves the host's namespaces once,
at start-up, for a base sandbox; each test's sandbox is made from that base and
left again at its end, so sandboxes never stack (a constant number of mounts, not
eight more per test).  The host's state is snapshotted before the base sandbox and
compared when the session ends, whatever ran and in whatever order: a difference
fails the run.  `--durations-by-file=N` prints the N slowest test files at the end.

Two tiers.  A test marked `noroot` (`@pytest.mark.noroot`, or `pytestmark = pytest.mark.noroot`
for a whole file) needs neither root nor a sandbox: pure functions, plans, help texts.  It gets
no sandbox in any run, and a run of only those (`make check`: `pytest -m noroot`) enters none.
An ordinary user runs only those: nothing here asks for root, and a selection that still holds
a root test stops before running anything, naming it.  `sudo make test` runs both tiers.
"""
import ctypes
import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.append(os.path.join(ROOT, "stages"))     # helpers shared with the lessons (kindlike)

import cnikit  # noqa: E402
from host_state import host_state  # noqa: E402

# Directories a CNI plugin or runtime writes to: private (empty tmpfs) in every sandbox.
PRIVATE_DIRS = cnikit.SANDBOX_DIRS

# File descriptors of the namespaces pytest started in (HOST) and of the base sandbox it
# waits in between tests (BASE), and the host's state before anything ran.
HOST = {}
BASE = {}
HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_addoption(parser):
    parser.addoption("--durations-by-file", type=int, default=0, metavar="N",
                     help="print the N slowest test files (setup + call + teardown) at the end")


NOROOT = "noroot"


def pytest_configure(config):
    config.addinivalue_line("markers", f"{NOROOT}: needs neither root nor a sandbox (the `make check` tier)")
    config._file_durations = {}
    if os.geteuid() != 0:
        return          # only `noroot` tests may run: pytest_collection_modifyitems holds the rest
    if "net" not in HOST:
        HOST["net"] = os.open("/proc/self/ns/net", os.O_RDONLY)
        HOST["mnt"] = os.open("/proc/self/ns/mnt", os.O_RDONLY)
        HOST["before"] = host_state()
        if config.getoption("markexpr") == NOROOT:
            return      # the no-root tier run by root (sudo make check): no sandbox, the hygiene check stays
        cnikit.enter_sandbox(private_dirs=PRIVATE_DIRS)
        BASE["net"] = os.open("/proc/self/ns/net", os.O_RDONLY)
        BASE["mnt"] = os.open("/proc/self/ns/mnt", os.O_RDONLY)


def needs_root(item):
    return item.get_closest_marker(NOROOT) is None


@pytest.hookimpl(trylast=True)      # after `-m` and `-k` have deselected what they will
def pytest_collection_modifyitems(session, config, items):
    """Without root, a test that needs it would fail half way (or pass for the wrong reason):
    stop before running anything."""
    rooted = [item.nodeid for item in items if needs_root(item)]
    if "net" not in BASE and rooted:
        raise pytest.UsageError(f"{len(rooted)} of the selected tests need root (the first: {rooted[0]}): "
                                f"sudo make test runs them; without root, `make check` (pytest -m {NOROOT}) "
                                f"runs the tests that need none")


# ---------------------------------------------------------------- the sandbox of each test

CLONE_FS = 0x00000200


def _libc_call(name, *args):
    if getattr(ctypes.CDLL(None, use_errno=True), name)(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}{args}: {os.strerror(err)}")


def _setns(fd):
    _libc_call("setns", fd, 0)


def enter_test_sandbox():
    """A fresh sandbox made from the base one."""
    cnikit.enter_sandbox(private_dirs=PRIVATE_DIRS)


def leave_test_sandbox():
    """Back into the base sandbox; the test's namespaces go with their last process.
    (Entering a mount namespace moves the working directory to its root: keep it.)"""
    cwd = os.getcwd()
    # Threads a test left (the sh library's) share this thread's filesystem context, and
    # the kernel lets only a thread with its own enter a mount namespace.
    _libc_call("unshare", CLONE_FS)
    _setns(BASE["mnt"])
    _setns(BASE["net"])
    os.chdir(cwd)


@pytest.fixture(autouse=True)
def sandbox(request):
    """A fresh sandbox for each test that needs root; yields the directories that are private in it."""
    if not needs_root(request.node):
        yield None
        return
    enter_test_sandbox()
    yield PRIVATE_DIRS
    # A process a test started and forgot would keep its namespaces alive.
    for pid in _descendants(os.getpid()):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    leave_test_sandbox()


def _descendants(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(p) for p in f.read().split()]
    except OSError:
        return []
    return kids + [g for k in kids for g in _descendants(k)]


# ---------------------------------------------------------------- at the end of the session

def host_state_now():
    """host_state() of the namespaces pytest started in, seen from outside every sandbox."""
    net, mnt = HOST["net"], HOST["mnt"]
    return json.loads(subprocess.run(
        ["nsenter", f"--net=/proc/self/fd/{net}", f"--mount=/proc/self/fd/{mnt}",
         sys.executable, os.path.join(HERE, "host_state.py")],
        pass_fds=(net, mnt), capture_output=True, text=True, check=True).stdout)


def host_differences(before, now):
    """What changed on the host, one line per key (empty: nothing)."""
    return [f"{key}: before {before.get(key)!r}, now {now.get(key)!r}"
            for key in sorted(set(before) | set(now)) if before.get(key) != now.get(key)]


def pytest_sessionfinish(session, exitstatus):
    """Host hygiene, whatever ran and in whatever order: the host must look exactly as
    it did before the first sandbox, or the run fails."""
    if "before" not in HOST:
        return
    changed = host_differences(HOST["before"], host_state_now())
    if changed:
        session.config._host_changed = changed
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _cpu_seconds():
    """CPU time of this process and of the children it has waited for (what a test's commands cost)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    item._cpu_started = _cpu_seconds()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """The teardown report carries the test's CPU seconds (a worker's report reaches the
    controller with its user_properties), for --durations-by-file."""
    outcome = yield
    if call.when == "teardown" and hasattr(item, "_cpu_started"):
        report = outcome.get_result()
        report.user_properties = list(report.user_properties) + [("cpu", _cpu_seconds() - item._cpu_started)]


def pytest_runtest_logreport(report):
    durations = getattr(_CONFIG.get("config"), "_file_durations", None)
    if durations is not None:
        path = report.nodeid.split("::", 1)[0]
        total, cpu, tests = durations.get(path, (0.0, 0.0, set()))
        tests.add(report.nodeid)
        durations[path] = (total + report.duration, cpu + dict(report.user_properties).get("cpu", 0.0), tests)


_CONFIG = {}


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session):
    _CONFIG["config"] = session.config
    _CONFIG["started"] = time.monotonic()


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    changed = getattr(config, "_host_changed", None)
    if changed:
        terminalreporter.section("host hygiene: FAILED", red=True)
        terminalreporter.write_line("the suite changed the host it ran on (outside every sandbox):")
        for line in changed:
            terminalreporter.write_line("  " + line)
    n = config.getoption("--durations-by-file")
    durations = getattr(config, "_file_durations", {})
    if n and durations:
        terminalreporter.section(f"slowest {n} test files (setup + call + teardown; CPU: the worker's and "
                                 f"its commands')")
        for path, (total, cpu, tests) in sorted(durations.items(), key=lambda kv: -kv[1][0])[:n]:
            terminalreporter.write_line(f"{total:8.1f}s  cpu {cpu:7.1f}s  {path}  ({len(tests)} test(s))")
        wall = time.monotonic() - _CONFIG.get("started", time.monotonic())
        terminalreporter.write_line(f"{sum(t for t, _, _ in durations.values()):8.1f}s  cpu "
                                    f"{sum(c for _, c, _ in durations.values()):7.1f}s  all {len(durations)} "
                                    f"file(s); {wall:.1f}s wall clock")
