"""What the pitfall labs (stages/2N_pitfall_*.py) share. A lab is a lesson (stages/lesson.py:
sandbox by default, narration, picture, PASS/FAIL, --dry-run, --step, --keep) that breaks
the network on purpose, in six steps:

    build a working topology -> prove it works -> break it the way it breaks in real life
    -> the symptom, as a user meets it -> diagnose (the tool that reveals it, then
    `cnikit doctor`) -> fix it; verification: the same proof passes and doctor says healthy.

A lab module defines LESSON (a Lesson with a "fix" skip) and the constants and functions
`steps()` below reads: WORKS, BREAK, SYMPTOM, REVEAL, FIX (one-line stories), CAUSE (the
name doctor gives the breakage), DOCTOR (doctor's FROM TO [options]), and setup(L),
works(L, expect_fail), breakage(L), reveal(L), fix(L), optionally prove(L) (extra checks
after the fix). Tests drive those functions directly to build the broken and the fixed
state; `--broken` stops a run at the broken state (with --keep, a shell in it).
"""
import sys

from lesson import CNIKIT, cnikit, in_netns

STAGE_ARGS_HELP = "stop at the broken state, after the diagnosis (with --keep: a shell to explore it)"


def node_with_pods(L, node, bridge_name, gateway, pods, mtu=None, default_route=True, new_node=True):
    """NODE (a namespace standing for a machine; made here unless NEW_NODE is False) with
    BRIDGE_NAME at GATEWAY and a pod namespace per entry of PODS {pod: cidr} on it, as
    lesson 03 builds on the host."""
    r = L.r
    if new_node:
        cnikit.netns_add(r, node, lo_up=True)
    cnikit.bridge_add(r, bridge_name, addr=gateway, host=node)
    for pod, cidr in pods.items():
        cnikit.netns_add(r, pod, lo_up=True)
        cnikit.veth_add(r, f"veth-{pod}", "eth0", netns=pod, peer_addr=cidr, mtu=mtu, host=node)
        cnikit.bridge_attach(r, bridge_name, [f"veth-{pod}"], host=node)
        if default_route and gateway:
            cnikit.route_add(r, "default", via=gateway.split("/")[0], ns=pod)


def link_between(L, left, left_dev, left_cidr, right, right_dev, right_cidr):
    """A veth between two namespaces, addressed at both ends: a cable between machines."""
    cnikit.veth_add(L.r, left_dev, right_dev, netns=right, addr=left_cidr, peer_addr=right_cidr, host=left)


def doctor(L, lab, expect=None):
    """Run `cnikit doctor` as a user would; EXPECT: the cause it must name (None: healthy)."""
    argv = [CNIKIT, "doctor", *lab.DOCTOR]
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
        L.step(f"before anything breaks: {lab.WORKS}")
        L.check(f"before the break, {lab.WORKS}", lab.works(L))
        L.step(f"break it the way it breaks in real life: {lab.BREAK}")
        lab.breakage(L)
        L.step(f"the symptom, as a user meets it: {lab.SYMPTOM}")
        L.check(f"broken: {lab.SYMPTOM}", not lab.works(L, expect_fail=True))
        L.step(f"diagnose: {lab.REVEAL}")
        lab.reveal(L)
        L.step("cnikit doctor walks the path hop by hop and names the first broken one, the command that "
               "shows it and the one that would fix it (it changes nothing itself)")
        doctor(L, lab, expect=lab.CAUSE)
        if broken_only:
            return
        if L.step(f"fix it: {lab.FIX}", skip="fix"):
            lab.fix(L)

    def verify(L):
        if broken_only:
            L.say("--broken: the lab stops here, broken on purpose; the fix would be: " + lab.FIX)
            return
        L.check(f"after the fix, {lab.WORKS}", lab.works(L))
        if hasattr(lab, "prove"):
            lab.prove(L)
        doctor(L, lab)

    return build, verify


def main(lab):
    """Run LAB as a command: the lesson's options plus --broken."""
    parser = lab.LESSON.parser()
    parser.add_argument("--broken", action="store_true", help=STAGE_ARGS_HELP)
    args = parser.parse_args()
    build, verify = steps(lab, broken_only=args.broken)
    lab.LESSON.main(build, verify, argv=sys.argv[1:], parser=parser)
