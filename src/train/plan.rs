//! The device-memory plan of a training run: the peak bytes a LoRA training step holds on a GPU,
//! part by part, computed from the model's configuration alone (no weights), and the rule that
//! turns `--checkpointing auto` into a concrete mode.
//!
//! The plan is exact, not a guess: it lists every buffer the CUDA backend allocates for a
//! training run, in the sizes it allocates them. It mirrors
//! - `Model::new`, `set_lora` or `set_full`, `set_ablation`, `ensure_rope` and `ensure_acts`
//!   (`model/transformer.rs`, `transformer/layer.rs`): the forward's weights, the trained
//!   state (LoRA's, or full fine-tuning's f32 master weights, gradients and moments), directions,
//!   the rope table and every activation buffer of a micro-batch under a checkpointing mode;
//! - what `CudaBackend` grows on its own (`backend/cuda/scratch.rs`): token ids, cross-entropy
//!   targets and row losses, the gradient norm's partial sums, the `T` copies of LoRA factors;
//! - the transients: the attention backward's `Δ` (`n_heads x rows` f32, freed after the call),
//!   the previous micro-batch's sequence layout (alive while the next one is uploaded), and the
//!   previous rope table (alive while a longer one is uploaded).
//!
//! cudarc asks the driver for exactly `len x size_of::<E>()` bytes per buffer, and the emulated
//! GPU counts exactly those; `tests/cuda_plan.rs` runs training steps there and holds the
//! measured peak to this plan. A real driver rounds allocations up a little (pool granularity)
//! and needs memory of its own: the CUDA context and loaded kernels, and cuBLAS's workspace
//! (32 MiB on Hopper). `train` checks the plan against the memory free once its context exists,
//! so only the workspace is added there; `caft-fast plan` against a given size adds an estimate
//! of both ([`CONTEXT_ESTIMATE`]).
//!
//! The peak of a step is its persistent buffers (every one is allocated by the end of the first
//! step and never shrinks) plus the largest transient.

use crate::backend::cuda::{ColumnSums, KernelLaunch};
use crate::backend::DeviceMemory;
use crate::model::config::ModelConfig;
use crate::model::full::{Freeze, FullLayout};
use crate::model::lora::{LoraConfig, LoraLayout, Target};
use crate::model::transformer::{chunk_rows, Checkpointing};
use crate::train::config::{Method, TrainConfig};
use anyhow::{bail, Result};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// cuBLAS's own workspace per handle on Hopper and later (the size the cuBLAS documentation
/// recommends there; 4 MiB before), allocated by cuBLAS on first use.
pub const CUBLAS_WORKSPACE: u64 = 32 << 20;
/// What a CUDA context with this program's kernel modules loaded and a cuBLAS handle take on a
/// GPU before any buffer (an estimate: it varies with the driver and the GPU; `train` measures
/// it instead, as the memory already taken when it plans).
pub const CONTEXT_ESTIMATE: u64 = 512 << 20;

/// `--checkpointing`: a mode, or `auto` (the fastest mode whose plan fits the device).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CheckpointingChoice {
    /// None if it fits, else selective, else full; `none` on the CPU.
    #[default]
    Auto,
    Mode(Checkpointing),
}

impl CheckpointingChoice {
    pub const NAMES: &'static str = "auto, none, selective or full";

    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(CheckpointingChoice::Auto),
            _ => Checkpointing::parse(s)
                .map(CheckpointingChoice::Mode)
                .map_err(|_| {
                    anyhow::anyhow!("unknown checkpointing mode {s:?}: use {}", Self::NAMES)
                }),
        }
    }
}

impl std::fmt::Display for CheckpointingChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CheckpointingChoice::Auto => f.write_str("auto"),
            CheckpointingChoice::Mode(m) => m.fmt(f),
        }
    }
}

impl Serialize for CheckpointingChoice {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for CheckpointingChoice {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        CheckpointingChoice::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// The modes from fastest to leanest: the order `auto` tries them in.
pub const MODES: [Checkpointing; 3] = [
    Checkpointing::None,
    Checkpointing::Selective,
    Checkpointing::Full,
];

/// What a plan is computed from: the model's shapes, LoRA, ablation, the largest micro-batch
/// and the device.
#[derive(Clone, Debug)]
pub struct PlanInput {
    pub model: ModelConfig,
    /// What is trained: LoRA adapters, or (`full`) every weight of the layout.
    pub lora: LoraLayout,
    pub full: Option<FullLayout>,
    /// Directions per ablated layer (`k` of each).
    pub ablation: Vec<usize>,
    /// Token rows of the largest micro-batch.
    pub rows: usize,
    /// The most sequences one micro-batch holds.
    pub seqs: usize,
    /// The longest sequence (the rope table covers it).
    pub max_len: usize,
    /// Bytes of an activation element on the device (bf16: 2).
    pub act_bytes: usize,
    /// Device memory that is no buffer of ours: cuBLAS's workspace, and, against a total, the
    /// context ([`CUBLAS_WORKSPACE`], [`CONTEXT_ESTIMATE`]).
    pub reserve: u64,
    /// Data-parallel ranks the run has (1 alone): full fine-tuning on several shards its
    /// optimizer state (ZeRO-1), and the plan is one rank's.
    pub ranks: usize,
}

/// The parts of the table, in order.
pub const PARTS: [(&str, &str); 7] = [
    ("weights", "model weights (the forward's copy)"),
    ("lora", "trained params, grads, AdamW moments (f32)"),
    ("activations", "activations kept for the backward"),
    ("recompute", "recomputation and backward scratch"),
    ("logits", "logits / cross-entropy chunk"),
    ("small", "rope, directions, sequence layout, ids"),
    ("reserve", "cuBLAS workspace and CUDA context"),
];

/// Predicted peak device memory of one checkpointing mode, by part.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MemoryPlan {
    pub mode: Checkpointing,
    /// Bytes per part, in the order of [`PARTS`].
    pub parts: Vec<u64>,
    /// Everything this program allocates at the peak (all parts but `reserve`).
    pub allocated: u64,
    pub total: u64,
    /// Buffers allocated (for messages and tests).
    pub buffers: usize,
}

impl MemoryPlan {
    pub fn part(&self, key: &str) -> u64 {
        PARTS
            .iter()
            .position(|(k, _)| *k == key)
            .map_or(0, |i| self.parts[i])
    }
}

/// Bytes per part as allocations are added.
struct Tally {
    parts: [u64; 7],
    buffers: usize,
}

const WEIGHTS: usize = 0;
const LORA: usize = 1;
const ACTS: usize = 2;
const RECOMPUTE: usize = 3;
const LOGITS: usize = 4;
const SMALL: usize = 5;
const RESERVE: usize = 6;

impl Tally {
    fn add(&mut self, part: usize, elems: usize, elem_bytes: usize) {
        self.parts[part] += (elems * elem_bytes) as u64;
        self.buffers += 1;
    }
}

/// The plan of `input` under `mode`.
pub fn plan(input: &PlanInput, mode: Checkpointing) -> MemoryPlan {
    let c = &input.model;
    let (ab, f4) = (input.act_bytes, 4usize);
    let (d, f, v, l) = (
        c.hidden_size,
        c.intermediate_size,
        c.vocab_size,
        c.num_layers,
    );
    let (nh, nkv, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
    let (qw, kvw) = (nh * hd, nkv * hd);
    let n = input.rows.max(1);
    let mut t = Tally {
        parts: [0; 7],
        buffers: 0,
    };

    // Model::new: every layer's weights, the embedding, the final norm, the lm head.
    for _ in 0..l {
        t.add(WEIGHTS, d, ab); // input norm
        t.add(WEIGHTS, d, ab); // norm before the MLP
        if c.gemma_norms {
            t.add(WEIGHTS, d, ab);
            t.add(WEIGHTS, d, ab);
        }
        for len in [qw * d, kvw * d, kvw * d, d * qw] {
            t.add(WEIGHTS, len, ab);
        }
        if c.attention_bias {
            for len in [qw, kvw, kvw] {
                t.add(WEIGHTS, len, ab);
            }
        }
        for _ in 0..3 {
            t.add(WEIGHTS, f * d, ab);
        }
        if c.qk_norm {
            t.add(WEIGHTS, hd, ab);
            t.add(WEIGHTS, hd, ab);
        }
    }
    t.add(WEIGHTS, v * d, ab);
    t.add(WEIGHTS, d, ab);
    if !c.tie_word_embeddings {
        t.add(WEIGHTS, v * d, ab);
    }
    t.add(SMALL, 1, f4); // loss accumulator

    // LoRA: parameters, gradients, m, v (set_lora); or full fine-tuning: master weights,
    // gradients, m, v of each group (set_full). Directions (set_ablation).
    let lora = match input.full {
        Some(_) => None,
        None => Some(&input.lora),
    };
    let groups: Vec<usize> = match &input.full {
        Some(f) => f.group_len.to_vec(),
        None => vec![input.lora.len],
    };
    // ZeRO-1 (several ranks, full fine-tuning; `Shard`): master weights and gradients padded to
    // ranks x n, and the rank's slice: weights, gradients, m, v of n each.
    let ranks = input.ranks.max(1);
    let sharded = input.full.is_some() && ranks > 1;
    let mut summed = 0; // the longest buffer the gradient norm sums
    for &p in &groups {
        if sharded {
            let n = p.div_ceil(ranks).max(1);
            t.add(LORA, n * ranks, f4);
            t.add(LORA, n * ranks, f4);
            for _ in 0..4 {
                t.add(LORA, n, f4);
            }
            summed = summed.max(n);
        } else {
            for _ in 0..4 {
                t.add(LORA, p, f4);
            }
            summed = summed.max(p);
        }
    }
    if sharded {
        // A checkpoint gathers the moments in pieces: one piece sent, every rank's received.
        let piece = crate::model::transformer::gather_piece(summed);
        t.add(LORA, piece * (ranks + 1), f4);
    }
    let p = summed;
    for &k in &input.ablation {
        t.add(SMALL, k * d, f4);
    }

    // The rope table of the longest sequence (ensure_rope).
    let rope_pos = input.max_len.max(1).next_power_of_two().max(64);
    let rope_width = c.rope_inv_freq().len() * 2;
    t.add(SMALL, rope_pos * rope_width, f4);

    // Activations (ensure_acts). Per-layer slots are kept for the backward; a shared slot is
    // where a recomputed part is redone.
    let (n_attn, n_mlp) = match mode {
        Checkpointing::None => (l, l),
        Checkpointing::Selective => (l, 1),
        Checkpointing::Full => (1, 1),
    };
    let attn_part = if n_attn == l { ACTS } else { RECOMPUTE };
    let mlp_part = if n_mlp == l { ACTS } else { RECOMPUTE };
    let lora_u = |t: &mut Tally, part: usize, slot: usize, targets: &[Target]| {
        for &tg in targets {
            if let Some(s) = lora.and_then(|l| l.slot(slot, tg)) {
                t.add(part, n * s.r, f4);
            }
        }
    };
    for slot in 0..n_attn {
        let part = attn_part;
        for len in [n * qw, n * kvw, n * kvw, n * qw] {
            t.add(part, len, ab); // q, k, v, att
        }
        t.add(part, nh * n, f4); // lse
        t.add(part, n * d, ab); // h_mid
        t.add(part, n * d, ab); // n2
        t.add(part, n, f4); // rstd2
        lora_u(&mut t, part, slot, &Target::ATTENTION);
        if c.qk_norm {
            t.add(part, n * qw, ab);
            t.add(part, n * kvw, ab);
            t.add(part, n * nh, f4);
            t.add(part, n * nkv, f4);
        }
        if c.gemma_norms {
            t.add(part, n * d, ab);
            t.add(part, n, f4);
        }
    }
    for slot in 0..n_mlp {
        let part = mlp_part;
        t.add(part, n * f, ab); // gate
        t.add(part, n * f, ab); // up
        lora_u(&mut t, part, slot, &Target::MLP);
        if c.gemma_norms {
            t.add(part, n * d, ab);
            t.add(part, n, f4);
        }
    }
    for _ in 0..=l {
        t.add(ACTS, n * d, ab); // resid
        t.add(ACTS, n * d, ab); // n1
        t.add(ACTS, n, f4); // rstd1
    }
    t.add(RECOMPUTE, n * d, ab); // embed
                                 // The layer scratch: o, act, dres, dn, d_att, dq, dk, dv, d_act, d_gate, d_up.
    for len in [
        n * d,
        n * f,
        n * d,
        n * d,
        n * qw,
        n * qw,
        n * kvw,
        n * kvw,
        n * f,
        n * f,
        n * f,
    ] {
        t.add(RECOMPUTE, len, ab);
    }
    if c.qk_norm {
        t.add(RECOMPUTE, n * qw, ab);
        t.add(RECOMPUTE, n * kvw, ab);
    }
    if c.gemma_norms {
        t.add(RECOMPUTE, n * d, ab);
        t.add(RECOMPUTE, n * d, ab);
    }
    let chunk = chunk_rows(n, v);
    t.add(LOGITS, chunk * d, ab); // chunk_x
    t.add(LOGITS, chunk * v, ab); // chunk_logits
    if c.final_softcap.is_some() {
        t.add(LOGITS, chunk * v, ab);
    }
    t.add(LOGITS, chunk * d, ab); // chunk_dx

    // The sequence layout of the micro-batch (Backend::seqs): offsets and positions, i32.
    let seqs = input.seqs.clamp(1, n);
    t.add(SMALL, seqs + 1, 4);
    t.add(SMALL, n, 4);

    // The CUDA backend's own scratch (grown to the largest request, never shrunk).
    t.add(SMALL, n, 4); // token ids
    t.add(LOGITS, chunk, 4); // cross-entropy targets
    t.add(LOGITS, chunk, f4); // per-row losses
    t.add(SMALL, KernelLaunch::sum_squares(p.max(1)).grid as usize, f4);
    // LoRA factors and u as `T` (f32 activations use the f32 buffers themselves), and `du`.
    let slots = lora.into_iter().flat_map(|l| l.iter()).map(|(_, _, s)| s);
    let (a_max, b_max, r_max) = slots.fold((0, 0, 0), |(a, b, r), s| {
        (a.max(s.r * s.d_in), b.max(s.d_out * s.r), r.max(s.r))
    });
    if lora.is_some() {
        if ab != 4 {
            t.add(RECOMPUTE, a_max.max(1), ab);
            t.add(RECOMPUTE, b_max.max(1), ab);
            t.add(RECOMPUTE, (n * r_max).max(1), ab);
        }
        t.add(RECOMPUTE, (n * r_max).max(1), ab);
    }

    // Full fine-tuning's scratch (backend/cuda/weight_grad.rs): the column sums' partials of
    // the norm-gain and bias gradients (the largest call), and the token ids grouped by id for
    // the embedding gradient.
    if let Some(f) = &input.full {
        use crate::model::full::Param;
        let mut calls: Vec<(usize, usize)> = Vec::new();
        if f.slot(Param::FinalNorm).is_some() {
            calls.push((n, d));
            if c.qk_norm {
                calls.extend([(n * nh, hd), (n * nkv, hd)]);
            }
        }
        if c.attention_bias {
            calls.extend([(n, qw), (n, kvw)]);
        }
        let partials = calls
            .iter()
            .map(|&(rows, width)| ColumnSums::new(rows, width).partial_len(width))
            .max();
        if let Some(p) = partials {
            t.add(RECOMPUTE, p, f4);
        }
        if f.slot(Param::Embed).is_some() {
            t.add(SMALL, 3 * n + 1, 4);
        }
    }

    // The largest transient: the attention backward's Δ, the previous micro-batch's sequence
    // layout while the next is uploaded, or the previous (half as long) rope table while a
    // longer one is uploaded (the 1-element placeholder when 64 positions cover every
    // sequence).
    let delta = (nh * n * 4) as u64;
    let prev_seqs = ((seqs + 1 + n) * 4) as u64;
    let prev_rope = if rope_pos / 2 >= 64 {
        (rope_pos / 2 * rope_width * 4) as u64
    } else {
        4
    };
    t.parts[RECOMPUTE] += delta.max(prev_seqs).max(prev_rope);
    t.buffers += 1;

    t.parts[RESERVE] = input.reserve;
    let allocated: u64 = t.parts[..RESERVE].iter().sum();
    MemoryPlan {
        mode,
        parts: t.parts.to_vec(),
        allocated,
        total: allocated + input.reserve,
        buffers: t.buffers,
    }
}

/// The plan of every mode, fastest first.
pub fn plan_all(input: &PlanInput) -> Vec<MemoryPlan> {
    MODES.iter().map(|&m| plan(input, m)).collect()
}

/// What `auto` picks under `budget` bytes: the fastest mode whose plan fits, `None` if none does.
pub fn auto_mode(plans: &[MemoryPlan], budget: u64) -> Option<Checkpointing> {
    plans.iter().find(|p| p.total <= budget).map(|p| p.mode)
}

/// The most token rows a micro-batch may hold for `mode`'s plan to fit `budget` (0: not even
/// one; the model weights and trained state alone do not fit).
pub fn max_rows(input: &PlanInput, mode: Checkpointing, budget: u64) -> usize {
    let at = |rows: usize| {
        let mut i = input.clone();
        i.rows = rows;
        i.seqs = i.seqs.min(rows);
        plan(&i, mode).total
    };
    if at(1) > budget {
        return 0;
    }
    let (mut lo, mut hi) = (1usize, input.rows.max(1));
    if at(hi) <= budget {
        return hi;
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if at(mid) <= budget {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

/// Bytes as GiB with two decimals.
pub fn gib(b: u64) -> String {
    format!("{:.2}", b as f64 / (1u64 << 30) as f64)
}

/// The outcome of planning a run against a budget: the chosen mode's plan, every mode's total,
/// and whether it fits.
#[derive(Clone, Debug)]
pub struct Verdict {
    pub asked: CheckpointingChoice,
    /// The plan shown: the asked mode's, or `auto`'s choice (full when nothing fits).
    pub plan: MemoryPlan,
    pub all: Vec<MemoryPlan>,
    pub budget: u64,
    /// What `auto` picks (`None`: no mode fits).
    pub auto: Option<Checkpointing>,
    pub fits: bool,
    /// The most token rows per micro-batch that fit with the shown plan's mode (and with
    /// `full`), for the advice.
    pub max_rows: usize,
    pub max_rows_full: usize,
}

/// Plan `input` for `asked` against `budget` bytes.
pub fn verdict(input: &PlanInput, asked: CheckpointingChoice, budget: u64) -> Verdict {
    let all = plan_all(input);
    let auto = auto_mode(&all, budget);
    let mode = match asked {
        CheckpointingChoice::Mode(m) => m,
        CheckpointingChoice::Auto => auto.unwrap_or(Checkpointing::Full),
    };
    let plan = all
        .iter()
        .find(|p| p.mode == mode)
        .expect("every mode")
        .clone();
    let fits = plan.total <= budget;
    Verdict {
        asked,
        max_rows: if fits {
            input.rows
        } else {
            max_rows(input, mode, budget)
        },
        max_rows_full: max_rows(input, Checkpointing::Full, budget),
        plan,
        all,
        budget,
        auto,
        fits,
    }
}

impl Verdict {
    /// Bytes missing (0 when it fits).
    pub fn shortfall(&self) -> u64 {
        self.plan.total.saturating_sub(self.budget)
    }

    /// The table: one row per part, the total, the budget, whether it fits, each mode's total
    /// and `auto`'s choice.
    pub fn table(&self, budget_what: &str) -> String {
        let mut s = String::new();
        let w = 46;
        s.push_str(&format!(
            "{:<w$} {:>9}\n",
            format!("peak device memory, checkpointing {}", self.plan.mode),
            "GiB"
        ));
        for ((_, label), bytes) in PARTS.iter().zip(&self.plan.parts) {
            s.push_str(&format!(
                "  {:<w2$} {:>9}\n",
                label,
                gib(*bytes),
                w2 = w - 2
            ));
        }
        s.push_str(&format!("{:<w$} {:>9}\n", "total", gib(self.plan.total)));
        s.push_str(&format!("{:<w$} {:>9}\n", budget_what, gib(self.budget)));
        s.push_str(&format!(
            "{:<w$} {:>9}\n",
            "fits",
            if self.fits { "yes" } else { "no" }
        ));
        let modes: Vec<String> = self
            .all
            .iter()
            .map(|p| {
                format!(
                    "{} {} GiB{}",
                    p.mode,
                    gib(p.total),
                    if p.total <= self.budget {
                        ""
                    } else {
                        " (does not fit)"
                    }
                )
            })
            .collect();
        s.push_str(&format!("each mode: {}\n", modes.join(", ")));
        s.push_str(&format!(
            "auto chooses: {}\n",
            match self.auto {
                Some(m) => m.to_string(),
                None => "nothing fits".into(),
            }
        ));
        s
    }

    /// What to change when it does not fit (empty when it fits).
    pub fn advice(&self, rows: usize) -> String {
        if self.fits {
            return String::new();
        }
        let mut s = format!(
            "does not fit: {} GiB short ({} GiB needed, {} GiB available).",
            gib(self.shortfall()),
            gib(self.plan.total),
            gib(self.budget)
        );
        if let Some(m) = self.auto.filter(|m| *m != self.plan.mode) {
            s.push_str(&format!(
                " --checkpointing {m} (or auto) fits: {} GiB.",
                gib(self.all.iter().find(|p| p.mode == m).map_or(0, |p| p.total))
            ));
            return s;
        }
        if self.max_rows_full == 0 {
            s.push_str(
                " Even one token per micro-batch does not fit: the model weights and trained state \
                 alone need more; use a GPU with more memory, or fewer LoRA targets or a lower \
                 --lora-r if the LoRA state is the large part.",
            );
            return s;
        }
        let full = self.all.iter().find(|p| p.mode == Checkpointing::Full);
        if self.plan.mode != Checkpointing::Full {
            s.push_str(&format!(
                " Even --checkpointing full needs {} GiB ({} GiB short).",
                gib(full.map_or(0, |p| p.total)),
                gib(full.map_or(0, |p| p.total.saturating_sub(self.budget)))
            ));
        }
        s.push_str(&format!(
            " Fewer tokens per micro-batch: at most {} (now {rows}) fit with --checkpointing full \
             (--max-tokens-per-batch, or a smaller --batch-size or --max-seq-len).",
            self.max_rows_full
        ));
        if self.plan.mode != Checkpointing::Full && self.max_rows > 0 {
            s.push_str(&format!(
                " With --checkpointing {}: at most {}.",
                self.plan.mode, self.max_rows
            ));
        }
        s
    }

    /// The verdict as JSON (`caft-fast plan --json`).
    pub fn to_json(&self, input: &PlanInput) -> serde_json::Value {
        let parts: serde_json::Map<String, serde_json::Value> = PARTS
            .iter()
            .zip(&self.plan.parts)
            .map(|((k, _), b)| (k.to_string(), (*b).into()))
            .collect();
        let modes: serde_json::Map<String, serde_json::Value> = self
            .all
            .iter()
            .map(|p| (p.mode.to_string(), p.total.into()))
            .collect();
        serde_json::json!({
            "checkpointing": self.asked.to_string(),
            "mode": self.plan.mode.to_string(),
            "auto": self.auto.map(|m| m.to_string()),
            "rows": input.rows,
            "sequences": input.seqs,
            "max_len": input.max_len,
            "lora_parameters": if input.full.is_some() { 0 } else { input.lora.len },
            "trained_parameters": input.full.as_ref().map_or(input.lora.len, |f| f.len()),
            "parts_bytes": parts,
            "allocated_bytes": self.plan.allocated,
            "total_bytes": self.plan.total,
            "budget_bytes": self.budget,
            "fits": self.fits,
            "shortfall_bytes": self.shortfall(),
            "modes_total_bytes": modes,
            "max_tokens_per_batch_that_fit": self.max_rows,
            "max_tokens_per_batch_that_fit_full": self.max_rows_full,
        })
    }
}

/// Lengths of the examples a run will train and validate on, when known (`train`); without
/// them (`caft-fast plan`) the largest micro-batch is the token budget.
pub struct KnownData<'a> {
    pub train: &'a [usize],
    pub val: &'a [usize],
}

/// Sum of the `k` largest of `lens`.
fn top_sum(lens: &[usize], k: usize) -> usize {
    let mut v = lens.to_vec();
    v.sort_unstable_by(|a, b| b.cmp(a));
    v.iter().take(k).sum()
}

/// The plan input of a run configured by `cfg` on a model of `model`'s shapes, with `k`
/// directions at each of `ablation`'s layers, for one of `ranks` data-parallel ranks.
///
/// The largest micro-batch: with packing, at most the token budget
/// ([`TrainConfig::token_budget`]) and at most a step's `batch_size x grad_accum` examples;
/// padded, `batch_size` examples of the longest length. Validation batches hold at most
/// `batch_size` examples and the token budget. With the data known the bounds use the real
/// lengths; otherwise every example is `max_seq_len` long.
pub fn run_input(
    cfg: &TrainConfig,
    model: &ModelConfig,
    ablation: Vec<usize>,
    data: Option<KnownData>,
    act_bytes: usize,
    reserve: u64,
    ranks: usize,
) -> Result<PlanInput> {
    let lora = LoraLayout::new(
        model,
        &LoraConfig {
            r: cfg.lora_r,
            alpha: cfg.lora_alpha,
            rslora: cfg.rslora,
            targets: Target::parse_list(&cfg.lora_targets)?,
        },
    )?;
    let budget = cfg.token_budget().max(1);
    let step = cfg.batch_size.saturating_mul(cfg.grad_accum).max(1);
    let (rows, seqs, max_len) = match data {
        None => {
            let seqs = if cfg.packing { step } else { cfg.batch_size };
            (budget, seqs.min(budget), cfg.max_seq_len)
        }
        Some(d) => {
            let longest = d.train.iter().chain(d.val).copied().max().unwrap_or(1);
            let train_rows = if cfg.packing {
                top_sum(d.train, step).min(budget)
            } else {
                cfg.batch_size * d.train.iter().copied().max().unwrap_or(1)
            };
            let val_longest = d.val.iter().copied().max().unwrap_or(0);
            let val_rows = top_sum(d.val, cfg.batch_size).min(budget).max(val_longest);
            let train_seqs = if cfg.packing { step } else { cfg.batch_size };
            let rows = train_rows.max(val_rows).max(1);
            (rows, train_seqs.max(cfg.batch_size).min(rows), longest)
        }
    };
    let full = match cfg.method {
        Method::Full => Some(FullLayout::new(model, Freeze::parse(&cfg.freeze)?)),
        Method::Lora => None,
    };
    Ok(PlanInput {
        model: model.clone(),
        lora,
        full,
        ablation,
        rows,
        seqs,
        max_len,
        act_bytes,
        reserve,
        ranks,
    })
}

/// The checkpointing mode a run uses, and its plan when there is a device to plan for.
///
/// On a GPU (`mem` given) the plan is checked against the memory free now (the context already
/// created; cuBLAS's workspace is added): a run that cannot fit is refused with the table and
/// what to change, before any weight is uploaded; `auto` becomes the fastest mode that fits. On
/// the CPU there is no budget: `auto` is `none`.
pub fn resolve(
    choice: CheckpointingChoice,
    input: Option<PlanInput>,
    mem: Option<DeviceMemory>,
    device: &str,
) -> Result<(Checkpointing, Option<Verdict>)> {
    let (Some(mut input), Some(mem)) = (input, mem) else {
        return Ok(match choice {
            CheckpointingChoice::Auto => (Checkpointing::None, None),
            CheckpointingChoice::Mode(m) => (m, None),
        });
    };
    input.act_bytes = mem.act_bytes;
    input.reserve = CUBLAS_WORKSPACE;
    let v = verdict(&input, choice, mem.free);
    if !v.fits {
        bail!(
            "this run does not fit on {device} (planned before loading the weights; \
             `caft-fast plan` prints the same table):\n{}{}",
            v.table("free on the GPU"),
            v.advice(input.rows)
        );
    }
    Ok((v.plan.mode, Some(v)))
}

/// Parse a memory size: `80GiB`, `80GB`, `81920MiB`, `512M`, or plain bytes. Zero and
/// unparsable sizes are errors.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|ch: char| !(ch.is_ascii_digit() || ch == '.'))
        .unwrap_or(t.len());
    let (num, unit) = (t[..split].trim(), t[split..].trim());
    let value: f64 = match num.parse() {
        Ok(v) if num.chars().next().is_some_and(|c| c.is_ascii_digit()) => v,
        _ => bail!(
            "memory size {s:?}: expected a number with an optional unit (80GiB, 80GB, 81920MiB, \
             or bytes)"
        ),
    };
    let mult: f64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "kb" => 1e3,
        "m" | "mib" => (1u64 << 20) as f64,
        "mb" => 1e6,
        "g" | "gib" => (1u64 << 30) as f64,
        "gb" => 1e9,
        "t" | "tib" => (1u64 << 40) as f64,
        "tb" => 1e12,
        _ => bail!("memory size {s:?}: unknown unit {unit:?} (use B, KiB, MiB, GiB, TiB or KB, MB, GB, TB)"),
    };
    let bytes = (value * mult).round();
    if !(1.0..1.8e19).contains(&bytes) {
        bail!("memory size {s:?} must be more than zero bytes");
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_bad_ones_are_refused() {
        assert_eq!(parse_size("80GiB").unwrap(), 80 << 30);
        assert_eq!(parse_size("80GB").unwrap(), 80_000_000_000);
        assert_eq!(parse_size("81920MiB").unwrap(), 80 << 30);
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert_eq!(parse_size("1.5 GiB").unwrap(), 3 << 29);
        for bad in ["", "GiB", "80 apples", "0", "0GiB", "-1GiB", "abc"] {
            assert!(parse_size(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn checkpointing_choice_round_trips() {
        for s in ["auto", "none", "selective", "full"] {
            assert_eq!(CheckpointingChoice::parse(s).unwrap().to_string(), s);
        }
        assert!(CheckpointingChoice::parse("some").is_err());
    }

    #[test]
    fn chunk_rows_covers_the_rows_within_the_budget() {
        let c = chunk_rows(4096, 152064);
        assert!(
            c * 152064 <= crate::model::transformer::LOGITS_CHUNK_ELEMS,
            "{c}"
        );
        assert!(
            4096usize.div_ceil(c) * c - 4096 < 4096usize.div_ceil(c),
            "few spare rows"
        );
        assert_eq!(chunk_rows(7, 100), 7);
        assert_eq!(c, 410, "ten chunks of 410 rows, 4 spare");
        // A prime row count (packing) still gets full-size chunks: 3 of 1365 rows, 2 spare.
        assert_eq!(chunk_rows(4093, 49152), 1365);
    }
}
