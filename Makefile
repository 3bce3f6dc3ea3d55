# make run   : set up .venv (first time) and run the main job: segment the bundled sample CT
# make test  : set up .venv (first time) and run the whole test suite (what CI runs)
# make test-fast : the suite without the tests marked slow, stopping at the first failure
# make bench : the benchmarks (ratios measured side by side)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup run demo test test-fast bench clean

$(STAMP): requirements.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	@touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/epdseg segment Resources/Sample/EPDPhantomCT.nrrd --output out/sample --overwrite

demo: $(STAMP)
	$(BIN)/epdseg demo --output out/demo --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -x -m "not slow"

bench: $(STAMP)
	$(BIN)/python Testing/benchmarks/bench_epd.py
	$(BIN)/python Testing/benchmarks/bench_training.py --device cpu --size 256 --batch 4
	$(BIN)/python Testing/benchmarks/bench_segment.py
	$(BIN)/python Testing/benchmarks/bench_phantom.py

clean:
	rm -rf $(VENV) out
