"""`cnikit cni` against libcni's behaviour, with a recording stand-in plugin (a bash script in
the sandbox's /opt/cni/bin that logs its env and stdin and answers what the test tells it):
config parsing, the id a netns path gives, the cache record, DEL from the cache, disableCheck,
and plugins that misbehave (multi-line stderr, non-UTF-8, JSON that is no result)."""
import json
import os

import pytest

from kernel import cli

CONF_DIR = "/etc/cni/net.d"
CALLS = "/run/cni/calls.log"
RESULT = '{"cniVersion":"1.0.0","interfaces":[],"ips":[]}'


def fake_plugin(name="rec", answer=RESULT, extra=""):
    """A plugin that logs `COMMAND|CONTAINERID|NETNS|IFNAME|ARGS|PATH|stdin` to CALLS and prints ANSWER on ADD."""
    os.makedirs("/opt/cni/bin", exist_ok=True)
    os.makedirs(os.path.dirname(CALLS), exist_ok=True)
    path = f"/opt/cni/bin/{name}"
    with open(path, "w") as f:
        f.write("#!/bin/bash\n"
                f'in=$(cat); echo "$CNI_COMMAND|$CNI_CONTAINERID|$CNI_NETNS|$CNI_IFNAME|$CNI_ARGS|$CNI_PATH|$in" >> {CALLS}\n'
                + extra +
                f"if [ \"$CNI_COMMAND\" = ADD ]; then printf '%s\\n' '{answer}'; fi\n")
    os.chmod(path, 0o755)
    return path


def conflist(plugins, name="rec", version="1.0.0", **top):
    os.makedirs(CONF_DIR, exist_ok=True)
    path = f"{CONF_DIR}/10-{name}.conflist"
    with open(path, "w") as f:
        conf = dict({"cniVersion": version, "name": name, "plugins": plugins}, **top)
        json.dump({k: v for k, v in conf.items() if v is not None}, f)
    return path


def calls():
    if not os.path.exists(CALLS):
        return []
    with open(CALLS) as f:
        return [line.rstrip("\n").split("|", 6) for line in f]


def one_line_error(proc, code):
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# ---------------------------------------------------------------- the attachment's identity

def test_a_netns_path_outside_run_netns_needs_an_id():
    """/proc/PID/ns/net names no container: its basename is `net` for every pod, so two
    pods would share one cache entry. A runtime always passes its own id."""
    fake_plugin()
    conflist([{"type": "rec"}])
    proc = cli("cni", "add", "/proc/self/ns/net")
    one_line_error(proc, 2)
    assert "--id" in proc.stderr and calls() == []
    ok = cli("cni", "add", "/proc/self/ns/net", "--id", "default-web", check=True)
    assert calls()[0][:3] == ["ADD", "default-web", "/proc/self/ns/net"], ok.stdout
    os.makedirs("/run/netns", exist_ok=True)
    open("/run/netns/podx", "w").close()      # a path in /run/netns keeps its name as the default id
    cli("cni", "add", "/run/netns/podx", check=True)
    assert calls()[-1][:3] == ["ADD", "podx", "/run/netns/podx"]


def test_the_cache_record_carries_the_netns_like_libcni():
    fake_plugin()
    conflist([{"type": "rec"}])
    cli("cni", "add", "/proc/self/ns/net", "--id", "c1", check=True)
    with open("/var/lib/cni/results/rec-c1-eth0") as f:
        rec = json.load(f)
    assert rec["kind"] == "cniCacheV1" and rec["netns"] == "/proc/self/ns/net"


def test_del_takes_cni_args_and_capability_args_from_the_cache():
    """libcni's cached config gives DEL the ADD's CNI_ARGS as well as its capability args."""
    fake_plugin()
    conflist([{"type": "rec", "capabilities": {"portMappings": True}}])
    rc = '{"portMappings":[{"hostPort":8080,"containerPort":80,"protocol":"tcp"}]}'
    cli("cni", "add", "/proc/self/ns/net", "--id", "c2", "--args", "K8S_POD_NAME=web", "--runtime-config", rc,
        check=True)
    cli("cni", "del", "/proc/self/ns/net", "--id", "c2", check=True)
    dele = calls()[-1]
    assert dele[0] == "DEL" and dele[4] == "IgnoreUnknown=1;K8S_POD_NAME=web"
    assert json.loads(dele[6])["runtimeConfig"] == json.loads(rc)


# ---------------------------------------------------------------- the config, as libcni reads it

def test_capabilities_that_are_not_an_object_are_bad_config_not_a_traceback():
    fake_plugin()
    conflist([{"type": "rec", "capabilities": ["portMappings"]}])
    proc = cli("cni", "add", "/proc/self/ns/net", "--id", "c3", "--runtime-config", '{"portMappings":[]}')
    one_line_error(proc, 2)
    assert "capabilities" in proc.stderr and calls() == []


def test_disable_check_skips_check_like_libcni():
    fake_plugin()
    conflist([{"type": "rec"}], disableCheck=True)
    cli("cni", "add", "/proc/self/ns/net", "--id", "c4", check=True)
    out = cli("cni", "check", "/proc/self/ns/net", "--id", "c4", check=True).stdout
    assert [c[0] for c in calls()] == ["ADD"] and "disableCheck" in out
    conflist([{"type": "rec"}], disableCheck="maybe")
    proc = cli("cni", "check", "/proc/self/ns/net", "--id", "c4")
    one_line_error(proc, 2)
    assert "disableCheck" in proc.stderr


def test_disable_gc_skips_gc():
    fake_plugin()
    conflist([{"type": "rec"}], version="1.1.0", disableGC="true")
    out = cli("cni", "gc", check=True).stdout
    assert calls() == [] and "disableGC" in out


# ---------------------------------------------------------------- plugins that misbehave

def test_a_plugin_failing_with_several_stderr_lines_is_still_a_one_line_error():
    fake_plugin("noisy", extra='echo "first line" >&2; echo "the real reason" >&2; exit 3\n')
    conflist([{"type": "noisy"}])
    proc = cli("cni", "add", "/proc/self/ns/net", "--id", "c5")
    one_line_error(proc, 1)
    assert "the real reason" in proc.stderr


def test_a_cni_error_whose_msg_has_newlines_is_one_line():
    err = '{"cniVersion":"1.0.0","code":7,"msg":"bad\\nconfig","details":"a\\nb"}'
    fake_plugin("errs", extra=f"printf '%s\\n' '{err}'; exit 1\n")
    conflist([{"type": "errs"}])
    proc = cli("cni", "add", "/proc/self/ns/net", "--id", "c6")
    one_line_error(proc, 1)
    assert "CNI error 7" in proc.stderr


@pytest.mark.parametrize("answer, msg", [("\\xff\\xfe", "not UTF-8"), ("[1,2]", "not a CNI result")])
def test_a_plugin_answering_no_result_fails_add_and_is_deleted(answer, msg):
    fake_plugin("odd", extra=f"[ \"$CNI_COMMAND\" = ADD ] && printf '{answer}\\n' && exit 0\n")
    conflist([{"type": "odd"}])
    proc = cli("cni", "add", "/proc/self/ns/net", "--id", "c7")
    one_line_error(proc, 1)
    assert msg in proc.stderr
    assert [c[0] for c in calls()] == ["ADD", "DEL"]          # the chain is DELeted as after any failed ADD
    assert not os.path.exists("/var/lib/cni/results/odd-c7-eth0")


# ---------------------------------------------------------------- install into kind

@pytest.mark.parametrize("extra", [["--subnet", "10.244.1.0/24"], ["--cni-version", "1.1.0"], ["--precompiled"],
                                   ["--python", "/usr/bin/python3"]])
def test_install_kind_refuses_options_it_would_ignore(extra):
    proc = cli("--dry-run", "cni", "install", "--kind", "demo", *extra)
    one_line_error(proc, 2)
    assert extra[0] in proc.stderr and "--kind" in proc.stderr


def test_cni_versions_list_picks_the_highest_this_runtime_knows():
    """Spec 1.1.0's `cniVersions`: libcni takes the highest version it implements (1.1.0 here)."""
    fake_plugin()
    conflist([{"type": "rec"}], cniVersions=["0.4.0", "1.0.0", "9.9.9"], version=None)
    cli("cni", "add", "/proc/self/ns/net", "--id", "c8", check=True)
    assert json.loads(calls()[0][6])["cniVersion"] == "1.0.0"
    conflist([{"type": "rec"}], cniVersions="1.0.0", version=None)
    proc = cli("cni", "add", "/proc/self/ns/net", "--id", "c9")
    one_line_error(proc, 2)
    assert "cniVersions" in proc.stderr
