"""Lesson 06 across two real VMs (vagrant/, issue 6), tested without any VM.

- `vagrant validate` on vagrant/Vagrantfile, offline (the test's sandbox has no
  network at all), with a private VAGRANT_HOME and dotfile path.
- `make -n vagrant-stage-06` shows the intended command sequence.
- `cleanup.sh --vagrant` destroys the VMs only with that flag.
"""
import os
import re
import shlex
import shutil
import subprocess

import pytest
import sh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VAGRANT_DIR = os.path.join(ROOT, "vagrant")
NODE1_IP, NODE2_IP = "192.168.56.11", "192.168.56.12"     # the Vagrantfile's and the Makefile's defaults


def make_n(*args):
    """The recipe `make -n` prints, one logical line each (backslash continuations joined)."""
    out = str(sh.make("-n", "--no-print-directory", "-C", ROOT, *args))
    return [line for line in out.replace("\\\n", " ").splitlines() if line.strip()]


def vm_commands(lines):
    """(node, command run inside that VM) for each `vagrant ssh NODE -c '...'` line, in order."""
    found = []
    for line in lines:
        words = shlex.split(line.replace(";", " ; "))
        for i, word in enumerate(words):
            if word == "ssh" and i > 0 and words[i - 1].endswith("vagrant") and "-c" in words[i:]:
                found.append((words[i + 1], words[words.index("-c", i) + 1]))
    return found


def vagrant_env(tmp_path):
    """Vagrant with nothing of the user's: a private home and machine index, no version check."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VAGRANT_")}
    env.update(VAGRANT_CWD=VAGRANT_DIR, VAGRANT_HOME=str(tmp_path / "vagrant.d"),
               VAGRANT_DOTFILE_PATH=str(tmp_path / "dot"), VAGRANT_CHECKPOINT_DISABLE="1")
    return env


# ---------------------------------------------------------------- the Vagrantfile

needs_vagrant = pytest.mark.skipif(shutil.which("vagrant") is None,
                                   reason="the vagrant binary is absent (Debian package vagrant; "
                                          "make deps installs it)")


@needs_vagrant
def test_vagrant_validate_ignore_provider(tmp_path):
    dotdir = os.path.join(VAGRANT_DIR, ".vagrant")
    existed = os.path.exists(dotdir)
    proc = subprocess.run(["vagrant", "validate", "--ignore-provider"], cwd=VAGRANT_DIR,
                          env=vagrant_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Vagrantfile validated successfully" in proc.stdout
    assert os.path.exists(dotdir) == existed      # its state went to the test's tmp_path


def test_vagrantfile_nodes_addresses_box_and_provisioning():
    text = open(os.path.join(VAGRANT_DIR, "Vagrantfile")).read()
    assert re.search(r'"node1"\s*=>\s*ENV\.fetch\("CNIKIT_NODE1_IP",\s*"%s"\)' % re.escape(NODE1_IP), text)
    assert re.search(r'"node2"\s*=>\s*ENV\.fetch\("CNIKIT_NODE2_IP",\s*"%s"\)' % re.escape(NODE2_IP), text)
    assert '"private_network", ip: addr' in text
    for provider in ("virtualbox", "libvirt"):
        assert re.search(r'"%s"\s*=>\s*"debian/bookworm64"' % provider, text)
        assert f"config.vm.provider :{provider} do" in text
    assert re.search(r'synced_folder "\.\.", "/vagrant", type: "rsync"', text)
    prov = open(os.path.join(VAGRANT_DIR, "provision.sh")).read()
    pkgs = re.search(r'^pkgs="([^"]*)"', prov, re.M).group(1).split()
    for pkg in ("iproute2", "iptables", "iputils-ping", "tcpdump", "python3", "make"):
        assert pkg in pkgs
    assert "pip" not in prov
    sh.sh("-n", os.path.join(VAGRANT_DIR, "provision.sh"))


# ---------------------------------------------------------------- the Makefile

def test_make_n_vagrant_stage_06_shows_the_command_sequence():
    lines = make_n("vagrant-stage-06")
    vagrant_lines = [l for l in lines if re.search(r"\bvagrant (rsync|ssh)\b", l)]
    assert all(f"VAGRANT_CWD={VAGRANT_DIR}" in l for l in vagrant_lines)
    # First the tree goes to the VMs, then node1's half, node2's half, then the check.
    assert re.search(r"\bvagrant rsync$", lines[0])
    assert vm_commands(lines) == [
        ("node1", f"cd /vagrant && sudo make --no-print-directory stage-06 ROLE=node1 PEER={NODE2_IP}"),
        ("node2", f"cd /vagrant && sudo make --no-print-directory stage-06 ROLE=node2 PEER={NODE1_IP}"),
        ("node1", f"cd /vagrant && sudo make --no-print-directory stage-06 ROLE=node1 PEER={NODE2_IP} VERIFY=1"),
    ]
    verdict = lines[-1] if "PASS" in lines[-1] else " ".join(lines[-3:])
    assert "PASS" in verdict and "FAIL" in verdict and "exit 1" in verdict


def test_make_n_vagrant_stage_06_follows_the_addresses():
    cmds = vm_commands(make_n("vagrant-stage-06", "NODE1_IP=198.51.100.1", "NODE2_IP=198.51.100.2"))
    assert [c.split("ROLE=")[1].split(" VERIFY")[0] for _, c in cmds] == \
        ["node1 PEER=198.51.100.2", "node2 PEER=198.51.100.1", "node1 PEER=198.51.100.2"]


def test_make_n_vagrant_up_and_down():
    up, = make_n("vagrant-up")
    assert up.endswith("vagrant up ") or up.endswith("vagrant up")
    assert "CNIKIT_NODE1_IP=192.168.56.11 CNIKIT_NODE2_IP=192.168.56.12" in up
    assert make_n("vagrant-up", "PROVIDER=libvirt")[0].endswith("vagrant up --provider=libvirt")
    down, = make_n("vagrant-down")
    assert down.endswith("vagrant destroy -f") and f"VAGRANT_CWD={VAGRANT_DIR}" in down


# ---------------------------------------------------------------- cleanup.sh --vagrant

def cleanup_copy(tmp_path, machines=False):
    """cleanup.sh in a scratch tree (its cnikit.py is the real one) with a fake vagrant
    on PATH that records how it was called: the real VMs, if any, stay untouched."""
    tree = tmp_path / "tree"
    (tree / "vagrant").mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "cleanup.sh"), tree / "cleanup.sh")
    os.symlink(os.path.join(ROOT, "cnikit.py"), tree / "cnikit.py")
    if machines:
        (tree / "vagrant" / ".vagrant" / "machines" / "node1" / "libvirt").mkdir(parents=True)
        (tree / "vagrant" / ".vagrant" / "machines" / "node1" / "libvirt" / "id").write_text("x")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "vagrant.log"
    fake = bindir / "vagrant"
    fake.write_text(f'#!/bin/sh\necho "$VAGRANT_CWD $*" >> {log}\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("SUDO_USER", "VAGRANT_CWD")}
    env["PATH"] = f"{bindir}:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
    return tree, env, log


def test_cleanup_sh_destroys_the_vms_only_with_the_flag(tmp_path):
    tree, env, log = cleanup_copy(tmp_path, machines=True)
    plain = subprocess.run(["bash", str(tree / "cleanup.sh")], env=env, capture_output=True, text=True)
    assert plain.returncode == 0, plain.stderr
    assert not log.exists()                                      # no flag: no vagrant at all
    assert "./cleanup.sh --vagrant destroys them" in plain.stderr    # ... but it offers
    assert "cleanup:" in plain.stdout                            # cnikit cleanup ran as before

    for flag in ("--vagrant", "--destroy-vagrant"):
        proc = subprocess.run(["bash", str(tree / "cleanup.sh"), flag], env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert f"VAGRANT_CWD={tree}/vagrant vagrant destroy -f" in proc.stdout
        assert "cleanup:" in proc.stdout                         # and cnikit's own cleanup still ran
    assert log.read_text().splitlines() == [f"{tree}/vagrant destroy -f"] * 2


def test_cleanup_sh_without_vms_says_nothing_about_vagrant(tmp_path):
    tree, env, log = cleanup_copy(tmp_path, machines=False)
    proc = subprocess.run(["bash", str(tree / "cleanup.sh")], env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and "vagrant" not in proc.stderr.lower() and not log.exists()
