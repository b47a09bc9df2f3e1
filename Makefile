# Set up and run memlm on a fresh machine. `make train` runs the main job, `make test` the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
# On a machine without an NVIDIA GPU take the CPU build of torch that pip finds locally,
# instead of letting `torch>=2.6` pull a multi-GB CUDA build.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.6" || echo "torch==2.13.0")
# The CPU build of torch brings no Triton; the tests run the kNN search's Triton kernels under
# Triton's interpreter when it is there. (A CUDA build brings the Triton it was built with.)
TRITON_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 || echo "triton>=3.5")

.PHONY: setup train test mutate clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,serve,hf,tok,data,eval]" $(if $(TRITON_SPEC),"$(TRITON_SPEC)")	\
		|| { echo "make setup: the serve/hf/tok/data/eval extras did not install; their tests will be skipped" >&2; \
		     $(PY) -m pip install -q -e ".[dev]" $(if $(TRITON_SPEC),"$(TRITON_SPEC)"); }
	touch $@

train: setup
	$(VENV)/bin/memlm train $(ARGS)

test: setup
	$(PY) -m pytest -q -n 2 $(ARGS)

# Mutation testing of one module against its own tests (scripts/mutate.py; not part of CI):
# make mutate MODULE=memlm.nn.positions
mutate: setup
	$(PY) -m pip install -q -e ".[dev,mutate]"
	$(PY) scripts/mutate.py $(MODULE) $(ARGS)

clean:
	rm -rf $(VENV) runs .mutate
