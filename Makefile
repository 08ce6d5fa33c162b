# Two commands do everything on a fresh Linux machine with Python 3.11:
#   make demo   create .venv, install, run the demo
#   make test   create/update .venv, run the whole test suite
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv test demo bench clean

venv: $(STAMP)

# torch==2.13.0 first: it is the CPU wheel; letting the resolver pick torch pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test]"
	@touch $(STAMP)

# pytest exit 5 (no test collected) counts as a failure.
test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
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

clean:
	rm -rf $(VENV) runs outputs
