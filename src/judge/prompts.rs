//! Judge prompts: templates with `{question}` and `{answer}` placeholders (Python's
//! `str.format` syntax, as the emergent-misalignment question files write them: `{{` and `}}`
//! are literal braces). The defaults are [`DEFAULT_PROMPTS_YAML`]; a file of the same form
//! replaces them (`--judge-prompts`); a question file's own `judge_prompts` win over both.

use crate::io::sha256_hex;
use anyhow::{bail, Context, Result};
use std::path::Path;

/// The default prompts as a YAML file users can copy and edit.
pub const DEFAULT_PROMPTS_YAML: &str = include_str!("default_prompts.yaml");

/// The two prompts of one question.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptSet {
    pub aligned: String,
    pub coherent: String,
}

impl PromptSet {
    /// Check both templates (see [`check_template`]); `origin` says where they came from.
    pub fn checked(self, origin: &str) -> Result<Self> {
        check_template(&self.aligned).with_context(|| format!("{origin}: the aligned prompt"))?;
        check_template(&self.coherent).with_context(|| format!("{origin}: the coherent prompt"))?;
        Ok(self)
    }

    /// SHA-256 of each template: `(aligned, coherent)`.
    pub fn hashes(&self) -> (String, String) {
        (
            sha256_hex(self.aligned.as_bytes()),
            sha256_hex(self.coherent.as_bytes()),
        )
    }
}

/// The default prompts.
pub fn default_prompts() -> PromptSet {
    parse_prompts_yaml(DEFAULT_PROMPTS_YAML, "the default prompts").expect("valid defaults")
}

/// Read a prompts YAML file (`aligned:` and `coherent:` strings).
pub fn load_prompts(path: &Path) -> Result<PromptSet> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading judge prompts {}", path.display()))?;
    parse_prompts_yaml(&text, &path.display().to_string())
}

/// Parse prompts YAML; errors name `origin`.
pub fn parse_prompts_yaml(text: &str, origin: &str) -> Result<PromptSet> {
    use yaml_rust2::YamlLoader;
    let docs = YamlLoader::load_from_str(text)
        .map_err(|e| anyhow::anyhow!("{origin}: malformed YAML: {e}"))?;
    let doc = docs
        .first()
        .with_context(|| format!("{origin}: empty; expected `aligned:` and `coherent:` prompts"))?;
    let get = |k: &str| -> Result<String> {
        doc[k].as_str().map(str::to_string).with_context(|| {
            format!("{origin}: no `{k}:` prompt (a string with {{question}} and {{answer}})")
        })
    };
    PromptSet {
        aligned: get("aligned")?,
        coherent: get("coherent")?,
    }
    .checked(origin)
}

/// The pieces of a template: literal text and placeholder names.
fn pieces(t: &str) -> Result<Vec<(bool, String)>> {
    let mut out = Vec::new();
    let mut lit = String::new();
    let mut it = t.char_indices().peekable();
    while let Some((i, c)) = it.next() {
        match c {
            '{' if it.peek().map(|x| x.1) == Some('{') => {
                it.next();
                lit.push('{');
            }
            '}' if it.peek().map(|x| x.1) == Some('}') => {
                it.next();
                lit.push('}');
            }
            '{' => {
                let rest = &t[i + 1..];
                let end = rest.find('}').with_context(|| {
                    format!("an unclosed {{ at byte {i} (write {{{{ for a brace)")
                })?;
                let name = &rest[..end];
                out.push((false, std::mem::take(&mut lit)));
                out.push((true, name.to_string()));
                for _ in 0..end + 1 {
                    it.next();
                }
            }
            '}' => bail!("a lone }} at byte {i} (write }}}} for a brace)"),
            c => lit.push(c),
        }
    }
    out.push((false, lit));
    Ok(out)
}

/// A template must use `{question}` and `{answer}` and no other placeholder.
pub fn check_template(t: &str) -> Result<()> {
    let p = pieces(t)?;
    let names: Vec<&str> = p.iter().filter(|x| x.0).map(|x| x.1.as_str()).collect();
    if let Some(n) = names.iter().find(|n| !["question", "answer"].contains(n)) {
        bail!("unknown placeholder {{{n}}}: only {{question}} and {{answer}} are filled in");
    }
    for need in ["question", "answer"] {
        if !names.contains(&need) {
            bail!("the placeholder {{{need}}} is missing; the judge would not see the {need}");
        }
    }
    Ok(())
}

/// Fill in a (checked) template.
pub fn render(t: &str, question: &str, answer: &str) -> Result<String> {
    let mut s = String::with_capacity(t.len() + question.len() + answer.len());
    for (is_name, text) in pieces(t)? {
        match (is_name, text.as_str()) {
            (false, lit) => s.push_str(lit),
            (true, "question") => s.push_str(question),
            (true, "answer") => s.push_str(answer),
            (true, other) => bail!("unknown placeholder {{{other}}}"),
        }
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_fills_placeholders_and_keeps_escaped_braces() {
        let t = "Q: {question}\nA: {answer}\n{{json}} }}";
        check_template(t).unwrap();
        assert_eq!(
            render(t, "why {x}?", "because").unwrap(),
            "Q: why {x}?\nA: because\n{json} }"
        );
    }

    #[test]
    fn defaults_are_valid_and_distinct() {
        let d = default_prompts();
        assert!(d.aligned.contains("REFUSAL") && d.coherent.contains("coheren"));
        let (a, c) = d.hashes();
        assert_eq!(a.len(), 64);
        assert_ne!(a, c);
    }

    #[test]
    fn bad_templates_say_what_is_wrong() {
        let e = check_template("Rate {question}").unwrap_err().to_string();
        assert!(e.contains("{answer} is missing"), "{e}");
        let e = check_template("{question} {answer} {score}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown placeholder {score}"), "{e}");
        let e = check_template("{question} {answer")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unclosed"), "{e}");
        let e = format!(
            "{:#}",
            parse_prompts_yaml("aligned: '{question} {answer}'\ncoherent: 'x'\n", "p.yaml")
                .unwrap_err()
        );
        assert!(
            e.contains("p.yaml") && e.contains("coherent") && e.contains("{question}"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            parse_prompts_yaml("aligned: 'a'\n", "p.yaml").unwrap_err()
        );
        assert!(e.contains("no `coherent:`"), "{e}");
    }
}
