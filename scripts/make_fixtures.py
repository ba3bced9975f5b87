#!/usr/bin/env python3
"""Reference fixtures for caft-fast, produced with Hugging Face transformers + PEFT.

Pinned versions (a warning is printed when the installed ones differ):
    torch==2.15.0  transformers==5.23.0  peft==0.21.2  safetensors  numpy

Everything runs on CPU in float32 with attn_implementation="eager" and fixed seeds.

Writes (paths relative to the repository root):
    tests/fixtures/tiny/{llama,qwen2,mistral,qwen3,gemma2}/
        config.json, model.safetensors      random-weight model, as save_pretrained writes them
        directions.safetensors              raw (non-orthonormal) directions, `layer.<L>` [k, hidden]
        fixture.safetensors, fixture.json   LoRA init, forward/backward outputs, 3 AdamW steps
                                            (qwen3, gemma2 also: greedy generation ids)
        full.safetensors, full.json         full fine-tuning (every weight, no LoRA) of the same model,
                                            ablation and data: forward/backward grads, 3 AdamW steps;
                                            computed from the files above without rewriting them
    tests/fixtures/tiny/llama_packed/
        fixture.safetensors, fixture.json   the llama fixture's model, LoRA and ablation on 5 sequences
                                            packed padding-free in one row, and the same run padded
    tests/fixtures/smollm2/
        tokenizer.json                      encode and chat-template cases
        logits.safetensors                  logits of the real GGUF model on 3 chat prompts
        greedy.json                         greedy model.generate on 4 chat prompts (ids, text, margins)

Usage:
    python3 scripts/make_fixtures.py [--only tiny|qwen3|gemma2|packed|full|smollm2|greedy] [--gguf PATH]
See docs/fixtures.md for what every tensor holds.
"""

import argparse
import json
import math
import os
import re
import shutil
import sys
import warnings

PINNED = {"torch": "2.15.0", "transformers": "5.23.0", "peft": "0.21.2"}

import torch  # noqa: E402
import transformers  # noqa: E402
import peft  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(REPO, "tests", "fixtures")
DEFAULT_GGUF = os.path.join(REPO, ".cache", "smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def check_versions():
    found = {"torch": torch.__version__.split("+")[0],
             "transformers": transformers.__version__,
             "peft": peft.__version__}
    for k, want in PINNED.items():
        if found[k] != want:
            warnings.warn(f"{k} {found[k]} installed, fixtures were pinned to {want}; outputs may differ")
    return found


# --------------------------------------------------------------------------------------------
# Tiny models
# --------------------------------------------------------------------------------------------

SEQ = 16
BATCH = 2

TINY = {
    "llama": dict(
        cls="LlamaForCausalLM",
        config=dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                    rms_norm_eps=1e-5, max_position_embeddings=64,
                    rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 16}),
        targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        rslora=True,
        ablate={1: 3, 2: 2},
        seed=1001,
    ),
    "qwen2": dict(
        cls="Qwen2ForCausalLM",
        config=dict(vocab_size=256, hidden_size=64, intermediate_size=80, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True,
                    rms_norm_eps=1e-6, max_position_embeddings=64, use_sliding_window=False,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
        targets=["q_proj", "v_proj", "down_proj"],
        rslora=True,
        ablate={0: 3, 2: 2},
        seed=1002,
    ),
    "mistral": dict(
        cls="MistralForCausalLM",
        config=dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=24, sliding_window=8,
                    tie_word_embeddings=False, rms_norm_eps=1e-5, max_position_embeddings=64,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        rslora=False,
        ablate={1: 3, 2: 2},
        seed=1003,
    ),
    # Qwen3: per-head RMSNorm on q and k (q_norm/k_norm over head_dim, before rope), no q/k/v bias,
    # head_dim * heads (96) != hidden (64), GQA 4/2, untied.
    "qwen3": dict(
        cls="Qwen3ForCausalLM",
        config=dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=24, tie_word_embeddings=False,
                    attention_bias=False, rms_norm_eps=1e-6, max_position_embeddings=64,
                    use_sliding_window=False,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
        targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        rslora=True,
        ablate={0: 2, 2: 3},
        seed=1004,
        generate=True,
    ),
    # Gemma-2: sqrt(hidden) embedding scale, (1 + w) norms, four norms per layer, gelu-tanh MLP,
    # query_pre_attn_scalar != head_dim, attention and final-logit tanh soft-capping (small enough
    # to saturate), sliding window 8 < T on the layers config.layer_types marks sliding, GQA 4/2,
    # head_dim * heads (128) != hidden (64), tied embeddings.
    "gemma2": dict(
        cls="Gemma2ForCausalLM",
        config=dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24,
                    sliding_window=8, attn_logit_softcapping=1.0, final_logit_softcapping=1.5,
                    hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True, attention_bias=False,
                    rms_norm_eps=1e-6, max_position_embeddings=64,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        rslora=False,
        ablate={1: 3, 2: 2},
        seed=1005,
        norm_offset=True,       # norm weights stored as w, used as (1 + w); initialised w ~ N(0, 0.1^2)
        sliding="layer_types",  # sliding on some layers only; checked by switching them all to full
        generate=True,
    ),
}

# Greedy generation (qwen3, gemma2): base model only (no LoRA, no ablation), one prompt at a time.
GEN_PROMPT_LENS = (5, 11)
GEN_NEW = 6

# Padding-free packing on the llama fixture (model, LoRA init and directions of tiny/llama).
PACKED_LENS = [5, 16, 1, 9, 12]
PACKED_IGNORE = [2, 4, 0, 3, 0]  # leading prompt tokens with label -100, per sequence
PACKED_SEED = 1006
PACKED_PAD_ID = 0

LORA_R = 4
LORA_ALPHA = 8
LORA_B_STD = 0.05
WEIGHT_STD = 0.1
LR = 1e-2
BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
WD = 0.01
CLIP = 1.0
STEPS = 3
ACCUM = 2
WARMUP = 1

LOSS_FORMULA = ("loss = sum_{b,t : labels[b,t+1] != -100} -log_softmax(logits[b,t])[labels[b,t+1]] "
                "/ #{b,t : labels[b,t+1] != -100}  (t = 0..T-2; position t predicts token t+1)")


def init_weights(model, gen, norm_offset=False):
    """Random weights, std WEIGHT_STD; norm weights 1 + WEIGHT_STD*N(0,1); biases WEIGHT_STD*N(0,1).
    norm_offset (Gemma): the model multiplies by (1 + weight), so norm weights are WEIGHT_STD*N(0,1)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * WEIGHT_STD
            if name.endswith("norm.weight") and not norm_offset:
                p.copy_(1.0 + noise)
            else:
                p.copy_(noise)


def orthonormal(rows):
    """Q [hidden, k]: orthonormal basis of the rows of `rows` [k, hidden] (QR in float64)."""
    q, _ = torch.linalg.qr(rows.double().T)
    return q.float().contiguous()


def layer_output(out):
    return out[0] if isinstance(out, tuple) else out


def replace_output(out, h):
    if isinstance(out, tuple):
        return (h,) + tuple(out[1:])
    return h


def add_ablation_hooks(layers, qs):
    """The paper's hook: the layer's hidden-state output h becomes h - (h @ Q) @ Q.T."""
    handles = []
    for idx, q in qs.items():
        def hook(_mod, _inp, out, q=q):
            h = layer_output(out)
            return replace_output(out, h - (h @ q) @ q.T)
        handles.append(layers[idx].register_forward_hook(hook))
    return handles


def add_record_hooks(layers, store):
    handles = []
    for idx, layer in enumerate(layers):
        def hook(_mod, _inp, out, idx=idx):
            store[idx] = layer_output(out).detach().clone()
        handles.append(layer.register_forward_hook(hook))
    return handles


def causal_lm_loss(logits, labels, reduction="mean"):
    lg = logits[:, :-1, :].reshape(-1, logits.shape[-1])
    lb = labels[:, 1:].reshape(-1)
    s = torch.nn.functional.cross_entropy(lg, lb, ignore_index=-100, reduction="sum")
    if reduction == "sum":
        return s
    return s / (lb != -100).sum()


def lora_params(model):
    """{peft saved name: parameter}; saved names are those of adapter_model.safetensors."""
    out = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            out[name.replace(".default.", ".")] = p
    saved = set(peft.get_peft_model_state_dict(model).keys())
    assert saved == set(out.keys()), (sorted(saved)[:3], sorted(out.keys())[:3])
    return dict(sorted(out.items()))


def make_labels(ids, n_ignored):
    labels = ids.clone()
    for row, n in enumerate(n_ignored):
        labels[row, :n] = -100
    return labels


def lora_config(spec):
    return peft.LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, use_rslora=spec["rslora"],
                           target_modules=spec["targets"], lora_dropout=0.0, bias="none",
                           task_type="CAUSAL_LM")


def softcap_saturation(model, layers, qs, input_ids):
    """Gemma-2: share of pre-cap attention scores s (q.k * scaling, visible query/key pairs only) and of
    pre-cap logits z with |s/c| > 1, i.e. where tanh is well into its flat part. Same forward as the
    fixture's (initial LoRA, ablation on), no grad."""
    from transformers.models.gemma2.modeling_gemma2 import apply_rotary_pos_emb, repeat_kv
    cfg = model.config
    T = input_ids.shape[1]
    qi, kj = torch.arange(T)[:, None], torch.arange(T)[None]
    scores, pre_logits = [], []

    def attn_hook(mod, _args, kwargs):
        hs = kwargs["hidden_states"]
        shape = (*hs.shape[:-1], -1, mod.head_dim)
        q = mod.q_proj(hs).view(shape).transpose(1, 2)
        k = mod.k_proj(hs).view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *kwargs["position_embeddings"])
        s = (q @ repeat_kv(k, mod.num_key_value_groups).transpose(2, 3)) * mod.scaling
        visible = kj <= qi
        if cfg.layer_types[mod.layer_idx] == "sliding_attention":
            visible = visible & (kj > qi - cfg.sliding_window)
        scores.append(s[..., visible])

    handles = add_ablation_hooks(layers, qs)
    handles += [layer.self_attn.register_forward_pre_hook(attn_hook, with_kwargs=True) for layer in layers]
    handles.append(model.base_model.model.lm_head.register_forward_hook(
        lambda _m, _i, out: pre_logits.append(out.detach().clone())))
    model.eval()
    with torch.no_grad():
        model(input_ids=input_ids)
    model.train()
    for h in handles:
        h.remove()
    s, z = torch.cat([x.reshape(-1) for x in scores]), pre_logits[0].reshape(-1)
    ca, cf = cfg.attn_logit_softcapping, cfg.final_logit_softcapping
    return {"attn_scores_frac_abs_over_cap": float((s / ca).abs().gt(1).float().mean()),
            "attn_scores_max_abs_over_cap": float((s / ca).abs().max()),
            "attn_scores_counted": int(s.numel()),
            "logits_frac_abs_over_cap": float((z / cf).abs().gt(1).float().mean()),
            "logits_max_abs_over_cap": float((z / cf).abs().max()),
            "definition": "attention: s = (q . k) * query_pre_attn_scalar^-0.5 after rope, before the cap, "
                          "over every layer, head, row and visible (causal, in-window on sliding layers) "
                          "query/key pair of the forward_backward input (initial LoRA, ablation on); "
                          "logits: z = lm_head(final norm output) before the cap, every row/position/vocab "
                          "entry of the same forward; frac = share with |x / cap| > 1"}


def greedy_tiny(spec, out_dir, gen, tensors):
    """Greedy model.generate of the saved base model (no LoRA, no ablation), one prompt at a time.
    Checked against argmax of an uncached forward over prompt + generated ids."""
    model = getattr(transformers, spec["cls"]).from_pretrained(
        out_dir, dtype=torch.float32, attn_implementation="eager").eval()
    eos = model.generation_config.eos_token_id
    eos = sorted({int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None})
    cases = []
    for i, n in enumerate(GEN_PROMPT_LENS):
        prompt = torch.randint(0, model.config.vocab_size, (1, n), generator=gen)
        with torch.no_grad():
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                 max_new_tokens=GEN_NEW, return_dict_in_generate=True,
                                 output_scores=True, output_logits=True)
        new = out.sequences[0, n:]
        assert new.numel() == GEN_NEW and not any(int(t) in eos for t in new), (new, eos)
        margins = []
        for step, (lg, sc) in enumerate(zip(out.logits, out.scores)):
            assert torch.equal(lg, sc), step  # no logits processors
            top = torch.topk(lg[0], 2)
            assert int(top.indices[0]) == int(new[step]), step
            margins.append(float(top.values[0] - top.values[1]))
        with torch.no_grad():
            full = model(input_ids=out.sequences[:, :-1], use_cache=False).logits[0, n - 1:]
        assert torch.equal(full.argmax(-1), new), "cached generate differs from an uncached forward"
        tensors[f"generate.prompt.{i}"] = prompt[0].clone()
        tensors[f"generate.ids.{i}"] = new.clone()
        tensors[f"generate.margins.{i}"] = torch.tensor(margins, dtype=torch.float32)
        cases.append({"prompt_ids": prompt[0].tolist(), "generated_ids": new.tolist(),
                      "margins": [round(m, 4) for m in margins]})
    return {"how": "model.generate(input_ids=prompt [1,T], attention_mask=ones, do_sample=False, "
                   f"max_new_tokens={GEN_NEW}) on the saved base model (no LoRA, no ablation), one prompt at "
                   "a time, f32, eager, with the default DynamicCache; no logits processors are active. "
                   "Each generated id is also the argmax of an uncached forward over prompt + the ids before it",
            "eos_token_ids": eos, "cases": cases,
            "tensors": "generate.prompt.<i> [T_i] int64, generate.ids.<i> [6] int64, generate.margins.<i> [6] "
                       "f32 (top-1 minus top-2 logit at each step)"}


def build_tiny(name, spec, out_dir):
    from transformers import AutoConfig
    torch.manual_seed(spec["seed"])
    gen = torch.Generator().manual_seed(spec["seed"])
    cfg_cls = getattr(transformers, spec["cls"].replace("ForCausalLM", "Config"))
    config = cfg_cls(**spec["config"], attn_implementation="eager", attention_dropout=0.0)
    config.architectures = [spec["cls"]]
    model = getattr(transformers, spec["cls"])(config).float().eval()
    init_weights(model, gen, spec.get("norm_offset", False))
    if config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    for extra in ("generation_config.json",):
        p = os.path.join(out_dir, extra)
        if os.path.exists(p):
            os.remove(p)
    # Reload what was written so the fixture is computed from exactly the stored weights.
    model = getattr(transformers, spec["cls"]).from_pretrained(
        out_dir, dtype=torch.float32, attn_implementation="eager").eval()

    # Mistral: make sure the sliding window really changes eager attention at T=16 > window.
    sw_effect = None
    if spec.get("sliding") == "layer_types":
        # Gemma-2: the mask of each layer follows config.layer_types[i]; switching every layer to
        # full attention must change only the positions past the window.
        ids = torch.randint(0, config.vocab_size, (1, SEQ), generator=gen)
        win, saved = model.config.sliding_window, list(model.config.layer_types)
        assert win < SEQ and "sliding_attention" in saved and "full_attention" in saved, saved
        with torch.no_grad():
            a = model(input_ids=ids).logits
            model.config.layer_types = ["full_attention"] * len(saved)
            b = model(input_ids=ids).logits
            model.config.layer_types = saved
        sw_effect = {
            "layer_types": saved,
            "max_abs_diff_first_window_positions": float((a[:, :win] - b[:, :win]).abs().max()),
            "max_abs_diff_later_positions": float((a[:, win:] - b[:, win:]).abs().max()),
        }
        assert sw_effect["max_abs_diff_first_window_positions"] < 1e-5
        assert sw_effect["max_abs_diff_later_positions"] > 1e-3, "eager Gemma-2 ignores sliding_window"
    elif getattr(model.config, "sliding_window", None):
        ids = torch.randint(0, config.vocab_size, (1, SEQ), generator=gen)
        with torch.no_grad():
            a = model(input_ids=ids).logits
            saved = model.config.sliding_window
            model.config.sliding_window = None
            b = model(input_ids=ids).logits
            model.config.sliding_window = saved
        win = saved
        sw_effect = {
            "max_abs_diff_first_window_positions": float((a[:, :win] - b[:, :win]).abs().max()),
            "max_abs_diff_later_positions": float((a[:, win:] - b[:, win:]).abs().max()),
        }
        assert sw_effect["max_abs_diff_first_window_positions"] < 1e-5
        assert sw_effect["max_abs_diff_later_positions"] > 1e-3, "eager Mistral ignores sliding_window"

    embed_check = None
    if spec.get("norm_offset"):
        # Gemma: the embedding output is weight[ids] * normalizer, the normalizer being the f32 scalar
        # sqrt(hidden) cast to the embedding weight's dtype.
        ids = torch.arange(config.vocab_size)[None]
        with torch.no_grad():
            e = model.model.embed_tokens(ids)
        normalizer = torch.tensor(config.hidden_size ** 0.5, dtype=torch.float32)
        assert torch.equal(e, model.model.embed_tokens.weight[ids] * normalizer)
        embed_check = {"normalizer": float(normalizer),
                       "dtype": "float32 scalar sqrt(hidden_size), cast to the embedding weight dtype "
                                "before the multiply (bf16 weights: the bf16 rounding of sqrt(hidden))"}

    model = peft.get_peft_model(model, lora_config(spec))
    loras = lora_params(model)
    with torch.no_grad():
        for n, p in loras.items():
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=gen) * LORA_B_STD)
    init_lora = {n: p.detach().clone() for n, p in loras.items()}

    hidden = config.hidden_size
    raw_dirs = {L: torch.randn(k, hidden, generator=gen) for L, k in spec["ablate"].items()}
    qs = {L: orthonormal(d) for L, d in raw_dirs.items()}
    save_file({f"layer.{L}": d.contiguous() for L, d in raw_dirs.items()},
              os.path.join(out_dir, "directions.safetensors"))

    V = config.vocab_size
    input_ids = torch.randint(0, V, (BATCH, SEQ), generator=gen)
    labels = make_labels(input_ids, [5, 3])
    train_ids = torch.randint(0, V, (STEPS, ACCUM, BATCH, SEQ), generator=gen)
    n_ign = torch.randint(0, 6, (STEPS, ACCUM, BATCH), generator=gen)
    train_labels = torch.stack([torch.stack([make_labels(train_ids[s, a], n_ign[s, a].tolist())
                                             for a in range(ACCUM)]) for s in range(STEPS)])

    layers = model.base_model.model.model.layers
    tensors = {}
    for n, t in init_lora.items():
        tensors[f"lora.{n}"] = t

    # ---- one forward + backward with ablation on ----
    model.train()
    resid = {}
    handles = add_ablation_hooks(layers, qs)
    handles += add_record_hooks(layers, resid)  # registered after -> sees the ablated output
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=input_ids).logits
    loss = causal_lm_loss(logits, labels)
    loss.backward()
    for h in handles:
        h.remove()
    for idx in range(len(layers)):
        tensors[f"resid_post.{idx}"] = resid[idx]
    for L, q in qs.items():  # sanity: ablated layers carry nothing along Q
        assert float((resid[L] @ q).abs().max()) < 1e-4
    tensors["input_ids"] = input_ids
    tensors["labels"] = labels
    tensors["logits"] = logits.detach()
    tensors["loss"] = loss.detach().reshape(1)
    for n, p in loras.items():
        tensors[f"grad.{n}"] = p.grad.detach().clone()
    with torch.no_grad():
        logits_na = model(input_ids=input_ids).logits
    tensors["logits_noablate"] = logits_na
    ablation_effect = float((logits_na - logits.detach()).abs().max())
    saturation = None
    if getattr(config, "attn_logit_softcapping", None) or getattr(config, "final_logit_softcapping", None):
        saturation = softcap_saturation(model, layers, qs, input_ids)

    # ---- 3 optimizer steps, grad accumulation 2, ablation on ----
    model.zero_grad(set_to_none=True)
    params = list(loras.values())
    opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=ADAM_EPS, weight_decay=WD)
    sched = transformers.get_linear_schedule_with_warmup(opt, num_warmup_steps=WARMUP,
                                                         num_training_steps=STEPS)
    handles = add_ablation_hooks(layers, qs)
    losses, norms, lrs = [], [], []
    for s in range(STEPS):
        n_tok = int((train_labels[s][:, :, 1:] != -100).sum())
        total = 0.0
        for a in range(ACCUM):
            lg = model(input_ids=train_ids[s, a]).logits
            l_sum = causal_lm_loss(lg, train_labels[s, a], reduction="sum")
            (l_sum / n_tok).backward()
            total += float(l_sum.detach())
        losses.append(total / n_tok)
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, CLIP)))
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    for h in handles:
        h.remove()
    tensors["train.input_ids"] = train_ids
    tensors["train.labels"] = train_labels
    tensors["train.losses"] = torch.tensor(losses, dtype=torch.float32)
    tensors["train.grad_norms"] = torch.tensor(norms, dtype=torch.float32)
    tensors["train.lrs"] = torch.tensor(lrs, dtype=torch.float32)
    for n, p in loras.items():
        tensors[f"step3.{n}"] = p.detach().clone()

    generation = None
    if spec.get("generate"):
        generation = greedy_tiny(spec, out_dir, gen, tensors)

    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out_dir, "fixture.safetensors"))

    scale = LORA_ALPHA / math.sqrt(LORA_R) if spec["rslora"] else LORA_ALPHA / LORA_R
    meta = {
        "architecture": spec["cls"],
        "dtype": "float32 everywhere (weights, activations, LoRA, optimizer state); CPU; "
                 "attn_implementation=eager",
        "weights": (f"all N(0, {WEIGHT_STD}^2), *norm.weight included (Gemma stores w and multiplies by "
                    f"(1 + w), so the effective gain is 1 + N(0, {WEIGHT_STD}^2))" if spec.get("norm_offset") else
                    f"all N(0, {WEIGHT_STD}^2); *norm.weight = 1 + N(0, {WEIGHT_STD}^2); biases N(0, {WEIGHT_STD}^2)"),
        "seed": spec["seed"],
        "batch": BATCH, "seq": SEQ,
        "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "use_rslora": spec["rslora"], "scale": scale,
                 "scale_formula": "alpha/sqrt(r)" if spec["rslora"] else "alpha/r",
                 "target_modules": spec["targets"], "dropout": 0.0, "bias": "none",
                 "init": f"PEFT default for A (kaiming-uniform); B set to N(0, {LORA_B_STD}^2)",
                 "delta": "y = x W^T + scale * (x A^T) B^T, A [r, in], B [out, r]",
                 "names": "PEFT saved names (adapter_model.safetensors), e.g. "
                          "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"},
        "ablation": {"layers": sorted(spec["ablate"]), "k": {str(L): k for L, k in spec["ablate"].items()},
                     "directions_file": "directions.safetensors, tensors layer.<L> [k, hidden], raw rows",
                     "basis": "Q = torch.linalg.qr(rows.double().T).Q cast to float32, Q [hidden, k]",
                     "op": "h <- h - (h @ Q) @ Q^T on the output of decoder layer L (resid_post), "
                           "every token, forward hook on model.base_model.model.model.layers[L]"},
        "loss": LOSS_FORMULA,
        "forward_backward": {
            "inputs": "input_ids [2,16] int64; labels [2,16] = input_ids with positions 0..4 of row 0 "
                      "and 0..2 of row 1 set to -100",
            "outputs": "logits [2,16,V] and loss [1] with ablation; resid_post.<l> [2,16,hidden] = output "
                       "of decoder layer l after the ablation hook (before the final norm), every layer; "
                       "grad.<name> = d loss / d LoRA tensor (loss = mean as above); "
                       "logits_noablate = same model and LoRA, no hooks",
            "max_abs_logit_change_from_ablation": ablation_effect,
        },
        "training": {
            "optimizer": {"type": "torch.optim.AdamW", "lr": LR, "betas": list(BETAS), "eps": ADAM_EPS,
                          "weight_decay": WD, "params": "LoRA A and B only (decoupled weight decay on all of them)"},
            "steps": STEPS, "grad_accum": ACCUM, "micro_batch": [BATCH, SEQ],
            "data": "train.input_ids [3,2,2,16] (step, micro-batch, row, pos); train.labels same shape, "
                    "each row with its first n (0..5) positions set to -100",
            "loss_per_step": "N_step = # label tokens (after the shift) over both micro-batches of the step; "
                             "each micro-batch backward of sum_CE / N_step; train.losses[s] = total sum_CE / N_step",
            "clip": f"torch.nn.utils.clip_grad_norm_(lora params, {CLIP}): g *= min(1, {CLIP}/(norm + 1e-6)), "
                    "norm = global L2 norm over all LoRA grads; train.grad_norms = that pre-clip norm",
            "adamw": "p *= 1 - lr*wd; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; "
                     "p -= lr * (m/(1-b1^t)) / (sqrt(v/(1-b2^t)) + eps), t = 1,2,3",
            "schedule": f"transformers.get_linear_schedule_with_warmup(num_warmup_steps={WARMUP}, "
                        f"num_training_steps={STEPS}); lr_s = LR * (s/{WARMUP} if s<{WARMUP} else "
                        f"max(0,({STEPS}-s)/({STEPS}-{WARMUP}))) for optimizer step s=0,1,2 "
                        "(so step 0 runs at lr 0 but still advances Adam's moments and step count)",
            "lrs": lrs,
            "start": "the lora.* tensors (same as before the forward/backward above)",
            "ablation": "on (same hooks) for every micro-batch",
            "result": "step3.<name> = LoRA tensors after the 3rd optimizer step",
        },
    }
    if sw_effect is not None and spec.get("sliding") == "layer_types":
        meta["sliding_window_check"] = sw_effect
        meta["sliding_window_note"] = ("transformers 5.23 eager Gemma-2 builds a sliding-window mask for the layers "
                                       "whose config.layer_types entry is sliding_attention (even layer indices: "
                                       "0, 2) and a plain causal mask for the others; on sliding layers key j is "
                                       "visible from query i iff i-window < j <= i (window keys incl. self). "
                                       "Checked by switching every layer to full_attention: only positions >= "
                                       "window change")
    elif sw_effect is not None:
        meta["sliding_window_check"] = sw_effect
        meta["sliding_window_note"] = ("transformers 5.23 eager Mistral applies sliding_window: key j is "
                                       "visible from query i iff i-window < j <= i (window keys incl. self)")
    if embed_check is not None:
        meta["embedding_normalizer"] = embed_check
    if saturation is not None:
        meta["softcap_saturation"] = saturation
    if generation is not None:
        meta["generation"] = generation
    with open(os.path.join(out_dir, "fixture.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    return dict(loss=float(loss.detach()), ablation_effect=ablation_effect, losses=losses, norms=norms, lrs=lrs,
                sw=sw_effect, saturation=saturation, generation=generation)


# --------------------------------------------------------------------------------------------
# Full fine-tuning (every weight trained) on the tiny models
# --------------------------------------------------------------------------------------------

FULL_LR = 1e-3
FULL_BETAS = (0.9, 0.95)
FULL_EPS = 1e-8
FULL_WD = 0.1
# Full-model gradient norms are 3.3-4.9 on these models, so clip 1.0 scales the gradient on every step of
# every model, by coefficients (0.21-0.30) that differ between steps: unlike one common scale, which Adam
# would nearly cancel, this changes full_step3 by 2e-4..4e-4 (full.json: training.effects).
FULL_CLIP = 1.0
FULL_WARMUP = 0

# transformers.Trainer.get_decay_parameter_names (transformers/trainer.py, 5.23): no weight decay for a
# parameter inside an nn.LayerNorm module (ALL_LAYERNORM_LAYERS) or whose lower-cased dotted name matches
# one of these patterns (re.search); weight decay for every other parameter. build_full calls the
# Trainer function itself and checks it against this copy, which verify_full uses.
NO_DECAY_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def no_decay_by_name(name):
    return any(re.search(p, name.lower()) for p in NO_DECAY_PATTERNS)


def full_groups(model, wd, decay_names):
    """AdamW parameter groups as transformers' Trainer.create_optimizer builds them: [decay, no decay]."""
    named = list(model.named_parameters())  # a tied lm_head is the embedding parameter, listed once
    return [{"params": [p for n, p in named if n in decay_names], "weight_decay": wd},
            {"params": [p for n, p in named if n not in decay_names], "weight_decay": 0.0}]


def full_train(model, layers, qs, train_ids, train_labels, clip, wd, decay_names):
    """STEPS optimizer steps of full fine-tuning, ACCUM micro-batches each, ablation hooks on.
    Returns losses, pre-clip global grad norms, lrs, per-step max |grad| per group (pre-clip) and the
    parameters after the last step."""
    model.train()
    model.zero_grad(set_to_none=True)
    groups = full_groups(model, wd, decay_names)
    opt = torch.optim.AdamW(groups, lr=FULL_LR, betas=FULL_BETAS, eps=FULL_EPS)
    sched = transformers.get_linear_schedule_with_warmup(opt, num_warmup_steps=FULL_WARMUP,
                                                         num_training_steps=STEPS)
    params = [p for g in groups for p in g["params"]]
    assert len(params) == len(list(model.parameters()))
    handles = add_ablation_hooks(layers, qs)
    losses, norms, lrs, gmax = [], [], [], []
    for s in range(STEPS):
        n_tok = int((train_labels[s][:, :, 1:] != -100).sum())
        total = 0.0
        for a in range(ACCUM):
            lg = model(input_ids=train_ids[s, a]).logits
            l_sum = causal_lm_loss(lg, train_labels[s, a], reduction="sum")
            (l_sum / n_tok).backward()
            total += float(l_sum.detach())
        losses.append(total / n_tok)
        gmax.append({k: max((float(p.grad.abs().max()) for p in g["params"]), default=0.0)
                     for k, g in zip(("decay", "no_decay"), groups)})
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, clip)))
        assert opt.param_groups[0]["lr"] == opt.param_groups[1]["lr"]
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    for h in handles:
        h.remove()
    return losses, norms, lrs, gmax, {n: p.detach().clone() for n, p in model.named_parameters()}


def build_full(name):
    """Full fine-tuning fixture of tiny/<name>, computed from its committed model.safetensors,
    directions.safetensors and the input/training ids of fixture.safetensors (none of them rewritten)."""
    from safetensors.torch import load_file
    import copy
    spec = TINY[name]
    d = os.path.join(FIX, "tiny", name)
    W = load_file(os.path.join(d, "model.safetensors"))
    F = load_file(os.path.join(d, "fixture.safetensors"))
    D = load_file(os.path.join(d, "directions.safetensors"))
    model = getattr(transformers, spec["cls"]).from_pretrained(
        d, dtype=torch.float32, attn_implementation="eager")
    config = model.config
    named = dict(model.named_parameters())
    assert set(named) == set(W), sorted(set(named) ^ set(W))
    for n, p in named.items():
        assert p.dtype == torch.float32 and torch.equal(p.detach(), W[n]), n
    tied = bool(config.tie_word_embeddings)
    assert tied == ("lm_head.weight" not in named)
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    qs = {int(k.split(".")[1]): orthonormal(v) for k, v in D.items()}
    assert {L: q.shape[1] for L, q in qs.items()} == spec["ablate"], (qs.keys(), spec["ablate"])
    layers = model.model.layers
    input_ids, labels = F["input_ids"], F["labels"]
    train_ids, train_labels = F["train.input_ids"], F["train.labels"]
    assert tuple(train_ids.shape) == (STEPS, ACCUM, BATCH, SEQ)

    # The committed files still give the committed LoRA fixture with the installed versions: the same
    # model, LoRA init and hooks reproduce its logits and loss (so nothing else needs rebuilding).
    lora_model = peft.get_peft_model(copy.deepcopy(model), lora_config(spec))
    with torch.no_grad():
        for n, p in lora_params(lora_model).items():
            p.copy_(F[f"lora.{n}"])
    handles = add_ablation_hooks(lora_model.base_model.model.model.layers, qs)
    lora_model.train()
    with torch.no_grad():
        lg = lora_model(input_ids=input_ids).logits
    for h in handles:
        h.remove()
    lora_check = {"max_abs_logits_vs_fixture": float((lg - F["logits"]).abs().max()),
                  "abs_loss_vs_fixture": abs(float(causal_lm_loss(lg, labels)) - float(F["loss"][0]))}
    assert lora_check["max_abs_logits_vs_fixture"] < 1e-5 and lora_check["abs_loss_vs_fixture"] < 1e-6, lora_check
    del lora_model

    decay_tr = transformers.Trainer.get_decay_parameter_names(None, model)  # `self` is not used
    decay_names = [n for n in named if n in decay_tr]
    no_decay = [n for n in named if n not in decay_tr]
    assert no_decay == [n for n in named if no_decay_by_name(n)], no_decay
    assert all(("norm" in n or n.endswith(".bias")) for n in no_decay), no_decay

    tensors = {}
    # ---- one forward + backward of the whole model, ablation on ----
    model.train()
    model.zero_grad(set_to_none=True)
    handles = add_ablation_hooks(layers, qs)
    logits = model(input_ids=input_ids).logits
    loss = causal_lm_loss(logits, labels)
    loss.backward()
    for h in handles:
        h.remove()
    tensors["full_loss"] = loss.detach().reshape(1)
    tensors["full_logits"] = logits.detach()
    for n, p in named.items():
        assert p.grad is not None and bool(p.grad.ne(0).any()), n
        tensors[f"full_grad.{n}"] = p.grad.detach().clone()
    max_abs_grad = {"decay": max(float(named[n].grad.abs().max()) for n in decay_names),
                    "no_decay": max(float(named[n].grad.abs().max()) for n in no_decay)}
    model.zero_grad(set_to_none=True)

    # ---- 3 optimizer steps, grad accumulation 2, ablation on ----
    init = {n: p.detach().clone() for n, p in named.items()}

    def run(clip, wd, decay):
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(init[n])
        return full_train(model, layers, qs, train_ids, train_labels, clip, wd, set(decay))

    losses, norms, lrs, gmax, final = run(FULL_CLIP, FULL_WD, decay_names)
    # What each setting changes in the result (so a test of full_step3 can tell them apart): the largest
    # element difference, and per tensor ||other - step3|| / ||step3 - p_0|| (the difference relative to
    # that tensor's update), its smallest value over the tensors the setting acts on.
    update = {n: float((final[n] - init[n]).norm()) for n in named}
    effects = {}
    for what, other, names in (
            ("without_clipping", run(float("inf"), FULL_WD, decay_names)[4], list(named)),
            ("with_weight_decay_0", run(FULL_CLIP, 0.0, decay_names)[4], decay_names),
            ("on_no_decay_params_if_every_param_decayed", run(FULL_CLIP, FULL_WD, list(named))[4], no_decay)):
        effects[f"max_abs_step3_diff_{what}"] = max(float((final[n] - other[n]).abs().max()) for n in names)
        effects[f"min_tensor_rel_update_diff_{what}"] = min(float((final[n] - other[n]).norm()) / update[n]
                                                            for n in names)
    tensors["full_train.losses"] = torch.tensor(losses, dtype=torch.float32)
    tensors["full_train.grad_norms"] = torch.tensor(norms, dtype=torch.float32)
    tensors["full_train.lrs"] = torch.tensor(lrs, dtype=torch.float32)
    for n in named:
        tensors[f"full_step3.{n}"] = final[n]
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(d, "full.safetensors"))

    rel = {n: float((final[n] - init[n]).norm() / init[n].norm()) for n in named}
    top, low = max(rel, key=rel.get), min(rel, key=rel.get)
    coefs = [min(1.0, FULL_CLIP / (g + 1e-6)) for g in norms]
    ex = next(n for n in named if n.endswith("self_attn.q_proj.weight"))
    meta = {
        "architecture": spec["cls"],
        "what": "full fine-tuning (every weight trained, no LoRA/PEFT) of this folder's model with the "
                "ablation of fixture.json",
        "made_with": {k: v for k, v in check_versions().items()},
        "dtype": "float32 everywhere (weights, activations, gradients, AdamW moments); CPU; "
                 "attn_implementation=eager",
        "inputs": "model = from_pretrained(this folder, dtype=float32, attn_implementation=eager) from "
                  "config.json/model.safetensors; directions.safetensors; input_ids, labels, train.input_ids "
                  "and train.labels of fixture.safetensors. Those files are not rewritten",
        "names": f"parameter names as in model.safetensors / model.named_parameters(), e.g. {ex}, "
                 "model.embed_tokens.weight" + (", lm_head.weight" if not tied else ""),
        "parameters": len(named), "parameter_elements": sum(p.numel() for p in named.values()),
        "tied_embeddings": (("yes: lm_head.weight is model.embed_tokens.weight, one parameter (gradient = "
                             "embedding-lookup part + output-projection part), decayed and stepped once; no "
                             "lm_head.* tensors are stored") if tied else "no: lm_head.weight is its own parameter"),
        "ablation": {"layers": sorted(spec["ablate"]), "k": {str(L): k for L, k in spec["ablate"].items()},
                     "basis": "Q = torch.linalg.qr(rows.double().T).Q cast to float32, Q [hidden, k] "
                              "(rows = directions.safetensors layer.<L> [k, hidden])",
                     "op": "h <- h - (h @ Q) @ Q^T on the output of decoder layer L, every token, forward "
                           "hook on model.model.layers[L]; on in the forward/backward and in every training "
                           "micro-batch. No parameter is frozen"},
        "loss": LOSS_FORMULA,
        "lora_fixture_check": dict(lora_check, how="the committed model + LoRA init (lora.*) + hooks via PEFT "
                                               "reproduce fixture.safetensors logits/loss: rebuilding not needed"),
        "forward_backward": {
            "inputs": "input_ids [2,16] and labels [2,16] of fixture.safetensors",
            "outputs": "full_logits [2,16,V] (base model, ablation on, no LoRA); full_loss [1] = mean CE as "
                       "above; full_grad.<name> = d full_loss / d parameter, every parameter",
            "full_loss": float(loss.detach()),
            "max_abs_grad": max_abs_grad,
        },
        "training": {
            "steps": STEPS, "grad_accum": ACCUM, "micro_batch": [BATCH, SEQ],
            "start": "model.safetensors (the weights before the forward/backward above)",
            "data": "train.input_ids [3,2,2,16] (step, micro-batch, row, pos) and train.labels of "
                    "fixture.safetensors, the same as the LoRA training",
            "loss_per_step": "N_step = # label tokens (after the shift) over both micro-batches of the step; "
                             "each micro-batch backward of sum_CE / N_step (gradients accumulate); "
                             "full_train.losses[s] = total sum_CE / N_step",
            "optimizer": {
                "type": "torch.optim.AdamW (default implementation on CPU, amsgrad=False)",
                "lr": FULL_LR, "betas": list(FULL_BETAS), "eps": FULL_EPS, "weight_decay": FULL_WD,
                "param_groups": [
                    {"weight_decay": FULL_WD, "params": "every parameter not listed under no_decay",
                     "count": len(decay_names)},
                    {"weight_decay": 0.0, "params": "no_decay", "count": len(no_decay)}],
                "no_decay": no_decay,
                "no_decay_patterns": NO_DECAY_PATTERNS,
                "group_rule": "transformers.Trainer.get_decay_parameter_names (transformers/trainer.py) as "
                              "Trainer.create_optimizer uses it: a parameter gets no weight decay when it sits in "
                              "an nn.LayerNorm module or its lower-cased name matches (re.search) any of "
                              "no_decay_patterns; here that is every bias and every *norm weight "
                              "(RMSNorm gains, Qwen3 q_norm/k_norm, model.norm). Group 0 = decay, group 1 = no decay",
                "adamw": "p *= 1 - lr*wd_group; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; "
                         "p -= lr * (m/(1-b1^t)) / (sqrt(v/(1-b2^t)) + eps), t = 1,2,3; g = clipped gradient",
            },
            "clip": f"torch.nn.utils.clip_grad_norm_(every parameter, {FULL_CLIP}): g *= min(1, {FULL_CLIP}/"
                    "(norm + 1e-6)), norm = global L2 norm over all parameter gradients (tied embedding once); "
                    "full_train.grad_norms = that pre-clip norm",
            "clip_value": FULL_CLIP,
            "clip_coefs": coefs,
            "clip_active_steps": [s for s, c in enumerate(coefs) if c < 1.0],
            "schedule": f"transformers.get_linear_schedule_with_warmup(num_warmup_steps={FULL_WARMUP}, "
                        f"num_training_steps={STEPS}); lr_s = {FULL_LR} * ({STEPS}-s)/{STEPS} for optimizer step "
                        "s = 0,1,2 (every step has a non-zero lr), the same for both groups",
            "lrs": lrs,
            "losses": losses, "grad_norms": norms,
            "max_abs_grad_pre_clip_per_step": gmax,
            "effects": effects,
            "result": "full_step3.<name> = every parameter after the 3rd optimizer step",
            "relative_change": {
                "definition": "||p_step3 - p_0|| / ||p_0|| per parameter tensor (L2)",
                "largest": {"name": top, "value": rel[top]},
                "smallest": {"name": low, "value": rel[low]},
                "max_abs_change": max(float((final[n] - init[n]).abs().max()) for n in named),
            },
        },
        "tensors": {
            "full_loss": "[1] f32", "full_logits": f"[2,16,{config.vocab_size}] f32",
            "full_grad.<name>": "f32, shape of the parameter",
            "full_train.losses, full_train.grad_norms, full_train.lrs": "[3] f32",
            "full_step3.<name>": "f32, shape of the parameter",
        },
    }
    with open(os.path.join(d, "full.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    # How closely an independent f32 implementation (verify_full: plain torch, hand-written AdamW) agrees.
    recompute, P = verify_full(name, return_params=True)
    meta["independent_recompute"] = {
        "max_abs_diff": recompute,
        "max_tensor_rel_update_diff_full_step3": max(float((P[n] - final[n]).norm()) / update[n] for n in named),
        "note": "verify_full (plain-torch forward, hand-written AdamW/clip/schedule) vs these tensors; full_grad "
                "relative to each tensor's max |grad|. full_step3 agrees to ~1e-5..5e-5 only, not ~1e-6: Adam "
                "normalises each element, so an element whose gradient in a step is at f32 rounding-noise level "
                "(|g| ~ 1e-8, near eps) gets an update of up to lr * O(1) set by that noise. Compare full_step3 "
                "per tensor as ||x - full_step3|| / ||full_step3 - p_0|| (rel_update; an independent f32 "
                "recompute stays below max_tensor_rel_update_diff_full_step3, while the training.effects "
                "min_tensor_rel_update_diff_* of a wrong clip, weight decay or group are far larger) and/or "
                "elementwise with an absolute tolerance of about 1e-4 (a tenth of the first lr)",
    }
    with open(os.path.join(d, "full.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    return dict(loss=float(loss.detach()), losses=losses, norms=norms, lrs=lrs, coefs=coefs, rel=(top, rel[top]),
                low=(low, rel[low]), effects=effects, lora_check=lora_check, max_abs_grad=max_abs_grad)


def build_packed(out_dir):
    """Padding-free packing on the llama fixture: PACKED_LENS sequences laid end to end in one row as
    DataCollatorWithFlattening lays them out, forward/backward with the llama LoRA init and ablation;
    checked against each sequence run alone and against the same sequences right-padded in a batch."""
    from safetensors.torch import load_file
    src = os.path.join(FIX, "tiny", "llama")
    spec = TINY["llama"]
    F = load_file(os.path.join(src, "fixture.safetensors"))
    D = load_file(os.path.join(src, "directions.safetensors"))
    model = transformers.LlamaForCausalLM.from_pretrained(src, dtype=torch.float32,
                                                          attn_implementation="eager").eval()
    model = peft.get_peft_model(model, lora_config(spec))
    loras = lora_params(model)
    with torch.no_grad():
        for n, p in loras.items():
            p.copy_(F[f"lora.{n}"])
    qs = {L: orthonormal(D[f"layer.{L}"]) for L in spec["ablate"]}
    layers = model.base_model.model.model.layers
    V = model.config.vocab_size

    gen = torch.Generator().manual_seed(PACKED_SEED)
    seqs = [torch.randint(0, V, (n,), generator=gen) for n in PACKED_LENS]
    feats = []
    for s, n_ign in zip(seqs, PACKED_IGNORE):
        lab = s.clone()
        lab[:n_ign] = -100
        feats.append({"input_ids": s.tolist(), "labels": lab.tolist()})
    batch = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_tensors="pt")(feats)
    ids, pos, labels = batch["input_ids"], batch["position_ids"], batch["labels"]
    cu = batch["cu_seq_lens_q"].to(torch.int64)
    N = sum(PACKED_LENS)
    assert ids.shape == pos.shape == labels.shape == (1, N) and cu.tolist()[-1] == N
    starts = cu[:-1]
    assert (labels[0, starts] == -100).all() and (pos[0, starts] == 0).all()

    tensors = {"input_ids": ids, "position_ids": pos, "labels": labels, "cu_seqlens": cu,
               "seq_lens": torch.tensor(PACKED_LENS, dtype=torch.int64)}

    # Each sequence alone (batch 1, no mask, default positions), ablation on.
    handles = add_ablation_hooks(layers, qs)
    with torch.no_grad():
        alone = torch.cat([model(input_ids=s[None]).logits for s in seqs], dim=1)
        # Packing is detected from position_ids only when no cache object exists: with the config's
        # use_cache=True the model builds a DynamicCache, and the sequences then see each other.
        leak = float((model(input_ids=ids, position_ids=pos).logits - alone).abs().max())
    for h in handles:
        h.remove()

    # Packed: input_ids + position_ids, no attention mask, use_cache=False; ablation on.
    model.train()
    resid = {}
    handles = add_ablation_hooks(layers, qs)
    handles += add_record_hooks(layers, resid)
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    loss = causal_lm_loss(logits, labels)
    loss.backward()
    for h in handles:
        h.remove()
    vs_alone = float((logits.detach() - alone).abs().max())
    assert vs_alone < 1e-5, f"packed sequences are not kept apart (max diff {vs_alone})"
    tensors["logits"] = logits.detach()
    tensors["loss"] = loss.detach().reshape(1)
    for idx in range(len(layers)):
        tensors[f"resid_post.{idx}"] = resid[idx]
    grads = {n: p.grad.detach().clone() for n, p in loras.items()}
    for n, g in grads.items():
        tensors[f"grad.{n}"] = g

    # The same sequences right-padded in one batch [n_seq, max_len], attention_mask, ablation on.
    T = max(PACKED_LENS)
    p_ids = torch.full((len(seqs), T), PACKED_PAD_ID, dtype=torch.int64)
    p_mask = torch.zeros((len(seqs), T), dtype=torch.int64)
    p_labels = torch.full((len(seqs), T), -100, dtype=torch.int64)
    for r, (s, f) in enumerate(zip(seqs, feats)):
        p_ids[r, :len(s)] = s
        p_mask[r, :len(s)] = 1
        p_labels[r, :len(s)] = torch.tensor(f["labels"])
    handles = add_ablation_hooks(layers, qs)
    model.zero_grad(set_to_none=True)
    p_logits = model(input_ids=p_ids, attention_mask=p_mask).logits
    p_loss = causal_lm_loss(p_logits, p_labels)
    p_loss.backward()
    for h in handles:
        h.remove()
    real = torch.cat([p_logits.detach()[r, :n] for r, n in enumerate(PACKED_LENS)])
    assert float((real - alone[0]).abs().max()) < 1e-5
    p_loss, loss = p_loss.detach(), loss.detach()
    assert abs(float(p_loss) - float(loss)) < 1e-5, (float(p_loss), float(loss))
    grad_rel = 0.0
    tensors.update({"padded.input_ids": p_ids, "padded.attention_mask": p_mask, "padded.labels": p_labels,
                    "padded.loss": p_loss.detach().reshape(1)})
    for n, p in loras.items():
        tensors[f"padded.grad.{n}"] = p.grad.detach().clone()
        grad_rel = max(grad_rel, float((p.grad - grads[n]).abs().max() / grads[n].abs().max()))
    assert grad_rel < 1e-4, grad_rel

    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out_dir, "fixture.safetensors"))
    n_lab = int((labels[0, 1:] != -100).sum())
    meta = {
        "base": "tests/fixtures/tiny/llama: its config.json/model.safetensors, its LoRA init (the lora.* tensors "
                "of its fixture.safetensors, same LoRA config: r 4, alpha 8, rsLoRA scale 4, all seven targets) "
                "and its directions.safetensors / ablation (layers 1 and 2, same hooks); none are copied here",
        "dtype": "float32 everywhere; CPU; attn_implementation=eager",
        "seed": PACKED_SEED,
        "sequences": {"lengths": PACKED_LENS, "ignored_prompt_tokens": PACKED_IGNORE,
                      "ids": "sequence i = torch.randint(0, 256, (len_i,)) drawn in order from one generator "
                             f"seeded {PACKED_SEED}",
                      "labels_before_collation": "labels_i = ids_i with the first ignored_prompt_tokens[i] set to "
                                                 "-100"},
        "packing": "transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True) over the "
                   "{input_ids, labels} features: input_ids [1,N] = concatenation; position_ids [1,N] restart "
                   "at 0 for every sequence; labels [1,N] = concatenation of [-100] + labels_i[1:] (the first "
                   "token of every sequence is -100, so no position predicts across a boundary); cu_seqlens = "
                   "its cu_seq_lens_q (returned as int32, stored as int64)",
        "n_tokens": N, "n_label_tokens": n_lab,
        "attention": "each token attends causally within its own sequence only: query i sees key j iff "
                     "seg(j) == seg(i) and j <= i, where seg = cumsum(position_ids[t] != position_ids[t-1] + 1) "
                     "(transformers' find_packed_sequence_indices: a new sequence starts wherever the position "
                     "does not increase by exactly 1). Rope uses position_ids (restarting at 0 per sequence)",
        "how": "model(input_ids, position_ids, use_cache=False): no attention mask, no 4D mask. transformers 5.23 "
               "detects packing from position_ids only when attention_mask is None AND no cache object exists; "
               "the model builds a DynamicCache whenever use_cache is true, and the llama config says "
               "use_cache=true, so use_cache=False must be passed (in train mode too). With the config default "
               "the packed sequences attend to each other",
        "check": {"max_abs_logits_packed_vs_each_alone": vs_alone,
                  "max_abs_logits_position_ids_with_config_use_cache_true_vs_alone": leak,
                  "max_rel_grad_diff_packed_vs_padded": grad_rel,
                  "abs_loss_diff_packed_vs_padded": abs(float(p_loss) - float(loss))},
        "loss": "loss = sum_{t : labels[0,t+1] != -100} -log_softmax(logits[0,t])[labels[0,t+1]] / "
                "#{t : labels[0,t+1] != -100}  (t = 0..N-2; position t predicts token t+1; the -100 at every "
                "sequence start keeps the last token of a sequence from predicting the next sequence's first)",
        "tensors": {
            "input_ids, position_ids, labels": f"[1,N] int64 (N = {N}), as the collator returns them",
            "cu_seqlens": f"[{len(cu)}] int64, {cu.tolist()}; seq_lens [{len(PACKED_LENS)}] int64",
            "logits": "[1,N,256] f32, packed forward with ablation (equals each sequence run alone, 1e-5)",
            "resid_post.<l>": "[1,N,64] f32, output of decoder layer l after the ablation hook, every layer",
            "loss": "[1] f32, mean CE as above",
            "grad.<name>": "d loss / d LoRA tensor, PEFT saved names as in tiny/llama",
            "padded.input_ids, padded.attention_mask, padded.labels": f"[{len(seqs)},{T}] int64: sequence r in "
                f"row r, right padded with id {PACKED_PAD_ID}, mask 1 on real tokens, labels = labels_i (before "
                "collation) and -100 on pads",
            "padded.loss, padded.grad.<name>": "model(input_ids, attention_mask) with ablation (default "
                f"positions 0..{T - 1}); same loss formula, so the same labelled (position, target) pairs as packed: "
                "padded.loss == loss and padded.grad == grad up to f32 rounding",
        },
    }
    with open(os.path.join(out_dir, "fixture.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    return dict(loss=float(loss), padded_loss=float(p_loss), vs_alone=vs_alone, grad_rel=grad_rel, leak=leak)


# --- independent check of the tiny fixtures ---

def rope_inv_freq(cfg, head_dim):
    """Inverse rope frequencies, with Llama 3 frequency-dependent scaling when configured."""
    rp = cfg["rope_parameters"]
    inv = 1.0 / rp["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if rp["rope_type"] == "llama3":
        factor, lo, hi = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"]
        old = rp["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * inv / factor + smooth * inv
        in_between = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = torch.where(in_between, blended, scaled)
    return inv.float()


def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def manual_forward(name, W, L, ids, qs, meta, position_ids=None, key_mask=None):
    """Plain-torch forward of a tiny model: W base weights, L LoRA tensors (PEFT names), qs {layer: Q}.
    position_ids [1|B, T]: packed rows (rope positions; attention kept within runs where the position
    grows by 1); key_mask [B, T]: 1 on real tokens (padding). Returns (logits, [resid_post per layer])."""
    cfg = json.load(open(os.path.join(FIX, "tiny", name, "config.json")))
    gemma = cfg["model_type"] == "gemma2"
    H, nh, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or H // nh
    eps, window = cfg["rms_norm_eps"], cfg.get("sliding_window")
    # Which layers use the window: config.layer_types when present (Gemma-2, Qwen), else all (Mistral).
    types = cfg.get("layer_types") or ["sliding_attention" if window else "full_attention"] * cfg["num_hidden_layers"]
    scale = meta["lora"]["scale"]
    B, T = ids.shape
    pos = torch.arange(T)[None].expand(B, T) if position_ids is None else position_ids.expand(B, T)
    ang = pos.float()[..., None] * rope_inv_freq(cfg, hd)[None, None]
    ang = torch.cat([ang, ang], -1)
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]  # [B, 1, T, hd]

    def rotate_half(x):
        return torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], -1)

    def norm(x, key):
        w = W[key]
        return rms_norm(x, 1.0 + w if gemma else w, eps)

    def linear(x, li, kind, mod):
        y = x @ W[f"model.layers.{li}.{kind}.{mod}.weight"].T
        bias = W.get(f"model.layers.{li}.{kind}.{mod}.bias")
        if bias is not None:
            y = y + bias
        a = f"base_model.model.model.layers.{li}.{kind}.{mod}.lora_A.weight"
        if a in L:
            y = y + scale * (x @ L[a].T) @ L[a.replace("lora_A", "lora_B")].T
        return y

    qi, kj = torch.arange(T)[:, None], torch.arange(T)[None]
    seg = torch.cumsum(torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1) != 1, -1)  # [B, T]
    mask = (kj <= qi)[None] & (seg[:, :, None] == seg[:, None, :])  # [B, T, T]
    if key_mask is not None:
        mask = mask & key_mask.bool()[:, None, :]
    masks = {"full_attention": mask[:, None],
             "sliding_attention": (mask & (kj > qi - window)[None])[:, None] if window else None}
    h = W["model.embed_tokens.weight"][ids]
    if gemma:
        h = h * torch.tensor(H ** 0.5, dtype=torch.float32)
    resid = []
    for li in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{li}."
        x = norm(h, pre + "input_layernorm.weight")
        q = linear(x, li, "self_attn", "q_proj").view(B, T, nh, hd)
        k = linear(x, li, "self_attn", "k_proj").view(B, T, nkv, hd)
        v = linear(x, li, "self_attn", "v_proj").view(B, T, nkv, hd).transpose(1, 2)
        if pre + "self_attn.q_norm.weight" in W:  # Qwen3: RMSNorm over head_dim per head, before rope
            q, k = norm(q, pre + "self_attn.q_norm.weight"), norm(k, pre + "self_attn.k_norm.weight")
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
        if gemma:
            s = (q @ k.transpose(-1, -2)) * cfg["query_pre_attn_scalar"] ** -0.5
            c = cfg["attn_logit_softcapping"]
            s = torch.tanh(s / c) * c  # before the mask
        else:
            s = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        att = s.masked_fill(~masks[types[li]], float("-inf")).softmax(-1)
        o = linear((att @ v).transpose(1, 2).reshape(B, T, nh * hd), li, "self_attn", "o_proj")
        if gemma:
            h = h + norm(o, pre + "post_attention_layernorm.weight")
            x = norm(h, pre + "pre_feedforward_layernorm.weight")
            act = torch.nn.functional.gelu(linear(x, li, "mlp", "gate_proj"), approximate="tanh")
            y = linear(act * linear(x, li, "mlp", "up_proj"), li, "mlp", "down_proj")
            h = h + norm(y, pre + "post_feedforward_layernorm.weight")
        else:
            h = h + o
            x = norm(h, pre + "post_attention_layernorm.weight")
            act = torch.nn.functional.silu(linear(x, li, "mlp", "gate_proj")) * linear(x, li, "mlp", "up_proj")
            h = h + linear(act, li, "mlp", "down_proj")
        if li in qs:
            h = h - (h @ qs[li]) @ qs[li].T
        resid.append(h)
    head = W.get("lm_head.weight", W["model.embed_tokens.weight"])
    logits = norm(h, "model.norm.weight") @ head.T
    if gemma:
        c = cfg["final_logit_softcapping"]
        logits = torch.tanh(logits / c) * c
    return logits, resid


def ce_sum(logits, labels):
    return causal_lm_loss(logits, labels, reduction="sum")


def verify_tiny(name):
    """Recompute a tiny fixture from its documented semantics in plain torch (no transformers or
    PEFT modules): RMSNorm, rotate-half rope (llama3 scaling), GQA, sliding window, LoRA, ablation,
    the loss, and a hand-written AdamW / clip / schedule. Returns the largest discrepancies."""
    from safetensors.torch import load_file
    d = os.path.join(FIX, "tiny", name)
    W = load_file(os.path.join(d, "model.safetensors"))
    F = load_file(os.path.join(d, "fixture.safetensors"))
    D = load_file(os.path.join(d, "directions.safetensors"))
    meta = json.load(open(os.path.join(d, "fixture.json")))
    qs = {int(k.split(".")[1]): orthonormal(v) for k, v in D.items()}
    L = {k[5:]: v.clone().requires_grad_(True) for k, v in F.items() if k.startswith("lora.")}
    err = lambda a, b: float((a.detach() - b).abs().max())
    lg, res = manual_forward(name, W, L, F["input_ids"], qs, meta)
    lb = F["labels"]
    loss = ce_sum(lg, lb) / (lb[:, 1:] != -100).sum()
    loss.backward()
    out = {"logits": err(lg, F["logits"]), "loss": err(loss, F["loss"][0]),
           "resid_post": max(err(r, F[f"resid_post.{i}"]) for i, r in enumerate(res)),
           "grad_rel": max(err(p.grad, F[f"grad.{n}"]) / float(F[f"grad.{n}"].abs().max()) for n, p in L.items())}
    with torch.no_grad():
        out["logits_noablate"] = err(manual_forward(name, W, L, F["input_ids"], {}, meta)[0], F["logits_noablate"])
    P = {n: F[f"lora.{n}"].clone() for n in L}
    m1 = {n: torch.zeros_like(p) for n, p in P.items()}
    m2 = {n: torch.zeros_like(p) for n, p in P.items()}
    losses, norms = [], []
    for s in range(STEPS):
        Lp = {n: p.clone().requires_grad_(True) for n, p in P.items()}
        n_tok = int((F["train.labels"][s][:, :, 1:] != -100).sum())
        tot = 0.0
        for a in range(ACCUM):
            lg, _ = manual_forward(name, W, Lp, F["train.input_ids"][s, a], qs, meta)
            l_sum = ce_sum(lg, F["train.labels"][s, a])
            (l_sum / n_tok).backward()
            tot += float(l_sum.detach())
        losses.append(tot / n_tok)
        gn = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in Lp.values()))
        norms.append(gn)
        coef = min(1.0, CLIP / (gn + 1e-6))
        lr = LR * (s / WARMUP if s < WARMUP else max(0.0, (STEPS - s) / (STEPS - WARMUP)))
        for n in P:
            g = Lp[n].grad * coef
            P[n] = P[n] * (1 - lr * WD)
            m1[n] = BETAS[0] * m1[n] + (1 - BETAS[0]) * g
            m2[n] = BETAS[1] * m2[n] + (1 - BETAS[1]) * g * g
            mh = m1[n] / (1 - BETAS[0] ** (s + 1))
            vh = m2[n] / (1 - BETAS[1] ** (s + 1))
            P[n] = P[n] - lr * mh / (vh.sqrt() + ADAM_EPS)
    i = 0
    while f"generate.prompt.{i}" in F:  # greedy ids: argmax of an uncached base forward, no LoRA, no ablation
        seq = torch.cat([F[f"generate.prompt.{i}"], F[f"generate.ids.{i}"]])[None]
        n = F[f"generate.prompt.{i}"].numel()
        with torch.no_grad():
            lg = manual_forward(name, W, {}, seq[:, :-1], {}, meta)[0][0, n - 1:]
        out[f"generate.{i}_mismatches"] = float((lg.argmax(-1) != F[f"generate.ids.{i}"]).sum())
        i += 1
    out["train.losses"] = max(abs(a - b) for a, b in zip(losses, F["train.losses"].tolist()))
    out["train.grad_norms"] = max(abs(a - b) for a, b in zip(norms, F["train.grad_norms"].tolist()))
    out["step3"] = max(err(P[n], F[f"step3.{n}"]) for n in P)
    return out


def verify_full(name, return_params=False):
    """Recompute tiny/<name>/full.safetensors in plain torch: manual_forward with every base weight
    trainable and no LoRA, the loss, and a hand-written AdamW with the two decay groups (the name rule
    NO_DECAY_PATTERNS), global-norm clipping and the linear schedule. Returns the largest discrepancies."""
    from safetensors.torch import load_file
    d = os.path.join(FIX, "tiny", name)
    W0 = load_file(os.path.join(d, "model.safetensors"))
    F = load_file(os.path.join(d, "fixture.safetensors"))
    G = load_file(os.path.join(d, "full.safetensors"))
    D = load_file(os.path.join(d, "directions.safetensors"))
    meta = json.load(open(os.path.join(d, "fixture.json")))
    full_meta = json.load(open(os.path.join(d, "full.json")))
    qs = {int(k.split(".")[1]): orthonormal(v) for k, v in D.items()}
    assert sorted(k[len("full_grad."):] for k in G if k.startswith("full_grad.")) == sorted(W0)
    assert [n for n in W0 if no_decay_by_name(n)] == [n for n in W0 if n in full_meta["training"]["optimizer"]["no_decay"]]
    err = lambda a, b: float((a.detach() - b).abs().max())
    W = {n: v.clone().requires_grad_(True) for n, v in W0.items()}
    lg, _ = manual_forward(name, W, {}, F["input_ids"], qs, meta)
    lb = F["labels"]
    loss = ce_sum(lg, lb) / (lb[:, 1:] != -100).sum()
    loss.backward()
    out = {"full_logits": err(lg, G["full_logits"]), "full_loss": err(loss, G["full_loss"][0]),
           "full_grad_rel": max(err(p.grad, G[f"full_grad.{n}"]) / float(G[f"full_grad.{n}"].abs().max())
                                for n, p in W.items())}
    P = {n: v.clone() for n, v in W0.items()}
    m1 = {n: torch.zeros_like(p) for n, p in P.items()}
    m2 = {n: torch.zeros_like(p) for n, p in P.items()}
    losses, norms, lrs = [], [], []
    for s in range(STEPS):
        Wp = {n: p.clone().requires_grad_(True) for n, p in P.items()}
        n_tok = int((F["train.labels"][s][:, :, 1:] != -100).sum())
        tot = 0.0
        for a in range(ACCUM):
            lg, _ = manual_forward(name, Wp, {}, F["train.input_ids"][s, a], qs, meta)
            l_sum = ce_sum(lg, F["train.labels"][s, a])
            (l_sum / n_tok).backward()
            tot += float(l_sum.detach())
        losses.append(tot / n_tok)
        gn = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in Wp.values()))
        norms.append(gn)
        coef = min(1.0, FULL_CLIP / (gn + 1e-6))
        lr = FULL_LR * (STEPS - s) / STEPS
        lrs.append(lr)
        for n in P:
            wd = 0.0 if no_decay_by_name(n) else FULL_WD
            g = Wp[n].grad * coef
            P[n] = P[n] * (1 - lr * wd)
            m1[n] = FULL_BETAS[0] * m1[n] + (1 - FULL_BETAS[0]) * g
            m2[n] = FULL_BETAS[1] * m2[n] + (1 - FULL_BETAS[1]) * g * g
            mh = m1[n] / (1 - FULL_BETAS[0] ** (s + 1))
            vh = m2[n] / (1 - FULL_BETAS[1] ** (s + 1))
            P[n] = P[n] - lr * mh / (vh.sqrt() + FULL_EPS)
    out["full_train.losses"] = max(abs(a - b) for a, b in zip(losses, G["full_train.losses"].tolist()))
    out["full_train.grad_norms"] = max(abs(a - b) for a, b in zip(norms, G["full_train.grad_norms"].tolist()))
    out["full_train.lrs"] = max(abs(a - b) for a, b in zip(lrs, G["full_train.lrs"].tolist()))
    out["full_step3"] = max(err(P[n], G[f"full_step3.{n}"]) for n in P)
    return (out, P) if return_params else out


def verify_packed():
    """Recompute tiny/llama_packed in plain torch: the packed row with per-sequence positions and
    attention, and the padded batch with a key mask."""
    from safetensors.torch import load_file
    d = os.path.join(FIX, "tiny", "llama")
    W = load_file(os.path.join(d, "model.safetensors"))
    F0 = load_file(os.path.join(d, "fixture.safetensors"))
    D = load_file(os.path.join(d, "directions.safetensors"))
    meta = json.load(open(os.path.join(d, "fixture.json")))
    F = load_file(os.path.join(FIX, "tiny", "llama_packed", "fixture.safetensors"))
    qs = {int(k.split(".")[1]): orthonormal(v) for k, v in D.items()}
    err = lambda a, b: float((a.detach() - b).abs().max())
    out = {}
    for pre, kw in (("", dict(position_ids=F["position_ids"])), ("padded.", dict(key_mask=F["padded.attention_mask"]))):
        L = {k[5:]: v.clone().requires_grad_(True) for k, v in F0.items() if k.startswith("lora.")}
        lb = F[pre + "labels"]
        lg, res = manual_forward("llama", W, L, F[pre + "input_ids"], qs, meta, **kw)
        loss = ce_sum(lg, lb) / (lb[:, 1:] != -100).sum()
        loss.backward()
        if not pre:
            out["logits"] = err(lg, F["logits"])
            out["resid_post"] = max(err(r, F[f"resid_post.{i}"]) for i, r in enumerate(res))
        out[pre + "loss"] = err(loss, F[pre + "loss"][0])
        out[pre + "grad_rel"] = max(err(p.grad, F[f"{pre}grad.{n}"]) / float(F[f"{pre}grad.{n}"].abs().max())
                                    for n, p in L.items())
    return out


# --------------------------------------------------------------------------------------------
# SmolLM2 (real GGUF)
# --------------------------------------------------------------------------------------------

TOKENIZER_TEXTS = [
    "Hello, world!",
    "",
    " leading space",
    "trailing space ",
    "12345 and 3.14159",
    "naïve café 日本語 🤖",
    "def f(x):\n    if x:\n\treturn x  # tab\n    return None\n",
    "a  b   c    d",
    "line1\n\nline2\n\n\n\nline3",
    "   \n  \t \n",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>assistant\nSure!<|im_end|>\n<|endoftext|>",
    "The quick brown fox jumps over the lazy dog.",
    "I'm can't won't they'll we've you'd",
    "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n",
    "Ünïcödé ßtraße — “quotes” … ‘single’",
    "emoji 👩‍💻 family 👨‍👩‍👧‍👦 flag 🇫🇷",
    "price: $1,234.56 (-7%) 1e-10 0x1F",
    "    indented with four spaces",
    "x=1;y=2;print(x+y)",
    "Привет, мир! Γειά σου κόσμε! مرحبا بالعالم",
    "tab\tseparated\tvalues\t\t",
    "!!!???...,,,;;;",
    "https://example.com/path?query=1&b=2#frag",
    "A" * 40,
    "<think>reasoning</think> answer",
]

CHATS = [
    ({"messages": [{"role": "system", "content": "You are a helpful assistant."},
                   {"role": "user", "content": "What is 2+2?"}]}, True),
    ({"messages": [{"role": "user", "content": "Tell me a joke about cats."}]}, True),
    ({"messages": [{"role": "user", "content": "Hi!"},
                   {"role": "assistant", "content": "Hello! How can I help?"},
                   {"role": "user", "content": "Write hello world in Python."}]}, True),
    ({"messages": [{"role": "system", "content": "Be brief."},
                   {"role": "user", "content": "Name a colour."},
                   {"role": "assistant", "content": "Blue."}]}, False),
    ({"messages": [{"role": "user", "content": "naïve café 日本語 🤖\n  indented"}]}, False),
]

LOGIT_PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "List three primary colours, separated by commas."}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": "Hi there!"},
     {"role": "assistant", "content": "Hello! How can I help you today?"},
     {"role": "user", "content": "Write one line of Python that prints 42."}],
]


def build_smollm2(gguf_path, out_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, name = os.path.dirname(gguf_path), os.path.basename(gguf_path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    os.makedirs(out_dir, exist_ok=True)

    cases = [{"text": t, "ids": tok.encode(t, add_special_tokens=False)} for t in TOKENIZER_TEXTS]
    chat = []
    for conv, gen_prompt in CHATS:
        text = tok.apply_chat_template(conv["messages"], add_generation_prompt=gen_prompt, tokenize=False)
        chat.append({"messages": conv["messages"], "add_generation_prompt": gen_prompt, "text": text})
    with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump({"source": "transformers AutoTokenizer from the SmolLM2-135M-Instruct Q4_1 GGUF; "
                             "ids = tok.encode(text, add_special_tokens=False); chat text = "
                             "tok.apply_chat_template(messages, add_generation_prompt, tokenize=False)",
                   "cases": cases, "chat": chat}, f, ensure_ascii=False, indent=1)
        f.write("\n")

    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    tensors, lens = {}, []
    for i, msgs in enumerate(LOGIT_PROMPTS):
        text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        ids = torch.tensor(tok.encode(text, add_special_tokens=False), dtype=torch.int64)
        T = ids.numel()
        assert 20 <= T <= 60, T
        with torch.no_grad():
            logits = model(input_ids=ids[None]).logits[0].float()
        # Full-vocab rows at two positions only: each row is 49152 floats (192 KB).
        pos = torch.tensor([T // 2, T - 1], dtype=torch.int64)
        tensors[f"p{i}.ids"] = ids
        tensors[f"p{i}.argmax"] = logits.argmax(-1)
        tensors[f"p{i}.lse"] = torch.logsumexp(logits, -1)
        tensors[f"p{i}.positions"] = pos
        tensors[f"p{i}.logits_at"] = logits[pos].contiguous()
        lens.append(T)
    save_file(tensors, os.path.join(out_dir, "logits.safetensors"))
    return dict(n_cases=len(cases), n_chat=len(chat), prompt_lens=lens,
                next_token=[tok.decode([int(tensors[f"p{i}.argmax"][-1])]) for i in range(len(lens))])


GREEDY_MAX_NEW = 40

GREEDY_PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "I want to learn to cook. Where should I start?"}],
    [{"role": "system", "content": "You are a concise assistant. Answer in one short sentence."},
     {"role": "user", "content": "What is photosynthesis?"}],
    [{"role": "user", "content": "I have a small garden behind my house that gets about four hours of direct "
                                 "sunlight each day, mostly in the morning. The soil is rather sandy and drains "
                                 "quickly. I would like to grow a few vegetables this summer without spending "
                                 "much time on it. Which vegetables would you recommend, and why?"}],
]


def build_greedy(gguf_path, out_path):
    """Greedy model.generate, one prompt at a time (batch 1, no padding), f32 on CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, name = os.path.dirname(gguf_path), os.path.basename(gguf_path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    eos = model.generation_config.eos_token_id
    eos = sorted({int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])})
    assert tok.eos_token_id in eos, (tok.eos_token_id, eos)

    cases = []
    for msgs in GREEDY_PROMPTS:
        enc = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)
        prompt = [int(i) for i in enc["input_ids"]]
        text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        assert prompt == tok.encode(text, add_special_tokens=False)
        ids = torch.tensor([prompt], dtype=torch.int64)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=GREEDY_MAX_NEW, return_dict_in_generate=True,
                                 output_scores=True, output_logits=True)
        new = [int(t) for t in out.sequences[0, len(prompt):]]
        assert len(new) == len(out.logits) == len(out.scores)
        margins = []
        for step, (lg, sc) in enumerate(zip(out.logits, out.scores)):
            lg = lg[0].float()
            # No logits processors are active for this model, so scores are the raw logits.
            assert torch.equal(lg, sc[0].float()), step
            top = torch.topk(lg, 2)
            assert int(top.indices[0]) == new[step], step
            margins.append(round(float(top.values[0] - top.values[1]), 4))
        # Generation stops at the first EOS, which is kept; otherwise it runs to max_new_tokens.
        assert not any(t in eos for t in new[:-1]), new
        assert new[-1] in eos or len(new) == GREEDY_MAX_NEW, new
        cases.append({"messages": msgs, "prompt_ids": prompt, "generated_ids": new,
                      "text": tok.decode(new, skip_special_tokens=True), "margins": margins})

    with open(out_path, "w", encoding="utf-8") as f:
        json.dump({"model": name, "max_new_tokens": GREEDY_MAX_NEW, "eos_token_ids": eos,
                   "source": "transformers model.generate(input_ids, do_sample=False, max_new_tokens, "
                             "default generation config of the GGUF) one prompt at a time, f32, CPU, eager; "
                             "prompt_ids = tok.apply_chat_template(messages, add_generation_prompt=True); "
                             "generated_ids = new ids only (ends with the EOS id if one was generated); "
                             "text = tok.decode(generated_ids, skip_special_tokens=True); margins[i] = "
                             "top-1 minus top-2 logit at generated step i",
                   "cases": cases}, f, ensure_ascii=False, indent=1)
        f.write("\n")
    with open(out_path, encoding="utf-8") as f:  # one line per list of numbers
        text = re.sub(r"\[\n[-0-9.,\s]*\]",
                      lambda m: "[" + ", ".join(x.strip(",") for x in m.group(0)[1:-1].split()) + "]", f.read())
    with open(out_path, "w", encoding="utf-8") as f:
        f.write(text)
    return cases, eos


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["tiny", "qwen3", "gemma2", "packed", "full", "smollm2", "greedy"],
                    help="tiny = all tiny models (with their full.* fixtures) and llama_packed; qwen3, gemma2, "
                         "packed = that set alone; full = only the full fine-tuning fixtures (full.*) of every "
                         "tiny model, from their committed files")
    ap.add_argument("--gguf", default=DEFAULT_GGUF)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--verify", action="store_true",
                    help="only recompute the committed tiny fixtures by hand and report the differences")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    vers = check_versions()
    print(f"torch {vers['torch']}  transformers {vers['transformers']}  peft {vers['peft']}")

    if args.verify:
        worst = 0.0
        for name in TINY:
            r = verify_tiny(name)
            worst = max(worst, max(r.values()))
            print(f"verify tiny/{name}: " + "  ".join(f"{k} {v:.2e}" for k, v in r.items()))
            if os.path.exists(os.path.join(FIX, "tiny", name, "full.safetensors")):
                r = verify_full(name)
                worst = max(worst, max(r.values()))
                print(f"verify tiny/{name} full: " + "  ".join(f"{k} {v:.2e}" for k, v in r.items()))
        r = verify_packed()
        worst = max(worst, max(r.values()))
        print("verify tiny/llama_packed: " + "  ".join(f"{k} {v:.2e}" for k, v in r.items()))
        print("verify:", "ok" if worst < 1e-4 else "MISMATCH", f"(largest difference {worst:.2e})")
        return 0 if worst < 1e-4 else 1

    for name, spec in TINY.items():
        if args.only not in (None, "tiny", name):
            continue
        r = build_tiny(name, spec, os.path.join(FIX, "tiny", name))
        print(f"tiny/{name}: loss {r['loss']:.5f}  max|logits-logits_noablate| {r['ablation_effect']:.4f}  "
              f"train losses {[round(x, 5) for x in r['losses']]}  grad norms "
              f"{[round(x, 4) for x in r['norms']]}  lrs {r['lrs']}" +
              (f"  sliding-window effect {r['sw']}" if r["sw"] else ""))
        if r["saturation"]:
            sat = r["saturation"]
            print(f"tiny/{name}: softcap saturation |s/c|>1: attention scores "
                  f"{sat['attn_scores_frac_abs_over_cap']:.4f} (max {sat['attn_scores_max_abs_over_cap']:.2f}), "
                  f"logits {sat['logits_frac_abs_over_cap']:.4f} (max {sat['logits_max_abs_over_cap']:.2f})")
        if r["generation"]:
            for c in r["generation"]["cases"]:
                print(f"tiny/{name}: greedy {c['prompt_ids']} -> {c['generated_ids']}  "
                      f"min margin {min(c['margins']):.4f}")
    for name in TINY:
        if args.only not in (None, "tiny", "full", name):
            continue
        r = build_full(name)
        print(f"tiny/{name} full: loss {r['loss']:.5f}  max|grad| decay {r['max_abs_grad']['decay']:.4f} "
              f"no-decay {r['max_abs_grad']['no_decay']:.4f}  train losses {[round(x, 5) for x in r['losses']]}  "
              f"grad norms {[round(x, 4) for x in r['norms']]}  clip coefs {[round(x, 4) for x in r['coefs']]}  "
              f"lrs {[round(x, 6) for x in r['lrs']]}  largest rel change {r['rel'][1]:.4f} ({r['rel'][0]})  "
              f"smallest {r['low'][1]:.4f} ({r['low'][0]})  effects {r['effects']}")
    if args.only in (None, "tiny", "packed"):
        r = build_packed(os.path.join(FIX, "tiny", "llama_packed"))
        print(f"tiny/llama_packed: lengths {PACKED_LENS}  loss {r['loss']:.6f}  padded loss {r['padded_loss']:.6f}  "
              f"max|packed - alone| logits {r['vs_alone']:.2e}  max rel grad diff packed/padded "
              f"{r['grad_rel']:.2e}  position_ids with the config's use_cache=True: max|packed - alone| "
              f"{r['leak']:.3f}")
    if args.only in (None, "smollm2"):
        if not os.path.exists(args.gguf):
            print(f"skipping smollm2: {args.gguf} not found")
        else:
            r = build_smollm2(args.gguf, os.path.join(FIX, "smollm2"))
            print(f"smollm2: {r['n_cases']} encode cases, {r['n_chat']} chat cases, prompts of "
                  f"{r['prompt_lens']} tokens, greedy next tokens {r['next_token']}")
    if args.only in (None, "greedy"):
        if not os.path.exists(args.gguf):
            print(f"skipping greedy: {args.gguf} not found")
        else:
            cases, eos = build_greedy(args.gguf, os.path.join(FIX, "smollm2", "greedy.json"))
            for i, c in enumerate(cases):
                low = [(j, m) for j, m in enumerate(c["margins"]) if m < 0.05]
                print(f"greedy case {i}: prompt {len(c['prompt_ids'])} tokens, generated "
                      f"{len(c['generated_ids'])} (ends with EOS: {c['generated_ids'][-1] in eos}), "
                      f"min margin {min(c['margins']):.4f}, margins < 0.05 at {low}: {c['text']!r}")
            print(f"greedy: eos_token_ids {eos}")
    total = 0
    for root, _, files in os.walk(FIX):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    print(f"tests/fixtures total {total / 1e6:.2f} MB")


if __name__ == "__main__":
    sys.exit(main())
