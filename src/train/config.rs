//! The complete configuration of a training run, with the paper's settings as defaults.
//!
//! One set of keys serves three places: the `caft-fast train` flags (kebab-case), a TOML
//! `--config` file (snake_case keys, the same names) and the `config.toml` each run writes into
//! its output folder, which reproduces the run when given back as `--config`. Precedence:
//! built-in defaults, then the config file, then the flags.

use crate::backend::device::Device;
use crate::data::TrainOn;
use crate::train::plan::CheckpointingChoice;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Deserializer, Serialize};
use std::path::{Path, PathBuf};

/// Every setting of a run. Paths are kept as given (relative to the working directory).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Hugging Face folder or GGUF file; `None` = the default model (SmolLM2-135M-Instruct).
    pub model: Option<PathBuf>,
    /// Training JSONL; `None` = the built-in demonstration conversations.
    pub data: Option<PathBuf>,
    /// Validation JSONL; when absent, `val_split` of the training records are held out.
    pub val_data: Option<PathBuf>,
    pub val_split: f64,
    /// Number of built-in conversations (only without `data`).
    pub examples: usize,
    pub train_on: TrainOn,
    pub max_seq_len: usize,
    /// What is trained: LoRA adapters on frozen weights, or every weight (`full`).
    pub method: Method,
    /// Full fine-tuning: groups of weights left frozen (comma-separated subset of
    /// `embeddings,norms`; a TOML list is accepted too). Empty = train everything.
    #[serde(deserialize_with = "comma_list")]
    pub freeze: String,
    /// Full fine-tuning: the dtype of the saved model folder (bf16, f16 or f32); `None` = the
    /// model's own dtype (`torch_dtype` of its config.json). Required for a GGUF base.
    pub save_dtype: Option<String>,
    pub lora_r: usize,
    pub lora_alpha: f64,
    pub rslora: bool,
    /// Comma-separated subset of q,k,v,o,gate,up,down (a TOML list is accepted too).
    #[serde(deserialize_with = "comma_list")]
    pub lora_targets: String,
    pub lr: f64,
    pub weight_decay: f64,
    /// AdamW's β1, β2 and ε (PyTorch's defaults; the Gemma-2 recipe uses β2 = 0.95).
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_eps: f64,
    pub warmup_steps: u64,
    /// Warmup as a fraction of the run's optimizer steps (`ceil(ratio · total)`, as the
    /// transformers Trainer computes it); replaces `warmup_steps` when given.
    pub warmup_ratio: Option<f64>,
    /// linear, cosine or constant (after the warmup).
    pub schedule: String,
    pub epochs: usize,
    /// Stop after this many optimizer steps (the schedule ends there); overrides `epochs`.
    pub max_steps: Option<u64>,
    pub batch_size: usize,
    pub grad_accum: usize,
    /// Padding-free packing: an optimizer step's `batch_size · grad_accum` examples are laid
    /// end to end into as few micro-batches of at most `max_tokens_per_batch` tokens as fit,
    /// instead of `grad_accum` padded micro-batches. Same examples, same loss normalisation,
    /// the same update up to rounding; off = pad each micro-batch to its longest example.
    pub packing: bool,
    /// Token budget of one packed micro-batch; `None` = `batch_size · max_seq_len`.
    pub max_tokens_per_batch: Option<usize>,
    /// Activation checkpointing: what the backward recomputes instead of keeping. Every mode
    /// gives the same gradients bit for bit. `auto` (the default) takes the fastest mode whose
    /// memory plan (`train::plan`) fits the GPU's free memory: `none` whenever it fits, so a
    /// run that fitted before is unchanged; on the CPU `auto` is `none`.
    pub checkpointing: CheckpointingChoice,
    /// Global gradient-norm clip; 0 turns clipping off.
    pub max_grad_norm: f64,
    pub seed: u64,
    /// Directions file (`layer.<L>` tensors `[k, d_model]`).
    pub ablate: Option<PathBuf>,
    /// Ablate this many random orthonormal directions per layer instead (the paper's control).
    pub ablate_random: Option<usize>,
    /// With `ablate`: keep only these layers; with `ablate_random`: the layers to ablate.
    pub ablate_layers: Option<Vec<usize>>,
    /// Validation loss every this many steps (0 = only at the end); `None` = about ten times.
    pub eval_every: Option<u64>,
    /// Checkpoint every this many steps (0 = only at the end); `None` = about ten times.
    pub save_every: Option<u64>,
    /// Checkpoints kept on disk (the newest ones); at least 1.
    pub keep_checkpoints: usize,
    /// Also write a merged model (`W + scale·B·A`) next to the adapter.
    pub merge: bool,
    /// auto, cpu or cuda.
    pub device: Device,
    /// CPU threads (0 = all cores).
    pub threads: usize,
    pub output: PathBuf,
}

impl Default for TrainConfig {
    /// The paper's settings (README, "Where caft-fast departs from the paper"): LoRA r=32, alpha=64, rsLoRA on
    /// all seven projections, AdamW lr 1e-5, weight decay 0.01, linear schedule with 5 warmup
    /// steps, 1 epoch, batch 2 x accumulation 8, 2048 tokens, seed 0.
    fn default() -> Self {
        TrainConfig {
            model: None,
            data: None,
            val_data: None,
            val_split: 0.1,
            examples: 64,
            train_on: TrainOn::Assistant,
            max_seq_len: 2048,
            method: Method::Lora,
            freeze: String::new(),
            save_dtype: None,
            lora_r: 32,
            lora_alpha: 64.0,
            rslora: true,
            lora_targets: "q,k,v,o,gate,up,down".into(),
            lr: 1e-5,
            weight_decay: 0.01,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            warmup_steps: 5,
            warmup_ratio: None,
            schedule: "linear".into(),
            epochs: 1,
            max_steps: None,
            batch_size: 2,
            grad_accum: 8,
            packing: true,
            max_tokens_per_batch: None,
            checkpointing: CheckpointingChoice::Auto,
            max_grad_norm: 1.0,
            seed: 0,
            ablate: None,
            ablate_random: None,
            ablate_layers: None,
            eval_every: None,
            save_every: None,
            keep_checkpoints: 2,
            merge: false,
            device: Device::Auto,
            threads: 0,
            output: PathBuf::from("runs/caft"),
        }
    }
}

/// What a run trains.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// LoRA adapters on the frozen base weights (the paper's emergent-misalignment runs).
    #[default]
    Lora,
    /// Every weight: linear layers, norms, embeddings (the paper's spurious-correlation runs).
    Full,
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Method::Lora => "lora",
            Method::Full => "full",
        })
    }
}

/// Accept `"q,k,v"` or `["q", "k", "v"]`.
fn comma_list<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum StrOrList {
        S(String),
        L(Vec<String>),
    }
    Ok(match StrOrList::deserialize(d)? {
        StrOrList::S(s) => s,
        StrOrList::L(l) => l.join(","),
    })
}

/// The keys whose change would change what is trained (the losses, the adapter). A checkpoint
/// resumes only under the same values; the others (device, threads, logging, checkpoint
/// cadence, merge) may differ between sessions.
pub const TRAINING_KEYS: &[&str] = &[
    "model",
    "data",
    "val_data",
    "val_split",
    "examples",
    "train_on",
    "max_seq_len",
    "method",
    "freeze",
    "lora_r",
    "lora_alpha",
    "rslora",
    "lora_targets",
    "lr",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_eps",
    "warmup_steps",
    "warmup_ratio",
    "schedule",
    "epochs",
    "max_steps",
    "batch_size",
    "grad_accum",
    "max_grad_norm",
    "seed",
    "ablate",
    "ablate_random",
    "ablate_layers",
];

impl TrainConfig {
    /// The token budget of one packed micro-batch.
    pub fn token_budget(&self) -> usize {
        self.max_tokens_per_batch
            .unwrap_or(self.batch_size.saturating_mul(self.max_seq_len))
    }

    /// Read a TOML config file over `base`: keys present in the file replace `base`'s.
    pub fn merge_toml_file(base: &TrainConfig, path: &Path) -> Result<TrainConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        Self::merge_toml_str(base, &text).with_context(|| format!("config file {}", path.display()))
    }

    /// [`Self::merge_toml_file`] on a string.
    pub fn merge_toml_str(base: &TrainConfig, text: &str) -> Result<TrainConfig> {
        let over: toml::Table = toml::from_str(text).context("not valid TOML")?;
        // Table over table: the file's keys replace the base's; then one typed parse checks
        // names (unknown keys are refused, so a typo does not silently keep a default) and types.
        let mut merged = toml::Table::try_from(base).context("serialising the base config")?;
        let parse = |t: &toml::Table| -> std::result::Result<TrainConfig, toml::de::Error> {
            toml::Value::Table(t.clone()).try_into()
        };
        // Key by key, so an error names the key at fault (a value carries no position).
        for (k, v) in over {
            merged.insert(k.clone(), v);
            if let Err(e) = parse(&merged) {
                bail!("key `{k}`: {}", e.message());
            }
        }
        parse(&merged).map_err(|e| anyhow::anyhow!("{}", e.message()))
    }

    /// The TOML text of this configuration (what `config.toml` in a run folder holds).
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).context("serialising the configuration to TOML")
    }

    /// Check values that no later step would catch with a clear message.
    pub fn validate(&self) -> Result<()> {
        if self.batch_size == 0 {
            bail!("--batch-size must be at least 1");
        }
        if self.grad_accum == 0 {
            bail!("--grad-accum must be at least 1");
        }
        if self.max_seq_len < 2 {
            bail!("--max-seq-len must be at least 2 (one token predicts the next)");
        }
        if self.max_tokens_per_batch == Some(0) {
            bail!("--max-tokens-per-batch must be at least 1");
        }
        if self.max_tokens_per_batch.is_some() && !self.packing {
            bail!(
                "--max-tokens-per-batch applies to packed micro-batches; drop it or --no-packing"
            );
        }
        if !(0.0..1.0).contains(&self.val_split) {
            bail!("--val-split {} must be in [0, 1)", self.val_split);
        }
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            bail!("--lr {} must be a finite non-negative number", self.lr);
        }
        if self.epochs == 0 && self.max_steps.is_none() {
            bail!("--epochs 0 trains nothing; give --epochs >= 1 or --max-steps");
        }
        if self.max_steps == Some(0) {
            bail!("--max-steps 0 trains nothing");
        }
        if self.keep_checkpoints == 0 {
            bail!("--keep-checkpoints must be at least 1 (the newest checkpoint is what --resume uses)");
        }
        if self.ablate.is_some() && self.ablate_random.is_some() {
            bail!("give either --ablate FILE or --ablate-random K, not both");
        }
        if self.ablate_random.is_some() && self.ablate_layers.is_none() {
            bail!("--ablate-random needs --ablate-layers (e.g. --ablate-layers 10,20)");
        }
        if self.ablate.is_none() && self.ablate_random.is_none() && self.ablate_layers.is_some() {
            bail!("--ablate-layers needs --ablate FILE or --ablate-random K");
        }
        crate::train::optim::Schedule::parse(&self.schedule)?;
        crate::model::lora::Target::parse_list(&self.lora_targets)?;
        Ok(())
    }

    /// The training keys (see [`TRAINING_KEYS`]) whose values differ from `other`'s, as
    /// `key: ours vs theirs` lines.
    pub fn training_differences(&self, other: &TrainConfig) -> Result<Vec<String>> {
        let a = serde_json::to_value(self)?;
        let b = serde_json::to_value(other)?;
        Ok(TRAINING_KEYS
            .iter()
            .filter(|k| a.get(**k) != b.get(**k))
            .map(|k| {
                format!(
                    "{k}: {} (now) vs {} (checkpoint)",
                    a.get(*k).unwrap_or(&serde_json::Value::Null),
                    b.get(*k).unwrap_or(&serde_json::Value::Null)
                )
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_round_trip_and_override() {
        let base = TrainConfig::default();
        let text = "lr = 2e-4\nablate_layers = [10, 20]\nlora_targets = [\"q\", \"v\"]\n";
        let c = TrainConfig::merge_toml_str(&base, text).unwrap();
        assert_eq!(c.lr, 2e-4);
        assert_eq!(c.ablate_layers, Some(vec![10, 20]));
        assert_eq!(c.lora_targets, "q,v");
        assert_eq!(
            c.lora_r, 32,
            "keys absent from the file keep the base value"
        );
        let again = TrainConfig::merge_toml_str(&TrainConfig::default(), &c.to_toml().unwrap());
        assert_eq!(
            again.unwrap(),
            c,
            "config.toml reproduces the configuration"
        );
    }

    #[test]
    fn unknown_keys_and_bad_types_are_refused() {
        let base = TrainConfig::default();
        let e = TrainConfig::merge_toml_str(&base, "lora_rank = 8\n").unwrap_err();
        assert!(format!("{e:#}").contains("lora_rank"), "{e:#}");
        let e = TrainConfig::merge_toml_str(&base, "lr = \"fast\"\n").unwrap_err();
        assert!(
            format!("{e:#}").contains("lr") || format!("{e:#}").contains("float"),
            "{e:#}"
        );
    }

    #[test]
    fn training_differences_name_the_keys() {
        let a = TrainConfig::default();
        let mut b = a.clone();
        b.lora_r = 8;
        b.device = Device::Cpu;
        let d = a.training_differences(&b).unwrap();
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(d[0].starts_with("lora_r: 32"), "{d:?}");
    }
}
