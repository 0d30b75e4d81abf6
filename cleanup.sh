#!/usr/bin/env bash
# Remove what cnikit created on this host: its tagged namespaces, links, routes, iptables
# rules and chains, and its CNI attachments and installs (cnikit cleanup), and nothing
# else. Safe to run twice.
#   ./cleanup.sh              cnikit's namespaces, links and rules on this host
#   ./cleanup.sh --vagrant    also `vagrant destroy -f` lesson 06's two VMs (see the README)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

# --vagrant (or --destroy-vagrant): also destroy lesson 06's two VMs (vagrant/Vagrantfile)
# with `vagrant destroy -f`. Only with that explicit flag; without it, cleanup.sh only
# mentions that the VMs exist.
destroy_vagrant=0
args=()
for a in "$@"; do
    case "$a" in
        --vagrant|--destroy-vagrant) destroy_vagrant=1 ;;
        *) args+=("$a") ;;
    esac
done
vagrant_machines() { ls "$here"/vagrant/.vagrant/machines/*/*/id >/dev/null 2>&1; }
if [ "$destroy_vagrant" = 1 ]; then
    if ! command -v vagrant >/dev/null 2>&1; then
        echo "# cleanup: vagrant is not installed; no Vagrant VMs to destroy" >&2
    else
        # The VMs belong to whoever ran `make vagrant-up`: under sudo, act as that user.
        as_user=()
        if [ "$(id -u)" = 0 ] && [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ]; then
            as_user=(sudo -u "$SUDO_USER" --preserve-env=VAGRANT_DEFAULT_PROVIDER,VAGRANT_HOME)
        fi
        echo "VAGRANT_CWD=$here/vagrant vagrant destroy -f"
        ${as_user[@]+"${as_user[@]}"} env VAGRANT_CWD="$here/vagrant" VAGRANT_CHECKPOINT_DISABLE=1 \
            vagrant destroy -f
    fi
    if [ "$(id -u)" != 0 ]; then
        echo "# cleanup: not root, so only the VMs; run sudo ./cleanup.sh for what cnikit made on this host" >&2
        exit 0
    fi
elif vagrant_machines; then
    echo "# cleanup: lesson 06's Vagrant VMs may still exist; ./cleanup.sh --vagrant destroys them" >&2
fi

python3 "$here/cnikit.py" cleanup ${args[@]+"${args[@]}"}
