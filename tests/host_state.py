#!/usr/bin/env python3
"""Print, as JSON, the network state the hygiene test compares: namespaces, links,
addresses, routes and iptables rules of the namespaces this runs in."""
import json
import shutil
import subprocess


def out(argv):
    return subprocess.run(argv, capture_output=True, text=True).stdout


def host_state():
    state = {
        "netns": sorted(out(["ip", "netns", "list"]).splitlines()),
        "links": sorted(link["ifname"] for link in json.loads(out(["ip", "-j", "link", "show"]) or "[]")),
        "addrs": out(["ip", "-br", "addr"]),
        "routes": out(["ip", "route", "show", "table", "all"]),
    }
    if shutil.which("iptables"):
        state["iptables"] = "".join(out(["iptables", "-t", t, "-S"]) for t in ("filter", "nat"))
    return state


if __name__ == "__main__":
    print(json.dumps(host_state(), indent=1, sort_keys=True))
