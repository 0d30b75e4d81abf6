"""A dry run is a POSIX sh script (Debian's sh is dash): every lesson's, the README tour's
and the README's `cnikit cni` sequence, each replayed with `dash -e` in a fresh sandbox,
build the same kernel state as the real run, and nothing the script starts outlives it,
also when one of its steps fails or it is stopped.

The real run and the replay each get a nested sandbox of their own (`cnikit.py sandbox`),
so their namespaces, links, rules and CNI directories start empty and vanish after.
"""
import glob
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid

import pytest

from kernel import CLI, ROOT, cli, cli_env, kill_left, marked, netns_list, snapshot

STAGES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "stages", "[0-9]*.py")))
CNIKIT = CLI
DASH = "/bin/dash"
TIMEOUT = 180
# The kernel state of the sandbox and of every namespace in it (kernel.snapshot leaves out
# what legitimately differs between two runs: MACs, ifindexes, counters).
SNAPSHOT = ("import json, subprocess, sys; sys.path.insert(0, {tests!r}); from kernel import snapshot, netns_list; "
            "print(json.dumps(snapshot(netns_list())))").format(tests=os.path.join(ROOT, "tests"))
MARK = "CNIKIT_REPLAY"     # an environment variable every process a replay starts inherits


def in_sandbox(script, mark):
    """Run shell SCRIPT (sh) in a fresh nested sandbox, then snapshot the kernel state there.
    Every process it starts carries MARK=<mark> in its environment."""
    return subprocess.run(CNIKIT + ["-q", "sandbox", "--", "sh", "-c", script], capture_output=True, text=True,
                          env=cli_env(dict(os.environ, SNAP=SNAPSHOT, **{MARK: mark})), timeout=TIMEOUT,
                          stdin=subprocess.DEVNULL)


def state_of(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])




def assert_nothing_left(mark):
    """No process the replay started is still alive; whatever is left is killed, then reported."""
    left = kill_left(MARK, mark)
    assert not left, f"the script left {len(left)} process(es) running: {left}"


def replay(script_path, mark=None):
    """`dash -e SCRIPT` in a fresh sandbox: the kernel state it left; the script must end with 0."""
    mark = mark or uuid.uuid4().hex
    proc = in_sandbox(f"{DASH} -e {shlex.quote(str(script_path))} >/dev/null; rc=$?\n"
                      f"{sys.executable} -c \"$SNAP\"; [ $rc = 0 ] || {{ echo \"dash -e exited $rc\" >&2; exit $rc; }}", mark)
    assert_nothing_left(mark)
    return state_of(proc)


def dry_run_lines(script):
    """The commands of a script, comments and here-document bodies left out."""
    out, end = [], None
    for line in script.splitlines():
        if end is not None:
            end = None if line == end else end
            continue
        m = re.search(r"<<'?(\w+)'?", line)
        if m:
            end = m.group(1)
        if line and not line.startswith("#"):
            out.append(line)
    return out


# ---------------------------------------------------------------- the lessons

def load_lesson(stage):
    """Import stages/STAGE.py as a module (its name starts with a digit)."""
    sys.path.insert(0, os.path.join(ROOT, "stages"))
    spec = importlib.util.spec_from_file_location(f"lesson_{stage}", os.path.join(ROOT, "stages", stage + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("stage", STAGES)
def test_lesson_dry_run_replays_under_dash_to_the_real_runs_kernel_state(stage, tmp_path):
    """The lesson for real, as in its sandbox (build and verify, driven here in the test's
    fresh sandbox, so what it built is still there to look at), against its --dry-run
    piped into `dash -e` in a fresh sandbox of its own."""
    mod = load_lesson(stage)
    # a pitfall lab's steps come from stages/pitfall.py; every other lesson defines its own
    lab = getattr(mod, "LAB", None)
    build, verify = mod.pitfall.steps(lab) if lab else (mod.build, mod.verify)
    L = (lab.lesson if lab else mod.LESSON).start(quiet=True)
    try:
        L.play(build, verify)
    finally:
        L.r.stop_all()
    assert L.passed(), L.checks
    real = snapshot(netns_list())
    dry = subprocess.run([sys.executable, os.path.join(ROOT, "stages", stage + ".py"), "--dry-run", "--color",
                          "never"], capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    assert dry.returncode == 0, dry.stderr
    assert "<<<" not in dry.stdout and "jobs -p" not in dry.stdout      # bash-only, or empty in dash
    if hasattr(mod, "CAUSE"):                                             # a pitfall lab: doctor is in the script
        assert " doctor " in dry.stdout
    (tmp_path / "lesson.sh").write_text(dry.stdout)
    assert subprocess.run([DASH, "-n", str(tmp_path / "lesson.sh")]).returncode == 0
    assert replay(tmp_path / "lesson.sh") == real


def _script_with_background_jobs():
    """Lesson 04's dry run: a listener and a client in the background."""
    script = subprocess.run([sys.executable, os.path.join(ROOT, "stages", "04_tcp.py"), "--dry-run", "--color",
                             "never"], capture_output=True, text=True, timeout=TIMEOUT).stdout
    assert re.search(r"^job1=\$!$", script, re.M) and re.search(r"^job2=\$!$", script, re.M)
    return script


def test_a_failing_step_after_background_jobs_still_stops_them(tmp_path):
    """Under `sh -e` a failing step ends the script at once: its EXIT trap stops the jobs."""
    script = _script_with_background_jobs()
    head = script[:script.index("job2=$!")]
    (tmp_path / "fails.sh").write_text(head + "job2=$!\nip link del no-such-link\necho not reached\n")
    mark = uuid.uuid4().hex
    proc = in_sandbox(f"{DASH} -e {tmp_path / 'fails.sh'}", mark)
    assert_nothing_left(mark)
    assert proc.returncode != 0 and "not reached" not in proc.stdout


def script_and_step(mark, script_argv, step_argv):
    """The PID of the shell running SCRIPT_ARGV and of its child running STEP_ARGV (None when
    not there yet).  Told by parent and command line, not by name: a background job forked by
    the script is a "dash" too until it execs, which a loaded machine may delay."""
    procs = {}
    for pid in marked(MARK, mark):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")[:-1]
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:         # a short-lived step (e.g. `ip`) ended meanwhile
            continue
        procs[pid] = (argv, int(stat[stat.rindex(")") + 2:].split()[1]))
    scripts = [pid for pid, (argv, ppid) in procs.items()
               if argv == script_argv and procs.get(ppid, ([], 0))[0] != script_argv]
    script = scripts[0] if len(scripts) == 1 else None
    steps = [pid for pid, (argv, ppid) in procs.items() if script and ppid == script and argv == step_argv]
    return script, (steps[0] if len(steps) == 1 else None)


def test_an_interrupted_script_stops_its_background_jobs(tmp_path):
    """Ctrl-C while the script waits on a step: the terminal interrupts the step and the
    shell (its background jobs ignore SIGINT, as POSIX says); the script's trap stops them."""
    script = _script_with_background_jobs()
    head = script[:script.index("job2=$!")]
    # a step that outlasts the test's wait: a lost interrupt is a timeout, never an exit 0
    (tmp_path / "waits.sh").write_text(head + "job2=$!\necho waiting\nsleep 600\n")
    mark = uuid.uuid4().hex
    # As from a terminal: SIGINT not ignored.  A shell that starts with it ignored (any
    # descendant of a background job of a non-interactive shell, such as a CI runner's)
    # cannot trap it (POSIX): the interrupt would be lost.
    proc = subprocess.Popen(["env", "--default-signal=INT"] + CNIKIT + ["-q", "sandbox", "--", DASH, "-e",
                                                                       str(tmp_path / "waits.sh")],
                            stdout=subprocess.PIPE, text=True, env=cli_env(dict(os.environ, **{MARK: mark})))
    try:
        for line in proc.stdout:
            if line.strip() == "waiting":
                break
        deadline = time.monotonic() + 10
        while True:             # "waiting" is printed just before the step starts
            shell, step = script_and_step(mark, [DASH, "-e", str(tmp_path / "waits.sh")], ["sleep", "600"])
            if step or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert shell and step, (shell, step)
        for pid in (shell, step):
            os.kill(pid, signal.SIGINT)
        assert proc.wait(timeout=30) == 130
    except BaseException:
        for pid in marked(MARK, mark):        # a failed run leaves no `sleep 600` behind
            os.kill(pid, signal.SIGKILL)
        raise
    finally:
        proc.kill()
        proc.wait()
    assert_nothing_left(mark)


def test_a_dry_run_names_each_background_job_by_its_pid_and_kills_exactly_those():
    lines = dry_run_lines(_script_with_background_jobs())
    started = [l for l in lines if l.endswith(" &")]
    assert len(started) == 2
    for i, line in enumerate(lines):
        if line.endswith(" &"):
            assert re.match(r"^job\d+=\$!$", lines[i + 1]), lines[i + 1]
    kills = [l for l in lines if l.startswith("kill ")]
    assert kills == ["kill $job2 2>/dev/null && wait $job2 || true", "kill $job1 2>/dev/null && wait $job1 || true"]
    assert lines[-1] == "trap - EXIT" or "trap - EXIT" in lines


# ---------------------------------------------------------------- the tour and the cni sequence

def readme_block(after):
    """The first fenced block of README.md after the line AFTER."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    rest = text[text.index(after):]
    return re.search(r"```\w*\n(.*?)```", rest, re.S).group(1)


def tour_commands():
    """The cnikit commands of README's "A tour", as argv lists (show and cleanup left out)."""
    cmds = [shlex.split(l[len("$ sudo ./cnikit.py "):]) for l in readme_block("## A tour").splitlines()
            if l.startswith("$ sudo ./cnikit.py ")]
    return [c for c in cmds if c[0] not in ("show", "cleanup")]


def real_and_dry(cmds, tmp_path):
    """The kernel state after running CMDS for real, and after replaying their dry runs with dash."""
    real = state_of(in_sandbox("set -e\n" + "\n".join(shlex.join(CNIKIT + ["-q"] + c) + " >/dev/null" for c in cmds)
                               + f"\n{sys.executable} -c \"$SNAP\"", uuid.uuid4().hex))
    plan = ""
    for c in cmds:
        proc = cli("--dry-run", *c)
        assert proc.returncode == 0, proc.stderr
        plan += proc.stdout
    (tmp_path / "plan.sh").write_text(plan)
    assert "<<<" not in plan
    return real, replay(tmp_path / "plan.sh"), plan


def test_readme_tour_dry_run_replays_under_dash_to_the_real_runs_state(tmp_path):
    cmds = tour_commands()
    assert [c[:2] for c in cmds][:3] == [["netns", "add"], ["bridge", "add"], ["veth", "add"]]
    real, replayed, _ = real_and_dry(cmds, tmp_path)
    assert replayed == real
    assert "br0" in real["host"]["links"] and real["netns"] == ["ns1"]


def readme_cni_sequence():
    """README's runtime sequence as one dry-run script: the cnikit commands of its block."""
    block = readme_block("print the runtime's whole sequence as one script")
    cmds = [shlex.split(m) for m in re.findall(r"\./cnikit\.py --dry-run ([^;}\n]+)", block)]
    return [[w for w in c] for c in cmds]


def test_readme_cni_sequence_dry_run_on_a_fresh_host_replays_under_dash_to_the_real_runs_state(tmp_path):
    """No network config yet: `cni add` plans against what `cni install` writes by default,
    says so, and the whole sequence, printed as one script, does what the real run does."""
    cmds = readme_cni_sequence()
    assert [c[:2] for c in cmds] == [["cni", "install"], ["netns", "add"], ["cni", "add"], ["cni", "del"]]
    real, replayed, plan = real_and_dry(cmds, tmp_path)
    assert replayed == real
    assert "cni0" in real["host"]["links"] and real["netns"] == ["pod1"]
    assert "# no network config in /etc/cni/net.d yet: planned against the one `cnikit cni install` writes" in plan


def test_cni_add_dry_run_alone_prints_a_dash_script_that_adds_the_pod(tmp_path):
    """Half of the sequence for real (install, netns), the ADD from its dry run: the pod
    gets its address, the chain's prevResult and the cache come from the shell variable."""
    proc = cli("--dry-run", "cni", "add", "pod1")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^result_pod1_eth0=\$\($", proc.stdout, re.M) and "<<<" not in proc.stdout
    (tmp_path / "add.sh").write_text(proc.stdout)
    mark = uuid.uuid4().hex
    script = "\n".join([shlex.join(CNIKIT + ["-q", "cni", "install", "--chain", "portmap"]),
                        shlex.join(CNIKIT + ["-q", "netns", "add", "pod1"]),
                        f"{DASH} -e {tmp_path / 'add.sh'}",
                        "ip -n pod1 -j addr show dev eth0", "cat /var/lib/cni/results/cnikit-pod1-eth0"])
    out = in_sandbox(script, mark)
    assert_nothing_left(mark)
    assert out.returncode != 0 and "is not the config this script was planned against" in out.stderr
    # with the default config in place, as planned
    script = script.replace(" --chain portmap", "")
    out = in_sandbox("set -e\n" + script, mark)
    assert out.returncode == 0, out.stderr
    assert '"local":"10.244.0.2"' in out.stdout.replace(" ", "")
    cache = json.loads(out.stdout.splitlines()[-1])
    assert cache["kind"] == "cniCacheV1" and cache["result"]["ips"][0]["address"] == "10.244.0.2/24"


def test_a_planned_result_in_a_here_document_expands_and_nothing_else_does():
    """JSON's own $, ` and \\ stay as they are; only the kept result is expanded."""
    import cnikit
    nasty = {"msg": "$HOME `id` \\ \\$x \\n \"q\" ${y} $(z)", "n": [1, None, True]}
    body, expands = cnikit.heredoc_json(dict(nasty, prevResult=cnikit.PlannedResult("result_p_eth0")))
    assert expands and "$result_p_eth0" in body
    script = f"result_p_eth0='{{\"ips\": [{{\"address\": \"10.0.0.2/24\"}}]}}'\ncat <<EOF\n{body}\nEOF\n"
    out = subprocess.run([DASH, "-e"], input=script, capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == dict(nasty, prevResult={"ips": [{"address": "10.0.0.2/24"}]})
    plain, expands = cnikit.heredoc_json(nasty)
    assert not expands and json.loads(plain) == nasty
