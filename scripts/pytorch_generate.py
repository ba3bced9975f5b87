#!/usr/bin/env python3
"""Baseline of `caft-fast bench-generate`: transformers' greedy generate with its KV cache on a
random-weight model of the same preset (see pytorch_step.py), random prompt ids, exactly
--new-tokens new tokens per sequence (min_new_tokens = max_new_tokens). Prints one JSON line
per batch size, with the same keys as bench-generate where they mean the same thing.

    python3 scripts/pytorch_generate.py --config llama-3.2-1b --batch 1,32 --prompt-len 128 \\
        --new-tokens 128 --device cuda
"""

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pytorch_step import CONFIGS, random_model, sync  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True, choices=list(CONFIGS))
    ap.add_argument("--batch", default="1,32")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = random_model(a.config, None, device, dtype, 0).eval()
    model.generation_config.pad_token_id = 0
    vocab = model.config.vocab_size
    g = torch.Generator(device="cpu").manual_seed(1)
    for batch in [int(b) for b in a.batch.split(",")]:
        ids = torch.randint(0, vocab, (batch, a.prompt_len), generator=g).to(device)
        mask = torch.ones_like(ids)

        def gen(n):
            with torch.inference_mode():
                return model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                      max_new_tokens=n, min_new_tokens=n)
        gen(4)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        out = gen(a.new_tokens)
        sync(device)
        secs = time.perf_counter() - t0
        new = out.shape[1] - a.prompt_len
        print(json.dumps({"impl": "transformers", "model": f"random:{a.config}", "batch": batch,
                          "prompt_len": a.prompt_len, "new_tokens": new,
                          "tokens_per_s": batch * new / secs}), flush=True)


if __name__ == "__main__":
    main()
