# make run: install what is missing, then run the whole stack in the foreground.
# make test: install what is missing, then run the whole test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test bench bench-faults wheel deps deps-run apt-run apt-test clean

# Debian packages, as COMMAND:PACKAGE (installed when COMMAND is missing; apt-get needs root).
# Running needs only these (and python3-venv, checked by importing venv):
RUN_DEBS := mongrel2:mongrel2-core curl:curl
# The tests also need: the page's browser, throwaway PostgreSQL clusters, network namespaces and
# nftables (multi-host tests), containers with systemd, their Debian root and ssh (deployment test).
TEST_DEBS := chromium:chromium pg_ctlcluster:postgresql ip:iproute2 nft:nftables \
	systemd-nspawn:systemd-container mmdebstrap:mmdebstrap ssh:openssh-client

# Install the packages of $(1) whose command is missing.
need = missing=""; \
	for pair in $(1); do command -v $${pair%%:*} >/dev/null || missing="$$missing $${pair\#*:}"; done; \
	$(2) \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi

run: deps-run
	$(PY) -m jobz.stack

test: deps
	$(PY) -m pytest -q tests

# jobz side by side with Celery+Redis, RQ and the raw spawn limit, the front end under wrk,
# growth, the latency floor and scale (pools, many workers); writes bench/RESULTS.md (about 13 minutes).
bench: deps
	@$(call need,redis-server:redis-server wrk:wrk,)
	$(VENV)/bin/pip install -q -e '.[bench]'
	$(PY) bench/run.py --write

bench-faults: deps
	$(PY) bench/faults.py

# The wheel the Ansible roles install (pyzmq and PyYAML come from Debian on the hosts).
wheel: deps-run
	rm -rf dist && $(VENV)/bin/pip wheel -q --no-deps -w dist .

# What running needs: its Debian packages (python3-venv: when venv cannot be imported), a .venv with
# jobz (pyzmq, PyYAML). `make -n -B run` lists what it would install.
deps-run: apt-run $(VENV)/.installed-run

# What the tests, the benchmarks and the deployment (Ansible) need besides.
deps: deps-run apt-test $(VENV)/.installed

apt-run:
	@$(call need,$(RUN_DEBS),$(PYTHON) -c 'import ensurepip; import venv' 2>/dev/null || missing="$$missing python3-venv";)

apt-test:
	@$(call need,$(TEST_DEBS),)

$(VENV)/.installed-run: setup.py
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e .
	@touch $@

$(VENV)/.installed: setup.py $(VENV)/.installed-run
	$(VENV)/bin/pip install -q -e '.[test]'
	@touch $@

clean:
	rm -rf $(VENV) var build dist *.egg-info
