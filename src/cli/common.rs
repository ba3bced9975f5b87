//! Argument groups and helpers every subcommand shares: the `--device` parser, layer lists,
//! the thread count, the default model, and the model of a benchmark.

use crate::backend::device::{Device, DEVICE_NAMES};
use crate::dist::launch::{self, Launch};
use crate::dist::{parse_gpus, Dist};
use crate::model::config::ModelConfig;
use crate::model::loader::{load_model, LoadedModel};
use crate::model::spec::ModelSpec;
use crate::model::transformer::Checkpointing;
use crate::train::config::{Explicit, Method, TrainConfig};
use crate::train::plan::CheckpointingChoice;
use anyhow::{bail, Context, Result};
use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::Args;
use std::path::{Path, PathBuf};

/// The parser of `--device`: auto, cpu or cuda, listed with their meaning in `--help`.
pub fn device_parser() -> impl TypedValueParser<Value = Device> {
    let help = |name: &str| match name {
        "auto" => "a CUDA GPU when one is usable, else the CPU (with a one-line notice)",
        "cpu" => "the f32 reference backend",
        _ => "the first visible CUDA GPU (bf16 weights and activations)",
    };
    PossibleValuesParser::new(DEVICE_NAMES.map(|n| PossibleValue::new(n).help(help(n))))
        .map(|s| s.parse::<Device>().expect("one of the possible values"))
}

/// The checkpointing modes and what each keeps, for `--help`.
const CHECKPOINTING_MODES: [(&str, &str); 3] = [
    ("none", "keep every activation (fastest, most memory)"),
    (
        "selective",
        "recompute each layer's MLP part in the backward",
    ),
    (
        "full",
        "keep only each layer's input; recompute the layer in the backward",
    ),
];

/// `bench-step --checkpointing`: a mode, with help per mode.
pub fn checkpointing_parser() -> impl TypedValueParser<Value = Checkpointing> {
    PossibleValuesParser::new(CHECKPOINTING_MODES.map(|(n, h)| PossibleValue::new(n).help(h)))
        .map(|s| Checkpointing::parse(&s).expect("one of the possible values"))
}

/// `train`/`plan --checkpointing`: `auto` or a mode, with help per choice.
pub fn checkpointing_choice_parser() -> impl TypedValueParser<Value = CheckpointingChoice> {
    let auto = PossibleValue::new("auto")
        .help("the fastest mode whose memory plan fits the GPU (none on the CPU)");
    let modes = CHECKPOINTING_MODES.map(|(n, h)| PossibleValue::new(n).help(h));
    PossibleValuesParser::new(std::iter::once(auto).chain(modes))
        .map(|s| CheckpointingChoice::parse(&s).expect("one of the possible values"))
}

/// The parser of `--method`: lora or full, listed with their meaning in `--help`.
pub fn method_parser() -> impl TypedValueParser<Value = Method> {
    PossibleValuesParser::new([
        PossibleValue::new("lora").help(
            "LoRA adapters on the frozen base weights (the paper's emergent-misalignment runs)",
        ),
        PossibleValue::new("full").help(
            "every weight: linear layers, norms and embeddings (the paper's spurious-correlation \
             runs); f32 master weights and AdamW moments, bf16 forward/backward on the GPU, f32 \
             throughout on the CPU",
        ),
    ])
    .map(|s| s.parse::<Method>().expect("one of the possible values"))
}

/// Read a `--config` file over `base` and note the keys it sets as explicit.
pub fn merge_config_file(
    base: &TrainConfig,
    path: &Path,
    given: &mut Explicit,
) -> Result<TrainConfig> {
    let (cfg, keys) = TrainConfig::merge_toml_file_keys(base, path)?;
    for k in keys {
        given.file(&k, path);
    }
    Ok(cfg)
}

/// Parse `10,20,30`.
pub fn parse_layers(s: &str) -> Result<Vec<usize>> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            p.trim()
                .parse::<usize>()
                .with_context(|| format!("layer {p:?} in {s:?} is not a number"))
        })
        .collect()
}

/// Set rayon's thread count once (0 = all cores).
pub fn set_threads(n: usize) {
    if n > 0 {
        // An error means the pool already exists (e.g. in tests); keep it.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global();
    }
}

/// The model path given, or the default model (fetched on first use).
pub fn model_path(p: &Option<PathBuf>) -> Result<PathBuf> {
    match p {
        Some(p) => Ok(p.clone()),
        None => crate::util::fetch::smollm2(),
    }
}

/// The model of a benchmark.
#[derive(Args, Debug, Clone)]
pub struct BenchModelArgs {
    /// Model: a Hugging Face folder, a GGUF file or a Hub id in the local cache (ORG/NAME[@REV])
    /// (default: SmolLM2-135M-Instruct).
    #[arg(long, conflicts_with = "shape")]
    pub model: Option<PathBuf>,
    /// Instead of a model file, random weights of a shape: a preset (qwen2.5-1.5b, qwen3-1.7b,
    /// gemma-2-2b, llama-3.2-1b, smollm2-135m) or any Hugging Face `config.json` (or the folder
    /// holding one), so a model's step can be timed without its weights.
    #[arg(long)]
    pub shape: Option<String>,
}

impl BenchModelArgs {
    /// Random weights of the shape (a preset, or a `config.json`), or the model file.
    pub fn load(&self) -> Result<LoadedModel> {
        Ok(match &self.shape {
            Some(shape) => {
                let path = Path::new(shape);
                let config = if path.is_dir() {
                    ModelConfig::from_hf_json(&path.join("config.json"))?
                } else if path.is_file() {
                    ModelConfig::from_hf_json(path)?
                } else {
                    crate::model::random::preset(shape).with_context(|| {
                        format!("--shape {shape:?} is no file either (a config.json or its folder)")
                    })?
                };
                LoadedModel {
                    weights: Box::new(crate::model::random::RandomWeights::new(config.clone(), 0)),
                    config,
                    tokenizer: None,
                    chat_template: None,
                    source: PathBuf::from(format!("random:{shape}")),
                }
            }
            None => load_model(&model_path(&self.model)?)?,
        })
    }
}

/// The model a command runs (`eval`, `generate`): base, adapter, directions, device.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Base model: a Hugging Face folder, a GGUF file or a Hub id in the local cache
    /// (ORG/NAME[@REV]) [default: SmolLM2-135M-Instruct].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// A PEFT LoRA adapter folder (e.g. <train output>/adapter) [default: the base model].
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// Ablate these directions (safetensors `layer.<L>` [k, d_model]) while running: CAFT
    /// ablates during training only, so this is for experiments.
    #[arg(long, value_name = "FILE")]
    pub ablate: Option<PathBuf>,
    /// Keep only these layers of --ablate: 10,20.
    #[arg(long, requires = "ablate")]
    pub ablate_layers: Option<String>,
    #[arg(long, value_parser = device_parser(), default_value = "auto")]
    pub device: Device,
    /// CPU threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

impl ModelArgs {
    pub fn spec(&self) -> Result<ModelSpec> {
        Ok(ModelSpec {
            model: self.model.clone(),
            adapter: self.adapter.clone(),
            ablate: self.ablate.clone(),
            ablate_layers: self
                .ablate_layers
                .as_deref()
                .map(parse_layers)
                .transpose()?,
        })
    }
}

/// The names of the runs compared in a table or chart: `--labels a,b,c` (one per file) or
/// each file's stem.
pub fn run_labels(labels: &Option<String>, files: &[PathBuf], what: &str) -> Result<Vec<String>> {
    let names: Vec<String> = match labels {
        Some(l) => l.split(',').map(|s| s.trim().to_string()).collect(),
        None => files
            .iter()
            .map(|p| {
                p.file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| p.display().to_string())
            })
            .collect(),
    };
    if names.len() != files.len() {
        anyhow::bail!(
            "--labels has {} names for {} {what}; give one name per file",
            names.len(),
            files.len()
        );
    }
    Ok(names)
}

/// The `train` options that shape a run's memory and its steps, shared with `plan` (which
/// must plan exactly what `train` would run).
#[derive(Args, Debug, Clone, Default)]
pub struct RunShapeArgs {
    /// Sequences per micro-batch [default: 2].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Micro-batches per optimizer step [default: 8]. With packing (the default) a step still
    /// holds batch-size x grad-accum examples, laid out in as few packed micro-batches as the
    /// token budget allows.
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Truncate longer examples (counted and reported) [default: 2048].
    #[arg(long)]
    pub max_seq_len: Option<usize>,
    /// Pad each micro-batch to its longest example instead of packing the step's examples end
    /// to end (padding-free packing is the default; same update up to rounding).
    #[arg(long, conflicts_with = "packing")]
    pub no_packing: bool,
    /// Pack (the default; switches a config file's `packing = false` back on).
    #[arg(long)]
    pub packing: bool,
    /// Token budget of one packed micro-batch [default: batch-size x max-seq-len].
    #[arg(long, value_name = "N")]
    pub max_tokens_per_batch: Option<usize>,
    /// What is trained [default: lora]. A full run's output is a complete Hugging Face model
    /// folder (no adapter, so no --merge); the LoRA flags (--lora-r, --lora-alpha, --rslora,
    /// --lora-targets) are refused with it.
    #[arg(long, value_parser = method_parser())]
    pub method: Option<Method>,
    /// With --method full: weight groups left frozen, comma-separated: embeddings (the token
    /// embeddings, which are also the lm head when the model ties them), norms (every RMSNorm
    /// gain) [default: none; every weight is trained].
    #[arg(long, value_name = "GROUPS")]
    pub freeze: Option<String>,
    /// LoRA rank [default: 32].
    #[arg(long)]
    pub lora_r: Option<usize>,
    /// Comma-separated LoRA targets [default: q,k,v,o,gate,up,down].
    #[arg(long)]
    pub lora_targets: Option<String>,
    /// Activation checkpointing: auto, none (keep every activation), selective (recompute each
    /// layer's MLP part in the backward) or full (keep only each layer's input, recompute the
    /// layer). Same gradients bit for bit; less memory, more compute. On a GPU the run's
    /// memory plan (`caft-fast plan`) is checked before the weights are loaded: a run that
    /// cannot fit is refused with the table, and auto takes the fastest mode that fits (none
    /// on the CPU) [default: auto].
    #[arg(long, value_parser = checkpointing_choice_parser())]
    pub checkpointing: Option<CheckpointingChoice>,
    /// Directions to ablate: safetensors with `layer.<L>` tensors [k, d_model].
    #[arg(long, value_name = "FILE")]
    pub ablate: Option<PathBuf>,
    /// Ablate K random orthonormal directions per layer instead (the paper's control), at
    /// --ablate-layers.
    #[arg(long, value_name = "K")]
    pub ablate_random: Option<usize>,
    /// Restrict (with --ablate) or choose (with --ablate-random) the ablated layers: 10,20,30.
    #[arg(long)]
    pub ablate_layers: Option<String>,
}

impl RunShapeArgs {
    /// Lay the options that were given over `c`.
    pub fn apply(&self, c: &mut TrainConfig) -> Result<()> {
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = &self.$f { c.$f = v.clone(); } )* };
        }
        set!(
            batch_size,
            grad_accum,
            max_seq_len,
            method,
            freeze,
            lora_r,
            lora_targets,
            checkpointing
        );
        if self.max_tokens_per_batch.is_some() {
            c.max_tokens_per_batch = self.max_tokens_per_batch;
        }
        if self.ablate.is_some() {
            c.ablate = self.ablate.clone();
        }
        if self.ablate_random.is_some() {
            c.ablate_random = self.ablate_random;
        }
        if let Some(l) = &self.ablate_layers {
            c.ablate_layers = Some(parse_layers(l)?);
        }
        if self.no_packing {
            c.packing = false;
        }
        if self.packing {
            c.packing = true;
        }
        Ok(())
    }

    /// Note the options given on the command line as explicit.
    pub fn mark_explicit(&self, given: &mut Explicit) {
        let flags = [
            ("batch_size", self.batch_size.is_some()),
            ("grad_accum", self.grad_accum.is_some()),
            ("max_seq_len", self.max_seq_len.is_some()),
            ("packing", self.packing || self.no_packing),
            ("max_tokens_per_batch", self.max_tokens_per_batch.is_some()),
            ("method", self.method.is_some()),
            ("freeze", self.freeze.is_some()),
            ("lora_r", self.lora_r.is_some()),
            ("lora_targets", self.lora_targets.is_some()),
            ("checkpointing", self.checkpointing.is_some()),
            ("ablate", self.ablate.is_some()),
            ("ablate_random", self.ablate_random.is_some()),
            ("ablate_layers", self.ablate_layers.is_some()),
        ];
        for (key, set) in flags {
            if set {
                given.flag(key);
            }
        }
    }
}

/// `--gpus LIST` of a command that runs on several GPUs: in the process the user started, start
/// one worker per GPU (this program, these arguments), supervise them and return
/// `Some(completed)`; in a worker, or without `--gpus`, `None` (go on and do the work).
pub fn launch_if_asked(gpus: Option<&str>, device: Option<Device>) -> Result<Option<bool>> {
    let Some(spec) = gpus else {
        return Ok(None);
    };
    if launch::is_worker() {
        return Ok(None);
    }
    if Dist::from_env()?.world.size > 1 {
        bail!(
            "--gpus starts one process per GPU itself; under torchrun or srun (RANK and \
             WORLD_SIZE are set here) leave it out"
        );
    }
    if device == Some(Device::Cpu) {
        bail!("--gpus runs on CUDA GPUs; it cannot be combined with --device cpu");
    }
    launch_workers(spec).map(Some)
}

/// Start one worker per GPU of `spec` and supervise them.
fn launch_workers(spec: &str) -> Result<bool> {
    use crate::backend::cuda::{collective, probe};
    let p = probe::probe();
    if !p.usable() {
        bail!("--gpus {spec}: {}", p.summary());
    }
    let gpus = parse_gpus(spec, p.gpus.len())?;
    let mut env = Vec::new();
    if gpus.len() > 1 {
        if !collective::present() {
            bail!(
                "--gpus {spec}: running on {} GPUs needs libnccl, which was not found: {}",
                gpus.len(),
                collective::INSTALL_HINT
            );
        }
        if !collective::loadable_by_cudarc() {
            // Found only as libnccl.so.2 (pip wheels, most distributions): give the workers a
            // folder with the name the bindings look for.
            if let Some(lib) = collective::library_path() {
                env.push(("LD_LIBRARY_PATH".to_string(), nccl_link_folder(&lib)?));
            }
        }
    }
    let program = std::env::current_exe().context("finding this program to start the workers")?;
    eprintln!(
        "starting {} worker{} on GPU{} {}",
        gpus.len(),
        if gpus.len() > 1 { "s" } else { "" },
        if gpus.len() > 1 { "s" } else { "" },
        gpus.iter()
            .map(|g| g.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let ended = launch::run(&Launch {
        program,
        args: std::env::args_os().skip(1).collect(),
        gpus,
        env,
    })?;
    Ok(ended == launch::Ended::Completed)
}

/// A folder holding `libnccl.so` linked to `lib`, put first on the current loader path.
fn nccl_link_folder(lib: &std::path::Path) -> Result<std::ffi::OsString> {
    let dir = crate::util::fetch::cache_dir().join("nccl-link");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let link = dir.join("libnccl.so");
    if std::fs::read_link(&link).ok().as_deref() != Some(lib) {
        let tmp = dir.join(format!("libnccl.so.{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(lib, &tmp)
            .and_then(|_| std::fs::rename(&tmp, &link))
            .with_context(|| format!("linking {} to {}", link.display(), lib.display()))?;
    }
    let mut path = dir.into_os_string();
    if let Some(old) = std::env::var_os("LD_LIBRARY_PATH").filter(|v| !v.is_empty()) {
        path.push(":");
        path.push(old);
    }
    Ok(path)
}
