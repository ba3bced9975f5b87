#!/usr/bin/env python3
"""PREDICTION, not a measurement: what data-parallel training costs in communication per optimizer step.

For a few model shapes and three ways of training (LoRA r=32 on all seven projections; full fine-tuning
with one all-reduce of the f32 gradients; full fine-tuning with ZeRO-1), this prints Markdown tables of
the parameters trained, the gradient bytes, the bytes every rank sends per optimizer step, the time that
takes on three assumed networks, and the scaling efficiency that follows. Standard library only:

    python3 scripts/comm_model.py

What one optimizer step communicates, per rank (one process per GPU, N ranks):
  - LoRA: the one flat f32 buffer of every adapter's A and B gradients, all-reduced once.
  - full, all-reduce: every f32 gradient, all-reduced once.
  - full, ZeRO-1 (as caft-fast implements it): a reduce-scatter of the f32 gradients (each rank
    then holds the sum of its 1/N shard), each rank updates its shard of the f32 master weights
    with its shard of the AdamW moments, and an all-gather of the updated f32 master shards into
    every rank's whole master copy (from which the forward's bf16 copy is refreshed). It sends
    what an all-reduce sends; it saves the moments' memory (and 1/N of the optimizer's work).
  - full, ZeRO-1, bf16 gather (NOT implemented; what llm.c does): masters sharded too, and the
    all-gather moves the forward's bf16 copy: a quarter fewer bytes, and the f32 masters / N.
  - every method: one tiny all-reduce of the loss and the stop flag (ZeRO-1 also one of the shards'
    sums of squares, for the global gradient norm). Latency only, tens of microseconds: left out below.

Bytes each rank sends, ring algorithms, S = the size in bytes of the whole buffer:
    all-reduce       2 (N - 1) / N x S     (a reduce-scatter followed by an all-gather)
    reduce-scatter     (N - 1) / N x S
    all-gather         (N - 1) / N x S
These are the standard bandwidth analysis of the ring (Patarasuk and Yuan, "Bandwidth optimal
all-reduce algorithms for clusters of workstations", J. Parallel Distrib. Comput. 69(2), 2009), and
the same factors NCCL's own benchmark applies to turn algorithm bandwidth (S / time) into "bus
bandwidth" (nccl-tests, doc/PERFORMANCE.md: busbw = algbw x 2(n-1)/n for all-reduce, x (n-1)/n for
reduce-scatter and all-gather). So a collective's time is (bytes sent per rank) / busbw, and a busbw
measured by nccl-tests on a machine can be put straight into NETWORKS below.

Compute time per optimizer step (forward + backward of grad_accum micro-batches; the optimizer's own
pass is left out, and so is ZeRO-1's saving of doing 1/N of it):
  - LoRA on a shape measured on one H200 (docs/benchmarks.md): the measured tokens/s.
  - full fine-tuning on a measured shape: the model FLOPs of the full step at the FLOP rate the LoRA
    step reached on that shape (i.e. the same MFU).
  - shapes with no measurement: model FLOPs at an ASSUMED 35% MFU of 989.4 dense bf16 TFLOP/s (the
    measured LoRA MFU on Qwen2.5-1.5B).
Model FLOPs as caft-fast's `train::bench` counts them: 4 x matmul parameters x tokens for LoRA (frozen
weights get no weight gradient), 6 x for full fine-tuning, plus causal attention; matmul parameters are
the seven projections of every layer and the lm head (counted once when tied).

Scaling efficiency = compute / (compute + exposed communication), per optimizer step:
  - no overlap: all of the communication is exposed (it runs after the backward, as caft-fast does).
  - overlapped: the best an implementation could do. A gradient is final only in the last micro-batch's
    backward, so the gradient collective can hide behind that backward only; ZeRO-1's all-gather can
    also hide behind the next step's first forward (layer by layer). The backward/forward split of a
    micro-batch is taken in proportion to its FLOPs.
Units: MB = 10^6 bytes, GB/s = 10^9 bytes/s, GiB = 2^30 bytes.
"""

PEAK_TFLOPS = 989.4  # H100/H200 SXM dense bf16
ASSUMED_MFU = 0.35   # measured for LoRA on Qwen2.5-1.5B (docs/benchmarks.md); ASSUMED for other shapes
LORA_R = 32

# (label, ranks N, bus bandwidth GB/s): ASSUMPTIONS, not measurements.
NETWORKS = [
    # One node, 8 GPUs on NVLink4 / NVSwitch: a typical nccl-tests all-reduce busbw, taken for
    # reduce-scatter and all-gather too.
    ("1 x 8 NVLink", 8, 360.0),
    # Two such nodes with one 400 Gb/s link each: a ring crosses between the nodes, so the 50 GB/s of
    # that link bounds every rank's sending rate. A ring carries 2(N-1)/N x S (about 1.9 S) across the
    # boundary each way for an all-reduce; NCCL's tree or a hierarchical scheme (within the node, then
    # across) carries about S, so on this network the ring figures may be up to ~1.9x pessimistic.
    ("2 x 8, 400 Gb/s per node", 16, 400 / 8),
    # Two nodes with one 400 Gb/s NIC per GPU (8 x 400 Gb/s = 400 GB/s per node): the node boundary is
    # no longer the bottleneck; the NVLink figure is.
    ("2 x 8, 8 x 400 Gb/s per node", 16, min(360.0, 8 * 400 / 8)),
]


class Shape:
    def __init__(self, name, layers, hidden, ffn, heads, kv_heads, head_dim, vocab, tied, qkv_bias,
                 batch, seq, measured_tokens_per_s=None):
        self.name, self.layers, self.hidden, self.ffn = name, layers, hidden, ffn
        self.heads, self.kv_heads, self.head_dim, self.vocab = heads, kv_heads, head_dim, vocab
        self.tied, self.qkv_bias = tied, qkv_bias
        self.batch, self.seq = batch, seq  # one micro-batch per GPU
        self.measured_tokens_per_s = measured_tokens_per_s  # LoRA + CAFT on one H200, if measured

    def projections(self):
        """(in_features, out_features) of the seven projections of one layer."""
        d, q, kv, f = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.ffn
        return [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)]  # q k v o gate up down

    def all_params(self):
        """Every weight: what full fine-tuning trains."""
        layer = sum(i * o for i, o in self.projections()) + 2 * self.hidden  # + the two RMSNorms
        if self.qkv_bias:
            layer += (self.heads + 2 * self.kv_heads) * self.head_dim
        embed = self.vocab * self.hidden
        return self.layers * layer + embed * (1 if self.tied else 2) + self.hidden  # + final norm

    def lora_params(self):
        return self.layers * sum(LORA_R * (i + o) for i, o in self.projections())

    def matmul_params(self):
        return self.layers * sum(i * o for i, o in self.projections()) + self.vocab * self.hidden

    def attention_flops(self):
        """Causal attention of one micro-batch: forward 2 T^2 hd per head, backward 2.5 times it."""
        fwd = 2.0 * self.layers * self.batch * self.heads * self.seq ** 2 * self.head_dim
        return fwd, 2.5 * fwd

    def flops(self, full):
        """(forward, backward) model FLOPs of one micro-batch."""
        tokens = self.batch * self.seq
        attn_fwd, attn_bwd = self.attention_flops()
        fwd = 2.0 * self.matmul_params() * tokens + attn_fwd
        bwd = (4.0 if full else 2.0) * self.matmul_params() * tokens + attn_bwd
        return fwd, bwd


SHAPES = [
    Shape("Llama-3.2-1B", 16, 2048, 8192, 32, 8, 64, 128256, tied=True, qkv_bias=False,
          batch=8, seq=1024, measured_tokens_per_s=75345),
    Shape("Qwen2.5-1.5B", 28, 1536, 8960, 12, 2, 128, 151936, tied=True, qkv_bias=True,
          batch=8, seq=1024, measured_tokens_per_s=53226),
    Shape("Llama-3.1-8B", 32, 4096, 14336, 32, 8, 128, 128256, tied=False, qkv_bias=False,
          batch=2, seq=2048),
    Shape("Qwen2.5-32B", 64, 5120, 27648, 40, 8, 128, 152064, tied=False, qkv_bias=True,
          batch=2, seq=2048),
]

METHODS = ["LoRA r=32", "full, all-reduce", "full, ZeRO-1", "full, ZeRO-1, bf16 gather"]
GRAD_ACCUMS = [1, 8]


def trained_params(shape, method):
    return shape.lora_params() if method.startswith("LoRA") else shape.all_params()


def collectives(shape, method, n):
    """[(bytes one rank sends, what for)] of one optimizer step on n ranks."""
    p = trained_params(shape, method)
    grad = 4 * p  # f32 gradients
    if method == "full, ZeRO-1":  # the f32 master shards gathered
        return [((n - 1) / n * grad, "reduce-scatter"), ((n - 1) / n * 4 * p, "all-gather")]
    if method == "full, ZeRO-1, bf16 gather":  # the forward's bf16 copy gathered
        return [((n - 1) / n * grad, "reduce-scatter"), ((n - 1) / n * 2 * p, "all-gather")]
    return [(2 * (n - 1) / n * grad, "all-reduce")]


def comm_seconds(shape, method, n, busbw_gb_s):
    """(gradient collective, all-gather) seconds: bytes sent per rank / bus bandwidth."""
    times = {what: sent / (busbw_gb_s * 1e9) for sent, what in collectives(shape, method, n)}
    return times.get("all-reduce", times.get("reduce-scatter")), times.get("all-gather", 0.0)


def model_state_gib(shape, method, n):
    """Weights, gradients and AdamW moments one GPU holds (no activations, no workspace)."""
    p = shape.all_params()
    if method.startswith("LoRA"):  # frozen bf16 weights; f32 LoRA weights, gradients, 2 moments
        b = 2 * p + 16 * shape.lora_params()
    elif method == "full, all-reduce":  # bf16 forward copy; f32 masters, gradients, 2 moments
        b = 18 * p
    elif method == "full, ZeRO-1":  # bf16 copy, f32 masters and gradients whole; the shard's
        # masters, gradients and 2 moments 1/n each
        b = 2 * p + 8 * p + 16 * p / n
    else:  # bf16 copy and f32 gradients whole; masters, shard gradients and moments 1/n each
        b = 2 * p + 4 * p + 16 * p / n
    return b / 2 ** 30


def micro_batch_seconds(shape, method):
    """(forward, backward) seconds of one micro-batch on one GPU, and where the figure comes from."""
    full = not method.startswith("LoRA")
    fwd, bwd = shape.flops(full)
    if shape.measured_tokens_per_s:
        lora_fwd, lora_bwd = shape.flops(False)
        lora_s = shape.batch * shape.seq / shape.measured_tokens_per_s
        rate = (lora_fwd + lora_bwd) / lora_s
        source = "measured on 1 GPU" if not full else f"at measured MFU {rate / 1e12 / PEAK_TFLOPS:.1%}"
    else:
        rate = ASSUMED_MFU * PEAK_TFLOPS * 1e12
        source = f"assumed MFU {ASSUMED_MFU:.0%}"
    return fwd / rate, bwd / rate, source


def efficiency(shape, method, grad_accum, n, busbw):
    fwd, bwd, _ = micro_batch_seconds(shape, method)
    compute = grad_accum * (fwd + bwd)
    grad_t, gather_t = comm_seconds(shape, method, n, busbw)
    no_overlap = compute / (compute + grad_t + gather_t)
    exposed = max(0.0, grad_t - bwd) + max(0.0, gather_t - fwd)
    return no_overlap, compute / (compute + exposed)


TEXT_COLUMNS = ("shape", "method", "micro-batch", "compute from")


def table(header, rows):
    """A Markdown table: text columns left-aligned, numbers right-aligned."""
    aligns = ["---" if h in TEXT_COLUMNS else "---:" for h in header]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(aligns) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def ms(seconds):
    return f"{seconds * 1e3:,.1f}" if seconds >= 0.01 else f"{seconds * 1e3:.2f}"


def main():
    print("PREDICTION, not measured (scripts/comm_model.py). Assumed bus bandwidths: "
          + "; ".join(f"{label}: N = {n} ranks, {bw:g} GB/s" for label, n, bw in NETWORKS) + ".")
    print("Efficiency cells: no overlap / overlapped.")
    print()
    print(table(["shape", "all parameters", "LoRA r=32 parameters", "matmul parameters"],
                [[s.name, f"{s.all_params():,}", f"{s.lora_params():,}", f"{s.matmul_params():,}"]
                 for s in SHAPES]))
    print()
    header = ["shape", "method", "trained parameters", "f32 gradient MB",
              "sent per rank MB, N = 8", "sent per rank MB, N = 16", "model state GiB per GPU, N = 8"]
    header += [f"comm ms, {label}" for label, _, _ in NETWORKS]
    rows = []
    for s in SHAPES:
        for m in METHODS:
            sent8 = sum(b for b, _ in collectives(s, m, 8))
            sent16 = sum(b for b, _ in collectives(s, m, 16))
            row = [s.name, m, f"{trained_params(s, m):,}", f"{4 * trained_params(s, m) / 1e6:,.1f}",
                   f"{sent8 / 1e6:,.1f}", f"{sent16 / 1e6:,.1f}", f"{model_state_gib(s, m, 8):,.1f}"]
            row += [ms(sum(comm_seconds(s, m, n, bw))) for _, n, bw in NETWORKS]
            rows.append(row)
    print(table(header, rows))
    print()
    header = ["shape", "method", "micro-batch", "grad accum", "compute ms per optimizer step",
              "compute from"]
    header += [f"efficiency, {label}" for label, _, _ in NETWORKS]
    rows = []
    for s in SHAPES:
        for m in METHODS:
            fwd, bwd, source = micro_batch_seconds(s, m)
            for ga in GRAD_ACCUMS:
                row = [s.name, m, f"{s.batch} x {s.seq}", str(ga), ms(ga * (fwd + bwd)), source]
                for _, n, bw in NETWORKS:
                    a, b = efficiency(s, m, ga, n, bw)
                    row.append(f"{a:.1%} / {b:.1%}")
                rows.append(row)
    print(table(header, rows))


if __name__ == "__main__":
    main()
