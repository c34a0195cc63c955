# pgdr: `make demo` shows it working, `make test` proves it.
SHELL := /bin/bash
VENV ?= .venv
# The system Python where there is one: the postgres user runs pgdr from this
# venv (archive_command, restore_command), and a Python under /root is out of its reach.
PYTHON ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || echo python3)
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
UV_VERSION := 0.13.9

.PHONY: venv test demo ui lock bench bench-wal bench-perf clean

$(PY):
	$(PYTHON) -m venv $(VENV) || { apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); }

# Bytecode is compiled at install (uv does not by default): every archive_command and restore_command
# call is a new interpreter, and where PYTHONDONTWRITEBYTECODE is set (or the server's user cannot write
# __pycache__) each would otherwise compile pgdr and its libraries again, 3x the start-up.
$(VENV)/.installed: $(PY) requirements.lock pyproject.toml
	$(PY) -m pip install -q uv==$(UV_VERSION) || true
	if [ -x $(UV) ]; then \
	  $(UV) pip install -q --compile-bytecode --python $(PY) -r requirements.lock && \
	  $(UV) pip install -q --python $(PY) --no-deps -e . ; \
	else \
	  $(PY) -m pip install -q -r requirements.lock && $(PY) -m pip install -q --no-deps -e . ; \
	fi
	touch $@

# pgdr's own modules, from this checkout (editable install): compiled anew whenever one changed.
$(VENV)/.compiled: $(VENV)/.installed $(wildcard plugins/pgdr/*.py plugins/pgdr/*/*.py)
	$(PY) -m compileall -q plugins/pgdr
	touch $@

# archive_command's compiled front (plugins/pgdr/fast.c), beside the pgdr it hands everything else to.
$(VENV)/bin/pgdr-fast: plugins/pgdr/fast.c $(VENV)/.installed
	command -v cc >/dev/null || apt-get install -y -qq gcc libc6-dev
	cc -O2 -Wall -Wextra -o $@ plugins/pgdr/fast.c

venv: $(VENV)/.installed $(VENV)/.compiled $(VENV)/bin/pgdr-fast

test: venv
	bash scripts/prepare-test-host.sh
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q tests

demo: venv
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) scripts/demo.py

ui: venv
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) scripts/ui.py

bench: venv
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) bench/bench.py $(BENCH_ARGS)

bench-wal: venv
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) bench/wal_bench.py $(BENCH_ARGS)

bench-perf: venv
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) bench/perf.py $(BENCH_ARGS)

lock: $(PY)
	$(UV) pip install -q --python $(PY) -r requirements.txt
	{ echo "# Generated from requirements.txt with 'uv pip freeze' (make lock). Every package the tests run with."; \
	  $(UV) pip freeze --python $(PY) | grep -v -e '^-e' -e '^pgdr' -e '^uv==' -e '^pip==' -e '^setuptools=='; } > requirements.lock

clean:
	rm -rf $(VENV) .demo
