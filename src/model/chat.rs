//! Chat templates: the Jinja templates Hugging Face tokenizers ship, rendered with minijinja in
//! the environment transformers' `apply_chat_template(tokenize=False)` sets up:
//! `trim_blocks` and `lstrip_blocks` on, the template's final newline dropped, no HTML escaping,
//! loop controls (`break`/`continue`), `raise_exception(msg)`, `strftime_now(fmt)`, a `tojson`
//! that writes what Python's `json.dumps` writes, Python string and dict methods (`strip`,
//! `startswith`, `items`, ...), and the `{% generation %}` block (rendered as its body).
//! Named special tokens (`bos_token`, `eos_token`, ...) and `tools = documents = None` are in
//! scope, as transformers passes them.

use anyhow::{anyhow, bail, Context, Result};
use minijinja::value::{Kwargs, Rest, Value, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The named special tokens transformers hands every chat template.
pub const SPECIAL_TOKEN_NAMES: &[&str] = &[
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// One chat message, as in the chat JSONL files (`{"role": "user", "content": "..."}`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled chat template with the special token strings it may use.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    special: BTreeMap<String, String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source_len", &self.source.len())
            .field("special", &self.special)
            .finish()
    }
}

/// The chat template source in a `tokenizer_config.json`: `chat_template` is a string, or a
/// list of `{"name", "template"}` of which transformers uses the one named "default".
pub fn chat_template_from_config(config: &serde_json::Value) -> Result<Option<String>> {
    match config.get("chat_template") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(serde_json::Value::Array(items)) => {
            let mut names = Vec::new();
            for item in items {
                let name = item.get("name").and_then(|n| n.as_str());
                let template = item.get("template").and_then(|t| t.as_str());
                match (name, template) {
                    (Some("default"), Some(t)) => return Ok(Some(t.to_string())),
                    (Some(n), Some(_)) => names.push(n.to_string()),
                    _ => bail!(
                        "key \"chat_template\": list entries must be {{\"name\", \"template\"}} strings"
                    ),
                }
            }
            bail!("key \"chat_template\" lists templates {names:?} but none named \"default\"")
        }
        Some(other) => bail!("key \"chat_template\" must be a string or a list, got {other}"),
    }
}

/// Replace `{% generation %}` / `{% endgeneration %}` (transformers' extension marking
/// assistant text) with `{% if true %}` / `{% endif %}`: the body renders unchanged and the
/// whitespace-control markers (`-`, `+`) keep their meaning.
fn rewrite_generation_tags(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(open) = rest.find("{%") {
        let Some(close_rel) = rest[open + 2..].find("%}") else {
            break;
        };
        let close = open + 2 + close_rel;
        let inner = &rest[open + 2..close];
        let lead = inner.len() - inner.trim_start_matches(['-', '+']).len();
        let body = &inner[lead..];
        let trail_start = body.trim_end_matches(['-', '+']).len();
        let (word, trail) = body.split_at(trail_start);
        let replacement = match word.trim() {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        out.push_str(&rest[..open]);
        match replacement {
            Some(r) => {
                out.push_str("{%");
                out.push_str(&inner[..lead]);
                out.push(' ');
                out.push_str(r);
                out.push(' ');
                out.push_str(trail);
                out.push_str("%}");
            }
            None => out.push_str(&rest[open..close + 2]),
        }
        rest = &rest[close + 2..];
    }
    out.push_str(rest);
    out
}

impl ChatTemplate {
    /// Compile `source` with the BOS and EOS token strings it may reference.
    pub fn new(source: &str, bos_token: Option<&str>, eos_token: Option<&str>) -> Result<Self> {
        let mut special = BTreeMap::new();
        if let Some(b) = bos_token {
            special.insert("bos_token".to_string(), b.to_string());
        }
        if let Some(e) = eos_token {
            special.insert("eos_token".to_string(), e.to_string());
        }
        Self::with_special_tokens(source, &special)
    }

    /// Compile `source` with named special tokens (`bos_token`, `eos_token`, `pad_token`, ...).
    pub fn with_special_tokens(source: &str, special: &BTreeMap<String, String>) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat_template", rewrite_generation_tags(source))
            .map_err(|e| anyhow!("chat template does not compile: {e:#}"))?;
        Ok(ChatTemplate {
            env,
            source: source.to_string(),
            special: special.clone(),
        })
    }

    /// The template as given.
    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.special.get("bos_token").map(String::as_str)
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.special.get("eos_token").map(String::as_str)
    }

    /// Render a conversation; with `add_generation_prompt` the template appends the start of
    /// an assistant turn.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self
            .env
            .get_template("chat_template")
            .context("chat template missing from its environment")?;
        let mut ctx: BTreeMap<String, Value> = self
            .special
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
            .collect();
        ctx.insert("messages".into(), Value::from_serialize(messages));
        ctx.insert(
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        );
        ctx.insert("tools".into(), Value::from(()));
        ctx.insert("documents".into(), Value::from(()));
        tmpl.render(ctx)
            .map_err(|e| anyhow!("chat template failed to render: {e:#}"))
    }
}

/// `raise_exception(msg)`: templates use it to reject conversations (e.g. a wrong role order).
fn raise_exception(msg: String) -> Result<String, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

/// `strftime_now(fmt)`: the current time (UTC) formatted with Python's `strftime` directives
/// `%Y %y %m %d %e %H %I %M %S %p %j %b %B %a %A %%` (and glibc's unpadded `%-d` style).
fn strftime_now(fmt: String) -> Result<String, Error> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    Ok(format_time(secs, &fmt))
}

/// Civil date of a day count since 1970-01-01 (proleptic Gregorian): shift the epoch to
/// 0000-03-01 so leap days end each 400-year era's years, then split into era, year of era,
/// day of year and month (months counted from March, 153 days per five months).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Format Unix time `secs` (UTC) with strftime directives.
pub fn format_time(secs: i64, fmt: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (tod / 3600, tod / 60 % 60, tod % 60);
    // 1970-01-01 was a Thursday (index 3 from Monday).
    let weekday = (days + 3).rem_euclid(7) as usize;
    let is_leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    const CUM: [u32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = CUM[m as usize - 1] + d + u32::from(is_leap && m > 2);
    let h12 = if hh % 12 == 0 { 12 } else { hh % 12 };

    let mut out = String::new();
    let mut chars = fmt.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let unpadded = chars.peek() == Some(&'-');
        if unpadded {
            chars.next();
        }
        let num = |v: i64, width: usize| {
            if unpadded {
                v.to_string()
            } else {
                format!("{v:0width$}")
            }
        };
        match chars.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&num(y.rem_euclid(100), 2)),
            Some('m') => out.push_str(&num(m as i64, 2)),
            Some('d') => out.push_str(&num(d as i64, 2)),
            Some('e') => out.push_str(&format!("{d:>2}")),
            Some('H') => out.push_str(&num(hh, 2)),
            Some('I') => out.push_str(&num(h12, 2)),
            Some('M') => out.push_str(&num(mm, 2)),
            Some('S') => out.push_str(&num(ss, 2)),
            Some('p') => out.push_str(if hh < 12 { "AM" } else { "PM" }),
            Some('j') => out.push_str(&num(yday as i64, 3)),
            Some('b') => out.push_str(&MONTHS[m as usize - 1][..3]),
            Some('B') => out.push_str(MONTHS[m as usize - 1]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                if unpadded {
                    out.push('-');
                }
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Options of transformers' `tojson(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`.
struct JsonStyle {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

/// The `tojson` filter as transformers defines it: Python's `json.dumps` (non-ASCII kept,
/// `", "` and `": "` separators, or `","` with an indent), not Jinja's HTML-safe variant.
fn tojson(value: Value, args: Rest<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    let bad = |msg: String| Error::new(ErrorKind::InvalidOperation, msg);
    let names = ["ensure_ascii", "indent", "separators", "sort_keys"];
    ensure_arg_count(args.len(), names.len())?;
    let mut opts: BTreeMap<&str, Value> = BTreeMap::new();
    for (name, v) in names.iter().zip(args.iter()) {
        opts.insert(name, v.clone());
    }
    for name in names {
        if let Some(v) = kwargs.get::<Option<Value>>(name)? {
            opts.insert(name, v);
        }
    }
    kwargs.assert_all_used()?;
    let flag = |name: &str| opts.get(name).map(|v| v.is_true()).unwrap_or(false);
    let indent = match opts.get("indent") {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match v.kind() {
            ValueKind::Number => {
                let n = i64::try_from(v.clone())?;
                Some(" ".repeat(n.max(0) as usize))
            }
            ValueKind::String => Some(v.as_str().unwrap_or_default().to_string()),
            _ => {
                return Err(bad(format!(
                    "tojson: indent must be a number or string, got {v}"
                )))
            }
        },
    };
    let (item_sep, key_sep) = match opts.get("separators") {
        Some(v) if !v.is_none() && !v.is_undefined() => {
            let parts: Vec<Value> = v.try_iter()?.collect();
            match (
                parts.first().and_then(|p| p.as_str()),
                parts.get(1).and_then(|p| p.as_str()),
            ) {
                (Some(a), Some(b)) if parts.len() == 2 => (a.to_string(), b.to_string()),
                _ => return Err(bad("tojson: separators must be two strings".into())),
            }
        }
        _ if indent.is_some() => (",".to_string(), ": ".to_string()),
        _ => (", ".to_string(), ": ".to_string()),
    };
    let style = JsonStyle {
        ensure_ascii: flag("ensure_ascii"),
        indent,
        item_sep,
        key_sep,
        sort_keys: flag("sort_keys"),
    };
    let mut out = String::new();
    write_json(&value, &style, 0, &mut out)?;
    Ok(Value::from(out))
}

fn ensure_arg_count(got: usize, max: usize) -> Result<(), Error> {
    if got > max {
        return Err(Error::new(
            ErrorKind::TooManyArguments,
            format!("tojson takes at most {max} positional options"),
        ));
    }
    Ok(())
}

/// Python's `repr(float)`: the shortest digits that round-trip, positional for decimal
/// exponents -4..15, scientific (`1e-05`, `1.5e+16`) outside, and `NaN` / `Infinity`.
pub fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    // Rust's `{:e}` gives the shortest round-trip digits: "-1.2345e-7".
    let sci = format!("{x:e}");
    let (mant, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mant) = match mant.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mant),
    };
    let digits: String = mant.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let n = digits.len() as i32;
        let body = if exp < 0 {
            format!("0.{}{}", "0".repeat((-exp - 1) as usize), digits)
        } else if exp + 1 >= n {
            format!("{}{}.0", digits, "0".repeat((exp + 1 - n) as usize))
        } else {
            let (a, b) = digits.split_at((exp + 1) as usize);
            format!("{a}.{b}")
        };
        format!("{sign}{body}")
    } else {
        let m = if digits.len() > 1 {
            format!("{}.{}", &digits[..1], &digits[1..])
        } else {
            digits
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{m}e{esign}{:02}", exp.abs())
    }
}

fn write_json_string(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c if ensure_ascii && (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn newline_indent(style: &JsonStyle, level: usize, out: &mut String) {
    if let Some(ind) = &style.indent {
        out.push('\n');
        for _ in 0..level {
            out.push_str(ind);
        }
    }
}

/// The JSON key Python writes for a dict key (strings as is, numbers and bools as text).
fn json_key(k: &Value) -> Result<String, Error> {
    Ok(match k.kind() {
        ValueKind::String => k.as_str().unwrap_or_default().to_string(),
        ValueKind::Bool => if k.is_true() { "true" } else { "false" }.to_string(),
        ValueKind::None => "null".to_string(),
        ValueKind::Number => match f64::try_from(k.clone()) {
            Ok(f) if k.as_i64().is_none() => python_float_repr(f),
            _ => k.to_string(),
        },
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: keys must be str, int, float, bool or None, not {k}"),
            ))
        }
    })
}

fn write_json(v: &Value, style: &JsonStyle, level: usize, out: &mut String) -> Result<(), Error> {
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => match v.as_i64() {
            Some(i) => out.push_str(&i.to_string()),
            None => match f64::try_from(v.clone()) {
                Ok(f) if v.is_integer() => out.push_str(&format!("{f}")),
                Ok(f) => out.push_str(&python_float_repr(f)),
                Err(_) => out.push_str(&v.to_string()),
            },
        },
        ValueKind::String | ValueKind::Bytes => {
            write_json_string(v.as_str().unwrap_or_default(), style.ensure_ascii, out)
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                newline_indent(style, level + 1, out);
                write_json(item, style, level + 1, out)?;
            }
            newline_indent(style, level, out);
            out.push(']');
        }
        ValueKind::Map => {
            let mut entries = Vec::new();
            for k in v.try_iter()? {
                let val = v.get_item(&k)?;
                entries.push((json_key(&k)?, val));
            }
            if style.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            if entries.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, (k, val)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                newline_indent(style, level + 1, out);
                write_json_string(k, style.ensure_ascii, out);
                out.push_str(&style.key_sep);
                write_json(val, style, level + 1, out)?;
            }
            newline_indent(style, level, out);
            out.push('}');
        }
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: cannot serialise {v}"),
            ))
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_float_repr_matches_python() {
        // Expected strings are what CPython 3.11 prints for repr(x).
        let cases = [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (-2.5, "-2.5"),
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (1e16, "1e+16"),
            (123456789012345.0, "123456789012345.0"),
            (1.5e300, "1.5e+300"),
            (0.30000000000000004, "0.30000000000000004"),
        ];
        for (x, want) in cases {
            assert_eq!(python_float_repr(x), want, "{x}");
        }
    }

    #[test]
    fn strftime_known_instant() {
        // 2024-02-29 13:05:09 UTC (a Thursday, day 60 of a leap year) = 1709211909.
        let t = 1_709_211_909;
        assert_eq!(format_time(t, "%Y-%m-%d %H:%M:%S"), "2024-02-29 13:05:09");
        assert_eq!(format_time(t, "%d %b %Y"), "29 Feb 2024");
        assert_eq!(
            format_time(t, "%A %B %-d, %I%p %j %%"),
            "Thursday February 29, 01PM 060 %"
        );
        assert_eq!(format_time(0, "%a %Y-%m-%d"), "Thu 1970-01-01");
        assert_eq!(format_time(-1, "%Y-%m-%d %H:%M:%S"), "1969-12-31 23:59:59");
    }

    #[test]
    fn generation_tags_become_if_blocks() {
        let src = "a{%- generation %}b{% endgeneration -%}c{% if x %}d{% endif %}";
        assert_eq!(
            rewrite_generation_tags(src),
            "a{%- if true %}b{% endif -%}c{% if x %}d{% endif %}"
        );
    }

    #[test]
    fn tojson_is_python_json_dumps() {
        let t = ChatTemplate::new(
            "{{ {'a': [1, 2.5, none, true], 'b': 'é\"\\n'} | tojson }}|{{ [1, {'x': 'y'}] | tojson(indent=2) }}|{{ 'é' | tojson(ensure_ascii=true) }}",
            None,
            None,
        )
        .unwrap();
        let got = t.render(&[], false).unwrap();
        assert_eq!(
            got,
            "{\"a\": [1, 2.5, null, true], \"b\": \"é\\\"\\n\"}|[\n  1,\n  {\n    \"x\": \"y\"\n  }\n]|\"\\u00e9\""
        );
    }

    #[test]
    fn raise_exception_is_an_error_with_the_message() {
        let t = ChatTemplate::new(
            "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation roles must start with user') }}{% endif %}ok",
            None,
            None,
        )
        .unwrap();
        let e = t
            .render(&[ChatMessage::new("assistant", "hi")], false)
            .unwrap_err();
        assert!(
            format!("{e:#}").contains("Conversation roles must start with user"),
            "{e:#}"
        );
        assert_eq!(
            t.render(&[ChatMessage::new("user", "hi")], false).unwrap(),
            "ok"
        );
    }

    #[test]
    fn python_methods_and_whitespace_control() {
        let src = "{% for m in messages %}\n  {% if m.content.strip().startswith('x') %}[{{ m.role.upper() }}]{% endif %}\n{% endfor %}\n{{ bos_token }}\n";
        let t = ChatTemplate::new(src, Some("<s>"), None).unwrap();
        let msgs = [
            ChatMessage::new("user", "  xy "),
            ChatMessage::new("bot", "y"),
        ];
        // trim_blocks drops the newline after each block tag, lstrip_blocks the indentation
        // before it, and the template's final newline is dropped.
        assert_eq!(t.render(&msgs, false).unwrap(), "[USER]<s>");
    }

    #[test]
    fn config_chat_template_forms() {
        let s = serde_json::json!({"chat_template": "x"});
        assert_eq!(chat_template_from_config(&s).unwrap().as_deref(), Some("x"));
        let l = serde_json::json!({"chat_template": [
            {"name": "tool_use", "template": "t"}, {"name": "default", "template": "d"}]});
        assert_eq!(chat_template_from_config(&l).unwrap().as_deref(), Some("d"));
        let none = serde_json::json!({"chat_template": [{"name": "tool_use", "template": "t"}]});
        assert!(chat_template_from_config(&none).is_err());
        assert_eq!(
            chat_template_from_config(&serde_json::json!({})).unwrap(),
            None
        );
    }
}
