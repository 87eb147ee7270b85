# Two commands on a fresh machine (Python 3.11+, network to PyPI):  make demo  |  make test
# Each bootstraps .venv itself. torch is installed FIRST and pinned here (a CPU build on CPU machines); the package
# itself only asks for a floor, so GPU users keep their CUDA build.
PY      ?= python3
VENV    ?= .venv
TORCH   ?= torch==2.13.0
BIN     := $(VENV)/bin
# Tests import the package from this checkout by path (as spawned DeepSpeed ranks and Ray workers do too), not
# through the editable install's finder. (The occasional non-finite eval logits of tests/integration/
# test_zero3_model.py, once blamed on the finder, were torch.empty memory left in the resampler's in_proj under
# zero.Init; fixed in models/resampler.py, test in tests/unit/models/test_resampler_layout.py.)
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test test-all test-fast venv clean prebuild-ds mutate

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

# DeepSpeed JIT-builds its shared-memory comm op on first CPU use (~60 s); build it once, up front.
prebuild-ds: venv
	DS_ACCELERATOR=cpu $(BIN)/python -c "from deepspeed.accelerator import get_accelerator as g; g().create_op_builder('ShareMemCommBuilder').load()" >/dev/null

demo: venv prebuild-ds
	$(BIN)/raytune-minicpmv demo --out demo_out

# make test: unit + integration tests (~15 min on 2 cores); make test-all (what CI runs) adds the `long` ones.
test: venv prebuild-ds
	$(BIN)/python -m pytest -m "not gpu and not long" $(PYTEST_ARGS)

test-all: venv prebuild-ds
	$(BIN)/python -m pytest -m "not gpu" $(PYTEST_ARGS)

test-fast: venv
	$(BIN)/python -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

# Mutation testing (docs/TESTING.md), not part of `make test`: CPU-heavy, minutes to hours. Configured in
# pyproject.toml [tool.mutmut]. One module: make mutate MUTANTS='raytune_minicpmv.models.loss.*'
MUTANTS ?=
MUTATE_JOBS ?= 2
DEV_STAMP := $(VENV)/.installed-dev

$(DEV_STAMP): $(STAMP)
	$(BIN)/pip install -q -e ".[test,dev]"
	touch $(DEV_STAMP)

mutate: $(DEV_STAMP)
	nice -n 10 $(BIN)/mutmut run --max-children $(MUTATE_JOBS) $(MUTANTS)
	$(BIN)/python tests/mutation_report.py --survivors

clean:
	rm -rf $(VENV) demo_out .pytest_cache mutants
