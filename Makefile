# Two commands do all the set-up: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Two stamps: `make demo` needs only the trainer's extra; `make test` adds what the suite imports.
BASE_STAMP := $(VENV)/.installed-base
TRAIN_STAMP := $(VENV)/.installed-train
STAMP := $(VENV)/.installed

.PHONY: test test-min demo lint format venv clean

# torch==2.13.0 first: it is the CPU wheel on this machine's disk; an open range could pull a CUDA build.
# --no-compile: byte-compiling every installed module is about half of the demo's set-up (torch alone: 44 s instead of
# 14 s), and the demo imports a fraction of them. The test suite starts many Python processes, so its stamp compiles
# everything once, on every core (a few third-party files are templates, not Python, and fail; pip skips them too).
$(BASE_STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile torch==2.13.0
	touch $@

$(TRAIN_STAMP): $(BASE_STAMP)
	$(PY) -m pip install -q --no-compile -e ".[train]"
	touch $@

$(STAMP): $(BASE_STAMP)
	$(PY) -m pip install -q --no-compile -e ".[test,train]"
	$(PY) -m compileall -q -j 0 $$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") > /dev/null || true
	touch $@

venv: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: lint
	$(PY) -m pytest -q tests

# The suite against the declared floors: a second venv with exactly the `>=` versions named for these
# packages in pyproject.toml (torch as pinned above), so a floor that is not real fails here instead of on a user's
# machine.
VENV_MIN := .venv-min
MIN_PACKAGES := diffusers|huggingface_hub|accelerate|datasets|transformers
$(VENV_MIN)/.installed: pyproject.toml setup.py
	test -x $(VENV_MIN)/bin/python || $(PYTHON) -m venv $(VENV_MIN)
	$(VENV_MIN)/bin/python -m pip install -q --upgrade pip
	$(VENV_MIN)/bin/python -m pip install -q torch==2.13.0
	grep -oE '"($(MIN_PACKAGES))>=[0-9.]+' pyproject.toml | tr -d '"' | sed 's/>=/==/' | sort -u > $(VENV_MIN)/floors.txt
	test $$(cut -d= -f1 $(VENV_MIN)/floors.txt | sort -u | wc -l) -eq 5  # each package once, with one floor
	$(VENV_MIN)/bin/python -m pip install -q -c $(VENV_MIN)/floors.txt -e ".[test,train]"
	touch $@

test-min: $(VENV_MIN)/.installed
	$(VENV_MIN)/bin/python -m pip list 2>/dev/null | grep -iE '^($(subst _,[-_],$(MIN_PACKAGES))) '
	$(VENV_MIN)/bin/python -m pytest -q tests

# Train on the bundled digits (offline; about 5 1/2 minutes of training on an idle 2-core CPU), then write the pipeline, sample grids at
# 10 and 50 DDIM steps, their scores and the model card to demo_output/. One torch thread: the UNet is small, and on
# a busy CPU extra threads spin-wait for each other and can make training many times slower. A second `make demo`
# replaces the first run's demo_output/ (the trainer refuses another run's folder without --overwrite_output_dir).
# Progress grids every 25 epochs instead of 10: about 2 s each, and they do not touch the training's random streams.
demo: $(TRAIN_STAMP)
	OMP_NUM_THREADS=1 $(PY) training/train.py --output_dir demo_output --overwrite_output_dir --save_images_epochs 25

clean:
	rm -rf $(VENV) $(VENV_MIN) demo_output
