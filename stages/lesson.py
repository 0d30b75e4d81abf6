"""What every lesson in stages/ shares, so each lesson script reads as the lesson itself.

A lesson is a `Lesson` (number, title, goal, a hand-drawn picture of what it builds,
and the steps you may --skip with what breaks without each) plus two functions:
`build(L)` gives a one-line why before each step and calls cnikit's verbs with `L.r`,
the runner that echoes every command; `verify(L)` runs the checks that prove the goal
with `L.check(...)`. `L.main(build, verify)` does the rest: the command line, the
sandbox (or the real host with --host), the PASS/FAIL verdict and exit code, the
picture of what really exists, and leaving nothing behind.

    LESSON = Lesson("01", "netns", goal="...", picture="...", skips={"lo-up": "..."})
    def build(L): ...
    def verify(L): ...
    if __name__ == "__main__":
        LESSON.main(build, verify)

What build learns and verify needs (a CNI result, what a fresh namespace held) goes in one
place: the lesson declares its class, `Lesson(..., state=Pods)`; each run makes a fresh one
and hands it to both, `build(L, pods)` and `verify(L, pods)`. A field the framework needs
and a lesson does not declare fails as its module is imported (ContractError).
"""
import argparse
import copy
import json
import os
import re
import select
import shlex
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import cnikit  # noqa: E402  (the library every lesson drives)
from cnikit import ip, bridge, in_netns  # noqa: E402,F401  (re-exported for the lessons)

CNIKIT = os.path.join(ROOT, "cnikit.py")
PING = ("ping", "-c", "1", "-W", "1")      # one echo, one second: a lost reply fails fast
ASK_TRIES = 3                                # --keep asks this often for a namespace name
HOST_SIDE = "host"                           # --keep's name for the sandbox's own (host) side
WAIT_READY = 5.0                             # seconds a background tool gets to start
STOP_GRACE = 2.0                             # seconds between SIGTERM and SIGKILL
PRESENT_CPS = 30.0                           # --present: characters typed a second (demo-magic's pace)
PRESENT_MAX = 3.0                            # ... but no command takes longer than this to type
EXIT_PASS, EXIT_FAIL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


# ---------------------------------------------------------------- the runner

class Expand(str):
    """An argv word a dry run's script must expand: shell text such as `$job1` (the PID of a
    job it started, which only the script knows when it runs) or `/proc/$job1/ns/net`. The
    script prints it in double quotes; it holds no `"`, `\\` or backquote."""


def _reader_left():
    """`--dry-run | head`: the reader of stdout left.  Say nothing more (no traceback, like any
    other tool): what is still written, the verdict included, goes nowhere."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


class LessonRunner(cnikit.Runner):
    """cnikit's Runner plus what a live lesson needs: --step pauses before each
    command (STEPPING True or "command") or each step ("step"); --present types each
    command out at PRESENT characters a second and waits for Enter before running it,
    as a presenter's demo does (a stdin that is not a terminal: no waiting); the
    background processes it starts are remembered so they are always stopped (a
    process left inside a namespace would keep it alive)."""

    def __init__(self, stepping=False, present=None, **kw):
        super().__init__(**kw)
        self.stepping = "command" if stepping is True else stepping
        self.present = present
        self._kind = None         # what echo is printing now: "tag", "folded" (a tag not shown again) or None
        self.procs = []
        self.spawned = 0          # background processes started (a dry run's script must stop them)
        self.jobs = []            # a dry run: shell variables holding the PIDs ($!) of jobs still running
        self._suffix = ""
        self._tag_said = False    # the ownership tag is explained once per lesson

    def _live(self):
        return not self.dry_run and not self.quiet

    def _presenting(self):
        """--present waits for Enter only where someone can press it."""
        return self.present is not None and self._live() and sys.stdin.isatty()

    def _wait(self, hint):
        """The command (or step) is on screen: Enter goes on, q (or Ctrl-C) quits."""
        if hint:
            print(f"\033[2m  {hint}\033[0m" if self.color else f"  {hint}", end="", file=sys.stderr, flush=True)
        answer = sys.stdin.readline()
        if hint:
            print("\r" + " " * (len(hint) + 2) + "\r", end="", file=sys.stderr, flush=True)
        if not answer:                # stdin closed: carry on without pausing
            self.stepping, self.present = None, None
        elif answer.strip().lower() == "q":
            raise KeyboardInterrupt

    def _pause(self):
        if self._presenting():
            self._wait("")            # the typed line is the prompt; the terminal echoes the Enter
        elif self.stepping == "command" and self._live():
            self._wait("[Enter] run, q quit")

    def pause_step(self):
        """--step step: before a step's commands, not before each one."""
        if self.stepping == "step" and self._live():
            self._wait("[Enter] this step, q quit")

    def echo(self, argv, suffix=""):
        tag = is_tag(argv)
        if tag and not self._tag_said:
            self._tag_said = True
            self.note(TAG_WHY)
            self._kind = "tag"
        elif tag:
            # Shown once: a live run sets the later labels without printing them again (-v and a
            # dry run's script, which must make every change, still print each).
            self._kind = "tag" if self.dry_run or self.verbose else "folded"
        try:
            super().echo(argv, suffix or self._suffix)
            if not tag:           # bookkeeping, not a step of the lesson: no pause
                self._pause()
        finally:
            self._kind = None

    def shell_line(self, argv):
        """As cnikit's, but a word the script expands (Expand: a job's PID) goes in double quotes."""
        return " ".join(f'"{a}"' if isinstance(a, Expand) else shlex.quote(str(a)) for a in argv)

    def result(self, obj):
        """A CNI result in a lesson: the fields that matter, a line each (-v: the JSON in full)."""
        if self.verbose:
            return super().result(obj)
        for line in result_gist(obj):
            self.note(line)

    def print_command(self, line):
        """--present types the command out; a folded ownership label is not printed."""
        if self._kind == "folded":
            return
        if self.present is None or not self._live():
            return super().print_command(line)
        out, (on, off) = self.out, (("\033[1;36m", "\033[0m") if self.color else ("", ""))
        delay = min(1 / self.present, PRESENT_MAX / max(len(line), 1)) if self.present > 0 else 0
        out.write(("\033[2m$\033[0m " if self.color else "$ ") + on)
        try:
            for ch in line:
                out.write(ch)
                out.flush()
                if delay:
                    time.sleep(delay)
        finally:
            out.write(off)
            # Where Enter is awaited, the terminal's echo of it ends the line.
            if self._kind is not None or not self._presenting():
                out.write("\n")
            out.flush()

    def probe(self, argv, timeout=30, expect_fail=False):
        """As cnikit's probe; EXPECT_FAIL (a command the lesson shows failing) is printed
        with `|| true`, so the line, and a dry run piped into `sh -e`, carry on past it."""
        self._suffix = " || true" if expect_fail else ""
        try:
            return super().probe(argv, timeout)
        finally:
            self._suffix = ""

    def show(self, argv):
        """As cnikit's show, but -q (a lesson's "verdict only") keeps it silent too: a quiet run."""
        return self.run(argv) if self.quiet else super().show(argv)

    def spawn(self, argv, stdin=False):
        """Start a background process, echoed with `&`; STDIN=True gives it a pipe
        the lesson writes to. Each gets its own process group, stopped as a whole.
        A dry run's script remembers each job's PID ($!) and, from the first one on,
        traps its own end (a failing step under `sh -e`, Ctrl-C) to stop exactly those."""
        if self.dry_run and not self.spawned:
            self.note("the script remembers what it starts in the background by its PID ($!) and stops it "
                      "when it ends, even when a step fails or it is interrupted")
            self._script("trap 'exit 129' HUP; trap 'exit 130' INT; trap 'exit 143' TERM")
        proc = super().spawn(argv, stdin=stdin)
        self.spawned += 1
        if proc is not None:
            self.procs.append(proc)
        elif self.dry_run:
            self.jobs.append(f"job{self.spawned}")
            self._script(f"{self.jobs[-1]}=$!")
            self._trap_jobs()
        return proc

    def _script(self, line):
        """A line of shell that only a dry run's script needs (no command of the lesson's)."""
        if not self.quiet:
            self.output(line)

    def _trap_jobs(self):
        """(Re)set the script's EXIT trap to stop the jobs still running, and no others."""
        pids = " ".join(f"${job}" for job in self.jobs)
        self._script(f"trap 'kill {pids} 2>/dev/null; wait' EXIT" if self.jobs else "trap - EXIT")

    def _stop_job(self, job):
        self.jobs.remove(job)
        self._script(f"kill ${job} 2>/dev/null && wait ${job} || true")

    def stop_jobs(self):
        """A dry run's end: its script stops the jobs still running (the live lesson's stop_all)."""
        if self.jobs:
            self.note("stop what this script started in the background (listeners, captures)")
            for job in list(self.jobs):
                self._stop_job(job)
            self._trap_jobs()

    def stop(self, proc, wait=0.0):
        """Stop PROC's whole process group, after letting it end by itself for up to
        WAIT seconds (tcpdump -c N); returns what it printed (stdout, stderr). A dry run
        has no process (spawn returned None): its script stops the newest job still running."""
        if proc is None:
            if self.dry_run and self.jobs:
                self._stop_job(self.jobs[-1])
                self._trap_jobs()
            return "", ""
        if wait:
            try:
                proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                pass
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=STOP_GRACE)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            out, err = proc.communicate()
        if proc in self.procs:
            self.procs.remove(proc)
        return out or "", err or ""

    def stop_all(self):
        for proc in list(self.procs):
            self.stop(proc)


def _signal_group(proc, sig):
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


TAG_WHY = (f"`alias {cnikit.TAG}`: cnikit labels each link it creates (its ifalias, kept by the kernel) "
           "so `cnikit cleanup` finds its own objects by that label, never by guessing from names; "
           "it changes nothing in how the link works. The labels after this one are set without "
           "being shown again (-v or --dry-run prints each)")


def is_tag(argv):
    """Is ARGV cnikit's `ip link set dev X alias cnikit` (an ownership label)?"""
    return len(argv) >= 4 and argv[-2:] == ["alias", cnikit.TAG] and "link" in argv and "set" in argv


def result_gist(result):
    """A CNI result in a few lines: its interfaces (where each lives), addresses, routes."""
    ifaces = result.get("interfaces") or []
    lines = [f"result (cniVersion {result.get('cniVersion', '?')}), the gist (-v: the JSON in full):"]
    for i, iface in enumerate(ifaces):
        where = f"in {iface['sandbox']}" if iface.get("sandbox") else "on the host"
        lines.append(" ".join(filter(None, (f"  interfaces[{i}]", iface.get("name"), iface.get("mac"), where))))
    for ip_ in result.get("ips") or []:
        on = ip_.get("interface")
        on = f" on {ifaces[on]['name']}" if isinstance(on, int) and 0 <= on < len(ifaces) else ""
        gw = f" gateway {ip_['gateway']}" if ip_.get("gateway") else ""
        lines.append(f"  ips: {ip_.get('address')}{gw}{on}")
    routes = [r.get("dst", "?") + (f" via {r['gw']}" if r.get("gw") else "") for r in result.get("routes") or []]
    if routes:
        lines.append("  routes: " + ", ".join(routes))
    dns = {k: v for k, v in (result.get("dns") or {}).items() if v}
    if dns:
        lines.append("  dns: " + ", ".join(f"{k} {v}" for k, v in dns.items()))
    return lines


def iptables_backend(r):
    """"nf_tables" or "legacy": where this host's iptables writes its rules (`iptables -V`
    says; a read-only look at the local tool, so a dry run asks it too)."""
    ok, out = r.live.query(["iptables", "-V"])
    return "legacy" if ok and "legacy" in out else "nf_tables"


def nft_view(L, table, chain, why):
    """One look beside `iptables -S`: what iptables-nft really put in the kernel, CHAIN of
    nf_tables' `ip TABLE` table, printed by nft; a check that it is the same chain. A CHAIN
    ending in "*" (a name the lesson cannot know before the plugin runs): the whole table,
    holding a chain with that prefix."""
    r = L.r
    L.step(why)
    if not have("nft"):
        L.say("    (nft, Debian package nftables, is not installed: no look at nf_tables)")
        return
    if iptables_backend(r) == "legacy":
        L.say("    this host's iptables is iptables-legacy: its rules live in the older x_tables, "
              "which nft does not show")
        return
    prefix = chain.rstrip("*")
    out = r.show(["nft", "list"] + (["table", "ip", table] if chain.endswith("*") else ["chain", "ip", table, chain]))
    L.check(f"nf_tables holds {chain} (table ip {table}): iptables-nft wrote it there",
            f"chain {prefix}" in out, out.strip().splitlines()[0] if out.strip() else "nothing")


class Pods(dict):
    """A CNI lesson's state: what ADD returned for each pod (None: it failed), by pod name."""

    def ip(self, pod):
        """The address ADD gave POD, or "" when there is none."""
        ips = (self.get(pod) or {}).get("ips") or [{}]
        return (ips[0].get("address") or "/").split("/")[0]

    def host_ends(self, pod, bridge=cnikit.CNI_DEFAULT_BRIDGE):
        """The host-side interfaces POD's result names, BRIDGE excepted."""
        return {i["name"] for i in (self.get(pod) or {}).get("interfaces", [])
                if isinstance(i.get("name"), str) and not i.get("sandbox") and i["name"] != bridge}


def plugin_host_ends(results, pods, net, data_dir=None, bridge=cnikit.CNI_DEFAULT_BRIDGE):
    """The host ends of PODS' veths that our plugin made on network NET: as its attachment
    records (<dataDir>/<net>/.cnikit/attachments, written before it creates anything) and its
    ADD RESULTS (Pods, or None: the records only) name them, BRIDGE excepted. A lesson's "nothing
    is left" looks for these after DEL, never for names like veth...: a Docker host's ports have them too."""
    records = os.path.join(data_dir or cnikit.CNI_DATA_DIR, net, ".cnikit", "attachments")
    ends = set()
    for name in os.listdir(records) if os.path.isdir(records) else []:
        try:
            with open(os.path.join(records, name)) as f:
                rec = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict) and rec.get("containerID") in pods and isinstance(rec.get("veth"), str):
            ends.add(rec["veth"])
    for pod in pods if results is not None else ():
        ends |= results.host_ends(pod, bridge)
    return sorted(ends)


def have(tool):
    """Is an optional tool (tcpdump, conntrack, iptables) installed? Lessons fall back
    to another proof, and say so, when it is not."""
    return bool(cnikit.which(tool))


def read_until(proc, pattern, stream="stdout", timeout=WAIT_READY):
    """Read PROC's STREAM until a line matches PATTERN; returns the lines read (the
    match last) or None on timeout or exit. Used to wait until tcpdump listens and to
    read a TCP echo back, without sleeping for a guessed time. Reads the raw pipe (a
    buffered readline could swallow lines that select would then never report);
    what arrives after the matching line in the same read is dropped."""
    fd, rx = getattr(proc, stream).fileno(), re.compile(pattern)
    data, deadline = b"", time.monotonic() + timeout
    while True:
        lines = data.decode(errors="replace").split("\n")
        for i, line in enumerate(lines[:-1]):
            if rx.search(line):
                return lines[:i + 1]
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 65536)
        if not chunk:
            return None
        data += chunk


# ---------------------------------------------------------------- the lesson

class ContractError(Exception):
    """A lesson or lab that does not declare what the framework needs: raised when its
    module is imported, one line naming the file and the field, never half way through a run."""


def defined_in():
    """The file (relative to the checkout) of the first caller outside the framework: the
    lesson or lab module being imported. A lesson run as a script (__main__) that breaks the
    contract exits with the one line instead of a traceback."""
    frame = sys._getframe(1)
    while frame.f_back and os.path.abspath(frame.f_globals.get("__file__") or "") in _FRAMEWORK:
        frame = frame.f_back
    name = frame.f_globals.get("__file__") or "?"
    return os.path.relpath(name, ROOT) if os.path.isabs(name) else name, frame.f_globals.get("__name__") == "__main__"


_FRAMEWORK = {os.path.abspath(__file__), os.path.join(os.path.dirname(os.path.abspath(__file__)), "pitfall.py")}


def contract_error(message):
    where, as_script = defined_in()
    line = f"{where}: {message}"
    if as_script:
        sys.exit(line)
    raise ContractError(line)


def is_text(value):
    return isinstance(value, str) and value.strip() != ""


# A step the framework itself takes, and may be --skip'ed, in each kind: a lab's fix (pitfall.steps).
FRAMEWORK_SKIPS = {"lab": {"fix"}, "lesson": set()}


class Lesson:
    def __init__(self, number, title, goal, picture, skips=None, tools=("ip", "ping"), indirect=None, state=None,
                 keep_hint=None):
        self.number, self.title, self.goal = number, title, goal
        self._check_contract(picture, skips, tools)
        if state is not None and not isinstance(state, type):
            contract_error(f"lesson {number}: state must be a class (what build hands to verify)")
        # The class of what build hands to verify (None: they share nothing); `running` is
        # this run's instance, for the framework's own hooks (_leave) only.
        self.state, self.running = state, None
        # What the lesson changes on a host through another program (lesson 07's plugin
        # makes cni0 and switches forwarding on): {"links": [...], "sysctls": [...], "paths": [...]}.
        # --host names them, refuses a link that already exists, and undoes them at the end
        # (a path only when it did not exist before).
        self.indirect = dict(indirect or {})
        self.picture = picture.strip("\n")
        self.skips = dict(skips or {})      # step name -> what breaks without it
        self.tools = tools
        self.r = None
        self.skipped = set()
        self.checks = []                    # (what, ok)
        self.unchecked = []                 # parts of the goal this run did not check (--host --keep)
        self.on_host = False
        self.host_changes = ""
        self.keep_hint = keep_hint or f"sudo {CNIKIT} cleanup"     # how to remove what --keep --host left
        self.steps = 0
        self.keep, self.explored = False, False     # --keep (True or a namespace); its shell was opened
        self.try_it = []                    # lines for the learner to type in --keep's shell (your_turn)

    def _check_contract(self, picture, skips, tools):
        """Each field a lesson must declare, checked as its module is imported."""
        if not (isinstance(self.number, str) and re.fullmatch(r"\d\d[a-z]?", self.number)):
            contract_error(f"the lesson's number {self.number!r} is not two digits (and a letter), e.g. \"03\"")
        what = f"lesson {self.number}"
        if not (is_text(self.title) and " " not in self.title):
            contract_error(f"{what} has no title (one word, e.g. \"bridge\")")
        if not is_text(self.goal):
            contract_error(f"{what} has no goal (what the verification proves, in a sentence)")
        if not is_text(picture):
            contract_error(f"{what} has no picture (a drawing of what it builds)")
        if not (isinstance(tools, (tuple, list)) and all(is_text(t) for t in tools)):
            contract_error(f"{what}: tools must be a list of the programs it runs")
        if not isinstance(skips or {}, dict):
            contract_error(f"{what}: skips must be a dict {{step name: what breaks without it}}")
        where, _ = defined_in()
        try:
            with open(os.path.join(ROOT, where)) as f:
                source = f.read()
        except OSError:
            source = None
        for name, breaks in (skips or {}).items():
            if not (is_text(name) and " " not in name):
                contract_error(f"{what}: skip {name!r} is not a step name (one word)")
            if not is_text(breaks):
                contract_error(f"{what}: skip {name!r} does not say what breaks without its step")
            # A step that --skip can leave out is `L.step(why, skip="NAME")` in the file itself.
            used = source is None or name in FRAMEWORK_SKIPS[self.kind] or re.search(
                rf"""skip\s*=\s*["']{re.escape(name)}["']""", source)
            if not used:
                contract_error(f"{what}: skip {name!r} names no step (no `L.step(..., skip={name!r})` in the file)")

    # -- printing: prose is shell comments, so a dry run stays a script
    def say(self, text=""):
        if self.r.quiet:
            return
        for line in (text.splitlines() or [""]):
            line = f"# {line}".rstrip()
            self.r.output(line, ansi="33")

    @property
    def kind(self):
        """What it calls itself: a pitfall lab is a lab (its PASS/FAIL line keeps "lesson": it is parsed)."""
        return "lab" if self.title.startswith("pitfall_") else "lesson"

    def opening(self):
        title = f"{self.kind} {self.number}: {self.title}"
        self.say(f"{title}\n{'=' * len(title)}\ngoal: {self.goal}\n\nwhat this {self.kind} builds:\n\n"
                 + self.picture + "\n")
        if self.skipped:
            self.say("leaving out (--skip): " + ", ".join(sorted(self.skipped)))

    def step(self, why, skip=None):
        """Announce the next step with its one-line why. With SKIP (a name declared in
        `skips`) the step can be left out: returns False when --skip names it."""
        if skip is not None and skip not in self.skips:
            raise ValueError(f"step {skip!r} is not declared in skips of lesson {self.number}")
        self.steps += 1
        self.say("")
        self.say(f"[{self.steps}] {why}")
        if skip in self.skipped:
            self.say(f"    skipped (--skip {skip}): {self.skips[skip]}")
            return False
        self.r.pause_step()
        return True

    # -- checks
    def check(self, what, ok, detail=""):
        """One fact the verification proves; the lesson passes when every check holds. A dry
        run prints the commands a check runs, never its verdict: OK is not judged there, so a
        check is written for the live run alone (no `r.dry_run or ...`)."""
        if self.r.dry_run:
            return True
        self.checks.append((what, bool(ok)))
        mark = "ok" if ok else "FAILED"
        self.say(f"check: {what}: {mark}" + (f" ({detail})" if detail and not ok else ""))
        return bool(ok)

    def passed(self):
        return bool(self.checks) and all(ok for _, ok in self.checks)

    def ping(self, addr, ns=None, count=1, expect_fail=False):
        """ping ADDR from inside NS (or from where the lesson runs); True if answered.
        EXPECT_FAIL: the lesson shows this ping failing (printed with `|| true`)."""
        argv = list(PING) if count == 1 else ["ping", "-c", str(count), "-i", "0.2", "-W", "1"]
        return self.r.probe(in_netns(argv + [addr], ns), expect_fail=expect_fail)[0]

    def wait_listening(self, port, ns=None):
        """Wait until a TCP listener is up on PORT (the server starts in the background)."""
        script = f'until ss -Htln "sport = :{port}" | grep -q .; do sleep 0.02; done'
        self.r.run(in_netns(["timeout", str(int(WAIT_READY)), "sh", "-c", script], ns))

    def your_turn(self, argv, what):
        """An interactive moment, as the original live demo had: with --step or --present on a
        terminal, ARGV gets the terminal until the learner ends it (WHAT says what to do);
        either way the line is offered again in --keep's shell."""
        self.try_it.append(f"{shlex.join(argv)}   # {what}")
        r = self.r
        if r.dry_run or r.quiet or not (r.stepping or r.present is not None) or not sys.stdin.isatty():
            return
        self.say(f"your turn: {what}; Ctrl-D ends it and the lesson goes on")
        r.hand_over(argv)

    def suggest(self, *lines):
        """Lines offered to the learner in --keep's shell ("try it: ..."), each with what it shows."""
        self.try_it.extend(lines)

    def sysctl(self, key, value, ns=None):
        """Set a sysctl, remembering the old value so the end of the lesson restores it
        (on a real host a lesson must not leave, say, forwarding switched on)."""
        ok, old = self.r.query(in_netns(["sysctl", "-n", key], ns))
        self.r.run(cnikit.sysctl_set(key, value, ns),
                   creates=cnikit.Change.sysctl(key, value, ns, old=old.strip() if ok else None))

    # -- life cycle
    def start(self, dry_run=False, quiet=False, stepping=False, skip=(), color=None, out=None, present=None,
              verbose=False):
        """A fresh runner and no checks yet; used by main and by tests that drive
        build() and verify() themselves in a sandbox they made. STEPPING: False, "command"
        or "step"; PRESENT: --present's characters a second (None: off)."""
        unknown = sorted(set(skip) - set(self.skips))
        if unknown:
            raise cnikit.UsageError(f"unknown step {unknown[0]!r} for --skip; lesson {self.number} has: "
                                    + (", ".join(self.skips) or "none"))
        self.r = LessonRunner(stepping=stepping, present=present, dry_run=dry_run, quiet=quiet, color=color,
                              out=out, verbose=verbose)
        self.skipped, self.checks, self.steps, self.try_it = set(skip), [], 0, []
        return self

    def new_state(self):
        """A fresh instance of the declared state (None when the lesson declares none)."""
        return self.state() if self.state is not None else None

    def call(self, part, state):
        """Run build or verify (PART): with the run's STATE when the lesson declares one."""
        return part(self) if self.state is None else part(self, state)

    def play(self, build, verify, state=None):
        """Build, then verify (both with the same state): the lesson itself, without the command
        line, the verdict or the leaving. Returns the state, for a test to look into."""
        state = self.new_state() if state is None else state
        self.running = state
        self.call(build, state)
        self.say("")
        self.say("verification: does the goal hold?")
        self.call(verify, state)
        return state

    def variant(self, **fields):
        """A copy of this lesson with some declared fields changed (06's halves: a goal and a
        picture that name this host's peer); the lesson itself stays as declared."""
        other = copy.copy(self)
        for name, value in fields.items():
            if name not in ("goal", "picture", "keep_hint") or not is_text(value):
                contract_error(f"lesson {self.number}: a variant changes goal, picture or keep_hint, not {name}")
            setattr(other, name, value.strip("\n") if name == "picture" else value)
        return other

    def plan(self, build, state=None):
        """What BUILD would change (cnikit.Change records), from a silent dry run: what
        --host will change."""
        saved = (self.r, self.checks, self.steps)
        self.r = LessonRunner(dry_run=True, quiet=True)
        self.r.plans_this_host = True       # e.g. a Docker host's bridge rule is part of the plan
        try:
            self.call(build, self.new_state() if state is None else copy.deepcopy(state))
            return self.r.changes()
        finally:
            self.r, self.checks, self.steps = saved

    def parser(self):
        epilog = "steps you can --skip, and what breaks without each:\n" + "\n".join(
            f"  {name:<10} {breaks}" for name, breaks in self.skips.items())
        p = argparse.ArgumentParser(
            prog=os.path.basename(sys.argv[0]) or f"{self.number}_{self.title}.py",
            description=f"{self.kind.capitalize()} {self.number} ({self.title}): {self.goal}", epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--host", action="store_true",
                       help="run on the real host, after saying what it will change (default: a sandbox)")
        p.add_argument("--keep", nargs="?", const=True, default=False, metavar="NS",
                       help="leave the topology up; in the sandbox, open a shell to explore it "
                            "(`ip netns exec NS bash`: NS given here, else you are asked which)")
        p.add_argument("--step", nargs="?", const="command", choices=("command", "step"), default=None,
                       help="pause before each command (Enter runs it), or with `--step step` before each step")
        p.add_argument("--present", action="store_true",
                       help="presenter mode: type each command out, run it on Enter (Ctrl-C leaves cleanly)")
        p.add_argument("--present-speed", type=_speed, default=PRESENT_CPS, metavar="CPS",
                       help=f"--present's typing speed in characters a second (default {PRESENT_CPS:g}; "
                            "0: at once)")
        p.add_argument("--dry-run", action="store_true", help="print the whole lesson as a shell script")
        p.add_argument("-q", "--quiet", action="store_true", help="print only the verdict")
        p.add_argument("-v", "--verbose", action="store_true",
                       help="also every ownership label, CNI results as full JSON and cnikit's look-ups")
        p.add_argument("--skip", action="append", default=[], metavar="STEP",
                       help="leave out STEP to see what breaks (listed below); repeatable")
        p.add_argument("--color", choices=("auto", "always", "never"), default="auto")
        p.error = lambda message: _usage_exit(p.prog, message)
        return p

    def main(self, build, verify, argv=None, parser=None, state=None):
        """Run the lesson as a command; exits 0 on PASS, 1 on FAIL, 2 on bad usage. STATE: the
        run's state, made from options the lesson's own parser added (default: a fresh one)."""
        parser = parser or self.parser()
        args = parser.parse_args(argv)
        try:
            code = self.run(build, verify, args, state=state)
            sys.stdout.flush()
        except BrokenPipeError:
            _reader_left()
            code = EXIT_FAIL
        sys.exit(code)

    def run(self, build, verify, args, finish=True, adopt=False, state=None):
        """Build, verify, print the verdict, then leave nothing behind (or --keep)."""
        color = {"always": True, "never": False}.get(getattr(args, "color", "auto"))
        try:
            present = getattr(args, "present_speed", PRESENT_CPS) if getattr(args, "present", False) else None
            self.start(dry_run=args.dry_run, quiet=args.quiet, stepping=not args.dry_run and args.step,
                       skip=args.skip, color=color, present=present, verbose=getattr(args, "verbose", False))
            self.on_host = args.host
            self.keep, self.explored = args.keep, False
            state = self.new_state() if state is None else state
            self.running = None
            if not args.dry_run:
                self._prepare(build, args.host, adopt, state)
            self.opening()
            if self.on_host and not args.dry_run:
                self.say("--host: this lesson changes this machine (all removed at the end unless --keep):")
                self.say(self.host_changes + "\n")
            self.play(build, verify, state)
            return self._verdict(args, finish)
        except cnikit.UsageError as e:
            print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
            self._leave(args, keep=False)
            return EXIT_USAGE
        except cnikit.CnikitError as e:
            self._fail_line(f"error: {e}")
            self._leave(args, keep=False)
            return EXIT_FAIL
        except KeyboardInterrupt:
            self._fail_line("interrupted")
            self._leave(args, keep=False)
            return EXIT_INTERRUPTED
        except BrokenPipeError:
            _reader_left()
            self._leave(args, keep=False)
            return EXIT_FAIL
        except OSError as e:
            # A disk or system error: one line, and the host left as it was.
            self._fail_line(f"error: {e.strerror or e}" + (f" ({e.filename})" if e.filename else ""))
            self._leave(args, keep=False)
            return EXIT_FAIL
        except BaseException:
            # Whatever else goes wrong in build or verify (a bug, SystemExit), --host leaves.
            self._leave(args, keep=False)
            raise

    def _prepare(self, build, on_host, adopt=False, state=None):
        if os.geteuid() != 0:
            raise cnikit.UsageError("a lesson builds real namespaces and needs root: run it with sudo "
                                    "(or --dry-run to print it as a script)")
        cnikit.require_tools(*self.tools)
        if not on_host:
            cnikit.enter_sandbox()
            return
        planned = self.plan(build, state)
        links, sysctls = self.indirect.get("links", ()), self.indirect.get("sysctls", ())
        by_plugin = [cnikit.Change.link(name) for name in links]
        if not adopt:         # ADOPT: a re-run of the same lesson half may find its own objects
            self._refuse_existing(planned + by_plugin)
        self.host_changes = _summarize(planned, [f"{name} (by the plugin)" for name in links], sysctls)
        # Recorded first, so undone last: after everything the lesson made itself.
        for key in sysctls:
            ok, old = self.r.query(["sysctl", "-n", key])
            if ok:
                self.r.record(cnikit.Change("sysctl", key, undo=cnikit.sysctl_set(key, old.strip())))
        self.r.record(*by_plugin)
        for path in self.indirect.get("paths", ()):   # removed at the end only if the lesson made it
            if not os.path.lexists(path):
                self.r.record(cnikit.Change.file(path, undo=["rm", "-rf", path]))

    def _refuse_existing(self, planned):
        """On a real host, names the lesson would create must be free: it must never
        adopt (and then delete) a namespace, link or file that is not its own."""
        for change in planned:
            if change.kind == "netns" and cnikit.netns_exists(change.name):
                raise cnikit.UsageError(f"namespace {change.name} already exists on this host; "
                                        "delete it or run the lesson in the sandbox (without --host)")
            if change.kind == "link" and change.ns is None and cnikit.get_link(self.r, change.name):
                raise cnikit.UsageError(f"interface {change.name} already exists on this host; "
                                        "delete it or run the lesson in the sandbox (without --host)")
            if change.kind == "chain" and change.ns is None:
                table, chain = change.name.split()[1:3]
                if self.r.query(cnikit.iptables("-t", table, "-S", chain))[0]:
                    raise cnikit.UsageError(f"iptables chain {chain} ({table}) already exists on this host; "
                                            "run the lesson in the sandbox (without --host)")
            if change.kind == "file" and os.path.exists(change.name):
                raise cnikit.UsageError(f"{change.name} already exists on this host; the lesson would replace "
                                        "it: remove it or run the lesson in the sandbox (without --host)")

    def _verdict(self, args, finish):
        r = self.r
        if r.dry_run:
            # The live lesson stops its listeners and captures; so must the script, or
            # they outlive it (and keep its namespaces alive).
            r.stop_jobs()
            r.note("dry run: the checks above were printed, not run; the lesson's picture of what "
                   "exists comes from: " + shlex.join([CNIKIT, "show"]))
            return EXIT_PASS
        ok = self.passed()
        if not r.quiet:
            self.show_state()
        failed = [what for what, good in self.checks if not good]
        line = (f"PASS lesson {self.number} {self.title}: {self.goal}"
                + "".join(f"; not checked: {what}" for what in self.unchecked) if ok else
                f"FAIL lesson {self.number} {self.title}: " + ("; ".join(failed) or "nothing was checked"))
        r.output(line, ansi=f"1;{32 if ok else 31}")
        if finish:
            self._leave(args, keep=args.keep)
        return EXIT_PASS if ok else EXIT_FAIL

    def show_state(self):
        """The picture of what really exists now, before the verdict."""
        self.say("")
        self.say("what really exists now (cnikit show):")
        cnikit.show(self.r)

    def _fail_line(self, why):
        line = f"FAIL lesson {self.number} {self.title}: {why}"
        print(line, file=sys.stderr if self.r is None else self.r.out, flush=True)

    def explore(self, after):
        """--keep in the sandbox: a shell to explore what exists now, in the namespace the
        learner picks (`ip netns exec NS bash`). Lessons that undo their own work at the end
        (07's DEL) call it before that; AFTER says what happens once the shell exits."""
        if not self.keep or self.on_host or self.r.dry_run or self.explored:
            return
        self.explored = True
        self.r.stepping, self.r.present = None, None
        ns = choose_netns(self.keep, cnikit.netns_names(self.r))
        where = f"`ip netns exec {ns} bash`, inside {ns}" if ns else "on the sandbox's host side"
        self.say(f"--keep: a shell {where}; the topology is yours to explore ({after})")
        for line in self.try_it:
            self.say(f"  try it: {line}")
        cnikit.sandbox_shell(ns)

    def keeps_on_host(self):
        """--keep with --host: a lesson that would undo its own work at the end (07's DEL)
        leaves it be, and says so; True when it should stop there."""
        if self.keep and self.on_host and not self.r.dry_run:
            self.say("--keep: the pods stay as ADD left them; the DEL and the checks after it are not run")
            self.unchecked.append("DEL (--host --keep kept the pods)")
            return True
        return False

    def _leave(self, args, keep):
        """Leave nothing behind: the sandbox vanishes on exit; on the host, undo what
        the lesson created, newest first. --keep leaves it up (a shell in the sandbox)."""
        r = self.r
        if r is None or r.dry_run:
            return
        r.stepping, r.present = None, None
        if keep and not args.host and not self.explored:
            self.explore("`exit` ends it and everything goes")
        r.stop_all()
        if keep and args.host:
            self.say("--keep: the topology stays on this host; remove it with: " + self.keep_hint)
            return
        if args.host:
            r.rollback(why="removing what the lesson created on this host:")


def _read_line():
    """One line from stdin, read byte by byte: what follows stays in the pipe for the shell."""
    data = b""
    while not data.endswith(b"\n"):
        byte = os.read(0, 1)
        if not byte:
            break
        data += byte
    return data.decode(errors="replace")


def choose_netns(wanted, names, ask=ASK_TRIES):
    """The namespace --keep opens a shell in: WANTED when it is one of NAMES, else the
    answer to a question on stdin (Enter, or no answer: the sandbox's host side, None)."""
    if isinstance(wanted, str):
        if wanted in names or wanted == HOST_SIDE:
            return None if wanted == HOST_SIDE else wanted
        print(f"--keep: there is no namespace {wanted!r} (there are: {' '.join(names)})", file=sys.stderr)
    for _ in range(ask):
        print(f"--keep: open a shell in which namespace? {' '.join(names)} "
              f"[Enter: {HOST_SIDE}, the sandbox's host side] ", end="", file=sys.stderr, flush=True)
        answer = _read_line()
        if not answer.strip():
            return None
        if answer.strip() in names:
            return answer.strip()
        print(f"  no namespace {answer.strip()!r}", file=sys.stderr)
    return None


# How a lesson's summary names each kind of cnikit.Change it lists.
SUMMARY_GROUPS = {"netns": "namespaces", "link": "links", "route": "routes", "chain": "iptables chains",
                  "rule": "iptables rules", "sysctl": "sysctls", "file": "files", "cluster": "kind clusters"}


def _summarize(planned, plugin_links=(), plugin_sysctls=()):
    """What the planned changes (and those another program makes: PLUGIN_LINKS and
    PLUGIN_SYSCTLS) do to the host, in a few lines a reader can judge (what happens
    inside the lesson's own namespaces goes away with them)."""
    groups = {name: [] for name in SUMMARY_GROUPS.values()}
    for change in planned:
        if change.ns is None and change.kind in SUMMARY_GROUPS:
            restored = " (restored at the end)" if change.kind == "sysctl" else ""
            groups[SUMMARY_GROUPS[change.kind]].append(change.name + restored)
    groups["links"] += plugin_links
    groups["sysctls"] += [f"{key} (restored at the end)" for key in plugin_sysctls]
    lines = []
    for name, items in groups.items():
        items = list(dict.fromkeys(items))          # a plan may repeat a change; say it once
        if len(items) > 1 and max(map(len, items)) > 30:
            lines += [f"  {name}:"] + [f"    {item}" for item in items]
        elif items:
            lines.append(f"  {name}: " + ", ".join(items))
    return "\n".join(lines) or "  nothing"


def _speed(text):
    """--present-speed: characters a second, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"invalid speed {text!r}: a number of characters a second, 0 or more")
    return value


def _usage_exit(prog, message):
    print(f"{prog}: error: {message} (see: {prog} --help)", file=sys.stderr)
    sys.exit(EXIT_USAGE)
