# Two commands do all the set-up: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo lint format venv clean

# torch==2.13.0 first: it is the CPU wheel on this machine's disk; an open range could pull a CUDA build.
$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,train]"
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: lint
	$(PY) -m pytest -q tests

# Train on the bundled digits (offline; about 5 minutes on 2 CPU cores), then write the pipeline, sample grids at
# 10 and 50 DDIM steps, their scores and the model card to demo_output/. One torch thread: the UNet is small, and on
# a busy CPU extra threads spin-wait for each other and can make training many times slower. A second `make demo`
# replaces the first run's demo_output/ (the trainer refuses another run's folder without --overwrite_output_dir).
demo: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) training/train.py --output_dir demo_output --overwrite_output_dir

clean:
	rm -rf $(VENV) demo_output
