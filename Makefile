# pgdr: `make demo` shows it working, `make test` proves it.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
UV_VERSION := 0.13.9

.PHONY: venv test demo lock bench clean

$(PY):
	python3 -m venv $(VENV)

$(VENV)/.installed: $(PY) requirements.lock pyproject.toml
	$(PY) -m pip install -q uv==$(UV_VERSION) || true
	if [ -x $(UV) ]; then \
	  $(UV) pip install -q --python $(PY) -r requirements.lock && \
	  $(UV) pip install -q --python $(PY) --no-deps -e . ; \
	else \
	  $(PY) -m pip install -q -r requirements.lock && $(PY) -m pip install -q --no-deps -e . ; \
	fi
	touch $@

venv: $(VENV)/.installed

test: venv
	bash scripts/ensure-postgres.sh
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q tests

demo: venv
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) scripts/demo.py

bench: venv
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) bench/bench.py $(BENCH_ARGS)

lock: $(PY)
	$(UV) pip install -q --python $(PY) -r requirements.txt
	{ echo "# Generated from requirements.txt with 'uv pip freeze' (make lock). Every package the tests run with."; \
	  $(UV) pip freeze --python $(PY) | grep -v -e '^-e' -e '^pgdr' -e '^uv=='; } > requirements.lock

clean:
	rm -rf $(VENV) .demo
