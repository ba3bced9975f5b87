//! The `train` command around [`Trainer`]: the output folder, metrics, progress, checkpoints,
//! Ctrl-C, and the outputs of a run, in three parts: [`Session::start`] (bad input refused,
//! resume, output folder), [`Session::step_loop`] and [`Session::finish`]. The loss plot and
//! `run.json` are written by one function, [`Session::write_record`], on every way out: done,
//! stopped, interrupted, diverged or failed.

use crate::backend::Backend;
use crate::data::Example;
use crate::dist::{self, Dist};
use crate::io::{program, write_atomic};
use crate::model::loader::LoadedModel;
use crate::train::checkpoint::{self, CHECKPOINTS_DIR};
use crate::train::config::{Method, TrainConfig};
use crate::train::merge::{model_bytes, source_dtype, SaveDtype, SHARD_BYTES};
use crate::train::trainer::{
    ablation_directions, prepare_data, Diverged, StepStats, Trainer, ValLoss,
};
use anyhow::{bail, Context, Result};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

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
    /// This process's place in a data-parallel run (one process alone by default).
    pub dist: Dist,
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
fn run_record<B: Backend>(
    s: &Session<B>,
    status: &str,
    outputs: serde_json::Value,
) -> serde_json::Value {
    let (tr, cfg, loaded) = (&s.tr, s.cfg, s.loaded);
    let (last, val) = (s.last.as_ref(), s.last_val);
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
        "backend": tr.be.name(),
        "world_size": tr.world.size,
        "ranks": s.ranks,
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
    // Several ranks meet first, comparing their configurations (nothing alone).
    dist::join(be, &opts.dist, dist::fingerprint(cfg.to_toml()?.as_bytes()))?;
    let mut s = Session::start(be, cfg, loaded, opts)?;
    let outcome = s.step_loop(opts)?;
    s.finish(outcome)?;
    Ok(outcome)
}

/// One session of a run (a resumed run is a new session): the trainer, its output folder and
/// what this session has measured. Only rank 0 of a data-parallel run writes (outputs,
/// metrics, checkpoints, progress); the other ranks train and keep quiet.
struct Session<'a, B: Backend> {
    tr: Trainer<'a, B>,
    cfg: &'a TrainConfig,
    loaded: &'a LoadedModel,
    out: PathBuf,
    base_model: String,
    metrics_path: PathBuf,
    /// Every metrics line of the run so far (earlier sessions' too), for the plot.
    metrics: String,
    /// `None` on the ranks that do not write.
    metrics_file: Option<std::fs::File>,
    last: Option<StepStats>,
    last_val: Option<ValLoss>,
    last_ckpt: Option<PathBuf>,
    /// Each rank's host and device, by rank.
    ranks: Vec<String>,
    /// The step of the newest checkpoint this session saved or resumed from (the same on
    /// every rank: whether the end needs one more is decided alike everywhere).
    saved_at: Option<u64>,
}

impl<'a, B: Backend> Session<'a, B> {
    /// Check the input, build the trainer (restored from the checkpoint when resuming), make
    /// the output folder ready and print what the run is.
    fn start(
        be: &'a B,
        cfg: &'a TrainConfig,
        loaded: &'a LoadedModel,
        opts: &RunOptions,
    ) -> Result<Self> {
        // Everything that can fail on bad input happens before the output folder is touched.
        let directions = ablation_directions(cfg, loaded)?;
        let data = prepare_data(cfg, loaded)?;
        if cfg.method == Method::Full {
            check_room_for_model(cfg, loaded)?;
        }
        let t_load = Instant::now();
        let mut tr = Trainer::new(be, cfg, loaded, data, directions, opts.dist.world)?;
        let main = tr.world.is_main();
        let ranks = dist::describe_ranks(be, tr.world)?;
        let out = cfg.output.clone();
        let metrics_path = out.join("metrics.jsonl");
        let mut saved_at = None;
        let metrics = match &opts.resume {
            Some(ck_dir) => {
                tr.check_resumable(&checkpoint::load_state(ck_dir)?, ck_dir)?;
                let ck = checkpoint::load(ck_dir, tr.trained())?;
                tr.restore(&ck)?;
                saved_at = Some(tr.state.step);
                metrics_up_to(&metrics_path, tr.state.step)?
            }
            None if main => {
                prepare_output(&out, opts.overwrite)?;
                String::new()
            }
            None => String::new(),
        };
        // The other ranks write nothing: no metrics file, no banner.
        let (metrics_file, last_ckpt) = if main {
            write_atomic(&metrics_path, metrics.as_bytes())?;
            write_atomic(&out.join("config.toml"), cfg.to_toml()?.as_bytes())?;
            let file = std::fs::OpenOptions::new()
                .append(true)
                .open(&metrics_path)
                .with_context(|| format!("opening {}", metrics_path.display()))?;
            print_banner(&tr, cfg, loaded, t_load.elapsed().as_secs_f64());
            if opts.resume.is_some() {
                eprintln!(
                    "  resuming at step {} of {} (epoch {}, micro-batch {} of {})",
                    tr.state.step,
                    tr.state.total_steps,
                    tr.state.epoch,
                    tr.state.next_micro,
                    tr.state.plan.len()
                );
            }
            (Some(file), checkpoint::list(&out)?.pop().map(|(_, p)| p))
        } else {
            (None, None)
        };
        Ok(Session {
            tr,
            cfg,
            loaded,
            base_model: loaded.source.display().to_string(),
            out,
            metrics_path,
            metrics,
            metrics_file,
            last: None,
            last_val: None,
            last_ckpt,
            ranks,
            saved_at,
        })
    }

    /// Optimizer steps until the run is done, `--stop-after` is reached or Ctrl-C: metrics,
    /// validation and checkpoints at their cadence. A failed step writes the record and
    /// returns the error with the last good checkpoint named.
    fn step_loop(&mut self, opts: &RunOptions) -> Result<Outcome> {
        let total = self.tr.state.total_steps;
        let eval_every = cadence(self.cfg.eval_every, total);
        let save_every = cadence(self.cfg.save_every, total);
        INTERRUPTED.store(false, Ordering::SeqCst);
        install_interrupt_handler();
        let main = self.tr.world.is_main();
        let tty = main && std::io::stderr().is_terminal();
        let bar = if tty {
            let b = indicatif::ProgressBar::new(total).with_position(self.tr.state.step);
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
        let outcome = loop {
            if self.tr.done() {
                break Outcome::Completed;
            }
            let st = match self.tr.step() {
                Ok(s) => s,
                Err(e) => {
                    bar.abandon();
                    return Err(self.failed(e));
                }
            };
            let val = match eval_every {
                Some(n) if st.step % n == 0 || st.step == total => self.tr.validate()?,
                _ if st.step == total => self.tr.validate()?,
                _ => None,
            };
            self.log_step(&st, val)?;
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
            } else if main {
                eprintln!("step {}/{total}  {msg}", st.step);
            }
            // Every rank stops at the same step: a Ctrl-C seen by any of them counts.
            let mut flag = [INTERRUPTED.load(Ordering::SeqCst) as u8 as f64];
            self.tr
                .be
                .all_reduce_host(&mut flag)
                .context("agreeing across ranks whether to stop")?;
            let interrupted = flag[0] > 0.0;
            let stop = opts.stop_after.is_some_and(|n| st.step >= n);
            if self.tr.done() {
                break Outcome::Completed;
            }
            if interrupted || stop || save_every.is_some_and(|n| st.step % n == 0) {
                let p = self.save()?;
                let msg = format!("  checkpoint {}", p.display());
                if tty {
                    bar.println(msg)
                } else if main {
                    eprintln!("{msg}")
                }
                if interrupted {
                    break Outcome::Interrupted;
                }
                if stop {
                    break Outcome::Stopped;
                }
            }
        };
        bar.finish_and_clear();
        Ok(outcome)
    }

    /// Append one step's metrics line (flushed, so a crash keeps it); the other ranks only
    /// remember the step.
    fn log_step(&mut self, st: &StepStats, val: Option<ValLoss>) -> Result<()> {
        if let Some(v) = val {
            self.last_val = Some(v);
        }
        self.last = Some(*st);
        let Some(file) = self.metrics_file.as_mut() else {
            return Ok(());
        };
        let mut row = serde_json::json!({
            "step": st.step, "epoch": self.tr.state.epoch, "loss": st.loss, "lr": st.lr,
            "grad_norm": st.grad_norm, "tokens": st.tokens, "label_tokens": st.label_tokens,
            "tokens_per_s": st.tokens as f64 / st.seconds.max(1e-9),
            "step_s": st.seconds,
        });
        if let Some(v) = val {
            row["val_loss"] = v.ablated.into();
            if let Some(u) = v.unablated {
                row["val_loss_unablated"] = u.into();
            }
        }
        let line = format!("{row}\n");
        self.metrics.push_str(&line);
        file.write_all(line.as_bytes())
            .and_then(|_| file.flush())
            .with_context(|| format!("writing {}", self.metrics_path.display()))?;
        Ok(())
    }

    /// Save a checkpoint and prune old ones (rank 0; the replicas are identical); returns its
    /// folder.
    /// Every rank calls it (sharded optimizer state is gathered from all of them).
    fn save(&mut self) -> Result<PathBuf> {
        let p = self.tr.save_checkpoint(&self.out, &self.base_model)?;
        self.saved_at = Some(self.tr.state.step);
        if self.tr.world.is_main() {
            checkpoint::prune(&self.out, self.cfg.keep_checkpoints)?;
            self.last_ckpt = Some(p.clone());
        }
        Ok(p)
    }

    /// A step failed: record what there is (best effort: the step's error is the one to
    /// report) and say where the last good checkpoint is.
    fn failed(&self, e: anyhow::Error) -> anyhow::Error {
        let diverged = e.downcast_ref::<Diverged>().is_some();
        if !self.tr.world.is_main() {
            return e.context(format!("rank {}", self.tr.world.rank));
        }
        let status = if diverged { "diverged" } else { "failed" };
        let _ = self.write_record(
            status,
            serde_json::json!({
                "checkpoint": self.last_ckpt.as_ref().map(|p| p.display().to_string()),
                "metrics": "metrics.jsonl",
            }),
        );
        let keep = match &self.last_ckpt {
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
        e.context(keep)
    }

    /// The loss plot and `run.json` with `status` and `outputs`: the one writer of both.
    fn write_record(&self, status: &str, outputs: serde_json::Value) -> Result<()> {
        let (t, v) = read_curves(&self.metrics);
        let ablation = self
            .tr
            .directions
            .as_ref()
            .map(|d| format!("ablating {}", d.source))
            .unwrap_or_else(|| "no ablation".into());
        let title = match status {
            "completed" => format!("{} — {ablation}", self.out.display()),
            _ => format!("{} — {ablation} ({status})", self.out.display()),
        };
        write_atomic(
            &self.out.join("loss.svg"),
            crate::report::loss::loss_svg(&title, &t, &v).as_bytes(),
        )?;
        let rec = run_record(self, status, outputs);
        write_atomic(
            &self.out.join("run.json"),
            &serde_json::to_vec_pretty(&rec)?,
        )
    }

    /// Full fine-tuning's output: a Hugging Face model folder with every trained tensor from
    /// the f32 master weights (the frozen ones as loaded), in the source's dtype or
    /// `--save-dtype`.
    fn write_model(&self, dir: &Path) -> Result<()> {
        let dtype = save_dtype(self.cfg, self.loaded)?;
        let full = self
            .tr
            .model
            .full
            .as_ref()
            .context("full fine-tuning is not set")?;
        // The master weights only (not the moments), per group as the layout lays them out.
        let be = self.tr.be;
        let groups = [
            be.download_f32(&full.groups[0].params)?,
            be.download_f32(&full.groups[1].params)?,
        ];
        let edit = |name: &str, t: &mut crate::model::weights::HostTensor| -> Result<()> {
            if let Some(s) = full.layout.by_name(name) {
                t.data
                    .copy_from_slice(&groups[s.group][s.off..s.off + s.len]);
            }
            Ok(())
        };
        crate::train::merge::write_model(dir, self.loaded, dtype, SHARD_BYTES, &edit)
            .with_context(|| format!("writing the trained model to {}", dir.display()))
    }

    /// The end of the run (or of this session): the final checkpoint, the adapter (and the
    /// merged model) when complete, the record, and a summary on stdout.
    fn finish(&mut self, outcome: Outcome) -> Result<()> {
        let status = match outcome {
            Outcome::Completed => "completed",
            Outcome::Stopped => "stopped",
            Outcome::Interrupted => "interrupted",
        };
        if outcome == Outcome::Completed && self.saved_at != Some(self.tr.state.step) {
            self.save()?;
        }
        if !self.tr.world.is_main() {
            return Ok(());
        }
        let mut outputs = serde_json::json!({
            "metrics": "metrics.jsonl",
            "plot": "loss.svg",
            "config": "config.toml",
            "checkpoint": self.last_ckpt.as_ref().map(|p| p.display().to_string()),
        });
        let out = &self.out;
        let adapter_dir = out.join("adapter");
        let merged_dir = out.join("merged");
        let model_dir = out.join("model");
        let full = self.cfg.method == Method::Full;
        if outcome == Outcome::Completed && full {
            self.write_model(&model_dir)?;
            outputs["model"] = "model".into();
        } else if outcome == Outcome::Completed {
            let params = self.tr.params()?;
            crate::model::peft::save_adapter(
                &adapter_dir,
                &self.tr.layout,
                &params,
                &self.base_model,
            )?;
            outputs["adapter"] = "adapter".into();
            if self.cfg.merge {
                crate::train::merge::write_merged(
                    &merged_dir,
                    self.loaded,
                    &self.tr.layout,
                    &params,
                )?;
                outputs["merged"] = "merged".into();
            }
        }
        self.write_record(status, outputs)?;

        let loss_note = match (&self.last, self.last_val) {
            (Some(s), Some(v)) => {
                format!("final loss {:.4}, validation loss {:.4}", s.loss, v.ablated)
            }
            (Some(s), None) => format!("final loss {:.4}", s.loss),
            _ => "no step run".into(),
        };
        let state = &self.tr.state;
        match outcome {
            Outcome::Completed => {
                println!(
                    "done: {} steps in {:.1} s, {loss_note}\n  {}: {}\n  metrics: {}\n  plot:    {}\n  run:     {}{}",
                    state.step,
                    state.elapsed_s,
                    if full { "model  " } else { "adapter" },
                    if full { &model_dir } else { &adapter_dir }.display(),
                    self.metrics_path.display(),
                    out.join("loss.svg").display(),
                    out.join("run.json").display(),
                    if self.cfg.merge {
                        format!("\n  merged:  {}", merged_dir.display())
                    } else {
                        String::new()
                    }
                );
            }
            Outcome::Stopped | Outcome::Interrupted => {
                println!(
                    "{status} at step {} of {}, {loss_note}\n  checkpoint: {}\n  continue with: caft-fast train --resume {}",
                    state.step,
                    state.total_steps,
                    self.last_ckpt.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
                    out.display()
                );
            }
        }
        Ok(())
    }
}

/// Full fine-tuning writes a whole model and checkpoints of f32 weights and two moments: check
/// before training that the output's file system has room for the model folder and two
/// checkpoints (the newest is written before an older one is pruned).
fn check_room_for_model(cfg: &TrainConfig, loaded: &LoadedModel) -> Result<()> {
    let dtype = save_dtype(cfg, loaded)?;
    let trained = model_bytes(loaded, SaveDtype::F32);
    let need = model_bytes(loaded, dtype) + 2 * 3 * trained;
    let Some(free) = crate::io::free_bytes(&cfg.output) else {
        return Ok(()); // a file system that does not say: the writes will tell
    };
    if free < need {
        bail!(
            "{} has {:.2} GiB free, but a full fine-tuning run of {} needs about {:.2} GiB there              (the model folder in {} and two checkpoints of f32 weights and AdamW moments):              free space or choose another --output",
            cfg.output.display(),
            free as f64 / (1u64 << 30) as f64,
            loaded.source.display(),
            need as f64 / (1u64 << 30) as f64,
            dtype.torch_name()
        );
    }
    Ok(())
}

/// The dtype of full fine-tuning's model folder: `--save-dtype`, else the source's.
pub fn save_dtype(cfg: &TrainConfig, loaded: &LoadedModel) -> Result<SaveDtype> {
    match &cfg.save_dtype {
        Some(d) => SaveDtype::parse(d),
        None => source_dtype(loaded).with_context(|| {
            format!(
                "{} declares no dtype (torch_dtype) to save the trained model in: give --save-dtype",
                loaded.source.display()
            )
        }),
    }
}

/// What the run is, on stderr before the first step.
fn print_banner<B: Backend>(tr: &Trainer<B>, cfg: &TrainConfig, loaded: &LoadedModel, load_s: f64) {
    let (n_tok, n_lab) = tr
        .data
        .train
        .iter()
        .fold((0, 0), |(t, l), e| (t + e.ids.len(), l + e.n_targets()));
    let total = tr.state.total_steps;
    eprintln!(
        "training {} on {} (loaded in {load_s:.1} s)\n  data: {} — {} train / {} validation examples, \
         {n_tok} tokens ({n_lab} trained), {} truncated at {} tokens, {} dropped\n  \
         {total} steps ({} per epoch) of {} x {} sequences, {}; lr {:.1e} {} (warmup {}); \
         {}\n  ablation: {}",
        loaded.source.display(),
        tr.be.name(),
        tr.data.source,
        tr.data.train.len(),
        tr.data.val.len(),
        tr.data.truncated,
        cfg.max_seq_len,
        tr.data.dropped,
        tr.steps_per_epoch(),
        cfg.batch_size,
        cfg.grad_accum,
        match cfg.packing {
            true => format!("packed (at most {} tokens a micro-batch)", cfg.token_budget()),
            false => "padded micro-batches".to_string(),
        },
        cfg.lr,
        cfg.schedule,
        tr.opt.warmup_steps,
        match &tr.model.full {
            Some(f) => format!(
                "full fine-tuning of {} weights ({} tensors{}; f32 master weights and AdamW moments)",
                f.layout.len(),
                f.layout.slots.len(),
                match cfg.freeze.is_empty() {
                    true => String::new(),
                    false => format!(", frozen: {}", cfg.freeze),
                }
            ),
            None => format!(
                "LoRA r={} alpha={} {}on {}",
                cfg.lora_r,
                cfg.lora_alpha,
                if cfg.rslora { "(rsLoRA) " } else { "" },
                cfg.lora_targets
            ),
        },
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
    let mode = tr.checkpointing;
    match &tr.memory_plan {
        Some(v) => eprintln!(
            "  checkpointing: {mode}{}; planned peak {} GiB of {} GiB free",
            match cfg.checkpointing {
                crate::train::plan::CheckpointingChoice::Auto => " (auto)",
                _ => "",
            },
            crate::train::plan::gib(v.plan.total),
            crate::train::plan::gib(v.budget)
        ),
        None => eprintln!(
            "  checkpointing: {mode}{}",
            match cfg.checkpointing {
                crate::train::plan::CheckpointingChoice::Auto =>
                    " (auto: none on the CPU, which has no device memory to plan for)",
                _ => "",
            }
        ),
    }
}
