#!/bin/bash
# Run here, from the repository root, before a lease of the `device` tool's GPU machine: fills the
# ignored folders .dev/c1 and .dev/c2, one for each of two device calls (64 MiB travel per call, and
# the default GGUF alone is 98 MB, so it goes in two parts).  Then, on the device:
#   run(carry=[".dev/c1"], command="bash benchmarks/gpu/build.sh")   # llama.cpp with CUDA, ~5 min
#   run(carry=[".dev/c2"], command="bash benchmarks/gpu/run.sh")     # within 30 s of the first
# The device image has Python 3.12, torch and most of our dependencies, no registry: the wheels it
# lacks travel in .dev/c2/whl.  Needs `make install` first (the GGUF and the tokenizer cache).
set -euo pipefail
D=.dev; PY=.venv/bin/python; CUDA_ARCH=${CUDA_ARCH:-90}
grep -qx "/.dev/" .git/info/exclude 2>/dev/null || echo "/.dev/" >> .git/info/exclude
rm -rf $D/c1 $D/c2 && mkdir -p $D/c1 $D/c2/whl
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
make -s llama-cpp-sdist DEST="$tmp/sdist.tar.gz"
tar -xzf "$tmp/sdist.tar.gz" -C "$tmp"; src=$(echo "$tmp"/llama_cpp_python-*)
# llama.cpp's tree less what a CUDA build of `llama` and `llama-server` never reads
skip=(models docs media gguf-py benches tests conversion examples pocs .github)
for b in cann et hexagon hip metal musa opencl openvino sycl virtgpu vulkan webgpu zdnn zendnn; do skip+=("ggml/src/ggml-$b"); done
tar -C "$src/vendor" $(printf -- "--exclude=llama.cpp/%s " "${skip[@]}") -cJf $D/c1/llamacpp-src.tar.xz llama.cpp
tar -C "$src" -cJf $D/c1/llama_cpp_py.tar.xz llama_cpp
make -s print-llamacpp-cmake LLAMACPP_CUDA="$CUDA_ARCH" | tr " " "\n" | grep . > $D/c1/cmake_flags
gguf=$($PY -m backends.model_store --gguf smollm2 | tail -1)
head -c 54000000 "$gguf" > $D/c1/gguf.a; tail -c +54000001 "$gguf" > $D/c2/gguf.b
sha256sum "$gguf" | cut -d' ' -f1 > $D/c2/gguf.sha256; basename "$gguf" > $D/c2/gguf.name
tok=$($PY -c "import sys; from pathlib import Path; from backends.llamacpp_engine import load_tokenizer
from backends.model_store import cache_root; load_tokenizer(Path(sys.argv[1])); print(cache_root())" "$gguf")
tar -C "$tok" -cJf $D/c2/tok.tar.xz "$(basename "$gguf" .gguf).tokenizer"
# the wheels the image lacks, at the versions this venv runs
names="pyzmq llguidance jsonschema jsonschema-specifications referencing rpds-py openai jiter distro pydantic
  pydantic_core annotated-types typing-inspection sniffio diskcache httpx2 httpcore2 truststore typing_extensions"
pins=$($PY -m pip list --format=freeze 2>/dev/null | grep -iE "^($(echo $names | tr ' ' '|' | sed 's/[-_]/[-_]/g'))==")
plat=(); for m in 2_17 2_24 2_26 2_27 2_28 2_31 2_34 2_35; do plat+=(--platform "manylinux_${m}_x86_64"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${plat[@]}" --platform manylinux2014_x86_64 -d $D/c2/whl $pins
du -sh $D/c1 $D/c2
