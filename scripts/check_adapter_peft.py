#!/usr/bin/env python3
"""Check a caft-fast adapter against Hugging Face transformers + PEFT.

Loads the base model with transformers (f32, eager attention), applies the adapter with
peft.PeftModel.from_pretrained, and compares its logits on fixed token ids with
  - caft-fast's own logits (--caft-logits, a JSON {"ids": [[...]], "logits": [[...]]} that
    tests/train/library.rs writes when CAFT_DUMP_LOGITS names a file),
  - the merged model folder `caft-fast train --merge` writes (--merged), loaded without PEFT.
It also checks that the adapter changes the base model's logits (a zero adapter would pass
every comparison trivially). With --write-reference it saves the PEFT logits and the ids
(safetensors: input_ids int64 [b, t], logits f32 [b, t, vocab]), which is how
tests/fixtures/tiny/llama-adapter/peft_logits.safetensors is made.

Exit status 0 when every comparison is within --tol (relative L2 error), 1 otherwise.

Example (the committed fixture):
  python3 scripts/check_adapter_peft.py --base tests/fixtures/tiny/llama \
      --adapter tests/fixtures/tiny/llama-adapter --seq 12 --batch 2
"""

import argparse
import json
import os
import sys

import torch


def load_causal_lm(path):
    from transformers import AutoModelForCausalLM

    kwargs = dict(dtype=torch.float32, attn_implementation="eager")
    if os.path.isfile(path) and path.endswith(".gguf"):
        return AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path) or ".", gguf_file=os.path.basename(path), **kwargs
        )
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def rel_err(a, b):
    a = a.double()
    b = b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="base model: Hugging Face folder or .gguf file")
    ap.add_argument("--adapter", required=True, help="PEFT adapter folder written by caft-fast")
    ap.add_argument("--merged", help="merged model folder (caft-fast train --merge)")
    ap.add_argument("--caft-logits", help="JSON {ids, logits} computed by caft-fast")
    ap.add_argument("--batch", type=int, default=2, help="rows of random ids (without --caft-logits)")
    ap.add_argument("--seq", type=int, default=16, help="tokens per row (without --caft-logits)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tol", type=float, default=1e-4, help="relative L2 error allowed")
    ap.add_argument("--write-reference", help="save the ids and PEFT logits here (safetensors)")
    args = ap.parse_args()

    from peft import PeftModel

    torch.manual_seed(args.seed)
    base = load_causal_lm(args.base)
    base.eval()
    vocab = base.config.vocab_size

    caft = None
    if args.caft_logits:
        with open(args.caft_logits) as f:
            j = json.load(f)
        ids = torch.tensor(j["ids"], dtype=torch.long)
        caft = torch.tensor(j["logits"], dtype=torch.float32).reshape(ids.shape[0], ids.shape[1], -1)
    else:
        g = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g)

    with torch.no_grad():
        base_logits = base(input_ids=ids).logits.float()
        model = PeftModel.from_pretrained(base, args.adapter)
        model.eval()
        peft_logits = model(input_ids=ids).logits.float()
        merged_logits = None
        if args.merged:
            merged = load_causal_lm(args.merged)
            merged.eval()
            merged_logits = merged(input_ids=ids).logits.float()

    rows = []
    changed = rel_err(peft_logits, base_logits)
    # The adapter must move the logits well beyond the tolerance, or the comparisons below
    # could not tell a wrong adapter from none.
    rows.append(("adapter changes the base logits", changed, changed > 10 * args.tol))
    if caft is not None:
        e = rel_err(caft, peft_logits)
        rows.append(("caft-fast logits vs transformers+PEFT", e, e <= args.tol))
    if merged_logits is not None:
        e = rel_err(merged_logits, peft_logits)
        rows.append(("merged model (no PEFT) vs transformers+PEFT", e, e <= args.tol))

    print(f"base {args.base}, adapter {args.adapter}, ids {list(ids.shape)}, vocab {vocab}")
    print(f"{'check':48} {'rel. L2 error':>14}  result")
    for name, e, ok in rows:
        print(f"{name:48} {e:14.3e}  {'ok' if ok else 'FAIL'}")

    if args.write_reference:
        from safetensors.torch import save_file

        save_file(
            {"input_ids": ids.to(torch.int64).contiguous(), "logits": peft_logits.contiguous()},
            args.write_reference,
            metadata={
                "made_by": "scripts/check_adapter_peft.py",
                "torch": torch.__version__,
                "transformers": __import__("transformers").__version__,
                "peft": __import__("peft").__version__,
            },
        )
        print(f"wrote {args.write_reference}")

    return 0 if all(ok for _, _, ok in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
