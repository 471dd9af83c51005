# The two set-up commands of the README: `make demo` and `make test`.
# Each installs what it needs: Debian packages (as root; else it says what to install) and a
# virtual environment in .venv with the package and its test tools.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test venv clean system-deps-demo system-deps-test

demo: system-deps-demo $(STAMP)
	$(PY) tools/demo.py

test: system-deps-test $(STAMP)
	$(PY) -m pytest tests

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@rm -f $(VENV)/.installed-* && touch $@

system-deps-demo:
	@tools/system-deps demo

system-deps-test:
	@tools/system-deps test

clean:
	rm -rf $(VENV) demo-run .pytest_cache .hypothesis .vm
