#!/usr/bin/env python3
"""Print, as JSON, the network state the session-end hygiene check compares: namespaces, links,
addresses, routes and iptables rules of the namespaces this runs in."""
import json
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cnikit  # noqa: E402  (the paths CNI writes to, defined once)

CNI_PATHS = (os.path.dirname(cnikit.CNI_CONF_DIR), cnikit.CNI_PLUGIN_DIR, os.path.dirname(cnikit.CNI_DATA_DIR),
             os.path.dirname(cnikit.NODE_SUBNET_FILE))


def out(argv):
    return subprocess.run(argv, capture_output=True, text=True).stdout


def host_state():
    state = {
        "netns": sorted(out(["ip", "netns", "list"]).splitlines()),
        "links": sorted(link["ifname"] for link in json.loads(out(["ip", "-j", "link", "show"]) or "[]")),
        "addrs": out(["ip", "-br", "addr"]),
        "routes": out(["ip", "route", "show", "table", "all"]),
    }
    # What a CNI plugin or runtime writes: a test or lesson must leave these as they were.
    state["cni_files"] = sorted(os.path.join(d, f) for top in CNI_PATHS if os.path.isdir(top)
                                for d, _, files in os.walk(top) for f in files)
    state["cni_log"] = os.path.exists(cnikit.CNI_LOG)
    if shutil.which("iptables"):
        state["iptables"] = "".join(out(["iptables", "-t", t, "-S"]) for t in ("filter", "nat"))
    return state


if __name__ == "__main__":
    print(json.dumps(host_state(), indent=1, sort_keys=True))
