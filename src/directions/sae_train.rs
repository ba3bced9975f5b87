//! Training a BatchTopK sparse autoencoder (Bussmann, Leask, Nanda 2024) on resid_post
//! activations, on the CPU, so models without published SAEs can use `directions sae`.
//!
//! For a batch of `B` tokens `x` (`[B, d]`):
//!
//! ```text
//! pre = (x - b_dec) W_enc + b_enc                 W_enc: [d, m]
//! f   = relu(pre) kept only at the B·k largest entries of the whole batch (BatchTopK)
//! x̂   = f W_dec + b_dec                           W_dec: [m, d], unit rows
//! L   = (1/B) Σ |x̂ - x|²
//! ```
//!
//! Gradients by hand: `g = 2(x̂ - x)/B`; `dW_dec = fᵀ g`; `df = g W_decᵀ` on the kept entries;
//! `dW_enc = (x - b_dec)ᵀ df`; `db_enc = Σ df`; `db_dec = Σ g - Σ df W_encᵀ` (b_dec enters
//! both the decoder and the centred input). The decoder rows stay unit: the part of each
//! row's gradient along the row is removed before the Adam step and the rows are renormalised
//! after it. At inference BatchTopK is replaced by one global threshold `θ` (`f = relu(pre)`
//! where `pre > θ`), the running mean of the smallest kept activation of each batch. Dead
//! latents get no auxiliary loss here.

use crate::directions::sae::{Activation, Sae};
use crate::linalg::gemm;
use crate::util::rng::Rng;
use anyhow::{anyhow, bail, Result};
use std::path::Path;

/// Hyper-parameters.
#[derive(Clone, Debug)]
pub struct TrainConfig {
    /// Latents.
    pub m: usize,
    /// Mean active latents per token.
    pub k: usize,
    pub lr: f64,
    pub batch: usize,
    pub steps: usize,
    pub seed: u64,
}

/// Adam moments of one tensor.
struct Adam {
    m: Vec<f32>,
    v: Vec<f32>,
}

impl Adam {
    fn new(n: usize) -> Self {
        Adam {
            m: vec![0.0; n],
            v: vec![0.0; n],
        }
    }
    /// `β = (0.9, 0.999)`, `ε = 1e-8`, bias-corrected, no weight decay.
    fn step(&mut self, p: &mut [f32], g: &[f32], lr: f64, t: u64) {
        let (b1, b2) = (0.9f64, 0.999f64);
        let c1 = 1.0 - b1.powi(t as i32);
        let c2 = 1.0 - b2.powi(t as i32);
        for i in 0..p.len() {
            let gi = g[i] as f64;
            let m = b1 * self.m[i] as f64 + (1.0 - b1) * gi;
            let v = b2 * self.v[i] as f64 + (1.0 - b2) * gi * gi;
            self.m[i] = m as f32;
            self.v[i] = v as f32;
            p[i] -= (lr * (m / c1) / ((v / c2).sqrt() + 1e-8)) as f32;
        }
    }
}

/// A BatchTopK SAE being trained.
pub struct Trainer {
    pub cfg: TrainConfig,
    pub sae: Sae,
    adam: [Adam; 4],
    step: u64,
    /// Running mean of each batch's smallest kept activation (the inference threshold).
    threshold_sum: f64,
    threshold_n: u64,
}

impl Trainer {
    /// Decoder rows random unit vectors, encoder their transpose, `b_enc = 0`, `b_dec` the
    /// mean of `first` (rows `[n, d]`), so training starts at a sensible reconstruction.
    pub fn new(cfg: TrainConfig, d: usize, first: &[f32]) -> Result<Trainer> {
        if cfg.m == 0 || cfg.k == 0 || cfg.k > cfg.m {
            bail!("SAE: need 0 < k ({}) <= latents ({})", cfg.k, cfg.m);
        }
        if cfg.batch == 0 {
            bail!("SAE: batch size 0");
        }
        let n = first.len() / d.max(1);
        if n == 0 {
            bail!("SAE: no activations to train on");
        }
        let m = cfg.m;
        let (w_enc, w_dec, b_dec) = init_weights(d, m, cfg.seed, first);
        let sae = Sae {
            d,
            m,
            w_enc,
            b_enc: vec![0.0; m],
            w_dec,
            b_dec,
            subtract_b_dec: true,
            act: Activation::BatchTopK(0.0),
        };
        Ok(Trainer {
            adam: [
                Adam::new(d * m),
                Adam::new(m),
                Adam::new(m * d),
                Adam::new(d),
            ],
            cfg,
            sae,
            step: 0,
            threshold_sum: 0.0,
            threshold_n: 0,
        })
    }

    /// One Adam step on the batch `x` (`[B, d]`); returns the fraction of variance
    /// unexplained, `Σ|x̂ - x|² / Σ|x - mean x|²`.
    pub fn step(&mut self, x: &[f32]) -> Result<f64> {
        let s = &mut self.sae;
        let (d, m) = (s.d, s.m);
        let b = x.len() / d;
        if b == 0 || x.len() != b * d {
            bail!(
                "SAE step: a batch of {} values is not whole rows of {d}",
                x.len()
            );
        }
        let xc: Vec<f32> = x
            .chunks_exact(d)
            .flat_map(|r| r.iter().zip(&s.b_dec).map(|(a, c)| a - c))
            .collect();
        let mut pre = vec![0f32; b * m];
        for row in pre.chunks_exact_mut(m) {
            row.copy_from_slice(&s.b_enc);
        }
        gemm(&mut pre, &xc, (d, 1), &s.w_enc, (m, 1), b, m, d, true);
        // BatchTopK: the B·k largest positive pre-activations of the batch.
        let keep = (b * self.cfg.k).min(b * m);
        let mut idx: Vec<u32> = (0..(b * m) as u32)
            .filter(|&i| pre[i as usize] > 0.0)
            .collect();
        let kth = keep.min(idx.len());
        if kth > 0 && kth < idx.len() {
            idx.select_nth_unstable_by(kth - 1, |&a, &c| {
                pre[c as usize].total_cmp(&pre[a as usize])
            });
            idx.truncate(kth);
        }
        let mut f = vec![0f32; b * m];
        let mut smallest = f32::INFINITY;
        for &i in &idx {
            f[i as usize] = pre[i as usize];
            smallest = smallest.min(pre[i as usize]);
        }
        if smallest.is_finite() {
            self.threshold_sum += smallest as f64;
            self.threshold_n += 1;
        }
        // x̂ and the residual g = 2(x̂ - x)/B.
        let mut xh = vec![0f32; b * d];
        gemm(&mut xh, &f, (m, 1), &s.w_dec, (d, 1), b, d, m, false);
        let mut err = 0f64;
        let mut g = vec![0f32; b * d];
        for r in 0..b {
            for c in 0..d {
                let e = xh[r * d + c] + s.b_dec[c] - x[r * d + c];
                err += (e as f64) * (e as f64);
                g[r * d + c] = 2.0 * e / b as f32;
            }
        }
        let mut mean = vec![0f64; d];
        for r in x.chunks_exact(d) {
            for (mu, v) in mean.iter_mut().zip(r) {
                *mu += *v as f64 / b as f64;
            }
        }
        let var: f64 = x
            .chunks_exact(d)
            .map(|r| {
                r.iter()
                    .zip(&mean)
                    .map(|(v, mu)| (*v as f64 - mu).powi(2))
                    .sum::<f64>()
            })
            .sum();
        if !err.is_finite() {
            bail!(
                "SAE training diverged at step {} (lower --sae-lr)",
                self.step + 1
            );
        }
        // dW_dec = fᵀ g; df = g W_decᵀ masked to the kept entries.
        let mut dw_dec = vec![0f32; m * d];
        gemm(&mut dw_dec, &f, (1, m), &g, (d, 1), m, d, b, false);
        let mut df = vec![0f32; b * m];
        gemm(&mut df, &g, (d, 1), &s.w_dec, (1, d), b, m, d, false);
        for (v, fv) in df.iter_mut().zip(&f) {
            if *fv == 0.0 {
                *v = 0.0;
            }
        }
        let mut dw_enc = vec![0f32; d * m];
        gemm(&mut dw_enc, &xc, (1, d), &df, (m, 1), d, m, b, false);
        let mut db_enc = vec![0f32; m];
        for r in df.chunks_exact(m) {
            db_enc.iter_mut().zip(r).for_each(|(a, v)| *a += v);
        }
        let mut dxc = vec![0f32; b * d];
        gemm(&mut dxc, &df, (m, 1), &s.w_enc, (1, m), b, d, m, false);
        let mut db_dec = vec![0f32; d];
        for (gr, xr) in g.chunks_exact(d).zip(dxc.chunks_exact(d)) {
            for c in 0..d {
                db_dec[c] += gr[c] - xr[c];
            }
        }
        // Keep unit decoder rows: drop each row gradient's component along the row.
        for (w, gw) in s.w_dec.chunks_exact(d).zip(dw_dec.chunks_exact_mut(d)) {
            let along: f32 = w.iter().zip(gw.iter()).map(|(a, c)| a * c).sum();
            gw.iter_mut().zip(w).for_each(|(c, a)| *c -= along * a);
        }
        self.step += 1;
        let lr = self.cfg.lr;
        let [a0, a1, a2, a3] = &mut self.adam;
        a0.step(&mut s.w_enc, &dw_enc, lr, self.step);
        a1.step(&mut s.b_enc, &db_enc, lr, self.step);
        a2.step(&mut s.w_dec, &dw_dec, lr, self.step);
        a3.step(&mut s.b_dec, &db_dec, lr, self.step);
        for w in s.w_dec.chunks_exact_mut(d) {
            let n = w.iter().map(|&a| a as f64 * a as f64).sum::<f64>().sqrt();
            if n > 0.0 {
                w.iter_mut().for_each(|a| *a = (*a as f64 / n) as f32);
            }
        }
        Ok(err / var.max(1e-30))
    }

    /// The trained SAE with its inference threshold.
    pub fn finish(mut self) -> Sae {
        let th = if self.threshold_n > 0 {
            (self.threshold_sum / self.threshold_n as f64) as f32
        } else {
            0.0
        };
        self.sae.act = Activation::BatchTopK(th);
        self.sae
    }
}

/// Train on `acts` (`[n, d]`) for `cfg.steps` batches drawn by a seeded shuffle (epochs as
/// needed). `on_step(step, fvu)` reports progress.
pub fn train(
    acts: &[f32],
    d: usize,
    cfg: &TrainConfig,
    mut on_step: impl FnMut(usize, f64),
) -> Result<Sae> {
    let n = acts.len() / d.max(1);
    if n < cfg.batch {
        bail!(
            "{n} activation rows for batches of {}: collect more tokens or lower --batch-tokens",
            cfg.batch
        );
    }
    let first = &acts[..cfg.batch.min(n) * d];
    let mut tr = Trainer::new(cfg.clone(), d, first)?;
    let mut rng = Rng::new(cfg.seed ^ 0x5AE5_AE5A);
    let mut order: Vec<usize> = (0..n).collect();
    let mut pos = n;
    let mut batch = vec![0f32; cfg.batch * d];
    for step in 0..cfg.steps {
        for r in 0..cfg.batch {
            if pos == n {
                rng.shuffle(&mut order);
                pos = 0;
            }
            let i = order[pos];
            pos += 1;
            batch[r * d..(r + 1) * d].copy_from_slice(&acts[i * d..(i + 1) * d]);
        }
        let fvu = tr.step(&batch)?;
        on_step(step + 1, fvu);
    }
    Ok(tr.finish())
}

/// Write an SAE in the dictionary_learning layout (`encoder.weight [m, d]`, `encoder.bias`,
/// `decoder.weight [d, m]`, `b_dec`, scalar `threshold` and `k`), which `Sae::load` reads
/// back as BatchTopK. Atomic.
pub fn save(path: &Path, sae: &Sae, k: usize) -> Result<()> {
    let (d, m) = (sae.d, sae.m);
    let th = match sae.act {
        Activation::BatchTopK(t) => t,
        _ => bail!("only BatchTopK SAEs are saved by this function"),
    };
    let mut enc = vec![0f32; m * d];
    let mut dec = vec![0f32; d * m];
    for i in 0..d {
        for j in 0..m {
            enc[j * d + i] = sae.w_enc[i * m + j];
            dec[i * m + j] = sae.w_dec[j * d + i];
        }
    }
    let f32s: Vec<(&str, Vec<usize>, Vec<u8>)> = vec![
        (
            "encoder.weight",
            vec![m, d],
            bytemuck::cast_slice(&enc).to_vec(),
        ),
        (
            "encoder.bias",
            vec![m],
            bytemuck::cast_slice(&sae.b_enc).to_vec(),
        ),
        (
            "decoder.weight",
            vec![d, m],
            bytemuck::cast_slice(&dec).to_vec(),
        ),
        ("b_dec", vec![d], bytemuck::cast_slice(&sae.b_dec).to_vec()),
        ("threshold", vec![], th.to_le_bytes().to_vec()),
    ];
    let k_bytes = (k as i64).to_le_bytes();
    let mut views = Vec::new();
    for (name, shape, b) in &f32s {
        views.push((
            name.to_string(),
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b)
                .map_err(|e| anyhow!("tensor {name}: {e}"))?,
        ));
    }
    views.push((
        "k".to_string(),
        safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![], &k_bytes)
            .map_err(|e| anyhow!("tensor k: {e}"))?,
    ));
    let bytes =
        safetensors::serialize(views, None).map_err(|e| anyhow!("serialising the SAE: {e}"))?;
    crate::io::write_atomic(path, &bytes)
}

// ---- JumpReLU ----------------------------------------------------------------------------
//
// JumpReLU SAEs (Rajamanoharan et al. 2024, the Gemma Scope architecture), without b_dec
// subtraction at the input:
//
//     pre = x W_enc + b_enc;  f_j = pre_j · H(pre_j - θ_j);  x̂ = f W_dec + b_dec
//     L   = (1/B) Σ_t |x̂_t - x_t|² + λ (1/B) Σ_t Σ_j H(pre_tj - θ_j)
//
// H has no useful derivative, so θ learns through straight-through pseudo-derivatives with a
// rectangle kernel K(z) = [|z| < 1/2] of bandwidth ε:
//     ∂f_j/∂θ_j ≈ -(θ_j/ε) K((pre_j - θ_j)/ε),   ∂H(pre_j - θ_j)/∂θ_j ≈ -(1/ε) K((pre_j - θ_j)/ε)
// while pre gets the gradient of the active branch only (∂f_j/∂pre_j = H(pre_j - θ_j)).
// θ = exp(log θ) stays positive; Adam updates log θ. Decoder rows are kept at unit norm as
// for BatchTopK.

/// Hyper-parameters of a JumpReLU SAE.
#[derive(Clone, Debug)]
pub struct JumpReluConfig {
    pub m: usize,
    /// λ: the weight of the L0 penalty.
    pub l0_coeff: f64,
    /// ε: the width of the straight-through kernel, in activation units.
    pub bandwidth: f64,
    /// Starting threshold of every latent.
    pub init_threshold: f64,
    pub lr: f64,
    pub batch: usize,
    pub steps: usize,
    pub seed: u64,
}

/// Unit random decoder rows, the encoder their transpose, and the mean of `first` as `b_dec`.
fn init_weights(d: usize, m: usize, seed: u64, first: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let n = (first.len() / d.max(1)).max(1);
    let mut rng = Rng::new(seed);
    let mut w_dec = vec![0f32; m * d];
    for row in w_dec.chunks_exact_mut(d) {
        let v: Vec<f64> = (0..d).map(|_| rng.normal()).collect();
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        for (r, x) in row.iter_mut().zip(&v) {
            *r = (x / norm) as f32;
        }
    }
    let mut w_enc = vec![0f32; d * m];
    for j in 0..m {
        for i in 0..d {
            w_enc[i * m + j] = w_dec[j * d + i];
        }
    }
    let mut b_dec = vec![0f64; d];
    for r in first.chunks_exact(d) {
        for (b, x) in b_dec.iter_mut().zip(r) {
            *b += *x as f64 / n as f64;
        }
    }
    (w_enc, w_dec, b_dec.iter().map(|&x| x as f32).collect())
}

/// Train a JumpReLU SAE on `acts` (`[n, d]`); `on_step(step, fvu, l0)` reports progress
/// (fraction of variance unexplained and mean active latents per token of the batch).
pub fn train_jumprelu(
    acts: &[f32],
    d: usize,
    cfg: &JumpReluConfig,
    mut on_step: impl FnMut(usize, f64, f64),
) -> Result<Sae> {
    let n = acts.len() / d.max(1);
    let m = cfg.m;
    if m == 0 || cfg.batch == 0 || n < cfg.batch {
        bail!(
            "JumpReLU SAE: need latents > 0 and at least one batch ({} rows, batch {})",
            n,
            cfg.batch
        );
    }
    if !(cfg.bandwidth > 0.0 && cfg.init_threshold > 0.0) {
        bail!("JumpReLU SAE: bandwidth and initial threshold must be positive");
    }
    let (mut w_enc, mut w_dec, mut b_dec) = init_weights(d, m, cfg.seed, &acts[..cfg.batch * d]);
    let mut b_enc = vec![0f32; m];
    let mut log_th = vec![cfg.init_threshold.ln() as f32; m];
    let mut adam = [
        Adam::new(d * m),
        Adam::new(m),
        Adam::new(m * d),
        Adam::new(d),
        Adam::new(m),
    ];
    let mut rng = Rng::new(cfg.seed ^ 0x1A3B_5C7D);
    let mut order: Vec<usize> = (0..n).collect();
    let mut pos = n;
    let b = cfg.batch;
    let eps = cfg.bandwidth as f32;
    let mut x = vec![0f32; b * d];
    for step in 1..=cfg.steps {
        for r in 0..b {
            if pos == n {
                rng.shuffle(&mut order);
                pos = 0;
            }
            let i = order[pos];
            pos += 1;
            x[r * d..(r + 1) * d].copy_from_slice(&acts[i * d..(i + 1) * d]);
        }
        let th: Vec<f32> = log_th.iter().map(|l| l.exp()).collect();
        let mut pre = vec![0f32; b * m];
        for row in pre.chunks_exact_mut(m) {
            row.copy_from_slice(&b_enc);
        }
        gemm(&mut pre, &x, (d, 1), &w_enc, (m, 1), b, m, d, true);
        let mut f = vec![0f32; b * m];
        let mut active = 0usize;
        for (i, (fv, &p)) in f.iter_mut().zip(&pre).enumerate() {
            if p > th[i % m] {
                *fv = p;
                active += 1;
            }
        }
        let mut xh = vec![0f32; b * d];
        gemm(&mut xh, &f, (m, 1), &w_dec, (d, 1), b, d, m, false);
        let (mut err, mut var) = (0f64, 0f64);
        let mut mean = vec![0f64; d];
        for r in x.chunks_exact(d) {
            mean.iter_mut()
                .zip(r)
                .for_each(|(mu, v)| *mu += *v as f64 / b as f64);
        }
        let mut g = vec![0f32; b * d];
        for r in 0..b {
            for c in 0..d {
                let e = xh[r * d + c] + b_dec[c] - x[r * d + c];
                err += (e as f64).powi(2);
                var += (x[r * d + c] as f64 - mean[c]).powi(2);
                g[r * d + c] = 2.0 * e / b as f32;
            }
        }
        if !err.is_finite() {
            bail!("JumpReLU SAE training diverged at step {step} (lower the learning rate)");
        }
        let mut dw_dec = vec![0f32; m * d];
        gemm(&mut dw_dec, &f, (1, m), &g, (d, 1), m, d, b, false);
        let mut db_dec = vec![0f32; d];
        for r in g.chunks_exact(d) {
            db_dec.iter_mut().zip(r).for_each(|(a, v)| *a += v);
        }
        let mut df = vec![0f32; b * m];
        gemm(&mut df, &g, (d, 1), &w_dec, (1, d), b, m, d, false);
        // θ: the straight-through terms of the reconstruction and of the L0 penalty.
        let mut dlog_th = vec![0f32; m];
        let l0_w = (cfg.l0_coeff / b as f64) as f32;
        for (i, (dv, &p)) in df.iter_mut().zip(&pre).enumerate() {
            let j = i % m;
            let in_kernel = (p - th[j]).abs() < 0.5 * eps;
            if in_kernel {
                let dth = *dv * (-th[j] / eps) + l0_w * (-1.0 / eps);
                dlog_th[j] += dth * th[j];
            }
            if p <= th[j] {
                *dv = 0.0;
            }
        }
        let mut dw_enc = vec![0f32; d * m];
        gemm(&mut dw_enc, &x, (1, d), &df, (m, 1), d, m, b, false);
        let mut db_enc = vec![0f32; m];
        for r in df.chunks_exact(m) {
            db_enc.iter_mut().zip(r).for_each(|(a, v)| *a += v);
        }
        for (w, gw) in w_dec.chunks_exact(d).zip(dw_dec.chunks_exact_mut(d)) {
            let along: f32 = w.iter().zip(gw.iter()).map(|(a, c)| a * c).sum();
            gw.iter_mut().zip(w).for_each(|(c, a)| *c -= along * a);
        }
        let t = step as u64;
        let [a0, a1, a2, a3, a4] = &mut adam;
        a0.step(&mut w_enc, &dw_enc, cfg.lr, t);
        a1.step(&mut b_enc, &db_enc, cfg.lr, t);
        a2.step(&mut w_dec, &dw_dec, cfg.lr, t);
        a3.step(&mut b_dec, &db_dec, cfg.lr, t);
        a4.step(&mut log_th, &dlog_th, cfg.lr, t);
        for w in w_dec.chunks_exact_mut(d) {
            let nrm = w.iter().map(|&a| a as f64 * a as f64).sum::<f64>().sqrt();
            if nrm > 0.0 {
                w.iter_mut().for_each(|a| *a = (*a as f64 / nrm) as f32);
            }
        }
        on_step(step, err / var.max(1e-30), active as f64 / b as f64);
    }
    Ok(Sae {
        d,
        m,
        w_enc,
        b_enc,
        w_dec,
        b_dec,
        subtract_b_dec: false,
        act: Activation::JumpRelu(log_th.iter().map(|l| l.exp()).collect()),
    })
}

/// Write a JumpReLU SAE with SAELens names (`W_enc [d, m]`, `b_enc`, `W_dec [m, d]`, `b_dec`,
/// `threshold [m]`), which `Sae::load` reads back as JumpReLU. Atomic.
pub fn save_jumprelu(path: &Path, sae: &Sae) -> Result<()> {
    let Activation::JumpRelu(th) = &sae.act else {
        bail!("save_jumprelu: the SAE is not a JumpReLU SAE");
    };
    if sae.subtract_b_dec {
        bail!("save_jumprelu: SAELens files without a cfg.json do not subtract b_dec");
    }
    let (d, m) = (sae.d, sae.m);
    let tensors = vec![
        ("W_enc".to_string(), vec![d, m], sae.w_enc.clone()),
        ("b_enc".to_string(), vec![m], sae.b_enc.clone()),
        ("W_dec".to_string(), vec![m, d], sae.w_dec.clone()),
        ("b_dec".to_string(), vec![d], sae.b_dec.clone()),
        ("threshold".to_string(), vec![m], th.clone()),
    ];
    let bytes = crate::io::f32_safetensors(&tensors)?;
    crate::io::write_atomic(path, &bytes)
}
