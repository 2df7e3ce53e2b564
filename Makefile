# Two set-up commands: `make demo` and `make test`. Each installs what it needs into .venv.
# torch is installed first and pinned by constraints.txt, so no package can swap in a CUDA build.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: demo test install bench clean

$(STAMP): requirements.txt requirements-dev.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check torch==2.13.0
	$(PIP) install -q --disable-pip-version-check -c constraints.txt -r requirements.txt -r requirements-dev.txt
	# The CLIP vocabulary file ships in open-clip-torch; its torchvision dependency has no CPU build here.
	$(PIP) install -q --disable-pip-version-check --no-deps open-clip-torch
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m library.demo

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 tests

bench: $(STAMP)
	$(PY) bench/bench_sd15_lora.py

clean:
	rm -rf .demo .pytest_cache
