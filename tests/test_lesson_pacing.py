"""Presenter mode and pacing (--present, --step step, the ownership label shown once), on a
real pseudo-terminal where a terminal is the point: the lesson types each command out,
nothing runs before Enter, and Ctrl-C leaves the host as it was.

The lesson runs with --host inside the test's sandbox, so the test sees what it changes.
"""
import fcntl
import re
import os
import select
import signal
import subprocess
import sys
import termios
import time

import pytest
import sh

from host_state import host_state
from kernel import cli, links, run_stage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIRST = "ip link add host0 address "        # lesson 01's first command in its sandbox (a MAC of its own)
FIRST_ON_HOST = "ip netns add ns1"           # ... and with --host (no stand-in host side)
DEADLINE = 20.0


class Terminal:
    """A lesson attached to a pseudo-terminal, as a presenter runs it."""

    def __init__(self, script, *args):
        self.master, slave = os.openpty()

        def controlling_tty():
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "stages", script), *args],
                                     stdin=slave, stdout=slave, stderr=slave, preexec_fn=controlling_tty,
                                     close_fds=True)
        os.close(slave)
        self.text, self.reads = "", []

    def read_until(self, wanted, deadline=DEADLINE):
        """Read until WANTED has appeared; each read is kept (to see what arrived when)."""
        end = time.monotonic() + deadline
        while wanted not in self.text:
            left = end - time.monotonic()
            assert left > 0, f"{wanted!r} did not appear; the terminal shows:\n{self.text[-2000:]}"
            if select.select([self.master], [], [], left)[0]:
                try:
                    chunk = os.read(self.master, 4096).decode(errors="replace")
                except OSError:        # the lesson ended: the terminal hung up
                    chunk = ""
                assert chunk, f"the lesson ended before {wanted!r}:\n{self.text[-2000:]}"
                self.text += chunk
                self.reads.append(chunk)

    def type(self, keys):
        os.write(self.master, keys.encode())

    def stop(self):
        """A test that failed half way stops the lesson as a learner would, with Ctrl-C, so it
        stops its listeners and leaves; a lesson that does not answer is killed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=DEADLINE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def finish(self):
        """The exit code, after reading all the lesson wrote: while it runs (a pty's writer blocks
        once it is full) and what is still buffered once it has exited, up to the hang-up."""
        end = time.monotonic() + DEADLINE
        while time.monotonic() < end:
            if not select.select([self.master], [], [], 0.1)[0]:
                if self.proc.poll() is not None:
                    break               # exited, and nothing more to read
                continue
            try:
                chunk = os.read(self.master, 4096)
            except OSError:             # EIO: the lesson's side is closed, all of it read
                break
            if not chunk:
                break
            self.text += chunk.decode(errors="replace")
        code = self.proc.wait(timeout=DEADLINE)
        os.close(self.master)
        return code


def _ns1():
    return "ns1" in sh.ip("netns", "list").split()


def test_present_types_each_command_runs_it_on_enter_and_ctrl_c_rolls_back():
    before = host_state()
    term = Terminal("01_netns.py", "--host", "--present", "--present-speed", "40")
    try:
        term.read_until("# [1] ")
        start = len(term.reads)
        term.read_until(FIRST_ON_HOST)
        # Typed out: the command's characters came over many reads, never as one line.
        assert len(term.reads) - start >= len(FIRST_ON_HOST) // 3, term.reads[start:]
        time.sleep(0.5)                       # a command run at once would have made ns1 by now
        assert not _ns1(), "the command ran before Enter"
        term.type("\r")
        end = time.monotonic() + DEADLINE
        while not _ns1():
            assert time.monotonic() < end, "Enter did not run the command"
            time.sleep(0.05)
        term.read_until("ip -n ns1 -j link show")                 # typed, waiting for Enter
        term.type("\x03")                                          # Ctrl-C
        code = term.finish()
    finally:
        term.stop()
    assert code == 130, term.text[-2000:]
    assert "FAIL lesson 01 netns: interrupted" in term.text
    assert not _ns1() and host_state() == before


def test_present_without_a_terminal_does_not_wait_and_passes():
    proc = run_stage("01_netns.py", "--present", "--present-speed", "0", input="", timeout=90)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    assert re.search(rf"^\$ {FIRST}\S+ type bridge$", proc.stdout, re.M)


@pytest.mark.noroot
def test_present_speed_must_be_a_number_of_characters_a_second():
    proc = run_stage("01_netns.py", "--present", "--present-speed", "fast", input="", timeout=30)
    assert proc.returncode == 2 and "invalid speed 'fast'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_step_step_pauses_once_per_step_not_per_command():
    steps = run_stage("01_netns.py", "--step", "step", input="\n" * 100, timeout=90)
    assert steps.returncode == 0, steps.stdout[-2000:] + steps.stderr
    per_step = steps.stderr.count("[Enter] this step, q quit")
    announced = len([l for l in steps.stdout.splitlines() if l.startswith("# [")])
    commands = run_stage("01_netns.py", "--step", input="\n" * 200, timeout=90)
    per_command = commands.stderr.count("[Enter] run, q quit")
    assert per_step == announced and 0 < per_step < per_command
    quit_ = run_stage("01_netns.py", "--step", "step", input="q\n", timeout=30)
    assert quit_.returncode == 130 and FIRST not in quit_.stdout       # stopped before step 1's commands


def test_the_ownership_label_is_shown_once_live_and_every_time_in_the_dry_run():
    live = run_stage("03_bridge.py", "--host", "--keep", timeout=90)
    script = run_stage("03_bridge.py", "--dry-run", timeout=30).stdout
    assert live.returncode == 0, live.stdout[-2000:] + live.stderr
    labels = [l.split()[-3] for l in script.splitlines() if l.endswith(" alias cnikit") and " -n " not in l]
    assert len(labels) >= 3
    assert sum(1 for l in live.stdout.splitlines() if l.endswith(" alias cnikit")) == 1
    note = "set without being shown again"
    assert live.stdout.count(note) == 1 and note in script
    # Shown once, set every time: each link the lesson made on this (--host) side carries the tag.
    here = links()
    assert all(here[name].get("ifalias") == "cnikit" for name in labels), {n: here.get(n) for n in labels}
    cli("-q", "cleanup", check=True)
    assert sh.ip("netns", "list").strip() == ""


def test_lesson_04_keep_leaves_the_listener_up_and_offers_the_line_to_type():
    """The original demo's live moment: from --keep's shell in ns2, the learner types into a
    connection to ns1's listener and the line comes back."""
    proc = run_stage("04_tcp.py", "--keep", "ns2", input="echo typed-by-hand | socat -t1 - TCP:10.0.4.2:7000\nexit\n",
                     env=dict(os.environ, SHELL="/bin/bash"), timeout=90)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    assert "#   try it: ip netns exec ns2 socat - TCP:10.0.4.2:7000   # you are the client" in proc.stdout
    assert "\ntyped-by-hand\n" in proc.stdout


def test_lesson_04_step_on_a_terminal_hands_the_connection_to_the_learner():
    # --host: the lesson's namespaces are this test's, so it sees when the learner's client is connected
    term = Terminal("04_tcp.py", "--host", "--step", "step", "--color", "never")
    try:
        term.read_until("this step")
        term.type("\r")                               # step 1
        term.read_until("[2]")
        term.type("\r")                               # step 2: the listener
        term.read_until("your turn:")
        term.read_until("socat - TCP:10.0.4.2:7000")
        end = time.monotonic() + DEADLINE               # the client the terminal went to has connected
        while "10.0.4.2:7000" not in str(sh.ip("netns", "exec", "ns2", "ss", "-Htn", "state", "established")):
            assert time.monotonic() < end, "the learner's client never connected"
            time.sleep(0.05)
        term.type("typed-on-a-terminal\r")
        term.read_until("typed-on-a-terminal\r\ntyped-on-a-terminal")   # the terminal's echo, then ns1's
        term.type("\x04")                             # Ctrl-D: the lesson goes on
        code = term.finish()
    finally:
        term.stop()
    assert code == 0 and "PASS lesson 04" in term.text, term.text[-2000:]


def test_verbose_shows_every_label_and_the_look_ups():
    verbose = run_stage("03_bridge.py", "-v", timeout=90).stdout
    assert sum(1 for l in verbose.splitlines() if l.endswith(" alias cnikit")) >= 4
    assert "# look-up: " in verbose


RESULT = {"cniVersion": "1.0.0",
          "interfaces": [{"name": "cni0", "mac": "aa:00:00:00:00:01"}, {"name": "veth1", "mac": "aa:00:00:00:00:02"},
                         {"name": "eth0", "mac": "aa:00:00:00:00:03", "sandbox": "/run/netns/pod1"}],
          "ips": [{"address": "10.244.1.2/24", "gateway": "10.244.1.1", "interface": 2},
                  {"address": "fd00::2/64", "gateway": "fd00::1", "interface": 2}],
          "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.1.1"}, {"dst": "::/0"}], "dns": {"nameservers": []}}


def test_a_lesson_shows_a_cni_result_as_its_gist_and_in_full_with_v():
    import io
    import json
    sys.path.insert(0, os.path.join(ROOT, "stages"))
    import lesson as lesson_lib
    gist, full = io.StringIO(), io.StringIO()
    lesson_lib.LessonRunner(out=gist, color=False).result(RESULT)
    lesson_lib.LessonRunner(out=full, color=False, verbose=True).result(RESULT)
    assert gist.getvalue().splitlines() == [
        "# result (cniVersion 1.0.0), the gist (-v: the JSON in full):",
        "#   interfaces[0] cni0 aa:00:00:00:00:01 on the host",
        "#   interfaces[1] veth1 aa:00:00:00:00:02 on the host",
        "#   interfaces[2] eth0 aa:00:00:00:00:03 in /run/netns/pod1",
        "#   ips: 10.244.1.2/24 gateway 10.244.1.1 on eth0",
        "#   ips: fd00::2/64 gateway fd00::1 on eth0",
        "#   routes: 0.0.0.0/0 via 10.244.1.1, ::/0"]
    assert json.loads(full.getvalue()) == RESULT


def test_lessons_05_07_07d_show_what_iptables_nft_wrote_in_nf_tables():
    """Beside iptables -S, one look at the nf_tables chain iptables-nft made (Debian 12's iptables)."""
    if "nf_tables" not in subprocess.run(["iptables", "-V"], capture_output=True, text=True).stdout:
        pytest.skip("this host's iptables is iptables-legacy: nothing in nf_tables to show")
    for script, wanted in (("05_egress.py", "nft list chain ip nat CNIKIT-NAT-"), ("07_cni.py", "nft list table ip nat"),
                           ("07d_services.py", "nft list chain ip nat KUBE-SVC-WEB")):
        out = run_stage(script, timeout=120).stdout
        assert wanted in out and re.search(r"^# check: nf_tables holds \S+ \(table ip nat\): .*: ok$", out, re.M), \
            out[-2000:]
        assert re.search(r"^\tchain \S+ \{$", out, re.M) and " counter packets " in out     # nft's own words
