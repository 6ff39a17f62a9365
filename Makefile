# The two commands of the README. Each creates .venv if absent and installs the project into it first.
#   make demo   float vs int8 QAT over 3 MobileNet v2 widths -> results/demo/{results.csv,tradeoff.png}
#   make test   the test suite in 2 processes (pytest-xdist), all but the extra `full` variants (tests marked full)
#   make test-full  every test (CI runs make test, then the `full` ones)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_RUNS := outputs/demo/$(shell date +%Y%m%d-%H%M%S)
DEMO_OUT ?= results/demo

.PHONY: install demo test test-full test-rest lint bench clean

# constraints.txt pins every package of the dependency tree (reproducible installs; see its header).
# pip's own lines show what it collects and installs (a first install takes a few minutes); a second make skips it.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || { echo "creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV); }
	@echo "installing qat and its pinned dependencies into $(VENV) (constraints.txt; a few minutes the first time)"
	$(PY) -m pip install --progress-bar off --upgrade pip
	$(PY) -m pip install --progress-bar off -c constraints.txt -e '.[dev]'
	$(PY) -m qat.quant.cpu_kernel
	@touch $(STAMP)
	@echo "installed; next make runs skip this step until pyproject.toml or constraints.txt change"

install: $(STAMP)

# The wall time of the sweep and its report is printed at the end and kept in $(DEMO_OUT)/wall_time.txt.
demo: $(STAMP)
	@mkdir -p outputs/demo && date +%s > $(DEMO_RUNS).start
	$(PY) experiments/run.py --multirun experiment=demo quant=float,w8a8 model.width_mult=0.35,0.5,1.0 \
		hydra.sweep.dir=$(DEMO_RUNS)
	$(PY) experiments/report.py records=$(DEMO_RUNS) out=$(DEMO_OUT)
	@echo "make demo: $$(( $$(date +%s) - $$(cat $(DEMO_RUNS).start) )) s wall time (6 runs and the report)$${FBGEMM_ENABLE_INSTRUCTIONS:+, FBGEMM_ENABLE_INSTRUCTIONS=$$FBGEMM_ENABLE_INSTRUCTIONS}" \
		| tee $(DEMO_OUT)/wall_time.txt

# One worker per core, each with one OpenMP thread (two 2-thread workers on 2 cores oversubscribe and crawl);
# tests that measure with more threads set them explicitly.
PYTEST := OMP_NUM_THREADS=1 $(PY) -m pytest -n auto --durations=15

test: $(STAMP)
	$(PYTEST) -m "not full"

test-full: $(STAMP)
	$(PYTEST)

test-rest: $(STAMP)
	$(PYTEST) -m full

# Benchmarks print ratios measured in one run (never asserted); quick settings for a 2-core machine.
bench: $(STAMP)
	$(PY) scripts/bench/qat_overhead.py --resolution 64 --batch 32 --steps 15 --channels-last --aten
	$(PY) scripts/bench/calibration_cost.py --resolution 64 --batch 32 --batches 2 --repeats 3 --threads 1
	$(PY) scripts/bench/engines.py --repeats 15 --warmup 3
	$(PY) scripts/bench/ptq.py --widths 0.35

lint: $(STAMP)
	$(VENV)/bin/ruff check qat experiments scripts tests notebooks

clean:
	rm -rf outputs .pytest_cache
