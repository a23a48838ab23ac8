# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean-demo chromium

# Create the venv, put torch 2.13.0 (the CPU build on this machine's disk) in first when no torch
# is importable, so that pip never resolves the torch requirement to a multi-GB CUDA wheel.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,bench]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fed-unimiss demo --workdir demo-run

test: $(STAMP) chromium
	$(VENV)/bin/ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The dashboard's browser tests drive Debian's chromium (Playwright never downloads a
# browser). Installed with apt where apt and root are available; elsewhere those tests skip and
# say why.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
	      || echo "chromium could not be installed: the dashboard's browser tests will skip"; \
	  else echo "no apt-get or not root: chromium not installed, the browser tests will skip"; fi; }
