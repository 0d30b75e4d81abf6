"""Docker containers that borrow this machine's programs, with no registry: a local image
made with `docker import` and containers that bind-mount this machine's /usr read-only.
Used by `stages/06_vxlan.py --docker`; shared with other code that needs such containers.

An image is a tar of a root filesystem. Ours holds only a few empty directories and the
links a merged-/usr system has (bin -> usr/bin, sbin, lib, lib64); `-v /usr:/usr:ro` then
brings python3, iproute2, iptables and the dynamic loader from this machine. No registry
is reachable anywhere here and many learners are offline: nothing is pulled.

Everything made is labelled (LABELS, e.g. {"org.cnikit.lesson": "06"}) and removed by that
label, never by name. The functions named *_argv build argv lists; the others run them
through a cnikit Runner, so a lesson prints every docker command it runs.
"""
import os
import shlex
import shutil

import cnikit

ROOTFS_DIRS = ("etc", "run", "tmp", "var/tmp", "root", "proc", "sys", "dev", "usr")
USR_LINKS = (("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib"), ("lib64", "usr/lib64"))
# What `ip netns add` and VXLAN need inside a container on these machines: --privileged fails
# ("unable to apply caps"), these are enough (shared/notes/runtimes.md, "A real Docker daemon").
CAPS = ("NET_ADMIN", "SYS_ADMIN")
SECURITY_OPTS = ("apparmor=unconfined", "seccomp=unconfined")
# This machine's users, read-only: programs look theirs up (tcpdump drops to user tcpdump and
# fails where /etc/passwd lacks it).
USER_DB = ("/etc/passwd", "/etc/group")
CMD = ("sleep", "infinity")              # a node has nothing to run: it waits for `docker exec`
SCRATCH = "tmp"                          # a dry run's shell variable holding the scratch directory
DAEMON_TIMEOUT = 30                      # seconds `docker version` gets to reach the daemon


def label_args(labels):
    return [arg for key, value in labels.items() for arg in ("--label", f"{key}={value}")]


def filter_args(labels):
    return [arg for key, value in labels.items() for arg in ("--filter", f"label={key}={value}")]


def rootfs_argvs(scratch):
    """The root filesystem as commands: the directories, /tmp's sticky bit, the links into /usr."""
    root = f"{scratch}/rootfs"
    return ([["mkdir", "-p"] + [f"{root}/{d}" for d in ROOTFS_DIRS], ["chmod", "1777", f"{root}/tmp"]]
            + [["ln", "-s", target, f"{root}/{link}"] for link, target in USR_LINKS])


def tar_argv(scratch):
    return ["tar", "-C", f"{scratch}/rootfs", "-cf", f"{scratch}/rootfs.tar", "."]


def import_argv(tarball, image, labels, cmd=CMD):
    """`docker import` with the labels and the default command set on the image itself."""
    changes = [f"LABEL {key}={value}" for key, value in labels.items()]
    changes.append("CMD " + "[" + ", ".join(f'"{word}"' for word in cmd) + "]")
    return ["docker", "import"] + [a for change in changes for a in ("--change", change)] + [tarball, image]


def run_argv(image, name, labels, network=None, ip=None, hostname=None, mounts=(), cmd=()):
    """A detached container NAME from IMAGE with this machine's /usr and users (read-only), the
    capabilities a node needs, MOUNTS ("src:dst[:ro]") and the LABELS."""
    argv = ["docker", "run", "-d", "--name", name] + (["--hostname", hostname] if hostname else [])
    argv += label_args(labels)
    argv += (["--network", network] if network else []) + (["--ip", ip] if ip else [])
    argv += [a for cap in CAPS for a in ("--cap-add", cap)]
    argv += [a for opt in SECURITY_OPTS for a in ("--security-opt", opt)]
    argv += ["-v", "/usr:/usr:ro"]
    argv += [a for path in USER_DB if os.path.exists(path) for a in ("-v", f"{path}:{path}:ro")]
    argv += [a for m in mounts for a in ("-v", m)]
    return argv + [image] + list(cmd)


# What a label finds and how it goes, in the order it must go (containers use the network
# and the image): (what, listing argv, removal argv without the ids).
def listings(labels):
    return (("containers", ["docker", "ps", "-a", "-q"] + filter_args(labels), ["docker", "rm", "-f"]),
            ("networks", ["docker", "network", "ls", "-q"] + filter_args(labels), ["docker", "network", "rm"]),
            ("images", ["docker", "image", "ls", "-q"] + filter_args(labels), ["docker", "image", "rm", "-f"]))


def cannot_use():
    """Why Docker containers with this machine's /usr cannot be made here (None when they can):
    one line, before anything changes."""
    if not cnikit.which("docker"):
        return "docker not found: install Docker (Debian package docker.io) or run without --docker"
    unmerged = [d for d, target in USR_LINKS[:3] if os.path.realpath("/" + d) != "/" + target]
    if unmerged:
        return ("this machine's /" + ", /".join(unmerged) + " are not links into /usr (no merged /usr): "
                "containers that borrow its /usr would miss programs")
    try:
        proc = cnikit.Runner(quiet=True).execute(["docker", "version", "--format", "{{.Server.Version}}"],
                                                 timeout=DAEMON_TIMEOUT)
    except cnikit.CnikitError as e:
        return f"the Docker daemon is not reachable: {e}"
    if proc.returncode != 0 or not proc.stdout.strip():
        why = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        return (f"the Docker daemon is not reachable (`docker version`: {why}); is it running, and may you "
                "use it (sudo, or the docker group)?")
    return None


def leftovers(r, labels):
    """{what: ids} of the containers, networks and images carrying LABELS (look-ups, not steps)."""
    found = {}
    for what, listing, _ in listings(labels):
        ok, out = r.query(listing)
        ids = list(dict.fromkeys(out.split())) if ok else []
        if ids:
            found[what] = ids
    return found


def _word(arg):
    """ARG for a dry run's script: the scratch directory is the shell variable $tmp."""
    if arg.startswith("$" + SCRATCH):
        return f'"{arg}"'
    return shlex.quote(arg)


def _run(r, argv):
    """A command whose arguments may name the scratch directory: a dry run prints it with $tmp."""
    if r.dry_run:
        if not r.quiet:
            r.output(" ".join(_word(a) for a in argv))
        return ""
    return r.run(argv)


def build(r, image, labels):
    """IMAGE, through runner R: the root filesystem in a scratch directory, its tar, `docker
    import`; the scratch directory goes whatever happens."""
    if r.dry_run:
        if not r.quiet:
            r.output(f"{SCRATCH}=$(mktemp -d -t cnikit-image.XXXXXX)")
        scratch = "$" + SCRATCH
    else:
        scratch = r.run(["mktemp", "-d", "-t", "cnikit-image.XXXXXX"]).strip()
    try:
        for argv in rootfs_argvs(scratch):
            _run(r, argv)
        _run(r, tar_argv(scratch))
        _run(r, import_argv(f"{scratch}/rootfs.tar", image, labels))
    finally:
        if r.dry_run:
            _run(r, ["rm", "-rf", scratch])
        elif scratch.startswith("/") and os.path.isdir(scratch):
            r.run(["rm", "-rf", scratch], check=False)
            shutil.rmtree(scratch, ignore_errors=True)      # when even rm could not run


def remove(r, labels):
    """Remove, through runner R, every container, network and image carrying LABELS; absent
    is fine, and one failure does not stop the rest. Returns what is still there."""
    if r.dry_run:
        if not r.quiet:
            for line in remove_script(labels):
                r.output(line)
        return {}
    for what, listing, removal in listings(labels):
        r.echo(listing)             # the look-up by label is part of what a learner sees
        try:
            proc = r.execute(listing, timeout=DAEMON_TIMEOUT)
        except cnikit.CnikitError:
            continue
        if not r.quiet:
            r.output(proc.stdout)
        ids = list(dict.fromkeys(proc.stdout.split())) if proc.returncode == 0 else []
        if ids:
            r.run(removal + ids, check=False)
    return leftovers(r, labels)


def remove_script(labels):
    """The same removal as lines of POSIX sh (a dry run's script)."""
    return [f"for id in $({shlex.join(listing)}); do {shlex.join(removal)} \"$id\"; done"
            for _, listing, removal in listings(labels)]
