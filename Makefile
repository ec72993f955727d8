# One-command setup on a fresh machine: `make demo` and `make test` create .venv, install the pinned
# dependencies, build the C++ extension, then run. Everything else is a helper target.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
DEPS   := $(VENV)/.deps-installed
BUILT  := $(VENV)/.package-installed
CSRC   := $(shell find csrc -type f 2>/dev/null) CMakeLists.txt setup.py
PYTEST_ARGS ?=

.PHONY: demo test test-fast bench build venv clean gpu-check gpu-carry

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q -U pip setuptools wheel

$(DEPS): requirements/base.txt requirements/test.txt | $(PY)
	$(PIP) install -r requirements/test.txt
	touch $@

# Editable install once (registers the package and the CLI); later C++ edits rebuild in place.
$(BUILT): $(DEPS) $(CSRC)
	flock .build.lock $(PIP) install --no-build-isolation --no-deps -e . \
	  || { echo "build failed: see the CMake output above"; exit 1; }
	flock .build.lock $(PY) setup.py -q build_ext --inplace
	touch $@

# System packages: headless Chromium renders the HTML report in tests/test_report.py (skipped without it).
SYSDEPS := $(VENV)/.sysdeps-installed
$(SYSDEPS): | $(PY)
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "note: could not install chromium; the browser test of the report will be skipped"; \
	else echo "note: chromium missing and no root apt-get; the browser test of the report will be skipped"; fi
	touch $@

venv: $(DEPS)
build: $(BUILT)

demo: $(BUILT)
	$(VENV)/bin/videocom-fast demo --overwrite

test: $(BUILT) $(SYSDEPS)
	$(PY) -m pytest tests $(PYTEST_ARGS)

test-fast: $(BUILT)
	$(PY) -m pytest tests -m "not slow" -x $(PYTEST_ARGS)

BENCH ?= bench
bench: $(BUILT)
	mkdir -p runs/bench
	$(PY) -m pytest $(BENCH) -o python_files="bench_*.py" --benchmark-only --benchmark-json=runs/bench/bench.json $(PYTEST_ARGS)
	$(PY) -m videocom_fast.benchtable runs/bench/bench.json

# GPU machines (README "GPU workflow"). gpu-carry runs HERE and fills .gpu-carry/ (ignored: carry it to the
# GPU machine as one path); gpu-check runs THERE with the machine's own Python/torch, no venv, no network:
# carried wheels -> CUDA build -> pytest -m gpu -> 7B-shaped rollout benchmark -> runs/gpu_check/gpu_check.json.
# Without a GPU, gpu-check prints its plan and exits 0.
GPU_PY ?= $(shell test -x /opt/torch/.venv/bin/python && echo /opt/torch/.venv/bin/python || command -v python3)

gpu-carry: $(BUILT)
	$(PY) bench/gpu_check.py --prepare-carry

gpu-check:
	$(GPU_PY) bench/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf build _skbuild *.egg-info videocom_fast/_C*.so $(BUILT)
