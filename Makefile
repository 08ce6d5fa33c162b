# Two commands do everything on a fresh Linux machine with Python 3.11:
#   make demo   create .venv, install, run the demo
#   make test   create/update .venv, run the whole test suite
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv test demo bench clean test-diffusers-range

venv: $(STAMP)

# torch==2.13.0 first: it is the CPU wheel; letting the resolver pick torch pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test]"
	@touch $(STAMP)

# pytest exit 5 (no test collected) counts as a failure.
# WORKERS: pytest-xdist processes (one torch thread each); WORKERS=0 runs in this process.
WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -n $(WORKERS) $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: no tests ran"; exit 1; fi; exit $$rc

demo: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) train.py fit --config configs/demo.yaml
	@echo
	@echo "packed model:     outputs/demo/quantized  (vq4dit.load_quantized)"
	@echo "TensorBoard logs: outputs/demo/tensorboard (tensorboard --logdir outputs/demo)"
	@echo "sample grids:     outputs/demo/tensorboard/version_*/samples (row 1 FP, row 2 quantized)"
	@echo "checkpoints:      outputs/demo/tensorboard/version_*/checkpoints"

bench: $(STAMP)
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) -m benchmarks.kmeans

# The backend tests with the oldest and newest diffusers of pyproject.toml's range, each in a
# throwaway venv that installs only that diffusers (and what it lacks) over this venv's packages
# (a .pth file): no torch download. Downloads from PyPI; not part of `make test`.
DIFFUSERS_RANGE ?= 0.39.0 0.42.1
test-diffusers-range: $(STAMP)
	@set -e; base=$$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"); \
	for v in $(DIFFUSERS_RANGE); do \
	  dir=$$(mktemp -d); trap 'rm -rf $$dir' EXIT; \
	  $(PY) -m venv $$dir; \
	  $$dir/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" | \
	    xargs -I{} sh -c "echo $$base > {}/vq4dit_base.pth"; \
	  $$dir/bin/python -m pip install --quiet "diffusers==$$v"; \
	  echo "== diffusers $$v"; \
	  PYTHONPATH=$$PWD OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $$dir/bin/python -m pytest -q -p no:cacheprovider \
	    tests/test_diffusers_backend.py tests/test_io_trust.py -k "not kill"; \
	  rm -rf $$dir; \
	done

clean:
	rm -rf $(VENV) runs outputs
