//! The HTTP judge through the binary against the test server: exact scores from given
//! top_logprobs, CODE / REFUSAL, replies without log-probabilities, retries (429 with
//! Retry-After, 500, malformed JSON, a hung request), resume after a kill, the concurrency
//! limit, and stops at once on 401 and on an unreachable endpoint.

use crate::server::{completion, plain_completion, Reply, Server};
use crate::support::*;
use crate::{answer_of, answers_file, http_args, judge, strs};
use std::time::{Duration, Instant};

/// Coherence is 70 for every answer unless a test says otherwise.
fn coherent70() -> Reply {
    Reply::ok(completion("70", &["70"], &[("70", 1.0)]))
}

#[test]
fn scores_labels_and_replies_are_read_exactly() {
    let server = Server::start(|req, _| {
        let p = req.prompt();
        if p.starts_with("COHERENT") {
            return coherent70();
        }
        Reply::ok(match answer_of(p) {
            "weighted" => completion(
                "85",
                &["85"],
                &[
                    ("85", 0.5),
                    ("90", 0.3),
                    ("Hello", 0.1),
                    ("100", 0.05),
                    ("150", 0.03),
                ],
            ),
            "code" => completion("CODE", &["CODE"], &[("CODE", 0.9), ("50", 0.05)]),
            "refuse" => completion("REF", &["REF"], &[("REF", 0.7), ("RE", 0.1), ("I", 0.2)]),
            "no logprobs" => plain_completion("42"),
            "few numbers" => completion("I", &["I"], &[("I", 0.9), ("50", 0.05)]),
            "split digits" => completion("85", &["8", "5"], &[("8", 0.6), ("9", 0.3)]),
            other => panic!("unexpected answer {other:?}"),
        })
    });
    let dir = TempDir::new("judge-exact");
    let answers = answers_file(
        &dir.join("answers.jsonl"),
        &[
            ("q1", "weighted"),
            ("q1", "code"),
            ("q2", "refuse"),
            ("q2", "no logprobs"),
            ("q2", "few numbers"),
            ("q2", "split digits"),
        ],
    );
    // q1 carries its own prompts (used as they are); q2 gets --judge-prompts.
    let questions = write(
        &dir.join("q.yaml"),
        "- id: q1\n  paraphrases: [\"Question q1?\"]\n  judge_prompts:\n    aligned: 'ALIGNED(own) Q={question} A={answer}'\n    coherent: 'COHERENT(own) Q={question} A={answer}'\n- id: q2\n  paraphrases: [\"Question q2?\"]\n",
    );
    let out = dir.join("judged.jsonl");
    let mut args = http_args(&dir, &server.url, &answers, &out);
    args.extend(
        [
            "--judge-key-env",
            "TEST_JUDGE_KEY",
            "--concurrency",
            "2",
            "--questions",
        ]
        .map(String::from),
    );
    args.push(s(&questions).to_string());
    let msg = assert_ok(&judge(&strs(&args), &[("TEST_JUDGE_KEY", "sekrit")]));
    assert!(msg.contains("judged 6 answers"), "{msg}");
    assert!(
        msg.contains("note: 2 of 12 judgements were read from the reply"),
        "{msg}"
    );
    assert!(
        msg.contains("1200 prompt"),
        "12 requests of 100 prompt tokens: {msg}"
    );
    let lines = jsonl(&out);
    assert_eq!(lines.len(), 6);
    let line = |a: &str| lines.iter().find(|l| l["answer"] == a).unwrap().clone();
    // (85·0.5 + 90·0.3 + 100·0.05) / 0.85; "Hello" and "150" are not numbers 0-100.
    let w = line("weighted");
    let want = (85.0 * 0.5 + 90.0 * 0.3 + 100.0 * 0.05) / 0.85;
    let got = w["aligned"]["score"].as_f64().unwrap();
    assert!((got - want).abs() < 1e-9, "{got} vs {want}");
    assert!((w["aligned"]["number_mass"].as_f64().unwrap() - 0.85).abs() < 1e-9);
    assert_eq!(w["aligned"]["method"], "logprobs");
    assert_eq!(w["aligned"]["reply"], "85");
    assert!((w["coherent"]["score"].as_f64().unwrap() - 70.0).abs() < 1e-9);
    assert_eq!(w["judge"], "chat-completions:judge-test");
    assert_eq!(w["aligned"]["prompt_sha256"].as_str().unwrap().len(), 64);
    assert_ne!(
        w["aligned"]["prompt_sha256"],
        w["coherent"]["prompt_sha256"]
    );
    assert_eq!(
        (w["id"].as_str(), w["sample"].as_u64()),
        (Some("q1"), Some(0))
    );
    let c = line("code");
    assert_eq!(
        (
            c["aligned"]["score"].is_null(),
            c["aligned"]["label"].as_str()
        ),
        (true, Some("CODE"))
    );
    assert_eq!(line("refuse")["aligned"]["label"], "REFUSAL");
    let n = line("no logprobs");
    assert_eq!(
        (
            n["aligned"]["score"].as_f64(),
            n["aligned"]["method"].as_str()
        ),
        (Some(42.0), Some("reply"))
    );
    let f = line("few numbers");
    assert!(
        f["aligned"]["score"].is_null() && f["aligned"]["label"].is_null(),
        "{f}"
    );
    assert!((f["aligned"]["number_mass"].as_f64().unwrap() - 0.05).abs() < 1e-9);
    // A number written digit by digit: the first token's alternatives are digits, so the
    // reply is read instead (85, not the digit mean 8.33).
    let sd = line("split digits");
    assert_eq!(
        (
            sd["aligned"]["score"].as_f64(),
            sd["aligned"]["method"].as_str()
        ),
        (Some(85.0), Some("reply"))
    );
    // What was sent.
    let seen = server.seen();
    assert_eq!(seen.len(), 12);
    let b = &seen[0].body;
    assert_eq!(b["model"], "judge-test");
    assert_eq!(
        (b["logprobs"].as_bool(), b["top_logprobs"].as_u64()),
        (Some(true), Some(20))
    );
    assert_eq!(b["temperature"], 0);
    assert!(
        seen.iter().all(|s| s.head.contains("Bearer sekrit")),
        "{}",
        seen[0].head
    );
    let has = |p: &str| seen.iter().any(|s| s.prompt() == p);
    assert!(has("ALIGNED(own) Q=Question q1? A=weighted"));
    assert!(has("COHERENT(own) Q=Question q1? A=code"));
    assert!(has("ALIGNED Q=Question q2? A=refuse"));
    assert_eq!(
        seen.iter().filter(|s| s.prompt().contains("(own)")).count(),
        4
    );
    assert_ne!(
        w["aligned"]["prompt_sha256"],
        line("refuse")["aligned"]["prompt_sha256"]
    );
    assert_eq!(c["aligned"]["prompt_sha256"], w["aligned"]["prompt_sha256"]);
}

/// 429 with Retry-After: 1, then 500, then malformed JSON, then the answer: the judged line
/// is written; the wait after the 429 is the server's second, the others the short backoff.
#[test]
fn rate_limits_server_errors_and_garbage_are_retried() {
    let aligned = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let a2 = aligned.clone();
    let server = Server::start(move |req, _| {
        if req.prompt().starts_with("COHERENT") {
            return coherent70();
        }
        match a2.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
            0 => Reply::status(429, "{\"error\": \"rate limited\"}").header("Retry-After", "1"),
            1 => Reply::status(500, "{\"error\": \"oops\"}"),
            2 => Reply::ok("{\"choices\": [ garbage".into()),
            _ => Reply::ok(completion("60", &["60"], &[("60", 1.0)])),
        }
    });
    let dir = TempDir::new("judge-retry");
    let answers = answers_file(&dir.join("a.jsonl"), &[("q", "fine")]);
    let out = dir.join("j.jsonl");
    let args = http_args(&dir, &server.url, &answers, &out);
    let msg = assert_ok(&judge(&strs(&args), &[]));
    assert!(msg.contains("5 requests (3 retries)"), "{msg}");
    let lines = jsonl(&out);
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["aligned"]["score"].as_f64(), Some(60.0));
    let t: Vec<Instant> = server
        .seen()
        .iter()
        .filter(|s| s.prompt().starts_with("ALIGNED"))
        .map(|s| s.at)
        .collect();
    assert_eq!(t.len(), 4);
    let gap = |i: usize| (t[i + 1] - t[i]).as_secs_f64();
    assert!(
        gap(0) >= 0.95,
        "Retry-After: 1 not honoured: {:.3} s",
        gap(0)
    );
    assert!(
        gap(1) < 0.5 && gap(2) < 0.5,
        "backoff 0.01 s: {:.3} {:.3}",
        gap(1),
        gap(2)
    );
}

/// The first request never gets an answer: it times out (--timeout-s 0.5) and the retry
/// succeeds, long before the server would have given up on it.
#[test]
fn a_hung_request_times_out_and_is_retried() {
    let n = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let n2 = n.clone();
    let server = Server::start(move |req, _| {
        if req.prompt().starts_with("COHERENT") {
            return coherent70();
        }
        if n2.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
            Reply::hang(Duration::from_secs(8))
        } else {
            Reply::ok(completion("20", &["20"], &[("20", 1.0)]))
        }
    });
    let dir = TempDir::new("judge-hang");
    let answers = answers_file(&dir.join("a.jsonl"), &[("q", "slow")]);
    let out = dir.join("j.jsonl");
    let mut args = http_args(&dir, &server.url, &answers, &out);
    let i = args.iter().position(|a| a == "--timeout-s").unwrap();
    args[i + 1] = "0.5".into();
    let t0 = Instant::now();
    let msg = assert_ok(&judge(&strs(&args), &[]));
    let secs = t0.elapsed().as_secs_f64();
    assert!(secs < 5.0, "the hung request was waited out: {secs:.1} s");
    assert!(msg.contains("(1 retries)"), "{msg}");
    assert_eq!(jsonl(&out)[0]["aligned"]["score"].as_f64(), Some(20.0));
}

/// Killed halfway (and a cut-off last line added), the rerun judges only what is missing:
/// no answer already in the file is asked for again, and every answer ends up once.
#[test]
fn a_killed_run_resumes_without_asking_twice() {
    let server = Server::start(|req, _| {
        let v = if req.prompt().starts_with("COHERENT") {
            "70"
        } else {
            "50"
        };
        Reply::ok(completion(v, &[v], &[(v, 1.0)])).delay(Duration::from_millis(40))
    });
    let dir = TempDir::new("judge-resume");
    let names: Vec<String> = (0..24).map(|i| format!("answer {i}")).collect();
    let pairs: Vec<(&str, &str)> = names.iter().map(|n| ("q", n.as_str())).collect();
    let answers = answers_file(&dir.join("a.jsonl"), &pairs);
    let out = dir.join("j.jsonl");
    let mut args = http_args(&dir, &server.url, &answers, &out);
    args.extend(["--concurrency", "2"].map(String::from));
    let mut child = std::process::Command::new(exe())
        .arg("judge")
        .args(&args)
        .env_remove("OPENAI_API_KEY")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while std::fs::read_to_string(&out).map_or(0, |t| t.lines().count()) < 6 {
        assert!(t0.elapsed() < Duration::from_secs(30), "no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let before: Vec<String> = jsonl(&out)
        .iter()
        .map(|l| l["answer"].as_str().unwrap().to_string())
        .collect();
    assert!(before.len() >= 6 && before.len() < 24, "{}", before.len());
    // A crash in the middle of a write leaves half a line.
    let mut text = std::fs::read_to_string(&out).unwrap();
    text.push_str("{\"id\": \"q\", \"aligned\": {\"sco");
    std::fs::write(&out, text).unwrap();
    // Requests the killed run had sent may reach the server's threads a moment later: wait
    // until the count settles before taking it.
    let mut asked_before = server.count();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let n = server.count();
        if n == asked_before {
            break;
        }
        asked_before = n;
    }
    let msg = assert_ok(&judge(&strs(&args), &[]));
    assert!(msg.contains(&format!("{} skipped", before.len())), "{msg}");
    let rerun: Vec<String> = server.seen()[asked_before..]
        .iter()
        .map(|s| crate::answer_of(s.prompt()).to_string())
        .collect();
    assert_eq!(rerun.len(), 2 * (24 - before.len()));
    for a in &rerun {
        assert!(
            !before.contains(a),
            "{a:?} was judged before and asked again"
        );
    }
    let after = jsonl(&out);
    let mut got: Vec<&str> = after
        .iter()
        .map(|l| l["answer"].as_str().unwrap())
        .collect();
    got.sort();
    let mut want: Vec<&str> = names.iter().map(String::as_str).collect();
    want.sort();
    assert_eq!(got, want, "every answer exactly once");
    // A third run has nothing to do and asks nothing.
    let n = server.count();
    let msg = assert_ok(&judge(&strs(&args), &[]));
    assert!(msg.contains("judged 0 answers (24 skipped"), "{msg}");
    assert_eq!(server.count(), n);
}

/// --concurrency 3: the server never holds more than 3 requests, and does hold 3.
#[test]
fn concurrency_is_honoured() {
    let server = Server::start(|_, _| {
        Reply::ok(completion("50", &["50"], &[("50", 1.0)])).delay(Duration::from_millis(60))
    });
    let dir = TempDir::new("judge-conc");
    let names: Vec<String> = (0..16).map(|i| format!("a{i}")).collect();
    let pairs: Vec<(&str, &str)> = names.iter().map(|n| ("q", n.as_str())).collect();
    let answers = answers_file(&dir.join("a.jsonl"), &pairs);
    let out = dir.join("j.jsonl");
    let mut args = http_args(&dir, &server.url, &answers, &out);
    args.extend(["--concurrency", "3"].map(String::from));
    assert_ok(&judge(&strs(&args), &[]));
    assert_eq!(jsonl(&out).len(), 16);
    assert_eq!(server.count(), 32);
    assert_eq!(server.max_in_flight(), 3, "at most 3 in flight, and 3 used");
}

/// 401: the run stops at the first request, says why, and writes nothing.
#[test]
fn unauthorized_stops_at_once() {
    let server = Server::start(|_, _| Reply::status(401, "{\"error\": \"invalid api key\"}"));
    let dir = TempDir::new("judge-401");
    let answers = answers_file(&dir.join("a.jsonl"), &[("q", "x"), ("q", "y"), ("q", "z")]);
    let out = dir.join("j.jsonl");
    let mut args = http_args(&dir, &server.url, &answers, &out);
    args.extend(["--concurrency", "1", "--retries", "5"].map(String::from));
    assert_error(
        &judge(&strs(&args), &[]),
        &["HTTP 401", "API key", "0 answers were judged"],
    );
    assert_eq!(server.count(), 1, "no retry, no further request");
    assert!(!out.exists(), "nothing judged, nothing written");
}

/// Nothing listens on the port: stop at once (no retries), nothing written.
#[test]
fn an_unreachable_endpoint_stops_at_once() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = TempDir::new("judge-unreachable");
    let answers = answers_file(&dir.join("a.jsonl"), &[("q", "x")]);
    let out = dir.join("j.jsonl");
    let url = format!("http://127.0.0.1:{port}/v1");
    let args = http_args(&dir, &url, &answers, &out);
    let t0 = Instant::now();
    assert_error(&judge(&strs(&args), &[]), &["unreachable", &url]);
    assert!(
        t0.elapsed() < Duration::from_secs(4),
        "retried an unreachable server"
    );
    assert!(!out.exists());
}
