"""cnikit.py and the plugin are two programs (the plugin never imports cnikit): each
defines the facts they share once. This test is where the two definitions must agree."""
import importlib.util
import os
import string

import cnikit

PLUGIN = os.path.join(os.path.dirname(cnikit.CNI_PLUGIN_SRC), "cni-bash-compatible.py")


def load_plugin():
    spec = importlib.util.spec_from_file_location("cni_bash_compatible_literals", PLUGIN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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


def test_the_sandbox_keeps_every_shared_path_private():
    for path in (cnikit.CNI_DATA_DIR, cnikit.NODE_SUBNET_FILE, cnikit.CNI_LOG, cnikit.CNI_CACHE_DIR,
                 cnikit.CNI_CONF_DIR, cnikit.CNI_PLUGIN_DIR):
        assert any(path == d or path.startswith(d + "/") for d in cnikit.SANDBOX_DIRS), path


def test_a_name_is_valid_for_cnikit_exactly_when_it_is_for_the_plugin():
    plugin = load_plugin()
    samples = ["pod1", "a", "A-b_c.d", "9x", "-x", ".x", "_x", "x y", "x/y", "x\n", "", "é", "x:y",
               "x" * 300, "ab$", "١٢", "x;y", "x=y"] + list(string.printable)
    for name in samples:
        assert bool(cnikit.CNI_NAME_RE.match(name)) == plugin.valid_name(name), repr(name)
    allowed = {c for c in map(chr, range(0x250)) if cnikit.CNI_NAME_RE.match("a" + c)}
    assert allowed == set(plugin.NAME_CHARS)
