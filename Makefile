# A new user needs two commands: `make demo` and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# The CPU build of torch; an unpinned request would pull several GB of CUDA wheels.
TORCH_PIN ?= torch==2.13.0

.PHONY: install demo test lint bench clean

install: .installed
.installed: pyproject.toml
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e ".[test]"
	touch .installed

# Compile gpt_mini into 2 stages, check it trains as the eager model, then train it with torchrun.
demo: install
	$(PYTHON) -m ppcompile compile models/gpt.py:gpt_mini --stages 2 --microbatches 8 --schedule 1f1b -o build/demo
	$(PYTHON) -m ppcompile report build/demo
	$(PYTHON) -m ppcompile verify build/demo
	$(PYTHON) -m ppcompile run build/demo -- --steps 50 --lr 3e-3

test: install
	$(PYTHON) -m pytest

lint: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

# Every benchmark; each prints its ratios last. Timings are only compared within one run.
bench: install
	$(PYTHON) bench/compile_time.py
	$(PYTHON) bench/cost_accuracy.py
	$(PYTHON) bench/schedules.py
	$(PYTHON) bench/vs_pippy.py
	$(PYTHON) bench/vs_pippy.py --layers 10 --d 288 --heads 4 --vocab 24576
	$(PYTHON) bench/overhead.py
	$(PYTHON) bench/sends.py
	$(PYTHON) bench/inference.py
	$(PYTHON) bench/microbatches.py

clean:
	rm -rf build .installed .pytest_cache .ruff_cache *.egg-info
