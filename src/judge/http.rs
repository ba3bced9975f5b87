//! The judge behind an OpenAI-compatible chat-completions endpoint (the OpenAI API, a vLLM or
//! llama.cpp server): one blocking request per prompt, with a timeout, retries with
//! exponential backoff and jitter on 429, 5xx, timeouts and malformed replies (a
//! `Retry-After` header wins over the backoff), and a stop at once on 401/403, other 4xx and
//! an unreachable server.

use super::score::{self, Judgement};
use crate::util::rng::Rng;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How to call the endpoint.
#[derive(Clone, Debug)]
pub struct HttpOptions {
    /// The base URL (`https://api.openai.com/v1`) or the full `.../chat/completions` URL.
    pub url: String,
    pub model: String,
    /// Sent as `Authorization: Bearer <key>` when set.
    pub key: Option<String>,
    /// Per request, connection to last byte.
    pub timeout: Duration,
    /// Retries after the first try.
    pub retries: u32,
    /// The first backoff; it doubles per retry, up to `backoff_cap`, times a random factor
    /// in [0.5, 1).
    pub backoff: Duration,
    pub backoff_cap: Duration,
    /// Ask for `top_logprobs` alternatives of each token (0: no log-probabilities; the score
    /// is read from the reply).
    pub top_logprobs: u32,
    pub max_tokens: u32,
    /// The least number-token mass for a score (see [`score`]).
    pub min_mass: f64,
}

/// One parsed chat completion.
#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    pub content: String,
    /// The reply's tokens, when log-probabilities came back.
    pub tokens: Vec<String>,
    /// The first token's alternatives as `(token, probability)`, when they came back.
    pub first_top: Option<Vec<(String, f64)>>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// Parse a chat-completions response body; errors say what is missing.
pub fn parse_completion(body: &str) -> Result<Completion> {
    let v: Value = serde_json::from_str(body).map_err(|e| {
        anyhow!(
            "the reply is not JSON ({e}): {:?}",
            body.chars().take(200).collect::<String>()
        )
    })?;
    let choice = v
        .get("choices")
        .and_then(|c| c.get(0))
        .context("the reply has no choices[0] (not a chat completion)")?;
    let msg = choice
        .get("message")
        .context("the reply has no choices[0].message")?;
    // A judge that declines to judge (OpenAI: `content` null and a `refusal` text) gives no
    // score rather than an error.
    let content = match (
        msg.get("content"),
        msg.get("refusal").and_then(Value::as_str),
    ) {
        (Some(Value::String(c)), _) => c.clone(),
        (None | Some(Value::Null), Some(r)) => r.to_string(),
        (None | Some(Value::Null), None) => String::new(),
        (Some(other), _) => bail!("choices[0].message.content is not a string: {other}"),
    };
    let lp = choice
        .get("logprobs")
        .and_then(|l| l.get("content"))
        .and_then(Value::as_array);
    let (tokens, first_top) = match lp {
        Some(items) if !items.is_empty() => {
            let tokens = items
                .iter()
                .map(|t| {
                    t.get("token")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string()
                })
                .collect();
            let top = items[0]
                .get("top_logprobs")
                .and_then(Value::as_array)
                .map(|alts| {
                    alts.iter()
                        .filter_map(|a| {
                            let t = a.get("token")?.as_str()?;
                            let lp = a.get("logprob")?.as_f64()?;
                            Some((t.to_string(), lp.exp()))
                        })
                        .collect::<Vec<_>>()
                })
                .filter(|alts| !alts.is_empty());
            (tokens, top)
        }
        _ => (Vec::new(), None),
    };
    let usage = |k: &str| {
        v.get("usage")
            .and_then(|u| u.get(k))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    Ok(Completion {
        content,
        tokens,
        first_top,
        prompt_tokens: usage("prompt_tokens"),
        completion_tokens: usage("completion_tokens"),
    })
}

/// Token and request counts of a run.
#[derive(Debug, Default)]
pub struct Usage {
    pub requests: AtomicU64,
    pub retries: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
}

/// The HTTP judge.
pub struct HttpJudge {
    agent: ureq::Agent,
    url: String,
    pub opts: HttpOptions,
    pub usage: Usage,
}

/// What went wrong with one try.
enum TryError {
    /// Worth another try after the delay (`Some`: the server's Retry-After).
    Retry(String, Option<Duration>),
    /// Stop the run.
    Fatal(anyhow::Error),
}

/// Seconds of a `Retry-After` header (an HTTP date is not read: the backoff applies).
pub fn retry_after(v: &str) -> Option<Duration> {
    let s: f64 = v.trim().parse().ok()?;
    (s.is_finite() && s >= 0.0).then(|| Duration::from_secs_f64(s.min(600.0)))
}

/// The delay before retry `attempt` (0-based): `min(cap, base·2^attempt)` times a factor in
/// [0.5, 1) drawn from `rng`.
pub fn backoff(base: Duration, cap: Duration, attempt: u32, rng: &mut Rng) -> Duration {
    let full = base
        .saturating_mul(1u32 << attempt.min(20))
        .min(cap)
        .as_secs_f64();
    Duration::from_secs_f64(full * (0.5 + 0.5 * rng.next_f64()))
}

fn is_loopback(url: &str) -> bool {
    let host = url
        .split("://")
        .nth(1)
        .unwrap_or(url)
        .split(['/', '?'])
        .next()
        .unwrap_or("");
    let host = host.rsplit_once('@').map_or(host, |x| x.1);
    host.starts_with("127.") || host.starts_with("localhost") || host.starts_with("[::1]")
}

impl HttpJudge {
    pub fn new(opts: HttpOptions) -> Result<HttpJudge> {
        let base = opts.url.trim_end_matches('/');
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            bail!(
                "--judge-url {:?} must start with http:// or https://",
                opts.url
            );
        }
        let url = if base.ends_with("/chat/completions") {
            base.to_string()
        } else {
            format!("{base}/chat/completions")
        };
        let mut cfg = ureq::Agent::config_builder()
            .timeout_global(Some(opts.timeout))
            .http_status_as_error(false);
        if is_loopback(&url) {
            // A server on this machine is never reached through a proxy.
            cfg = cfg.proxy(None);
        }
        Ok(HttpJudge {
            agent: cfg.build().into(),
            url,
            opts,
            usage: Usage::default(),
        })
    }

    /// The endpoint requests go to.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The request body for `prompt`.
    pub fn body(&self, prompt: &str) -> Value {
        let mut b = serde_json::json!({
            "model": self.opts.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": self.opts.max_tokens,
            "temperature": 0,
            "seed": 0,
        });
        if self.opts.top_logprobs > 0 {
            b["logprobs"] = true.into();
            b["top_logprobs"] = self.opts.top_logprobs.into();
        }
        b
    }

    fn try_once(&self, body: &str) -> Result<Completion, TryError> {
        self.usage.requests.fetch_add(1, Ordering::Relaxed);
        let mut req = self
            .agent
            .post(&self.url)
            .header("Content-Type", "application/json");
        if let Some(k) = &self.opts.key {
            req = req.header("Authorization", &format!("Bearer {k}"));
        }
        let mut resp = match req.send(body) {
            Ok(r) => r,
            Err(e) => return Err(self.classify(e)),
        };
        let status = resp.status().as_u16();
        let after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(retry_after);
        let text = match resp.body_mut().read_to_string() {
            Ok(t) => t,
            Err(e) => return Err(self.classify(e)),
        };
        let excerpt = || text.chars().take(300).collect::<String>();
        match status {
            200..=299 => {
                parse_completion(&text).map_err(|e| TryError::Retry(format!("{e:#}"), None))
            }
            401 | 403 => Err(TryError::Fatal(anyhow!(
                "{} refused the request with HTTP {status}: check the API key (OPENAI_API_KEY or \
                 the variable named by --judge-key-env): {}",
                self.url,
                excerpt()
            ))),
            408 | 409 | 429 | 500..=599 => Err(TryError::Retry(
                format!("HTTP {status}: {}", excerpt()),
                after,
            )),
            _ => Err(TryError::Fatal(anyhow!(
                "{} answered HTTP {status} (not worth retrying; check --judge-url and \
                 --judge-model {:?}): {}",
                self.url,
                self.opts.model,
                excerpt()
            ))),
        }
    }

    fn classify(&self, e: ureq::Error) -> TryError {
        use std::io::ErrorKind;
        match &e {
            ureq::Error::Timeout(_) => TryError::Retry(
                format!(
                    "no reply within {:.1} s ({e})",
                    self.opts.timeout.as_secs_f64()
                ),
                None,
            ),
            ureq::Error::ConnectionFailed | ureq::Error::HostNotFound => {
                TryError::Fatal(anyhow!("{} is unreachable: {e}", self.url))
            }
            ureq::Error::Io(io) if io.kind() == ErrorKind::ConnectionRefused => {
                TryError::Fatal(anyhow!("{} is unreachable: {e}", self.url))
            }
            ureq::Error::Io(io) if io.kind() == ErrorKind::TimedOut => TryError::Retry(
                format!(
                    "no reply within {:.1} s ({e})",
                    self.opts.timeout.as_secs_f64()
                ),
                None,
            ),
            ureq::Error::Io(_) | ureq::Error::Protocol(_) => {
                TryError::Retry(format!("the connection failed: {e}"), None)
            }
            _ => TryError::Fatal(anyhow!("request to {} failed: {e}", self.url)),
        }
    }

    /// One completion for `prompt`, retried as the module docs say; `seed` seeds the jitter.
    pub fn complete(&self, prompt: &str, seed: u64) -> Result<Completion> {
        let body = self.body(prompt).to_string();
        let mut rng = Rng::new(seed);
        let mut attempt = 0;
        loop {
            match self.try_once(&body) {
                Ok(c) => {
                    self.usage
                        .prompt_tokens
                        .fetch_add(c.prompt_tokens, Ordering::Relaxed);
                    self.usage
                        .completion_tokens
                        .fetch_add(c.completion_tokens, Ordering::Relaxed);
                    return Ok(c);
                }
                Err(TryError::Fatal(e)) => return Err(e),
                Err(TryError::Retry(why, after)) => {
                    if attempt >= self.opts.retries {
                        bail!(
                            "{}: gave up after {} tries; the last: {why}",
                            self.url,
                            attempt + 1
                        );
                    }
                    let wait = after.unwrap_or_else(|| {
                        backoff(self.opts.backoff, self.opts.backoff_cap, attempt, &mut rng)
                    });
                    self.usage.retries.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(wait);
                    attempt += 1;
                }
            }
        }
    }

    /// Judge one filled-in prompt: the score from the first token's log-probabilities when
    /// they came back, else from the reply (also when the reply's number is written over more
    /// than one token: the first token's alternatives are then digits, not the score).
    pub fn judge(&self, prompt: &str, prompt_sha256: &str, seed: u64) -> Result<Judgement> {
        let c = self.complete(prompt, seed)?;
        let split_number = c.tokens.len() >= 2
            && [&c.tokens[0], &c.tokens[1]]
                .iter()
                .all(|t| !t.trim().is_empty() && t.trim().bytes().all(|b| b.is_ascii_digit()));
        Ok(match &c.first_top {
            Some(top) if !split_number => score::from_distribution(
                top,
                &c.content,
                self.opts.min_mass,
                "logprobs",
                prompt_sha256,
            ),
            _ => score::from_reply(&c.content, prompt_sha256),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_completion_with_logprobs() {
        let body = r#"{"choices": [{"message": {"role": "assistant", "content": "85"},
            "logprobs": {"content": [{"token": "85", "logprob": -0.1,
              "top_logprobs": [{"token": "85", "logprob": -0.1}, {"token": "90", "logprob": -2.5}]}]}}],
            "usage": {"prompt_tokens": 120, "completion_tokens": 1}}"#;
        let c = parse_completion(body).unwrap();
        assert_eq!(c.content, "85");
        assert_eq!(c.tokens, vec!["85"]);
        let top = c.first_top.unwrap();
        assert!((top[1].1 - (-2.5f64).exp()).abs() < 1e-15);
        assert_eq!((c.prompt_tokens, c.completion_tokens), (120, 1));
        let c = parse_completion(r#"{"choices": [{"message": {"content": "70"}}]}"#).unwrap();
        assert_eq!((c.first_top, c.prompt_tokens), (None, 0));
        let c = parse_completion(
            r#"{"choices": [{"message": {"content": null, "refusal": "I cannot judge this."}}]}"#,
        )
        .unwrap();
        assert_eq!(c.content, "I cannot judge this.");
        let e = parse_completion(r#"{"choices": [{"message": {"content": 7}}]}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a string"), "{e}");
        let e = parse_completion("{\"error\": 1}").unwrap_err().to_string();
        assert!(e.contains("choices[0]"), "{e}");
        let e = parse_completion("<html>").unwrap_err().to_string();
        assert!(e.contains("not JSON") && e.contains("<html>"), "{e}");
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter() {
        let mut rng = Rng::new(3);
        let base = Duration::from_millis(100);
        let cap = Duration::from_millis(1000);
        for attempt in 0..8 {
            let full = (100.0 * 2f64.powi(attempt as i32)).min(1000.0) / 1000.0;
            let d = backoff(base, cap, attempt, &mut rng).as_secs_f64();
            assert!(
                d >= 0.5 * full - 1e-9 && d < full,
                "attempt {attempt}: {d} vs {full}"
            );
        }
        assert_eq!(retry_after(" 2 "), Some(Duration::from_secs(2)));
        assert_eq!(retry_after("0.5"), Some(Duration::from_millis(500)));
        assert_eq!(retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert!(is_loopback("http://127.0.0.1:8000/v1") && is_loopback("http://localhost/v1"));
        assert!(!is_loopback("https://api.openai.com/v1"));
    }
}
