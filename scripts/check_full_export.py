#!/usr/bin/env python3
"""Check a full-fine-tuning export of caft-fast against Hugging Face transformers.

A full fine-tuning run writes a Hugging Face model folder (config.json, model.safetensors or
sharded model-0000x-of-0000n.safetensors + model.safetensors.index.json, tokenizer files).
This script loads that folder with transformers AutoModelForCausalLM (f32, eager attention) and checks:
  - config.json loads and names the expected architecture (--arch, or the base model's when --base
    is given, or else the one config.architectures names) and transformers builds that class;
  - every weight of the model is in the files and every tensor in the files is used (no missing,
    unexpected or shape-mismatched keys: a missing lm_head would otherwise be randomly initialised);
  - with --caft-logits: its logits on fixed token ids match caft-fast's own logits for the trained
    model (JSON {"ids": [[...]], "logits": [[...]]}, the format scripts/check_adapter_peft.py reads:
    ids [b][t], logits [b][t][vocab] or [b][t*vocab]);
  - with --base: the export's logits differ from the base model's (so a no-op training cannot pass),
    and the export keeps the base's model type and shapes.
It prints the dtype of the stored weights as saved (from the safetensors headers) and config.json's
dtype, and whether a tokenizer is present and loads (--require-tokenizer makes a missing one fail).
With --write-reference FILE it saves the ids and the transformers logits in that same JSON format.

Exit status 0 when every check passes (logit comparisons: relative L2 error within --tol), 1 otherwise.

Example:
  python3 scripts/check_full_export.py runs/full/final --base tests/fixtures/tiny/llama \\
      --caft-logits /tmp/caft_logits.json
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from check_adapter_peft import rel_err  # noqa: E402  (same relative L2 error as the adapter check)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_model(path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    return model.eval(), info


def read_caft_logits(path):
    with open(path) as f:
        j = json.load(f)
    ids = torch.tensor(j["ids"], dtype=torch.long)
    if ids.dim() != 2:
        raise SystemExit(f"{path}: ids must be [batch][seq], got shape {list(ids.shape)}")
    logits = torch.tensor(j["logits"], dtype=torch.float32).reshape(ids.shape[0], ids.shape[1], -1)
    return ids, logits


def stored_files(folder):
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    return files


def stored_dtypes(folder, files):
    """{dtype as saved (safetensors header, e.g. F32, BF16): number of tensors}."""
    from safetensors import safe_open

    counts = {}
    for name in files:
        with safe_open(os.path.join(folder, name), framework="pt") as f:
            for k in f.keys():
                dt = f.get_slice(k).get_dtype()
                counts[dt] = counts.get(dt, 0) + 1
    return counts


def stored_tensor(folder, files, key):
    from safetensors import safe_open

    for name in files:
        with safe_open(os.path.join(folder, name), framework="pt") as f:
            if key in f.keys():
                return f.get_tensor(key)
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="exported model folder (caft-fast full fine-tuning output)")
    ap.add_argument("--caft-logits", help="JSON {ids, logits} computed by caft-fast for the trained model")
    ap.add_argument("--base", help="base model folder: the export must differ from it")
    ap.add_argument("--arch", help="expected architecture, e.g. LlamaForCausalLM (default: the base's, "
                                   "else config.architectures[0])")
    ap.add_argument("--batch", type=int, default=2, help="rows of random ids (without --caft-logits)")
    ap.add_argument("--seq", type=int, default=16, help="tokens per row (without --caft-logits)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tol", type=float, default=1e-4, help="relative L2 error allowed")
    ap.add_argument("--require-tokenizer", action="store_true",
                    help="fail when the folder has no tokenizer files (one that is there must load in any case)")
    ap.add_argument("--write-reference", help="save the ids and the transformers logits here (JSON {ids, logits})")
    args = ap.parse_args()

    from transformers import AutoConfig

    rows = []  # (check, value shown, ok)

    config = AutoConfig.from_pretrained(args.model)
    base_config = AutoConfig.from_pretrained(args.base) if args.base else None
    archs = list(getattr(config, "architectures", None) or [])
    want = args.arch or ((base_config.architectures or [None])[0] if base_config else None) or (archs or [None])[0]
    rows.append(("config.json architectures", f"{archs} (want {want})", want is not None and archs == [want]))

    model, info = load_model(args.model)
    cls = type(model).__name__
    rows.append(("transformers builds", cls, cls == want))
    bad = {k: list(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    n_bad = sum(len(v) for v in bad.values())
    shown = "; ".join(f"{k} {v[:4]}{' ...' if len(v) > 4 else ''}" for k, v in bad.items() if v) or "none"
    rows.append(("missing/unexpected/mismatched weights", shown, n_bad == 0))
    if base_config is not None:
        keys = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")
        diff = [k for k in keys if getattr(config, k, None) != getattr(base_config, k, None)]
        rows.append(("config shapes equal the base's", f"differ: {diff}" if diff else "equal", not diff))

    files = stored_files(args.model)
    dtypes = stored_dtypes(args.model, files)
    if getattr(config, "tie_word_embeddings", False):
        # Tied: transformers loads one tensor for both and accepts a stored lm_head.weight without a word,
        # so one that is stored must equal the embedding (or the loaded model is not the trained one).
        head = stored_tensor(args.model, files, "lm_head.weight")
        if head is not None:
            emb = stored_tensor(args.model, files, "model.embed_tokens.weight")
            same = emb is not None and head.shape == emb.shape and torch.equal(head, emb)
            rows.append(("tied: stored lm_head equals embedding", "equal" if same else "differs", same))
    loaded = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()})
    print(f"model {args.model}: {cls}, {len(files)} safetensors file(s) {files}")
    print(f"weights as saved: {dtypes}; config.json dtype: {getattr(config, 'dtype', None)}; "
          f"loaded for the check as {loaded}")

    tok_files = [f for f in TOKENIZER_FILES if os.path.exists(os.path.join(args.model, f))]
    if tok_files:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(args.model)
            # Every id the tokenizer can produce must index the embedding.
            rows.append(("tokenizer loads", f"{type(tok).__name__}, {len(tok)} tokens, vocab {config.vocab_size}",
                         len(tok) <= config.vocab_size))
        except Exception as e:  # noqa: BLE001 (report any loading error as a failed check)
            rows.append(("tokenizer loads", f"{type(e).__name__}: {str(e)[:120]}", False))
    else:
        rows.append(("tokenizer files", "none", not args.require_tokenizer))

    vocab = config.vocab_size
    caft = None
    if args.caft_logits:
        ids, caft = read_caft_logits(args.caft_logits)
    else:
        g = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise SystemExit(f"token ids outside [0, {vocab})")

    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
        base_logits = None
        if args.base:
            base, _ = load_model(args.base)
            base_logits = base(input_ids=ids).logits.float()
            del base

    rows.append(("export logits finite", "", bool(torch.isfinite(logits).all())))
    if caft is not None:
        if caft.shape != logits.shape:
            rows.append(("caft-fast logits shape", f"{list(caft.shape)} vs {list(logits.shape)}", False))
        else:
            e = rel_err(caft, logits)
            rows.append(("caft-fast logits vs transformers", f"{e:.3e}", e <= args.tol))
    if base_logits is not None:
        # The training must move the logits well beyond the tolerance, or the comparison above could
        # not tell a trained export from the base model.
        e = rel_err(logits, base_logits)
        rows.append(("export differs from the base", f"{e:.3e}", e > 10 * args.tol))

    print(f"ids {list(ids.shape)}, vocab {vocab}, tol {args.tol:g}")
    print(f"{'check':40} {'value':>40}  result")
    for name, v, ok in rows:
        print(f"{name:40} {v:>40}  {'ok' if ok else 'FAIL'}")

    if args.write_reference:
        with open(args.write_reference, "w") as f:
            json.dump({"ids": ids.tolist(), "logits": logits.tolist()}, f)
        print(f"wrote {args.write_reference}")

    return 0 if all(ok for _, _, ok in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
