"""Fake programs on PATH, for the paths a test cannot produce for real (a kind cluster's
`docker`, an `ip` that refuses an address): real executables that cnikit's Executor starts
as it starts any program, each answering from the rules the test registered and logging its
argv, so the test compares the calls exactly.

    fake = FakeTools(tmp_path, monkeypatch)          # PATH is the fakes' directory only
    fake.register(["docker", "ps", ...], stdout="demo-worker\n")
    ... run the code under test ...
    assert fake.calls() == [["docker", "ps", "--filter", ...], ...]

A rule matches an argv that equals it, or, when it ends with ANY, one that starts with the
rest; the first rule that matches answers (register the specific rules first). A call no
rule matches exits 127, so an unexpected command fails the code under test."""
import json
import os

ANY = "..."
PYTHON = "/usr/bin/python3"

FAKE = r'''#!{python} -IS
import json, sys
argv = [{name!r}] + sys.argv[1:]
with open({calls!r}, "a") as f:
    f.write(json.dumps(argv) + "\n")
with open({rules!r}) as f:
    for pattern, returncode, stdout, stderr in json.load(f):
        if argv == pattern or (pattern[-1:] == [{any!r}] and argv[:len(pattern) - 1] == pattern[:-1]):
            sys.stdout.write(stdout)
            sys.stderr.write(stderr)
            sys.exit(returncode)
sys.stderr.write("fake {name}: no rule for %r\n" % (argv,))
sys.exit(127)
'''


class FakeTools:
    def __init__(self, tmp_path, monkeypatch):
        self.dir = str(tmp_path / "fakebin")
        os.makedirs(self.dir)
        self._rules_file = os.path.join(str(tmp_path), "fake-rules.json")
        self._calls_file = os.path.join(str(tmp_path), "fake-calls.jsonl")
        self._rules = []
        self._write_rules()
        monkeypatch.setenv("PATH", self.dir)        # only the fakes: nothing real runs by accident

    def register(self, argv, returncode=0, stdout="", stderr=""):
        """ARGV[0] answers ARGV (ANY last: any argv that starts so) with these."""
        path = os.path.join(self.dir, argv[0])
        if not os.path.exists(path):
            with open(path, "w") as f:
                f.write(FAKE.format(python=PYTHON, name=argv[0], calls=self._calls_file, rules=self._rules_file,
                                    any=ANY))
            os.chmod(path, 0o755)
        self._rules.append([list(argv), returncode, stdout, stderr])
        self._write_rules()

    def calls(self):
        """Every argv the fakes were run with, in order."""
        if not os.path.exists(self._calls_file):
            return []
        with open(self._calls_file) as f:
            return [json.loads(line) for line in f]

    def _write_rules(self):
        with open(self._rules_file, "w") as f:
            json.dump(self._rules, f)
