//! A chat-completions server for the tests, on 127.0.0.1 only: a thread accepts connections
//! (polling, so it stops by itself when dropped or after two minutes), a thread per
//! connection reads one request and answers what the test's handler says. It records every
//! request (its JSON body, headers and arrival time) and the most requests it held at once.

use serde_json::Value;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What to answer.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// Wait this long before answering (while counted as in flight).
    pub delay: Duration,
    /// Never answer: hold the connection this long, then close it.
    pub hang: Option<Duration>,
}

impl Reply {
    pub fn ok(body: String) -> Reply {
        Reply {
            status: 200,
            headers: Vec::new(),
            body,
            delay: Duration::ZERO,
            hang: None,
        }
    }
    pub fn status(status: u16, body: &str) -> Reply {
        Reply {
            status,
            ..Reply::ok(body.to_string())
        }
    }
    pub fn header(mut self, k: &str, v: &str) -> Reply {
        self.headers.push((k.into(), v.into()));
        self
    }
    pub fn delay(mut self, d: Duration) -> Reply {
        self.delay = d;
        self
    }
    pub fn hang(d: Duration) -> Reply {
        Reply {
            hang: Some(d),
            ..Reply::ok(String::new())
        }
    }
}

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub body: Value,
    pub head: String,
    pub at: Instant,
}

impl Seen {
    /// The user message (the filled-in judge prompt).
    pub fn prompt(&self) -> &str {
        self.body["messages"][0]["content"].as_str().unwrap_or("")
    }
}

type Handler = dyn Fn(&Seen, usize) -> Reply + Send + Sync;

#[derive(Default)]
struct State {
    seen: Mutex<Vec<Seen>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

pub struct Server {
    pub url: String,
    stop: Arc<AtomicBool>,
    state: Arc<State>,
}

impl Server {
    /// Start a server; `handler(request, n)` answers the n-th request (0-based, in arrival
    /// order).
    pub fn start(handler: impl Fn(&Seen, usize) -> Reply + Send + Sync + 'static) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::new(State::default());
        let handler: Arc<Handler> = Arc::new(handler);
        let (stop2, state2) = (stop.clone(), state.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            while !stop2.load(Ordering::SeqCst) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let (h, st) = (handler.clone(), state2.clone());
                        std::thread::spawn(move || serve(conn, &*h, &st));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Server { url, stop, state }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.state.seen.lock().unwrap().len()
    }

    pub fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn serve(mut conn: TcpStream, handler: &Handler, st: &State) {
    conn.set_nonblocking(false).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < head_end + len {
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let body: Value = serde_json::from_slice(&buf[head_end..head_end + len]).unwrap_or(Value::Null);
    let now = st.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    st.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let seen = Seen {
        body,
        head,
        at: Instant::now(),
    };
    let n = {
        let mut v = st.seen.lock().unwrap();
        v.push(seen.clone());
        v.len() - 1
    };
    let reply = handler(&seen, n);
    if let Some(h) = reply.hang {
        std::thread::sleep(h);
        st.in_flight.fetch_sub(1, Ordering::SeqCst);
        return;
    }
    std::thread::sleep(reply.delay);
    let mut out = format!(
        "HTTP/1.1 {} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        reply.status,
        reply.body.len()
    );
    for (k, v) in &reply.headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    out.push_str(&reply.body);
    let _ = conn.write_all(out.as_bytes());
    let _ = conn.flush();
    st.in_flight.fetch_sub(1, Ordering::SeqCst);
}

/// A chat completion whose first token is `tokens[0]`, with `top` as its alternatives
/// (probabilities; written as natural-log log-probabilities), and `content` as the reply.
pub fn completion(content: &str, tokens: &[&str], top: &[(&str, f64)]) -> String {
    let top: Vec<Value> = top
        .iter()
        .map(|(t, p)| serde_json::json!({"token": t, "logprob": p.ln()}))
        .collect();
    let content_lp: Vec<Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| {
            serde_json::json!({"token": t, "logprob": -0.1,
                "top_logprobs": if i == 0 { top.clone() } else { Vec::new() }})
        })
        .collect();
    serde_json::json!({
        "id": "cmpl-test", "object": "chat.completion", "model": "judge-test",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "logprobs": {"content": content_lp}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 100, "completion_tokens": tokens.len()}
    })
    .to_string()
}

/// A chat completion without log-probabilities.
pub fn plain_completion(content: &str) -> String {
    serde_json::json!({
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 1}
    })
    .to_string()
}
