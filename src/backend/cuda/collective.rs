//! NCCL for data parallelism, through cudarc's `nccl` module: the unique id rank 0 makes, the
//! communicator every rank joins, and the sums across ranks the training step needs (the
//! gradients once per optimizer step, a few host numbers: loss, token counts, a stop flag).
//!
//! libnccl is loaded at run time and only when a group of more than one rank forms, so the
//! binary runs without it on one GPU or the CPU. cudarc looks for it as `libnccl.so`; the pip
//! package `nvidia-nccl-cu13` and most system packages ship `libnccl.so.2` only, so
//! [`present`] also tries that name and [`library_path`] reports where it was found (`train
//! --gpus` puts a `libnccl.so` link to it on its workers' loader path).
//!
//! Every collective is queued on the backend's one stream, after the work that produced its
//! input, like any other op.

use super::backend::CudaBackend;
use super::runtime::DeviceElem;
use anyhow::{bail, Context, Result};
use cudarc::driver::CudaSlice;
use cudarc::nccl::{result as nccl_result, sys as nccl_sys, Comm, Id, ReduceOp};
use std::ffi::CStr;

/// The bytes of an NCCL unique id.
pub const ID_BYTES: usize = 128;

/// How to make libnccl available, for messages.
pub const INSTALL_HINT: &str = "install NCCL (the system package libnccl2, or `pip install \
    nvidia-nccl-cu13` and put its nvidia/nccl/lib folder on LD_LIBRARY_PATH)";

/// Whether cudarc can load libnccl by the names it tries (`libnccl.so`, ...).
pub fn loadable_by_cudarc() -> bool {
    // SAFETY: only tries to dlopen the library by its usual names; no symbol is called.
    unsafe { nccl_sys::is_culib_present() }
}

/// Whether a libnccl is on the loader path, under cudarc's names or as `libnccl.so.2`.
pub fn present() -> bool {
    loadable_by_cudarc() || library_path().is_some()
}

/// The file of the libnccl the loader finds as `libnccl.so.2` or `libnccl.so`, if any.
pub fn library_path() -> Option<std::path::PathBuf> {
    for name in ["libnccl.so.2", "libnccl.so"] {
        // SAFETY: dlopen of a shared library by name runs only its initialisers (NCCL's do
        // not touch the GPU); the handle is kept open while dladdr reads the path of one of
        // its symbols, and then closed.
        unsafe {
            let cname = std::ffi::CString::new(name).ok()?;
            let h = libc::dlopen(cname.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
            if h.is_null() {
                continue;
            }
            let sym = libc::dlsym(h, c"ncclGetVersion".as_ptr());
            let mut info: libc::Dl_info = std::mem::zeroed();
            let found = if !sym.is_null() && libc::dladdr(sym, &mut info) != 0 {
                (!info.dli_fname.is_null()).then(|| {
                    std::path::PathBuf::from(
                        CStr::from_ptr(info.dli_fname)
                            .to_string_lossy()
                            .into_owned(),
                    )
                })
            } else {
                None
            };
            libc::dlclose(h);
            if let Some(p) = found {
                return Some(std::fs::canonicalize(&p).unwrap_or(p));
            }
        }
    }
    None
}

/// NCCL's version as `(major, minor, patch)`, when cudarc can load it.
pub fn version() -> Option<(i32, i32, i32)> {
    if !loadable_by_cudarc() {
        return None;
    }
    let v = nccl_result::get_nccl_version().ok()?;
    // NCCL encodes 2.19.3 as 21903 (major * 10000 + minor * 100 + patch) since 2.9.
    Some((v / 10000, (v % 10000) / 100, v % 100))
}

fn nccl_err(what: &str, e: nccl_result::NcclError) -> anyhow::Error {
    anyhow::anyhow!("NCCL {what} failed: {:?}", e.0)
}

/// A new unique id (rank 0 makes it; the others receive it).
pub fn unique_id() -> Result<[u8; ID_BYTES]> {
    if !loadable_by_cudarc() {
        bail!("libnccl not found (data parallelism needs it): {INSTALL_HINT}");
    }
    let id = Id::new().map_err(|e| nccl_err("ncclGetUniqueId", e))?;
    let mut out = [0u8; ID_BYTES];
    for (o, c) in out.iter_mut().zip(id.internal()) {
        *o = *c as u8;
    }
    Ok(out)
}

/// The communicator of a data-parallel group, joined by [`CudaBackend::join`].
pub struct Group {
    comm: Comm,
}

// SAFETY: an NCCL communicator may be used from any thread as long as two calls on it never
// run at once; the backend keeps it behind a mutex and calls it with the lock held.
unsafe impl Send for Group {}

impl Group {
    pub fn size(&self) -> usize {
        self.comm.world_size()
    }

    pub fn rank(&self) -> usize {
        self.comm.rank()
    }
}

impl<T: DeviceElem> CudaBackend<T> {
    /// Join the group of `size` ranks as `rank` (every rank calls this; it returns once all
    /// have). A backend joins at most one group.
    pub fn join(&self, rank: usize, size: usize, id: &[u8; ID_BYTES]) -> Result<()> {
        if !loadable_by_cudarc() {
            bail!("libnccl not found (data parallelism needs it): {INSTALL_HINT}");
        }
        let mut g = self.group.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_some() {
            bail!("this backend already belongs to a data-parallel group");
        }
        let mut raw = [0 as std::ffi::c_char; ID_BYTES];
        for (r, b) in raw.iter_mut().zip(id) {
            *r = *b as std::ffi::c_char;
        }
        let comm = Comm::from_rank(self.rt.stream.clone(), rank, size, Id::uninit(raw))
            .map_err(|e| nccl_err(&format!("ncclCommInitRank (rank {rank} of {size})"), e))?;
        *g = Some(Group { comm });
        Ok(())
    }

    /// `x <- Σ over ranks of x`, in place, queued on the stream. Nothing outside a group.
    pub fn all_reduce_f32(&self, x: &mut CudaSlice<f32>) -> Result<()> {
        let g = self.group.lock().unwrap_or_else(|e| e.into_inner());
        let Some(g) = g.as_ref() else {
            return Ok(());
        };
        if x.is_empty() {
            return Ok(());
        }
        g.comm
            .all_reduce_in_place(x, &ReduceOp::Sum)
            .map_err(|e| nccl_err(&format!("all-reduce of {} floats", x.len()), e))?;
        Ok(())
    }

    /// The group, or an error naming `what` needs one.
    fn with_group<R>(&self, what: &str, f: impl FnOnce(&Group) -> Result<R>) -> Result<R> {
        let g = self.group.lock().unwrap_or_else(|e| e.into_inner());
        match g.as_ref() {
            Some(g) => f(g),
            None => bail!("{what} needs a data-parallel group (join one first)"),
        }
    }

    /// `recv <- Σ over ranks of this rank's `recv.len()` values of `send`` (ZeRO-1's gradients).
    pub fn reduce_scatter_f32(
        &self,
        send: &CudaSlice<f32>,
        recv: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.with_group("reduce-scatter", |g| {
            let n = recv.len();
            if send.len() != n * g.size() {
                bail!(
                    "reduce-scatter of {} values into {n} per rank on {} ranks",
                    send.len(),
                    g.size()
                );
            }
            g.comm
                .reduce_scatter(send, recv, &ReduceOp::Sum)
                .map_err(|e| nccl_err(&format!("reduce-scatter of {} floats", send.len()), e))?;
            Ok(())
        })
    }

    /// `recv <- every rank's `send`, in rank order` (ZeRO-1's updated weights).
    pub fn all_gather_f32(&self, send: &CudaSlice<f32>, recv: &mut CudaSlice<f32>) -> Result<()> {
        self.with_group("all-gather", |g| {
            let n = send.len();
            if recv.len() != n * g.size() {
                bail!(
                    "all-gather of {n} values per rank into {} on {} ranks",
                    recv.len(),
                    g.size()
                );
            }
            g.comm
                .all_gather(send, recv)
                .map_err(|e| nccl_err(&format!("all-gather of {} floats", recv.len()), e))?;
            Ok(())
        })
    }

    /// Host numbers summed across ranks (in f64), waiting for the result.
    pub fn all_reduce_host(&self, x: &mut [f64]) -> Result<()> {
        let g = self.group.lock().unwrap_or_else(|e| e.into_inner());
        let Some(g) = g.as_ref() else {
            return Ok(());
        };
        if x.is_empty() {
            return Ok(());
        }
        let s = &self.rt.stream;
        let mut dev = s.clone_htod(x).context("uploading numbers to reduce")?;
        g.comm
            .all_reduce_in_place(&mut dev, &ReduceOp::Sum)
            .map_err(|e| nccl_err("all-reduce of host numbers", e))?;
        let out: Vec<f64> = s.clone_dtoh(&dev).context("downloading reduced numbers")?;
        x.copy_from_slice(&out);
        Ok(())
    }
}
