# `make demo` and `make test` work on a fresh machine with only Python: they build .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
WORKDIR ?= runs/demo

.PHONY: demo test install clean

$(BIN)/gptjax: setup.cfg pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/gptjax

demo: install
	$(BIN)/gptjax demo --workdir $(WORKDIR)

# The tests also load models in transformers (PyTorch on CPU) to check Hugging Face parity, run
# lm-evaluation-harness on local tasks, and compile the train steps for H100s and a TPU slice
# (the [targets] extra: JAX's CUDA plugin, ptxas, libdevice, cuDNN and libtpu, no GPU needed).
$(VENV)/.hf-installed: $(BIN)/gptjax setup.cfg
	$(BIN)/pip install --quiet 'torch==2.13.0' && $(BIN)/pip install --quiet -e '.[test,hf,eval,targets]'
	touch $@

# Two workers, one per core; each test file stays on one worker, so its module fixtures are built once.
# JAX on the CPU alone: the CUDA and TPU plugins installed for the compile tests are never opened.
test: install $(VENV)/.hf-installed
	JAX_PLATFORMS=cpu $(BIN)/python -m pytest -q -n 2 --dist loadfile tests

clean:
	rm -rf $(VENV) runs/demo .pytest_cache
