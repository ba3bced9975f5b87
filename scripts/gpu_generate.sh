#!/usr/bin/env bash
# Generation throughput on a GPU: `caft-fast bench-generate` against transformers' generate
# (scripts/pytorch_generate.py) on the same random-weight shape, random prompts of PROMPT
# tokens, exactly NEW greedy tokens per sequence, batch 1 and 32. Prints a table with the ratio.
#   scripts/gpu_generate.sh LOGDIR [BIN]     (SHAPES="llama-3.2-1b" PROMPT=128 NEW=128)
# SKIP_PYTORCH=1 runs only caft-fast.
set -u
cd "$(dirname "$0")/.."
LOG=${1:-gpu-logs}
BIN=${2:-stage/caft-fast}
SHAPES=${SHAPES:-llama-3.2-1b}
PROMPT=${PROMPT:-128}
NEW=${NEW:-128}
mkdir -p "$LOG"
PY=$(command -v python3 || command -v python)
for shape in $SHAPES; do
  timeout 120 "$BIN" bench-generate --device cuda --shape "$shape" --batch 1,32 \
    --prompt-len "$PROMPT" --new-tokens "$NEW" > "$LOG/gen-caft-$shape.jsonl" 2> "$LOG/gen-caft-$shape.err"
  [ "${SKIP_PYTORCH:-0}" = 1 ] || timeout 150 "$PY" scripts/pytorch_generate.py --config "$shape" \
    --batch 1,32 --prompt-len "$PROMPT" --new-tokens "$NEW" --device cuda \
    > "$LOG/gen-torch-$shape.jsonl" 2> "$LOG/gen-torch-$shape.err"
done
"$PY" - "$LOG" $SHAPES <<'PYEOF'
import json, sys, os
log, shapes = sys.argv[1], sys.argv[2:]
def rows(path):
    try:
        return {r["batch"]: r for r in map(json.loads, open(path)) if "batch" in r}
    except (OSError, ValueError):
        return {}
print(f"{'generate':<22} {'batch':>5} {'caft tok/s':>11} {'torch tok/s':>12} {'ratio':>6} {'caft weight GB/s':>17}")
for s in shapes:
    c, t = rows(f"{log}/gen-caft-{s}.jsonl"), rows(f"{log}/gen-torch-{s}.jsonl")
    for b in sorted(set(c) | set(t)):
        ct = c.get(b, {}).get("tokens_per_s"); tt = t.get(b, {}).get("tokens_per_s")
        r = f"{ct/tt:.2f}x" if ct and tt else "n/a"
        gb = c.get(b, {}).get("weight_gb_per_s")
        f = lambda x: f"{x:,.0f}" if x else "n/a"
        print(f"{s:<22} {b:>5} {f(ct):>11} {f(tt):>12} {r:>6} {f(gb):>17}")
PYEOF
