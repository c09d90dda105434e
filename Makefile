# Two entry points: `make book` and `make test`. Both create the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?=
export REGCLS_PROFILE := $(PROFILE)
# where make book builds: BOOK_OUT/_build (the tests build elsewhere, never into the working tree's _build)
BOOK_OUT ?= .

.PHONY: book test venv clean bench rehearsal mutate gpu-check

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[book,test]"
	touch $@

# GPUS=N first computes every trace on N GPUs of this node (torchrun; each trace shared among them), then the
# chapters read them from the trace cache.
# The execution cache is kept per profile (a smoke build never shows up in a paper build) and per library
# content (jupyter-cache re-runs a notebook only when its cells change; a fix in lib/regcls must reach the pages).
book: venv
	@if command -v nvidia-smi >/dev/null 2>&1 && [ "$(DOCTOR)" != 0 ]; then \
	  $(PY) -m regcls doctor || { echo "regcls doctor: the GPU path is not usable (above); fix it, or skip the check with make book DOCTOR=0"; exit 1; }; fi
	@prof=$$($(PY) -c "from regcls.profiles import active_profile; print(active_profile(verbose=False).name)"); \
	echo "building the book on the $$prof profile"; \
	if [ -n "$(GPUS)" ]; then REGCLS_PROFILE=$$prof $(VENV)/bin/torchrun --standalone --nproc-per-node $(GPUS) \
	  -m regcls cache --profile $$prof || exit 1; fi; \
	$(PY) -c "from regcls.cache import prepare_build; prepare_build('$(BOOK_OUT)/_build', '$$prof', always=['chapters/summary_claims.ipynb'])" && \
	REGCLS_RECORDS=$(abspath $(BOOK_OUT))/_build/records REGCLS_PROFILE=$$prof $(VENV)/bin/jupyter-book build . \
	  --path-output $(BOOK_OUT) --warningiserror --nitpick --keep-going

# The chapters run first: they record the smoke claims that tests/test_smoke_verdicts.py checks.
test: venv
	HF_HUB_OFFLINE=1 REGCLS_PROFILE=smoke $(PY) -m pytest --nbmake chapters tests

# The real run rehearsed offline: mock hub (full-size random weights), generated datasets, every chapter and
# the book on PROFILE (laptop by default; paper needs ~25 GB of disk). See tests/rehearsal.py.
rehearsal: venv
	$(PY) tests/rehearsal.py --profile $(or $(PROFILE),laptop) $(if $(LIMIT),--limit $(LIMIT)) $(REHEARSAL_ARGS)

# Mutation testing of metrics, probe, the trace's hooks and the image pipeline (not in CI; ~5 min). See tests/mutate.py.
mutate: venv
	$(PY) -m pip install -q -c constraints.txt -e ".[mutate]"
	$(PY) tests/mutate.py

bench: venv
	$(PY) -m regcls.bench

# On a GPU machine: doctor, the trace's exactness on the GPU, ViT-g at 518 px through the command line and the
# benchmark, within BUDGET seconds (default 420); gpu-check.json and a table at the end. Runs with the project's venv
# where there is one, else with the machine's own python3 (a GPU machine with its own torch: PYTHONPATH=lib).
GPU_PY := $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	PYTHONPATH=lib$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PY) -m regcls.gpucheck --budget $(or $(BUDGET),420) --json gpu-check.json

clean:
	rm -rf _build
