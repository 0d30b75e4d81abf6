"""What the pitfall labs (stages/2N_pitfall_*.py) share. A lab is a lesson (stages/lesson.py:
sandbox by default, narration, picture, PASS/FAIL, --dry-run, --step, --keep) that breaks
the network on purpose, in six steps:

    build a working topology -> prove it works -> break it the way it breaks in real life
    -> the symptom, as a user meets it -> diagnose (the tool that reveals it, then
    `cnikit doctor`) -> fix it; verification: the same proof passes and doctor says healthy.

A lab module declares itself as a `Lab` (below): its Lesson (with a "fix" skip), the
one-line stories the steps tell, the cause doctor must name and doctor's arguments, and
its functions setup(L), check(L, expect_fail), breakage(L), reveal(L), fix(L), optionally
prove(L) (extra checks after the fix). A missing field fails as the module is imported.
Tests drive those functions directly to build the broken and the fixed state; `--broken`
stops a run at the broken state (with --keep, a shell in it).
"""
import sys

from lesson import CNIKIT, Lesson, cnikit, contract_error, in_netns, is_text

STAGE_ARGS_HELP = "stop at the broken state, after the diagnosis (with --keep: a shell to explore it)"


class Lab:
    """A pitfall lab: what it tells at each of the six steps and the functions that take them."""
    STORIES = {"works": "what works before the break", "breaks": "how it breaks in real life",
               "symptom": "the symptom, as a user meets it", "reveals": "what the diagnosis shows",
               "fixes": "what the fix does", "cause": "the name cnikit doctor gives the breakage"}
    STEPS = {"setup": "builds the working topology", "check": "tells whether it works, check(L, expect_fail)",
             "breakage": "breaks it", "reveal": "shows the cause with the tool that reveals it",
             "fix": "fixes it"}

    def __init__(self, lesson, *, cause=None, doctor=None, works=None, breaks=None, symptom=None, reveals=None,
                 fixes=None, setup=None, check=None, breakage=None, reveal=None, fix=None, prove=None):
        if not isinstance(lesson, Lesson):
            contract_error("a lab's first field is its Lesson")
        self.lesson = lesson
        self.cause, self.works, self.breaks, self.symptom, self.reveals, self.fixes = (
            cause, works, breaks, symptom, reveals, fixes)
        self.doctor = doctor
        self.setup, self.check, self.breakage, self.reveal, self.fix, self.prove = (
            setup, check, breakage, reveal, fix, prove)
        what = f"lab {lesson.number}"
        for name, means in self.STORIES.items():
            if not is_text(getattr(self, name)):
                contract_error(f"{what} has no {name} ({means})")
        if not (isinstance(doctor, tuple) and len(doctor) >= 2 and all(is_text(a) for a in doctor)):
            contract_error(f"{what} has no doctor (the arguments of `cnikit doctor FROM TO [options]`, a tuple)")
        for name, does in self.STEPS.items():
            if not callable(getattr(self, name)):
                contract_error(f"{what} has no {name} (the function that {does})")
        if prove is not None and not callable(prove):
            contract_error(f"{what}: prove must be a function (extra checks after the fix)")
        if "fix" not in lesson.skips:
            contract_error(f"{what}: its Lesson has no \"fix\" skip (what stays broken without the fix)")


def node_with_pods(L, node, bridge_name, gateway, pods, mtu=None, default_route=True, new_node=True):
    """NODE (a namespace standing for a machine; made here unless NEW_NODE is False) with
    BRIDGE_NAME at GATEWAY and a pod namespace per entry of PODS {pod: cidr} on it, as
    lesson 03 builds on the host."""
    r = L.r
    if new_node:
        cnikit.netns_add(r, node, lo_up=True)
    cnikit.bridge_add(r, bridge_name, addr=gateway, ns=node)
    for pod, cidr in pods.items():
        cnikit.netns_add(r, pod, lo_up=True)
        cnikit.veth_add(r, f"veth-{pod}", "eth0", netns=pod, peer_addr=cidr, mtu=mtu, ns=node)
        cnikit.bridge_attach(r, bridge_name, [f"veth-{pod}"], ns=node)
        if default_route and gateway:
            cnikit.route_add(r, "default", via=gateway.split("/")[0], ns=pod)


def link_between(L, left, left_dev, left_cidr, right, right_dev, right_cidr):
    """A veth between two namespaces, addressed at both ends: a cable between machines."""
    cnikit.veth_add(L.r, left_dev, right_dev, netns=right, addr=left_cidr, peer_addr=right_cidr, ns=left)


def doctor(L, lab, expect=None):
    """Run `cnikit doctor` as a user would; EXPECT: the cause it must name (None: healthy)."""
    argv = [CNIKIT, "doctor", *lab.doctor]
    ok, out = L.r.probe(argv, expect_fail=expect is not None)
    if expect:
        named = f"BROKEN at " in out and any(line.startswith("BROKEN at ") and line.endswith(f": {expect}")
                                            for line in out.splitlines())
        return L.check(f"cnikit doctor names the first broken hop: {expect}", not ok and named,
                       out.splitlines()[-1] if out else "no output")
    return L.check("cnikit doctor finds the whole path healthy", ok and "HEALTHY" in out,
                   out.splitlines()[-1] if out else "no output")


def policy_packets(L, chain, ns=None, tool="iptables"):
    """Packets CHAIN's policy has taken so far (`TOOL -S CHAIN -v`): a look-up, not a step."""
    ok, out = L.r.query(in_netns([tool, "-w", "-S", chain, "-v"], ns))
    for line in out.splitlines() if ok else []:
        words = line.split()
        if words[:2] == ["-P", chain] and "-c" in words:
            return int(words[words.index("-c") + 1])
    return 0


def counter(L, name, ns=None):
    """A kernel counter (nstat, absolute, history untouched): a look-up, not a step."""
    ok, out = L.r.query(in_netns(["nstat", "-asz", name], ns))
    for line in out.splitlines() if ok else []:
        words = line.split()
        if words[:1] == [name] and len(words) > 1 and words[1].isdigit():
            return int(words[1])
    return 0


def steps(lab, broken_only=False):
    """build(L) and verify(L) of LAB, the six steps every pitfall lab follows."""

    def build(L):
        lab.setup(L)
        L.step(f"before anything breaks: {lab.works}")
        L.check(f"before the break, {lab.works}", lab.check(L))
        L.step(f"break it the way it breaks in real life: {lab.breaks}")
        lab.breakage(L)
        L.step(f"the symptom, as a user meets it: {lab.symptom}")
        L.check(f"broken: {lab.symptom}", not lab.check(L, expect_fail=True))
        L.step(f"diagnose: {lab.reveals}")
        lab.reveal(L)
        L.step("cnikit doctor walks the path hop by hop and names the first broken one, the command that "
               "shows it and the one that would fix it (it changes nothing itself)")
        doctor(L, lab, expect=lab.cause)
        if broken_only:
            return
        if L.step(f"fix it: {lab.fixes}", skip="fix"):
            lab.fix(L)

    def verify(L):
        if broken_only:
            L.say("--broken: the lab stops here, broken on purpose; the fix would be: " + lab.fixes)
            return
        L.check(f"after the fix, {lab.works}", lab.check(L))
        if lab.prove is not None:
            lab.prove(L)
        doctor(L, lab)

    return build, verify


def main(lab):
    """Run LAB as a command: the lesson's options plus --broken."""
    parser = lab.lesson.parser()
    parser.add_argument("--broken", action="store_true", help=STAGE_ARGS_HELP)
    args = parser.parse_args()
    build, verify = steps(lab, broken_only=args.broken)
    lab.lesson.main(build, verify, argv=sys.argv[1:], parser=parser)
