//! One CUDA context and stream, the kernel-module cache, the checked launch helper, and the
//! element types kernels are instantiated for.
//!
//! Kernel modules are compiled on first use: `kernels/<module>.cu` to a cubin for the device's
//! own architecture (see [`super::compile`]), cached on disk under
//! `$XDG_CACHE_HOME/caft-fast/kernels` (or `~/.cache/caft-fast/kernels`) keyed by the source
//! hash, the architecture and the NVRTC version, then loaded into the context. When the cubin
//! cannot be produced or loaded, the PTX of the same source is tried.
//!
//! Everything runs on the context's default stream, so cudarc's per-buffer event tracking
//! (which only switches on with a second stream) stays off.

use super::compile::{self, Output};
use anyhow::{anyhow, bail, Context, Result};
use cudarc::driver::{
    sys as drv, CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr,
    DeviceRepr, DriverError, LaunchArgs, LaunchConfig, ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// Storage element of activations on the device: kernels exist as `<op>_<SUFFIX>`.
pub trait DeviceElem: DeviceRepr + ValidAsZeroBits + Copy + Send + Sync + 'static {
    /// Kernel-name suffix: `"bf16"` or `"f32"`.
    const SUFFIX: &'static str;
    fn from_f32(x: f32) -> Self;
    fn to_f32(self) -> f32;
}

impl DeviceElem for half::bf16 {
    const SUFFIX: &'static str = "bf16";
    fn from_f32(x: f32) -> Self {
        half::bf16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
}

impl DeviceElem for f32 {
    const SUFFIX: &'static str = "f32";
    fn from_f32(x: f32) -> Self {
        x
    }
    fn to_f32(self) -> f32 {
        self
    }
}

/// A CUDA device opened for use: context, stream, compiled-kernel cache.
pub struct Runtime {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    arch: (u32, u32),
    sm_count: usize,
    name: String,
    modules: Mutex<HashMap<String, Arc<CudaModule>>>,
    functions: Mutex<HashMap<(String, String), CudaFunction>>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("ordinal", &self.ctx.ordinal())
            .field("name", &self.name)
            .field("arch", &self.arch)
            .field("sm_count", &self.sm_count)
            .finish()
    }
}

impl Runtime {
    /// Open device `ordinal`. Fails (never panics) when libcuda or the device is missing.
    pub fn new(ordinal: usize) -> Result<Runtime> {
        // SAFETY: only tries to dlopen libcuda; no symbol is called.
        if !unsafe { drv::is_culib_present() } {
            bail!(
                "libcuda not found: no NVIDIA driver on this machine (or not on the loader path)"
            );
        }
        if !compile::nvrtc_present() {
            bail!(compile::NVRTC_MISSING);
        }
        let count = CudaContext::device_count().context("initialising the CUDA driver")?;
        if count <= 0 {
            bail!("the CUDA driver reports no device");
        }
        if ordinal >= count as usize {
            bail!("CUDA device {ordinal} requested, but only {count} present");
        }
        let ctx = CudaContext::new(ordinal)
            .with_context(|| format!("creating a CUDA context on device {ordinal}"))?;
        let (major, minor) = ctx
            .compute_capability()
            .context("reading compute capability")?;
        let sm_count = ctx
            .attribute(drv::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .context("reading the multiprocessor count")?;
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".to_string());
        // SAFETY: every buffer of this runtime is used on the one stream below, so cudarc's
        // per-buffer events (which order uses across streams) have nothing to order.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        Ok(Runtime {
            ctx,
            stream,
            arch: (major as u32, minor as u32),
            sm_count: sm_count.max(1) as usize,
            name,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
        })
    }

    /// Compute capability `(major, minor)`.
    pub fn arch(&self) -> (u32, u32) {
        self.arch
    }

    /// Number of streaming multiprocessors.
    pub fn sm_count(&self) -> usize {
        self.sm_count
    }

    /// The device's name, e.g. "NVIDIA H200".
    pub fn device_name(&self) -> &str {
        &self.name
    }

    /// Kernel `name` of `kernels/<module>.cu`, compiled and loaded on first use, then cached.
    pub fn function(&self, module: &str, name: &str) -> Result<CudaFunction> {
        let key = (module.to_string(), name.to_string());
        if let Some(f) = lock(&self.functions).get(&key) {
            return Ok(f.clone());
        }
        let m = self.module(module)?;
        let f = m
            .load_function(name)
            .with_context(|| format!("kernel {name} not found in kernels/{module}.cu"))?;
        lock(&self.functions).insert(key, f.clone());
        Ok(f)
    }

    /// Compile (or fetch from the caches) and load `kernels/<module>.cu`.
    pub fn module(&self, module: &str) -> Result<Arc<CudaModule>> {
        if let Some(m) = lock(&self.modules).get(module) {
            return Ok(m.clone());
        }
        let arch = compile::arch_name(self.arch.0, self.arch.1);
        let loaded = match self.load_cubin(module, &arch) {
            Ok(m) => m,
            Err(cubin_err) => {
                let ptx = compile::compile(module, &arch, Output::Ptx, &[])
                    .with_context(|| format!("compiling kernels/{module}.cu to PTX"))?;
                let text = String::from_utf8(ptx.image).context("PTX is not UTF-8")?;
                self.ctx.load_module(Ptx::from_src(text)).map_err(|e| {
                    anyhow!(
                        "loading kernels/{module}.cu failed both as a cubin ({cubin_err:#}) \
                         and as PTX ({e}); a driver older than the NVRTC in use refuses its PTX"
                    )
                })?
            }
        };
        lock(&self.modules).insert(module.to_string(), loaded.clone());
        Ok(loaded)
    }

    fn load_cubin(&self, module: &str, arch: &str) -> Result<Arc<CudaModule>> {
        let (nv_major, nv_minor) = compile::nvrtc_version()?;
        let file = format!(
            "{module}-{}-{arch}-nvrtc{nv_major}.{nv_minor}.cubin",
            compile::sources_hash()
        );
        let cached = cache_dir().map(|d| d.join(&file));
        if let Some(path) = &cached {
            if let Ok(bytes) = std::fs::read(path) {
                if let Ok(m) = self.ctx.load_module(Ptx::from_binary(bytes)) {
                    return Ok(m);
                }
            }
        }
        let cubin = compile::compile(module, arch, Output::Cubin, &[])
            .with_context(|| format!("compiling kernels/{module}.cu for {arch}"))?;
        let m = self
            .ctx
            .load_module(Ptx::from_binary(cubin.image.clone()))
            .with_context(|| format!("loading the {arch} cubin of kernels/{module}.cu"))?;
        if let Some(path) = &cached {
            // The disk cache is an optimisation: failing to write it is not an error.
            let _ = crate::io::write_atomic(path, &cubin.image);
        }
        Ok(m)
    }

    /// Launch `func` (named `name` for messages) with the arguments pushed on `args`, and turn a
    /// launch failure into an error that names the kernel and its configuration.
    ///
    /// # Safety
    /// The arguments pushed on `args` must match the kernel's parameter list in number, order and
    /// type, and every buffer must be large enough for the indices the kernel computes from the
    /// scalar arguments and `cfg`.
    pub unsafe fn launch(
        &self,
        name: &str,
        cfg: LaunchConfig,
        mut args: LaunchArgs<'_>,
    ) -> Result<()> {
        // SAFETY: forwarded to the caller (see the function's contract).
        unsafe { args.launch(cfg) }.with_context(|| {
            format!(
                "launching {name} (grid {:?}, block {:?}, {} B shared)",
                cfg.grid_dim, cfg.block_dim, cfg.shared_mem_bytes
            )
        })?;
        Ok(())
    }

    /// The raw device address of a buffer or view, for kernel arguments and cuBLAS calls.
    /// Everything runs on one stream with event tracking off, so no synchronisation guard is
    /// needed; the address stays valid while `buf` is borrowed and, since frees are
    /// stream-ordered, for work queued before `buf` is dropped.
    pub fn ptr<T, S: DevicePtr<T>>(&self, buf: &S) -> u64 {
        let (p, _guard) = buf.device_ptr(&self.stream);
        p
    }

    /// `n` zeroed elements of `E` on the device; `what()` names the buffer in errors. Out of
    /// memory, the error says how much was asked and is free, and what to lower.
    pub fn alloc_zeros<E: DeviceRepr + ValidAsZeroBits>(
        &self,
        n: usize,
        what: impl FnOnce() -> String,
    ) -> Result<CudaSlice<E>> {
        self.stream
            .alloc_zeros::<E>(n)
            .map_err(|e| self.explain(e, n * std::mem::size_of::<E>(), what))
    }

    /// A device copy of `host` (errors as [`Runtime::alloc_zeros`]).
    pub fn upload<E: DeviceRepr>(
        &self,
        host: &[E],
        what: impl FnOnce() -> String,
    ) -> Result<CudaSlice<E>> {
        self.stream
            .clone_htod(host)
            .map_err(|e| self.explain(e, std::mem::size_of_val(host), what))
    }

    /// A driver error of an allocation of `bytes` as an error for people: out of memory, the
    /// sizes and the flags that shrink what a command keeps on the GPU.
    fn explain(
        &self,
        e: DriverError,
        bytes: usize,
        what: impl FnOnce() -> String,
    ) -> anyhow::Error {
        if e.0 != drv::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            return anyhow::Error::new(e).context(what());
        }
        let mib = |b: usize| b as f64 / (1u64 << 20) as f64;
        let (free, total) = self.ctx.mem_get_info().unwrap_or((0, 0));
        anyhow!(
            "{}: the GPU ran out of memory ({:.1} MiB asked, {:.0} MiB free of {:.0} MiB). Use a \
             smaller batch (--batch-size; when training, --grad-accum keeps the effective batch) \
             or shorter sequences (--max-seq-len), or stop other processes on the GPU",
            what(),
            mib(bytes),
            mib(free),
            mib(total)
        )
    }

    /// Block until every queued operation finished, surfacing asynchronous kernel faults.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().context("CUDA stream synchronize")
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves a map that is still consistent (inserts only).
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `$XDG_CACHE_HOME/caft-fast/kernels`, else `$HOME/.cache/caft-fast/kernels`; created if needed.
pub fn cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    let dir = base.join("caft-fast").join("kernels");
    std::fs::create_dir_all(&dir).ok()?;
    Some(dir)
}
