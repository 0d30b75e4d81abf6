"""The two tiers (tests/conftest.py): `make check` runs the tests marked `noroot` as an ordinary
user; `sudo make test` runs everything. These check, as a user without root (uid 65534) and
by collecting only (the tier's own run is `make check`), that the whole tree is collectable
without root, that make check's selection holds every marked test and enough of them to
matter, and that a no-root run holding a root test stops before running anything; and, as
root, that only root tests get a sandbox."""
import os
import shlex
import shutil
import subprocess
import sys
import tempfile

import pytest

from conftest import NOROOT
from kernel import NOBODY, ROOT, _others_can_enter

# The tier had 257 tests when this was written; far fewer means tests fell out of it.
AT_LEAST = 200


def make_check_files():
    """The test files `make check` hands pytest (its command, as `make -n` prints it)."""
    out = subprocess.run(["make", "-n", "-C", ROOT, "check"], capture_output=True, text=True, check=True).stdout
    line = next(l for l in out.splitlines() if "-m noroot" in l)
    return sorted(word for word in shlex.split(line) if word.endswith(".py"))


@pytest.fixture(scope="module")
def as_nobody():
    """run(*pytest_args) -> CompletedProcess: pytest as uid/gid 65534 on a world-readable copy of
    the checkout (which may live where that user cannot read, e.g. a clone in /root), with
    this interpreter's packages reachable (a read-only bind mount when they are not: this
    test's sandbox has a mount namespace of its own, so the mount goes with it)."""
    base = next(d for d in (tempfile.gettempdir(), "/tmp", "/dev/shm") if os.path.isdir(d) and _others_can_enter(d))
    work = tempfile.mkdtemp(prefix="cnikit-tiers-", dir=base)
    os.chmod(work, 0o755)
    mounted = []
    try:
        repo = os.path.join(work, "repo")
        ignore = shutil.ignore_patterns("__pycache__", ".pytest_cache")
        os.mkdir(repo)
        for name in ("cnikit.py", "pyproject.toml", "Makefile"):
            shutil.copy(os.path.join(ROOT, name), repo)
        for name in ("plugins", "stages", "tests"):
            shutil.copytree(os.path.join(ROOT, name), os.path.join(repo, name), ignore=ignore)
        subprocess.run(["chmod", "-R", "a+rX", repo], check=True)
        site = os.path.dirname(os.path.dirname(pytest.__file__))
        if not _others_can_enter(site):
            target = os.path.join(work, "site")
            os.mkdir(target)
            subprocess.run(["mount", "-o", "bind,ro", site, target], check=True)
            mounted.append(target)
            site = target
        python = os.path.realpath(sys.executable)
        if not _others_can_enter(os.path.dirname(python)):
            python = shutil.which("python3", path="/usr/bin:/bin")

        def run(*args):
            return subprocess.run([python, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=repo,
                                  capture_output=True, text=True, user=NOBODY, group=NOBODY, extra_groups=[],
                                  env={"PATH": os.environ["PATH"], "PYTHONPATH": site, "HOME": work},
                                  stdin=subprocess.DEVNULL, timeout=120)
        yield run
    finally:
        for target in mounted:
            subprocess.run(["umount", target], check=True)      # before rmtree: never delete through it
        shutil.rmtree(work)


def test_make_check_selects_every_noroot_test_and_enough_of_them(as_nobody):
    proc = as_nobody("-m", "noroot", "--collect-only", "-q", "tests")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ids = [l for l in proc.stdout.splitlines() if "::" in l]
    assert len(ids) >= AT_LEAST, proc.stdout[-2000:]
    files = make_check_files()
    assert sorted({i.split("::")[0] for i in ids}) == files


def test_a_run_without_root_that_selects_a_root_test_runs_nothing(as_nobody):
    proc = as_nobody("-q", "tests/test_core_units.py", "tests/test_core_runner.py")
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR, proc.stdout + proc.stderr
    assert "of the selected tests need root (the first: tests/test_core_runner.py::" in proc.stderr
    # the same files with -m noroot: only the marked tests, none refused
    proc = as_nobody("-q", "-m", "noroot", "--collect-only", "tests/test_core_units.py", "tests/test_core_runner.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr


# Each test says where it ran (its network namespace, and the one pytest started in or its base
# sandbox) in the file $RAN.
NAMESPACES = f'''
import os
import pytest
from conftest import BASE, HOST

def ran(name):
    with open(os.environ["RAN"], "a") as f:
        outer = os.fstat(BASE.get("net", HOST["net"])).st_ino   # no base sandbox in a run of only the tier
        f.write(f"{{name}} {{os.stat('/proc/self/ns/net').st_ino == outer}}\\n")

@pytest.mark.{NOROOT}
def test_noroot():
    ran("noroot")

def test_root():
    ran("root")
'''


@pytest.mark.parametrize("select,ran", [((), ["noroot True", "root False"]), (("-m", NOROOT), ["noroot True"])])
def test_only_root_tests_get_a_sandbox(tmp_path, select, ran):
    # a child pytest as root, with this suite's conftest, in this test's sandbox
    (tmp_path / "test_namespaces.py").write_text(NAMESPACES)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), *select, str(tmp_path / "test_namespaces.py")],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "tests"), RAN=str(tmp_path / "ran")))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "ran").read_text().splitlines() == ran
