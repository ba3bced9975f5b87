#!/usr/bin/env bash
# CPU training-step benchmark: PyTorch + PEFT (+ the paper's ablation hook) vs caft-fast,
# on SmolLM2-135M-Instruct (GGUF, f32 on CPU), LoRA r=32 alpha=64 on all seven projections,
# ablation at layers 10 and 20 with k=8, batch 4 x 256 tokens, AdamW.
#
# Usage: scripts/bench_cpu_vs_pytorch.sh
# Environment overrides: GGUF, BATCH, SEQ, STEPS, WARMUP, THREADS, OUT_DIR, SKIP_PYTORCH=1, SKIP_CAFT=1
set -u
cd "$(dirname "$0")/.."

GGUF=${GGUF:-.cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
BATCH=${BATCH:-4}
SEQ=${SEQ:-256}
STEPS=${STEPS:-3}
WARMUP=${WARMUP:-1}
THREADS=${THREADS:-2}
LAYERS=10,20
K=8
OUT_DIR=${OUT_DIR:-target/bench-cpu}
mkdir -p "$OUT_DIR"
PT_JSON="$OUT_DIR/pytorch.json"
CF_JSON="$OUT_DIR/caft-fast.json"

if [ ! -f "$GGUF" ]; then
    echo "model not found: $GGUF (set GGUF=path/to/SmolLM2-135M-Instruct.Q4_1.gguf)" >&2
    exit 1
fi

# ---- PyTorch side ----
if [ "${SKIP_PYTORCH:-0}" = 1 ]; then
    echo "== PyTorch side skipped (SKIP_PYTORCH=1; reusing $PT_JSON if present) =="
elif python3 -c "import torch, transformers, peft" 2>/dev/null; then
    echo "== PyTorch + PEFT ($THREADS threads) =="
    rm -f "$PT_JSON"
    python3 scripts/pytorch_step.py --config smollm2-135m-gguf --gguf "$GGUF" \
        --batch "$BATCH" --seq "$SEQ" --dtype f32 --device cpu --threads "$THREADS" \
        --ablate-layers "$LAYERS" --ablate-k "$K" --steps "$STEPS" --warmup "$WARMUP" \
        --json "$PT_JSON" 2> "$OUT_DIR/pytorch.log" \
        || { echo "PyTorch run failed, see $OUT_DIR/pytorch.log" >&2; rm -f "$PT_JSON"; }
else
    echo "== PyTorch side skipped (torch, transformers or peft not importable) =="
    rm -f "$PT_JSON"
fi

# ---- caft-fast side ----
if [ "${SKIP_CAFT:-0}" = 1 ]; then
    echo "== caft-fast side skipped (SKIP_CAFT=1; reusing $CF_JSON if present) =="
else
    echo "== caft-fast ($THREADS threads) =="
    rm -f "$CF_JSON"
    cargo run --release --quiet -- bench-step --model "$GGUF" --batch "$BATCH" --seq "$SEQ" \
        --lora-r 32 --lora-alpha 64 --ablate-layers "$LAYERS" --ablate-k "$K" \
        --steps "$STEPS" --warmup "$WARMUP" --threads "$THREADS" --json "$CF_JSON" \
        || { echo "caft-fast run failed" >&2; rm -f "$CF_JSON"; }
fi

# ---- table ----
python3 - "$PT_JSON" "$CF_JSON" <<'EOF'
import json, os, sys

def last_line(path):
    if not os.path.exists(path):
        return None
    lines = [l for l in open(path).read().splitlines() if l.strip()]
    return json.loads(lines[-1]) if lines else None

pt, cf = last_line(sys.argv[1]), last_line(sys.argv[2])
print()
print(f"{'implementation':<16} {'tokens/s':>10} {'s/step':>8} {'peak RSS MB':>12}")
for name, r in (("pytorch+peft", pt), ("caft-fast", cf)):
    if r is None:
        print(f"{name:<16} {'-':>10} {'-':>8} {'-':>12}")
        continue
    tps = r.get("tokens_per_s")
    step = r.get("step_s_mean") or (r.get("batch", 0) * r.get("seq", 0) / tps if tps else None)
    rss = r.get("peak_rss_mb")
    fmt = lambda v, f: format(v, f) if isinstance(v, (int, float)) else "-"
    print(f"{name:<16} {fmt(tps, '10.1f'):>10} {fmt(step, '8.2f'):>8} {fmt(rss, '12.0f'):>12}")
if pt and cf:
    if pt.get("tokens_per_s") and cf.get("tokens_per_s"):
        print(f"speed ratio (caft-fast / pytorch tokens/s): {cf['tokens_per_s'] / pt['tokens_per_s']:.2f}x")
    if pt.get("peak_rss_mb") and cf.get("peak_rss_mb"):
        print(f"memory ratio (pytorch / caft-fast peak RSS): {pt['peak_rss_mb'] / cf['peak_rss_mb']:.2f}x")
EOF
