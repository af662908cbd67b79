#!/bin/bash
# Device call 1 (see prepare.sh): unpack llama.cpp's tree and the GGUF's first part into /tmp/w, build
# llama.cpp with CUDA in a session of its own (it outlives the call), wait for it up to $WAIT s.
set -u
W=/tmp/w; D=$PWD/.dev/c1; mkdir -p $W
cp $D/gguf.a $W/ && tar -xJf $D/llamacpp-src.tar.xz -C $W && tar -xJf $D/llama_cpp_py.tar.xz -C $W || exit 1
nvidia-smi -L; nvcc --version | tail -1; nproc; python3 -V
export GEN=""; command -v ninja > /dev/null && GEN="-G Ninja"
cp $D/cmake_flags $W/
cat > $W/build.sh <<'EOF'
cd /tmp/w
mapfile -t flags < cmake_flags
cmake -S llama.cpp -B build $GEN "${flags[@]}" > cmake.log 2>&1 || { echo 1 > build.rc; exit; }
cmake --build build --target llama llama-server -j "$(nproc)" > build.log 2>&1
echo $? > build.rc
EOF
setsid bash $W/build.sh < /dev/null > /dev/null 2>&1 &
T0=$(date +%s)
for i in $(seq 1 ${WAIT:-480}); do
  [ -f $W/build.rc ] && break; sleep 1
  [ $((i % 30)) = 0 ] && echo "$i s: $(tail -c 300 $W/build.log 2>/dev/null | tr '\r' '\n' | grep . | tail -1 | cut -c1-150)"
done
echo "build rc: $(cat $W/build.rc 2>/dev/null || echo running) after $(( $(date +%s) - T0 )) s"
tail -3 $W/build.log 2>/dev/null; cp $W/cmake.log $W/build.log "$OUT/" 2>/dev/null; true
