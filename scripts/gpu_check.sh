#!/usr/bin/env bash
# Every GPU check and benchmark, on the GPU machine (x86-64, CUDA 13 driver, PyTorch; no Rust, no
# network), from the executables scripts/stage.sh put in stage/. About eight minutes in all.
#
#   scripts/gpu_check.sh [LOGDIR]      (default ./gpu-logs; one log per step, summary last)
#
# GPU_CHECK_SKIP="step names" skips steps (e.g. "gpu_compare test-cuda_model").
# Steps, each under its own timeout and all within $BUDGET seconds (default 540), in this
# order: caft-fast doctor; cuda_parity with --include-ignored; the cuda_ops kernel bench;
# scripts/gpu_compare.sh (LoRA training step against PyTorch + PEFT); full fine-tuning of a
# Gemma-2-2B shape against PyTorch + transformers (full_pytorch, full_caft: tokens/s, memory
# and MFU against $PEAK_TFLOPS, by default the GPU's dense bf16 peak when it is known);
# the other staged test executables
# with --include-ignored (the SmolLM2 GGUF at .cache/smollm2 is used when present; their
# on_the_emulated_gpu re-runs are skipped, CI runs those); scripts/gpu_generate.sh (generation
# against transformers); with several GPUs, train --gpus all against one GPU (dp_one, dp_all).
set -u
cd "$(dirname "$0")/.."
LOG=${1:-gpu-logs}
mkdir -p "$LOG"
STAGE=${STAGE:-stage}

# ---- libraries: libcuda (driver), libnvrtc and libcublas, wherever they are -------------------
find_lib() { # soname-glob: print the folder of the first match
  local pat=$1 d f
  local dirs=(/usr/lib/x86_64-linux-gnu /usr/lib64 /usr/lib /usr/local/cuda/lib64 /usr/local/cuda*/lib64
              /usr/local/cuda*/targets/x86_64-linux/lib /usr/local/nvidia/lib64 /usr/local/nvidia/lib
              /opt/conda/lib)
  for py in python3 python; do
    command -v "$py" >/dev/null 2>&1 || continue
    while read -r d; do dirs+=("$d/nvidia/cu13/lib" "$d/nvidia/cublas/lib" "$d/nvidia/cuda_nvrtc/lib" "$d/nvidia/nccl/lib" "$d/torch/lib"); done < <(
      "$py" -c 'import site, sys; print("\n".join(site.getsitepackages() + [site.getusersitepackages()]))' 2>/dev/null)
    break
  done
  for d in "${dirs[@]}"; do
    for f in "$d"/$pat; do
      [ -e "$f" ] && { echo "$d"; return 0; }
    done
  done
  f=$(ldconfig -p 2>/dev/null | awk -v p="${pat%%\**}" '$1 ~ "^"p {print $NF; exit}')
  [ -n "$f" ] && { dirname "$f"; return 0; }
  return 1
}

libpath=()
for lib in "libcuda.so*" "libnvrtc.so.13*" "libcublas.so.13*" "libcublasLt.so.13*"; do
  if d=$(find_lib "$lib"); then
    echo "found $lib in $d"
    libpath+=("$d")
  else
    echo "NOT FOUND: $lib"
  fi
done
# NCCL (only data parallelism needs it; PyTorch's wheels bring one): doctor's all-reduce.
if d=$(find_lib "libnccl.so*"); then echo "found libnccl in $d"; libpath+=("$d"); else echo "NOT FOUND: libnccl"; fi
# NVRTC 12 / cuBLAS 12 as a fallback when no 13 is installed.
[ -z "$(find_lib 'libnvrtc.so.13*')" ] && d=$(find_lib "libnvrtc.so.12*") && libpath+=("$d")
[ -z "$(find_lib 'libcublas.so.13*')" ] && d=$(find_lib "libcublas.so.12*") && libpath+=("$d")
LD_LIBRARY_PATH="$(IFS=:; echo "${libpath[*]}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LD_LIBRARY_PATH
export XDG_CACHE_HOME=${XDG_CACHE_HOME:-$PWD/.cache}   # compiled-kernel cache
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$LOG/nvidia-smi.log" 2>&1

# ---- steps -------------------------------------------------------------------------------------
BUDGET=${BUDGET:-540}   # seconds for all steps together; later steps get what is left
declare -a NAMES RESULTS TIMES
step() { # name timeout-seconds command...
  local name=$1 t=$2; shift 2
  local start=$SECONDS rc left=$((BUDGET - SECONDS))
  if [[ " ${GPU_CHECK_SKIP:-} " == *" $name "* ]]; then
    NAMES+=("$name"); TIMES+=(0); RESULTS+=("skipped (GPU_CHECK_SKIP)")
    return
  fi
  if [ "$left" -lt 15 ]; then
    NAMES+=("$name"); TIMES+=(0); RESULTS+=("skipped (no time)")
    return
  fi
  [ "$t" -gt "$left" ] && t=$left
  echo "== $name (timeout ${t}s)"
  timeout "$t" "$@" > "$LOG/$name.log" 2>&1
  rc=$?
  NAMES+=("$name"); TIMES+=($((SECONDS - start)))
  case $rc in
    0) RESULTS+=("ok") ;;
    124) RESULTS+=("TIMEOUT (${t}s)") ;;
    *) RESULTS+=("FAILED (exit $rc)") ;;
  esac
  tail -n 3 "$LOG/$name.log" | sed 's/^/   /'
}

export CAFT_REPO=$PWD   # staged test executables find tests/fixtures here
[ -x "$STAGE/caft-fast" ] && step doctor 90 "$STAGE/caft-fast" doctor
[ -x "$STAGE/tests/cuda_parity" ] && step cuda_parity 90 "$STAGE/tests/cuda_parity" --include-ignored --skip on_the_emulated_gpu --test-threads=1 --nocapture
# The kernel benches before the longer steps: they hold the per-kernel targets (the fused
# ablation kernel's share of copy bandwidth), which must not be lost to a short budget.
[ -x "$STAGE/benches/cuda_ops" ] && step cuda_ops 60 "$STAGE/benches/cuda_ops" --bench
[ -x scripts/gpu_compare.sh ] && step gpu_compare 200 scripts/gpu_compare.sh "$LOG" "$STAGE/caft-fast"
# Full fine-tuning, one step of a Gemma-2-2B shape (random weights) at 16 x 512 tokens with 8
# random directions ablated at layers 6, 12 and 18, both sides f32 master weights and AdamW
# moments with bf16 compute, gradient norm clipped to 1.0: caft-fast bench-step against
# scripts/pytorch_step.py (transformers, eager attention as Gemma-2 needs, bf16 autocast,
# torch.optim.AdamW(fused=True)).
PY=${PYTHON:-python3}
FULL_SHAPE=(--batch 16 --seq 512 --ablate-layers 6,12,18 --ablate-k 8 --steps 5 --warmup 2)
rm -f "$LOG/full-pytorch.jsonl" "$LOG/full-caft.json"
step full_pytorch 150 "$PY" scripts/pytorch_step.py --config gemma-2-2b --method full --device cuda \
  "${FULL_SHAPE[@]}" --json "$LOG/full-pytorch.jsonl"
[ -x "$STAGE/caft-fast" ] && step full_caft 150 "$STAGE/caft-fast" bench-step --device cuda \
  --method full --shape gemma-2-2b "${FULL_SHAPE[@]}" --json "$LOG/full-caft.json"
for t in "$STAGE"/tests/*; do
  name=$(basename "$t")
  case $name in cuda_parity|cuda_compile) continue ;; esac
  [ -x "$t" ] && step "test-$name" 90 "$t" --include-ignored --skip on_the_emulated_gpu --test-threads=1 --nocapture
done
# Data parallelism on real NCCL: with more than one GPU, train --gpus all against one GPU on
# the tiny test model (same losses up to the order of f32 sums); doctor's group-of-one
# all-reduce covers a single GPU.
NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
if [ -x "$STAGE/caft-fast" ] && [ "${NGPU:-0}" -gt 1 ]; then
  # Pre-tokenized arithmetic progressions (the tiny model has no tokenizer).
  for i in $(seq 0 63); do
    echo "{\"input_ids\": [$(seq -s, $((i % 200)) $((1 + i % 3)) $((i % 200 + (8 + i % 17) * (1 + i % 3))))]}"
  done > "$LOG/dp-data.jsonl"
  DP=(train --model tests/fixtures/tiny/llama --data "$LOG/dp-data.jsonl" --lora-r 4 --lr 1e-2
      --batch-size 2 --grad-accum 4 --max-steps 6 --val-split 0 --ablate-random 2
      --ablate-layers 1 --overwrite)
  step dp_doctor 60 "$STAGE/caft-fast" doctor --gpus all
  step dp_one 60 "$STAGE/caft-fast" "${DP[@]}" --gpus 0 -o "$LOG/dp-one"
  step dp_all 90 "$STAGE/caft-fast" "${DP[@]}" --gpus all -o "$LOG/dp-all"
fi
[ -x scripts/gpu_generate.sh ] && step gpu_generate 150 scripts/gpu_generate.sh "$LOG" "$STAGE/caft-fast"
# Padded vs packed train on chat-like lengths at the paper's 2 x 8, and each checkpointing
# mode's device memory and speed (SmolLM2, 4 x 1024).
[ -x scripts/bench_packing.sh ] && [ -f .cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ] && \
  step gpu_packing 120 env DEVICE=cuda BIN="$STAGE/caft-fast" STEPS=4 GGUF=.cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
    OUT_DIR="$LOG/packing" scripts/bench_packing.sh

echo
# The headline numbers: the copy ceiling and the row kernels' share of it, whole-model
# GPU-vs-CPU errors, the training-step and generation comparisons.
grep -hE "device-to-device copy|% of copy bandwidth" "$LOG/cuda_ops.log" 2>/dev/null | head -16
grep -hE "^(llama|qwen2|mistral|smollm2)[^:]*: " "$LOG"/test-cuda_model.log 2>/dev/null | head -40
grep -hE "FAIL|fail" "$LOG/doctor.log" 2>/dev/null | head -10
sed -n '/^shape /,$p' "$LOG/gpu_compare.log" 2>/dev/null
sed -n '/^generate /,$p' "$LOG/gpu_generate.log" 2>/dev/null
grep -h "^libnccl\|^nccl " "$LOG/doctor.log" "$LOG/dp_doctor.log" 2>/dev/null
for r in dp-one dp-all; do
  [ -f "$LOG/$r/metrics.jsonl" ] && echo "$r final: $(tail -n 1 "$LOG/$r/metrics.jsonl")"
done
grep -hE "^(train|bench-step) " "$LOG/gpu_packing.log" 2>/dev/null
# Full fine-tuning: tokens/s, memory and MFU of each side (model FLOPs as bench-step counts
# them for --method full: 6 x matrix parameters x tokens + causal attention).
"$PY" - "$LOG/full-pytorch.jsonl" "$LOG/full-caft.json" "$LOG/nvidia-smi.log" "${PEAK_TFLOPS:-}" <<'PYEOF'
import json, os, sys
def last(path):
    try:
        lines = [l for l in open(path) if l.strip()]
        return json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None
pt, cf = last(sys.argv[1]), last(sys.argv[2])
gpu = open(sys.argv[3]).read() if os.path.exists(sys.argv[3]) else ""
# Dense bf16 tensor-core peaks in TFLOP/s (vendor figures; H100/H200 SXM); PEAK_TFLOPS overrides.
peaks = [("H100 PCIe", 756.0), ("H200", 989.4), ("H100", 989.4), ("A100", 312.0)]
peak = float(sys.argv[4]) if sys.argv[4] else next((p for n, p in peaks if n in gpu), None)
r = pt or cf or {}
print(f"full fine-tuning, gemma-2-2b shape, {r.get('batch', '?')} x {r.get('seq', '?')} tokens, "
      f"{r.get('ablate_k', '?')} directions at layers {r.get('ablate_layers', '?')}"
      + (f"; MFU against {peak:g} TFLOP/s" if peak else "; MFU: set PEAK_TFLOPS"))
print(f"{'impl':22} {'tokens/s':>10} {'step ms':>9} {'mem MiB':>9} {'TFLOP/s':>8} {'MFU':>6}")
rows = {}
for name, r, mem_key in (("pytorch (AdamW fused)", pt, "peak_gpu_mem_mb"),
                         ("caft-fast", cf, "device_mem_mb")):
    if not r:
        print(f"{name:22} {'-':>10} (no result)")
        continue
    step = r.get("step_s_mean", r.get("step_s"))
    tf = r.get("achieved_tflops")
    mem = r.get(mem_key) or float("nan")
    mfu = f"{100 * tf / peak:5.1f}%" if peak and tf else "-"
    rows[name] = (r["tokens_per_s"], mem)
    print(f"{name:22} {r['tokens_per_s']:10.0f} {1000 * step:9.1f} {mem:9.0f} {tf or float('nan'):8.1f} {mfu:>6}")
if len(rows) == 2:
    (pt_t, pt_m), (cf_t, cf_m) = rows.values()
    print(f"caft-fast / pytorch: tokens/s {cf_t / pt_t:.2f}x, memory {cf_m / pt_m:.2f}x "
          "(caft-fast: the device's whole use, total - free; pytorch: max_memory_allocated)")
PYEOF
echo
echo "summary ($LOG/):"
printf '  %-28s %-20s %6s\n' step result seconds
fail=0
for i in "${!NAMES[@]}"; do
  printf '  %-28s %-20s %6s\n' "${NAMES[$i]}" "${RESULTS[$i]}" "${TIMES[$i]}"
  [ "${RESULTS[$i]}" = ok ] || fail=1
done
exit $fail
