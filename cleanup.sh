#!/usr/bin/env bash
# Remove what cnikit created on this host: its tagged namespaces, links and iptables
# rules (cnikit cleanup), and nothing else. Safe to run twice.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
python3 "$here/cnikit.py" cleanup "$@"
