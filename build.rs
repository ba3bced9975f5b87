//! Embeds the CUDA kernel sources of `kernels/` into the binary.
//!
//! Writes `$OUT_DIR/kernel_sources.rs` with
//! - `KERNEL_SOURCES: &[(&str, &str)]`: `(file name, contents)` of every `kernels/*.cu` and
//!   `kernels/*.cuh`, sorted by name, contents pulled in with `include_str!` so cargo tracks them;
//! - `KERNEL_SOURCES_HASH: &str`: a 64-bit FNV-1a hash (hex) over every name and content, used as
//!   part of the key of the on-disk cache of compiled kernels.
//!
//! No build dependencies: the hash only needs to change when any source changes.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let dir = manifest.join("kernels");
    println!("cargo:rerun-if-changed=kernels");

    let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file()
                    && matches!(
                        p.extension().and_then(|e| e.to_str()),
                        Some("cu") | Some("cuh")
                    )
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    files.sort();

    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    let mut entries = String::new();
    for path in &files {
        println!("cargo:rerun-if-changed={}", path.display());
        let name = file_name(path);
        let text = std::fs::read(path)
            .unwrap_or_else(|e| panic!("reading kernel source {}: {e}", path.display()));
        hash = fnv1a(hash, name.as_bytes());
        hash = fnv1a(hash, &[0]);
        hash = fnv1a(hash, &text);
        hash = fnv1a(hash, &[0]);
        writeln!(
            entries,
            "    ({name:?}, include_str!(concat!(env!(\"CARGO_MANIFEST_DIR\"), \"/kernels/{name}\"))),"
        )
        .expect("write to String");
    }

    let out = format!(
        "/// Every kernel source file: `(file name, contents)`, sorted by name.\n\
         pub const KERNEL_SOURCES: &[(&str, &str)] = &[\n{entries}];\n\
         /// Hash of all kernel sources (names and contents).\n\
         pub const KERNEL_SOURCES_HASH: &str = \"{hash:016x}\";\n"
    );
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    std::fs::write(out_dir.join("kernel_sources.rs"), out).expect("writing kernel_sources.rs");
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_else(|| panic!("kernel file name is not UTF-8: {}", path.display()))
        .to_string()
}
