"""The runner's failure paths: a missing tool, a failing command, a timeout, rollback. Real
processes throughout; a fake program on PATH (tests/fake_tools.py) only where the path can't
be produced for real (an `ip` that refuses an address without root)."""
import io
import os

import pytest

import cnikit
from fake_tools import ANY, FakeTools
from kernel import cli, links, snapshot


@pytest.mark.noroot
def test_failing_command_rolls_back_what_was_created_in_order(tmp_path, monkeypatch):
    fake = FakeTools(tmp_path, monkeypatch)
    for dev in ("v0", "v1"):
        fake.register(["ip", "-j", "-d", "link", "show", "dev", dev], returncode=1,
                      stderr='Device "x" does not exist.\n')
    fake.register(["ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1"])
    fake.register(["ip", "link", "set", "dev", "v0", "alias", "cnikit"])
    fake.register(["ip", "-j", "addr", "show", "dev", "v0"], stdout="[]")
    fake.register(["ip", "addr", "add", "10.0.0.1/24", "dev", "v0"], returncode=2,
                  stderr="RTNETLINK answers: Permission denied\n")
    fake.register(["ip", "link", "del", "v0"])
    out = io.StringIO()
    r = cnikit.Runner(out=out)
    with pytest.raises(cnikit.CommandFailed) as e:
        cnikit.veth_add(r, "v0", "v1", addr="10.0.0.1/24")
    assert "ip addr add 10.0.0.1/24 dev v0" in str(e.value) and "Permission denied" in str(e.value)
    ran = [c for c in fake.calls() if "-j" not in c]
    assert ran == [["ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1"],
                   ["ip", "link", "set", "dev", "v0", "alias", "cnikit"],
                   ["ip", "addr", "add", "10.0.0.1/24", "dev", "v0"],
                   ["ip", "link", "del", "v0"]]
    assert "# rolling back" in out.getvalue()


@pytest.mark.noroot
def test_missing_binary_names_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))          # a PATH without iptables,
    monkeypatch.setattr(cnikit, "SBIN_DIRS", ())        # and no sbin to fall back on
    with pytest.raises(cnikit.CnikitError, match="Debian package iptables"):
        cnikit.Runner(out=io.StringIO()).run(["iptables", "-t", "nat", "-S"])


@pytest.mark.noroot
def test_a_file_that_is_not_executable_is_one_line(tmp_path):
    script = tmp_path / "tool"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o644)
    with pytest.raises(cnikit.CnikitError) as e:
        cnikit.Runner(out=io.StringIO()).run([str(script)])
    assert str(e.value) == f"cannot run {script}: {os.strerror(13)}"


@pytest.mark.noroot
def test_probe_reports_failure_without_raising(tmp_path, monkeypatch):
    fake = FakeTools(tmp_path, monkeypatch)
    fake.register(["ping", ANY], returncode=1, stdout="1 packets transmitted, 0 received\n")
    ok, out = cnikit.Runner(out=io.StringIO()).probe(["ping", "-c1", "192.0.2.1"])
    assert not ok and "0 received" in out
    assert fake.calls() == [["ping", "-c1", "192.0.2.1"]]


@pytest.mark.noroot
def test_a_command_past_its_timeout_is_killed_and_reported(tmp_path):
    pidfile = tmp_path / "pid"
    argv = ["sh", "-c", f"echo $$ > {pidfile}; exec sleep 60"]
    ok, out = cnikit.Runner(out=io.StringIO()).probe(argv, timeout=2)
    assert not ok and out == f"{cnikit.shell_join(argv)} did not finish within 2s"
    with pytest.raises(ProcessLookupError):         # killed and reaped: not even a zombie
        os.kill(int(pidfile.read_text()), 0)


def test_missing_tool_is_named_before_anything_changes(tmp_path, monkeypatch, capsys):
    # A PATH with ip but without iptables/sysctl (and no sbin to fall back on): nat add must
    # refuse up front.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    os.symlink("/usr/sbin/ip", bindir / "ip")
    before = snapshot()
    monkeypatch.setenv("PATH", str(bindir))
    monkeypatch.setattr(cnikit, "SBIN_DIRS", ())
    assert cnikit.main(["nat", "add", "10.9.0.0/24", "--out", "lo"]) == 2
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert "iptables not found" in err and "apt-get install iptables" in err
    assert err.count("\n") == 1
    assert snapshot() == before


def test_real_failure_mid_veth_add_leaves_nothing_behind():
    # IPv6 switched off in this sandbox: the link is created, then the v6 address fails.
    with open("/proc/sys/net/ipv6/conf/default/disable_ipv6", "w") as f:
        f.write("1")
    with open("/proc/sys/net/ipv6/conf/all/disable_ipv6", "w") as f:
        f.write("1")
    proc = cli("veth", "add", "v6a", "v6b", "--addr", "2001:db8::1/64")
    assert proc.returncode == 1
    assert "ip link add v6a type veth peer name v6b" in proc.stdout
    assert "ip link del v6a" in proc.stdout          # the rollback is echoed too
    assert proc.stderr.startswith("cnikit: error: command failed: ip addr add 2001:db8::1/64 dev v6a")
    assert "v6a" not in links() and "v6b" not in links()


def test_ctrl_c_rolls_back_the_transaction_in_progress():
    r = cnikit.Runner(out=io.StringIO())
    with pytest.raises(KeyboardInterrupt):
        with r.transaction():
            cnikit.bridge_add(r, "brc")
            assert "brc" in links()
            raise KeyboardInterrupt
    assert "brc" not in links()
    assert "# rolling back" in r.out.getvalue()


def test_a_failed_undo_is_reported_not_ignored(capsys):
    r = cnikit.Runner(out=io.StringIO())
    with pytest.raises(cnikit.CommandFailed):
        with r.transaction():
            cnikit.bridge_add(r, "bru")
            r.execute(["ip", "link", "del", "bru"])          # gone behind cnikit's back
            r.run(["ip", "link", "set", "dev", "nosuchdev", "up"])
    err = capsys.readouterr().err
    # the warning carries what ip itself said (asked again here, not pinned: its words are ip's)
    said = r.execute(["ip", "link", "del", "bru"]).stderr.strip().splitlines()[-1]
    assert f"cnikit: warning: could not undo link bru: ip link del bru: {said}" in err


def test_cache_write_failure_is_one_line_and_rolled_back(tmp_path):
    # /var/lib/cni/results is a file here: the cache write fails after the plugin's ADD,
    # and the chain is DELeted again (the pod's veth and address go).
    assert cli("cni", "install").returncode == 0
    os.makedirs("/var/lib/cni", exist_ok=True)
    open("/var/lib/cni/results", "w").close()
    assert cli("netns", "add", "pod1").returncode == 0
    proc = cli("cni", "add", "pod1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.startswith("cnikit: error: cannot cache the ADD result in /var/lib/cni/results/")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "ADD failed: DEL the whole chain" in proc.stdout
    assert "eth0" not in links("pod1")


@pytest.mark.noroot
def test_a_tool_in_sbin_is_found_and_run_for_a_user_whose_path_lacks_sbin(tmp_path, monkeypatch):
    # Debian gives an ordinary user no sbin on PATH; iptables and sysctl live there
    sbin, bin_ = tmp_path / "sbin", tmp_path / "bin"
    sbin.mkdir(), bin_.mkdir()
    (sbin / "cnikit-tool").write_text("#!/bin/sh\necho from sbin \"$@\"\n")
    (sbin / "cnikit-tool").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_))
    monkeypatch.setattr(cnikit, "SBIN_DIRS", (str(sbin),))
    assert cnikit.which("cnikit-tool") == str(sbin / "cnikit-tool")
    assert cnikit.Runner(out=io.StringIO()).execute(["cnikit-tool", "-n"]).stdout == "from sbin -n\n"
    (bin_ / "cnikit-tool").write_text("#!/bin/sh\necho from PATH\n")
    (bin_ / "cnikit-tool").chmod(0o755)
    assert cnikit.Runner(out=io.StringIO()).execute(["cnikit-tool"]).stdout == "from PATH\n"   # PATH first
