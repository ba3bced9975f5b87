#!/usr/bin/env bash
# Generation throughput: `caft-fast generate` against transformers' generate on the same
# prompts (the 8 built-in questions), greedy, exactly MAX_TOKENS new tokens per answer, at
# batch 1 (8 answers, one at a time) and batch 32 (4 answers per question, together).
# Prints a table with the ratio. Usage:
#   scripts/bench_generate.sh [cpu|cuda]      (THREADS=2 MAX_TOKENS=64 by default)
# Needs the release binary (cargo build --release, or BIN=...) and, for the baseline, python3
# with torch + transformers; without them only our numbers are printed.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${1:-cpu}
THREADS=${THREADS:-2}
MAX_TOKENS=${MAX_TOKENS:-64}
BIN=${BIN:-target/release/caft-fast}
GGUF=${CAFT_SMOLLM2_GGUF:-$("$BIN" fetch-model)}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

ours() { # batch samples
    "$BIN" generate --model "$GGUF" --device "$DEVICE" --threads "$THREADS" --temperature 0 \
        --ignore-eos --max-tokens "$MAX_TOKENS" --batch-size "$1" --samples "$2" \
        -o "$OUT/ours_$1.jsonl" --overwrite 2>/dev/null |
        sed -E 's/.* ([0-9.]+) tokens\/s.*/\1/'
}
theirs() { # batch samples
    python3 scripts/bench_generate_pytorch.py --gguf "$GGUF" --questions "$OUT/ours_1.jsonl" \
        --device "$DEVICE" --threads "$THREADS" --max-tokens "$MAX_TOKENS" \
        --batch-size "$1" --samples "$2" 2>/dev/null |
        python3 -c 'import json,sys; print(json.loads(sys.stdin.read())["tokens_per_sec"])'
}

printf '%-8s %14s %16s %7s\n' batch "caft tok/s" "transformers" ratio
for cfg in "1 1" "32 4"; do
    set -- $cfg
    a=$(ours "$1" "$2")
    b=$(theirs "$1" "$2" || echo "n/a")
    r=$(python3 -c "print(f'{$a/$b:.2f}x')" 2>/dev/null || echo "n/a")
    printf '%-8s %14s %16s %7s\n' "$1" "$a" "$b" "$r"
done
