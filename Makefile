# Two commands do everything on a fresh machine:
#   make demo   - install, build a synthetic checkpoint, load it across 4 processes, print the report
#   make test   - install, run the whole test suite
#
# An already installed torch is kept. Without one, TORCH_SPEC is installed; override it for
# another build, e.g. make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
NPROC ?= 4
SIZE_MB ?= 256
PYTEST_ARGS ?= -n auto --dist loadgroup

.PHONY: install demo test lint bench bench-floor bench-memory bench-concurrency clean

install:
	@$(PYTHON) -c "import torch" 2>/dev/null \
		&& echo "using installed torch $$($(PYTHON) -c 'import torch; print(torch.__version__)')" \
		|| $(PYTHON) -m pip install $(TORCH_SPEC)
	$(PYTHON) -m pip install -q -e ".[test,dev]"

demo: install
	NPROC=$(NPROC) SIZE_MB=$(SIZE_MB) PYTHON=$(PYTHON) bash launch/demo.sh

test: install
	@bash .ci/install-slurm.sh || echo "(Slurm tests will be skipped)"
	$(PYTHON) -m pytest $(PYTEST_ARGS)

lint: install
	$(PYTHON) -m ruff check . && $(PYTHON) -m ruff format --check .

bench: install
	$(PYTHON) -m distload bench --size-mb 1500 --shard-mb 400 --scenarios tp4,dp4,2node --cache cold,warm --rounds 5 --methods load_file,get_slice,fastsafetensors,distload --results benchmarks/RESULTS.md

bench-floor: install
	$(PYTHON) -m distload bench --size-mb 1500 --shard-mb 400 --scenarios tp4 --cache warm,cold --rounds 7 --methods get_slice,floor,distload --results benchmarks/RESULTS-floor.md

bench-concurrency: install
	$(PYTHON) benchmarks/concurrency.py --rounds 7

bench-memory: install
	$(PYTHON) benchmarks/memory.py --size-mb 1500 --nproc 4

clean:
	rm -rf build *.egg-info .pytest_cache .ruff_cache benchmarks/out
