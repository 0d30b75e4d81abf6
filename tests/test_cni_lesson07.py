"""Lesson 07 end to end in its own sandbox: PASS as written, FAIL without the install step,
and its dry run is the runtime's script."""
import os

from kernel import run_stage



def lesson(*args):
    return run_stage("07_cni.py", *args)


def test_lesson_07_passes():
    proc = lesson()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    out = proc.stdout
    assert out.splitlines()[-1].startswith("PASS lesson 07 cni:")
    # what kubelet's runtime does, in order: VERSION, ADD (real env), the log, CHECK, DEL
    order = [out.index(s) for s in ("env CNI_COMMAND=VERSION", "env CNI_COMMAND=ADD CNI_CONTAINERID=pod1",
                                    " /var/log/cni.log\n=== ADD", "env CNI_COMMAND=ADD CNI_CONTAINERID=pod2",
                                    "env CNI_COMMAND=CHECK", "env CNI_COMMAND=DEL CNI_CONTAINERID=pod1")]
    assert order == sorted(order)
    assert "K8S_POD_NAME=pod1" in out and "CNI_NETNS=/run/netns/pod1" in out
    assert "check: nothing is left on the node" in out and "FAILED" not in out


def test_lesson_07_quiet_prints_only_the_verdict():
    proc = lesson("-q")
    assert proc.returncode == 0 and proc.stdout.strip().startswith("PASS lesson 07 cni")


def test_lesson_07_without_the_plugin_fails_like_kubelet_would():
    proc = lesson("--skip", "install")
    assert proc.returncode == 1
    assert "CNI plugin 'cnikit' not found in CNI_PATH" in proc.stdout
    assert proc.stdout.splitlines()[-1].startswith("FAIL lesson 07 cni:")


def test_lesson_07_dry_run_is_a_script():
    proc = lesson("--dry-run")
    assert proc.returncode == 0, proc.stderr
    lines = [l for l in proc.stdout.splitlines() if l and not l.startswith("#")]
    assert lines[0].startswith("mkdir -p /opt/cni/bin")
    assert any(l.startswith("env CNI_COMMAND=ADD CNI_CONTAINERID=pod2") for l in lines)
    assert not os.path.exists("/etc/cni/net.d/10-cnikit.conflist")
    # VERSION before ADD is podman's habit, not kubelet's containerd (test_cni_containerd checks it)
    step = [l for l in proc.stdout.splitlines() if "VERSION" in l and "podman" in l]
    assert step and "containerd" in step[0] and "before every call" not in step[0]
