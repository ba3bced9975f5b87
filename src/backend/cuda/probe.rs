//! What CUDA support this machine has, found without panicking (for `--device auto`).
//!
//! cudarc loads libcuda, libnvrtc and libcublas lazily and panics when one is missing, so each
//! library is looked for first, and the driver calls run under `catch_unwind` as a last guard
//! (a driver older than the bindings can lack a symbol).

use super::compile;
use super::gemm;
use cudarc::driver::result::device as dev_result;
use cudarc::driver::{sys as drv, CudaContext};

/// One visible GPU.
#[derive(Clone, Debug)]
pub struct GpuInfo {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub total_mem_bytes: usize,
}

/// The result of [`probe`].
#[derive(Clone, Debug, Default)]
pub struct DeviceProbe {
    pub libcuda: bool,
    pub libnvrtc: bool,
    pub libcublas: bool,
    /// The driver's CUDA version as `(major, minor)`, e.g. `(13, 0)`.
    pub driver_version: Option<(i32, i32)>,
    pub nvrtc_version: Option<(i32, i32)>,
    pub gpus: Vec<GpuInfo>,
    /// Why the GPU cannot be used, when it cannot.
    pub problem: Option<String>,
}

impl DeviceProbe {
    /// Whether the CUDA backend can run here.
    pub fn usable(&self) -> bool {
        self.problem.is_none()
    }

    /// One line for messages: the first GPU, or why there is none.
    pub fn summary(&self) -> String {
        match (&self.problem, self.gpus.first()) {
            (Some(p), _) => format!("no usable CUDA GPU: {p}"),
            (None, Some(g)) => format!(
                "cuda:{} {} (sm_{}{}, {:.0} GiB){}",
                g.ordinal,
                g.name,
                g.compute_capability.0,
                g.compute_capability.1,
                g.total_mem_bytes as f64 / (1u64 << 30) as f64,
                if self.gpus.len() > 1 {
                    format!(", {} GPUs", self.gpus.len())
                } else {
                    String::new()
                }
            ),
            (None, None) => "no usable CUDA GPU".to_string(),
        }
    }
}

/// Driver version and the GPUs, or why they could not be read.
type DriverInfo = Result<(Option<(i32, i32)>, Vec<GpuInfo>), String>;

/// Look for libcuda, a GPU, libnvrtc and libcublas. Never panics.
pub fn probe() -> DeviceProbe {
    let mut p = DeviceProbe {
        // SAFETY: each only tries to dlopen its library; no symbol is called.
        libcuda: unsafe { drv::is_culib_present() },
        libnvrtc: compile::nvrtc_present(),
        libcublas: gemm::cublas_present(),
        ..Default::default()
    };
    if p.libnvrtc {
        p.nvrtc_version = compile::nvrtc_version().ok();
    }
    if !p.libcuda {
        p.problem = Some("libcuda not found (no NVIDIA driver, or not on the loader path)".into());
        return p;
    }
    let driver = std::panic::catch_unwind(|| -> DriverInfo {
        let count = CudaContext::device_count().map_err(|e| format!("CUDA driver: {e}"))?;
        let mut version: std::ffi::c_int = 0;
        // SAFETY: libcuda is present and initialised by device_count; valid out-pointer.
        let v = unsafe { drv::cuDriverGetVersion(&mut version) };
        let version =
            (v == drv::CUresult::CUDA_SUCCESS).then_some((version / 1000, (version % 1000) / 10));
        // Device queries need no context: creating one on every GPU would be slow on a large
        // node and fail on GPUs other jobs hold in exclusive mode, though only device 0 is used
        // (Runtime::new creates its context and reports a busy device 0 itself).
        let mut gpus = Vec::new();
        for ordinal in 0..count.max(0) {
            let dev = dev_result::get(ordinal).map_err(|e| format!("device {ordinal}: {e}"))?;
            let attr = |a| {
                // SAFETY: `dev` is a valid device handle from cuDeviceGet.
                unsafe { dev_result::get_attribute(dev, a) }.unwrap_or(0)
            };
            use drv::CUdevice_attribute as A;
            gpus.push(GpuInfo {
                ordinal: ordinal as usize,
                name: dev_result::get_name(dev).unwrap_or_else(|_| "unknown GPU".into()),
                compute_capability: (
                    attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
                    attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR),
                ),
                // SAFETY: as above.
                total_mem_bytes: unsafe { dev_result::total_mem(dev) }.unwrap_or(0),
            });
        }
        Ok((version, gpus))
    });
    match driver {
        Ok(Ok((version, gpus))) => {
            p.driver_version = version;
            p.gpus = gpus;
        }
        Ok(Err(e)) => {
            p.problem = Some(e);
            return p;
        }
        Err(_) => {
            p.problem = Some("the CUDA driver library lacks a function this build needs".into());
            return p;
        }
    }
    p.problem = if p.gpus.is_empty() {
        Some("the CUDA driver reports no GPU".into())
    } else if !p.libnvrtc {
        Some(compile::NVRTC_MISSING.into())
    } else if !p.libcublas {
        Some("libcublas not found (put its folder on LD_LIBRARY_PATH)".into())
    } else {
        None
    };
    p
}
