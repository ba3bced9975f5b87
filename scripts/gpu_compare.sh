#!/usr/bin/env bash
# End-to-end training-step comparison on a GPU: caft-fast vs PyTorch + PEFT + the paper's
# ablation hook, on the same random-weight model shapes (Qwen2.5-1.5B, Llama-3.2-1B), batch x seq
# 8 x 1024, LoRA r=32 alpha=64 rsLoRA on all seven projections, AdamW, 8 directions ablated at 3
# layers, and the same step without ablation. Writes JSON lines and logs into $1 and prints a table.
#
# Usage: scripts/gpu_compare.sh LOGDIR [CAFT_BINARY]
# Environment: STEPS (timed, default 5), WARMUP (untimed first, default 2), PYTHON,
#   SKIP_PYTORCH=1 (reuse LOGDIR's PyTorch results of an earlier run).
set -u
cd "$(dirname "$0")/.."
LOG=${1:-gpu-logs}
BIN=${2:-stage/caft-fast}
mkdir -p "$LOG"
RES="$LOG/compare.jsonl"
: > "$RES"
PY=${PYTHON:-python3}
STEPS=${STEPS:-5}
WARMUP=${WARMUP:-2}

run() { # name timeout command...
  local name=$1 t=$2; shift 2
  echo "== $name: $*" >> "$LOG/compare.log"
  timeout "$t" "$@" >> "$LOG/compare.log" 2>&1 || echo "== $name FAILED ($?)" >> "$LOG/compare.log"
}

# The table's inputs, SIDE:SHAPE:FILE (scripts/compare_steps.py sets the side and shape of each
# row itself: the JSON lines do not agree on them).
INPUTS=()
for cfg in "qwen2.5-1.5b:7,14,21" "llama-3.2-1b:4,8,12"; do
  shape=${cfg%%:*}; layers=${cfg#*:}
  [ "${SKIP_PYTORCH:-0}" = 1 ] || rm -f "$LOG/pytorch-$shape.jsonl"
  [ "${SKIP_PYTORCH:-0}" = 1 ] || run "pytorch $shape" 150 "$PY" scripts/pytorch_step.py --config "$shape" --batch 8 --seq 1024 \
      --dtype bf16 --device cuda --ablate-layers "$layers" --ablate-k 8 --both \
      --steps "$STEPS" --warmup "$WARMUP" --json "$LOG/pytorch-$shape.jsonl"
  INPUTS+=("pytorch:$shape:$LOG/pytorch-$shape.jsonl")
  for ab in "$layers" ""; do
    tag=$([ -n "$ab" ] && echo ablate || echo plain)
    rm -f "$LOG/caft-$shape-$tag.json"
    run "caft-fast $shape $tag" 120 "$BIN" bench-step --device cuda --shape "$shape" --batch 8 \
        --seq 1024 --ablate-layers "$ab" --ablate-k 8 --steps "$STEPS" --warmup "$WARMUP" \
        --json "$LOG/caft-$shape-$tag.json"
    INPUTS+=("caft-fast:$shape:$LOG/caft-$shape-$tag.json")
  done
done

"$PY" scripts/compare_steps.py --jsonl "$RES" "${INPUTS[@]}"
