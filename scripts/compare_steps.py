#!/usr/bin/env python3
"""The table of scripts/gpu_compare.sh: training-step results of caft-fast and PyTorch side by
side, with the ratios caft-fast / PyTorch per shape and ablation setting.

Usage: compare_steps.py [--jsonl OUT] SIDE:SHAPE:FILE...

Each FILE holds JSON lines: `caft-fast bench-step --json` (one line) or
`scripts/pytorch_step.py --json` (one line per run). SIDE (pytorch or caft-fast) and SHAPE
(e.g. qwen2.5-1.5b) are given here rather than read from the lines, because the lines do not
agree on them: pytorch_step.py writes its own "impl" ("pytorch+peft" for LoRA, "pytorch" for
full) and calls the shape "config"; bench-step writes neither. The rows get "side" and "shape"
keys (a line that already has one of them with another value is refused) and, with --jsonl,
are written there, one a line. Missing files are skipped (a run that failed).

Keys read: tokens_per_s; step_s_mean (pytorch) or step_s (caft-fast, the mean; a list is
averaged); peak_gpu_mem_mb or device_mem_mb; achieved_tflops; ablate (pytorch) and
ablate_layers (both; empty or absent: no ablation).
"""

import json
import os
import sys

SIDES = ("pytorch", "caft-fast")


def read_rows(specs):
    rows = []
    for spec in specs:
        parts = spec.split(":", 2)
        if len(parts) != 3 or parts[0] not in SIDES:
            sys.exit(f"{spec!r}: expected SIDE:SHAPE:FILE with SIDE one of {', '.join(SIDES)}")
        side, shape, path = parts
        if not os.path.exists(path):
            continue
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                except ValueError as e:
                    sys.exit(f"{path}:{n}: not JSON ({e})")
                for key, want in (("side", side), ("shape", shape)):
                    if r.get(key, want) != want:
                        sys.exit(f"{path}:{n}: {key} is {r[key]!r}, but {spec!r} says {want!r}")
                    r[key] = want
                rows.append(r)
    return rows


def ablated(r):
    if r["side"] == "pytorch" and "ablate" in r:
        return bool(r["ablate"])
    return bool(r.get("ablate_layers"))


def num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def mem(r):
    v = r.get("peak_gpu_mem_mb") or r.get("device_mem_mb")
    return v if num(v) else float("nan")


def step_s(r):
    step = r.get("step_s_mean") if r["side"] == "pytorch" else r.get("step_s")
    if isinstance(step, list):
        step = sum(step) / len(step) if step else None
    return step if num(step) else float("nan")


def ratio(a, b):
    return a / b if num(a) and num(b) and b else float("nan")


def table(rows):
    out = [f"{'shape':14} {'impl':10} {'ablation':8} {'tokens/s':>10} {'step ms':>9} "
           f"{'mem MiB':>9} {'TFLOP/s':>8}"]
    for r in rows:
        tflops = r.get("achieved_tflops")
        out.append(f"{r['shape']:14} {r['side']:10} {('yes' if ablated(r) else 'no'):8} "
                   f"{r['tokens_per_s']:10.0f} {1000 * step_s(r):9.1f} {mem(r):9.0f} "
                   f"{tflops if num(tflops) else float('nan'):8.1f}")
    for shape in sorted({r["shape"] for r in rows}):
        for ab in (True, False):
            pt = [r for r in rows if r["shape"] == shape and r["side"] == "pytorch" and ablated(r) == ab]
            cf = [r for r in rows if r["shape"] == shape and r["side"] == "caft-fast" and ablated(r) == ab]
            if pt and cf:
                out.append(f"{shape} ablation={'yes' if ab else 'no'}: caft-fast/pytorch tokens/s = "
                           f"{ratio(cf[0]['tokens_per_s'], pt[0]['tokens_per_s']):.2f}x, "
                           f"memory = {ratio(mem(cf[0]), mem(pt[0])):.2f}x")
        cf = {ablated(r): r for r in rows if r["shape"] == shape and r["side"] == "caft-fast"}
        if True in cf and False in cf:
            overhead = 100 * (ratio(cf[False]["tokens_per_s"], cf[True]["tokens_per_s"]) - 1)
            out.append(f"{shape}: caft-fast ablation overhead = {overhead:+.2f}%")
    return out


def main(argv):
    out = None
    if argv[:1] == ["--jsonl"]:
        if len(argv) < 2:
            sys.exit("--jsonl needs a file")
        out, argv = argv[1], argv[2:]
    if not argv:
        sys.exit(__doc__)
    rows = read_rows(argv)
    if out:
        with open(out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    print("\n".join(table(rows)))


if __name__ == "__main__":
    main(sys.argv[1:])
