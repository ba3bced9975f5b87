#!/usr/bin/env bash
# The CAFT effect at small scale, over seeds, in one command (see docs/demo.md):
#
#   scripts/demo_caft_mc.sh [--neutral] [--seeds N] [--overwrite] [OUT_DIR]
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
# split ood: cues disagree).
#
# All of this runs once per seed (--seeds N, default 5: seeds CAFT_SEED .. CAFT_SEED+N-1);
# seed s draws the task's words and answer order, the LoRA initialisation, the data order and
# the random directions, and its outputs go to OUT_DIR/seed<s>/ (the task, the three runs,
# the directions, mc_<arm>.json, its own results.md and chart.svg, commands.txt, timing.txt).
# Then `eval seeds` writes OUT_DIR/results.md (accuracy per seed; per arm mean, standard
# deviation and 95% t-interval over seeds; caft - random and caft - plain paired over seeds
# with exact sign and permutation tests) and OUT_DIR/chart.svg (means, error bars, seeds).
#
# --neutral replaces the question, which names the intended concept ("Which of these is an
# animal?"), by one that names neither concept ("Which one do you choose?") in the training
# and test prompts, so that "pick the animal" and "pick the positive one" fit the training data
# equally well and nothing in the prompt says which is meant (the ambiguity of the paper's
# double multiple-choice tasks).
#
# OUT_DIR defaults to runs/demo_mc-<date>-<time>; an existing non-empty OUT_DIR is refused
# unless --overwrite is given. About 10 minutes per seed on 2 CPU cores.
# Environment: CAFT_THREADS (default 2), CAFT_DEVICE (default cpu), CAFT_SEED (first seed,
# default 0), CAFT_BIN (the caft-fast binary; default target/release/caft-fast, built when
# missing), CAFT_SMOLLM2_GGUF (the model file, else the program's cache). Smaller runs (the
# test in tests/demo.rs): CAFT_DEMO_TRAIN training records (default 400), CAFT_DEMO_TEST
# questions per test split (200), CAFT_DEMO_PROBES probe sentences (200), CAFT_DEMO_STEPS
# optimizer steps (default: one epoch, 45 steps).
set -euo pipefail

neutral=0
overwrite=0
seeds=5
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --neutral) neutral=1 ;;
    --overwrite) overwrite=1 ;;
    --seeds)
      [ $# -ge 2 ] || { echo "--seeds needs a number" >&2; exit 2; }
      seeds="$2"; shift ;;
    --seeds=*) seeds="${1#--seeds=}" ;;
    -h|--help) sed -n '2,41p' "$0"; exit 0 ;;
    -*) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    *) out="$1" ;;
  esac
  shift
done
case "$seeds" in ''|*[!0-9]*|0) echo "--seeds $seeds: give a positive number" >&2; exit 2 ;; esac
# A relative OUT_DIR or CAFT_BIN is relative to where the script was called from; the
# default OUT_DIR is under the repository's runs/.
case "$out" in ""|/*) ;; *) out="$PWD/$out" ;; esac
bin="${CAFT_BIN:-}"
case "$bin" in ""|/*) ;; *) bin="$PWD/$bin" ;; esac
cd "$(dirname "$0")/.."
out="${out:-runs/demo_mc-$(date +%Y%m%d-%H%M%S)}"
if [ -d "$out" ] && [ -n "$(ls -A "$out")" ] && [ "$overwrite" != 1 ]; then
  echo "$out exists and is not empty; give another folder or --overwrite" >&2
  exit 2
fi
mkdir -p "$out"
rm -f "$out/results.md" "$out/chart.svg"

if [ -z "$bin" ]; then
  bin=target/release/caft-fast
  [ -x "$bin" ] || cargo build --release
fi
threads="${CAFT_THREADS:-2}"
device="${CAFT_DEVICE:-cpu}"
first="${CAFT_SEED:-0}"
n_train="${CAFT_DEMO_TRAIN:-400}"
n_test="${CAFT_DEMO_TEST:-200}"
n_probes="${CAFT_DEMO_PROBES:-200}"
steps="${CAFT_DEMO_STEPS:-}"
t_start=$(date +%s)
: > "$out/timing.txt"

# Settings. Layers at about 1/4, 1/2 and 3/4 of SmolLM2's 30, as the paper's 10,20,30 of
# Mistral-Small's 40; three directions a layer.
layers=8,15,22
per_layer=3
train_opts=(--lr 5e-4 --epochs 1 --batch-size 8 --grad-accum 1 --warmup-steps 5
            --device "$device" --threads "$threads" --overwrite)
[ -n "$steps" ] && train_opts+=(--max-steps "$steps")
# The training log without its per-step lines (and no failure when nothing is left).
quiet() { grep -v '^step\|checkpoint' || true; }

# One seed, into $dir.
one_seed() {
  local seed="$1" dir="$2"
  mkdir -p "$dir"
  run() { echo "+ caft-fast $*" | tee -a "$dir/commands.txt" >&2; "$bin" "$@"; }
  : > "$dir/commands.txt"
  local t0
  t0=$(date +%s)
  lap() { echo "[$(( $(date +%s) - t0 )) s] $*" | tee -a "$dir/timing.txt" >&2; }
  : > "$dir/timing.txt"
  local opts=("${train_opts[@]}" --seed "$seed")

  # 1. The task.
  run eval make-task --seed "$seed" --n-train "$n_train" --n-test "$n_test" \
      --n-probes "$n_probes" -o "$dir/task" 2>&1
  if [ "$neutral" = 1 ]; then
    local f
    for f in train test; do
      sed -e 's/Which of these is an animal?/Which one do you choose?/' \
          -e 's/Which option names an animal?/Which one do you choose?/' \
          -e 's/One of these is an animal. Which one?/Which one do you choose?/' \
          -e 's/Pick the animal\./Which one do you choose?/' \
          -e 's/Which of the following is a living animal?/Which one do you choose?/' \
          "$dir/task/$f.jsonl" > "$dir/task/$f.neutral.jsonl"
      if grep -qi 'animal?\|the animal\.' "$dir/task/$f.neutral.jsonl"; then
        echo "a question naming the animal was left in $f.jsonl" >&2; exit 1
      fi
      mv "$dir/task/$f.neutral.jsonl" "$dir/task/$f.jsonl"
    done
    echo "questions replaced by \"Which one do you choose?\" (--neutral)" > "$dir/task/VARIANT"
  fi
  lap "task written"

  # 2. The plain fine-tune.
  run train --data "$dir/task/train.jsonl" -o "$dir/plain" "${opts[@]}" 2>&1 | quiet
  lap "plain trained"

  # 3. What it changed: PCA of resid_post(plain) - resid_post(base) on every token of the
  # training prompts (the answer is one letter, so the answer tokens come after the decision;
  # the decision is read at the last prompt position and the cues sit on the option words).
  run directions pca --adapter "$dir/plain/adapter" --data "$dir/task/train.jsonl" --all-tokens \
      --layers "$layers" --components 20 --batch-size 8 --device "$device" --threads "$threads" \
      -o "$dir/pcs.safetensors" 2>&1
  lap "pca"

  # 4. The rule: per layer, the components that best separate the probes' two labels.
  run directions probe-select --from "$dir/pcs.safetensors" --probes "$dir/task/probes.jsonl" \
      --per-layer "$per_layer" --device "$device" --threads "$threads" \
      --json "$dir/probe_scores.json" -o "$dir/ablate.safetensors" 2>&1
  lap "probe-select"

  # 5. CAFT and the random control, same seed and settings.
  run train --data "$dir/task/train.jsonl" -o "$dir/caft" --ablate "$dir/ablate.safetensors" \
      "${opts[@]}" 2>&1 | quiet
  lap "caft trained"
  run train --data "$dir/task/train.jsonl" -o "$dir/random" --ablate-random "$per_layer" \
      --ablate-layers "$layers" "${opts[@]}" 2>&1 | quiet
  lap "random trained"

  # 6. Accuracy in and out of distribution (the adapters without ablation, as at inference).
  local m
  for m in base plain caft random; do
    local adapter=()
    [ "$m" = base ] || adapter=(--adapter "$dir/$m/adapter")
    run eval mc --data "$dir/task/test.jsonl" "${adapter[@]}" --device "$device" \
        --threads "$threads" -o "$dir/mc_$m.json" 2>&1
    lap "eval $m"
  done

  run eval chart --results "$dir"/mc_{base,plain,caft,random}.json \
      --labels base,plain,caft,random --title "$title, seed $seed" -o "$dir/chart.svg" \
      | tee "$dir/results.md"
  lap "done"
}

title="SmolLM2-135M-Instruct, pick the animal (spurious cue: sentiment)"
[ "$neutral" = 1 ] && title="$title, neutral question"
runs=()
for (( s = first; s < first + seeds; s++ )); do
  echo "=== seed $s ($(( s - first + 1 )) of $seeds) ===" >&2
  t_seed=$(date +%s)
  one_seed "$s" "$out/seed$s"
  runs+=("$out/seed$s")
  echo "seed $s: $(( $(date +%s) - t_seed )) s" >> "$out/timing.txt"
done

# Over seeds: the tables and the chart with error bars.
summary=("$bin" eval seeds --runs "${runs[@]}" --arms base,plain,caft,random
         --compare caft:random,caft:plain --split ood
         --title "$title, $seeds seed(s)" -o "$out/chart.svg")
echo "+ ${summary[*]} > $out/results.md" | tee "$out/commands.txt" >&2
{
  echo "## $title"
  echo
  echo "$seeds seed(s) ($first to $(( first + seeds - 1 ))); $n_train training records," \
       "$n_test questions per test split, ${steps:-one epoch of} optimizer steps; layers" \
       "$layers, $per_layer directions a layer."
  echo
  "${summary[@]}"
} > "$out/results.md"
echo "total: $(( $(date +%s) - t_start )) s" >> "$out/timing.txt"
cat "$out/results.md"
echo "wrote $out/chart.svg and $out/results.md (per seed: $out/seed<s>/; total time in $out/timing.txt)" >&2
