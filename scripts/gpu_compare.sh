#!/usr/bin/env bash
# End-to-end training-step comparison on a GPU: caft-fast vs PyTorch + PEFT + the paper's
# ablation hook, on the same random-weight model shapes (Qwen2.5-1.5B, Llama-3.2-1B), batch x seq
# 8 x 1024, LoRA r=32 alpha=64 rsLoRA on all seven projections, AdamW, 8 directions ablated at 3
# layers, and the same step without ablation. Writes JSON lines and logs into $1 and prints a table.
#
# Usage: scripts/gpu_compare.sh LOGDIR [CAFT_BINARY]
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

for cfg in "qwen2.5-1.5b:7,14,21" "llama-3.2-1b:4,8,12"; do
  shape=${cfg%%:*}; layers=${cfg#*:}
  [ "${SKIP_PYTORCH:-0}" = 1 ] || run "pytorch $shape" 150 "$PY" scripts/pytorch_step.py --config "$shape" --batch 8 --seq 1024 \
      --dtype bf16 --device cuda --ablate-layers "$layers" --ablate-k 8 --both \
      --steps "$STEPS" --warmup "$WARMUP" --json "$LOG/pytorch-$shape.jsonl"
  [ -f "$LOG/pytorch-$shape.jsonl" ] && sed "s/^{/{\"impl\":\"pytorch\",\"shape\":\"$shape\",/" \
      "$LOG/pytorch-$shape.jsonl" >> "$RES"
  for ab in "$layers" ""; do
    tag=$([ -n "$ab" ] && echo ablate || echo plain)
    run "caft-fast $shape $tag" 120 "$BIN" bench-step --device cuda --shape "$shape" --batch 8 \
        --seq 1024 --ablate-layers "$ab" --ablate-k 8 --steps "$STEPS" --warmup "$WARMUP" \
        --json "$LOG/caft-$shape-$tag.json"
    [ -f "$LOG/caft-$shape-$tag.json" ] && sed "s/^{/{\"impl\":\"caft-fast\",\"shape\":\"$shape\",/" \
        "$LOG/caft-$shape-$tag.json" >> "$RES"
  done
done

"$PY" - "$RES" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def ablated(r):
    if r["impl"] == "pytorch":
        return bool(r.get("ablate", r.get("ablate_layers")))
    return bool(r.get("ablate_layers"))
def mem(r):
    return r.get("peak_gpu_mem_mb") or r.get("device_mem_mb") or float("nan")
print(f"{'shape':14} {'impl':10} {'ablation':8} {'tokens/s':>10} {'step ms':>9} {'mem MiB':>9} {'TFLOP/s':>8}")
for r in rows:
    step = r.get("step_s") if r["impl"] == "caft-fast" else r.get("step_s_mean")
    if isinstance(step, list): step = sum(step) / len(step)
    print(f"{r['shape']:14} {r['impl']:10} {('yes' if ablated(r) else 'no'):8} {r['tokens_per_s']:10.0f} "
          f"{1000*step:9.1f} {mem(r):9.0f} {r.get('achieved_tflops', float('nan')):8.1f}")
for shape in sorted({r["shape"] for r in rows}):
    for ab in (True, False):
        pt = [r for r in rows if r["shape"] == shape and r["impl"] == "pytorch" and ablated(r) == ab]
        cf = [r for r in rows if r["shape"] == shape and r["impl"] == "caft-fast" and ablated(r) == ab]
        if pt and cf:
            print(f"{shape} ablation={'yes' if ab else 'no'}: caft-fast/pytorch tokens/s = "
                  f"{cf[0]['tokens_per_s']/pt[0]['tokens_per_s']:.2f}x, memory = {mem(cf[0])/mem(pt[0]):.2f}x")
    cf = {ablated(r): r for r in rows if r["shape"] == shape and r["impl"] == "caft-fast"}
    if True in cf and False in cf:
        print(f"{shape}: caft-fast ablation overhead = {100*(cf[False]['tokens_per_s']/cf[True]['tokens_per_s']-1):+.2f}%")
PYEOF
