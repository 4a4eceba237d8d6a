# convobot — `make demo` and `make test` work on a fresh machine: they create .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast bench clean

# torch==2.13.0 goes in first and alone: with it installed, the pinned stack resolves without
# pip ever reaching for a (multi-GB) CUDA build of a newer torch.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[export,sweep,dev]"
	touch $(STAMP)

install: $(STAMP)

# Train the embedded default into a fixed run dir, merge and verify it into a release bundle (prints
# base vs merged perplexity), then stream one answer from the bundle. Offline; ~2 min on 2 cores.
DEMO_RUN := outputs/demo
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
demo: $(STAMP)
	rm -rf $(DEMO_RUN)
	$(OFFLINE) $(BIN)/convobot-train hydra.run.dir=$(DEMO_RUN)
	$(OFFLINE) $(BIN)/convobot-merge run_dir=$(DEMO_RUN) output_dir=$(DEMO_RUN)/release overwrite=true
	$(OFFLINE) $(BIN)/convobot-chat model=$(DEMO_RUN)/release prompt="How many words are in the input?" \
		input="apple bird cat" generation.temperature=0 generation.max_new_tokens=32

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

# Trained tokens/s of GPT-2 small: the reference setup vs convobot, side by side in one process
# (~8 min on 2 CPU cores; writes benchmarks/results/train_throughput_cpu_<date>.{md,json}).
bench: $(STAMP)
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf outputs multirun .pytest_cache
