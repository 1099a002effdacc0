# Two commands do all set-up: `make demo` and `make test` (each creates .venv on first use).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test example lint

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel first; the constraint keeps every later install on it (no CUDA build pulled in).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/stadi-bench

# PIPELINE=flux for Flux.1; pixart-sigma for PixArt-Σ.
PIPELINE ?= pixart-alpha
example: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --nproc_per_node 2 --master_addr 127.0.0.1 --master_port 29531 \
		scripts/stadi_example.py --pipeline $(PIPELINE) --model tiny --use_stadi --height 256 --width 256 \
		--num_inference_steps 8 --warmup_steps 2 --stadi_emulate_slowdown 1,2

# Two pytest workers: most tests start launchers and ranks, and a launch spends much of its time on one
# core (imports, timeouts), so two overlap on a 2-core machine. A third gained nothing measurable in CI (the
# suite is CPU-bound) and made timing-sensitive tests flaky. `pytest tests/FILE.py` alone runs in one.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist worksteal --durations=10

lint: $(STAMP)
	$(VENV)/bin/ruff check stadi_xdit tests scripts
