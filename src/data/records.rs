//! JSONL records before tokenization: one JSON object a line, parsed into chat, text or
//! pre-tokenized records, with errors naming `file:line`.

use crate::model::chat::ChatMessage;
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;

/// A parsed JSONL record, before tokenization.
#[derive(Clone, Debug, PartialEq)]
pub enum Record {
    Chat(Vec<ChatMessage>),
    Text(String),
    Tokens {
        ids: Vec<u32>,
        labels: Option<Vec<i32>>,
    },
}

/// Roles a chat record may use (those every chat template knows).
pub const ROLES: &[&str] = &["system", "user", "assistant"];

fn string_field<'a>(v: &'a Value, key: &str) -> Result<&'a str> {
    v.get(key)
        .with_context(|| format!("missing \"{key}\""))?
        .as_str()
        .with_context(|| format!("\"{key}\" must be a string"))
}

/// Parse a `"messages"` value: a list of `{"role", "content"}` objects with known roles.
pub fn parse_messages(msgs: &Value) -> Result<Vec<ChatMessage>> {
    let msgs = msgs
        .as_array()
        .context("\"messages\" must be a list of {\"role\", \"content\"} objects")?;
    let mut out = Vec::with_capacity(msgs.len());
    for (i, m) in msgs.iter().enumerate() {
        let role = string_field(m, "role").with_context(|| format!("message {i}"))?;
        let content = string_field(m, "content").with_context(|| format!("message {i}"))?;
        if !ROLES.contains(&role) {
            bail!("message {i} has the unknown role {role:?}; expected one of {ROLES:?}");
        }
        out.push(ChatMessage::new(role, content));
    }
    Ok(out)
}

/// Parse one JSONL object into a [`Record`] (see the module docs for the forms).
pub fn parse_record(v: &Value) -> Result<Record> {
    let obj = v
        .as_object()
        .context("a record must be a JSON object ({\"messages\": ...}, {\"prompt\", \"completion\"}, {\"text\"} or {\"input_ids\"})")?;
    if let Some(msgs) = obj.get("messages") {
        let out = parse_messages(msgs)?;
        if !out.iter().any(|m| m.role == "assistant") {
            bail!("the conversation has no assistant turn to train on");
        }
        return Ok(Record::Chat(out));
    }
    if obj.contains_key("prompt") || obj.contains_key("completion") {
        let prompt = string_field(v, "prompt")?;
        let completion = string_field(v, "completion")?;
        return Ok(Record::Chat(vec![
            ChatMessage::new("user", prompt),
            ChatMessage::new("assistant", completion),
        ]));
    }
    if obj.contains_key("text") {
        return Ok(Record::Text(string_field(v, "text")?.to_string()));
    }
    if let Some(ids) = obj.get("input_ids") {
        let ids: Vec<u32> = ids
            .as_array()
            .context("\"input_ids\" must be a list of token ids")?
            .iter()
            .enumerate()
            .map(|(i, x)| {
                x.as_u64()
                    .and_then(|x| u32::try_from(x).ok())
                    .with_context(|| format!("input_ids[{i}] = {x} is not a token id"))
            })
            .collect::<Result<_>>()?;
        let labels = match obj.get("labels") {
            None | Some(Value::Null) => None,
            Some(l) => {
                let l: Vec<i32> = l
                    .as_array()
                    .context("\"labels\" must be a list of token ids or -100")?
                    .iter()
                    .enumerate()
                    .map(|(i, x)| {
                        x.as_i64()
                            .and_then(|x| i32::try_from(x).ok())
                            .with_context(|| format!("labels[{i}] = {x} is not a token id"))
                    })
                    .collect::<Result<_>>()?;
                if l.len() != ids.len() {
                    bail!(
                        "\"labels\" has {} entries but \"input_ids\" has {}; they must align",
                        l.len(),
                        ids.len()
                    );
                }
                Some(l)
            }
        };
        return Ok(Record::Tokens { ids, labels });
    }
    let keys: Vec<&String> = obj.keys().collect();
    bail!(
        "unrecognised record with keys {keys:?}: expected \"messages\", \"prompt\"+\"completion\", \
         \"text\" or \"input_ids\""
    )
}

/// Every non-blank line of a JSONL file parsed as JSON, with its 1-based line number; errors
/// name `file:line`. `what` says what the file is, for the message when it cannot be read.
pub fn read_json_lines(path: &Path, what: &str) -> Result<Vec<(usize, Value)>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading {what} {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: malformed JSON", path.display(), i + 1))?;
        out.push((i + 1, v));
    }
    Ok(out)
}

/// Read a JSONL file into records, with errors naming `file:line`.
pub fn read_jsonl(path: &Path) -> Result<Vec<(usize, Record)>> {
    read_json_lines(path, "data file")?
        .into_iter()
        .map(|(line, v)| {
            let rec = parse_record(&v).with_context(|| format!("{}:{line}", path.display()))?;
            Ok((line, rec))
        })
        .collect()
}
