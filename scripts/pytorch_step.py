#!/usr/bin/env python3
"""Baseline: time training steps with PyTorch + transformers (+ PEFT for LoRA) + the paper's
ablation hook.

--method lora (the default) is what a CAFT user would run today: a Hugging Face model, PEFT LoRA
(r=32, alpha=64, rsLoRA, dropout 0, all seven projections), torch.optim.AdamW over the LoRA
parameters (no gradient clipping), weights and activations in --dtype.

--method full trains every parameter, no PEFT: the model's weights are f32 (the master
weights), torch.optim.AdamW (fused=True on cuda, PyTorch's default implementation on cpu) over
all of them in the transformers Trainer's two groups (weight decay on everything but biases and
norm gains), the gradient norm clipped to 1.0 as the Trainer does, the same lr, betas, eps and
weight decay as LoRA. On cuda the forward (loss included) runs under
torch.autocast("cuda", dtype=torch.bfloat16) and the backward outside it, what the Trainer does
with bf16=True on an f32 model (--dtype f32 turns autocast off: f32 throughout); on cpu
everything is f32 (--dtype bf16 is refused).

Both methods put forward hooks on chosen decoder layers that replace the layer output h by
h - (h @ Q) @ Q.T (Q random orthonormal, in the weights' dtype). Models are built from config
dicts with random weights (no downloads), except smollm2-135m-gguf, which loads a real GGUF.
Attention: SDPA, except eager for gemma-2-2b (transformers' SDPA path refuses Gemma-2's
attention soft-capping); --attn overrides.

Examples:
    python3 scripts/pytorch_step.py --config tiny --device cpu --ablate-layers 1,2 --ablate-k 4 --both
    python3 scripts/pytorch_step.py --config qwen2.5-1.5b --batch 8 --seq 1024 --dtype bf16 \\
        --device cuda --ablate-layers 10,20 --ablate-k 8 --steps 5 --warmup 3 --both --json out.jsonl
    python3 scripts/pytorch_step.py --config gemma-2-2b --method full --batch 16 --seq 512 \\
        --device cuda --ablate-layers 6,12,18 --ablate-k 8 --json full.jsonl

Prints one JSON line per run (with / without ablation) and writes the same lines to --json.
Keys: method, tokens_per_s, step_s_mean, step_s_median, step_s (all timed steps),
peak_gpu_mem_mb (cuda, torch.cuda.max_memory_allocated, reset before each run) or peak_rss_mb
(cpu, ru_maxrss: a process-lifetime peak, so with --both the second run reports max of both),
build_s, loss, trained_params (lora_params: the same for LoRA, null for full; lora_r and
lora_alpha null for full), dtype (the compute dtype), master_dtype and autocast,
model_tflop_per_step and achieved_tflops (the model FLOPs caft-fast bench-step counts: 4 x matrix
parameters x tokens for LoRA, 6 x for full, plus causal attention).
"""

import argparse
import json
import os
import resource
import sys
import time

import torch
import transformers
import peft

CONFIGS = {
    "qwen2.5-1.5b": ("Qwen2ForCausalLM", dict(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True, rms_norm_eps=1e-6,
        max_position_embeddings=32768, use_sliding_window=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "llama-3.2-1b": ("LlamaForCausalLM", dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
        rms_norm_eps=1e-5, max_position_embeddings=131072,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192})),
    "gemma-2-2b": ("Gemma2ForCausalLM", dict(
        vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=8192, rms_norm_eps=1e-6, tie_word_embeddings=True,
        query_pre_attn_scalar=256, sliding_window=4096, final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "tiny": ("LlamaForCausalLM", dict(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, rms_norm_eps=1e-5,
        max_position_embeddings=4096, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
}

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, choices=list(CONFIGS) + ["smollm2-135m-gguf"])
    ap.add_argument("--gguf", help="path of the SmolLM2 GGUF (for --config smollm2-135m-gguf)")
    ap.add_argument("--method", choices=["lora", "full"], default="lora",
                    help="lora: PEFT adapters on frozen weights; full: every parameter (see above)")
    ap.add_argument("--attn", choices=["sdpa", "eager"], default=None,
                    help="attention implementation (default: eager for gemma-2-2b, else sdpa)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--dtype", choices=["bf16", "f32"], default=None,
                    help="default: bf16 on cuda, f32 on cpu; with --method full the compute dtype "
                         "(bf16 = autocast over f32 weights, cuda only)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ablate-layers", default="10,20")
    ap.add_argument("--ablate-k", type=int, default=8)
    ap.add_argument("--no-ablate", action="store_true", help="run without the ablation hooks")
    ap.add_argument("--both", action="store_true", help="run with and then without the hooks")
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before each run")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--layers", type=int, default=None, help="override the layer count (for quick tests)")
    ap.add_argument("--lora-r", type=int, default=32)
    ap.add_argument("--lora-alpha", type=float, default=64.0)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--max-grad-norm", type=float, default=1.0,
                    help="--method full: clip the gradient norm to this (0: no clipping)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the JSON lines here")
    return ap.parse_args()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_model(name, layers, device, dtype, seed, attn):
    """A model of config `name` with random weights (normal 0.02, norms 1, biases 0), built
    directly on `device` in `dtype` without Hugging Face's initialisation."""
    cls_name, cfg = CONFIGS[name]
    cfg = dict(cfg)
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    cls = getattr(transformers, cls_name)
    config = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))(**cfg)
    config._attn_implementation = attn
    with torch.device(device), transformers.initialization.no_init_weights():
        model = cls._from_config(config, dtype=dtype, attn_implementation=attn)
    if config.tie_word_embeddings:
        model.tie_weights()  # not done under no_init_weights
        assert model.lm_head.weight is model.model.embed_tokens.weight
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.fill_(1.0)
            elif n.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=g)
    return model


def build_model(args, device, dtype, attn):
    """The model in `dtype` with PEFT LoRA (--method lora), or as it is (--method full)."""
    t0 = time.perf_counter()
    if args.config == "smollm2-135m-gguf":
        if not args.gguf or not os.path.exists(args.gguf):
            sys.exit("--gguf PATH (an existing SmolLM2 GGUF file) is required for smollm2-135m-gguf")
        folder, name = os.path.dirname(os.path.abspath(args.gguf)), os.path.basename(args.gguf)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32, attn_implementation=attn)
        if args.layers is not None:
            model.model.layers = model.model.layers[: args.layers]
            model.config.num_hidden_layers = args.layers
        model = model.to(device=device, dtype=dtype)
    else:
        model = random_model(args.config, args.layers, device, dtype, args.seed, attn)
    model.config.use_cache = False
    if args.method == "lora":
        lcfg = peft.LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, use_rslora=True, lora_dropout=0.0,
                               target_modules=TARGETS, bias="none", task_type="CAUSAL_LM")
        model = peft.get_peft_model(model, lcfg)
    model.train()
    sync(device)
    return model, time.perf_counter() - t0


def random_orthonormal(hidden, k, device, dtype, gen):
    q, _ = torch.linalg.qr(torch.randn(hidden, k, generator=gen, dtype=torch.float64))
    return q.to(device=device, dtype=dtype)


def add_hooks(model, layers, k, device, dtype, seed):
    gen = torch.Generator().manual_seed(seed + 17)
    # The decoder layers: under PEFT's wrapper (LoRA) or the model's own (full).
    blocks = (model.base_model.model if isinstance(model, peft.PeftModel) else model).model.layers
    hidden = model.config.hidden_size
    handles = []
    for L in layers:
        if not 0 <= L < len(blocks):
            sys.exit(f"ablation layer {L} out of range (model has {len(blocks)} layers)")
        q = random_orthonormal(hidden, k, device, dtype, gen)

        def hook(_mod, _inp, out, q=q):
            if isinstance(out, tuple):
                h = out[0]
                return (h - (h @ q) @ q.T,) + tuple(out[1:])
            return out - (out @ q) @ q.T

        handles.append(blocks[L].register_forward_hook(hook))
    return handles


def no_decay(name):
    """The transformers Trainer's rule: no weight decay on biases and norm gains."""
    return name.endswith(".bias") or name.endswith("norm.weight")


def step_flops(config, tokens, batch, seq, full):
    """Model FLOPs of one step, counted as caft-fast bench-step does: 2 x matrix parameters per
    token forward, 2 x backward to the inputs, 2 x more for the weight gradients (full only),
    plus causal attention (forward 2 x seq^2 x head_dim per head and layer, 3.5 x that in all)."""
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    hd = getattr(config, "head_dim", None) or d // heads
    layers = config.num_hidden_layers
    p = layers * (d * hd * (2 * heads + 2 * kv) + 3 * d * f) + v * d
    attn = layers * batch * heads * seq * seq * hd * 2.0
    return (6.0 if full else 4.0) * p * tokens + 3.5 * attn


def run(model, args, device, dtype, ablate, build_s, attn):
    full = args.method == "full"
    # Autocast: full fine-tuning on cuda in bf16 (f32 weights; bf16 products and activations).
    autocast = full and device.type == "cuda" and args.compute_dtype == torch.bfloat16
    layers = [int(x) for x in args.ablate_layers.split(",") if x.strip()] if ablate else []
    handles = add_hooks(model, layers, args.ablate_k, device, dtype, args.seed) if ablate else []
    if full:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        groups = [
            {"params": [p for n, p in named if not no_decay(n)], "weight_decay": 0.01},
            {"params": [p for n, p in named if no_decay(n)], "weight_decay": 0.0},
        ]
        extra = {"fused": True} if device.type == "cuda" else {}
        opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, **extra)
    else:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    vocab = model.config.vocab_size
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times, loss_v = [], None
    for i in range(args.warmup + args.steps):
        ids = torch.randint(0, vocab, (args.batch, args.seq), device=device, generator=gen)
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        if full and args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        dt = time.perf_counter() - t0
        loss_v = float(out.loss.detach())
        del out
        if i >= args.warmup:
            times.append(dt)
    for h in handles:
        h.remove()
    times_sorted = sorted(times)
    mean = sum(times) / len(times)
    trained = sum(p.numel() for p in params)
    tokens = args.batch * args.seq
    flops = step_flops(model.config, tokens, args.batch, args.seq, full)
    res = {
        "impl": "pytorch" if full else "pytorch+peft",
        "method": args.method,
        "config": args.config,
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "dtype": "bf16" if (autocast or dtype == torch.bfloat16) else "f32",
        "master_dtype": "f32" if full else None,
        "autocast": autocast,
        "optimizer": "AdamW(fused)" if full and device.type == "cuda" else "AdamW",
        "max_grad_norm": args.max_grad_norm if full else None,
        "attn": attn,
        "batch": args.batch, "seq": args.seq,
        "layers": model.config.num_hidden_layers,
        "threads": torch.get_num_threads(),
        "ablate": ablate,
        "ablate_layers": layers, "ablate_k": args.ablate_k if ablate else 0,
        "lora_r": None if full else args.lora_r,
        "lora_alpha": None if full else args.lora_alpha,
        "rslora": None if full else True,
        "lora_params": None if full else trained,
        "trained_params": trained,
        "steps": args.steps, "warmup": args.warmup,
        "step_s": [round(t, 5) for t in times],
        "step_s_mean": mean,
        "step_s_median": times_sorted[len(times) // 2],
        "tokens_per_s": tokens / mean,
        "model_tflop_per_step": flops / 1e12,
        "achieved_tflops": flops / mean / 1e12,
        "loss": loss_v,
        "build_s": build_s,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__},
    }
    if device.type == "cuda":
        res["peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return res


def main():
    args = parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda but torch sees no CUDA device")
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "f32")
    args.compute_dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    if args.method == "full":
        if device.type == "cpu" and dtype_name == "bf16":
            sys.exit("--method full on cpu runs in f32 (bf16 autocast is for cuda)")
        dtype = torch.float32  # the master weights; bf16 on cuda comes from autocast
    else:
        dtype = args.compute_dtype
    attn = args.attn or ("eager" if args.config == "gemma-2-2b" else "sdpa")
    torch.manual_seed(args.seed)
    model, build_s = build_model(args, device, dtype, attn)
    modes = [True, False] if args.both else [not args.no_ablate]
    lines = []
    for ablate in modes:
        res = run(model, args, device, dtype, ablate, build_s, attn)
        line = json.dumps(res)
        print(line, flush=True)
        lines.append(line)
    if args.json:
        with open(args.json, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
