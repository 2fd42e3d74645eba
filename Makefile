# One-command set-up on a fresh Debian machine (root or sudo for the system packages).
#   make demo   set up, then run the main job on the embedded data (Table 6 at toy scale, ~10 min)
#   make test   set up, then run the whole test suite
SHELL := /bin/bash
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# ffcv compiles against OpenCV and libjpeg-turbo, pydensecrf2 (the crf extra) builds with g++; the test suite
# starts a real SLURM cluster.
SYS_PKGS := pkg-config g++ libopencv-dev libturbojpeg0-dev slurmctld slurmd slurm-client munge
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=
# pytest-xdist: one worker per core, at most 8; tests/conftest.py says which tests go together and why.
# PYTEST_PARALLEL= runs the suite in one process.
PYTEST_PARALLEL ?= -n auto --dist loadfile --no-loadscope-reorder

.PHONY: setup system-packages demo slurm-up slurm-down slurm-2node-up slurm-2node-down test test-fast lint bench clean gpu-check

setup: $(STAMP)

system-packages:
	@missing=$$(for p in $(SYS_PKGS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages: $$missing"; \
	  [ -e /usr/sbin/policy-rc.d ] || { printf '#!/bin/sh\nexit 101\n' | $(SUDO) tee /usr/sbin/policy-rc.d >/dev/null; $(SUDO) chmod 755 /usr/sbin/policy-rc.d; made=1; }; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; rc=$$?; \
	  [ "$${made:-0}" = 1 ] && $(SUDO) rm -f /usr/sbin/policy-rc.d; exit $$rc; \
	fi

# torch/torchvision first, on their own: pip then takes the wheels from the local disk.
$(STAMP): pyproject.toml | system-packages
	@[ -x $(VPY) ] || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(VPY) -m pip install -q -e '.[dev,crf]'
	@touch $(STAMP)

# make demo LAUNCHER=sbatch: the training runs as jobs on a running SLURM cluster (make slurm-up starts
# the single-node one the tests use).
LAUNCHER ?= local
demo: setup
	$(VPY) -m experiments.demo --launcher $(LAUNCHER)

slurm-up:
	$(SUDO) bash slurm/local/start.sh

slurm-down:
	$(SUDO) bash slurm/local/stop.sh

# Two nodes, n1 and n2, on this machine (its own config and ports; runs beside the single-node one).
# Clients: source /tmp/lkm-slurm-2node/env.sh
slurm-2node-up:
	$(SUDO) bash slurm/local/start_2node.sh

slurm-2node-down:
	$(SUDO) bash slurm/local/stop_2node.sh

test: setup
	$(VPY) -m ruff check .
	$(VPY) -m pytest $(PYTEST_PARALLEL) $(PYTEST_ARGS)

# The edit-test loop: everything but the slow tier (end-to-end runs, kills, the comparison) and the SLURM tier.
test-fast: setup
	$(VPY) -m ruff check .
	$(VPY) -m pytest $(PYTEST_PARALLEL) -m "not slow and not slurm" $(PYTEST_ARGS)

lint: setup
	$(VPY) -m ruff check .

bench: setup
	for b in benchmarks/*.py; do $(VPY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info

# Every CUDA path on a single-GPU machine, in a few minutes (exits 2 where there is no GPU).
gpu-check: setup
	$(VPY) -m experiments.gpu_check
