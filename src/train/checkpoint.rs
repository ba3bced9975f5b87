//! Checkpoints: everything a run needs to continue bit-identically.
//!
//! `<output>/checkpoints/step-<NNNNNNNN>/` holds
//! - LoRA: `adapter_config.json`, `adapter_model.safetensors`: the LoRA parameters (a PEFT
//!   adapter, usable as it is); full fine-tuning: `model.safetensors`, the f32 master weights
//!   of every trained tensor by its Hugging Face name (Gemma's norm gains as `w`);
//! - `optimizer.safetensors`: AdamW's first and second moments (`exp_avg`, `exp_avg_sq`, flat,
//!   in the adapter's buffer order, or full fine-tuning's decay group then no-decay group);
//! - `trainer_state.json`: the step, the epoch and its micro-batch order, the position in it,
//!   the seed the order generator derives from, fingerprints of the model, data and directions,
//!   and the full configuration.
//!
//! A checkpoint is written into `.step-<N>.partial/`, every file flushed, then renamed into
//! place: a crash or a full disk leaves the earlier checkpoints as they were, and a folder named
//! `step-*` is always complete. The learning rate needs no state (a function of the step), and
//! the data order needs only `(seed, epoch)` beyond the stored plan, so nothing else is random.

use crate::io::{f32_safetensors, read_f32_safetensors, write_atomic};
use crate::model::full::FullLayout;
use crate::model::lora::LoraLayout;
use crate::model::peft::{load_adapter, save_adapter};
use crate::train::config::TrainConfig;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// Full fine-tuning's master weights in a checkpoint.
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// What a run trains, and so what its checkpoints hold. Parameters and moments are one flat
/// buffer either way: LoRA's, or full fine-tuning's decay group followed by its no-decay group.
#[derive(Clone, Copy)]
pub enum Trained<'a> {
    Lora(&'a LoraLayout),
    Full(&'a FullLayout),
}

impl Trained<'_> {
    /// Elements of the flat buffer.
    pub fn len(&self) -> usize {
        match self {
            Trained::Lora(l) => l.len,
            Trained::Full(l) => l.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn save_full_weights(dir: &Path, layout: &FullLayout, params: &[f32]) -> Result<()> {
    let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = layout
        .slots
        .iter()
        .map(|s| {
            let o = layout.flat_offset(s);
            (
                s.name.clone(),
                s.shape.clone(),
                params[o..o + s.len].to_vec(),
            )
        })
        .collect();
    write_atomic(&dir.join(WEIGHTS_FILE), &f32_safetensors(&tensors)?)
}

fn load_full_weights(dir: &Path, layout: &FullLayout) -> Result<Vec<f32>> {
    let p = dir.join(WEIGHTS_FILE);
    let mut t = read_f32_safetensors(&p).with_context(|| {
        format!(
            "{} holds no full fine-tuning weights (is it a LoRA checkpoint?)",
            dir.display()
        )
    })?;
    let mut params = vec![0f32; layout.len()];
    for s in &layout.slots {
        let (shape, data) = t
            .remove(&s.name)
            .with_context(|| format!("{}: tensor {} is missing", p.display(), s.name))?;
        if shape != s.shape {
            bail!(
                "{}: tensor {} has shape {shape:?}, the model needs {:?}",
                p.display(),
                s.name,
                s.shape
            );
        }
        let o = layout.flat_offset(s);
        params[o..o + s.len].copy_from_slice(&data);
    }
    Ok(params)
}
/// The folder of checkpoints inside a run's output folder.
pub const CHECKPOINTS_DIR: &str = "checkpoints";
const FORMAT: u32 = 1;

/// Where a run stands after `step` optimizer steps.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub format: u32,
    /// The program that wrote it (`caft-fast <version>`).
    pub program: String,
    /// Optimizer steps completed.
    pub step: u64,
    pub total_steps: u64,
    pub epoch: u64,
    /// Index into `plan` of the next micro-batch.
    pub next_micro: usize,
    /// This epoch's micro-batches (indices into the training examples).
    pub plan: Vec<Vec<u32>>,
    /// Label tokens trained on so far.
    pub tokens: u64,
    /// Training seconds so far (all sessions).
    pub elapsed_s: f64,
    /// SHA-256 of the model's configuration (architecture and shapes).
    pub model_fingerprint: String,
    /// SHA-256 of the tokenized training and validation examples.
    pub data_fingerprint: String,
    pub val_fingerprint: String,
    /// SHA-256 of the ablated directions (`None`: no ablation).
    pub directions_sha256: Option<String>,
    pub config: TrainConfig,
}

/// A loaded checkpoint.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub state: TrainerState,
    pub params: Vec<f32>,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

/// The folder name of the checkpoint after `step` steps (zero-padded: names sort by step).
pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// Flush a folder's entry table so a rename inside it survives a power cut (best effort: not
/// every file system allows opening a folder for this).
fn sync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

/// Write a checkpoint under `root` (a run's `checkpoints/` folder); returns its folder.
#[allow(clippy::too_many_arguments)]
pub fn save(
    root: &Path,
    state: &TrainerState,
    trained: Trained,
    params: &[f32],
    m: &[f32],
    v: &[f32],
    base_model: &str,
) -> Result<PathBuf> {
    let name = step_dir_name(state.step);
    let fin = root.join(&name);
    let tmp = root.join(format!(".{name}.partial"));
    let write = || -> Result<()> {
        std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
        if tmp.exists() {
            // Left by an earlier crash at this very step: never a valid checkpoint.
            std::fs::remove_dir_all(&tmp)
                .with_context(|| format!("removing the stale {}", tmp.display()))?;
        }
        std::fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        match trained {
            Trained::Lora(layout) => save_adapter(&tmp, layout, params, base_model)?,
            Trained::Full(layout) => save_full_weights(&tmp, layout, params)?,
        }
        let n = trained.len();
        if m.len() != n || v.len() != n || params.len() != n {
            bail!(
                "optimizer moments have {} and {} values, the parameters {}, the layout {n}",
                params.len(),
                m.len(),
                v.len()
            );
        }
        let opt = f32_safetensors(&[
            ("exp_avg".into(), vec![n], m.to_vec()),
            ("exp_avg_sq".into(), vec![n], v.to_vec()),
        ])?;
        write_atomic(&tmp.join(OPTIMIZER_FILE), &opt)?;
        // The state goes last: its presence marks the files before it as complete.
        write_atomic(&tmp.join(STATE_FILE), &serde_json::to_vec_pretty(state)?)?;
        sync_dir(&tmp);
        if fin.exists() {
            // The same step saved again (a resumed run stopping where it started): replace it
            // only now that the new one is complete.
            let old = root.join(format!(".{name}.old"));
            let _ = std::fs::remove_dir_all(&old);
            std::fs::rename(&fin, &old)
                .with_context(|| format!("moving aside {}", fin.display()))?;
            std::fs::rename(&tmp, &fin)
                .with_context(|| format!("renaming {} to {}", tmp.display(), fin.display()))?;
            let _ = std::fs::remove_dir_all(&old);
        } else {
            std::fs::rename(&tmp, &fin)
                .with_context(|| format!("renaming {} to {}", tmp.display(), fin.display()))?;
        }
        sync_dir(root);
        Ok(())
    };
    write()
        .inspect_err(|_| {
            // Best effort: the error being returned is the one that matters.
            let _ = std::fs::remove_dir_all(&tmp);
        })
        .with_context(|| {
            format!(
                "saving the checkpoint of step {} into {}",
                state.step,
                fin.display()
            )
        })?;
    Ok(fin)
}

/// Read `trainer_state.json` of a checkpoint folder.
pub fn load_state(dir: &Path) -> Result<TrainerState> {
    let p = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&p).with_context(|| {
        format!(
            "reading {} (is {} a checkpoint folder?)",
            p.display(),
            dir.display()
        )
    })?;
    let s: TrainerState =
        serde_json::from_str(&text).with_context(|| format!("{}: malformed", p.display()))?;
    if s.format != FORMAT {
        bail!(
            "{}: checkpoint format {} is not the one this program reads ({FORMAT})",
            p.display(),
            s.format
        );
    }
    Ok(s)
}

/// Load a whole checkpoint; `trained` must be the layout its configuration implies.
pub fn load(dir: &Path, trained: Trained) -> Result<Checkpoint> {
    let state = load_state(dir)?;
    let params = match trained {
        Trained::Lora(layout) => load_adapter(dir, layout)?,
        Trained::Full(layout) => load_full_weights(dir, layout)?,
    };
    let n = trained.len();
    let p = dir.join(OPTIMIZER_FILE);
    let mut t = read_f32_safetensors(&p)?;
    let mut take = |name: &str| -> Result<Vec<f32>> {
        let (shape, data) = t
            .remove(name)
            .with_context(|| format!("{}: tensor {name} is missing", p.display()))?;
        if shape != [n] {
            bail!(
                "{}: tensor {name} has shape {shape:?}, the parameters need [{n}]",
                p.display(),
            );
        }
        Ok(data)
    };
    let m = take("exp_avg")?;
    let v = take("exp_avg_sq")?;
    Ok(Checkpoint {
        dir: dir.to_path_buf(),
        state,
        params,
        m,
        v,
    })
}

/// Completed checkpoints under a run folder, oldest first (by step).
pub fn list(run_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let root = run_dir.join(CHECKPOINTS_DIR);
    if !root.is_dir() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for e in std::fs::read_dir(&root).with_context(|| format!("listing {}", root.display()))? {
        let e = e.with_context(|| format!("listing {}", root.display()))?;
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(step) = name
            .strip_prefix("step-")
            .and_then(|s| s.parse::<u64>().ok())
        {
            if e.path().join(STATE_FILE).is_file() {
                out.push((step, e.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// What `--resume DIR` names: a checkpoint folder itself, or a run folder (its newest
/// checkpoint). Returns `(run folder, checkpoint folder)`.
pub fn resolve_resume(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    if dir.join(STATE_FILE).is_file() {
        let run = dir.parent().and_then(|p| p.parent()).with_context(|| {
            format!(
                "{}: a checkpoint folder sits in <run>/checkpoints/",
                dir.display()
            )
        })?;
        return Ok((run.to_path_buf(), dir.to_path_buf()));
    }
    if !dir.is_dir() {
        bail!("--resume {}: no such folder", dir.display());
    }
    match list(dir)?.pop() {
        Some((_, ck)) => Ok((dir.to_path_buf(), ck)),
        None => bail!(
            "--resume {}: no checkpoint found (expected {}/step-*/{STATE_FILE})",
            dir.display(),
            dir.join(CHECKPOINTS_DIR).display()
        ),
    }
}

/// Delete all but the newest `keep` checkpoints of a run (and any partial leftovers).
pub fn prune(run_dir: &Path, keep: usize) -> Result<()> {
    let all = list(run_dir)?;
    let n = all.len().saturating_sub(keep.max(1));
    for (_, p) in &all[..n] {
        std::fs::remove_dir_all(p)
            .with_context(|| format!("removing old checkpoint {}", p.display()))?;
    }
    Ok(())
}
