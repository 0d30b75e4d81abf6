"""cnikit._spawn_and_wait, how the Executor starts every process it waits for (os.posix_spawnp
and pipes, so a CLI start does not import subprocess): real processes throughout."""
import os
import signal

import pytest

import cnikit

pytestmark = pytest.mark.noroot

spawn = cnikit._spawn_and_wait


def test_output_larger_than_a_pipe_on_both_streams_while_a_large_input_is_written():
    # tee writes what it reads to stdout and to stderr as it reads it: neither side may wait on the other.
    text = "".join(f"line {i} é\n" for i in range(200_000))        # ~2.6 MB, 40 times a pipe's 64 KiB
    done = spawn(["tee", "/dev/stderr"], input=text)
    assert (done.returncode, done.stdout == text, done.stderr == text) == (0, True, True)
    assert done.args == ["tee", "/dev/stderr"] and not done.not_utf8


def test_stdin_is_dev_null_without_input():
    done = spawn(["sh", "-c", "readlink /proc/self/fd/0; cat"])
    assert (done.returncode, done.stdout) == (0, "/dev/null\n")


def test_env_is_the_whole_environment_and_none_is_cnikits(monkeypatch):
    monkeypatch.setenv("CNIKIT_SPAWN_TEST", "from cnikit")
    assert spawn(["env"], env={"PATH": os.environ["PATH"], "ONLY": "this"}).stdout == \
        f"PATH={os.environ['PATH']}\nONLY=this\n"
    assert "CNIKIT_SPAWN_TEST=from cnikit\n" in spawn(["env"]).stdout


def test_exit_codes_and_a_signal():
    assert spawn(["sh", "-c", "exit 7"]).returncode == 7
    assert spawn(["sh", "-c", "kill -TERM $$"]).returncode == -signal.SIGTERM
    # SIGPIPE is back to its default in the child (Python ignores it): `yes | head` ends.
    assert spawn(["sh", "-c", "yes | head -n 2"]).stdout == "y\ny\n"


def test_bytes_that_are_not_utf8_are_replaced_and_said():
    done = spawn(["printf", "a\\377b"])
    assert done.stdout == "a\ufffdb" and done.not_utf8


def test_a_missing_binary_and_one_that_is_not_executable_raise_their_oserror(tmp_path):
    with pytest.raises(FileNotFoundError):
        spawn([str(tmp_path / "absent")])
    script = tmp_path / "tool"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o644)
    with pytest.raises(PermissionError):
        spawn([str(script)])


def test_a_timeout_kills_and_reaps_the_child(tmp_path):
    pidfile = tmp_path / "pid"
    with pytest.raises(TimeoutError):
        spawn(["sh", "-c", f"echo $$ > {pidfile}; exec sleep 60"], timeout=2)
    with pytest.raises(ProcessLookupError):         # gone, not even a zombie
        os.kill(int(pidfile.read_text()), 0)


def test_the_child_gets_no_descriptor_but_its_three(tmp_path):
    # An inheritable descriptor of cnikit's (one it inherited itself) and the pipes stay out:
    # ls opens /proc/self/fd as its 3 only when 3 is free.
    leak = os.open(str(tmp_path), os.O_RDONLY)
    os.set_inheritable(leak, True)
    try:
        assert spawn(["ls", "/proc/self/fd"]).stdout.split() == ["0", "1", "2", "3"]
        assert spawn(["ls", "/proc/self/fd"], input="x").stdout.split() == ["0", "1", "2", "3"]
    finally:
        os.close(leak)


def test_ctrl_c_while_waiting_kills_and_reaps_the_child_then_raises(tmp_path):
    # The child itself sends the SIGINT once it runs, so the interrupt always lands while cnikit waits.
    pidfile = tmp_path / "pid"
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            spawn(["sh", "-c", f"echo $$ > {pidfile}; kill -INT {os.getpid()}; exec sleep 60"])
    finally:
        signal.signal(signal.SIGINT, previous)
    with pytest.raises(ProcessLookupError):
        os.kill(int(pidfile.read_text()), 0)


def test_no_descriptor_is_left_open_in_cnikit():
    before = sorted(os.listdir("/proc/self/fd"))
    spawn(["cat"], input="x" * 100_000)
    spawn(["sh", "-c", "exit 3"])
    with pytest.raises(FileNotFoundError):
        spawn(["/nonexistent/tool"])
    assert sorted(os.listdir("/proc/self/fd")) == before
