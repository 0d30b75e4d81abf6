#!/usr/bin/env python3
"""Lesson 04: real TCP between two namespaces: a listener in ns1, a client in ns2.

    sudo python3 stages/04_tcp.py              # in a throwaway sandbox
    sudo python3 stages/04_tcp.py --step       # ... and your turn: type into the connection yourself
    sudo python3 stages/04_tcp.py --keep ns2   # ... or from a shell in ns2, the listener still up
    python3 stages/04_tcp.py --dry-run         # the lesson as a shell script
"""
from lesson import Lesson, cnikit, in_netns, read_until

BRIDGE, GATEWAY = "br0", "10.0.4.1/24"
SERVER, CLIENT = "ns1", "ns2"
PODS = {SERVER: "10.0.4.2/24", CLIENT: "10.0.4.3/24"}
SERVER_IP, CLIENT_IP = (PODS[ns].split("/")[0] for ns in (SERVER, CLIENT))
PORT = 7000
PAYLOAD = "hello from ns2 over TCP"

LESSON = Lesson(
    "04", "tcp",
    goal=f"a client in ns2 connects to a listener in ns1 (port {PORT}); a payload goes "
         "out and comes back intact, and each namespace shows its end of the established connection",
    picture=r"""
   +------------------------------- host --------------------------------+
   |                          br0  10.0.4.1/24                            |
   |                 veth-ns1 /                \ veth-ns2                 |
   +-------------------------|------------------|-------------------------+
   +----------- ns1 ----------+                +----------- ns2 ----------+
   |  eth0  10.0.4.2/24       |                |  eth0  10.0.4.3/24       |
   |  socat LISTEN :7000      |<== TCP =======>|  socat client            |
   |  (echoes what it gets)   |                |  sends a line, reads it  |
   +--------------------------+                +--------------------------+
""",
    skips={"listen": f"nothing listens on {SERVER_IP}:{PORT}: ns1's kernel answers the SYN "
                     "with a RST (connection refused)"},
    tools=("ip", "ping", "socat", "ss"),
)


def build(L):
    r = L.r
    L.step("the bridge and two namespaces of lesson 03, in one go")
    for ns in PODS:
        cnikit.netns_add(r, ns, lo_up=True)
    cnikit.bridge_add(r, BRIDGE, addr=GATEWAY)
    for ns, cidr in PODS.items():
        cnikit.veth_add(r, f"veth-{ns}", "eth0", netns=ns, peer_addr=cidr)
    cnikit.bridge_attach(r, BRIDGE, [f"veth-{ns}" for ns in PODS])

    if L.step(f"a TCP listener in ns1 on port {PORT}; PIPE makes socat send back what it receives",
              skip="listen"):
        r.spawn(in_netns(["socat", f"TCP-LISTEN:{PORT},bind={SERVER_IP},reuseaddr,fork", "PIPE"], SERVER))
        L.wait_listening(PORT, SERVER)
        # The original demo's live moment: the learner is the client (telnet works too).
        L.your_turn(in_netns(["socat", "-", f"TCP:{SERVER_IP}:{PORT}"], CLIENT),
                    f"you are the client: type a line and it comes back (telnet {SERVER_IP} {PORT} works too)")


def verify(L):
    r = L.r
    L.say("the client in ns2 connects and stays connected while we look at both ends")
    client = r.spawn(in_netns(["socat", "-", f"TCP:{SERVER_IP}:{PORT},connect-timeout=2"], CLIENT),
                     stdin=True)
    echoed = _send_line(client, PAYLOAD)
    if r.dry_run:   # a script's background job reads /dev/null: the lesson types the payload itself
        r.note(f"the lesson types {PAYLOAD!r} into that client; by hand, in a second shell: "
               f"echo {PAYLOAD} | ip netns exec {CLIENT} socat - TCP:{SERVER_IP}:{PORT}")
    if client is not None:
        L.say(f"sent {PAYLOAD!r}, got back " + (repr(echoed) if echoed is not None else
                                                 "nothing: the connection failed (see below)"))
    L.check("the payload came back unchanged", echoed == PAYLOAD, f"got {echoed!r}")

    # While the connection is open each kernel shows its own end of it, mirrored.
    _, server_side = r.probe(in_netns(["ss", "-tn"], SERVER))
    _, client_side = r.probe(in_netns(["ss", "-tn"], CLIENT))
    L.check(f"ns1 has an ESTAB socket {SERVER_IP}:{PORT} <- {CLIENT_IP}",
            _established(server_side, f"{SERVER_IP}:{PORT}", f"{CLIENT_IP}:"))
    L.check(f"ns2 has an ESTAB socket {CLIENT_IP} -> {SERVER_IP}:{PORT}",
            _established(client_side, f"{CLIENT_IP}:", f"{SERVER_IP}:{PORT}"))
    _, err = r.stop(client)
    if echoed != PAYLOAD and err.strip():
        L.say("the client said: " + err.strip().splitlines()[-1])


def _send_line(client, line):
    """Write LINE to the client's stdin and read one line back (None if nothing came)."""
    if client is None:
        return None
    try:
        client.stdin.write(line + "\n")
        client.stdin.flush()
    except BrokenPipeError:
        return None
    got = read_until(client, ".")
    return got[-1] if got else None


def _established(ss_output, local, peer):
    """An ESTAB line whose local address starts with LOCAL and peer with PEER."""
    for row in ss_output.splitlines():
        words = row.split()
        if len(words) >= 5 and words[0] == "ESTAB" and words[3].startswith(local) \
                and words[4].startswith(peer):
            return True
    return False


if __name__ == "__main__":
    LESSON.main(build, verify)
