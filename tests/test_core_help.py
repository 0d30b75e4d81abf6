"""cnikit's own help: every object explains itself with examples, options go before the
object or after the verb, and `-n NS cleanup` says what it looked at."""
import inspect
import re

import pytest
import sh

import cnikit
from kernel import cli

OBJECTS = ("netns", "veth", "bridge", "route", "nat", "vxlan", "cni", "doctor", "show", "cleanup", "sandbox")


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


# Every row of the verb table: its --help lists exactly its arguments (plus -h and, where it
# takes them, the common options), with its examples; dispatch can call its function by keyword.
ROWS = {" ".join(row.path): row for row in cnikit.VERBS}
COMMON = {"-n", "--in", "--dry-run", "-q", "--quiet", "-v", "--verbose", "--sandbox", "--color"}


def _first_column(section):
    """The flags and names argparse lists in a help SECTION (its first column)."""
    names = set()
    for line in section.splitlines():
        if line.startswith("  ") and not line.startswith("    " * 3):
            head = re.split(r"\s{2,}", line.strip())[0]
            names.update(w.rstrip(",") for w in head.split() if w.startswith("-"))
            if not head.startswith("-"):
                names.add(head)
    return names


@pytest.mark.parametrize("path", sorted(ROWS))
def test_each_verb_help_lists_exactly_the_arguments_of_its_row(path):
    row = ROWS[path]
    proc = cli(*row.path, "--help")
    assert proc.returncode == 0, proc.stderr
    body = proc.stdout.split("examples:\n")[0]
    options = _first_column(body.split("options:\n", 1)[1])
    positionals = _first_column(body.split("positional arguments:\n", 1)[1].split("options:\n")[0]) \
        if "positional arguments:\n" in body else set()
    want_options = {f for arg in row.args for f in arg.flags if f.startswith("-")} | {"-h", "--help"}
    want_options |= COMMON if row.options else set()
    want_positionals = {arg.kw.get("metavar", arg.flags[0]) for arg in row.args if not arg.flags[0].startswith("-")}
    assert (options, positionals) == (want_options, want_positionals), proc.stdout
    for example in row.examples:
        assert "  " + example in proc.stdout.splitlines(), (example, proc.stdout)


@pytest.mark.parametrize("path", sorted(ROWS))
def test_dispatch_calls_each_verb_function_by_keywords_it_has(path):
    row = ROWS[path]
    params = inspect.signature(row.func).parameters
    given = set(row.fixed) | {arg.dest for arg in row.args} | ({row.ns} if row.ns else set())
    assert given <= set(params), (path, given - set(params))
    required = {n for n, p in params.items() if p.default is p.empty and p.kind == p.POSITIONAL_OR_KEYWORD}
    assert required - given <= {"r"}, (path, required - given)


@pytest.mark.parametrize("path", sorted(ROWS))
def test_the_parser_built_for_one_command_is_the_one_built_for_all(path):
    """main builds only the parsers on the command's path: each says and accepts what the whole one does."""
    def leaf(parser, words):
        for word in words:
            action = next(a for a in parser._actions if isinstance(a, cnikit.argparse._SubParsersAction))
            parser = action.choices[word]
        return parser
    words = path.split()
    whole, lazy = leaf(cnikit.build_parser(), words), leaf(cnikit.build_parser(words + ["x"]), words)
    assert lazy.format_help() == whole.format_help()
    for prefix in (words[:1], words[:2]):          # the object's (and a group's) own --help, verbs listed
        assert leaf(cnikit.build_parser(prefix + ["--help"]), prefix).format_help() == \
            leaf(cnikit.build_parser(), prefix).format_help()
    assert cnikit.build_parser(["--help"]).format_help() == cnikit.build_parser().format_help()


def test_tools_come_from_the_table():
    assert set(cnikit.tools()) == {tool for row in cnikit.VERBS for tool in row.tools} >= {"ip", "iptables", "bridge"}


def _example_argvs():
    """Every example of the table as an argv (after `cnikit`), `&&` chains split."""
    for row in cnikit.VERBS:
        for example in row.examples:
            for part in example.split("#")[0].split("&&"):
                words = part.split()
                if words[:1] == ["cnikit"]:
                    yield words[1:]


CRAFTED = [
    ["netns", "list"], ["--dry-run", "netns", "add", "a", "--lo-up"], ["netns", "add", "a", "--lo-up", "--dry-run"],
    ["-n", "x", "show"], ["-nx", "show"], ["--in=x", "show"], ["--in", "x", "show", "-n", "y"], ["-n=x", "show"],
    ["--color", "always", "show"], ["--color=never", "show", "--json"], ["--color", "blue", "show"],
    ["-qv", "show"], ["--dry", "show"], ["show", "--js"], ["show", "--json=1"], ["show", "extra"],
    ["nat", "add", "10.0.0.0/24"], ["nat", "add", "10.0.0.0/24", "--out"], ["nat", "add", "10.0.0.0/24", "--out=eth0"],
    ["nat", "publish", "80", "--to", "10.0.0.2:80", "--bridge", "br0", "--proto", "sctp"],
    ["nat", "unpublish", "80", "--proto", "udp", "--proto", "tcp"], ["veth", "add", "a", "-b"],
    ["veth", "add", "a", "b", "--mtu", "-1"], ["veth", "add", "a", "b", "--addr", ""], ["veth", "add", "a", "b", "--", "c"],
    ["doctor", "a", "b", "-4", "-6"], ["doctor", "a", "b", "-6", "-6"], ["doctor", "a", "b", "-4"],
    ["cni", "install", "--chain", "portmap", "--chain", "portmap"], ["cni", "install", "--chain", "nope"],
    ["cni", "add", "pod1", "--ifname", "eth1", "--id", "c1", "-n", "h"], ["cni", "gc", "pod1"],
    ["vxlan", "fdb", "add", "v", "00:00:00:00:00:00", "--dst", "192.0.2.2"], ["vxlan", "fdb"], ["route", "add", "-h"],
    ["route", "del"], ["route", "add", "default", "--via", "10.0.0.1", "--dev", "eth0", "--sandbox", "-q"],
    ["-n", "netns", "netns", "list"], ["cleanup", "--dry-run", "-n", "a"], ["frob"], [], ["netns"],
]


@pytest.mark.parametrize("argv", CRAFTED + list(_example_argvs()), ids=" ".join)
def test_the_plain_command_line_reader_agrees_with_argparse_or_leaves_it_to_it(argv):
    fast = cnikit._parse_simple(argv)
    try:
        args, extra = cnikit.build_parser(argv).parse_known_args(argv)
    except (cnikit.UsageError, SystemExit):
        assert fast is None, argv            # an error or --help: argparse's to say
        return
    if fast is not None:
        assert not extra and vars(fast) == vars(args), argv


def test_plain_command_lines_are_read_without_argparse():
    plain = [argv for argv in _example_argvs() if not any(w in argv for w in ("exec", "attach", "sandbox"))]
    assert plain and all(cnikit._parse_simple(argv) is not None for argv in plain), \
        [argv for argv in plain if cnikit._parse_simple(argv) is None]
