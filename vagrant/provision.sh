#!/bin/sh
# Provisioning for a cnikit lesson-06 node (vagrant/Vagrantfile runs it as root on
# node1 and node2): the system tools lesson 06 uses on a real host, from Debian's
# archive. Nothing from PyPI: cnikit.py runs on python3's standard library.
# Safe to run again (`vagrant provision`): installs only what is missing.
set -eu
name=${1:-$(hostname)}
addr=${2:-}
export DEBIAN_FRONTEND=noninteractive

# iproute2 (ip, bridge), iptables, iputils-ping, tcpdump (the encapsulation proof),
# python3 (cnikit.py and the lessons), make (`make stage-06`), procps (sysctl).
pkgs="iproute2 iptables iputils-ping tcpdump python3 make procps"
missing=""
for p in $pkgs; do
    dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "cnikit: $name: apt-get install$missing"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

echo "cnikit: $name ready: underlay ${addr:-?}, $(uname -r), $(python3 --version)"
