"""cnikit.py and the plugin are two programs (the plugin never imports cnikit): each
defines the facts they share once. This test is where the two definitions must agree."""
import hashlib
import importlib.util
import json
import os
import re
import string
import subprocess
import sys

import pytest

import cnikit
from kernel import load_file

PLUGIN = os.path.join(os.path.dirname(cnikit.CNI_PLUGIN_SRC), "cni-bash-compatible.py")


def load_plugin():
    return load_file(PLUGIN, "cni_bash_compatible_literals")


@pytest.mark.noroot
def test_paths_and_names_cnikit_and_the_plugin_share_are_the_same():
    plugin = load_plugin()
    assert plugin.DEFAULT_DATA_DIR == cnikit.CNI_DATA_DIR
    assert plugin.NODE_SUBNET_FILE == cnikit.NODE_SUBNET_FILE
    assert plugin.DEFAULT_LOG == cnikit.CNI_LOG
    assert plugin.CHAIN_PREFIX == cnikit.CHAIN_PREFIX
    assert plugin.DEFAULT_BRIDGE == cnikit.CNI_DEFAULT_BRIDGE
    assert cnikit.CNI_VERSION in plugin.SUPPORTED_VERSIONS
    # cleanup tells cnikit's installed plugin by this mark, in the first lines of its source
    with open(cnikit.CNI_PLUGIN_SRC, "rb") as f:
        assert cnikit.CNI_PLUGIN_MARK in f.read(512)
    # the CLI's NAT chains never look like the plugin's per-attachment ones
    assert cnikit.nat_chain("10.0.0.0/24") not in {plugin.chain_name("cnikit", "c", "eth0")}
    assert len(cnikit.nat_chain("10.0.0.0/24")) <= 28


@pytest.mark.noroot
def test_the_sandbox_keeps_every_shared_path_private():
    for path in (cnikit.CNI_DATA_DIR, cnikit.NODE_SUBNET_FILE, cnikit.CNI_LOG, cnikit.CNI_CACHE_DIR,
                 cnikit.CNI_CONF_DIR, cnikit.CNI_PLUGIN_DIR):
        assert any(path == d or path.startswith(d + "/") for d in cnikit.SANDBOX_DIRS), path


@pytest.mark.noroot
def test_a_name_is_valid_for_cnikit_exactly_when_it_is_for_the_plugin():
    plugin = load_plugin()
    samples = ["pod1", "a", "A-b_c.d", "9x", "-x", ".x", "_x", "x y", "x/y", "x\n", "", "é", "x:y",
               "x" * 300, "ab$", "١٢", "x;y", "x=y"] + list(string.printable)
    for name in samples:
        assert bool(re.match(cnikit.CNI_NAME_RE, name)) == plugin.valid_name(name), repr(name)
    allowed = {c for c in map(chr, range(0x250)) if re.match(cnikit.CNI_NAME_RE, "a" + c)}
    assert allowed == set(plugin.NAME_CHARS)


# The facts the plugin owns and cnikit asks it for (cnikit.cni_plugin): each test below runs the
# plugin for real and cnikit's reading of the same input, so a drift on either side fails.

@pytest.mark.noroot
def test_cnikit_reads_the_plugin_it_ships():
    assert cnikit.cni_plugin().__file__ == cnikit.CNI_PLUGIN_SRC
    assert cnikit.cni_plugin().DEFAULT_LOG == cnikit.CNI_LOG


@pytest.mark.noroot
def test_cnikit_and_the_plugin_take_the_same_cni_versions():
    plugin = load_plugin()
    samples = ["1.0.0", "0.3.1", "1.1.0", "0.2.0", "9.9.9", "1.0", "1", "", "1.0.0.0", "1.0.x", "v1.0.0",
               " 1.0.0", "1.0.0\n", "1..0", "1.\u0662.0", "01.0.0", "-1.0.0", "1.0.+1"]
    for text in samples:
        theirs = plugin.version_tuple(text)
        try:
            ours = cnikit.cni_version_tuple(text)
        except cnikit.UsageError:
            ours = None
        assert ours == theirs, repr(text)
    # "1.0": cnikit refuses the config the plugin would refuse, before calling anything
    with pytest.raises(cnikit.UsageError, match="cniVersion '1.0'"):
        cnikit.cni_parse(json.dumps({"cniVersion": "1.0", "name": "n", "plugins": [{"type": "cnikit"}]}).encode(), "x")


def plugin_log(tmp_path, conf_log, env_log):
    """Where a real VERSION call of the plugin writes, given a config `log` and CNIKIT_LOG."""
    conf = {"cniVersion": "1.0.0", **({"log": str(conf_log)} if conf_log else {})}
    env = {"PATH": os.environ["PATH"], "CNI_COMMAND": "VERSION", **({"CNIKIT_LOG": str(env_log)} if env_log else {})}
    subprocess.run([sys.executable, "-I", "-S", PLUGIN], input=json.dumps(conf).encode(), env=env,
                   capture_output=True, check=True)
    return [str(p) for p in (conf_log, env_log, cnikit.CNI_LOG) if p and os.path.exists(p)]


@pytest.mark.parametrize("conf_log,env_log", [(True, True), (True, False), (False, True), (False, False)])
def test_cni_log_tails_the_file_the_plugin_writes(tmp_path, monkeypatch, conf_log, env_log):
    conf_log = tmp_path / "conf.log" if conf_log else None
    env_log = tmp_path / "env.log" if env_log else None
    written = plugin_log(tmp_path, conf_log, env_log)
    assert len(written) == 1, written
    conflist = tmp_path / "10-x.conflist"
    ours = {"type": cnikit.CNI_TYPE, **({"log": str(conf_log)} if conf_log else {})}
    conflist.write_text(json.dumps({"cniVersion": "1.0.0", "name": "x", "plugins": [ours]}))
    if env_log:
        monkeypatch.setenv("CNIKIT_LOG", str(env_log))
    else:
        monkeypatch.delenv("CNIKIT_LOG", raising=False)
    assert cnikit.cni_log_path(conf=str(conflist)) == written[0]


@pytest.mark.noroot
def test_cnikit_reads_the_compiled_plugins_first_lines_as_they_are_written(tmp_path):
    out = tmp_path / "compiled"
    subprocess.run([sys.executable, "-I", "-S", PLUGIN, "--compile", PLUGIN, str(out)], check=True)
    with open(out, "rb") as f:
        head = f.readline().decode() + f.readline().decode()
    with open(PLUGIN, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    magic = repr(importlib.util.MAGIC_NUMBER)
    shebang = f"#!{sys.executable} {cnikit.CNI_PYTHON_FLAGS}"
    assert cnikit.compiled_from(head, shebang, sha, magic)
    assert not cnikit.compiled_from(head, shebang, sha[::-1], magic)
    assert not cnikit.compiled_from(head, shebang, sha, repr(b"\0\0\r\n"))
    assert not cnikit.compiled_from(head, "#!/nowhere/python3 -IS", sha, magic)
    # the file runs: the first line really is the interpreter compiled_from read
    proc = subprocess.run([str(out)], input=b"{}", env={"CNI_COMMAND": "VERSION", "CNIKIT_LOG": "/dev/null"},
                          capture_output=True, check=True)
    assert json.loads(proc.stdout)["supportedVersions"]
