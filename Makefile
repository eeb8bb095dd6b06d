# make run: install what is missing, then run the whole stack in the foreground.
# make test: install what is missing, then run the whole test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test bench bench-faults wheel deps deps-apt clean

run: deps
	$(PY) -m jobz.stack

test: deps
	@command -v chromium >/dev/null || { apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }   # the status page's browser test
	@ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || { apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql; }   # throwaway clusters for the journal tests
	$(PY) -m pytest -q tests

# jobz side by side with Celery+Redis, RQ and the raw spawn limit, the front end under wrk,
# growth, the latency floor and scale (pools, many workers); writes bench/RESULTS.md (about 13 minutes).
bench: deps
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v wrk >/dev/null || missing="$$missing wrk"; \
	if [ -n "$$missing" ]; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi
	$(VENV)/bin/pip install -q -e '.[bench]'
	$(PY) bench/run.py --write

bench-faults: deps
	$(PY) bench/faults.py

# The wheel the Ansible roles install (pyzmq and PyYAML come from Debian on the hosts).
wheel: deps
	rm -rf dist && $(VENV)/bin/pip wheel -q --no-deps -w dist .

deps: deps-apt $(VENV)/.installed

# Debian packages: checked every time, installed only when missing (apt-get needs root).
deps-apt:
	@missing=""; \
	command -v mongrel2 >/dev/null || missing="$$missing mongrel2-core"; \
	command -v curl >/dev/null || missing="$$missing curl"; \
	command -v ip >/dev/null || missing="$$missing iproute2"; \
	command -v nft >/dev/null || missing="$$missing nftables"; \
	command -v systemd-nspawn >/dev/null || missing="$$missing systemd-container"; \
	command -v mmdebstrap >/dev/null || missing="$$missing mmdebstrap"; \
	command -v ssh >/dev/null || missing="$$missing openssh-client"; \
	$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[test]'
	@touch $@

clean:
	rm -rf $(VENV) var build dist *.egg-info
