//! The state of a CAFT training run and one optimizer step at a time (what tests drive): the
//! data prepared up front, LoRA, ablation, validation, checkpoint save and restore, generic
//! over the backend. The command around it (logging, metrics, Ctrl-C, outputs) is `run.rs`.
//!
//! One optimizer step takes `grad_accum` micro-batches of `batch_size` examples from the
//! epoch's length-grouped plan (the last step of an epoch may take fewer); the loss is
//! `Σ CE / N` with `N` the label tokens of the whole step, so accumulation equals one large
//! batch. Everything a step depends on is in the checkpoint (LoRA parameters, AdamW moments,
//! step, epoch plan and position), so a resumed run repeats an uninterrupted one bit for bit.

use crate::backend::Backend;
use crate::data::{self, Dataset, Encoder, Example, Record};
use crate::dist::{self, World};
use crate::io::{file_sha256, program, sha256_hex};
use crate::model::ablation::{load_directions, random_directions, Directions};
use crate::model::full::Freeze;
use crate::model::loader::LoadedModel;
use crate::model::lora::{LoraConfig, LoraLayout, Target};
use crate::model::transformer::{Batch, Checkpointing, Model};
use crate::train::checkpoint::Trained;
use crate::train::checkpoint::{self, Checkpoint, TrainerState, CHECKPOINTS_DIR};
use crate::train::config::{Method, TrainConfig};
use crate::train::optim::{apply_step, OptimConfig, Schedule};
use crate::train::plan::{self, KnownData, Verdict};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
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
    if cfg.packing {
        data::check_token_budget(&train, &source, cfg.token_budget())?;
    }
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
    let pad_id = data::pad_id(loaded);
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
    pub be: &'a B,
    pub model: Model<B>,
    pub layout: LoraLayout,
    pub opt: OptimConfig,
    pub data: Prepared,
    pub state: TrainerState,
    pub directions: Option<Directions>,
    lengths: Vec<usize>,
    batch_size: usize,
    grad_accum: usize,
    /// Token budget of a packed micro-batch; `None` = padded micro-batches.
    packing: Option<usize>,
    seed: u64,
    val_batches: Vec<Batch>,
    /// The checkpointing mode in use (`auto` resolved).
    pub checkpointing: Checkpointing,
    /// The device-memory plan the run was checked against (GPU only).
    pub memory_plan: Option<Verdict>,
    /// This process's place in a data-parallel run ([`World::SINGLE`] alone): each rank takes
    /// its share of every step and of the validation batches, and the backend's group sums
    /// what the shares computed.
    pub world: World,
}

impl<'a, B: Backend> Trainer<'a, B> {
    /// Load the model onto `be`, attach fresh LoRA adapters (or full fine-tuning's state) and
    /// the ablation, as rank `world.rank` of `world.size` (the backend has joined their group;
    /// full fine-tuning on several ranks shards its optimizer state, ZeRO-1).
    pub fn new(
        be: &'a B,
        cfg: &TrainConfig,
        loaded: &LoadedModel,
        data: Prepared,
        directions: Option<Directions>,
        world: World,
    ) -> Result<Self> {
        let mc = loaded.config.clone();
        // The memory plan, before any weight reaches the device: refuse a run that cannot fit
        // and resolve `auto` (train/plan.rs).
        let mem = be.device_memory();
        let input = match mem {
            Some(m) => {
                let ks = directions
                    .as_ref()
                    .map(|d| d.sets.iter().map(|s| s.k).collect())
                    .unwrap_or_default();
                let lens = |ex: &[Example]| ex.iter().map(|e| e.ids.len()).collect::<Vec<_>>();
                let (train, val) = (lens(&data.train), lens(&data.val));
                let known = KnownData {
                    train: &train,
                    val: &val,
                };
                Some(plan::run_input(
                    cfg,
                    &mc,
                    ks,
                    Some(known),
                    m.act_bytes,
                    0,
                    world.size,
                )?)
            }
            None => None,
        };
        let (checkpointing, memory_plan) =
            plan::resolve(cfg.checkpointing, input, mem, &be.name())?;
        let mut model = Model::new(be, mc.clone(), loaded.weights.as_ref())?;
        model.checkpointing = checkpointing;
        let layout = LoraLayout::new(
            &mc,
            &LoraConfig {
                r: cfg.lora_r,
                alpha: cfg.lora_alpha,
                rslora: cfg.rslora,
                targets: Target::parse_list(&cfg.lora_targets)?,
            },
        )?;
        match cfg.method {
            Method::Lora => model.set_lora(be, layout.clone(), &layout.init_params(cfg.seed))?,
            Method::Full => model.set_full_sharded(
                be,
                loaded.weights.as_ref(),
                Freeze::parse(&cfg.freeze)?,
                Some((world.rank, world.size)),
            )?,
        }
        if let Some(d) = &directions {
            model.set_ablation(be, d)?;
        }
        let lengths: Vec<usize> = data.train.iter().map(|e| e.ids.len()).collect();
        let plan = data::plan_epoch(&lengths, cfg.batch_size, cfg.seed, 0);
        let steps_per_epoch = plan.len().div_ceil(cfg.grad_accum) as u64;
        let total = cfg.max_steps.unwrap_or(steps_per_epoch * cfg.epochs as u64);
        let opt = OptimConfig {
            lr: cfg.lr,
            beta1: cfg.adam_beta1,
            beta2: cfg.adam_beta2,
            eps: cfg.adam_eps,
            weight_decay: cfg.weight_decay,
            warmup_steps: crate::train::optim::warmup_steps(
                cfg.warmup_steps,
                cfg.warmup_ratio,
                total,
            ),
            total_steps: total,
            max_grad_norm: (cfg.max_grad_norm > 0.0).then_some(cfg.max_grad_norm),
            schedule: Schedule::parse(&cfg.schedule)?,
        };
        let val_batches = data::validation_batches_within(
            &data.val,
            cfg.batch_size,
            cfg.packing.then(|| cfg.token_budget()),
        );
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
            packing: cfg.packing.then(|| cfg.token_budget()),
            seed: cfg.seed,
            val_batches,
            checkpointing,
            memory_plan,
            world,
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
        self.model
            .upload_trained(self.be, &ck.params, &ck.m, &ck.v, s.step)?;
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
        let plan = &self.state.plan[start..end];
        let train = &self.data.train;
        // This rank's share of the step (all of it alone): the examples, token-balanced
        // across ranks, packed here; or whole padded micro-batches, balanced by their size.
        let (rank, ranks) = (self.world.rank, self.world.size);
        let micro: Vec<Batch> = match self.packing {
            Some(budget) => {
                let step_examples: Vec<u32> = plan.iter().flatten().copied().collect();
                let lens: Vec<usize> = step_examples
                    .iter()
                    .map(|&i| self.lengths[i as usize])
                    .collect();
                let mine: Vec<u32> = dist::balance(&lens, ranks)[rank]
                    .iter()
                    .map(|&k| step_examples[k])
                    .collect();
                data::pack_step(train, &mine, budget)
                    .iter()
                    .map(|idx| data::packed_batch(train, idx))
                    .collect()
            }
            None => {
                let sizes: Vec<usize> = plan
                    .iter()
                    .map(|idx| {
                        idx.len()
                            * idx
                                .iter()
                                .map(|&i| self.lengths[i as usize])
                                .max()
                                .unwrap_or(0)
                    })
                    .collect();
                dist::balance(&sizes, ranks)[rank]
                    .iter()
                    .map(|&k| data::make_batch(train, &plan[k], self.data.pad_id))
                    .collect()
            }
        };
        let tokens: usize = plan
            .iter()
            .flatten()
            .map(|&i| self.lengths[i as usize])
            .sum();
        // The loss is normalised by the labelled tokens of the whole step, on every rank.
        let n_step: usize = plan
            .iter()
            .flatten()
            .map(|&i| train[i as usize].n_targets())
            .sum();
        let step = self.state.step + 1;
        let mut loss_sum = 0.0;
        for m in &micro {
            loss_sum += self
                .model
                .forward_backward(be, m, 1.0 / n_step.max(1) as f32)
                .with_context(|| {
                    format!("step {step}: forward/backward of a {} batch", m.describe())
                })?
                .loss_sum;
        }
        // The ranks' shares summed: the step's loss and gradients, the same on every rank.
        let mut sums = [loss_sum];
        be.all_reduce_host(&mut sums)
            .with_context(|| format!("step {step}: summing the loss across ranks"))?;
        self.model
            .all_reduce_grads(be)
            .with_context(|| format!("step {step}: summing the gradients across ranks"))?;
        let loss = sums[0] / n_step.max(1) as f64;
        let model = &mut self.model;
        let diverged = |what: String| -> anyhow::Error { Diverged { step, what }.into() };
        if !loss.is_finite() {
            model.zero_grads(be)?;
            return Err(diverged(format!("the loss is {loss}")));
        }
        let g2 = model
            .grad_sum_squares(be)
            .with_context(|| format!("step {step}: gradient norm"))?;
        if !g2.is_finite() {
            model.zero_grads(be)?;
            return Err(diverged(format!("the gradient norm is {}", g2.sqrt())));
        }
        let mut update = || -> Result<_> {
            let rep = apply_step(be, model, &self.opt, g2.sqrt())?;
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
        let world = self.world;
        // Each rank runs every `size`-th batch; the sums are added across ranks.
        let eval = |model: &mut Model<B>| -> Result<f64> {
            let (mut s, mut n) = (0.0, 0usize);
            for b in self.val_batches.iter().skip(world.rank).step_by(world.size) {
                let out = model.forward(be, b, false).context("validation forward")?;
                s += out.loss_sum;
                n += out.n_targets;
            }
            let mut sums = [s, n as f64];
            be.all_reduce_host(&mut sums)
                .context("summing the validation loss across ranks")?;
            Ok(sums[0] / sums[1].max(1.0))
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

    /// What the run trains (the layout its checkpoints follow).
    pub fn trained(&self) -> Trained<'_> {
        match &self.model.full {
            Some(f) => Trained::Full(&f.layout),
            None => Trained::Lora(&self.layout),
        }
    }

    /// Write a checkpoint of the current state under `run_dir/checkpoints/`.
    /// Every rank of a data-parallel run calls it (a sharded optimizer state is gathered);
    /// rank 0 alone writes. Returns the checkpoint's folder.
    pub fn save_checkpoint(&self, run_dir: &Path, base_model: &str) -> Result<PathBuf> {
        if !self.world.is_main() {
            // The replicas are rank 0's; only a sharded state needs this rank's part.
            if self.model.sharded() {
                self.model.download_trained(self.be)?;
            }
            let name = checkpoint::step_dir_name(self.state.step);
            return Ok(run_dir.join(CHECKPOINTS_DIR).join(name));
        }
        let [params, m, v] = self.model.download_trained(self.be)?;
        checkpoint::save(
            &run_dir.join(CHECKPOINTS_DIR),
            &self.state,
            self.trained(),
            &params,
            &m,
            &v,
            base_model,
        )
    }
}

// ---------------------------------------------------------------------------------------------
// The command around the loop.
