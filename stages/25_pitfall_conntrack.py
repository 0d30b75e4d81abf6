#!/usr/bin/env python3
"""Pitfall lab 25: a stale conntrack entry after a DNAT change. A hostPort (DNAT on the
node) sends a client's UDP flow to pod-a; the pod moves and the rule is rewritten for
pod-b, but the client keeps sending from the same socket, and conntrack keeps the flow
on pod-a for as long as packets keep coming: rules only decide a flow's first packet.

The tools that write such rules now clean up after themselves on the way in: the reference
portmap plugin deletes the UDP conntrack entries of its host ports on ADD (since plugins
v0.9.0; v1.1.0 narrowed it to those ports only), and kube-proxy deletes the UDP entries of
a Service's endpoints that went away (a reconciler since Kubernetes 1.32). The pitfall stays
for a DNAT written by hand or by a tool that does not, and after a DEL with no ADD behind it:
portmap's DEL removes the rule, not the flows, which keep going to the old pod's address.

    sudo python3 stages/25_pitfall_conntrack.py            # in a throwaway sandbox
    sudo python3 stages/25_pitfall_conntrack.py --broken --keep
    python3 stages/25_pitfall_conntrack.py --dry-run
"""
import pitfall
from lesson import Lesson, cnikit, in_netns

NODE, CLIENT = "node1", "client"
GATEWAY = "10.0.25.1/24"
BACKENDS = {"pod-a": "10.0.25.2/24", "pod-b": "10.0.25.3/24"}
NODE_ADDR, CLIENT_ADDR = "198.51.100.1/24", "198.51.100.10/24"
NODE_IP = NODE_ADDR.split("/")[0]
PORT, CLIENT_PORT = 5353, 40000      # the hostPort; the client's long-lived socket (one flow)
ANSWER_WAIT = "3"                    # seconds the client waits for an answer (a loaded machine forks slowly)
# Every pod answers with its name, all as long: the client reads that many bytes and ends at once,
# instead of waiting out ANSWER_WAIT after every answer (UDP has no end of stream).
ANSWER_BYTES = len(next(iter(BACKENDS))) + 1
assert len({len(pod) for pod in BACKENDS}) == 1, "the pods' names must be as long (ANSWER_BYTES)"
COMMENT = ["-m", "comment", "--comment", "cnikit lab25: hostPort udp/5353"]

LESSON = Lesson(
    "25", "pitfall_conntrack",
    goal="after a DNAT change a UDP flow keeps going to the old backend; conntrack -L and doctor show the "
         "stale entry, conntrack -D sends the flow to the new one",
    picture=r"""
   +-- client ------------------+     +---------------------- node1 (netns) -----------------------+
   | eth0 198.51.100.10         |-----| eth1 198.51.100.1   DNAT udp/5353 -> pod-a, then -> pod-b  |
   | sends from udp/40000,      |     |                     conntrack: flow 198.51.100.10:40000 ->  |
   | always the same socket     |     |                       198.51.100.1:5353 pinned to pod-a    |
   +----------------------------+     | br0 10.0.25.1/24 --- pod-a 10.0.25.2 ("pod-a")              |
                                      |                  --- pod-b 10.0.25.3 ("pod-b")              |
                                      +------------------------------------------------------------+
""",
    skips={"fix": "the stale entry stays: the client's flow keeps going to pod-a"},
    tools=("ip", "ping", "iptables", "sysctl", "socat", "conntrack"),
)


def _dnat(pod):
    return ["-d", f"{NODE_IP}/32", "-p", "udp", "-m", "udp", "--dport", str(PORT)] + COMMENT + \
        ["-j", "DNAT", "--to-destination", f"{BACKENDS[pod].split('/')[0]}:{PORT}"]


def setup(L):
    r = L.r
    L.step("a node with two pods on br0, each a UDP server that answers with its own name; a client on the "
           "node's other network")
    pitfall.node_with_pods(L, NODE, "br0", GATEWAY, BACKENDS)
    cnikit.netns_add(r, CLIENT, lo_up=True)
    pitfall.link_between(L, NODE, "eth1", NODE_ADDR, CLIENT, "eth0", CLIENT_ADDR)
    L.sysctl("net.ipv4.ip_forward", 1, ns=NODE)
    # The server reads the query before it answers: a reply that exits before socat has written
    # the datagram to it would make socat fail (broken pipe) and send nothing.
    for pod, cidr in BACKENDS.items():
        r.spawn(in_netns(["socat", f"UDP4-RECVFROM:{PORT},bind={cidr.split('/')[0]},fork",
                          f"SYSTEM:read query; echo {pod}"], pod))
    for pod in BACKENDS:        # a UDP server is ready once its socket is bound
        script = f'until ss -Huln "sport = :{PORT}" | grep -q .; do sleep 0.02; done'
        r.run(in_netns(["timeout", "5", "sh", "-c", script], pod))
    L.step(f"the hostPort: udp/{PORT} on the node's address goes to pod-a (DNAT)")
    r.run(cnikit.iptables("-t", "nat", "-A", "PREROUTING", *_dnat("pod-a"), ns=NODE))


def answer(L, expect_fail=False):
    query = ["socat", "-t", ANSWER_WAIT, "-T", ANSWER_WAIT, "-",
             f"UDP4:{NODE_IP}:{PORT},sourceport={CLIENT_PORT},reuseaddr,readbytes={ANSWER_BYTES}"]
    ok, out = L.r.probe(in_netns(["sh", "-c", "echo query | " + " ".join(query)], CLIENT), expect_fail=expect_fail)
    return out.strip().splitlines()[-1] if ok and out.strip() else ""


def named(L):
    """The backend the hostPort's DNAT rule names now: read from the rule (a look-up, not a step)."""
    ok, rules = L.r.query(cnikit.iptables("-t", "nat", "-S", "PREROUTING", ns=NODE))
    return next((pod for pod, cidr in BACKENDS.items()
                 if ok and f"--to-destination {cidr.split('/')[0]}:{PORT}" in rules), "nobody")


def works(L, expect_fail=False):
    got, rule = answer(L, expect_fail), named(L)
    if not L.r.dry_run:
        L.say(f"answered by: {got or 'nobody'} (the rule names {rule})")
    return got == rule


def breakage(L):
    r = L.r
    r.run(cnikit.iptables("-t", "nat", "-D", "PREROUTING", *_dnat("pod-a"), ns=NODE))
    r.run(cnikit.iptables("-t", "nat", "-A", "PREROUTING", *_dnat("pod-b"), ns=NODE))
    r.show(cnikit.iptables("-t", "nat", "-S", "PREROUTING", ns=NODE))


def reveal(L):
    r = L.r
    ok, out = r.probe(in_netns(["conntrack", "-L", "-p", "udp", "--orig-dst", NODE_IP, "--dport", str(PORT)], NODE))
    L.check("conntrack still translates the client's flow to pod-a (its reply side comes from 10.0.25.2)",
            "src=10.0.25.2 " in out)


def fix(L):
    L.r.run(in_netns(["conntrack", "-D", "-p", "udp", "--orig-dst", NODE_IP, "--dport", str(PORT)], NODE))


def prove(L):
    ok, out = L.r.probe(in_netns(["conntrack", "-L", "-p", "udp", "--orig-dst", NODE_IP, "--dport", str(PORT)], NODE))
    L.check("the flow's new conntrack entry translates to pod-b (10.0.25.3)", "src=10.0.25.3 " in out)


LAB = pitfall.Lab(
    LESSON,
    works=f"the client's query to the hostPort {NODE_IP}:{PORT}/udp is answered by the backend the DNAT rule names",
    breaks=("the pod behind the hostPort moves: the DNAT rule is rewritten by hand from pod-a to pod-b (portmap "
            "and kube-proxy would also flush the port's UDP flows; a hand-written rule does not), while the client "
            "keeps sending from the same socket"),
    symptom="the client's queries still land on pod-a, whatever the rule says",
    reveals="conntrack -L on the node: the flow's entry still translates to pod-a's address",
    fixes="conntrack -D for the hostPort's flows: the next packet is a new flow and meets the new rule",
    cause="stale-conntrack",
    doctor=(CLIENT, NODE_IP, "--proto", "udp", "--port", str(PORT)),
    setup=setup, check=works, breakage=breakage, reveal=reveal, fix=fix, prove=prove,
)


if __name__ == "__main__":
    pitfall.main(LAB)
