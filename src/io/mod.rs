//! Files the workflows write and read: atomic writes (every output and the kernel cache),
//! JSON reports, f32 safetensors, and the provenance recorded in each output.

pub mod npy;
mod safetensors;

pub use self::safetensors::{f32_safetensors, read_f32_safetensors, NamedTensors};
use anyhow::{Context, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::path::Path;

/// Write `content` to `path` atomically: a temporary file in the same folder, flushed to disk,
/// then a rename, so a reader (or a crash, or a full disk) never sees a half-written file and
/// an earlier version at `path` survives any failure. The temporary file is removed on error.
pub fn write_atomic(path: &Path, content: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .with_context(|| format!("{}: path has no file name", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let write = || -> Result<()> {
        let mut f =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(content)
            .with_context(|| format!("writing {} ({} bytes)", tmp.display(), content.len()))?;
        f.sync_all()
            .with_context(|| format!("flushing {}", tmp.display()))?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
    };
    write().inspect_err(|_| {
        // Best effort: the write already failed and that error is the one to report.
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Write `value` as pretty JSON to `path` atomically, creating its folder.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut bytes = serde_json::to_vec_pretty(value)?;
    bytes.push(b'\n');
    write_atomic(path, &bytes)
}

/// Read and parse a JSON file; errors name the file (and the line and column of a syntax error).
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))
}

/// Lowercase hex SHA-256 of `bytes` (data, directions and configuration hashes in outputs).
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// SHA-256 of a file's bytes, with an error naming the file.
pub fn file_sha256(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(sha256_hex(&bytes))
}

/// The program name and version recorded in every output.
pub fn program() -> String {
    format!("caft-fast {}", env!("CARGO_PKG_VERSION"))
}

/// Bytes available to this user on the file system that holds `path` (or, when it does not
/// exist yet, its nearest existing ancestor); `None` where the system does not say.
pub fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let mut p = if path.as_os_str().is_empty() {
        Path::new(".")
    } else {
        path
    };
    while !p.exists() {
        p = match p.parent() {
            Some(q) if !q.as_os_str().is_empty() => q,
            _ if p != Path::new(".") => Path::new("."),
            _ => return None, // not even the working directory exists
        };
    }
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a NUL-terminated path and `st` points to writable memory of the struct's
    // size; statvfs fills it on success (return 0), and it is read only then.
    let st = unsafe {
        if libc::statvfs(c.as_ptr(), st.as_mut_ptr()) != 0 {
            return None;
        }
        st.assume_init()
    };
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}
