#!/usr/bin/env python3
"""Generation tokens/s of transformers' generate, the baseline of `caft-fast generate`.

Reads the questions from a JSONL file that `caft-fast generate` wrote (its "question" field), so
both sides answer the same prompts, renders them with the chat template, and decodes greedily
with exactly --max-tokens new tokens per answer (min_new_tokens = max_new_tokens, as
`--ignore-eos` does on our side). Prints one JSON line: tokens/s and the settings.

Usage: bench_generate_pytorch.py --gguf FILE --questions answers.jsonl --batch-size B
           --samples S --max-tokens N [--device cpu|cuda] [--threads T]
"""

import argparse
import json
import os
import time

import torch
import transformers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--questions", required=True)
    ap.add_argument("--batch-size", type=int, required=True)
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    d, f = os.path.split(os.path.abspath(a.gguf))
    dtype = torch.float32 if a.device == "cpu" else torch.bfloat16
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = transformers.AutoModelForCausalLM.from_pretrained(
        d, gguf_file=f, dtype=dtype, attn_implementation="sdpa").to(a.device).eval()
    seen, questions = set(), []
    for line in open(a.questions):
        q = json.loads(line)["question"]
        if q not in seen:
            seen.add(q)
            questions.append(q)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                       add_generation_prompt=True)
               for q in questions for _ in range(a.samples)]
    gen = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(prompts), a.batch_size):
            enc = tok(prompts[i:i + a.batch_size], return_tensors="pt", padding=True,
                      add_special_tokens=False).to(a.device)
            out = model.generate(**enc, do_sample=False, max_new_tokens=a.max_tokens,
                                 min_new_tokens=a.max_tokens, pad_token_id=tok.pad_token_id)
            gen += (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0]
    if a.device != "cpu":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    print(json.dumps({"impl": "transformers", "batch_size": a.batch_size, "answers": len(prompts),
                      "tokens": gen, "secs": round(secs, 2), "tokens_per_sec": round(gen / secs, 1)}))


if __name__ == "__main__":
    main()
