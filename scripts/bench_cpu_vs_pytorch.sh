#!/usr/bin/env bash
# CPU training-step benchmark: PyTorch + transformers (+ PEFT for LoRA) with the paper's
# ablation hook vs caft-fast, on SmolLM2-135M-Instruct (GGUF, f32 on CPU), ablation at layers
# 10 and 20 with k=8, batch 4 x 256 tokens, AdamW, the same step on both sides:
#   METHOD=lora (default): LoRA r=32 alpha=64 rsLoRA on all seven projections;
#   METHOD=full: every weight trained (f32 weights and AdamW moments on both sides; PyTorch:
#                torch.optim.AdamW over all parameters, gradient norm clipped to 1.0).
# Each side runs WARMUP untimed steps (default 3), then STEPS timed ones (default 3). Fewer
# warm-up steps overstate the ratio: PyTorch's first steps after one warm-up step are still
# much slower than its later ones (docs/benchmarks.md, full fine-tuning on the CPU).
# Prints tokens/s, s/step and peak RSS of each side and the ratios caft-fast / PyTorch.
#
# Usage: [METHOD=lora|full] scripts/bench_cpu_vs_pytorch.sh
# Environment overrides: METHOD, GGUF, BATCH, SEQ, STEPS (3), WARMUP (3), THREADS, OUT_DIR,
#   BIN (a caft-fast binary; default: cargo run --release), SKIP_PYTORCH=1, SKIP_CAFT=1
set -u
cd "$(dirname "$0")/.."
METHOD=${METHOD:-lora}
case $METHOD in
    lora) LORA_FLAGS=(--lora-r 32 --lora-alpha 64) ;;
    full) LORA_FLAGS=() ;;
    *) echo "METHOD=$METHOD: expected lora or full" >&2; exit 1 ;;
esac

GGUF=${GGUF:-.cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
BATCH=${BATCH:-4}
SEQ=${SEQ:-256}
STEPS=${STEPS:-3}
WARMUP=${WARMUP:-3}
THREADS=${THREADS:-2}
LAYERS=10,20
K=8
OUT_DIR=${OUT_DIR:-target/bench-cpu}
mkdir -p "$OUT_DIR"
PT_JSON="$OUT_DIR/pytorch-$METHOD.json"
CF_JSON="$OUT_DIR/caft-fast-$METHOD.json"

if [ ! -f "$GGUF" ]; then
    echo "model not found: $GGUF (set GGUF=path/to/SmolLM2-135M-Instruct.Q4_1.gguf)" >&2
    exit 1
fi

# ---- PyTorch side ----
if [ "${SKIP_PYTORCH:-0}" = 1 ]; then
    echo "== PyTorch side skipped (SKIP_PYTORCH=1; reusing $PT_JSON if present) =="
elif python3 -c "import torch, transformers, peft" 2>/dev/null; then
    echo "== PyTorch, --method $METHOD ($THREADS threads) =="
    rm -f "$PT_JSON"
    python3 scripts/pytorch_step.py --config smollm2-135m-gguf --gguf "$GGUF" --method "$METHOD" \
        --batch "$BATCH" --seq "$SEQ" --dtype f32 --device cpu --threads "$THREADS" \
        --ablate-layers "$LAYERS" --ablate-k "$K" --steps "$STEPS" --warmup "$WARMUP" \
        --json "$PT_JSON" 2> "$OUT_DIR/pytorch-$METHOD.log" \
        || { echo "PyTorch run failed, see $OUT_DIR/pytorch-$METHOD.log" >&2; rm -f "$PT_JSON"; }
else
    echo "== PyTorch side skipped (torch, transformers or peft not importable) =="
    rm -f "$PT_JSON"
fi

# ---- caft-fast side ----
if [ "${SKIP_CAFT:-0}" = 1 ]; then
    echo "== caft-fast side skipped (SKIP_CAFT=1; reusing $CF_JSON if present) =="
else
    echo "== caft-fast, --method $METHOD ($THREADS threads) =="
    rm -f "$CF_JSON"
    if [ -n "${BIN:-}" ]; then CAFT=("$BIN"); else CAFT=(cargo run --release --quiet --); fi
    "${CAFT[@]}" bench-step --device cpu --model "$GGUF" --method "$METHOD" --batch "$BATCH" \
        --seq "$SEQ" ${LORA_FLAGS[@]+"${LORA_FLAGS[@]}"} --ablate-layers "$LAYERS" --ablate-k "$K" \
        --steps "$STEPS" --warmup "$WARMUP" --threads "$THREADS" --json "$CF_JSON" \
        || { echo "caft-fast run failed" >&2; rm -f "$CF_JSON"; }
fi

# ---- table ----
python3 - "$PT_JSON" "$CF_JSON" "$METHOD" <<'EOF'
import json, os, sys

def last_line(path):
    if not os.path.exists(path):
        return None
    lines = [l for l in open(path).read().splitlines() if l.strip()]
    return json.loads(lines[-1]) if lines else None

pt, cf, method = last_line(sys.argv[1]), last_line(sys.argv[2]), sys.argv[3]
num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
fmt = lambda v, f: format(v, f) if num(v) else "-"
rows = []
for name, r in ((f"pytorch ({method})", pt), (f"caft-fast ({method})", cf)):
    if r is None:
        rows.append((name, None, None, None))
        continue
    rows.append((name, r.get("tokens_per_s"), r.get("step_s_mean") or r.get("step_s"),
                 r.get("peak_rss_mb")))
def ratio(i):
    a, b = rows[1][i], rows[0][i]
    return a / b if num(a) and num(b) and b else None
print()
print(f"{'implementation':<22} {'tokens/s':>10} {'s/step':>8} {'peak RSS MB':>12}")
for name, tps, step, rss in rows:
    print(f"{name:<22} {fmt(tps, '10.1f'):>10} {fmt(step, '8.2f'):>8} {fmt(rss, '12.0f'):>12}")
x = lambda v: fmt(v, '.2f') + "x" if num(v) else "-"
print(f"{'caft-fast / pytorch':<22} {x(ratio(1)):>10} {x(ratio(2)):>8} {x(ratio(3)):>12}")
EOF
