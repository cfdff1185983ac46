# One entry point for users and CI: `make demo` and `make test` set everything up themselves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-gpu lint format bench clean

setup: $(STAMP)

# constraints.txt pins every package, torch 2.14.1 + torchvision 0.29.1 included, so a fresh machine
# installs the same set and never pulls an unpinned multi-GB torch build. The install takes about 6.4 GB (the CUDA
# build of torch and its nvidia libraries 4.4 GB); --no-cache-dir keeps pip from storing a second copy of what it
# downloads.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-cache-dir --upgrade pip
	$(BIN)/python -m pip install --quiet --no-cache-dir -c constraints.txt -e '.[dev]'
	touch $(STAMP)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Two workers, one a core on CI's 2-core machine (pytest-xdist). --dist loadfile runs each file's tests, a notebook's
# cells included, on one worker in their order, as a serial run does; PYTEST_WORKERS=0 runs them in this process.
# One intra-op thread in every process (workers, notebook kernels, the fits tests start): two threads in each of
# two workers oversubscribe the two cores (the suite took 19:43 so, 15:31 with one thread).
PYTEST_WORKERS ?= 2

test: lint
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile

# On a GPU machine: the gpu-marked tests on the compiled kernels (the kernels at full size against float64, the LRA
# encoder, the fused LM and CUDA-graph decoding); -rP prints every error each case measured.
test-gpu: setup
	HGRN2_TEST_GPU=1 $(BIN)/python -m pytest -m gpu -rP tests

# One thread: on 2 cores the demo's small matrices run faster without intra-op threading.
demo: setup
	OMP_NUM_THREADS=1 $(BIN)/hgrn2 fit --config configs/lm/demo.yaml
	OMP_NUM_THREADS=1 $(BIN)/hgrn2 generate --ckpt_path runs/lm_demo/checkpoints/last.ckpt \
		--prompt "def " --max_new_tokens 300 --temperature 0.7 --top_k 20

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
