#!/usr/bin/env bash
# Build everything the GPU machine runs (it has no Rust toolchain) and put it in stage/:
#   stage/caft-fast             the release binary
#   stage/tests/<name>          the test executables with GPU tests (cuda_parity, ...)
#   stage/benches/<name>        the benchmark executables that use the GPU (cuda_ops, ...)
#   stage/scripts/              gpu_check.sh and the scripts it calls
# Executables are stripped; the total is checked against a 60 MiB budget (the copy to the GPU
# machine is limited). Then, on the GPU machine: scripts/gpu_check.sh [LOGDIR].
set -euo pipefail
cd "$(dirname "$0")/.."

stage=stage
budget_mib=60
rm -rf "$stage"
mkdir -p "$stage/tests" "$stage/benches" "$stage/scripts"

cargo build --release --bin caft-fast
cp target/release/caft-fast "$stage/caft-fast"

# Paths of the test and bench executables, from cargo's JSON messages.
executables() { # cargo args... (test --release, or bench: the bench profile is optimised)
  cargo "$@" --no-run --message-format=json 2>/dev/null |
    python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] != ["bin"]:
        print(m["target"]["kind"][0], m["target"]["name"], m["executable"])
'
}

# Only what the GPU machine has a reason to run (the rest runs in CI): test executables with a
# test marked "needs a CUDA GPU" (the library's unit tests count as "lib"; a test executable is
# tests/<name>.rs or the folder tests/<name>/ with a main.rs, not a helper folder such as
# tests/cuda_emulated/), benches that mention CUDA. STAGE_ALL=1 stages everything.
wanted() { # kind name
  [ "${STAGE_ALL:-0}" = 1 ] && return 0
  case $1 in
    lib) grep -rqs "needs a CUDA GPU" src ;;
    test) grep -qs "needs a CUDA GPU" "tests/$2.rs" ||
            { [ -e "tests/$2/main.rs" ] && grep -rqs "needs a CUDA GPU" "tests/$2"; } ;;
    bench) grep -qis "cuda" "benches/$2.rs" ;;
    *) return 1 ;;
  esac
}
{ executables test --release --tests; executables bench --benches; } | sort -u | while read -r kind name path; do
  wanted "$kind" "$name" || continue
  case "$kind" in
    test) cp "$path" "$stage/tests/$name" ;;
    lib) cp "$path" "$stage/tests/lib" ;;
    bench) cp "$path" "$stage/benches/$name" ;;
  esac
done

for f in "$stage/caft-fast" "$stage"/tests/* "$stage"/benches/*; do
  strip "$f" 2>/dev/null || true
done
for s in gpu_check.sh gpu_compare.sh compare_steps.py gpu_generate.sh pytorch_step.py pytorch_generate.py; do
  [ -e "scripts/$s" ] && cp "scripts/$s" "$stage/scripts/"
done

total_kib=$(du -sk "$stage" | cut -f1)
echo "staged into $stage/: $(( total_kib / 1024 )) MiB"
ls -l "$stage" "$stage/tests" "$stage/benches" | sed 's/^/  /'
if [ "$total_kib" -gt $(( budget_mib * 1024 )) ]; then
  echo "error: stage/ is over the ${budget_mib} MiB budget" >&2
  exit 1
fi
