# cnikit: `sudo make demo` runs every lesson in a sandbox; `sudo make test` runs the tests.
# Both install what they need first (make deps). `make check` (no sudo) runs the tests that need no root.
PYTHON  ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
# What the lessons need (tcpdump, conntrack and nftables add proofs; lessons fall back without them;
# iperf3: lesson 08).
APT_PKGS := iproute2 iptables iputils-ping socat procps tcpdump conntrack nftables iperf3 python3 python3-venv
# What the tests add: the reference CNI plugins (a baseline), real runtimes (Docker: a real-Docker host
# profile), an image source, vagrant.
TEST_APT_PKGS := containernetworking-plugins podman containerd runc docker.io busybox-static vagrant
PY_TEST_PKGS := pytest pytest-subprocess pytest-xdist sh grpcio grpcio-tools setuptools wheel
# Tests mostly wait on the kernel, pings and runtimes: six at once on two cores (each in its own sandbox).
PYTEST_JOBS ?= 6
# The files whose tests take longest first, handed out one test at a time (--maxschedchunk 1) to
# whichever worker is free: their long tests start at once instead of ending the run on one worker.
SLOW_TESTS := tests/test_cni_kind_nodes.py tests/test_lesson_cost.py tests/test_dryrun_dash.py \
  tests/test_host_profiles.py tests/test_labs.py tests/test_plugin_reference.py tests/test_bench.py tests/test_stages.py
TEST_FILES = $(SLOW_TESTS) $(filter-out $(SLOW_TESTS),$(sort $(wildcard tests/test_*.py)))

.PHONY: deps apt-deps test check demo clean help
.DEFAULT_GOAL := help

help:
	@echo "sudo make demo   # every lesson, end to end, in a throwaway sandbox"
	@echo "sudo make test   # the test suite (root, real namespaces, sandboxed)"
	@echo "make check       # the tests that need no root (pure parts, plans, exact command lists), as you"
	@echo "make deps        # venv with the test packages + missing apt packages"
	@echo "make clean       # remove the venv and caches"

# Missing apt packages only; a fresh Debian machine has empty package lists, so update first.
apt-deps:
	@if command -v apt-get >/dev/null 2>&1; then \
	  missing=$$(for p in $(APT_PKGS) $(EXTRA_APT); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	  if [ -n "$$missing" ]; then \
	    echo "apt-get install --no-install-recommends $$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	  fi; \
	fi

$(VPY): | apt-deps
	$(PYTHON) -m venv $(VENV)

deps: $(VPY)
	@$(MAKE) --no-print-directory apt-deps EXTRA_APT="$(TEST_APT_PKGS)"
	$(VPY) -m pip install -q $(PY_TEST_PKGS)

# Prints how long set-up and the tests took (README quotes a fresh machine's numbers).
# compileall first: the tests start cnikit (`python3 -m cnikit`) and the lessons thousands of times,
# and each start then loads bytecode instead of compiling (even where PYTHONDONTWRITEBYTECODE is set);
# one collection then caches pytest's assert-rewritten test modules, which every worker would
# otherwise rewrite for itself (~4 s of CPU each).
test:
	@start=$$(date +%s); \
	$(MAKE) --no-print-directory deps || exit 1; \
	setup=$$(date +%s); \
	$(VPY) -m compileall -q cnikit.py stages tests >/dev/null; \
	PYTHONDONTWRITEBYTECODE= $(VPY) -m pytest --collect-only -q -p no:cacheprovider $(TEST_FILES) >/dev/null; \
	$(VPY) -m pytest $(TEST_FILES) -n $(PYTEST_JOBS) --maxschedchunk 1 --durations=10 --durations-by-file=10 $(PYTEST_ARGS); rc=$$?; \
	end=$$(date +%s); \
	echo "make test: set-up $$((setup - start)) s, tests $$((end - setup)) s, in all $$((end - start)) s"; \
	exit $$rc

# The no-root tier: the tests marked `noroot`, run as whoever runs make (no sudo, no apt).
# Only files that mention the mark are collected (a marked test always does), so the tier
# needs none of the root tier's packages; .venv gets PY_CHECK_PKGS if it lacks them.
PY_CHECK_PKGS := pytest pytest-subprocess sh
NOROOT_FILES = $(shell grep -l 'mark\.noroot' tests/test_*.py)
check:
	@if [ -x $(VPY) ] && ! $(VPY) -c 'import pytest, pytest_subprocess, sh' 2>/dev/null && [ ! -w $(VENV)/bin ]; then \
	  echo "make check: $(VENV) belongs to $$(stat -L -c %U $(VENV)) and lacks pytest, pytest-subprocess or sh: sudo make deps (or sudo rm -rf $(VENV)), then make check"; \
	  exit 2; fi
	@[ -x $(VPY) ] || $(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
	  echo "make check: $(PYTHON) -m venv failed: sudo apt-get install --no-install-recommends python3-venv, then make check"; exit 2; }
	@$(VPY) -c 'import pytest, pytest_subprocess, sh' 2>/dev/null || $(VPY) -m pip install -q $(PY_CHECK_PKGS)
	$(VPY) -m pytest -p no:cacheprovider -m noroot $(NOROOT_FILES) $(PYTEST_ARGS)

demo: apt-deps
	$(PYTHON) stages/demo.py $(ARGS)

# One lesson: `sudo make stage-03 ARGS="--step"` runs stages/03_*.py. Lesson 06 on a real
# host runs one node's half: ROLE=node1|node2 PEER=<other node's IP> [VERIFY=1] [UNDERLAY_DEV=eth1].
STAGE_ARGS = $(ARGS) $(if $(ROLE),--role $(ROLE)) $(if $(PEER),--peer $(PEER)) \
  $(if $(VERIFY),--verify) $(if $(UNDERLAY_DEV),--underlay-dev $(UNDERLAY_DEV))
stage-%:
	$(PYTHON) $(or $(firstword $(wildcard stages/$*_*.py)),$(error no lesson stages/$*_*.py)) $(STAGE_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache tests/__pycache__ __pycache__ *.egg-info build

# ---------------------------------------------------------------- lesson 06 on two real VMs
# Two Debian 12 VMs with their own kernels (vagrant/Vagrantfile), lesson 06's node steps
# on each over `vagrant ssh`, then the cross-node ping and the encapsulation proof.
# Run these as your user, not with sudo: Vagrant's VMs belong to whoever created them.
# See the README, "Lesson 06 on two real machines (Vagrant)". PROVIDER=virtualbox|libvirt picks the provider for vagrant-up.
VAGRANT  ?= vagrant
NODE1_IP ?= 192.168.56.11
NODE2_IP ?= 192.168.56.12
VAGRANT_RUN = VAGRANT_CWD=$(CURDIR)/vagrant VAGRANT_CHECKPOINT_DISABLE=1 \
  CNIKIT_NODE1_IP=$(NODE1_IP) CNIKIT_NODE2_IP=$(NODE2_IP) $(VAGRANT)
# Inside a VM the repository is /vagrant and the VM is the host: one node's half.
IN_VM = cd /vagrant && sudo make --no-print-directory stage-06

.PHONY: vagrant-up vagrant-stage-06 vagrant-down

vagrant-up:
	$(VAGRANT_RUN) up $(if $(PROVIDER),--provider=$(PROVIDER))

vagrant-stage-06:
	$(VAGRANT_RUN) rsync
	$(VAGRANT_RUN) ssh node1 -c '$(IN_VM) ROLE=node1 PEER=$(NODE2_IP)'
	$(VAGRANT_RUN) ssh node2 -c '$(IN_VM) ROLE=node2 PEER=$(NODE1_IP)'
	@if $(VAGRANT_RUN) ssh node1 -c '$(IN_VM) ROLE=node1 PEER=$(NODE2_IP) VERIFY=1'; \
	then echo "PASS: lesson 06 across two VMs: node1's pod reached node2's pod over VXLAN ($(NODE1_IP) <-> $(NODE2_IP))"; \
	else echo "FAIL: lesson 06 across two VMs: see the output above"; exit 1; fi

vagrant-down:
	$(VAGRANT_RUN) destroy -f

# ---------------------------------------------------------------- lesson 07 in kind
# A kind cluster without CNI (kind.yaml), our plugin installed into every node, and gone.
# Needs kind, docker and kubectl; see the README, "In kind, step by step". KIND_NODE=derived builds kind/Dockerfile
# (kindest/node + python3) first; by default kind-cni installs python3-minimal in each node.
KIND_CLUSTER ?= cnikit
KIND_NODE    ?= stock
KIND_IMAGE_DERIVED := cnikit/kind-node:latest

.PHONY: kind-up kind-cni kind-down

kind-up:
ifeq ($(KIND_NODE),derived)
	docker build -t $(KIND_IMAGE_DERIVED) kind/
	kind create cluster --name $(KIND_CLUSTER) --config kind.yaml --image $(KIND_IMAGE_DERIVED)
else
	kind create cluster --name $(KIND_CLUSTER) --config kind.yaml
endif

kind-cni:
	$(PYTHON) cnikit.py cni kind-install $(KIND_CLUSTER)

kind-down:
	kind delete cluster --name $(KIND_CLUSTER)
