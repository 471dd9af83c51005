# The two set-up commands of the README: `make demo` and `make test`.
# Each installs what it needs: Debian packages (as root; else it says what to install) and a
# virtual environment in .venv with the package and its test tools.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test bench venv clean system-deps-demo system-deps-test

demo: system-deps-demo $(STAMP)
	$(PY) tools/demo.py

# The host suite, then the vcan suite inside a real Linux kernel with vcan0/vcan1
# (User-Mode Linux via tools/vcan-vm; directly on a host whose kernel already has them).
test: system-deps-test $(STAMP)
	$(PY) -m pytest tests
	tools/vcan-vm --host-if-possible -- env CAR_AGENT_IN_VCAN=1 $(PY) -m pytest -p no:cacheprovider tests/guest

# Not a test: measures what the agent costs (one table, and bench-results.json); never fails on speed.
bench: system-deps-test $(STAMP)
	$(PY) tools/bench.py

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[cloud,test]'
	@rm -f $(VENV)/.installed-* && touch $@

system-deps-demo:
	@tools/system-deps demo

system-deps-test:
	@tools/system-deps test

clean:
	rm -rf $(VENV) demo-run .pytest_cache .hypothesis .vm
