//! The crate's layers point one way, checked by reading the sources (docs/architecture.md,
//! "Layers"): the command line on top; the workflows (train, directions, eval, generate, judge) below
//! it; the model; the backends, which know nothing above them. Each rule names the files it
//! covers and the module paths they must not use; a violation prints `file:line` and the line.

mod support;

use std::path::{Path, PathBuf};
use support::repo;

/// A rule: files under `scope` (relative to `src/`, a folder or a file) except those under
/// `except` must not mention any of `forbidden` in code.
struct Rule {
    what: &'static str,
    scope: &'static str,
    except: &'static [&'static str],
    forbidden: &'static [&'static str],
}

const RULES: &[Rule] = &[
    Rule {
        what: "only the command line knows the command line",
        scope: "",
        except: &["cli/", "main.rs"],
        forbidden: &["crate::cli", "caft_fast::cli"],
    },
    Rule {
        what: "only the command line knows clap",
        scope: "",
        except: &["cli/", "main.rs"],
        forbidden: &["clap::", "use clap"],
    },
    Rule {
        what: "backends know nothing above them",
        scope: "backend/",
        except: &[],
        forbidden: &[
            "crate::model",
            "crate::train",
            "crate::eval",
            "crate::directions",
            "crate::generate",
            "crate::data",
            "crate::report",
            "crate::judge",
            "crate::cli",
            "crate::dist",
        ],
    },
    Rule {
        what: "the model uses no workflow",
        scope: "model/",
        except: &[],
        forbidden: &[
            "crate::train",
            "crate::eval",
            "crate::directions",
            "crate::generate",
            "crate::judge",
            "crate::cli",
        ],
    },
    Rule {
        what: "the judge uses no other workflow (the command line hands it the questions)",
        scope: "judge/",
        except: &[],
        forbidden: &[
            "crate::train",
            "crate::eval",
            "crate::directions",
            "crate::generate",
            "crate::cli",
        ],
    },
    Rule {
        what: "training internals stay in train/ (the entry is train::run, a function)",
        scope: "",
        except: &["train/"],
        forbidden: &[
            "crate::train::run::",
            "crate::train::data",
            "crate::train::adapter",
            "crate::train::plot",
        ],
    },
    Rule {
        what: "shared modules (data, dist, io, report, linalg, util) use no workflow",
        scope: "",
        except: &[
            "backend/",
            "cli/",
            "directions/",
            "eval/",
            "generate/",
            "judge/",
            "model/",
            "train/",
            "lib.rs",
            "main.rs",
        ],
        forbidden: &[
            "crate::train",
            "crate::eval",
            "crate::directions",
            "crate::generate",
            "crate::judge",
            "crate::cli",
        ],
    },
];

/// Files longer than this need a reason in docs/architecture.md.
const MAX_LINES: usize = 900;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The code of a line: everything before a `//` comment (doc comments included). Strings that
/// contain `//` are rare in this crate and would only hide a mention, never invent one.
fn code(line: &str) -> &str {
    line.split("//").next().unwrap_or("")
}

/// Every violation of `rules` in `files` (`(path relative to src/, text)`), as
/// `file:line: rule: line`.
fn violations(rules: &[Rule], files: &[(String, String)]) -> Vec<String> {
    let mut out = Vec::new();
    for rule in rules {
        for (rel, text) in files {
            let in_scope =
                rel.starts_with(rule.scope) && !rule.except.iter().any(|e| rel.starts_with(e));
            if !in_scope {
                continue;
            }
            for (i, line) in text.lines().enumerate() {
                let c = code(line);
                if let Some(f) = rule.forbidden.iter().find(|f| c.contains(*f)) {
                    out.push(format!(
                        "src/{rel}:{}: {} (uses {f}): {}",
                        i + 1,
                        rule.what,
                        line.trim()
                    ));
                }
            }
        }
    }
    out
}

fn sources() -> Vec<(String, String)> {
    let src = repo().join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(
        files.len() > 50,
        "found only {} files under {}",
        files.len(),
        src.display()
    );
    files
        .iter()
        .map(|p| {
            let rel = p
                .strip_prefix(&src)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/");
            (rel, std::fs::read_to_string(p).unwrap())
        })
        .collect()
}

#[test]
fn layers_point_one_way() {
    let v = violations(RULES, &sources());
    assert!(
        v.is_empty(),
        "{} module boundary violations:\n{}",
        v.len(),
        v.join("\n")
    );
}

#[test]
fn the_checker_finds_a_planted_violation_and_ignores_comments() {
    let files = vec![
        (
            "backend/cpu/x.rs".to_string(),
            "// crate::model in a comment is fine\nuse crate::model::lora::Target;\n".to_string(),
        ),
        (
            "cli/train.rs".to_string(),
            "use crate::cli::common;\n".to_string(),
        ),
        (
            "eval/mc.rs".to_string(),
            "let d = crate::cli::Device::Cpu;\n".to_string(),
        ),
    ];
    let v = violations(RULES, &files);
    assert_eq!(v.len(), 2, "{v:#?}");
    assert!(v[0].starts_with("src/eval/mc.rs:1:"), "{v:#?}");
    assert!(v[1].starts_with("src/backend/cpu/x.rs:2:"), "{v:#?}");
}

/// A file over [`MAX_LINES`] lines is allowed only when docs/architecture.md names it (with
/// the reason) in its "Long files" section.
#[test]
fn long_files_are_explained() {
    let doc = std::fs::read_to_string(repo().join("docs/architecture.md")).unwrap();
    let section = doc
        .split("## Long files")
        .nth(1)
        .expect("docs/architecture.md has a '## Long files' section")
        .split("\n## ")
        .next()
        .unwrap();
    let long: Vec<String> = sources()
        .into_iter()
        .filter(|(_, t)| t.lines().count() > MAX_LINES)
        .map(|(rel, t)| format!("src/{rel} ({} lines)", t.lines().count()))
        .filter(|f| !section.contains(f.split(' ').next().unwrap()))
        .collect();
    assert!(
        long.is_empty(),
        "files over {MAX_LINES} lines not explained under '## Long files' in \
         docs/architecture.md:\n{}",
        long.join("\n")
    );
}
