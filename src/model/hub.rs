//! Models named by their Hugging Face Hub id (`Qwen/Qwen2.5-7B-Instruct`, optionally
//! `@REVISION`), found in the local Hugging Face cache as `huggingface_hub` lays it out:
//!
//! ```text
//! <cache>/models--<org>--<name>/refs/<branch>        the commit a branch or tag points to
//! <cache>/models--<org>--<name>/snapshots/<commit>/  the files of that commit
//! ```
//!
//! where `<cache>` is `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`.
//! A revision is a branch or tag (looked up in `refs/`, `main` by default) or a commit hash
//! (a snapshot folder, or a unique prefix of one). Nothing is downloaded.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// `(repo id, revision)` when `s` has the shape of a Hub id: `ORG/NAME` or `ORG/NAME@REV`, each
/// part made of letters, digits, `-`, `_` and `.` (not starting with `.`). Paths that exist are
/// never Hub ids (the caller checks first).
pub fn parse_id(s: &str) -> Option<(&str, Option<&str>)> {
    let (id, rev) = match s.split_once('@') {
        Some((id, rev)) => (id, Some(rev)),
        None => (s, None),
    };
    let part_ok = |p: &str| {
        !p.is_empty()
            && !p.starts_with('.')
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    let (org, name) = id.split_once('/')?;
    let rev_ok = rev.is_none_or(|r| {
        !r.is_empty()
            && !r.contains("..")
            && r.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
    });
    (part_ok(org) && part_ok(name) && rev_ok).then_some((id, rev))
}

/// The cache folder: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`.
pub fn cache_dir() -> Option<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("HF_HUB_CACHE")
        .or_else(|| var("HF_HOME").map(|h| h.join("hub")))
        .or_else(|| var("HOME").map(|h| h.join(".cache").join("huggingface").join("hub")))
}

/// The snapshot folder of `id` (`ORG/NAME`) at `revision` (default `main`) in `cache`.
pub fn snapshot_in(cache: &Path, id: &str, revision: Option<&str>) -> Result<PathBuf> {
    let repo = cache.join(format!("models--{}", id.replace('/', "--")));
    if !repo.is_dir() {
        bail!(
            "model {id}: no such local path, and not in the Hugging Face cache: looked for {} \
             (the cache is $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub; \
             download it with `huggingface-cli download {id}` or give a local folder)",
            repo.display()
        );
    }
    let snapshots = repo.join("snapshots");
    let rev = revision.unwrap_or("main");
    let ref_file = repo.join("refs").join(rev);
    let commit = if ref_file.is_file() {
        let c = std::fs::read_to_string(&ref_file)
            .with_context(|| format!("reading {}", ref_file.display()))?;
        c.trim().to_string()
    } else {
        // Not a branch or tag: a commit hash, or a unique prefix of one.
        let mut found: Vec<String> = std::fs::read_dir(&snapshots)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(rev))
                    .collect()
            })
            .unwrap_or_default();
        found.sort();
        match found.len() {
            1 => found.remove(0),
            0 => bail!(
                "model {id}: revision {rev:?} is neither a branch or tag in {} nor a commit in \
                 {}",
                repo.join("refs").display(),
                snapshots.display()
            ),
            _ => bail!("model {id}: revision {rev:?} matches several commits: {found:?}"),
        }
    };
    let dir = snapshots.join(&commit);
    if !dir.is_dir() {
        bail!(
            "model {id}@{rev}: the cache names commit {commit} but has no snapshot {} (an \
             interrupted download?)",
            dir.display()
        );
    }
    Ok(dir)
}

/// The local folder of a Hub id in the cache ([`cache_dir`]).
pub fn resolve(spec: &str) -> Result<PathBuf> {
    let (id, rev) = parse_id(spec).with_context(|| format!("{spec:?} is not a Hub id"))?;
    let cache = cache_dir().context(
        "no Hugging Face cache folder: set HF_HUB_CACHE or HF_HOME (HOME is not set either)",
    )?;
    snapshot_in(&cache, id, rev)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_are_told_from_paths() {
        assert_eq!(
            parse_id("Qwen/Qwen2.5-7B-Instruct"),
            Some(("Qwen/Qwen2.5-7B-Instruct", None))
        );
        assert_eq!(
            parse_id("google/gemma-2-2b@refs/pr/3"),
            Some(("google/gemma-2-2b", Some("refs/pr/3")))
        );
        for not in [
            "model.gguf",
            "a/b/c",
            "./x/y",
            "/abs/x",
            "a/",
            "/b",
            "a/b@",
            "a/b@../x",
            "a b/c",
        ] {
            assert_eq!(parse_id(not), None, "{not}");
        }
    }
}
