"""cnikit.py and the plugin, plain and compiled, on the oldest Python they claim (pyproject's
requires-python, which both programs state as their floor) and on the newest on this machine;
an older Python that still parses them gets one line (the plugin: a CNI error), never a
traceback.  The interpreters are this machine's own (pyenv's and /usr/bin's, each called by its
real path: pyenv's shim costs ~80 ms a start); a version that is not here is skipped."""
import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

import cnikit
from kernel import ROOT, links, load_file, ping
from plugin_helpers import CLASSIC, PLUGIN_SRC, check_result_shape, cni, error, netns, ok

CNIKIT_PY = os.path.join(ROOT, "cnikit.py")
DRY_RUNS = (("--dry-run", "--color", "never", "bridge", "add", "br0", "--addr", "192.0.2.1/24"),
            # reads the plugin too (cnikit asks it how a cniVersion reads)
            ("--dry-run", "--color", "never", "cni", "install", "--cni-version", "1.0.0", "--subnet", "192.0.2.0/24"))


def load_plugin():
    return load_file(PLUGIN_SRC, "cni_bash_compatible_pyversions")


def stated_minimum():
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        found = re.search(r'^requires-python = ">=(\d+)\.(\d+)"$', f.read(), re.M)
    assert found, "pyproject.toml states no requires-python >=X.Y"
    return int(found[1]), int(found[2])


def interpreters():
    """{(major, minor): path} of this machine's CPython 3 binaries, the first path of each version."""
    found = {}
    for path in sorted(glob.glob("/root/.pyenv/versions/3.*/bin/python3") + glob.glob("/usr/bin/python3.*")
                       + glob.glob("/usr/local/bin/python3.*")):
        if not re.search(r"/python3(\.\d+)?$", path) or not os.access(path, os.X_OK):
            continue
        proc = subprocess.run([path, "-I", "-S", "-c", "import sys; print(*sys.version_info[:2])"],
                              capture_output=True, text=True)
        if proc.returncode == 0:
            found.setdefault(tuple(map(int, proc.stdout.split())), path)
    return found


INTERPRETERS = interpreters()


@pytest.fixture
def short_dir():
    """A directory with a short path: the compiled plugin's first line holds the interpreter's
    path and a loader, and the kernel reads 127 bytes of it (pyenv's paths are too long)."""
    d = tempfile.mkdtemp(prefix="py", dir="/tmp")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def python_in(short_dir, version):
    """VERSION's interpreter, reached through a short symlink (Python finds its library by the link's target)."""
    if version not in INTERPRETERS:
        pytest.skip(f"no Python {'.'.join(map(str, version))} on this machine")
    link = os.path.join(short_dir, "python3")
    os.symlink(INTERPRETERS[version], link)
    return link


def plain_plugin(python, where):
    """The plain plugin with PYTHON as its interpreter, as `cni install --plain --python` writes it."""
    out = os.path.join(where, "plain")
    with open(out, "wb") as f:
        f.write(cnikit.cni_plugin_bytes(PLUGIN_SRC, cnikit.cni_shebang(python)))
    os.chmod(out, 0o755)
    return out


def compiled_plugin(python, where):
    """The compiled plugin built by PYTHON, as `cni install --python` builds it."""
    out = os.path.join(where, "compiled")
    proc = subprocess.run(cnikit.cni_compile_argv(PLUGIN_SRC, python, out), capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    return out


@pytest.mark.noroot
def test_the_stated_minimum_is_the_one_both_programs_check():
    assert stated_minimum() == cnikit.PYTHON_MIN == load_plugin().MIN_PYTHON


def versions_to_run():
    """The stated minimum and the newest Python 3 here (the same one when that is all there is)."""
    newest = max(INTERPRETERS) if INTERPRETERS else (3, 99)
    return [pytest.param(stated_minimum(), id="oldest"), pytest.param(newest, id="newest")]


@pytest.mark.parametrize("version", versions_to_run())
def test_the_plugin_plain_and_compiled_serves_version_add_and_del(version, short_dir):
    python = python_in(short_dir, version)
    magic = subprocess.run([python, "-I", "-S", "-c", "import importlib.util; print(importlib.util.MAGIC_NUMBER)"],
                           capture_output=True, text=True, check=True).stdout.strip()
    compiled = compiled_plugin(python, short_dir)
    with open(compiled, "rb") as f:
        head = f.readline().decode() + f.readline().decode()
    with open(PLUGIN_SRC, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    assert cnikit.compiled_from(head, cnikit.cni_shebang(python), sha, magic), head   # built by this Python
    for i, plugin in enumerate((plain_plugin(python, short_dir), compiled)):
        answer = ok(cni("VERSION", {"cniVersion": "1.0.0"}, plugin=plugin))
        assert answer["cniVersion"] == "1.0.0" and "1.0.0" in answer["supportedVersions"], answer
        cid = f"py{i}"
        ns = netns(cid)
        res = ok(cni("ADD", CLASSIC, plugin=plugin, cid=cid, netns=ns))
        check_result_shape(res, "1.0.0")
        assert ping(res["ips"][0]["gateway"], cid), res
        host_end = res["interfaces"][1]["name"]
        assert host_end in links()
        ok(cni("DEL", CLASSIC, plugin=plugin, cid=cid, netns=ns))
        assert host_end not in links()


@pytest.mark.parametrize("version", versions_to_run())
def test_cnikit_helps_and_dry_runs_as_on_this_python(version, short_dir):
    python = python_in(short_dir, version)
    helped = subprocess.run([python, CNIKIT_PY, "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "sandbox" in helped.stdout and helped.stderr == "", helped
    for args in DRY_RUNS:
        here = subprocess.run([sys.executable, CNIKIT_PY, *args], capture_output=True, text=True)
        there = subprocess.run([python, CNIKIT_PY, *args], capture_output=True, text=True)
        assert here.returncode == 0 and here.stdout.count("\n") >= 2, here
        assert (there.returncode, there.stdout, there.stderr) == (here.returncode, here.stdout, here.stderr)


def older_versions():
    """The Pythons here older than the stated minimum that still parse both files (3.6: f-strings)."""
    return [pytest.param(v, id=".".join(map(str, v))) for v in sorted(INTERPRETERS)
            if (3, 6) <= v < stated_minimum()] or [pytest.param((3, 7), id="3.7")]


@pytest.mark.parametrize("version", older_versions())
def test_an_older_python_gets_one_line_and_nothing_changes(version, short_dir):
    python = python_in(short_dir, version)
    need = ".".join(map(str, stated_minimum()))
    for args in (["--help"], *DRY_RUNS, ["cni", "install"]):
        proc = subprocess.run([python, CNIKIT_PY, *args], capture_output=True, text=True)
        assert proc.returncode == cnikit.EXIT_USAGE and proc.stdout == "", proc
        assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("cnikit: error: "), proc.stderr
        assert f"Python {need} or newer" in proc.stderr, proc.stderr
    plugin = plain_plugin(python, short_dir)
    before = sorted(links())
    for verb in ("VERSION", "ADD", "DEL"):
        res = cni(verb, CLASSIC, plugin=plugin, cid="old", netns=netns("old") if verb == "ADD" else None)
        refused = error(res, load_plugin().E_NOT_AVAILABLE)
        assert refused["cniVersion"] == CLASSIC["cniVersion"] and f"Python {need} or newer" in refused["msg"]
        assert res.stdout.count("\n") == 1 and res.stderr == "", res
    assert sorted(links()) == before and links("old").keys() == {"lo"}
    proc = subprocess.run(cnikit.cni_compile_argv(PLUGIN_SRC, python, os.path.join(short_dir, "c")),
                          capture_output=True, text=True)
    assert proc.returncode == 1 and len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr, proc
    assert f"Python {need} or newer" in proc.stderr and not os.path.exists(os.path.join(short_dir, "c"))
    # cnikit on a good Python, asked to install for the old one: the compile's line, nothing installed
    proc = subprocess.run([sys.executable, CNIKIT_PY, "cni", "install", "--python", python], capture_output=True,
                          text=True)
    assert proc.returncode == 1 and len(proc.stderr.splitlines()) == 1, proc
    assert f"Python {need} or newer" in proc.stderr and os.listdir(cnikit.CNI_PLUGIN_DIR) == [], proc.stderr
    assert not os.path.exists(cnikit.cni_conf_file(cnikit.CNI_CONF_DIR, cnikit.CNI_NET))
