# The two commands of the README: `make serve` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BROWSER := $(VENV)/.browser
PIP := $(BIN)/python -m pip -qq
# Outside the CI machines (which hold a local CPU wheel), the CPU build comes from PyTorch's index.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PY_DIRS := $(wildcard src tests benchmarks)

.PHONY: serve test lint format clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	@if nvidia-smi -L >/dev/null 2>&1; then \
		echo "NVIDIA GPU found: installing the CUDA build of torch"; \
		$(PIP) install 'torch>=2.11'; \
	else \
		echo "no NVIDIA GPU: installing the CPU build of torch"; \
		$(PIP) install --no-index --no-deps torch==2.13.0 2>/dev/null \
			|| $(PIP) install torch==2.13.0 --index-url $(TORCH_CPU_INDEX) \
				--extra-index-url https://pypi.org/simple; \
	fi
	$(PIP) install -e '.[test]'
	touch $(STAMP)

# The admin UI's browser tests drive Debian's Chromium (Playwright never downloads one); only
# `make test` needs it, so `make serve` works where apt does not.
$(BROWSER): $(STAMP)
	command -v chromium >/dev/null || { S=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
		$$S apt-get update -qq && $$S env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }
	touch $(BROWSER)

serve: $(STAMP)
	$(BIN)/loraplex serve

lint: $(STAMP)
	$(BIN)/ruff check $(PY_DIRS)
	$(BIN)/ruff format --check $(PY_DIRS)
	$(BIN)/lint-imports

test: lint $(BROWSER)
	$(BIN)/python -m pytest

format: $(STAMP)
	$(BIN)/ruff format $(PY_DIRS)
	$(BIN)/ruff check --fix $(PY_DIRS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
