"""`pip install .` gives a `cnikit` that carries its CNI plugin: `cni install` from a fresh venv
installs the plugin it shipped with (pyproject's data-files, found by cnikit.cni_plugin_src),
and a pod gets its address through it.  Offline: the wheel is built by this venv's setuptools
(--no-build-isolation; Makefile's PY_TEST_PKGS), as `pip install .` builds it, then installed
into a new venv by this venv's pip."""
import hashlib
import ipaddress
import os
import shutil
import subprocess
import sys

import cnikit
from kernel import addrs, links, ping

PLUGIN_NAME = "cni-bash-compatible.py"


def run(*argv, cwd=None):
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=300)
    assert proc.returncode == 0, (argv, proc.stdout[-2000:], proc.stderr[-2000:])
    return proc


def test_pip_install_gives_a_cnikit_whose_cni_install_works(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    checkout = os.path.dirname(os.path.abspath(cnikit.__file__))
    for name in ("cnikit.py", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(checkout, name), src / name)
    (src / "plugins").mkdir()
    shutil.copy(cnikit.CNI_PLUGIN_SRC, src / "plugins" / PLUGIN_NAME)
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
        "-w", str(tmp_path / "wheel"), str(src))
    wheel = [str(p) for p in (tmp_path / "wheel").iterdir()]
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", str(venv))
    run(sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q", "--no-deps",
        "--no-index", *wheel)
    shipped = venv / "share" / "cnikit" / "plugins" / PLUGIN_NAME
    with open(shipped, "rb") as a, open(cnikit.CNI_PLUGIN_SRC, "rb") as b:
        data = a.read()
        assert data == b.read()
    sha = hashlib.sha256(data).hexdigest()
    found = run(str(venv / "bin" / "python"), "-c", "import cnikit; print(cnikit.CNI_PLUGIN_SRC)", cwd="/")
    assert found.stdout.strip() == str(shipped)

    installed = run(str(venv / "bin" / "cnikit"), "cni", "install", cwd="/")
    assert f" {shipped} --compile {shipped} " in installed.stdout, installed.stdout
    plugin = os.path.join(cnikit.CNI_PLUGIN_DIR, cnikit.CNI_TYPE)
    with open(plugin, "rb") as f:
        head = f.readline().decode() + f.readline().decode()
    assert cnikit.compiled_from(head, cnikit.cni_shebang(None), sha), head
    assert os.path.exists(cnikit.cni_conf_file(cnikit.CNI_CONF_DIR, cnikit.CNI_NET))
    run(str(venv / "bin" / "cnikit"), "netns", "add", "pod1", cwd="/")
    run(str(venv / "bin" / "cnikit"), "cni", "add", "pod1", cwd="/")
    (address,) = addrs("eth0", ns="pod1")
    gateway = str(ipaddress.ip_interface(address).network[1])     # the plugin's default gateway
    assert ping(gateway, ns="pod1"), address
    run(str(venv / "bin" / "cnikit"), "cni", "del", "pod1", cwd="/")
    assert "eth0" not in links("pod1")
