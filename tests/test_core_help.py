"""cnikit's own help: every object explains itself with examples, options go before the
object or after the verb, and `-n NS cleanup` says what it looked at."""
import re

import pytest
import sh

from kernel import cli

OBJECTS = ("netns", "veth", "bridge", "nat", "vxlan", "cni", "show", "cleanup", "sandbox")


@pytest.mark.noroot
@pytest.mark.parametrize("obj", OBJECTS)
def test_every_object_help_has_a_description_and_examples_that_name_it(obj):
    proc = cli(obj, "--help")
    assert proc.returncode == 0, proc.stderr
    usage, _, rest = proc.stdout.partition("\n\n")
    description = rest.split("\n\n")[0]
    assert description.strip() and not description.startswith(("positional", "options")), proc.stdout
    examples = proc.stdout.split("examples:\n", 1)[1]
    assert re.search(rf"^  cnikit( -n \S+)? {obj}\b", examples, re.M), examples


@pytest.mark.noroot
def test_main_help_lists_each_example_once_and_says_how_to_run_without_sudo():
    out = cli("--help").stdout
    examples = [line.split("#")[0].strip() for line in out.split("examples:\n", 1)[1].splitlines()
                if line.startswith("  cnikit")]
    assert len(examples) == len(set(examples)), examples
    assert "without sudo" in out


def test_options_after_the_verb_mean_what_they_mean_before_the_object():
    after, before = cli("cleanup", "--dry-run"), cli("--dry-run", "cleanup")
    assert after.returncode == before.returncode == 0, after.stderr
    assert after.stdout == before.stdout
    assert cli("bridge", "add", "br0", "--dry-run").stdout == cli("--dry-run", "bridge", "add", "br0").stdout
    assert "br0" not in str(sh.ip("link", "show"))


def test_cleanup_inside_a_namespace_says_the_namespace_itself_stays():
    cli("netns", "add", "a", check=True)
    out = cli("-n", "a", "cleanup").stdout
    assert "nothing of cnikit's is left inside namespace a (the namespace itself stays" in out
    assert "a" in str(sh.ip("netns", "list")).split()
    assert "removed 1 object(s)" in cli("cleanup").stdout


# What each `cni` verb reads of an attachment (the plugin's CNI_* for it): exactly what its --help lists.
CNI_VERB_OPTIONS = {"add": {"NETNS", "--ifname", "--id", "--args", "--runtime-config"},
                    "del": {"NETNS", "--ifname", "--id", "--args", "--runtime-config"},
                    "check": {"NETNS", "--ifname", "--id", "--args"},
                    "status": set(), "gc": set(), "version": set()}


@pytest.mark.noroot
@pytest.mark.parametrize("verb", sorted(CNI_VERB_OPTIONS))
def test_each_cni_verb_help_lists_exactly_what_it_accepts(verb):
    usage = cli("cni", verb, "--help").stdout.split("options:")[0]
    listed = {w for w in ("NETNS", "--ifname", "--id", "--args", "--runtime-config") if re.search(rf"{w}\b", usage)}
    assert listed == CNI_VERB_OPTIONS[verb], usage
    for flag in {"--ifname", "--id", "--args", "--runtime-config"} - CNI_VERB_OPTIONS[verb]:
        proc = cli("cni", verb, flag, "x")
        assert proc.returncode == 2 and f"cni {verb}: {flag} does not apply (" in proc.stderr, proc.stderr
