# Everything a fresh machine needs: `make demo` and `make test` install first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint bench bench-gpu bench-quick clean

# uv installs and byte-compiles in parallel: on 2 cores about 90 s where pip took about 180 s (most of it the
# 5.5 GB CUDA build of torch). uv reads no pip configuration, so the index URLs pip is configured with (a local
# mirror, say) are passed on, and like pip it takes each package's best version from all of them.
PIP_SETTING = $(shell $(PYTHON) -m pip config list 2>/dev/null | sed -n "s/^[^.]*\.$(1)='\(.*\)'$$/\1/p")
UV_INDEXES = $(addprefix --index-url ,$(call PIP_SETTING,index-url)) \
	$(addprefix --extra-index-url ,$(call PIP_SETTING,extra-index-url))

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q uv
	$(PY) -m uv pip install --python $(PY) -q --compile-bytecode --index-strategy unsafe-best-match \
		$(UV_INDEXES) -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	rm -rf results/demo
	$(PY) -m xray_ray.search --data synthetic --space search_spaces/smoke.yaml --results results --name demo

# two pytest workers, each file's tests on one worker (module fixtures run once): the end-to-end tests
# wait on Ray and subprocesses much of the time, so two share the 2 cores well (three were slower);
# files in collection order, which tests/conftest.py sorts longest first (xdist's own reorder is by test count);
# unbuffered: if a test takes a worker down, the log still shows how far the run got
PYTEST_WORKERS ?= -n 2 --dist loadfile --no-loadscope-reorder
# and each worker's share of the cores for torch's OpenMP threads, in it and in what it starts: as wide as the
# machine, the two workers' teams spin-wait against each other (on 2 cores with one kept busy,
# tests/serve/test_adapt.py took 269 CPU-s and 230 s with 2 threads, 141 CPU-s and 150 s with 1)
OMP_NUM_THREADS ?= $(shell n=$$(( $$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2) / 2 )); echo $$(( n > 1 ? n : 1 )))
# the package byte-compiled first: an editable install leaves that to Python, which does not write it where
# PYTHONDONTWRITEBYTECODE is set (as on this development machine), so every process, each Ray worker among
# them, would compile the modules it imports again (0.13 s of CPU for a trial's imports, measured here)
test: install lint
	$(PY) -m compileall -q xray_ray
	OMP_NUM_THREADS=$(OMP_NUM_THREADS) PYTHONUNBUFFERED=1 $(PY) -m pytest -q $(PYTEST_WORKERS)

# the edit loop: everything but the end-to-end runs marked slow (under two minutes on 2 cores)
test-fast: install
	$(PY) -m pytest -q -m "not slow"

# ruff's lint rules (pyflakes, pycodestyle, isort, bugbear, pyupgrade, bandit) and its formatter, as configured
# in pyproject.toml; `ruff format .` and `ruff check --fix .` apply what they can
lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# the full benchmarks, one after another on a quiet machine (about 40 min on 2 cores); figures in bench/out/
bench: install
	$(PY) bench/prepare.py
	$(PY) bench/trial_throughput.py
	$(PY) bench/search_efficiency.py
	$(PY) bench/overhead_memory.py --image-size 128 --epochs 2 --num-samples 8
	$(PY) bench/scale.py

# on a machine with a CUDA card: its figures; copy bench/out/gpu.json to bench/measured/ for bench/scale.py
bench-gpu: install
	$(PY) bench/gpu.py

bench-quick: install
	for b in prepare trial_throughput search_efficiency overhead_memory scale eval_batch gpu; do $(PY) bench/$$b.py --quick || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache
