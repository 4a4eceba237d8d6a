# convobot — `make demo` and `make test` work on a fresh machine: they create .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast test-ui lint docs pretrain bench bench-serve gpu-carry clean

# torch==2.13.0 goes in first and alone: with it installed, the pinned stack resolves without
# pip ever reaching for a (multi-GB) CUDA build of a newer torch.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[export,serve,track,sweep,eval,harness,dev]"
	touch $(STAMP)

install: $(STAMP)

# llama.cpp's binding builds from source (~6 min on 2 cores, once: pip caches the wheel); the GGUF tests need it,
# make demo does not.
GGUF_STAMP := $(VENV)/.installed-gguf
$(GGUF_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e ".[gguf]"
	touch $(GGUF_STAMP)

# Train the embedded default into a fixed run dir, merge and verify it into a release bundle (prints
# base vs merged perplexity), then stream one answer from the bundle. Offline; under a minute on 2 cores.
DEMO_RUN := outputs/demo
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
demo: $(STAMP)
	rm -rf $(DEMO_RUN)
	$(OFFLINE) $(BIN)/convobot train hydra.run.dir=$(DEMO_RUN)
	$(OFFLINE) $(BIN)/convobot merge run_dir=$(DEMO_RUN) output_dir=$(DEMO_RUN)/release overwrite=true
	$(OFFLINE) $(BIN)/convobot chat model=$(DEMO_RUN)/release prompt="How many words are in the input?" \
		input="apple bird cat" generation.temperature=0 generation.max_new_tokens=32

# A real browser for the web page's tests: Debian's chromium (apt-get, as root). Without it those tests skip.
BROWSER := /usr/bin/chromium
$(BROWSER):
	@if command -v apt-get > /dev/null; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq chromium > /dev/null || echo "chromium not installed: the browser tests will skip"; \
	else echo "no apt-get: the browser tests will skip"; fi

# Two workers, one per core, each computing on one thread: tests spend much of their time starting Python and
# importing torch, which one core does as fast as two.
PYTEST := OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2
test: $(STAMP) $(GGUF_STAMP) $(BROWSER)
	$(PYTEST)

# The web page in headless chromium; CONVOBOT_SCREENSHOTS=docs/images make test-ui refreshes the docs' screenshots.
test-ui: $(STAMP) $(BROWSER)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest tests/serving/test_ui.py

test-fast: $(STAMP) $(GGUF_STAMP)
	$(PYTEST) -m "not slow"

# pyflakes and import order over the code, tests and benchmarks (also a test).
lint: $(STAMP)
	$(BIN)/ruff check convobot tests benchmarks

# Copy benchmarks/results/*.md into the docs' results blocks (a test checks they match).
docs: $(STAMP)
	$(BIN)/python benchmarks/results_in_docs.py

# Rebuild the embedded default's pretrained base (convobot/assets/pretrained/, ~7 min on 2 CPU cores).
pretrain: $(STAMP)
	$(BIN)/python -m convobot.training.pretrain

# Trained tokens/s of GPT-2 small: the reference setup vs convobot, side by side in one process
# (~6.5 min on 2 CPU cores; writes benchmarks/results/train_throughput_cpu_<date>.{md,json}).
bench: $(STAMP)
	$(BIN)/python benchmarks/train_throughput.py

# Serving tokens/s and latency at GPT-2 small shape, 1 and 8 clients: convobot serve (each backend) against
# llama-cpp-python's own server on the same GGUF (~15 min on 2 CPU cores; writes
# benchmarks/results/serve_throughput_cpu_<date>.{md,json}).
bench-serve: $(GGUF_STAMP)
	$(BIN)/pip install --quiet -e ".[bench]"
	$(BIN)/python benchmarks/serve_throughput.py

# What benchmarks/gpu_check.sh needs on an offline GPU machine whose Python (3.12) has torch but not the rest of
# the stack: the pinned wheels and the ../shared inputs, in the git-ignored .gpu/.
GPU_CARRY := .gpu
GPU_PACKAGES := transformers|peft|trl|bitsandbytes|datasets|hydra-core|omegaconf|dill|multiprocess
MANYLINUX := $(foreach n,2_28 2_27 2_24 2_17,--platform manylinux_$(n)_x86_64) --platform manylinux2014_x86_64
gpu-carry: $(STAMP)
	rm -rf $(GPU_CARRY) && mkdir -p $(GPU_CARRY)/wheels $(GPU_CARRY)/shared/data
	$(BIN)/pip freeze | grep -iE '^($(GPU_PACKAGES))==' > $(GPU_CARRY)/requirements.txt
	$(BIN)/pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(MANYLINUX) --platform any -d $(GPU_CARRY)/wheels -r $(GPU_CARRY)/requirements.txt
	$(BIN)/pip wheel --quiet --no-deps -w $(GPU_CARRY)/wheels "antlr4-python3-runtime==4.9.3"  # sdist only
	cp -r ../shared/data/alpaca_gpt4 ../shared/data/gpt2-tokenizer $(GPU_CARRY)/shared/data/
	du -sh $(GPU_CARRY)

clean:
	rm -rf outputs multirun .pytest_cache
