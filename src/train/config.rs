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
use std::collections::BTreeMap;
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

impl std::str::FromStr for Method {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Method> {
        Ok(match s {
            "lora" => Method::Lora,
            "full" => Method::Full,
            _ => bail!("--method {s:?}: expected `lora` or `full`"),
        })
    }
}

/// Which weight groups a full fine-tune leaves frozen (parsed from `freeze`).
pub use crate::model::full::Freeze;

/// The dtypes a full fine-tune's model folder may be saved in (`save_dtype`).
pub const SAVE_DTYPES: &[&str] = &["bf16", "f16", "f32"];

/// The keys only a LoRA run uses: refused with `method = "full"` when given explicitly.
pub const LORA_KEYS: &[&str] = &["lora_r", "lora_alpha", "rslora", "lora_targets"];

/// The settings the user gave explicitly (on the command line or in a `--config` file), with
/// where, for the checks that a default value must not trigger (a LoRA setting under
/// `--method full`, `--warmup-steps` next to `--warmup-ratio`). Defaults, and a resumed
/// checkpoint's own configuration, are not explicit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Explicit {
    /// Config key -> how to name it in a message (`--lora-r`, or `lora_r` in FILE).
    keys: BTreeMap<String, String>,
}

impl Explicit {
    /// `key` was given as a flag (`--key-name`); a flag replaces a file's entry.
    pub fn flag(&mut self, key: &str) {
        self.keys.insert(key.into(), flag_name(key));
    }

    /// `key` was set in the config file `path` (a flag given too keeps its own entry).
    pub fn file(&mut self, key: &str, path: &Path) {
        self.keys
            .entry(key.into())
            .or_insert_with(|| format!("`{key}` (in {})", path.display()));
    }

    /// How the user gave `key`, if they did.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.keys.get(key).map(String::as_str)
    }
}

/// The command-line flag of a config key: `lora_r` -> `--lora-r`.
pub fn flag_name(key: &str) -> String {
    format!("--{}", key.replace('_', "-"))
}

/// Whether the base model is a GGUF file (quantized blocks; `None` is the default model, a
/// 4-bit GGUF).
pub fn is_gguf(model: &Option<PathBuf>) -> bool {
    match model {
        None => true,
        Some(p) => p
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf")),
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
        Ok(Self::merge_toml_file_keys(base, path)?.0)
    }

    /// [`Self::merge_toml_file`], and the keys the file sets (what it gave explicitly).
    pub fn merge_toml_file_keys(
        base: &TrainConfig,
        path: &Path,
    ) -> Result<(TrainConfig, Vec<String>)> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        Self::merge_toml_str_keys(base, &text)
            .with_context(|| format!("config file {}", path.display()))
    }

    /// [`Self::merge_toml_file`] on a string.
    pub fn merge_toml_str(base: &TrainConfig, text: &str) -> Result<TrainConfig> {
        Ok(Self::merge_toml_str_keys(base, text)?.0)
    }

    /// [`Self::merge_toml_file_keys`] on a string.
    pub fn merge_toml_str_keys(
        base: &TrainConfig,
        text: &str,
    ) -> Result<(TrainConfig, Vec<String>)> {
        let over: toml::Table = toml::from_str(text).context("not valid TOML")?;
        let keys: Vec<String> = over.keys().cloned().collect();
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
        let cfg = parse(&merged).map_err(|e| anyhow::anyhow!("{}", e.message()))?;
        Ok((cfg, keys))
    }

    /// The TOML text of this configuration (what `config.toml` in a run folder holds). Keys
    /// that do not apply to the run are left out, so the file given back as `--config` is
    /// accepted: the LoRA keys of a full run, `freeze` of a LoRA run, `warmup_steps` when
    /// `warmup_ratio` sets the warmup. Each left-out key keeps its default, which is the value
    /// the run had (anything else would have been refused).
    pub fn to_toml(&self) -> Result<String> {
        let mut t = toml::Table::try_from(self).context("serialising the configuration to TOML")?;
        let mut drop: Vec<&str> = match self.method {
            Method::Full => LORA_KEYS.to_vec(),
            Method::Lora => vec!["freeze", "save_dtype"],
        };
        if self.warmup_ratio.is_some() {
            drop.push("warmup_steps");
        }
        for k in drop {
            t.remove(k);
        }
        toml::to_string(&t).context("serialising the configuration to TOML")
    }

    /// Check values that no later step would catch with a clear message.
    /// How `ranks` data-parallel ranks share an optimizer step of this configuration: a line
    /// for people, or an error when some rank would get nothing to do. The step is the same
    /// `batch_size x grad_accum` examples whatever the number of ranks.
    pub fn share_per_rank(&self, ranks: usize) -> Result<String> {
        let examples = self.batch_size * self.grad_accum;
        let (b, a) = (self.batch_size, self.grad_accum);
        if self.packing {
            if examples < ranks {
                bail!(
                    "--batch-size {b} x --grad-accum {a} = {examples} examples per optimizer \
                     step cannot be shared by {ranks} ranks (each needs at least one): raise \
                     --grad-accum to {} or more",
                    ranks.div_ceil(b)
                );
            }
            return Ok(format!(
                "{examples} examples per optimizer step shared by {ranks} ranks, balanced by \
                 tokens: about {:.1} examples per rank, packed into micro-batches of at most {} \
                 tokens",
                examples as f64 / ranks as f64,
                self.token_budget()
            ));
        }
        if a < ranks {
            bail!(
                "--no-packing: each rank runs whole micro-batches of --batch-size {b}, and \
                 --grad-accum {a} makes {a} per optimizer step for {ranks} ranks, so some would \
                 have none: make --grad-accum a multiple of {ranks} (e.g. {ranks}), or pack"
            );
        }
        Ok(format!(
            "{a} padded micro-batches of {b} per optimizer step shared by {ranks} ranks: {}{} \
             per rank",
            a / ranks,
            if a % ranks == 0 {
                String::new()
            } else {
                format!(
                    " or {} (uneven: a --grad-accum multiple of {ranks} balances them)",
                    a / ranks + 1
                )
            }
        ))
    }

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
        self.validate_optimizer()?;
        self.validate_method()
    }

    /// AdamW's constants and the warmup ratio.
    fn validate_optimizer(&self) -> Result<()> {
        let b1 = self.adam_beta1;
        if !(0.0..1.0).contains(&b1) || b1 <= 0.5 {
            bail!(
                "--adam-beta1 {b1} must be in [0, 1) and above 0.5: caft-fast's AdamW kernel \
                 updates the first moment the way PyTorch's lerp does for weights below one half, \
                 so it takes only beta1 > 0.5 (PyTorch's default is 0.9)"
            );
        }
        if !(0.0..1.0).contains(&self.adam_beta2) {
            bail!("--adam-beta2 {} must be in [0, 1)", self.adam_beta2);
        }
        if !(self.adam_eps.is_finite() && self.adam_eps > 0.0) {
            bail!(
                "--adam-eps {} must be a finite number above 0",
                self.adam_eps
            );
        }
        if let Some(r) = self.warmup_ratio {
            if !(0.0..1.0).contains(&r) {
                bail!(
                    "--warmup-ratio {r} must be in [0, 1) (a fraction of the run's optimizer steps)"
                );
            }
        }
        Ok(())
    }

    /// The settings of one method given to the other, and a full run's output dtype.
    fn validate_method(&self) -> Result<()> {
        Freeze::parse(&self.freeze)?;
        if let Some(d) = &self.save_dtype {
            if !SAVE_DTYPES.contains(&d.as_str()) {
                bail!(
                    "--save-dtype {d:?}: expected one of {}",
                    SAVE_DTYPES.join(", ")
                );
            }
        }
        match self.method {
            Method::Lora => {
                if !self.freeze.trim().is_empty() {
                    bail!(
                        "--freeze applies to --method full: a LoRA run already leaves every base \
                         weight frozen (drop --freeze, or add --method full)"
                    );
                }
                if self.save_dtype.is_some() {
                    bail!(
                        "--save-dtype applies to --method full, whose output is a whole model \
                         folder; a LoRA run saves an f32 adapter (drop --save-dtype, or add \
                         --method full)"
                    );
                }
            }
            Method::Full => {
                if self.merge {
                    bail!(
                        "--merge applies to LoRA runs: the output of --method full already is a \
                         complete model folder (drop --merge)"
                    );
                }
            }
        }
        Ok(())
    }

    /// The check on the base model a run starts from, which `train` makes and `plan` (which
    /// saves nothing) does not: a full fine-tune of a GGUF base (quantized weights; also the
    /// default model) needs an explicit `save_dtype`.
    pub fn validate_base(&self) -> Result<()> {
        if self.method == Method::Full && self.save_dtype.is_none() && is_gguf(&self.model) {
            let what = match &self.model {
                None => "the default model (SmolLM2-135M-Instruct) is a GGUF file".into(),
                Some(p) => format!("{} is a GGUF file", p.display()),
            };
            bail!(
                "--method full on a quantized base: {what}, whose weights are stored in \
                 quantized blocks; full fine-tuning would start from their dequantised values, \
                 and the file has no original dtype to save the result in. Give --save-dtype \
                 bf16|f16|f32 to start from the dequantised weights and choose the saved dtype \
                 (or start from a Hugging Face safetensors folder)"
            );
        }
        Ok(())
    }

    /// The checks that depend on what the user gave explicitly (see [`Explicit`]), after
    /// [`Self::validate`]: a LoRA setting under `--method full`, and `--warmup-steps` next to
    /// `--warmup-ratio`.
    pub fn validate_explicit(&self, given: &Explicit) -> Result<()> {
        if self.method == Method::Full {
            let lora: Vec<&str> = LORA_KEYS.iter().filter_map(|k| given.get(k)).collect();
            if !lora.is_empty() {
                bail!(
                    "{} {} LoRA-only: --method full trains every weight, with no adapter to \
                     shape; drop {}",
                    lora.join(", "),
                    if lora.len() == 1 { "is" } else { "are" },
                    if lora.len() == 1 { "it" } else { "them" }
                );
            }
        }
        if self.warmup_ratio.is_some() {
            if let Some(w) = given.get("warmup_steps") {
                let r = given.get("warmup_ratio").unwrap_or("--warmup-ratio");
                bail!(
                    "give either {w} or {r}, not both (the ratio sets the warmup steps from the \
                     run's length)"
                );
            }
        }
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

    /// The explicit keys of a TOML text as `train --config FILE` notes them.
    fn from_toml(text: &str) -> (TrainConfig, Explicit) {
        let (c, keys) = TrainConfig::merge_toml_str_keys(&TrainConfig::default(), text).unwrap();
        let mut given = Explicit::default();
        for k in keys {
            given.file(&k, Path::new("c.toml"));
        }
        (c, given)
    }

    /// Every check `train` makes on a configuration, as one error message.
    fn check(c: &TrainConfig, given: &Explicit) -> std::result::Result<(), String> {
        c.validate()
            .and_then(|_| c.validate_explicit(given))
            .and_then(|_| c.validate_base())
            .map_err(|e| format!("{e:#}"))
    }

    #[test]
    fn full_fine_tuning_keys_parse_and_validate() {
        let text = "method = \"full\"\nmodel = \"m\"\nfreeze = [\"norms\", \"embeddings\"]\n\
                    save_dtype = \"bf16\"\nadam_beta2 = 0.95\nwarmup_ratio = 0.5\n";
        let (c, given) = from_toml(text);
        assert_eq!(c.method, Method::Full);
        assert_eq!(c.freeze, "norms,embeddings");
        assert_eq!(
            Freeze::parse(&c.freeze).unwrap(),
            Freeze {
                embeddings: true,
                norms: true
            }
        );
        assert_eq!(c.save_dtype.as_deref(), Some("bf16"));
        assert_eq!((c.adam_beta2, c.warmup_ratio), (0.95, Some(0.5)));
        check(&c, &given).unwrap();
        assert_eq!(given.get("method"), Some("`method` (in c.toml)"));
        assert_eq!(given.get("lora_r"), None, "defaults are not explicit");
    }

    #[test]
    fn lora_keys_are_refused_under_full_only_when_given() {
        for key in LORA_KEYS {
            let value = match *key {
                "lora_r" => "8",
                "lora_alpha" => "16.0",
                "rslora" => "false",
                _ => "\"q,v\"",
            };
            let text = format!("method = \"full\"\nmodel = \"m\"\n{key} = {value}\n");
            let (c, given) = from_toml(&text);
            let e = check(&c, &given).unwrap_err();
            assert!(e.contains(&format!("`{key}` (in c.toml)")), "{e}");
            assert!(e.contains("LoRA-only"), "{e}");
        }
        // A flag names itself; two at once are both named.
        let (c, mut given) = from_toml("method = \"full\"\nmodel = \"m\"\n");
        given.flag("lora_r");
        given.flag("rslora");
        let e = check(&c, &given).unwrap_err();
        assert!(e.contains("--lora-r, --rslora are LoRA-only"), "{e}");
        // The same values left at their defaults are fine.
        let (c, given) = from_toml("method = \"full\"\nmodel = \"m\"\n");
        check(&c, &given).unwrap();
    }

    #[test]
    fn method_specific_values_are_checked() {
        let cases = [
            (
                "method = \"full\"\nmodel = \"m\"\nmerge = true\n",
                "--merge",
            ),
            (
                "method = \"full\"\nmodel = \"m\"\nfreeze = \"norms,bias\"\n",
                "\"bias\"",
            ),
            ("freeze = \"norms\"\n", "--freeze applies to --method full"),
            (
                "method = \"full\"\nmodel = \"m\"\nsave_dtype = \"f8\"\n",
                "--save-dtype \"f8\"",
            ),
            (
                "save_dtype = \"bf16\"\n",
                "--save-dtype applies to --method full",
            ),
            ("warmup_ratio = 1.0\n", "--warmup-ratio 1"),
            ("warmup_ratio = -0.1\n", "--warmup-ratio -0.1"),
            (
                "warmup_ratio = 0.1\nwarmup_steps = 3\n",
                "`warmup_steps` (in c.toml)",
            ),
            ("adam_beta1 = 0.5\n", "above 0.5"),
            ("adam_beta1 = 1.0\n", "--adam-beta1 1"),
            ("adam_beta2 = 1.0\n", "--adam-beta2 1"),
            ("adam_beta2 = -0.5\n", "--adam-beta2 -0.5"),
            ("adam_eps = 0.0\n", "--adam-eps 0"),
            ("method = \"full\"\n", "default model"),
            (
                "method = \"full\"\nmodel = \"q.GGUF\"\n",
                "q.GGUF is a GGUF file",
            ),
        ];
        for (text, needle) in cases {
            let (c, given) = from_toml(text);
            let e = check(&c, &given).expect_err(text);
            assert!(e.contains(needle), "{text:?}: {e}");
        }
        let e = TrainConfig::merge_toml_str(&TrainConfig::default(), "method = \"half\"\n")
            .unwrap_err();
        assert!(format!("{e:#}").contains("method"), "{e:#}");
        // A GGUF base with an explicit save_dtype, the unknown-group list, warmup_ratio alone.
        for text in [
            "method = \"full\"\nmodel = \"q.gguf\"\nsave_dtype = \"f32\"\n",
            "method = \"full\"\nmodel = \"m\"\nfreeze = \"\"\n",
            "warmup_ratio = 0.0\nadam_beta1 = 0.51\nadam_beta2 = 0.0\n",
        ] {
            let (c, given) = from_toml(text);
            check(&c, &given).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        }
        let e = Freeze::parse("embeddings,lm_head").unwrap_err();
        assert!(format!("{e}").contains("embeddings, norms"), "{e}");
    }

    /// config.toml leaves out the keys that do not apply, so it is accepted back as --config
    /// and gives the same configuration.
    #[test]
    fn config_toml_of_a_full_run_is_accepted_back() {
        let mut c = TrainConfig {
            method: Method::Full,
            model: Some("m".into()),
            freeze: "embeddings".into(),
            save_dtype: Some("f32".into()),
            warmup_ratio: Some(0.5),
            ..TrainConfig::default()
        };
        let text = c.to_toml().unwrap();
        for k in LORA_KEYS.iter().chain(&["warmup_steps"]) {
            assert!(!text.contains(&format!("{k} =")), "{k} in:\n{text}");
        }
        let (back, given) = from_toml(&text);
        check(&back, &given).unwrap();
        assert_eq!(back, c);
        // A LoRA run's file has no freeze key.
        c = TrainConfig::default();
        let text = c.to_toml().unwrap();
        assert!(!text.contains("freeze"), "{text}");
        let (back, given) = from_toml(&text);
        check(&back, &given).unwrap();
        assert_eq!(back, c);
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
