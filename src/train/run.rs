//! The CAFT training run: data, LoRA, ablation, the optimizer loop, validation, checkpoints and
//! the output folder, generic over the backend.
//!
//! [`Trainer`] is the loop's state and one optimizer step at a time (what tests drive);
//! [`run`] is the whole command around it (logging, metrics, checkpoints, Ctrl-C, outputs).
//!
//! One optimizer step takes `grad_accum` micro-batches of `batch_size` examples from the
//! epoch's length-grouped plan (the last step of an epoch may take fewer); the loss is
//! `Σ CE / N` with `N` the label tokens of the whole step, so accumulation equals one large
//! batch. Everything a step depends on is in the checkpoint (LoRA parameters, AdamW moments,
//! step, epoch plan and position), so a resumed run repeats an uninterrupted one bit for bit.

use crate::backend::Backend;
use crate::data::{self, Dataset, Encoder, Example, Record};
use crate::io::{file_sha256, program, sha256_hex, write_atomic};
use crate::model::ablation::{load_directions, random_directions, Directions};
use crate::model::loader::LoadedModel;
use crate::model::lora::{LoraConfig, LoraLayout, Target};
use crate::model::transformer::{Batch, Model};
use crate::train::checkpoint::{self, Checkpoint, TrainerState, CHECKPOINTS_DIR};
use crate::train::config::TrainConfig;
use crate::train::optim::{optimizer_step, OptimConfig, Schedule};
use anyhow::{bail, Context, Result};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// The tokenized training and validation sets of a run.
#[derive(Clone, Debug)]
pub struct Prepared {
    pub train: Vec<Example>,
    pub val: Vec<Example>,
    /// The training file, or `built-in` for the demonstration data.
    pub source: String,
    /// SHA-256 of the training (and validation) file bytes; `None` for built-in data.
    pub file_sha256: Option<String>,
    pub val_file_sha256: Option<String>,
    /// Records read, examples truncated at `max_seq_len`, examples dropped (no label token
    /// left), over both files.
    pub records: usize,
    pub truncated: usize,
    pub dropped: usize,
    pub pad_id: u32,
}

impl Prepared {
    pub fn train_fingerprint(&self) -> String {
        data::fingerprint(&self.train)
    }
    pub fn val_fingerprint(&self) -> String {
        data::fingerprint(&self.val)
    }
}

/// Read and tokenize the run's data (all of it, up front: the loop never waits on it).
pub fn prepare_data(cfg: &TrainConfig, loaded: &LoadedModel) -> Result<Prepared> {
    let enc = Encoder {
        tokenizer: loaded.tokenizer.as_ref(),
        template: loaded.chat_template.as_ref(),
        model: loaded.source.display().to_string(),
        vocab_size: loaded.config.vocab_size,
        train_on: cfg.train_on,
        max_seq_len: cfg.max_seq_len,
    };
    let (train, source, sha) = match &cfg.data {
        Some(p) => (
            Dataset::load(p, &enc)?,
            p.display().to_string(),
            Some(file_sha256(p)?),
        ),
        None => {
            let recs: Vec<(usize, Record)> = data::builtin_chat_dataset(cfg.examples, cfg.seed)
                .into_iter()
                .enumerate()
                .map(|(i, m)| (i + 1, Record::Chat(m)))
                .collect();
            let d = Dataset::from_records(&recs, &enc, "built-in data (record")
                .context("the built-in demonstration data needs a model with a tokenizer and a chat template; give --data")?;
            (d, "built-in".to_string(), None)
        }
    };
    let empty = |d: &Dataset, what: &str, src: &str| -> Result<()> {
        if d.examples.is_empty() {
            bail!(
                "{src}: the {what} set is empty after filtering: {} records read, {} dropped \
                 because no trained (labelled) token is left within --max-seq-len {}",
                d.records,
                d.dropped,
                cfg.max_seq_len
            );
        }
        Ok(())
    };
    empty(&train, "training", &source)?;
    let (mut records, mut truncated, mut dropped) = (train.records, train.truncated, train.dropped);
    let (train_ex, val_ex, val_sha) = match &cfg.val_data {
        Some(p) => {
            let v = Dataset::load(p, &enc)?;
            empty(&v, "validation", &p.display().to_string())?;
            records += v.records;
            truncated += v.truncated;
            dropped += v.dropped;
            (train.examples, v.examples, Some(file_sha256(p)?))
        }
        None => {
            let (t, v) = data::split_validation(train.examples, cfg.val_split, cfg.seed);
            (t, v, None)
        }
    };
    let pad_id = loaded
        .tokenizer
        .as_ref()
        .and_then(|t| t.eos_token_id())
        .or_else(|| loaded.config.eos_token_ids.first().copied())
        .unwrap_or(0);
    Ok(Prepared {
        train: train_ex,
        val: val_ex,
        source,
        file_sha256: sha,
        val_file_sha256: val_sha,
        records,
        truncated,
        dropped,
        pad_id,
    })
}

/// The directions the configuration asks for, validated against the model (`None`: no
/// ablation).
pub fn ablation_directions(cfg: &TrainConfig, loaded: &LoadedModel) -> Result<Option<Directions>> {
    let mc = &loaded.config;
    match (&cfg.ablate, cfg.ablate_random) {
        (Some(_), Some(_)) => bail!("give either --ablate FILE or --ablate-random K, not both"),
        (Some(f), None) => {
            let d = load_directions(f, None, mc.hidden_size, mc.num_layers).with_context(|| {
                format!(
                    "directions for {} ({} layers, width {})",
                    loaded.source.display(),
                    mc.num_layers,
                    mc.hidden_size
                )
            })?;
            Ok(Some(match &cfg.ablate_layers {
                Some(l) => d.restrict(l)?,
                None => d,
            }))
        }
        (None, Some(k)) => {
            let layers = cfg
                .ablate_layers
                .as_ref()
                .context("--ablate-random needs --ablate-layers")?;
            if let Some(&l) = layers.iter().find(|&&l| l >= mc.num_layers) {
                bail!(
                    "ablation layer {l} is out of range: {} has {} layers (0..{})",
                    loaded.source.display(),
                    mc.num_layers,
                    mc.num_layers - 1
                );
            }
            Ok(Some(random_directions(
                cfg.seed,
                k,
                mc.hidden_size,
                layers,
            )?))
        }
        (None, None) => Ok(None),
    }
}

/// A SHA-256 of the model's architecture and shapes: a checkpoint resumes only on the same.
pub fn model_fingerprint(loaded: &LoadedModel) -> String {
    sha256_hex(format!("{:?}", loaded.config).as_bytes())
}

/// The loss became NaN or infinite: the run stops, nothing is updated with it.
#[derive(Debug)]
pub struct Diverged {
    /// The step that failed (1-based).
    pub step: u64,
    pub what: String,
}

impl std::fmt::Display for Diverged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the run diverged at step {}: {} (NaN or Inf); the parameters were not updated with it",
            self.step, self.what
        )
    }
}

impl std::error::Error for Diverged {}

/// What one optimizer step did.
#[derive(Clone, Copy, Debug)]
pub struct StepStats {
    /// 1-based step number.
    pub step: u64,
    /// Mean cross-entropy per label token over the step.
    pub loss: f64,
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Label tokens and all non-padding tokens of the step.
    pub label_tokens: usize,
    pub tokens: usize,
    pub seconds: f64,
}

/// Validation losses: with the ablation as in training, and (when there is an ablation)
/// without it, as the adapter is used at inference.
#[derive(Clone, Copy, Debug)]
pub struct ValLoss {
    pub ablated: f64,
    pub unablated: Option<f64>,
}

/// The training loop's state.
pub struct Trainer<'a, B: Backend> {
    be: &'a B,
    pub model: Model<B>,
    pub layout: LoraLayout,
    pub opt: OptimConfig,
    pub data: Prepared,
    pub state: TrainerState,
    pub directions: Option<Directions>,
    lengths: Vec<usize>,
    batch_size: usize,
    grad_accum: usize,
    seed: u64,
    val_batches: Vec<Batch>,
}

impl<'a, B: Backend> Trainer<'a, B> {
    /// Load the model onto `be`, attach fresh LoRA adapters and the ablation.
    pub fn new(
        be: &'a B,
        cfg: &TrainConfig,
        loaded: &LoadedModel,
        data: Prepared,
        directions: Option<Directions>,
    ) -> Result<Self> {
        let mc = loaded.config.clone();
        let mut model = Model::new(be, mc.clone(), loaded.weights.as_ref())?;
        let layout = LoraLayout::new(
            &mc,
            &LoraConfig {
                r: cfg.lora_r,
                alpha: cfg.lora_alpha,
                rslora: cfg.rslora,
                targets: Target::parse_list(&cfg.lora_targets)?,
            },
        )?;
        model.set_lora(be, layout.clone(), &layout.init_params(cfg.seed))?;
        if let Some(d) = &directions {
            model.set_ablation(be, d)?;
        }
        let lengths: Vec<usize> = data.train.iter().map(|e| e.ids.len()).collect();
        let plan = data::plan_epoch(&lengths, cfg.batch_size, cfg.seed, 0);
        let steps_per_epoch = plan.len().div_ceil(cfg.grad_accum) as u64;
        let total = cfg.max_steps.unwrap_or(steps_per_epoch * cfg.epochs as u64);
        let opt = OptimConfig {
            lr: cfg.lr,
            weight_decay: cfg.weight_decay,
            warmup_steps: cfg.warmup_steps,
            total_steps: total,
            max_grad_norm: (cfg.max_grad_norm > 0.0).then_some(cfg.max_grad_norm),
            schedule: Schedule::parse(&cfg.schedule)?,
            ..OptimConfig::default()
        };
        let val_batches = data::validation_batches(&data.val, cfg.batch_size, data.pad_id);
        let state = TrainerState {
            format: 1,
            program: program(),
            step: 0,
            total_steps: total,
            epoch: 0,
            next_micro: 0,
            plan,
            tokens: 0,
            elapsed_s: 0.0,
            model_fingerprint: model_fingerprint(loaded),
            data_fingerprint: data.train_fingerprint(),
            val_fingerprint: data.val_fingerprint(),
            directions_sha256: directions.as_ref().map(|d| d.sha256.clone()),
            config: cfg.clone(),
        };
        Ok(Trainer {
            be,
            model,
            layout,
            opt,
            data,
            state,
            directions,
            lengths,
            batch_size: cfg.batch_size,
            grad_accum: cfg.grad_accum,
            seed: cfg.seed,
            val_batches,
        })
    }

    /// Optimizer steps per epoch.
    pub fn steps_per_epoch(&self) -> u64 {
        self.lengths
            .len()
            .div_ceil(self.batch_size)
            .div_ceil(self.grad_accum) as u64
    }

    pub fn done(&self) -> bool {
        self.state.step >= self.state.total_steps
    }

    /// Continue from `ck`, after checking that it belongs to this run: the same model, data,
    /// directions and training configuration (each mismatch is named).
    pub fn restore(&mut self, ck: &Checkpoint) -> Result<()> {
        self.check_resumable(&ck.state, &ck.dir)?;
        let s = &ck.state;
        let be = self.be;
        let lora = self.model.lora.as_mut().context("LoRA is not set")?;
        lora.params = be.upload_f32(&ck.params)?;
        lora.m = be.upload_f32(&ck.m)?;
        lora.v = be.upload_f32(&ck.v)?;
        be.zero_f32(&mut lora.grads)?;
        lora.step = s.step;
        // Keep this session's view of non-training settings (device, cadence), the stored
        // progress.
        let config = self.state.config.clone();
        self.state = s.clone();
        self.state.config = config;
        self.state.program = program();
        Ok(())
    }

    /// Check that checkpoint state `s` (from folder `dir`) belongs to this run, before any of
    /// its tensors are read.
    pub fn check_resumable(&self, s: &TrainerState, dir: &Path) -> Result<()> {
        let at = dir.display();
        let diffs = self.state.config.training_differences(&s.config)?;
        if !diffs.is_empty() {
            bail!(
                "{at} was trained with another configuration; resume with the same settings \
                 (or start a new run):\n  {}",
                diffs.join("\n  ")
            );
        }
        let checks = [
            ("model", &self.state.model_fingerprint, &s.model_fingerprint),
            (
                "training data",
                &self.state.data_fingerprint,
                &s.data_fingerprint,
            ),
            (
                "validation data",
                &self.state.val_fingerprint,
                &s.val_fingerprint,
            ),
        ];
        for (what, now, then) in checks {
            if now != then {
                bail!(
                    "{at}: the {what} differs from the one this checkpoint was trained on \
                     (fingerprint {} now, {} then)",
                    &now[..12.min(now.len())],
                    &then[..12.min(then.len())]
                );
            }
        }
        if self.state.directions_sha256 != s.directions_sha256 {
            bail!(
                "{at}: the ablated directions differ from the checkpoint's (sha256 {:?} now, {:?} then)",
                self.state.directions_sha256,
                s.directions_sha256
            );
        }
        if s.total_steps != self.state.total_steps {
            bail!(
                "{at}: the run has {} steps now but {} in the checkpoint",
                self.state.total_steps,
                s.total_steps
            );
        }
        if s.next_micro > s.plan.len()
            || s.plan
                .iter()
                .flatten()
                .any(|&i| i as usize >= self.lengths.len())
        {
            bail!("{at}: the stored data order does not fit the training set");
        }
        Ok(())
    }

    /// One optimizer step. A NaN or infinite loss or gradient returns [`Diverged`] before any
    /// parameter changes.
    pub fn step(&mut self) -> Result<StepStats> {
        let t = Instant::now();
        let be = self.be;
        if self.state.next_micro >= self.state.plan.len() {
            self.state.epoch += 1;
            self.state.plan =
                data::plan_epoch(&self.lengths, self.batch_size, self.seed, self.state.epoch);
            self.state.next_micro = 0;
        }
        let start = self.state.next_micro;
        let end = (start + self.grad_accum).min(self.state.plan.len());
        let micro: Vec<Batch> = self.state.plan[start..end]
            .iter()
            .map(|idx| data::make_batch(&self.data.train, idx, self.data.pad_id))
            .collect();
        let tokens: usize = self.state.plan[start..end]
            .iter()
            .flatten()
            .map(|&i| self.lengths[i as usize])
            .sum();
        let n_step: usize = micro.iter().map(|m| m.n_targets()).sum();
        let step = self.state.step + 1;
        let mut loss_sum = 0.0;
        for m in &micro {
            loss_sum += self
                .model
                .forward_backward(be, m, 1.0 / n_step.max(1) as f32)
                .with_context(|| {
                    format!(
                        "step {step}: forward/backward of a {}x{} batch",
                        m.batch, m.seq
                    )
                })?
                .loss_sum;
        }
        let loss = loss_sum / n_step.max(1) as f64;
        let lora = self.model.lora.as_mut().context("LoRA is not set")?;
        let diverged = |what: String| -> anyhow::Error { Diverged { step, what }.into() };
        if !loss.is_finite() {
            be.zero_f32(&mut lora.grads)?;
            return Err(diverged(format!("the loss is {loss}")));
        }
        let g2 = be
            .sum_squares(&lora.grads)
            .with_context(|| format!("step {step}: gradient norm"))?;
        if !g2.is_finite() {
            be.zero_f32(&mut lora.grads)?;
            return Err(diverged(format!("the gradient norm is {}", g2.sqrt())));
        }
        let mut update = || -> Result<_> {
            let rep = optimizer_step(be, lora, &self.opt)?;
            be.synchronize()?;
            Ok(rep)
        };
        let rep = update().with_context(|| format!("step {step}: optimizer update"))?;
        self.state.step = step;
        self.state.next_micro = end;
        self.state.tokens += n_step as u64;
        let seconds = t.elapsed().as_secs_f64();
        self.state.elapsed_s += seconds;
        Ok(StepStats {
            step,
            loss,
            lr: rep.lr,
            grad_norm: rep.grad_norm,
            label_tokens: n_step,
            tokens,
            seconds,
        })
    }

    pub fn has_validation(&self) -> bool {
        !self.val_batches.is_empty()
    }

    /// Mean cross-entropy per label token over the validation set (`None` without one).
    pub fn validate(&mut self) -> Result<Option<ValLoss>> {
        if self.val_batches.is_empty() {
            return Ok(None);
        }
        let be = self.be;
        let eval = |model: &mut Model<B>| -> Result<f64> {
            let (mut s, mut n) = (0.0, 0usize);
            for b in &self.val_batches {
                let out = model.forward(be, b, false).context("validation forward")?;
                s += out.loss_sum;
                n += out.n_targets;
            }
            Ok(s / n.max(1) as f64)
        };
        let ablated = eval(&mut self.model)?;
        let unablated = if self.directions.is_some() {
            self.model.ablate = false;
            let r = eval(&mut self.model);
            self.model.ablate = true;
            Some(r?)
        } else {
            None
        };
        Ok(Some(ValLoss { ablated, unablated }))
    }

    /// The LoRA parameters now (host copy).
    pub fn params(&self) -> Result<Vec<f32>> {
        let lora = self.model.lora.as_ref().context("LoRA is not set")?;
        self.be.download_f32(&lora.params)
    }

    /// Write a checkpoint of the current state under `run_dir/checkpoints/`.
    pub fn save_checkpoint(&self, run_dir: &Path, base_model: &str) -> Result<PathBuf> {
        let lora = self.model.lora.as_ref().context("LoRA is not set")?;
        let be = self.be;
        checkpoint::save(
            &run_dir.join(CHECKPOINTS_DIR),
            &self.state,
            &self.layout,
            &be.download_f32(&lora.params)?,
            &be.download_f32(&lora.m)?,
            &be.download_f32(&lora.v)?,
            base_model,
        )
    }
}

// ---------------------------------------------------------------------------------------------
// The command around the loop.

/// Set by the Ctrl-C handler; the loop saves a checkpoint and stops at the next step boundary.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Install the Ctrl-C handler once per process: the first Ctrl-C asks for a clean stop, a
/// second one exits at once (status 130, as a shell reports SIGINT).
fn install_interrupt_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let r = ctrlc::set_handler(|| {
            if INTERRUPTED.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!(
                "\ninterrupt: saving a checkpoint after this step (Ctrl-C again to quit now)"
            );
        });
        if let Err(e) = r {
            // The host program owns SIGINT (e.g. an embedding application): run without.
            eprintln!("note: Ctrl-C will not save a checkpoint ({e})");
        }
    });
}

/// How a run ended without an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// All steps done; adapter written.
    Completed,
    /// Stopped by `--stop-after`; a checkpoint was saved.
    Stopped,
    /// Stopped by Ctrl-C; a checkpoint was saved.
    Interrupted,
}

/// Run-level options that are not training configuration.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// The checkpoint to continue from (its run folder is the output folder).
    pub resume: Option<PathBuf>,
    /// Replace the files of an existing output folder.
    pub overwrite: bool,
    /// Save a checkpoint and stop after this many steps in total.
    pub stop_after: Option<u64>,
}

/// Every file or folder a run writes in its output folder (what `--overwrite` replaces).
const OUTPUTS: &[&str] = &[
    "adapter",
    "merged",
    CHECKPOINTS_DIR,
    "metrics.jsonl",
    "loss.svg",
    "run.json",
    "config.toml",
];

/// Make the output folder ready for a new run (nothing else in it is touched).
fn prepare_output(out: &Path, overwrite: bool) -> Result<()> {
    if out.exists() {
        if !overwrite {
            bail!(
                "output folder {} exists; pass --overwrite to replace it (or --resume {} to continue it)",
                out.display(),
                out.display()
            );
        }
        if !out.is_dir() {
            bail!("output {} exists and is not a folder", out.display());
        }
        for name in OUTPUTS {
            let p = out.join(name);
            if p.is_dir() {
                std::fs::remove_dir_all(&p).with_context(|| format!("removing {}", p.display()))?;
            } else if p.exists() {
                std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
            }
        }
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))
}

/// Metrics lines of an earlier session up to `step` (a resumed run redoes the later ones).
fn metrics_up_to(path: &Path, step: u64) -> Result<String> {
    if !path.exists() {
        return Ok(String::new());
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = String::new();
    for line in text.lines() {
        let s = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v.get("step").and_then(|s| s.as_u64()));
        if matches!(s, Some(s) if s <= step) {
            out.push_str(line);
            out.push('\n');
        }
    }
    Ok(out)
}

/// A plotted series: (step, loss) points.
type Curve = Vec<(u64, f64)>;

/// (step, loss) and (step, val_loss) series of a metrics file, for the plot.
fn read_curves(text: &str) -> (Curve, Curve) {
    let (mut tr, mut va) = (Vec::new(), Vec::new());
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(step) = v.get("step").and_then(|s| s.as_u64()) else {
            continue;
        };
        if let Some(l) = v.get("loss").and_then(|l| l.as_f64()) {
            tr.push((step, l));
        }
        if let Some(l) = v.get("val_loss").and_then(|l| l.as_f64()) {
            va.push((step, l));
        }
    }
    (tr, va)
}

/// `every` resolved: `None` = about ten times per run, `0` = never (only at the end).
fn cadence(every: Option<u64>, total: u64) -> Option<u64> {
    match every {
        None => Some(total.div_ceil(10).max(1)),
        Some(0) => None,
        Some(n) => Some(n),
    }
}

/// Everything the run folder records about a run (`run.json`).
#[allow(clippy::too_many_arguments)]
fn run_record<B: Backend>(
    tr: &Trainer<B>,
    cfg: &TrainConfig,
    loaded: &LoadedModel,
    be_name: &str,
    status: &str,
    last: Option<&StepStats>,
    val: Option<ValLoss>,
    outputs: serde_json::Value,
) -> serde_json::Value {
    let d = &tr.data;
    let dir = tr.directions.as_ref();
    let tok = |ex: &[Example]| -> (usize, usize) {
        ex.iter()
            .fold((0, 0), |(t, l), e| (t + e.ids.len(), l + e.n_targets()))
    };
    let (train_tokens, train_labels) = tok(&d.train);
    serde_json::json!({
        "program": program(),
        "status": status,
        "config": cfg,
        "model": {
            "source": loaded.source.display().to_string(),
            "arch": format!("{:?}", loaded.config.arch),
            "layers": loaded.config.num_layers,
            "hidden_size": loaded.config.hidden_size,
            "fingerprint": tr.state.model_fingerprint,
        },
        "backend": be_name,
        "data": {
            "source": d.source,
            "sha256": d.file_sha256,
            "val_source": cfg.val_data.as_ref().map(|p| p.display().to_string()),
            "val_sha256": d.val_file_sha256,
            "records": d.records,
            "train_examples": d.train.len(),
            "val_examples": d.val.len(),
            "truncated": d.truncated,
            "dropped": d.dropped,
            "train_tokens": train_tokens,
            "train_label_tokens": train_labels,
            "fingerprint": tr.state.data_fingerprint,
        },
        "directions": dir.map(|d| serde_json::json!({
            "source": d.source,
            "sha256": d.sha256,
            "layers": d.layers(),
            "k": d.sets.iter().map(|s| s.k).collect::<Vec<_>>(),
        })),
        "lora_parameters": tr.layout.len,
        "steps": tr.state.step,
        "total_steps": tr.state.total_steps,
        "epoch": tr.state.epoch,
        "label_tokens_trained": tr.state.tokens,
        "train_seconds": tr.state.elapsed_s,
        "final_loss": last.map(|s| s.loss),
        "final_val_loss": val.map(|v| v.ablated),
        "final_val_loss_unablated": val.and_then(|v| v.unablated),
        "peak_rss_mb": crate::util::peak_rss_mib(),
        "device_mem_mb": tr.be.device_memory_used_mib(),
        "outputs": outputs,
    })
}

/// Run the `train` command on `be`: `cfg` is final (defaults, file and flags resolved, and for
/// a resumed run checked against the checkpoint by [`Trainer::restore`]).
pub fn run<B: Backend>(
    be: &B,
    cfg: &TrainConfig,
    loaded: &LoadedModel,
    opts: &RunOptions,
) -> Result<Outcome> {
    // Everything that can fail on bad input happens before the output folder is touched.
    let directions = ablation_directions(cfg, loaded)?;
    let data = prepare_data(cfg, loaded)?;
    let t_load = Instant::now();
    let mut tr = Trainer::new(be, cfg, loaded, data, directions)?;
    let base_model = loaded.source.display().to_string();
    let out = cfg.output.clone();
    let metrics_path = out.join("metrics.jsonl");
    let mut metrics = match &opts.resume {
        Some(ck_dir) => {
            tr.check_resumable(&checkpoint::load_state(ck_dir)?, ck_dir)?;
            let ck = checkpoint::load(ck_dir, &tr.layout)?;
            tr.restore(&ck)?;
            metrics_up_to(&metrics_path, tr.state.step)?
        }
        None => {
            prepare_output(&out, opts.overwrite)?;
            String::new()
        }
    };
    write_atomic(&metrics_path, metrics.as_bytes())?;
    write_atomic(&out.join("config.toml"), cfg.to_toml()?.as_bytes())?;
    let mut metrics_file = std::fs::OpenOptions::new()
        .append(true)
        .open(&metrics_path)
        .with_context(|| format!("opening {}", metrics_path.display()))?;

    let total = tr.state.total_steps;
    let eval_every = cadence(cfg.eval_every, total);
    let save_every = cadence(cfg.save_every, total);
    let (n_tok, n_lab) = tr
        .data
        .train
        .iter()
        .fold((0, 0), |(t, l), e| (t + e.ids.len(), l + e.n_targets()));
    eprintln!(
        "training {} on {} (loaded in {:.1} s)\n  data: {} — {} train / {} validation examples, \
         {n_tok} tokens ({n_lab} trained), {} truncated at {} tokens, {} dropped\n  \
         {total} steps ({} per epoch) of {} x {} sequences; lr {:.1e} {} (warmup {}); \
         LoRA r={} alpha={} {}on {}\n  ablation: {}",
        loaded.source.display(),
        be.name(),
        t_load.elapsed().as_secs_f64(),
        tr.data.source,
        tr.data.train.len(),
        tr.data.val.len(),
        tr.data.truncated,
        cfg.max_seq_len,
        tr.data.dropped,
        tr.steps_per_epoch(),
        cfg.batch_size,
        cfg.grad_accum,
        cfg.lr,
        cfg.schedule,
        cfg.warmup_steps,
        cfg.lora_r,
        cfg.lora_alpha,
        if cfg.rslora { "(rsLoRA) " } else { "" },
        cfg.lora_targets,
        match &tr.directions {
            Some(d) => format!(
                "layers {:?}, k = {:?} ({}, sha256 {})",
                d.layers(),
                d.sets.iter().map(|s| s.k).collect::<Vec<_>>(),
                d.source,
                &d.sha256[..12]
            ),
            None => "off".into(),
        }
    );
    if opts.resume.is_some() {
        eprintln!(
            "  resuming at step {} of {total} (epoch {}, micro-batch {} of {})",
            tr.state.step,
            tr.state.epoch,
            tr.state.next_micro,
            tr.state.plan.len()
        );
    }

    INTERRUPTED.store(false, Ordering::SeqCst);
    install_interrupt_handler();
    let tty = std::io::stderr().is_terminal();
    let bar = if tty {
        let b = indicatif::ProgressBar::new(total).with_position(tr.state.step);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:20.cyan/blue} {pos}/{len} [{elapsed_precise} ETA {eta_precise}] {wide_msg}",
            )
            .map_err(|e| anyhow::anyhow!("progress bar template: {e}"))?
            .progress_chars("=> "),
        );
        b.reset_eta();
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let say = |msg: String| {
        if tty {
            bar.println(msg)
        } else {
            eprintln!("{msg}")
        }
    };

    let mut last: Option<StepStats> = None;
    let mut last_val: Option<ValLoss> = None;
    let mut last_ckpt: Option<PathBuf> = checkpoint::list(&out)?.pop().map(|(_, p)| p);
    let save = |tr: &Trainer<B>, last_ckpt: &mut Option<PathBuf>| -> Result<()> {
        let p = tr.save_checkpoint(&out, &base_model)?;
        checkpoint::prune(&out, cfg.keep_checkpoints)?;
        *last_ckpt = Some(p);
        Ok(())
    };
    let outcome = loop {
        if tr.done() {
            break Outcome::Completed;
        }
        let st = match tr.step() {
            Ok(s) => s,
            Err(e) => {
                bar.abandon();
                let diverged = e.downcast_ref::<Diverged>().is_some();
                let status = if diverged { "diverged" } else { "failed" };
                let (t, v) = read_curves(&metrics);
                let _ = write_atomic(
                    &out.join("loss.svg"),
                    crate::report::loss::loss_svg(&format!("{} ({status})", out.display()), &t, &v)
                        .as_bytes(),
                );
                let rec = run_record(
                    &tr,
                    cfg,
                    loaded,
                    &be.name(),
                    status,
                    last.as_ref(),
                    last_val,
                    serde_json::json!({
                        "checkpoint": last_ckpt.as_ref().map(|p| p.display().to_string()),
                        "metrics": "metrics.jsonl",
                    }),
                );
                let _ = write_atomic(
                    &out.join("run.json"),
                    &serde_json::to_vec_pretty(&rec).unwrap_or_default(),
                );
                let keep = match &last_ckpt {
                    Some(p) => format!(
                        "the last good checkpoint is {} (resume with --resume {}{})",
                        p.display(),
                        p.display(),
                        if diverged {
                            ", perhaps after lowering --lr"
                        } else {
                            ""
                        }
                    ),
                    None => "no checkpoint was saved before it (see --save-every)".into(),
                };
                return Err(e.context(keep));
            }
        };
        let val = match eval_every {
            Some(n) if st.step % n == 0 || st.step == total => tr.validate()?,
            _ if st.step == total => tr.validate()?,
            _ => None,
        };
        let mut row = serde_json::json!({
            "step": st.step, "epoch": tr.state.epoch, "loss": st.loss, "lr": st.lr,
            "grad_norm": st.grad_norm, "tokens": st.tokens, "label_tokens": st.label_tokens,
            "tokens_per_s": st.tokens as f64 / st.seconds.max(1e-9),
            "step_s": st.seconds,
        });
        if let Some(v) = val {
            row["val_loss"] = v.ablated.into();
            if let Some(u) = v.unablated {
                row["val_loss_unablated"] = u.into();
            }
            last_val = Some(v);
        }
        let line = format!("{row}\n");
        metrics.push_str(&line);
        metrics_file
            .write_all(line.as_bytes())
            .and_then(|_| metrics_file.flush())
            .with_context(|| format!("writing {}", metrics_path.display()))?;
        let tps = st.tokens as f64 / st.seconds.max(1e-9);
        let msg = format!(
            "loss {:.4}  lr {:.2e}  grad-norm {:.3}  {tps:.0} tok/s{}",
            st.loss,
            st.lr,
            st.grad_norm,
            val.map(|v| format!("  val {:.4}", v.ablated))
                .unwrap_or_default()
        );
        if tty {
            bar.set_position(st.step);
            bar.set_message(msg);
        } else {
            eprintln!("step {}/{total}  {msg}", st.step);
        }
        last = Some(st);
        let interrupted = INTERRUPTED.load(Ordering::SeqCst);
        let stop = opts.stop_after.is_some_and(|n| st.step >= n);
        if tr.done() {
            break Outcome::Completed;
        }
        if interrupted || stop || save_every.is_some_and(|n| st.step % n == 0) {
            save(&tr, &mut last_ckpt)?;
            if let Some(p) = &last_ckpt {
                say(format!("  checkpoint {}", p.display()));
            }
            if interrupted || stop {
                break if interrupted {
                    Outcome::Interrupted
                } else {
                    Outcome::Stopped
                };
            }
        }
    };
    bar.finish_and_clear();

    // The end of the run (or of this session): the final checkpoint, then the outputs.
    let status = match outcome {
        Outcome::Completed => "completed",
        Outcome::Stopped => "stopped",
        Outcome::Interrupted => "interrupted",
    };
    if outcome == Outcome::Completed {
        let up_to_date = last_ckpt
            .as_ref()
            .is_some_and(|p| p.ends_with(checkpoint::step_dir_name(tr.state.step)));
        if !up_to_date {
            save(&tr, &mut last_ckpt)?;
        }
    }
    let (t, v) = read_curves(&metrics);
    let plot = out.join("loss.svg");
    write_atomic(
        &plot,
        crate::report::loss::loss_svg(
            &format!(
                "{} — {}",
                out.display(),
                tr.directions
                    .as_ref()
                    .map(|d| format!("ablating {}", d.source))
                    .unwrap_or_else(|| "no ablation".into())
            ),
            &t,
            &v,
        )
        .as_bytes(),
    )?;
    let mut outputs = serde_json::json!({
        "metrics": "metrics.jsonl",
        "plot": "loss.svg",
        "config": "config.toml",
        "checkpoint": last_ckpt.as_ref().map(|p| p.display().to_string()),
    });
    let adapter_dir = out.join("adapter");
    let merged_dir = out.join("merged");
    if outcome == Outcome::Completed {
        let params = tr.params()?;
        crate::model::peft::save_adapter(&adapter_dir, &tr.layout, &params, &base_model)?;
        outputs["adapter"] = "adapter".into();
        if cfg.merge {
            crate::train::merge::write_merged(&merged_dir, loaded, &tr.layout, &params)?;
            outputs["merged"] = "merged".into();
        }
    }
    let rec = run_record(
        &tr,
        cfg,
        loaded,
        &be.name(),
        status,
        last.as_ref(),
        last_val,
        outputs,
    );
    write_atomic(&out.join("run.json"), &serde_json::to_vec_pretty(&rec)?)?;

    let loss_note = match (&last, last_val) {
        (Some(s), Some(v)) => format!("final loss {:.4}, validation loss {:.4}", s.loss, v.ablated),
        (Some(s), None) => format!("final loss {:.4}", s.loss),
        _ => "no step run".into(),
    };
    match outcome {
        Outcome::Completed => {
            println!(
                "done: {} steps in {:.1} s, {loss_note}\n  adapter: {}\n  metrics: {}\n  plot:    {}\n  run:     {}{}",
                tr.state.step,
                tr.state.elapsed_s,
                adapter_dir.display(),
                metrics_path.display(),
                plot.display(),
                out.join("run.json").display(),
                if cfg.merge {
                    format!("\n  merged:  {}", merged_dir.display())
                } else {
                    String::new()
                }
            );
        }
        Outcome::Stopped | Outcome::Interrupted => {
            println!(
                "{status} at step {} of {total}, {loss_note}\n  checkpoint: {}\n  continue with: caft-fast train --resume {}",
                tr.state.step,
                last_ckpt.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
                out.display()
            );
        }
    }
    Ok(outcome)
}
