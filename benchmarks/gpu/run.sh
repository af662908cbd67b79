#!/bin/bash
# Device call 2 (see prepare.sh): the GGUF's second part, the wheels, the tokenizer cache; wait for call
# 1's build; then the burst, quantad on the llama.cpp engine with --device cuda beside llama-server.
# POLICIES, QUANTA and EXTRA (more `quantad bench` flags, e.g. --serve-arg=--quantum-tokens=4) vary it.
set -u
W=/tmp/w; D=$PWD/.dev/c2; G=$W/$(cat $D/gguf.name)
cat $W/gguf.a $D/gguf.b > $G && echo "$(cat $D/gguf.sha256)  $G" | sha256sum -c || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $D/whl/*.whl || exit 1
cp -r $W/llama_cpp /tmp/site/
mkdir -p /tmp/qc/models && tar -xJf $D/tok.tar.xz -C /tmp/qc/models
export PYTHONPATH=/tmp/site:$PWD QUANTAD_CACHE_DIR=/tmp/qc PYTHONUNBUFFERED=1
for i in $(seq 1 ${WAIT:-420}); do [ -f $W/build.rc ] && break; sleep 1; done
[ "$(cat $W/build.rc 2>/dev/null)" = 0 ] || { echo "llama.cpp build not done"; tail -30 $W/build.log; exit 1; }
export LLAMA_CPP_LIB_PATH=$W/build/bin PATH=$W/build/bin:$PATH
timeout ${BENCH_S:-420} python3 -m console.cli bench --workload uniform --uniform-tokens 128,128 --requests 32 \
  --rate 1000 --policies ${POLICIES:-rr,srpt} --quanta ${QUANTA:-100} --slots 16 --model $G \
  --serve-arg=--backend=llamacpp --serve-arg=--device=cuda --peer llama-server --no-progress ${EXTRA:-} \
  --out /tmp/burst 2>&1 | tail -60
cp /tmp/burst/results.json /tmp/burst/results.md "$OUT/" 2>/dev/null
tar -czf "$OUT/logs.tgz" -C /tmp/burst logs 2>/dev/null; true
