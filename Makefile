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

# The tests also load models in transformers (PyTorch on CPU) to check Hugging Face parity, and run
# lm-evaluation-harness on local tasks.
$(VENV)/.hf-installed: $(BIN)/gptjax
	$(BIN)/pip install --quiet 'torch==2.13.0' && $(BIN)/pip install --quiet -e '.[test,hf,eval]'
	touch $@

# Two workers, one per core; each test file stays on one worker, so its module fixtures are built once.
test: install $(VENV)/.hf-installed
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

clean:
	rm -rf $(VENV) runs/demo .pytest_cache
