# Everything a fresh machine needs: `make demo` and `make test` install first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	rm -rf results/demo
	$(PY) -m xray_ray.search --data synthetic --space search_spaces/smoke.yaml --results results --name demo

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) bench/pipeline.py --quick

clean:
	rm -rf $(VENV) .pytest_cache
