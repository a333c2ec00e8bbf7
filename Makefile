# sftlab — `make test` and `make demo` do all set-up themselves on a fresh machine.
# torch is pinned to the CPU wheel that lies on our machines' disk; pyproject.toml keeps a range for users.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
TORCH  := torch==2.13.0
FIXTURES := .cache/fixtures/.stamp

.PHONY: test demo bench fixtures chromium clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check $(TORCH)
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	@$(PY) -c "import torch, transformers, sftlab; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	@touch $(STAMP)

$(FIXTURES): scripts/fetch_fixtures.sh
	@PYTHON=$(PY) bash scripts/fetch_fixtures.sh
	@touch $(FIXTURES)

fixtures: $(FIXTURES)

# Headless Chromium for tests/test_report.py (Debian's package, installed when missing and apt-get runs as root).
chromium:
	@bash scripts/install_chromium.sh

# Lint first (ruff's rules are in pyproject.toml; any finding fails the target), then the suite.
test: $(STAMP) $(FIXTURES) chromium
	$(PY) -m ruff check src tests benchmarks examples scripts
	$(PY) -m pytest -q

# `make demo` on a fresh clone sets up only what it uses: sftlab with the gguf reader (not the test extras:
# trackers, TRL, peft, ...) and, of the fixtures, only the GGUF model. After `make test` both are already there.
# --no-compile: pip would byte-compile every module of every package (torch alone: ~35 of its ~55 s on a
# loaded 2-core machine); demo.sh lets Python compile just the modules the demo imports, once, on first use.
DEMO_STAMP := $(VENV)/.demo-stamp
GGUF_FIXTURE := .cache/fixtures/gguf/.stamp

$(DEMO_STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@test -f $(STAMP) -a $(STAMP) -nt pyproject.toml || $(PY) -m pip install -q --disable-pip-version-check --no-compile $(TORCH) -e '.[gguf]'
	@touch $(DEMO_STAMP)

$(GGUF_FIXTURE): scripts/fetch_fixtures.sh | $(DEMO_STAMP)
	@PYTHON=$(PY) bash scripts/fetch_fixtures.sh gguf
	@touch $(GGUF_FIXTURE)

demo: $(DEMO_STAMP) $(GGUF_FIXTURE)
	@bash examples/demo.sh

# TRL, datasets and PEFT for the side-by-side benchmark, in the same venv; torch named again so that pip keeps
# the pinned CPU wheel instead of pulling a CUDA one.
BENCH_STAMP := $(VENV)/.bench-stamp
$(BENCH_STAMP): $(STAMP) pyproject.toml
	@$(PY) -m pip install -q --disable-pip-version-check $(TORCH) -e '.[bench]'
	@$(PY) -c "import torch, trl; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	@touch $(BENCH_STAMP)

bench: $(STAMP) $(FIXTURES) $(BENCH_STAMP)
	$(PY) benchmarks/bench_encode.py
	$(PY) benchmarks/bench_fail_fast.py
	$(PY) benchmarks/bench_vs_trl.py
	$(PY) benchmarks/bench_memory.py

clean:
	rm -rf $(VENV) .cache .pytest_cache .hypothesis
