"""The harness every test stands on (tests/conftest.py): sandboxes that do not pile up,
and a host-hygiene check at the end of the session that can fail, in any order."""
import os
import subprocess
import sys

import conftest

HERE = os.path.dirname(os.path.abspath(__file__))


def mounts():
    with open("/proc/self/mounts") as f:
        return len(f.read().splitlines())


def test_sandboxes_do_not_pile_up_mounts():
    here = mounts()
    for _ in range(3):
        conftest.leave_test_sandbox()
        conftest.enter_test_sandbox()
    assert mounts() == here
    # and each one is fresh: what the last one made is gone
    subprocess.run(["ip", "netns", "add", "harness"], check=True)
    conftest.leave_test_sandbox()
    conftest.enter_test_sandbox()
    assert os.listdir("/run/netns") == []


def test_host_differences_names_what_changed():
    assert conftest.host_differences({"links": ["lo"]}, {"links": ["lo"]}) == []
    assert conftest.host_differences({"links": ["lo"]}, {"links": ["lo", "leak0"]}) == \
        ["links: before ['lo'], now ['lo', 'leak0']"]


def test_a_session_that_changes_its_host_fails_at_the_end(tmp_path):
    # A child pytest whose "host" is this test's sandbox: its one test passes, but it
    # leaves a bridge on that host (outside its own sandbox), so the run must fail.
    (tmp_path / "test_leaky.py").write_text(
        "import subprocess\n"
        "from conftest import HOST\n"
        "def test_leaks_a_bridge_on_the_host():\n"
        "    fd = HOST['net']\n"
        "    subprocess.run(['nsenter', f'--net=/proc/self/fd/{fd}', 'ip', 'link', 'add', 'leak0', 'type', 'bridge'],\n"
        "                   pass_fds=(fd,), check=True)\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), str(tmp_path / "test_leaky.py")],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=HERE), timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout and "host hygiene: FAILED" in proc.stdout, proc.stdout
    assert "leak0" in proc.stdout
    subprocess.run(["ip", "link", "del", "leak0"], check=True)     # it leaked into this test's sandbox only
