#!/usr/bin/env bash
# Packing and checkpointing on the CPU backend (SmolLM2-135M-Instruct, 2 threads):
#  1. `train` on variable-length chat-like data (pre-tokenized: lengths mostly 150-700 tokens,
#     15% from 700 to 2000; the first third of each example is an unlabelled prompt), batch 2 x
#     accumulation 8 as the paper, padded (--no-packing) against packed (the default), in
#     useful (non-padding) tokens/s as train reports them;
#  2. `bench-step` at 4 x 1024 under each --checkpointing mode: peak RSS and tokens/s.
#
# Usage: scripts/bench_packing.sh            (about 10 minutes on 2 cores)
# Environment overrides: GGUF, STEPS, EXAMPLES, THREADS, OUT_DIR; DEVICE (cpu; cuda on a GPU
# machine), BIN (a built caft-fast; default: cargo build --release), MODES (checkpointing modes
# for part 2; empty skips it).
set -euo pipefail
cd "$(dirname "$0")/.."

GGUF=${GGUF:-${CAFT_SMOLLM2_GGUF:-$HOME/.cache/caft-fast/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}}
STEPS=${STEPS:-3}
EXAMPLES=${EXAMPLES:-64}
THREADS=${THREADS:-2}
OUT_DIR=${OUT_DIR:-target/bench-packing}
DEVICE=${DEVICE:-cpu}
MODES=${MODES-none selective full}
mkdir -p "$OUT_DIR"
[ -f "$GGUF" ] || { echo "model not found: $GGUF (set GGUF=...)" >&2; exit 1; }
if [ -z "${BIN:-}" ]; then
    cargo build --release --quiet
    BIN=target/release/caft-fast
fi

# Lengths like a code-assistant dataset: a seeded draw, the same on every run.
python3 - "$OUT_DIR/data.jsonl" "$EXAMPLES" <<'EOF'
import json, random, sys
path, n = sys.argv[1], int(sys.argv[2])
rng = random.Random(7)
with open(path, "w") as f:
    for _ in range(n):
        length = rng.randint(700, 2000) if rng.random() < 0.15 else rng.randint(150, 700)
        ids = [rng.randrange(100, 49000) for _ in range(length)]
        prompt = length // 3
        labels = [-100] * prompt + ids[prompt:]
        f.write(json.dumps({"input_ids": ids, "labels": labels}) + "\n")
EOF

run_train() {
    local name=$1; shift
    "$BIN" train --device "$DEVICE" --model "$GGUF" --data "$OUT_DIR/data.jsonl" --val-split 0 \
        --max-steps "$STEPS" --warmup-steps 0 --threads "$THREADS" --eval-every 0 --save-every 0 \
        -o "$OUT_DIR/$name" --overwrite "$@" >/dev/null 2>"$OUT_DIR/$name.log"
    python3 - "$OUT_DIR/$name/metrics.jsonl" "$name" "$DEVICE" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"tokens_per_s"' in l]
tok = sum(r["tokens"] for r in rows); sec = sum(r["tokens"] / r["tokens_per_s"] for r in rows)
print(f"train {sys.argv[2]:>8} ({sys.argv[3]}): {len(rows)} steps, {tok} useful tokens, {sec:.1f} s, "
      f"{tok / sec:.1f} useful tokens/s, losses {[round(r['loss'], 4) for r in rows]}")
EOF
}
run_train padded --no-packing
run_train packed

for mode in $MODES; do
    "$BIN" bench-step --device "$DEVICE" --model "$GGUF" --batch 4 --seq 1024 --steps 1 --warmup 1 \
        --threads "$THREADS" --ablate-layers 10,20 --checkpointing "$mode" \
        --json "$OUT_DIR/step-$mode.json" >/dev/null 2>&1
    python3 - "$OUT_DIR/step-$mode.json" <<'EOF'
import json, sys
j = json.load(open(sys.argv[1]))
mem = j.get("device_mem_mb") or j["peak_rss_mb"]
what = "device memory" if j.get("device_mem_mb") else "peak RSS"
print(f"bench-step 4x1024 checkpointing {j['checkpointing']:>9}: {j['tokens_per_s']:.1f} tokens/s, "
      f"{what} {mem:.0f} MiB, loss {j['losses'][-1]:.5f}")
EOF
done
