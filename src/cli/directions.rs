//! Arguments of `caft-fast directions` and the thin glue from them to the library.

use super::common::{device_parser, launch_if_asked, model_path, parse_layers, set_threads};
use crate::backend::device::Device;
use crate::backend::Backend;
use crate::data::{load_examples, token_batches, Example, TokenBatch};
use crate::directions::pca::{TunedAndBase, TwoModels};
use crate::directions::{pca, probe, select};
use crate::dist::Dist;
use crate::model::ablation::{load_directions, random_directions, save_directions};
use crate::model::loader::{load_model, LoadedModel};
use crate::model::spec::ModelSpec;
use crate::model::transformer::Model;
use crate::util::progress;
use crate::with_backend;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};

#[derive(Args, Debug, Clone)]
pub struct DirectionsArgs {
    #[command(subcommand)]
    pub cmd: DirectionsCmd,
}

#[derive(Subcommand, Debug, Clone)]
pub enum DirectionsCmd {
    /// Principal components of resid_post(fine-tune) - resid_post(base) on the answer tokens
    /// of a data file, per layer; the fine-tune is a LoRA adapter on the base (--adapter) or a
    /// whole fine-tuned model (--tuned-model, e.g. `train --method full`'s output). Writes
    /// `layer.<L>` [k, d_model] (unit rows) and `explained_variance.<L>`,
    /// `explained_variance_ratio.<L>` [k].
    Pca(PcaArgs),
    /// Keep chosen rows of a PCA (or directions) file as an ablation file for `train --ablate`.
    Select(SelectArgs),
    /// Choose components automatically: the base model reads labelled probe sentences that
    /// carry one concept alone; per layer, keep the components whose projections best
    /// separate the two labels (largest |Cohen's d|), as an ablation file.
    ProbeSelect(ProbeSelectArgs),
    /// Random orthonormal directions (the paper's control), as an ablation file.
    Random(RandomArgs),
    /// Convert directions from other tools (.npy, or safetensors under other tensor names)
    /// into an ablation file.
    Import(ImportArgs),
    /// Interpret directions: the contexts of a corpus whose base-model resid_post projects
    /// highest and lowest on each, as an HTML report and a JSON summary.
    Explain(ExplainArgs),
    /// Directions from sparse autoencoders: latents of an SAE on the base model's resid_post,
    /// ranked by how much the fine-tune (--adapter or --tuned-model) changes their mean
    /// activation on the answer tokens; writes the top latents' decoder rows as `layer.<L>`.
    Sae(SaeArgs),
    /// Train a BatchTopK sparse autoencoder on the base model's resid_post at one layer over a
    /// corpus (for `directions sae`, when no published SAE fits the model).
    SaeTrain(SaeTrainArgs),
}

#[derive(Args, Debug, Clone)]
pub struct SaeTrainArgs {
    /// Base model: a Hugging Face folder, a GGUF file or a Hub id in the local cache
    /// (ORG/NAME[@REV]) [default: SmolLM2-135M-Instruct].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Corpus: JSONL ({"text": ...} or any form `train` reads) or plain text, one text a line.
    #[arg(long)]
    pub corpus: PathBuf,
    /// The layer whose output (resid_post) the SAE reads.
    #[arg(long)]
    pub layer: usize,
    /// batchtopk (k active latents per token on average) or jumprelu (an L0 penalty with
    /// learned per-latent thresholds).
    #[arg(long, default_value = "batchtopk")]
    pub arch: String,
    /// Latents (dictionary size).
    #[arg(long, default_value_t = 4096)]
    pub latents: usize,
    /// Mean active latents per token (batchtopk).
    #[arg(long, default_value_t = 32)]
    pub k: usize,
    /// Weight of the L0 penalty (jumprelu).
    #[arg(long, default_value_t = 1.0)]
    pub l0_coeff: f64,
    /// Width of the straight-through kernel, in activation units (jumprelu).
    #[arg(long, default_value_t = 0.1)]
    pub bandwidth: f64,
    /// Starting threshold of every latent (jumprelu).
    #[arg(long, default_value_t = 0.3)]
    pub init_threshold: f64,
    /// Adam steps.
    #[arg(long, default_value_t = 2000)]
    pub steps: usize,
    /// Tokens per step.
    #[arg(long, default_value_t = 1024)]
    pub batch_tokens: usize,
    /// Learning rate [default: 2e-4 / sqrt(latents / 16384), as dictionary_learning scales it].
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Activations kept in memory (tokens x d_model f32).
    #[arg(long, default_value_t = 200_000)]
    pub max_tokens: usize,
    /// Do not train on the first N tokens of each text (outlier "attention sink" norms).
    #[arg(long, default_value_t = 1)]
    pub skip_first: usize,
    /// Cut texts at this many tokens.
    #[arg(long, default_value_t = 256)]
    pub max_seq_len: usize,
    #[arg(long, value_parser = device_parser(), default_value = "auto")]
    pub device: Device,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Output SAE file (safetensors, dictionary_learning layout).
    #[arg(long, short = 'o')]
    pub output: PathBuf,
    /// CPU threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

/// The fine-tune that `pca` and `sae` compare with the base model (--model): one of the two.
#[derive(Args, Debug, Clone)]
#[group(required = true, multiple = false)]
pub struct TunedArgs {
    /// The fine-tune as a PEFT LoRA adapter folder on --model (adapter_config.json +
    /// adapter_model.safetensors), e.g. <train output>/adapter.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// The fine-tune as a whole model of --model's architecture and shape (a Hugging Face
    /// folder, a GGUF file or a Hub id in the local cache), e.g. the <train output>/model of
    /// `train --method full`. Both models are held at once (twice the weights' memory).
    #[arg(long, value_name = "MODEL")]
    pub tuned_model: Option<PathBuf>,
}

impl TunedArgs {
    /// The fine-tune beside the base model `loaded` on `be`: the base carrying the adapter, or
    /// the fine-tuned model and the base side by side (after checking they have one shape).
    fn build<'a, B: Backend + 'a>(
        &self,
        be: &'a B,
        loaded: &LoadedModel,
    ) -> Result<Box<dyn TunedAndBase<B> + 'a>> {
        match (&self.adapter, &self.tuned_model) {
            (Some(dir), None) => {
                if dir.join("config.json").is_file() && !dir.join("adapter_config.json").exists() {
                    bail!(
                        "--adapter {}: this is a model folder (config.json, no \
                         adapter_config.json); give a fully fine-tuned model as --tuned-model",
                        dir.display()
                    );
                }
                Ok(Box::new(ModelSpec::with_adapter(dir).build(be, loaded)?))
            }
            (None, Some(m)) => {
                if m.join("adapter_config.json").is_file() && !m.join("config.json").exists() {
                    bail!(
                        "--tuned-model {}: this is a LoRA adapter folder; give it as --adapter",
                        m.display()
                    );
                }
                let tuned =
                    load_model(m).with_context(|| format!("--tuned-model {}", m.display()))?;
                Ok(Box::new(TwoModels::new(be, loaded, &tuned)?))
            }
            _ => bail!("give exactly one of --adapter DIR and --tuned-model MODEL"),
        }
    }

    /// The adapter and the tuned model as given (one is `None`), for the output's metadata.
    fn shown(&self) -> (Option<String>, Option<String>) {
        let show = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
        (show(&self.adapter), show(&self.tuned_model))
    }
}

/// Options of the paired base / fine-tuned forward passes (`pca`, `sae`).
#[derive(Args, Debug, Clone)]
pub struct PassArgs {
    /// Use every token, not only the answer tokens.
    #[arg(long)]
    pub all_tokens: bool,
    #[arg(long, value_parser = device_parser(), default_value = "auto")]
    pub device: Device,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Truncate longer examples.
    #[arg(long, default_value_t = 2048)]
    pub max_seq_len: usize,
    /// Use only the first N examples of the data.
    #[arg(long, value_name = "N")]
    pub max_examples: Option<usize>,
    /// CPU threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

impl PassArgs {
    /// The examples of `data` (the first `--max-examples`) and their micro-batches.
    fn batches(
        &self,
        data: &Path,
        loaded: &LoadedModel,
    ) -> Result<(Vec<Example>, Vec<TokenBatch>)> {
        let mut examples = load_examples(data, loaded, self.all_tokens, self.max_seq_len)?;
        if let Some(m) = self.max_examples {
            examples.truncate(m.max(1));
        }
        let batches = token_batches(&examples, self.batch_size, self.all_tokens);
        Ok((examples, batches))
    }
}

#[derive(Args, Debug, Clone)]
#[command(after_long_help = "\
SAE files: safetensors with SAELens names (W_enc [d, m], b_enc, W_dec [m, d], b_dec, optional
threshold [m]; apply_b_dec_to_input read from a cfg.json beside it), Gemma Scope's params.npz
(the same names as .npy arrays, read as published) or dictionary_learning names
(encoder.weight [m, d], encoder.bias, decoder.weight [d, m], b_dec, optional threshold and k).
The architecture is guessed from the tensors (threshold per latent: jumprelu; scalar threshold
and k: batchtopk; k alone: topk; else relu) unless --sae-arch is given.")]
pub struct SaeArgs {
    /// Base model: a Hugging Face folder, a GGUF file or a Hub id in the local cache
    /// (ORG/NAME[@REV]) [default: SmolLM2-135M-Instruct].
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub tuned: TunedArgs,
    /// Data whose tokens both models read (JSONL, as for `pca`).
    #[arg(long)]
    pub data: PathBuf,
    /// LAYER=FILE: the SAE trained on that layer's resid_post (repeat for more layers).
    #[arg(long, required = true, value_name = "LAYER=FILE")]
    pub sae: Vec<String>,
    /// relu, jumprelu, topk or batchtopk [default: guessed from the file].
    #[arg(long)]
    pub sae_arch: Option<String>,
    /// k of a topk SAE (when the file does not say).
    #[arg(long)]
    pub sae_k: Option<usize>,
    /// Latents kept per layer, largest |change of mean activation| first.
    #[arg(long, default_value_t = 20)]
    pub top: usize,
    /// Output safetensors file.
    #[arg(long, short = 'o')]
    pub output: PathBuf,
    #[command(flatten)]
    pub pass: PassArgs,
}

#[derive(Args, Debug, Clone)]
#[command(after_long_help = "\
Data: the JSONL forms `caft-fast train` reads (chat, prompt/completion, text, pre-tokenized
{\"input_ids\", \"labels\"}). Answer tokens are the labelled ones (assistant turns of chat
records, every token of text records, labels >= 0 of pre-tokenized ones).

The fine-tune: --adapter DIR (LoRA: the base model runs with and without the adapter) or
--tuned-model MODEL (full fine-tuning: a second whole model, which must have --model's
architecture, width, depth, heads, MLP width and vocabulary; both are held at once).

Memory: one d_model x d_model f64 covariance per layer (512 MiB at d_model = 8192), whatever
the number of tokens.")]
pub struct PcaArgs {
    /// Base model: a Hugging Face folder, a GGUF file or a Hub id in the local cache
    /// (ORG/NAME[@REV]) [default: SmolLM2-135M-Instruct].
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub tuned: TunedArgs,
    /// Data whose tokens both models read (JSONL, tokenized by --model's tokenizer).
    #[arg(long)]
    pub data: PathBuf,
    /// Layers whose output (resid_post) to compare: 10,20,30.
    #[arg(long)]
    pub layers: String,
    /// Share the forward passes among these GPUs of this node, one worker each (e.g. 0,1 or
    /// all; the covariances are merged over NCCL); under torchrun/srun without it.
    #[arg(long, value_name = "LIST")]
    pub gpus: Option<String>,
    /// Principal components kept per layer.
    #[arg(long, default_value_t = 20)]
    pub components: usize,
    /// Output safetensors file.
    #[arg(long, short = 'o')]
    pub output: PathBuf,
    #[command(flatten)]
    pub pass: PassArgs,
}

#[derive(Args, Debug, Clone)]
pub struct SelectArgs {
    /// A `directions pca` output (or any file with `layer.<L>` tensors).
    #[arg(long)]
    pub from: PathBuf,
    /// LAYER:ROWS, e.g. `--pick 10:0,12 20:3-5` (rows 0 and 12 of layer 10, rows 3..=5 of
    /// layer 20), in the order given.
    #[arg(long, num_args = 1.., required = true)]
    pub pick: Vec<String>,
    /// Output directions file (safetensors).
    #[arg(long, short = 'o')]
    pub output: PathBuf,
}

#[derive(Args, Debug, Clone)]
#[command(after_long_help = "\
Probes: JSONL, one {\"text\": ..., \"label\": ...} a line (or {\"input_ids\": [...], \"label\": ...}
for models without a tokenizer), with exactly two distinct labels, e.g. the probes.jsonl of
`caft-fast eval make-task`. Texts are tokenized as `train` tokenizes {\"text\"} records.

Rule: each probe's feature at layer L is the base model's resid_post averaged over its tokens
(the first --skip-first left out: the first token's residual stream is an outlier of huge norm).
Each component is scored by Cohen's d of the features' projections onto it between the two
labels (sorted by name: d = (mean_b - mean_a) / pooled sd); the --per-layer components with
the largest |d| are kept, best first. The AUC of the same projections is reported beside it.
No test data is read: the probes carry the concept to remove and nothing else.

Output: an ablation file (layer.<L> [k, d_model], the chosen rows bit for bit, as `select`
writes them) and, with --json, every component's d, AUC and label means.")]
pub struct ProbeSelectArgs {
    /// Base model: a Hugging Face folder, a GGUF file or a Hub id in the local cache
    /// (ORG/NAME[@REV]) [default: SmolLM2-135M-Instruct].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// A `directions pca` output (or any file with `layer.<L>` tensors [k, d_model]).
    #[arg(long)]
    pub from: PathBuf,
    /// Labelled probe sentences (JSONL, see below).
    #[arg(long)]
    pub probes: PathBuf,
    /// Components kept per layer, largest |Cohen's d| first.
    #[arg(long, default_value_t = 2)]
    pub per_layer: usize,
    /// Use only these layers of --from: 10,20 [default: every layer of the file].
    #[arg(long)]
    pub layers: Option<String>,
    /// Leave the first N tokens of each probe out of its mean.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub skip_first: usize,
    /// Cut probes at this many tokens.
    #[arg(long, default_value_t = 256)]
    pub max_seq_len: usize,
    /// Output ablation file (safetensors).
    #[arg(long, short = 'o')]
    pub output: PathBuf,
    /// Also write every component's scores as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    #[arg(long, value_parser = device_parser(), default_value = "auto")]
    pub device: Device,
    /// Probes per forward pass.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// CPU threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

#[derive(Args, Debug, Clone)]
pub struct RandomArgs {
    /// The model the directions are for (its d_model and layer count)
    /// [default: SmolLM2-135M-Instruct].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Directions per layer.
    #[arg(long)]
    pub k: usize,
    /// Layers: 10,20.
    #[arg(long)]
    pub layers: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output directions file (safetensors).
    #[arg(long, short = 'o')]
    pub output: PathBuf,
}

#[derive(Args, Debug, Clone)]
#[command(group = clap::ArgGroup::new("input").required(true).args(["npy", "from"]))]
pub struct ImportArgs {
    /// A .npy array [k, d_model] or [d_model] holding one layer's directions (with --layer).
    #[arg(long, requires = "layer")]
    pub npy: Option<PathBuf>,
    /// The layer the .npy directions belong to.
    #[arg(long)]
    pub layer: Option<usize>,
    /// A safetensors file with per-layer tensors under other names (with --rename).
    #[arg(long, requires = "rename")]
    pub from: Option<PathBuf>,
    /// The tensor-name pattern of --from, `{L}` standing for the layer: 'blocks.{L}.dir'.
    #[arg(long)]
    pub rename: Option<String>,
    /// Check the directions against this model (d_model and layer count).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The model's d_model, when no --model is given (needed for .npy).
    #[arg(long)]
    pub d_model: Option<usize>,
    /// Output directions file (safetensors).
    #[arg(long, short = 'o')]
    pub output: PathBuf,
}

#[derive(Args, Debug, Clone)]
pub struct ExplainArgs {
    /// Base model: a Hugging Face folder, a GGUF file or a Hub id in the local cache
    /// (ORG/NAME[@REV]) [default: SmolLM2-135M-Instruct].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// A `directions pca` output (or any file with `layer.<L>` tensors [k, d_model]).
    #[arg(long)]
    pub directions: PathBuf,
    /// Corpus: JSONL ({"text": ...} or any form `train` reads) or plain text, one text a line.
    #[arg(long)]
    pub corpus: PathBuf,
    /// Output folder (index.html, summary.json).
    #[arg(long, short = 'o')]
    pub output: PathBuf,
    /// Contexts listed per direction, for the highest and for the lowest projections.
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    /// Tokens shown before the ranked token.
    #[arg(long, default_value_t = 12)]
    pub before: usize,
    /// Tokens shown after the ranked token.
    #[arg(long, default_value_t = 4)]
    pub after: usize,
    /// Do not rank the first N tokens of each text (the first token's resid_post is usually
    /// an outlier of huge norm that would top every list).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub skip_first: usize,
    /// Use only the first N texts of the corpus.
    #[arg(long, value_name = "N")]
    pub max_texts: Option<usize>,
    /// Cut texts at this many tokens.
    #[arg(long, default_value_t = 256)]
    pub max_seq_len: usize,
    #[arg(long, value_parser = device_parser(), default_value = "auto")]
    pub device: Device,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// CPU threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

/// Set the thread count, load the model `$a.model` names and run `$f(be, &$a, &loaded)` on
/// `$device`: the start of every subcommand that runs the model.
macro_rules! on_model {
    ($a:ident, $threads:expr, $device:expr, $f:ident) => {{
        set_threads($threads);
        let loaded = load_model(&model_path(&$a.model)?)?;
        with_backend!($device, |be| $f(be, &$a, &loaded))
    }};
}

/// Run one `directions` subcommand.
pub fn run(a: DirectionsArgs) -> Result<()> {
    match a.cmd {
        DirectionsCmd::Pca(a) => {
            if launch_if_asked(a.gpus.as_deref(), Some(a.pass.device))?.is_some() {
                return Ok(());
            }
            on_model!(a, a.pass.threads, a.pass.device, pca_impl)
        }
        DirectionsCmd::Select(a) => {
            let picks = a
                .pick
                .iter()
                .map(|p| select::parse_pick(p))
                .collect::<Result<Vec<_>>>()?;
            let dirs = select::select(&a.from, &picks)?;
            save_directions(&a.output, &dirs)?;
            report(&a.output, &dirs);
            Ok(())
        }
        DirectionsCmd::ProbeSelect(a) => on_model!(a, a.threads, a.device, probe_select_impl),
        DirectionsCmd::Random(a) => {
            let loaded = load_model(&model_path(&a.model)?)?;
            let layers = parse_layers(&a.layers)?;
            let n = loaded.config.num_layers;
            if let Some(&l) = layers.iter().find(|&&l| l >= n) {
                bail!(
                    "layer {l} does not exist: the model has {n} layers (0..{})",
                    n - 1
                );
            }
            let dirs = random_directions(a.seed, a.k, loaded.config.hidden_size, &layers)?;
            save_directions(&a.output, &dirs)?;
            report(&a.output, &dirs);
            Ok(())
        }
        DirectionsCmd::Import(a) => run_import(&a),
        DirectionsCmd::Explain(a) => on_model!(a, a.threads, a.device, explain_impl),
        DirectionsCmd::Sae(a) => on_model!(a, a.pass.threads, a.pass.device, sae_impl),
        DirectionsCmd::SaeTrain(a) => on_model!(a, a.threads, a.device, sae_train_impl),
    }
}

fn report(path: &Path, dirs: &crate::model::ablation::Directions) {
    let per: Vec<String> = dirs
        .sets
        .iter()
        .map(|s| format!("layer {}: {}", s.layer, s.k))
        .collect();
    eprintln!(
        "wrote {} ({}; sha256 {})",
        path.display(),
        per.join(", "),
        &dirs.sha256[..12.min(dirs.sha256.len())]
    );
}

fn probe_select_impl<B: Backend>(be: &B, a: &ProbeSelectArgs, loaded: &LoadedModel) -> Result<()> {
    let cfg = loaded.config.clone();
    let mut dirs =
        crate::directions::explain::read_directions(&a.from, cfg.hidden_size, cfg.num_layers)?;
    if let Some(l) = &a.layers {
        let want = parse_layers(l)?;
        if let Some(&m) = want.iter().find(|&&l| !dirs.iter().any(|d| d.layer == l)) {
            bail!(
                "{}: no components for layer {m}; the file has layers {:?}",
                a.from.display(),
                dirs.iter().map(|d| d.layer).collect::<Vec<_>>()
            );
        }
        dirs.retain(|d| want.contains(&d.layer));
    }
    let probes = probe::read_probes(&a.probes, loaded, a.max_seq_len)?;
    let mut model = Model::new(be, cfg, loaded.weights.as_ref())?;
    let opt = probe::FeatureOptions {
        batch_size: a.batch_size,
        skip_first: a.skip_first,
    };
    let n_batches = probes.examples.len().div_ceil(a.batch_size.max(1));
    let bar = progress(n_batches as u64, "probes");
    let feats = probe::probe_features(be, &mut model, &probes, &dirs, opt, |i| {
        bar.set_position(i as u64)
    })?;
    bar.finish_and_clear();
    let layers = probe::score_layers(&dirs, &feats, &probes.labels, a.per_layer)?;
    let picks: Vec<select::Pick> = layers
        .iter()
        .map(|l| select::Pick {
            layer: l.layer,
            rows: l.chosen.clone(),
        })
        .collect();
    let chosen = select::select(&a.from, &picks)?;
    save_directions(&a.output, &chosen)?;
    eprint!("{}", probe::summary(&layers, &probes.names));
    if let Some(j) = &a.json {
        let counts: Vec<usize> = (0..2)
            .map(|k| probes.labels.iter().filter(|&&l| l == k).count())
            .collect();
        let v = serde_json::json!({
            "rule": "per layer, the components with the largest |Cohen's d| between the two \
                     labels of the base model's mean resid_post (over each probe's tokens) \
                     projected on each component",
            "model": loaded.source.display().to_string(),
            "from": a.from.display().to_string(),
            "probes": a.probes.display().to_string(),
            "labels": probes.names,
            "probes_per_label": counts,
            "skip_first": a.skip_first,
            "per_layer": a.per_layer,
            "output": a.output.display().to_string(),
            "layers": layers,
            "program": format!("caft-fast {}", env!("CARGO_PKG_VERSION")),
        });
        crate::io::write_json(j, &v)?;
        eprintln!("wrote {}", j.display());
    }
    report(&a.output, &chosen);
    Ok(())
}

fn run_import(a: &ImportArgs) -> Result<()> {
    let loaded = match &a.model {
        Some(m) => Some(load_model(m)?),
        None => None,
    };
    let d_model = loaded.as_ref().map(|l| l.config.hidden_size).or(a.d_model);
    let n_layers = loaded.as_ref().map(|l| l.config.num_layers);
    let dirs = match (&a.npy, &a.from) {
        (Some(npy), None) => {
            let layer = a.layer.unwrap_or_default();
            let Some(d) = d_model else {
                bail!("importing a .npy file needs --model or --d-model (the expected width)");
            };
            load_directions(npy, Some(layer), d, n_layers.unwrap_or(usize::MAX))?
        }
        (None, Some(from)) => {
            let pattern = a.rename.as_deref().unwrap_or("layer.{L}");
            select::import_renamed(from, pattern, d_model, n_layers)?
        }
        _ => bail!("give exactly one of --npy FILE --layer L, or --from FILE --rename PATTERN"),
    };
    save_directions(&a.output, &dirs)?;
    report(&a.output, &dirs);
    Ok(())
}

fn explain_impl<B: Backend>(be: &B, a: &ExplainArgs, loaded: &LoadedModel) -> Result<()> {
    use crate::directions::explain;
    let cfg = loaded.config.clone();
    let dirs = explain::read_directions(&a.directions, cfg.hidden_size, cfg.num_layers)?;
    let mut examples = explain::load_corpus(&a.corpus, loaded, a.max_seq_len)?;
    if let Some(m) = a.max_texts {
        examples.truncate(m.max(1));
    }
    let opt = explain::ExplainOptions {
        top: a.top,
        before: a.before,
        after: a.after,
        batch_size: a.batch_size,
        skip_first: a.skip_first,
    };
    let mut model = Model::new(be, cfg, loaded.weights.as_ref())?;
    let n_batches = examples.len().div_ceil(a.batch_size.max(1));
    let bar = progress(n_batches as u64, "explain");
    let t0 = std::time::Instant::now();
    let (layers, tokens) = explain::explain(
        be,
        &mut model,
        &examples,
        &dirs,
        loaded.tokenizer.as_ref(),
        &opt,
        |i| bar.set_position(i as u64),
    )?;
    bar.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    let report = explain::Report {
        model: loaded.source.display().to_string(),
        directions: a.directions.display().to_string(),
        corpus: a.corpus.display().to_string(),
        examples: examples.len(),
        tokens,
        skip_first: a.skip_first,
        layers,
    };
    explain::write_report(&a.output, &report)?;
    let n_dirs: usize = dirs.iter().map(|l| l.k).sum();
    eprintln!(
        "wrote {}/index.html and summary.json: {n_dirs} directions at {} layers over {tokens} \
         tokens of {} texts ({secs:.1} s, {:.0} tokens/s)",
        a.output.display(),
        dirs.len(),
        examples.len(),
        tokens as f64 / secs.max(1e-9)
    );
    Ok(())
}

fn sae_impl<B: Backend>(be: &B, a: &SaeArgs, loaded: &LoadedModel) -> Result<()> {
    use crate::directions::sae::{rank_latents, save, Sae};
    let mut saes = Vec::with_capacity(a.sae.len());
    for spec in &a.sae {
        let (l, f) = spec.split_once('=').with_context(|| {
            format!("--sae {spec:?}: expected LAYER=FILE, e.g. --sae 12=layer12.safetensors")
        })?;
        let layer: usize = l
            .trim()
            .parse()
            .with_context(|| format!("--sae {spec:?}: layer {l:?} is not a number"))?;
        let sae = Sae::load(Path::new(f), a.sae_arch.as_deref(), a.sae_k)?;
        let d = loaded.config.hidden_size;
        if sae.d != d {
            bail!(
                "{f}: the SAE for layer {layer} reads width {} but the model's d_model is {d} \
                 (an SAE of another model?)",
                sae.d
            );
        }
        saes.push((layer, sae));
    }
    // The fine-tune first: its errors come before any data is read.
    let mut pair = a.tuned.build(be, loaded)?;
    let (adapter, tuned_model) = a.tuned.shown();
    let (_, batches) = a.pass.batches(&a.data, loaded)?;
    let bar = progress(batches.len() as u64, "sae");
    let ranked = rank_latents(be, pair.as_mut(), &batches, &saes, a.top, |i| {
        bar.set_position(i as u64)
    })?;
    bar.finish_and_clear();
    let about = serde_json::json!({
        "kind": "sae latents ranked by the change of mean activation (fine-tune minus base)",
        "model": loaded.source.display().to_string(),
        "adapter": adapter,
        "tuned_model": tuned_model,
        "data": a.data.display().to_string(),
        "saes": a.sae,
        "tokens": ranked.first().map(|r| r.tokens),
        "program": format!("caft-fast {}", env!("CARGO_PKG_VERSION")),
    });
    save(&a.output, &ranked, &about)?;
    for r in &ranked {
        let show: Vec<String> = r
            .latents
            .iter()
            .zip(&r.scores)
            .take(5)
            .map(|(j, s)| format!("{j} ({s:+.3})"))
            .collect();
        eprintln!("layer {}: top latents {}", r.layer, show.join(", "));
    }
    eprintln!("wrote {}", a.output.display());
    Ok(())
}

fn sae_train_impl<B: Backend>(be: &B, a: &SaeTrainArgs, loaded: &LoadedModel) -> Result<()> {
    use crate::directions::sae_train::{save, save_jumprelu, train, train_jumprelu};
    use crate::directions::sae_train::{JumpReluConfig, TrainConfig};
    let arch = a.arch.to_ascii_lowercase();
    if arch != "batchtopk" && arch != "jumprelu" {
        bail!("--arch {:?}: expected batchtopk or jumprelu", a.arch);
    }
    let cfg = loaded.config.clone();
    let d = cfg.hidden_size;
    if a.layer >= cfg.num_layers {
        bail!(
            "layer {} does not exist: the model has {} layers (0..{})",
            a.layer,
            cfg.num_layers,
            cfg.num_layers - 1
        );
    }
    let examples = crate::directions::explain::load_corpus(&a.corpus, loaded, a.max_seq_len)?;
    let batches = token_batches(&examples, a.batch_size, true);
    let mut model = Model::new(be, cfg, loaded.weights.as_ref())?;
    let t0 = std::time::Instant::now();
    let bar = progress(batches.len() as u64, "activations");
    let mut acts: Vec<f32> = Vec::new();
    for (i, tb) in batches.iter().enumerate() {
        if acts.len() >= a.max_tokens * d {
            break;
        }
        model.forward(be, &tb.batch, false)?;
        let x = model.resid_post(be, a.layer)?;
        for (&row, &(_, pos)) in tb.rows.iter().zip(&tb.origin) {
            if pos >= a.skip_first && acts.len() < a.max_tokens * d {
                acts.extend_from_slice(&x[row * d..(row + 1) * d]);
            }
        }
        bar.set_position(i as u64 + 1);
    }
    bar.finish_and_clear();
    if let Some(i) = acts.iter().position(|x| !x.is_finite()) {
        bail!(
            "layer {}: resid_post value {} is NaN or Inf",
            a.layer,
            i % d
        );
    }
    let n = acts.len() / d;
    let collect_s = t0.elapsed().as_secs_f64();
    let lr = a.lr.unwrap_or(2e-4 / (a.latents as f64 / 16384.0).sqrt());
    let batch = a.batch_tokens.min(n.max(1));
    let bar = progress(a.steps as u64, "sae");
    let t1 = std::time::Instant::now();
    let mut last = f64::NAN;
    let mut l0 = f64::NAN;
    let mut report = |step: usize, fvu: f64| {
        last = fvu;
        bar.set_position(step as u64);
        if step.is_multiple_of(100) {
            bar.set_message(format!("sae (unexplained {:.1}%)", 100.0 * fvu));
        }
    };
    let what = if arch == "batchtopk" {
        let tc = TrainConfig {
            m: a.latents,
            k: a.k,
            lr,
            batch,
            steps: a.steps,
            seed: a.seed,
        };
        let sae = train(&acts, d, &tc, &mut report)?;
        save(&a.output, &sae, a.k)?;
        format!("k = {}", a.k)
    } else {
        let jc = JumpReluConfig {
            m: a.latents,
            l0_coeff: a.l0_coeff,
            bandwidth: a.bandwidth,
            init_threshold: a.init_threshold,
            lr,
            batch,
            steps: a.steps,
            seed: a.seed,
        };
        let sae = train_jumprelu(&acts, d, &jc, |step, fvu, l| {
            l0 = l;
            report(step, fvu)
        })?;
        save_jumprelu(&a.output, &sae)?;
        format!("jumprelu, λ = {}, last L0 {l0:.1}", a.l0_coeff)
    };
    bar.finish_and_clear();
    eprintln!(
        "wrote {}: {} latents, {what}, trained on {n} tokens of layer {} ({:.1} s collecting, \
         {:.1} s training {} steps, lr {lr:.2e}); last batch left {:.2}% of the variance \
         unexplained",
        a.output.display(),
        a.latents,
        a.layer,
        collect_s,
        t1.elapsed().as_secs_f64(),
        a.steps,
        100.0 * last
    );
    Ok(())
}

fn pca_impl<B: Backend>(be: &B, a: &PcaArgs, loaded: &LoadedModel) -> Result<()> {
    // Several ranks (`--gpus`, torchrun): each forwards its share of the batches.
    let dist = Dist::from_env()?;
    crate::dist::join(be, &dist, crate::dist::args_fingerprint())?;
    let cfg = loaded.config.clone();
    let layers = parse_layers(&a.layers)?;
    pca::check_request(&layers, a.components, cfg.num_layers, cfg.hidden_size)?;
    // The fine-tune first: its errors come before any data is read.
    let mut pair = a.tuned.build(be, loaded)?;
    let (adapter, tuned_model) = a.tuned.shown();
    let (examples, batches) = a.pass.batches(&a.data, loaded)?;
    let bar = progress(batches.len() as u64, "pca");
    let r = pca::pca(be, pair.as_mut(), &batches, &layers, a.components, |i| {
        bar.set_position(i as u64)
    })?;
    bar.finish_and_clear();
    let about = serde_json::json!({
        "kind": "pca of resid_post differences (fine-tune minus base)",
        "model": loaded.source.display().to_string(),
        "adapter": adapter,
        "tuned_model": tuned_model,
        "data": a.data.display().to_string(),
        "examples": examples.len(),
        "tokens": r.tokens,
        "tokens_selected": if a.pass.all_tokens { "all" } else { "answer" },
        "layers": layers,
        "components": a.components,
        "backend": be.name(),
        "program": format!("caft-fast {}", env!("CARGO_PKG_VERSION")),
        "total_variance": r.layers.iter().map(|l| l.total_variance).collect::<Vec<_>>(),
    });
    if !dist.world.is_main() {
        return Ok(());
    }
    pca::save(&a.output, &r, &about)?;
    eprint!("{}", pca::summary(&r));
    if r.tokens as usize <= a.components {
        eprintln!(
            "note: {} tokens give at most {} components with variance; the rest are arbitrary \
             orthonormal completions (give more data)",
            r.tokens,
            r.tokens - 1
        );
    }
    let fwd_tps = 2.0 * r.tokens_forwarded as f64 / r.forward_s.max(1e-9);
    eprintln!(
        "wrote {}: {} layers x {} components from {} tokens of {} examples \
         ({:.1} s in forward passes, {:.0} padded tokens/s per forward pass; \
         {:.2} s accumulating the covariance; {:.2} s eigensolver)",
        a.output.display(),
        layers.len(),
        a.components,
        r.tokens,
        examples.len(),
        r.forward_s,
        fwd_tps,
        r.accumulate_s,
        r.eigen_s
    );
    Ok(())
}
