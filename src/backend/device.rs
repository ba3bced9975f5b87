//! Which backend a command runs on: `auto` (a usable CUDA GPU, else the CPU), `cpu` or `cuda`,
//! resolved once, and [`with_backend!`](crate::with_backend), the one dispatch from a resolved
//! device to code that is generic over [`Backend`](super::Backend).

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// The device a command asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// A CUDA GPU when one is usable, else the CPU (with a one-line notice).
    #[default]
    Auto,
    Cpu,
    Cuda,
}

/// The names `--device` and config files accept.
pub const DEVICE_NAMES: [&str; 3] = ["auto", "cpu", "cuda"];

impl FromStr for Device {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Device> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "auto" => Device::Auto,
            "cpu" => Device::Cpu,
            "cuda" => Device::Cuda,
            _ => bail!("device {s:?}: expected auto, cpu or cuda"),
        })
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Device::Auto => "auto",
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        })
    }
}

impl Device {
    /// Turn `auto` into a concrete device, printing a one-line notice on fallback; `cuda` where
    /// no GPU is usable is an error that says why. Never returns `Auto`.
    pub fn resolve(self) -> Result<Device> {
        match self {
            Device::Cpu => Ok(Device::Cpu),
            Device::Cuda => {
                // Refuse at once, before a command creates any output, rather than at the first
                // kernel it would compile.
                let p = super::cuda::probe::probe();
                if !p.usable() {
                    bail!("--device cuda: {}", p.summary());
                }
                Ok(Device::Cuda)
            }
            Device::Auto => {
                let p = super::cuda::probe::probe();
                if p.usable() {
                    Ok(Device::Cuda)
                } else {
                    eprintln!("note: running on the CPU ({})", p.summary());
                    Ok(Device::Cpu)
                }
            }
        }
    }
}

/// The GPU backend every command uses: device 0 (`CUDA_VISIBLE_DEVICES` picks another), bf16
/// weights and activations, f32 LoRA state.
pub fn cuda_backend() -> Result<super::cuda::backend::CudaBackend<half::bf16>> {
    super::cuda::backend::CudaBackend::new(cuda_ordinal()?)
}

/// The GPU this process uses: device 0 when one GPU is visible (alone, or a launcher such as
/// `train --gpus` or `srun --gpus-per-task 1` gave each rank its own through
/// `CUDA_VISIBLE_DEVICES`), else `LOCAL_RANK`, the rank's place on its node as torchrun and
/// SLURM scripts set it (0 when unset).
pub fn cuda_ordinal() -> Result<usize> {
    let local = match std::env::var("LOCAL_RANK") {
        Ok(v) if !v.trim().is_empty() => v.trim().parse::<usize>().map_err(|_| {
            anyhow::anyhow!("environment variable LOCAL_RANK={v:?} is not a GPU number")
        })?,
        _ => 0,
    };
    if local == 0 {
        return Ok(0);
    }
    let count = super::cuda::probe::probe().gpus.len();
    match count {
        1 => Ok(0),
        n if local < n => Ok(local),
        n => bail!(
            "LOCAL_RANK={local} picks GPU {local}, but this process sees {n} (set \
             CUDA_VISIBLE_DEVICES per rank, or start at most {n} ranks on this node)"
        ),
    }
}

/// Run `$body` with `$be` bound to the backend `$device` resolves to: `&CudaBackend<bf16>` or
/// `&CpuBackend`. The body is compiled once per backend type (a closure cannot be generic over
/// it), so it may call any function generic over [`Backend`](crate::backend::Backend). It
/// evaluates to the body's value; errors of resolving or creating the backend return early
/// with `?`.
///
/// ```ignore
/// let report = with_backend!(device, |be| evaluate_on(be, &spec, &loaded))?;
/// ```
#[macro_export]
macro_rules! with_backend {
    ($device:expr, |$be:ident| $body:expr) => {
        match $crate::backend::device::Device::resolve($device)? {
            $crate::backend::device::Device::Cuda => {
                let $be = &$crate::backend::device::cuda_backend()?;
                $body
            }
            _ => {
                let $be = &$crate::backend::cpu::CpuBackend::new();
                $body
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_bad_names_are_refused() {
        for name in DEVICE_NAMES {
            let d: Device = name.parse().unwrap();
            assert_eq!(d.to_string(), name);
        }
        assert_eq!("CUDA".parse::<Device>().unwrap(), Device::Cuda);
        let e = "gpu".parse::<Device>().unwrap_err().to_string();
        assert!(
            e.contains("\"gpu\"") && e.contains("auto, cpu or cuda"),
            "{e}"
        );
    }

    #[test]
    fn cpu_resolves_to_itself_and_nothing_resolves_to_auto() {
        assert_eq!(Device::Cpu.resolve().unwrap(), Device::Cpu);
        // Auto resolves to whatever this machine has, but never stays Auto.
        assert_ne!(Device::Auto.resolve().unwrap(), Device::Auto);
    }
}
