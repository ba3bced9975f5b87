//! LoRA as PEFT does it: for each adapted projection `W: [d_out, d_in]`,
//! `y = x Wᵀ + scale · (x Aᵀ) Bᵀ` with `A: [r, d_in]`, `B: [d_out, r]`,
//! `scale = alpha / r`, or `alpha / sqrt(r)` with rsLoRA. `A` starts kaiming-uniform(a = √5),
//! i.e. uniform in `±1/sqrt(d_in)`, and `B` at zero, so training starts at the base model.
//!
//! All LoRA parameters of a model live in one flat f32 buffer (see `backend::LoraSlot`); this
//! module decides the layout and the PEFT tensor names.

use crate::backend::LoraSlot;
use crate::model::config::ModelConfig;
use crate::util::rng::Rng;
use anyhow::{bail, Result};
use std::collections::BTreeMap;

/// The seven projections of a Llama-style decoder layer that LoRA can adapt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Target {
    pub const ALL: [Target; 7] = [
        Target::Q,
        Target::K,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
    ];
    /// The projections of the attention block and of the MLP.
    pub const ATTENTION: [Target; 4] = [Target::Q, Target::K, Target::V, Target::O];
    pub const MLP: [Target; 3] = [Target::Gate, Target::Up, Target::Down];

    /// The module name PEFT's `target_modules` uses.
    pub fn module_name(self) -> &'static str {
        match self {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::Down => "down_proj",
        }
    }

    /// `self_attn` or `mlp`: the parent module in the Hugging Face layer.
    pub fn parent(self) -> &'static str {
        match self {
            Target::Q | Target::K | Target::V | Target::O => "self_attn",
            Target::Gate | Target::Up | Target::Down => "mlp",
        }
    }

    /// Parse `q`, `q_proj`, `gate`, `gate_proj`, ...
    pub fn parse(s: &str) -> Result<Target> {
        let s = s.trim();
        let short = s.strip_suffix("_proj").unwrap_or(s);
        Ok(match short {
            "q" => Target::Q,
            "k" => Target::K,
            "v" => Target::V,
            "o" => Target::O,
            "gate" => Target::Gate,
            "up" => Target::Up,
            "down" => Target::Down,
            _ => bail!(
                "unknown LoRA target {s:?}: expected a comma-separated subset of \
                 q,k,v,o,gate,up,down (or the *_proj names)"
            ),
        })
    }

    /// Parse a comma-separated list, keeping the canonical order and dropping repeats.
    pub fn parse_list(s: &str) -> Result<Vec<Target>> {
        let mut v = s
            .split(',')
            .filter(|p| !p.trim().is_empty())
            .map(Target::parse)
            .collect::<Result<Vec<_>>>()?;
        v.sort();
        v.dedup();
        if v.is_empty() {
            bail!("no LoRA targets given");
        }
        Ok(v)
    }

    /// `(d_in, d_out)` of this projection.
    pub fn dims(self, cfg: &ModelConfig) -> (usize, usize) {
        let d = cfg.hidden_size;
        let q = cfg.num_heads * cfg.head_dim;
        let kv = cfg.num_kv_heads * cfg.head_dim;
        let f = cfg.intermediate_size;
        match self {
            Target::Q => (d, q),
            Target::K | Target::V => (d, kv),
            Target::O => (q, d),
            Target::Gate | Target::Up => (d, f),
            Target::Down => (f, d),
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// LoRA hyper-parameters (PEFT's `LoraConfig`, dropout 0).
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub rslora: bool,
    pub targets: Vec<Target>,
}

impl LoraConfig {
    /// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA (as PEFT computes it, in f64).
    pub fn scale(&self) -> f32 {
        if self.rslora {
            (self.alpha / (self.r as f64).sqrt()) as f32
        } else {
            (self.alpha / self.r as f64) as f32
        }
    }
}

/// Which projections of which layer are adapted and where their tensors sit in the flat buffer.
#[derive(Clone, Debug)]
pub struct LoraLayout {
    pub config: LoraConfig,
    /// `slots[layer][target as usize]`.
    pub slots: Vec<[Option<LoraSlot>; 7]>,
    /// Total number of f32 parameters.
    pub len: usize,
}

/// PEFT's saved name of a LoRA tensor (`adapter_model.safetensors`).
pub fn peft_name(layer: usize, target: Target, is_a: bool) -> String {
    format!(
        "base_model.model.model.layers.{layer}.{}.{}.lora_{}.weight",
        target.parent(),
        target.module_name(),
        if is_a { "A" } else { "B" }
    )
}

impl LoraLayout {
    pub fn new(cfg: &ModelConfig, lora: &LoraConfig) -> Result<Self> {
        if lora.r == 0 {
            bail!("LoRA rank r must be at least 1");
        }
        let mut off = 0;
        let mut slots = Vec::with_capacity(cfg.num_layers);
        for _ in 0..cfg.num_layers {
            let mut row = [None; 7];
            for &t in &lora.targets {
                let (d_in, d_out) = t.dims(cfg);
                let a_off = off;
                off += lora.r * d_in;
                let b_off = off;
                off += d_out * lora.r;
                row[t.index()] = Some(LoraSlot {
                    a_off,
                    b_off,
                    r: lora.r,
                    d_in,
                    d_out,
                });
            }
            slots.push(row);
        }
        Ok(LoraLayout {
            config: lora.clone(),
            slots,
            len: off,
        })
    }

    pub fn slot(&self, layer: usize, target: Target) -> Option<&LoraSlot> {
        self.slots[layer][target.index()].as_ref()
    }

    /// Every `(layer, target, slot)` in buffer order.
    pub fn iter(&self) -> impl Iterator<Item = (usize, Target, &LoraSlot)> {
        self.slots.iter().enumerate().flat_map(|(l, row)| {
            Target::ALL
                .iter()
                .filter_map(move |&t| row[t.index()].as_ref().map(|s| (l, t, s)))
        })
    }

    /// Fresh parameters: `A ~ U(±1/sqrt(d_in))` (kaiming-uniform with a = √5, as PEFT), `B = 0`.
    /// Seeded, so a run is reproducible; PEFT's torch RNG stream is not reproduced.
    pub fn init_params(&self, seed: u64) -> Vec<f32> {
        let mut rng = Rng::new(seed);
        let mut p = vec![0f32; self.len];
        for (_, _, s) in self.iter() {
            let bound = 1.0 / (s.d_in as f64).sqrt();
            for x in &mut p[s.a_off..s.a_off + s.r * s.d_in] {
                *x = rng.uniform(-bound, bound) as f32;
            }
        }
        p
    }

    /// Split a flat buffer into PEFT-named tensors `(name, shape, data)`.
    pub fn to_named(&self, flat: &[f32]) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        assert_eq!(flat.len(), self.len, "LoRA buffer length");
        let mut out = Vec::new();
        for (l, t, s) in self.iter() {
            out.push((
                peft_name(l, t, true),
                vec![s.r, s.d_in],
                flat[s.a_off..s.a_off + s.r * s.d_in].to_vec(),
            ));
            out.push((
                peft_name(l, t, false),
                vec![s.d_out, s.r],
                flat[s.b_off..s.b_off + s.d_out * s.r].to_vec(),
            ));
        }
        out
    }

    /// Assemble a flat buffer from PEFT-named tensors (e.g. an `adapter_model.safetensors`).
    /// Every expected tensor must be present with its exact shape; extra LoRA tensors are an
    /// error too, since they would mean the adapter targets other modules.
    pub fn from_named(
        &self,
        tensors: &BTreeMap<String, (Vec<usize>, Vec<f32>)>,
        origin: &str,
    ) -> Result<Vec<f32>> {
        let mut flat = vec![0f32; self.len];
        let mut used = 0;
        for (l, t, s) in self.iter() {
            for (is_a, off, shape) in [
                (true, s.a_off, vec![s.r, s.d_in]),
                (false, s.b_off, vec![s.d_out, s.r]),
            ] {
                let name = peft_name(l, t, is_a);
                let Some((got_shape, data)) = tensors.get(&name) else {
                    bail!("{origin}: LoRA tensor {name} is missing");
                };
                if *got_shape != shape {
                    bail!(
                        "{origin}: LoRA tensor {name} has shape {got_shape:?}, expected {shape:?}"
                    );
                }
                flat[off..off + data.len()].copy_from_slice(data);
                used += 1;
            }
        }
        let lora_count = tensors.keys().filter(|k| k.contains(".lora_")).count();
        if lora_count != used {
            let extra: Vec<_> = tensors
                .keys()
                .filter(|k| k.contains(".lora_"))
                .filter(|k| {
                    !self.iter().any(|(l, t, _)| {
                        **k == peft_name(l, t, true) || **k == peft_name(l, t, false)
                    })
                })
                .take(3)
                .cloned()
                .collect();
            bail!(
                "{origin}: the adapter has LoRA tensors this configuration does not expect \
                 (e.g. {extra:?}); check --lora-targets and the rank"
            );
        }
        Ok(flat)
    }
}
