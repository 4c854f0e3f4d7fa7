# `make demo` and `make test` work on a fresh machine with only Python: they build .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
WORKDIR ?= runs/demo

.PHONY: demo test test-newest install clean

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

# The newest JAX that setup.cfg allows needs Python 3.12, so the other end of the range gets a
# venv of its own: the newest 3.12 that pyenv holds, else python3.12 from PATH. No PyTorch,
# transformers or lm-evaluation-harness there; the tests that need them are not run on it.
PYTHON_NEWEST ?= $(shell p=$$(ls -d "$$(pyenv root 2>/dev/null)"/versions/3.12.*/bin/python3.12 2>/dev/null \
                                | sort -V | tail -n 1); echo $${p:-python3.12})
VENV_NEWEST := .venv-newest

$(VENV_NEWEST)/bin/gptjax: setup.cfg pyproject.toml
	test -d $(VENV_NEWEST) || $(PYTHON_NEWEST) -m venv $(VENV_NEWEST)
	$(VENV_NEWEST)/bin/pip install --quiet --upgrade pip
	$(VENV_NEWEST)/bin/pip install --quiet -e '.[test,targets]'
	touch $@

# On the newest JAX: what JAX changes most between releases (the GPU and TPU compiles, the
# attention kernels, sharding, checkpoints, what remat saves and the loss's memory plan) and one
# run from pretraining through fine-tuning to evaluation.
NEWEST_TESTS = $(addprefix tests/,test_compile.py test_mosaic_attention.py test_triton_attention.py \
                 test_attention.py test_sharding.py test_checkpoint.py test_model.py test_loss.py test_demo.py)

test-newest: $(VENV_NEWEST)/bin/gptjax
	JAX_PLATFORMS=cpu $(VENV_NEWEST)/bin/python -m pytest -q -n 2 --dist loadfile $(NEWEST_TESTS)

clean:
	rm -rf $(VENV) $(VENV_NEWEST) runs/demo .pytest_cache
