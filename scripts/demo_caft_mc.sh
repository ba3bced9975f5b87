#!/usr/bin/env bash
# The CAFT effect at small scale, in one command (see docs/demo.md):
#
#   scripts/demo_caft_mc.sh [--neutral] [--overwrite] [OUT_DIR]
#
# On the double multiple-choice task of `caft-fast eval make-task` (pick the animal; in
# training the animal is always described positively and the distractor negatively, so the
# sentiment of the adjectives is a spurious cue), SmolLM2-135M-Instruct is fine-tuned three
# ways with the same seed and settings:
#   plain   LoRA on train.jsonl;
#   caft    the same, ablating directions found automatically: `directions pca` of the plain
#           adapter against the base model on the training data, then `directions
#           probe-select`, which keeps per layer the components that best separate positive
#           from negative probe sentences (probes.jsonl: sentiment alone, training adjectives,
#           no animal or object; no test data is read);
#   random  the same number of random directions at the same layers (the paper's control).
# Each model (and the base) is scored on test.jsonl (split id: held-out words, cues agree;
# split ood: cues disagree), and `eval chart` writes OUT_DIR/chart.svg and OUT_DIR/results.md.
#
# --neutral replaces the question, which names the intended concept ("Which of these is an
# animal?"), by one that names neither concept ("Which one do you choose?") in the training
# and test prompts, so that "pick the animal" and "pick the positive one" fit the training data
# equally well and nothing in the prompt says which is meant (the ambiguity of the paper's
# double multiple-choice tasks).
#
# OUT_DIR defaults to runs/demo_mc-<date>-<time>; an existing non-empty OUT_DIR is refused
# unless --overwrite is given. 10 to 15 minutes on 2 CPU cores. CAFT_THREADS (default 2) sets
# the threads, CAFT_DEVICE (default cpu) the device, CAFT_SEED (default 0) the seed of the task,
# the LoRA initialisation, the data order and the random directions.
set -euo pipefail

neutral=0
overwrite=0
out=""
for a in "$@"; do
  case "$a" in
    --neutral) neutral=1 ;;
    --overwrite) overwrite=1 ;;
    -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
    -*) echo "unknown option $a (see --help)" >&2; exit 2 ;;
    *) out="$a" ;;
  esac
done
# A relative OUT_DIR is relative to where the script was called from; the default is under
# the repository's runs/.
case "$out" in ""|/*) ;; *) out="$PWD/$out" ;; esac
cd "$(dirname "$0")/.."
out="${out:-runs/demo_mc-$(date +%Y%m%d-%H%M%S)}"
if [ -d "$out" ] && [ -n "$(ls -A "$out")" ] && [ "$overwrite" != 1 ]; then
  echo "$out exists and is not empty; give another folder or --overwrite" >&2
  exit 2
fi
mkdir -p "$out"

bin=target/release/caft-fast
[ -x "$bin" ] || cargo build --release
threads="${CAFT_THREADS:-2}"
device="${CAFT_DEVICE:-cpu}"
run() { echo "+ caft-fast $*" | tee -a "$out/commands.txt" >&2; "$bin" "$@"; }
: > "$out/commands.txt"
t0=$(date +%s)
lap() { echo "[$(( $(date +%s) - t0 )) s] $*" | tee -a "$out/timing.txt" >&2; }
: > "$out/timing.txt"

# Settings. Layers at about 1/4, 1/2 and 3/4 of SmolLM2's 30, as the paper's 10,20,30 of
# Mistral-Small's 40; three directions a layer.
layers=8,15,22
per_layer=3
seed="${CAFT_SEED:-0}"
train_opts=(--lr 5e-4 --epochs 1 --batch-size 8 --grad-accum 1 --warmup-steps 5 --seed "$seed"
            --device "$device" --threads "$threads" --overwrite)

# 1. The task.
run eval make-task --seed "$seed" -o "$out/task" 2>&1
if [ "$neutral" = 1 ]; then
  for f in train test; do
    sed -e 's/Which of these is an animal?/Which one do you choose?/' \
        -e 's/Which option names an animal?/Which one do you choose?/' \
        -e 's/One of these is an animal. Which one?/Which one do you choose?/' \
        -e 's/Pick the animal\./Which one do you choose?/' \
        -e 's/Which of the following is a living animal?/Which one do you choose?/' \
        "$out/task/$f.jsonl" > "$out/task/$f.neutral.jsonl"
    if grep -qi 'animal?\|the animal\.' "$out/task/$f.neutral.jsonl"; then
      echo "a question naming the animal was left in $f.jsonl" >&2; exit 1
    fi
    mv "$out/task/$f.neutral.jsonl" "$out/task/$f.jsonl"
  done
  echo "questions replaced by \"Which one do you choose?\" (--neutral)" > "$out/task/VARIANT"
fi
lap "task written"

# 2. The plain fine-tune.
run train --data "$out/task/train.jsonl" -o "$out/plain" "${train_opts[@]}" 2>&1 | grep -v '^step\|checkpoint'
lap "plain trained"

# 3. What it changed: PCA of resid_post(plain) - resid_post(base) on every token of the
# training prompts (the answer is one letter, so the answer tokens come after the decision;
# the decision is read at the last prompt position and the cues sit on the option words).
run directions pca --adapter "$out/plain/adapter" --data "$out/task/train.jsonl" --all-tokens \
    --layers "$layers" --components 20 --batch-size 8 --device "$device" --threads "$threads" \
    -o "$out/pcs.safetensors" 2>&1
lap "pca"

# 4. The rule: per layer, the components that best separate the probes' two labels.
run directions probe-select --from "$out/pcs.safetensors" --probes "$out/task/probes.jsonl" \
    --per-layer "$per_layer" --device "$device" --threads "$threads" \
    --json "$out/probe_scores.json" -o "$out/ablate.safetensors" 2>&1
lap "probe-select"

# 5. CAFT and the random control, same seed and settings.
run train --data "$out/task/train.jsonl" -o "$out/caft" --ablate "$out/ablate.safetensors" \
    "${train_opts[@]}" 2>&1 | grep -v '^step\|checkpoint'
lap "caft trained"
run train --data "$out/task/train.jsonl" -o "$out/random" --ablate-random "$per_layer" \
    --ablate-layers "$layers" "${train_opts[@]}" 2>&1 | grep -v '^step\|checkpoint'
lap "random trained"

# 6. Accuracy in and out of distribution (the adapters without ablation, as at inference).
for m in base plain caft random; do
  adapter=()
  [ "$m" = base ] || adapter=(--adapter "$out/$m/adapter")
  run eval mc --data "$out/task/test.jsonl" "${adapter[@]}" --device "$device" \
      --threads "$threads" -o "$out/mc_$m.json" 2>&1
  lap "eval $m"
done

title="SmolLM2-135M-Instruct, pick the animal (spurious cue: sentiment)"
[ "$neutral" = 1 ] && title="$title, neutral question"
run eval chart --results "$out"/mc_{base,plain,caft,random}.json --labels base,plain,caft,random \
    --title "$title" -o "$out/chart.svg" | tee "$out/results.md"
lap "done"
echo "wrote $out/chart.svg and $out/results.md (commands: $out/commands.txt)" >&2
