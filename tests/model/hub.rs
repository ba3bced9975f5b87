//! Models named by their Hugging Face Hub id, found in a local cache laid out as
//! `huggingface_hub` lays it out (`models--ORG--NAME/{refs,snapshots,blobs}`), which the tests
//! build themselves: no network.

use crate::support::*;
use std::path::Path;
use std::process::Output;

/// A cache holding the tiny Llama as `tiny-org/tiny-llama`: two commits (`main` points to the
/// second; the tag `v1` to the first), snapshot files linked to blobs as the Hub client does.
fn build_cache(root: &Path) -> (String, String) {
    let repo = root.join("models--tiny-org--tiny-llama");
    let (c1, c2) = ("1111111aaaa".to_string(), "2222222bbbb".to_string());
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    for (i, commit) in [&c1, &c2].into_iter().enumerate() {
        let snap = repo.join("snapshots").join(commit);
        std::fs::create_dir_all(&snap).unwrap();
        for f in ["config.json", "model.safetensors"] {
            let blob = repo.join("blobs").join(format!("{f}-{i}"));
            std::fs::copy(tiny_llama().join(f), &blob).unwrap();
            std::os::unix::fs::symlink(format!("../../blobs/{f}-{i}"), snap.join(f)).unwrap();
        }
    }
    std::fs::write(repo.join("refs").join("main"), &c2).unwrap();
    std::fs::write(repo.join("refs").join("v1"), format!("{c1}\n")).unwrap();
    (c1, c2)
}

/// `bench-step` on `model`, with the cache at `cache` (`HF_HUB_CACHE`).
fn bench(cache: &Path, model: &str) -> Output {
    crate::bad_input::bench_step(
        4,
        ["--model".as_ref(), model.as_ref()],
        &[("HF_HUB_CACHE", cache)],
    )
}

#[test]
fn hub_ids_resolve_to_cache_snapshots() {
    let cache = TempDir::new("hub-cache");
    let (c1, c2) = build_cache(&cache);
    let snap = |c: &str| {
        cache
            .join("models--tiny-org--tiny-llama/snapshots")
            .join(c)
            .display()
            .to_string()
    };
    // main, a tag, a full commit and a unique prefix of one.
    for (spec, commit) in [
        ("tiny-org/tiny-llama".to_string(), &c2),
        ("tiny-org/tiny-llama@v1".to_string(), &c1),
        (format!("tiny-org/tiny-llama@{c1}"), &c1),
        ("tiny-org/tiny-llama@2222".to_string(), &c2),
    ] {
        let out = assert_ok(&bench(&cache, &spec));
        assert!(out.contains(&snap(commit)), "{spec}: {out}");
    }
    // The library resolves the same way.
    let dir = caft_fast::model::hub::snapshot_in(&cache, "tiny-org/tiny-llama", Some("v1"));
    assert_eq!(dir.unwrap().display().to_string(), snap(&c1));
}

#[test]
fn missing_models_revisions_and_snapshots_say_where_they_looked() {
    let cache = TempDir::new("hub-cache-bad");
    let (c1, _) = build_cache(&cache);
    let looked = cache.join("models--tiny-org--other").display().to_string();
    assert_error(
        &bench(&cache, "tiny-org/other"),
        &[
            "tiny-org/other",
            "not in the Hugging Face cache",
            &looked,
            "HF_HUB_CACHE",
        ],
    );
    assert_error(
        &bench(&cache, "tiny-org/tiny-llama@no-such-rev"),
        &["no-such-rev", "neither a branch or tag", "refs"],
    );
    // A ref naming a commit whose snapshot is gone (an interrupted download).
    let repo = cache.join("models--tiny-org--tiny-llama");
    std::fs::write(repo.join("refs/broken"), "3333333cccc").unwrap();
    assert_error(
        &bench(&cache, "tiny-org/tiny-llama@broken"),
        &["3333333cccc", "no snapshot"],
    );
    // A sharded snapshot whose index names a shard that is not there.
    let snap = repo.join("snapshots").join(&c1);
    std::fs::remove_file(snap.join("model.safetensors")).unwrap();
    let index = serde_json::json!({
        "metadata": {},
        "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}
    });
    std::fs::write(snap.join("model.safetensors.index.json"), index.to_string()).unwrap();
    assert_error(
        &bench(&cache, "tiny-org/tiny-llama@v1"),
        &["model-00001-of-00002.safetensors"],
    );
}
