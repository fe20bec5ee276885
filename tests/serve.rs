//! `parallm serve` end to end: the real binary on a loopback port, driven
//! over HTTP — every endpoint, streaming, each error case with its status and
//! body, client disconnects, a flood beyond capacity, SIGTERM draining, the
//! official `openai` Python client, and a real Prometheus scraping /metrics.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A running server, killed when dropped.
struct Server {
    child: Child,
    base: String,
    agent: ureq::Agent,
    key: Option<String>,
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(300)))
        .build()
        .into()
}

impl Server {
    /// Starts `parallm serve --port 0` with `args`; waits for /health 200
    /// (or only for the listener with `wait_healthy = false`).
    fn start(args: &[&str], wait_healthy: bool) -> Server {
        Server::start_model(&common::model_path(), args, wait_healthy)
    }

    /// [`Server::start`] serving `model`.
    fn start_model(model: &Path, args: &[&str], wait_healthy: bool) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_parallm"))
            .args(["serve", "--port", "0", "--model"])
            .arg(model)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start parallm serve");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                println!("[server] {line}");
                if let Some(addr) = line.strip_prefix("parallm: listening on ") {
                    let _ = tx.send(addr.to_string());
                }
            }
        });
        let base = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the server printed its address");
        let server = Server {
            child,
            base,
            agent: agent(),
            key: None,
        };
        if wait_healthy {
            server.wait_healthy();
        }
        server
    }

    fn wait_healthy(&self) {
        let t = Instant::now();
        loop {
            let (status, _) = self.get("/health");
            if status == 200 {
                return;
            }
            assert!(t.elapsed() < Duration::from_secs(120), "never healthy");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn port(&self) -> u16 {
        self.base
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port")
    }

    fn get(&self, path: &str) -> (u16, String) {
        let mut req = self.agent.get(&self.url(path));
        if let Some(k) = &self.key {
            req = req.header("Authorization", &format!("Bearer {k}"));
        }
        match req.call() {
            Ok(mut r) => (
                r.status().as_u16(),
                r.body_mut().read_to_string().unwrap_or_default(),
            ),
            Err(e) => (0, e.to_string()),
        }
    }

    /// POSTs a raw body; returns status, headers of interest and the body.
    fn post_raw(&self, path: &str, body: &str) -> (u16, Option<String>, String) {
        let mut req = self
            .agent
            .post(&self.url(path))
            .header("Content-Type", "application/json");
        if let Some(k) = &self.key {
            req = req.header("Authorization", &format!("Bearer {k}"));
        }
        match req.send(body) {
            Ok(mut r) => {
                let retry = r
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                (
                    r.status().as_u16(),
                    retry,
                    r.body_mut().read_to_string().unwrap_or_default(),
                )
            }
            Err(e) => (0, None, e.to_string()),
        }
    }

    fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let (status, _, text) = self.post_raw(path, &body.to_string());
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// The value of a metric line (`name{labels}`), summed over matching lines.
    fn metric(&self, prefix: &str) -> f64 {
        let (_, text) = self.get("/metrics");
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    fn wait_metric(&self, prefix: &str, want: impl Fn(f64) -> bool, what: &str) -> f64 {
        let t = Instant::now();
        loop {
            let v = self.metric(prefix);
            if want(v) {
                return v;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "{what}: {prefix} is {v}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Asserts an OpenAI-shaped error body with this status, param and code.
fn assert_error(status: u16, body: &Value, want_status: u16, param: Option<&str>, code: &str) {
    assert_eq!(status, want_status, "{body}");
    let e = &body["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(e["type"].is_string(), "{body}");
    assert_eq!(e["code"], code, "{body}");
    match param {
        Some(p) => assert_eq!(e["param"], p, "{body}"),
        None => assert!(e.get("param").is_some(), "{body}"),
    }
}

/// The `data:` payloads of an SSE body.
fn sse_events(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter_map(|e| e.trim().strip_prefix("data: ").map(str::to_string))
        .collect()
}

#[test]
fn every_endpoint_answers_in_openai_shape() {
    let s = Server::start(&[], true);

    let (status, models) = s.get("/v1/models");
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&models).expect("json");
    let id = models["data"][0]["id"]
        .as_str()
        .expect("model id")
        .to_string();
    assert_eq!(models["object"], "list");
    // Legacy log-probabilities: each `text_offset` is the characters of
    // the tokens before it, and streamed chunks run on from the last.
    let body = json!({"prompt": "Les mots français: café, crème, élève,", "max_tokens": 8,
                      "temperature": 0, "logprobs": 1});
    let (status, r) = s.post("/v1/completions", body.clone());
    assert_eq!(status, 200, "{r}");
    let lp = &r["choices"][0]["logprobs"];
    let tokens: Vec<&str> = lp["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(|t| t.as_str().expect("a token"))
        .collect();
    let offsets: Vec<u64> = lp["text_offset"]
        .as_array()
        .expect("offsets")
        .iter()
        .map(|o| o.as_u64().expect("an offset"))
        .collect();
    let mut want = vec![0u64];
    for t in &tokens[..tokens.len() - 1] {
        want.push(want.last().copied().unwrap_or(0) + t.chars().count() as u64);
    }
    assert_eq!(offsets, want, "{tokens:?}");
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let (_, _, text) = s.post_raw("/v1/completions", &streamed.to_string());
    let streamed_offsets: Vec<u64> = sse_events(&text)
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|c| {
            c["choices"][0]["logprobs"]["text_offset"]
                .as_array()
                .cloned()
        })
        .flatten()
        .filter_map(|o| o.as_u64())
        .collect();
    assert_eq!(streamed_offsets, offsets, "{text}");

    // One model by id, as OpenAI's client retrieves it.
    let (status, card) = s.get(&format!("/v1/models/{id}"));
    assert_eq!(status, 200, "{card}");
    let card: Value = serde_json::from_str(&card).expect("json");
    assert_eq!(card, models["data"][0]);
    let (status, _) = s.get("/v1/models/gpt-9");
    assert_eq!(status, 404);

    // Beam search: each of the `n` beams is a choice with its own reason,
    // its tokens all counted, and a stop string ends a beam there.
    let (status, r) = s.post(
        "/v1/completions",
        json!({"prompt": "The best way to learn", "max_tokens": 8, "beam_width": 3, "n": 2}),
    );
    assert_eq!(status, 200, "{r}");
    let choices = r["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 2, "{r}");
    let best = choices[0]["text"].as_str().expect("text").to_string();
    let last = best.split_whitespace().last().expect("a word").to_string();
    let (status, r) = s.post(
        "/v1/completions",
        json!({"prompt": "The best way to learn", "max_tokens": 8, "beam_width": 3, "n": 2, "stop": [last]}),
    );
    assert_eq!(status, 200, "{r}");
    let choices = r["choices"].as_array().expect("choices");
    let mut counted = 0;
    for c in choices {
        let text = c["text"].as_str().expect("text");
        assert!(!text.contains(&last), "{last:?} in {text:?}");
        counted += 1;
    }
    assert_eq!(counted, 2);
    assert!(
        choices.iter().any(|c| c["finish_reason"] == "stop"),
        "{last:?}: {r}"
    );
    assert!(
        r["usage"]["completion_tokens"].as_u64().expect("count") > 8,
        "{r}"
    );

    // Greedy completion: the reference continuation of the golden prompt.
    let (status, r) = s.post(
        "/v1/completions",
        json!({"model": id, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}),
    );
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["object"], "text_completion");
    assert!(r["choices"][0]["text"]
        .as_str()
        .expect("text")
        .starts_with(" Paris"));
    assert_eq!(r["usage"]["completion_tokens"], 8);
    assert_eq!(r["usage"]["prompt_tokens"], 5);
    assert_eq!(r["usage"]["total_tokens"], 13);
    assert_eq!(r["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(r["choices"][0]["finish_reason"], "length");

    // The same long prompt twice: the second finds its full KV blocks cached
    // (blocks of 16 positions; the last prompt token is always computed).
    let long = "The quick brown fox jumps over the lazy dog. ".repeat(4);
    let mut seen = Vec::new();
    for _ in 0..2 {
        let (status, r) = s.post(
            "/v1/completions",
            json!({"prompt": long, "max_tokens": 2, "temperature": 0}),
        );
        assert_eq!(status, 200, "{r}");
        let usage = &r["usage"];
        let prompt = usage["prompt_tokens"].as_u64().expect("prompt_tokens");
        let cached = usage["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .expect("cached_tokens");
        seen.push((prompt, cached, r["choices"][0]["text"].clone()));
    }
    let (prompt, cached, _) = seen[1];
    assert_eq!(seen[0].1, 0, "{seen:?}");
    assert_eq!(cached, (prompt - 1) / 16 * 16, "{seen:?}");
    assert!(cached >= 16, "{seen:?}");
    assert_eq!(seen[0].2, seen[1].2, "the cache changes no token");

    // Speculative decoding (n-gram drafts) changes no token either.
    let copy = "Repeat: one two three four five six.\nRepeated: one two three four five six.\nRepeat: one two three four five six.\nRepeated:";
    let texts = greedy_texts(
        &s,
        copy,
        12,
        [
            json!(null),
            json!({"method": "ngram", "num_speculative_tokens": 5}),
        ],
    );
    assert_eq!(texts[0], texts[1]);

    // A list of prompts × n, token-id prompts, logprobs, stop.
    let (status, r) = s.post(
        "/v1/completions",
        json!({"prompt": [[504, 3575, 282], [504, 3575]], "n": 2, "max_tokens": 4,
               "temperature": 0.8, "seed": 1, "logprobs": 2, "stop": ["\n"]}),
    );
    assert_eq!(status, 200, "{r}");
    let choices = r["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 4);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        let lp = &c["logprobs"];
        let n = lp["tokens"].as_array().expect("tokens").len();
        assert_eq!(lp["token_logprobs"].as_array().expect("lp").len(), n);
        for (j, top) in lp["top_logprobs"]
            .as_array()
            .expect("top")
            .iter()
            .enumerate()
        {
            assert_eq!(top.as_object().expect("map").len(), 2, "{c}");
            assert!(lp["token_logprobs"][j].as_f64().expect("f") <= 0.0);
        }
    }
    assert_eq!(r["usage"]["prompt_tokens"], 5);

    // Beam search (an extension field): the best n of the beams.
    let (status, r) = s.post(
        "/v1/completions",
        json!({"prompt": "The capital of France is", "beam_width": 3, "n": 2, "max_tokens": 4}),
    );
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["choices"].as_array().expect("choices").len(), 2);
    assert_ne!(r["choices"][0]["text"], r["choices"][1]["text"]);

    // A seed makes sampling reproducible.
    let sampled = |seed: u64| {
        s.post(
            "/v1/completions",
            json!({"prompt": "Once upon a time", "max_tokens": 12, "temperature": 1.0,
                   "top_p": 0.95, "top_k": 40, "min_p": 0.01, "presence_penalty": 0.5,
                   "frequency_penalty": 0.5, "seed": seed}),
        )
        .1["choices"][0]["text"]
            .clone()
    };
    assert_eq!(sampled(42), sampled(42));

    // Chat, non-streaming.
    let (status, r) = s.post(
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "What is the capital of France?"}],
               "max_tokens": 12, "temperature": 0, "logprobs": true, "top_logprobs": 1}),
    );
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["object"], "chat.completion");
    assert_eq!(r["choices"][0]["message"]["role"], "assistant");
    let content = r["choices"][0]["message"]["content"]
        .as_str()
        .expect("content");
    assert!(!content.is_empty());
    let lp = r["choices"][0]["logprobs"]["content"]
        .as_array()
        .expect("lp");
    assert_eq!(
        lp.len(),
        r["usage"]["completion_tokens"].as_u64().expect("n") as usize
    );

    // Chat, streaming, with usage in the last chunk.
    let (status, _, text) = s.post_raw(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "What is the capital of France?"}],
                "max_tokens": 12, "temperature": 0, "stream": true,
                "stream_options": {"include_usage": true}})
        .to_string(),
    );
    assert_eq!(status, 200);
    let events = sse_events(&text);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{text}");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("chunk json"))
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        streamed, content,
        "streamed and non-streamed greedy answers differ"
    );
    let usage = &chunks.last().expect("usage chunk")["usage"];
    assert_eq!(usage["completion_tokens"], r["usage"]["completion_tokens"]);
    assert!(chunks
        .iter()
        .any(|c| c["choices"][0]["finish_reason"].is_string()));

    // Completions streaming without usage: no usage chunk.
    let (_, _, text) = s.post_raw(
        "/v1/completions",
        &json!({"prompt": "Hello", "max_tokens": 3, "stream": true}).to_string(),
    );
    let events = sse_events(&text);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert!(events.iter().all(|e| !e.contains("\"usage\"")), "{text}");

    // Tokenizer endpoints round-trip.
    let (status, t) = s.post("/tokenize", json!({"prompt": "The capital of France is"}));
    assert_eq!(status, 200, "{t}");
    assert_eq!(t["count"], 5);
    let (status, d) = s.post("/detokenize", json!({"tokens": t["tokens"]}));
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["prompt"], "The capital of France is");
    let (status, t) = s.post(
        "/tokenize",
        json!({"messages": [{"role": "user", "content": "Hi"}]}),
    );
    assert_eq!(status, 200, "{t}");
    assert!(t["count"].as_u64().expect("count") > 3);

    // Health and metrics.
    let (status, h) = s.get("/health");
    assert_eq!(status, 200, "{h}");
    let (status, m) = s.get("/metrics");
    assert_eq!(status, 200);
    for name in [
        "parallm_request_success_total",
        "parallm_time_to_first_token_seconds_bucket",
        "parallm_kv_blocks_capacity",
        "parallm_node_step_duration_seconds_bucket",
        "parallm_http_requests_total",
    ] {
        assert!(m.contains(name), "/metrics lacks {name}");
    }

    let (status, body) = s.get("/v1/nothing-here");
    let body: Value = serde_json::from_str(&body).expect("json");
    assert_error(status, &body, 404, None, "not_found");
}

#[test]
fn errors_have_their_status_and_openai_shape() {
    // A short context keeps the context-length cases' prefills short.
    let s = Server::start(
        &[
            "--set",
            "server.max_body_bytes=65536",
            "--set",
            "model.max_model_len=1024",
        ],
        true,
    );
    let cases = [
        (
            json!({"prompt": "x", "temperature": -1}),
            400,
            "temperature",
            "invalid_value",
        ),
        (json!({"prompt": "x", "n": 100}), 400, "n", "invalid_value"),
        (
            json!({"prompt": "x", "speculative": {"num_speculative_tokens": 0}}),
            400,
            "speculative.num_speculative_tokens",
            "invalid_value",
        ),
        (
            json!({"prompt": "x", "speculative": {"method": "draft"}}),
            400,
            "speculative.method",
            "invalid_value",
        ),
        (
            json!({"prompt": "x", "beam_width": 2, "speculative": {"method": "ngram"}}),
            400,
            "speculative",
            "invalid_value",
        ),
        (
            json!({"prompt": "x", "logprobs": 9}),
            400,
            "logprobs",
            "invalid_value",
        ),
        (
            json!({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}),
            400,
            "stop",
            "invalid_value",
        ),
        (
            json!({"prompt": "x", "max_tokens": 5000}),
            400,
            "max_tokens",
            "invalid_value",
        ),
        (
            json!({"prompt": "x", "top_p": "high"}),
            400,
            "top_p",
            "invalid_value",
        ),
        (
            json!({"prompt": "x", "model": "gpt-9"}),
            404,
            "model",
            "model_not_found",
        ),
    ];
    for (body, status, param, code) in cases {
        let (st, r) = s.post("/v1/completions", body.clone());
        assert_error(st, &r, status, Some(param), code);
    }
    // Prompt + max_tokens beyond the context: both counts in the message.
    let (st, r) = s.post(
        "/v1/completions",
        json!({"prompt": vec![1u32; 1000], "max_tokens": 400}),
    );
    assert_error(st, &r, 400, Some("max_tokens"), "context_length_exceeded");
    let msg = r["error"]["message"].as_str().expect("message");
    assert!(msg.contains("1000") && msg.contains("400"), "{msg}");

    // A prompt that alone fills the context names the prompt; without
    // `max_tokens`, a long prompt gets what room the context leaves.
    let (st, r) = s.post("/v1/completions", json!({"prompt": vec![1u32; 1024]}));
    assert_error(st, &r, 400, Some("prompt"), "context_length_exceeded");
    let (st, r) = s.post(
        "/v1/completions",
        json!({"prompt": vec![1u32; 1022], "ignore_eos": true}),
    );
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["usage"]["completion_tokens"], 2, "{r}");
    assert_eq!(r["choices"][0]["finish_reason"], "length", "{r}");
    // A refusal names the request's own field: a chat's `messages` and
    // `max_completion_tokens`, and which of several prompts.
    let long = "word ".repeat(1100);
    let (st, r) = s.post(
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": long}]}),
    );
    assert_error(st, &r, 400, Some("messages"), "context_length_exceeded");
    let (st, r) = s.post(
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 1020}),
    );
    assert_error(
        st,
        &r,
        400,
        Some("max_completion_tokens"),
        "context_length_exceeded",
    );
    let (st, r) = s.post(
        "/v1/completions",
        json!({"prompt": ["short", long], "max_tokens": 2}),
    );
    assert_error(st, &r, 400, Some("prompt"), "context_length_exceeded");
    let msg = r["error"]["message"].as_str().expect("message");
    assert!(msg.starts_with("`prompt[1]`"), "{msg}");

    // Wrong shapes are named in JSON's words, not Rust's.
    for (body, param, want) in [
        (
            json!({"prompt": "x", "stop": 5}),
            "stop",
            "a string or a list of strings",
        ),
        (
            json!({"prompt": 5}),
            "prompt",
            "a string, a list of strings",
        ),
        (
            json!({"prompt": "x", "max_tokens": -1}),
            "max_tokens",
            "a non-negative integer",
        ),
    ] {
        let (st, r) = s.post("/v1/completions", body);
        assert_error(st, &r, 400, Some(param), "invalid_value");
        let msg = r["error"]["message"].as_str().expect("message");
        assert!(msg.contains(want), "{msg}");
    }
    for (messages, want) in [
        (json!(["hi"]), "expected an object"),
        (
            json!([{"role": "user"}]),
            "`messages[0].content` is missing",
        ),
    ] {
        let (st, r) = s.post("/v1/chat/completions", json!({"messages": messages}));
        assert_error(st, &r, 400, Some("messages"), "invalid_value");
        let msg = r["error"]["message"].as_str().expect("message");
        assert!(msg.contains(want), "{msg}");
    }
    // A known path with another method is a 405 naming the right one; a
    // path that does not exist is a 404 whatever the method.
    let mut resp = s
        .agent
        .get(&s.url("/v1/chat/completions"))
        .call()
        .expect("an answer");
    assert_eq!(
        resp.headers().get("allow").and_then(|v| v.to_str().ok()),
        Some("POST")
    );
    let r: Value =
        serde_json::from_str(&resp.body_mut().read_to_string().expect("body")).expect("json");
    assert_error(resp.status().as_u16(), &r, 405, None, "method_not_allowed");
    assert_eq!(s.get("/v1/models/").0, 404);

    let (st, _, text) = s.post_raw("/v1/chat/completions", "{\"messages\": [");
    let r: Value = serde_json::from_str(&text).expect("json");
    assert_error(st, &r, 400, None, "invalid_json");

    let big = json!({"prompt": "x".repeat(100_000)}).to_string();
    let (st, _, text) = s.post_raw("/v1/completions", &big);
    let r: Value = serde_json::from_str(&text).expect("json");
    assert_error(st, &r, 413, None, "payload_too_large");

    // OpenAI fields that are not implemented are refused by name, and
    // logit_bias ids are checked against the vocabulary.
    let refused = [
        (json!({"prompt": "x", "best_of": 3}), "best_of"),
        (json!({"prompt": "x", "echo": true, "stream": true}), "echo"),
        (
            json!({"prompt": "x", "echo": true, "beam_width": 2}),
            "echo",
        ),
        (json!({"prompt": "x", "max_tokens": 0}), "max_tokens"),
        (
            json!({"prompt": "x", "logit_bias": {"999999": 5}}),
            "logit_bias",
        ),
        (
            json!({"prompt": "x", "logit_bias": {"abc": 5}}),
            "logit_bias",
        ),
        (
            json!({"prompt": "x", "logit_bias": {"7": 101}}),
            "logit_bias",
        ),
        (
            json!({"prompt": "x", "tools": [{"type": "function"}]}),
            "tools",
        ),
        (
            json!({"prompt": "x", "beam_width": 2, "logprobs": 1}),
            "logprobs",
        ),
        (
            json!({"prompt": "x", "stream_options": {"include_usage": true}}),
            "stream_options",
        ),
    ];
    for (body, param) in &refused {
        let (st, r) = s.post("/v1/completions", body.clone());
        assert_error(st, &r, 400, Some(param), "invalid_value");
    }
    // Guides that cannot be compiled, or two at once, are refused by field.
    let chat = |extra: Value| {
        let mut body = json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 4});
        for (k, v) in extra.as_object().expect("fields") {
            body[k] = v.clone();
        }
        body
    };
    let guided_refusals = [
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}}}),
            "response_format",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
            "response_format",
        ),
        (
            json!({"response_format": {"type": "xml"}}),
            "response_format",
        ),
        (json!({"guided_json": {"type": "nonsense"}}), "guided_json"),
        (json!({"guided_regex": "(unclosed"}), "guided_regex"),
        (json!({"guided_choice": []}), "guided_choice"),
        (
            json!({"guided_grammar": "start: undefined_rule"}),
            "guided_grammar",
        ),
        (
            json!({"response_format": {"type": "json_object"}, "guided_regex": "a+"}),
            "guided_regex",
        ),
        (
            json!({"guided_choice": ["a"], "beam_width": 2}),
            "guided_choice",
        ),
    ];
    for (extra, param) in &guided_refusals {
        let (st, r) = s.post("/v1/chat/completions", chat(extra.clone()));
        assert_error(st, &r, 400, Some(param), "invalid_value");
    }
    // A JSON object cut by max_tokens ends with `length`; a choice is one of
    // the choices and ends with `stop`.
    let (st, r) = s.post(
        "/v1/chat/completions",
        chat(json!({"response_format": {"type": "json_object"}, "temperature": 0})),
    );
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["choices"][0]["finish_reason"], "length", "{r}");
    let text = r["choices"][0]["message"]["content"].as_str().unwrap_or("");
    assert!(text.starts_with('{'), "{r}");
    let (st, r) = s.post(
        "/v1/chat/completions",
        chat(json!({"guided_choice": ["red", "green"], "max_tokens": 16})),
    );
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["choices"][0]["finish_reason"], "stop", "{r}");
    let text = r["choices"][0]["message"]["content"].as_str().unwrap_or("");
    assert!(text == "red" || text == "green", "{r}");
    // logit_bias bans the greedy pick.
    let greedy = |bias: Value| {
        let (st, r) = s.post(
            "/v1/completions",
            json!({"prompt": "The capital of France is", "max_tokens": 1, "temperature": 0, "logit_bias": bias}),
        );
        assert_eq!(st, 200, "{r}");
        r["choices"][0]["text"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(greedy(json!({})), " Paris");
    let (_, t) = s.post("/tokenize", json!({"prompt": " Paris"}));
    let paris = t["tokens"][0].as_u64().expect("a token id");
    assert_ne!(greedy(json!({ paris.to_string(): -100 })), " Paris");
    // best_of equal to n is what is generated anyway.
    let (st, r) = s.post(
        "/v1/completions",
        json!({"prompt": "x", "best_of": 1, "max_tokens": 1}),
    );
    assert_eq!(st, 200, "{r}");

    // Every refusal is counted once: by status in the HTTP metric, and by
    // reason in the failure metric (400s and the 413 as invalid, the 404
    // of an unknown model too; the 405 is no generation request).
    let four_hundreds = 9 + 2 + 3 + 6 + refused.len() + guided_refusals.len();
    let count = |needle: &str| -> f64 {
        let (_, text) = s.get("/metrics");
        text.lines()
            .filter(|l| l.starts_with("parallm_http_requests_total{") && l.contains(needle))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert_eq!(count("status=\"400\""), four_hundreds as f64);
    assert_eq!(count("status=\"413\""), 1.0);
    let invalid = s.metric("parallm_request_failure_total{reason=\"invalid\"}");
    assert_eq!(invalid, (four_hundreds + 2) as f64);

    // API keys: 401 on everything but /health.
    let mut s = Server::start(&["--api-key", "sekret"], true);
    let (st, _) = s.get("/health");
    assert_eq!(st, 200);
    for path in ["/v1/models", "/metrics"] {
        let (st, body) = s.get(path);
        let r: Value = serde_json::from_str(&body).expect("json");
        assert_error(st, &r, 401, None, "invalid_api_key");
    }
    s.key = Some("wrong".into());
    let (st, r) = s.post("/v1/completions", json!({"prompt": "x", "max_tokens": 1}));
    assert_error(st, &r, 401, None, "invalid_api_key");
    s.key = Some("sekret".into());
    let (st, r) = s.post("/v1/completions", json!({"prompt": "x", "max_tokens": 1}));
    assert_eq!(st, 200, "{r}");
    // Exactly one space after a scheme compared in any case.
    let models = |auth: &str| {
        s.agent
            .get(&s.url("/v1/models"))
            .header("Authorization", auth)
            .call()
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    };
    assert_eq!(models("Bearer  sekret "), 401);
    assert_eq!(models("Bearer  sekret"), 401);
    assert_eq!(models("bearer sekret"), 200);
    assert_eq!(models("BEARER sekret"), 200);
    assert_eq!(models("Bearer sekret2"), 401);
    drop(s);

    // Keys from a file (kept out of `ps`), masked by `config show`.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("keys");
    std::fs::write(&file, "# one per line\nfirst-key\n\nsecond-key\n").expect("write");
    let set = format!("server.api_keys_file={}", file.display());
    let mut s = Server::start(&["--set", &set], true);
    for (key, want) in [("second-key", 200), ("first-key", 200), ("third-key", 401)] {
        s.key = Some(key.into());
        assert_eq!(s.get("/v1/models").0, want, "{key}");
    }
    let show = Command::new(env!("CARGO_BIN_EXE_parallm"))
        .args(["config", "show", "--api-key", "in-the-clear", "--set", &set])
        .output()
        .expect("config show runs");
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(show.status.success(), "{text}");
    assert!(text.contains("api_keys = [\"***\"]"), "{text}");
    assert!(!text.contains("in-the-clear"), "{text}");
}

/// Opens a connection to `port` that sends the headers of a 1000-byte body
/// and 11 bytes of it, then stalls.
fn stalled_body(port: u16) -> TcpStream {
    let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"prompt\": ";
    c.write_all(head.as_bytes()).expect("send");
    c
}

#[test]
fn stalled_bodies_are_closed_at_the_body_timeout_while_others_are_served() {
    let s = Server::start(&["--set", "server.body_timeout_secs=2"], true);
    let t0 = Instant::now();
    let stalled: Vec<TcpStream> = (0..200).map(|_| stalled_body(s.port())).collect();
    // Normal requests keep succeeding meanwhile.
    for _ in 0..3 {
        let (st, r) = s.post("/v1/completions", json!({"prompt": "Hi", "max_tokens": 2}));
        assert_eq!(st, 200, "{r}");
    }
    for (i, mut c) in stalled.into_iter().enumerate() {
        c.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let mut answer = Vec::new();
        // Returns at EOF: the server closed the connection.
        c.read_to_end(&mut answer)
            .expect("the server closes the connection");
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.1 408"), "connection {i}: {text}");
        assert!(text.contains("request_timeout"), "connection {i}: {text}");
    }
    // Closed at the 2 s timeout, with room for a busy machine: without the
    // timeout they would stay open until the 20 s read timeout above.
    let elapsed = t0.elapsed();
    assert!(
        elapsed < Duration::from_secs(15),
        "closed after {elapsed:?}"
    );
    let (st, _) = s.get("/health");
    assert_eq!(st, 200);
}

#[test]
fn health_answers_while_megabyte_prompts_are_tokenized() {
    let s = Server::start(&["--set", "server.max_body_bytes=4000000"], true);
    let prompt = "The quick brown fox jumps over 13 lazy dogs. ".repeat(1 << 20 >> 5);
    assert!(prompt.len() >= 1 << 20);
    let body = json!({ "prompt": prompt }).to_string();
    let base = s.base.clone();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let clients: Vec<_> = (0..6)
        .map(|_| {
            let (url, body, done) = (format!("{base}/tokenize"), body.clone(), done.clone());
            std::thread::spawn(move || {
                let t = Instant::now();
                let r = agent()
                    .post(&url)
                    .header("Content-Type", "application/json")
                    .send(&body);
                let took = t.elapsed();
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut r = r.expect("tokenize answers");
                let v: Value =
                    serde_json::from_str(&r.body_mut().read_to_string().unwrap_or_default())
                        .expect("json");
                assert!(v["count"].as_u64().unwrap_or(0) > 100_000, "{v}");
                took
            })
        })
        .collect();
    let mut probes = Vec::new();
    while done.load(std::sync::atomic::Ordering::SeqCst) < 6 {
        let t = Instant::now();
        let (st, _) = s.get("/health");
        assert_eq!(st, 200);
        probes.push(t.elapsed());
        std::thread::sleep(Duration::from_millis(20));
    }
    let tokenizing: Vec<Duration> = clients
        .into_iter()
        .map(|c| c.join().expect("client"))
        .collect();
    let quickest = tokenizing.iter().min().copied().unwrap_or_default();
    probes.sort();
    println!(
        "{} probes while tokenizing (each tokenize took {quickest:?} or more): median {:?}, 90th {:?}, slowest {:?}",
        probes.len(),
        probes[probes.len() / 2],
        probes[probes.len() * 9 / 10],
        probes.last()
    );
    assert!(
        probes.len() >= 5,
        "tokenizing took only {} probes",
        probes.len()
    );
    // Had a tokenize held an HTTP worker, most probes would have waited
    // about as long as a tokenize itself; one probe paused by a busy
    // machine proves nothing. How fast /health answers under load is a
    // latency goal, measured by benchmarks, not asserted here.
    let ninetieth = probes[(probes.len() - 1) * 9 / 10];
    assert!(
        ninetieth * 2 < quickest,
        "/health's 90th percentile took {ninetieth:?}, against {quickest:?} for the quickest tokenize"
    );

    // A generation's megabyte prompt is refused by its length, before it is
    // tokenized in full.
    let t = Instant::now();
    let (st, _, text) = s.post_raw("/v1/completions", &body);
    let r: Value = serde_json::from_str(&text).expect("json");
    assert_error(st, &r, 400, Some("prompt"), "context_length_exceeded");
    let msg = r["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("bytes, at least") && msg.contains("context is 8192 tokens"),
        "{msg}"
    );
    println!("refused in {:?}", t.elapsed());
}

#[test]
fn engine_failures_are_500_or_an_error_event_mid_stream() {
    // Node 0 fails at every step from step 3 on (step 0 is the start-up
    // probe), with no retries: requests fail once they reach it.
    let s = Server::start(
        &[
            "--set",
            "faults.node=0",
            "--set",
            "faults.step=3",
            "--set",
            "faults.times=0",
            "--set",
            "scheduler.max_retries=0",
            "--set",
            "server.health_probe_interval_secs=3600",
            "--set",
            "server.health_max_age_secs=3600",
        ],
        true,
    );
    // Streamed: prefill at step 1 and a decode at step 2 stream tokens, then
    // the failure ends the stream with an error event and no [DONE].
    let (status, _, text) = s.post_raw(
        "/v1/completions",
        &json!({"prompt": "Once upon a time", "max_tokens": 50, "ignore_eos": true,
                "stream": true, "temperature": 0})
        .to_string(),
    );
    assert_eq!(status, 200);
    let events = sse_events(&text);
    let last: Value = serde_json::from_str(events.last().expect("events")).expect("json");
    assert_eq!(last["error"]["type"], "server_error", "{text}");
    assert_eq!(last["error"]["code"], "engine_error", "{text}");
    assert!(events.len() >= 2, "tokens came before the failure: {text}");
    assert!(!text.contains("[DONE]"));

    let (st, r) = s.post("/v1/completions", json!({"prompt": "x", "max_tokens": 4}));
    assert_error(st, &r, 500, None, "engine_error");
}

#[test]
fn an_engine_that_halts_ends_its_requests_with_an_error_and_the_server_exits_non_zero() {
    // The merge panics from step 6 on (step 0 is the start-up probe, then
    // the first health probe): no supervision recovers from that, so the
    // engine halts for good, as it would if its MPI job lost a rank.
    let mut s = Server::start(
        &[
            "--set",
            "faults.merge_step=6",
            "--set",
            "server.health_probe_interval_secs=3600",
            "--set",
            "server.health_max_age_secs=3600",
        ],
        true,
    );
    let (st, r) = s.post(
        "/v1/completions",
        json!({"prompt": "Once upon a time", "max_tokens": 40, "ignore_eos": true,
               "temperature": 0}),
    );
    assert_error(st, &r, 500, None, "engine_error");
    let msg = r["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("injected fault"), "{msg}");
    // It does not linger answering 503 until an orchestrator notices: it
    // exits non-zero, for its supervisor to restart it.
    let status = exit_status(&mut s, Duration::from_secs(10));
    assert!(!status.success(), "{status:?}");
}

/// Settings that keep the health probe out of the running-request and KV
/// gauges a test waits on (a probe is a one-token request): one at start-up,
/// then none for an hour.
const NO_PROBES: [&str; 4] = [
    "--set",
    "server.health_probe_interval_secs=3600",
    "--set",
    "server.health_max_age_secs=3600",
];

/// Sends a request on a raw connection, reads `read` bytes of the answer
/// (none with `read` 0), and closes it once `leave` says so.
fn send_and_leave(addr: &str, body: &str, read: usize, leave: std::sync::mpsc::Receiver<()>) {
    let mut c = TcpStream::connect(addr.trim_start_matches("http://")).expect("connect");
    write!(
        c,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut buf = vec![0u8; read];
    if read > 0 {
        c.read_exact(&mut buf).expect("read some of the stream");
    }
    // Leave only when told: the test first sees the request hold KV blocks
    // (a stream's first bytes come before it can look).
    leave.recv().expect("told to leave");
}

#[test]
fn a_client_that_disconnects_cancels_and_frees_its_kv_blocks() {
    let s = Server::start(&NO_PROBES, true);
    let long = |stream: bool| {
        json!({"prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": true, "stream": stream})
            .to_string()
    };
    for (stream, read) in [(false, 0), (true, 400)] {
        let cancelled = s.metric("parallm_request_failure_total{reason=\"cancelled\"}");
        let (leave, told) = std::sync::mpsc::channel();
        let t = std::thread::spawn({
            let (base, body) = (s.base.clone(), long(stream));
            move || send_and_leave(&base, &body, read, told)
        });
        s.wait_metric("parallm_kv_blocks_used", |v| v > 0.0, "the request runs");
        let _ = leave.send(());
        t.join().expect("client");
        let t0 = Instant::now();
        s.wait_metric("parallm_kv_blocks_used", |v| v == 0.0, "KV blocks freed");
        println!(
            "stream={stream}: KV freed {:?} after the disconnect",
            t0.elapsed()
        );
        s.wait_metric(
            "parallm_request_failure_total{reason=\"cancelled\"}",
            |v| v == cancelled + 1.0,
            "one more cancelled request",
        );
        assert_eq!(s.metric("parallm_requests_running"), 0.0);
    }
    // The whole answer the client left before is logged as nginx's 499,
    // not as a server error.
    let route = "parallm_http_requests_total{route=\"/v1/completions\"";
    s.wait_metric(&format!("{route},status=\"499\"}}"), |v| v == 1.0, "a 499");
    assert_eq!(s.metric(&format!("{route},status=\"500\"}}")), 0.0);
}

#[test]
fn a_flood_beyond_capacity_gets_429s_and_every_accepted_request_completes() {
    let s = Server::start(
        &[
            "--set",
            "scheduler.queue_capacity=2",
            "--set",
            "scheduler.max_running=2",
            "--set",
            "server.retry_after_secs=2",
            "--set",
            "server.workers=2",
        ],
        true,
    );
    let results: Vec<(u16, Option<String>, String)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..24)
            .map(|i| {
                let s = &s;
                scope.spawn(move || {
                    s.post_raw(
                        "/v1/completions",
                        &json!({"prompt": format!("Request {i}:"), "max_tokens": 24,
                                "ignore_eos": true, "temperature": 0})
                        .to_string(),
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client"))
            .collect()
    });
    let (mut ok, mut limited) = (0, 0);
    for (status, retry, body) in &results {
        let r: Value = serde_json::from_str(body).expect("json");
        match status {
            200 => {
                ok += 1;
                assert_eq!(r["usage"]["completion_tokens"], 24, "{r}");
                assert_eq!(r["choices"][0]["finish_reason"], "length");
            }
            429 => {
                limited += 1;
                assert_error(*status, &r, 429, None, "rate_limit_exceeded");
                assert_eq!(retry.as_deref(), Some("2"));
            }
            other => panic!("unexpected status {other}: {body}"),
        }
    }
    println!("{ok} accepted and completed, {limited} refused with 429");
    assert!(ok >= 2 && limited >= 1, "{ok} ok, {limited} limited");
    assert_eq!(ok + limited, 24);
    // Only the clients' requests were refused (a probe never is).
    assert_eq!(
        s.metric("parallm_request_failure_total{reason=\"overloaded\"}"),
        limited as f64
    );
    // More sequences than the queue holds could never be admitted: a 400
    // naming `n`, not a 429 to retry forever.
    let (st, r) = s.post(
        "/v1/completions",
        json!({"prompt": "x", "n": 3, "max_tokens": 2}),
    );
    assert_error(st, &r, 400, Some("n"), "invalid_value");
}

#[test]
fn health_stays_200_while_a_flood_keeps_the_queue_full() {
    // A busy server is a healthy one: its probe is never refused for the
    // load it checks (it takes no place in the queue), so a load balancer
    // does not drop it exactly when it is busiest.
    let s = Server::start(
        &[
            "--set",
            "scheduler.queue_capacity=2",
            "--set",
            "scheduler.max_running=1",
            "--set",
            "server.health_probe_interval_secs=1",
            "--set",
            "server.health_max_age_secs=5",
        ],
        true,
    );
    let until = Instant::now() + Duration::from_secs(9);
    let (limited, unhealthy) = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..6)
            .map(|i| {
                let s = &s;
                scope.spawn(move || {
                    let mut limited = 0;
                    while Instant::now() < until {
                        let (st, _, _) = s.post_raw(
                            "/v1/completions",
                            &json!({"prompt": format!("Flood {i}:"), "max_tokens": 16,
                                    "ignore_eos": true})
                            .to_string(),
                        );
                        assert!(st == 200 || st == 429, "status {st}");
                        if st == 429 {
                            limited += 1;
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    }
                    limited
                })
            })
            .collect();
        // The probe is neither refused nor held: it goes past the full
        // queue, the scheduler's demand and the one running place, so a
        // probe succeeds every second.
        let mut unhealthy = Vec::new();
        while Instant::now() < until {
            let (st, body) = s.get("/health");
            if st != 200 {
                unhealthy.push(body);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let limited: usize = clients.into_iter().map(|c| c.join().expect("client")).sum();
        (limited, unhealthy)
    });
    assert!(limited > 0, "the queue was never full");
    assert!(unhealthy.is_empty(), "{unhealthy:?}");
}

#[test]
fn sigterm_drains_in_flight_requests_then_exits_zero() {
    drains_on(libc::SIGTERM);
}

#[test]
fn sigusr1_drains_too() {
    // The signal mpirun passes on to its ranks; one process takes it the
    // same way.
    drains_on(libc::SIGUSR1);
}

/// Sends `signal` to the server.
fn signal(s: &Server, signal: libc::c_int) {
    // SAFETY: kill(2) with a valid pid of our own child and a standard signal.
    let rc = unsafe { libc::kill(s.child.id() as i32, signal) };
    assert_eq!(rc, 0);
}

/// Waits up to 10 s for `/health` to answer 503.
fn wait_unhealthy(s: &Server) {
    let t = Instant::now();
    loop {
        let (st, _) = s.get("/health");
        if st == 503 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "health stayed {st}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits up to `limit` for the server to exit; its status.
fn exit_status(s: &mut Server, limit: Duration) -> std::process::ExitStatus {
    let t = Instant::now();
    loop {
        if let Some(code) = s.child.try_wait().expect("wait") {
            return code;
        }
        assert!(t.elapsed() < limit, "the server did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A completion of `max_tokens` on a thread: its status and body.
fn request_on_thread(s: &Server, max_tokens: usize) -> std::thread::JoinHandle<(u16, String)> {
    post_on_thread(
        s,
        "/v1/completions",
        json!({"prompt": "Once upon a time", "max_tokens": max_tokens, "ignore_eos": true}),
    )
}

/// `body` posted to `path` on a thread: its status and body (status 0 and
/// the error where no answer came).
fn post_on_thread(s: &Server, path: &str, body: Value) -> std::thread::JoinHandle<(u16, String)> {
    let url = s.url(path);
    std::thread::spawn(move || match agent().post(&url).send(body.to_string()) {
        Ok(mut r) => (
            r.status().as_u16(),
            r.body_mut().read_to_string().unwrap_or_default(),
        ),
        Err(e) => (0, e.to_string()),
    })
}

/// A server without health probes after start-up (they would count as
/// running requests) whose drain waits `secs` seconds at most.
fn draining_server(secs: u64) -> Server {
    let drain = format!("server.shutdown_timeout_secs={secs}");
    Server::start(&[&NO_PROBES[..], &["--set", &drain]].concat(), true)
}

/// `signal` during a request: new work and `/health` get 503, the request
/// finishes whole, and the server exits 0.
fn drains_on(sig: libc::c_int) {
    let mut s = draining_server(60);
    // Long enough that the drain still runs when the late request comes.
    let client = request_on_thread(&s, 500);
    s.wait_metric("parallm_requests_running", |v| v >= 1.0, "the request runs");
    signal(&s, sig);
    // While draining: new work and /health get 503.
    wait_unhealthy(&s);
    let (st, r) = s.post("/v1/completions", json!({"prompt": "x", "max_tokens": 1}));
    assert_error(st, &r, 503, None, "unavailable");
    let (status, body) = client.join().expect("client");
    assert_eq!(status, 200, "{body}");
    let r: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(r["usage"]["completion_tokens"], 500);
    let code = exit_status(&mut s, Duration::from_secs(30));
    assert!(code.success(), "exit status {code}");
}

#[test]
fn a_second_sigterm_while_draining_stops_at_once() {
    // The drain would wait 10 minutes for this request.
    let mut s = draining_server(600);
    let client = request_on_thread(&s, 4000);
    s.wait_metric("parallm_requests_running", |v| v >= 1.0, "the request runs");
    signal(&s, libc::SIGTERM);
    wait_unhealthy(&s);
    signal(&s, libc::SIGTERM);
    let code = exit_status(&mut s, Duration::from_secs(15));
    assert!(code.success(), "exit status {code}");
    // The request was cut off, and told so.
    let (status, body) = client.join().expect("client");
    assert_eq!(status, 500, "{body}");
    assert!(
        body.contains("the server shut down before the request finished (SIGTERM"),
        "{body}"
    );
}

#[test]
fn requests_cut_off_by_the_shutdown_timeout_get_an_error() {
    let mut s = draining_server(1);
    let whole = request_on_thread(&s, 4000);
    let streamed = post_on_thread(
        &s,
        "/v1/completions",
        json!({"prompt": "Once upon a time", "max_tokens": 4000,
               "ignore_eos": true, "stream": true}),
    );
    s.wait_metric("parallm_requests_running", |v| v >= 2.0, "both run");
    signal(&s, libc::SIGTERM);
    let code = exit_status(&mut s, Duration::from_secs(20));
    assert!(code.success(), "exit status {code}");
    let cut = "the server shut down before the request finished (the shutdown timeout)";
    let (status, body) = whole.join().expect("client");
    assert_eq!(status, 500, "{body}");
    assert!(body.contains(cut), "{body}");
    // The stream had begun: it ends with an error event instead of [DONE].
    let (status, text) = streamed.join().expect("client");
    assert_eq!(status, 200, "{text}");
    let events = sse_events(&text);
    let last = events.last().expect("events");
    assert!(last.contains("\"error\"") && last.contains(cut), "{text}");
}

#[test]
fn embeddings_cut_off_by_the_shutdown_timeout_get_an_error() {
    // The reference model embeds too (a decoder, by its last token): 512
    // inputs of a few hundred tokens each take far longer than the drain's
    // one second.
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("parallm.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nshutdown_timeout_secs = 1\n\n[[models]]\nname = \"smol-embed\"\npath = \"{}\"\n",
            common::model_path().display()
        ),
    )
    .expect("write config");
    let mut s = Server::start(&["--config", config.to_str().expect("utf-8")], true);
    let steps = "parallm_embedding_step_duration_seconds_count";
    let before = s.metric(steps);
    let text = "The quick brown fox jumps over the lazy dog. ".repeat(30);
    let client = post_on_thread(
        &s,
        "/v1/embeddings",
        json!({"model": "smol-embed", "input": vec![text; 512]}),
    );
    s.wait_metric(steps, |v| v > before, "the embedding runs");
    signal(&s, libc::SIGTERM);
    let code = exit_status(&mut s, Duration::from_secs(30));
    assert!(code.success(), "exit status {code}");
    let (status, body) = client.join().expect("client");
    assert_eq!(status, 500, "{body}");
    assert!(
        body.contains("the server shut down before the request finished (the shutdown timeout)"),
        "{body}"
    );
}

/// Runs a script from tests/support and returns its stdout lines.
fn support_lines(script: &str) -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/support")
        .join(script);
    let out = Command::new("bash")
        .arg(&path)
        .stderr(Stdio::inherit())
        .output()
        .expect("run support script");
    assert!(out.status.success(), "{script} failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

/// Two tools for the tool-calling tests (strict, as OpenAI's `strict`
/// functions are: no properties beyond those named).
fn weather_tools() -> Value {
    json!([
        {"type": "function", "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {
                "city": {"type": "string", "maxLength": 24},
                "unit": {"enum": ["celsius", "fahrenheit"]}
            }, "required": ["city", "unit"], "additionalProperties": false}
        }},
        {"type": "function", "function": {
            "name": "get_time",
            "description": "The local time in a time zone",
            "parameters": {"type": "object", "properties": {
                "zone": {"type": "string", "maxLength": 24}
            }, "required": ["zone"], "additionalProperties": false}
        }}
    ])
}

/// The calls of a chat answer as (name, arguments), each checked to be a
/// defined tool whose arguments parse and hold the required keys.
fn checked_calls(r: &Value) -> Vec<(String, Value)> {
    let calls = r["choices"][0]["message"]["tool_calls"]
        .as_array()
        .unwrap_or_else(|| panic!("no tool_calls: {r}"));
    assert!(!calls.is_empty(), "{r}");
    assert_eq!(r["choices"][0]["finish_reason"], "tool_calls", "{r}");
    calls
        .iter()
        .map(|c| {
            assert_eq!(c["type"], "function", "{c}");
            assert!(
                c["id"].as_str().is_some_and(|id| id.starts_with("call_")),
                "{c}"
            );
            let name = c["function"]["name"].as_str().expect("name").to_string();
            let args: Value =
                serde_json::from_str(c["function"]["arguments"].as_str().expect("text"))
                    .unwrap_or_else(|e| panic!("arguments of {c}: {e}"));
            let required: &[&str] = match name.as_str() {
                "get_weather" => &["city", "unit"],
                "get_time" => &["zone"],
                other => panic!("a call of an undefined tool {other}"),
            };
            for k in required {
                assert!(args.get(k).is_some(), "{name} without {k}: {args}");
            }
            (name, args)
        })
        .collect()
}

/// The calls of a streamed chat answer, reassembled from its
/// `delta.tool_calls` fragments, and its finish reason.
fn streamed_calls(text: &str) -> (Vec<(String, Value)>, String) {
    let mut calls: Vec<(String, String)> = Vec::new();
    let mut reason = String::new();
    for e in sse_events(text) {
        if e == "[DONE]" {
            continue;
        }
        let v: Value = serde_json::from_str(&e).expect("a JSON chunk");
        let choice = &v["choices"][0];
        if let Some(r) = choice["finish_reason"].as_str() {
            reason = r.to_string();
        }
        for c in choice["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let i = c["index"].as_u64().expect("index") as usize;
            if let Some(name) = c["function"]["name"].as_str() {
                assert_eq!(i, calls.len(), "calls start in order");
                assert!(c["id"].as_str().is_some(), "{c}");
                calls.push((name.to_string(), String::new()));
            }
            if let Some(frag) = c["function"]["arguments"].as_str() {
                calls[i].1.push_str(frag);
            }
        }
    }
    let calls = calls
        .into_iter()
        .map(|(n, a)| {
            (
                n,
                serde_json::from_str(&a).expect("streamed arguments parse"),
            )
        })
        .collect();
    (calls, reason)
}

/// `tool_choice: required` against `s`: 50 seeded sampled requests all
/// answer with a call of a defined tool whose arguments parse (one call:
/// with parallel calls a small random model may go on calling until
/// `max_tokens` cuts it); a streamed answer reassembles to the same calls;
/// a named function is the one called, once; with parallel calls, the
/// complete ones stand; a tool result renders back and gets an answer.
fn tool_calls_hold(s: &Server, what: &str) {
    let body = |seed: u64, extra: Value| {
        let mut b = json!({
            "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
            "tools": weather_tools(), "tool_choice": "required",
            "parallel_tool_calls": false,
            "temperature": 1.0, "seed": seed, "max_tokens": 128,
        });
        for (k, v) in extra.as_object().expect("fields") {
            b[k] = v.clone();
        }
        b
    };
    let answers: Vec<Value> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..50u64)
            .map(|seed| {
                let b = body(seed, json!({}));
                sc.spawn(move || {
                    let (st, r) = s.post("/v1/chat/completions", b);
                    assert_eq!(st, 200, "{r}");
                    r
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a client thread"))
            .collect()
    });
    let mut names = std::collections::BTreeMap::new();
    for r in &answers {
        for (name, _) in checked_calls(r) {
            *names.entry(name).or_insert(0) += 1;
        }
    }
    println!("{what}: 50 of 50 required answers are parseable calls: {names:?}");

    // Streamed with the same seed: the same calls.
    let (_, _, text) = s.post_raw(
        "/v1/chat/completions",
        &body(7, json!({"stream": true})).to_string(),
    );
    let (streamed, reason) = streamed_calls(&text);
    assert_eq!(reason, "tool_calls", "{text}");
    let whole: Vec<(String, Value)> = checked_calls(&answers[7]);
    assert_eq!(
        streamed, whole,
        "{what}: the stream reassembles to the answer"
    );

    // A named function is the one called.
    let (st, r) = s.post(
        "/v1/chat/completions",
        body(
            3,
            json!({"tool_choice": {"type": "function", "function": {"name": "get_time"}}}),
        ),
    );
    assert_eq!(st, 200, "{r}");
    let calls = checked_calls(&r);
    assert_eq!(calls.len(), 1, "{r}");
    assert_eq!(calls[0].0, "get_time", "{r}");
    // Once, also where parallel calls are allowed.
    let (st, r) = s.post(
        "/v1/chat/completions",
        body(
            3,
            json!({"tool_choice": {"type": "function", "function": {"name": "get_time"}}, "parallel_tool_calls": true}),
        ),
    );
    assert_eq!(st, 200, "{r}");
    assert_eq!(checked_calls(&r).len(), 1, "{r}");
    // With parallel calls, the complete calls stand even where the length
    // limit cuts the next one short.
    let (st, r) = s.post(
        "/v1/chat/completions",
        body(5, json!({"parallel_tool_calls": true, "max_tokens": 100})),
    );
    assert_eq!(st, 200, "{r}");
    let message = &r["choices"][0]["message"];
    let parallel = message["tool_calls"].as_array().map_or(0, Vec::len);
    assert!(parallel >= 1, "{r}");
    println!(
        "{what}: parallel calls: {parallel}, finish_reason {}",
        r["choices"][0]["finish_reason"]
    );

    // The round trip: the call and its result render back into the prompt.
    let call = &r["choices"][0]["message"]["tool_calls"][0];
    let (st, r) = s.post(
        "/v1/chat/completions",
        json!({"messages": [
            {"role": "user", "content": "What time is it in Tokyo?"},
            {"role": "assistant", "content": null, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": "{\"time\": \"14:05\"}"}
        ], "tools": weather_tools(), "tool_choice": "none", "max_tokens": 16, "temperature": 0}),
    );
    assert_eq!(st, 200, "{r}");
    assert!(r["choices"][0]["message"]["content"].is_string(), "{r}");
    assert!(
        r["choices"][0]["message"].get("tool_calls").is_none(),
        "{r}"
    );
    assert!(
        r["usage"]["prompt_tokens"].as_u64().is_some_and(|n| n > 20),
        "{r}"
    );

    // Bad tools and choices are 400s naming the field.
    for (extra, param) in [
        (
            json!({"tool_choice": {"type": "function", "function": {"name": "nope"}}}),
            "tool_choice",
        ),
        (
            json!({"tools": [{"type": "function", "function": {}}]}),
            "tools",
        ),
        (json!({"tool_choice": "sometimes"}), "tool_choice"),
        (
            json!({"response_format": {"type": "json_object"}}),
            "response_format",
        ),
    ] {
        let (st, r) = s.post("/v1/chat/completions", body(1, extra));
        assert_error(st, &r, 400, Some(param), "invalid_value");
    }
}

#[test]
fn tool_choice_required_always_calls_a_defined_tool_in_two_families_templates() {
    // The reference model: SmolLM2's ChatML template knows no tools, so
    // they are folded into the system message in the Hermes format.
    let s = Server::start(&[], true);
    tool_calls_hold(&s, "SmolLM2 (template without tools)");
    drop(s);
    // A Qwen2 directory with Qwen2.5's template, which renders `tools`.
    let dir = tiny_qwen2_with_template("qwen2.5-instruct.jinja");
    let s = Server::start_model(&dir, &[], true);
    tool_calls_hold(&s, "Qwen2.5's template (renders tools)");
}

/// A copy of the tiny Qwen2 directory whose chat template is
/// `tests/data/chat/{template}`.
fn tiny_qwen2_with_template(template: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("qwen2-{template}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let src = common::hf_models_dir().join("qwen2-bf16");
    for e in std::fs::read_dir(&src).expect("the tiny directory") {
        let e = e.expect("entry");
        std::fs::copy(e.path(), dir.join(e.file_name())).expect("copy");
    }
    let template = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/chat")
            .join(template),
    )
    .expect("template");
    let cfg_path = dir.join("tokenizer_config.json");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).expect("config")).expect("json");
    cfg["chat_template"] = Value::String(template);
    std::fs::write(&cfg_path, cfg.to_string()).expect("write");
    let _ = std::fs::remove_file(dir.join("chat_template.jinja"));
    dir
}

#[test]
fn chat_template_fields_render_as_hugging_face_does_and_thoughts_are_answered_apart() {
    // The reference model (ChatML tokens) with Qwen3's template in place
    // of its own, its thinking turned off by the server's setting.
    let template = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/chat/qwen3.jinja");
    let s = Server::start(
        &[
            "--set",
            &format!("model.chat_template_file={}", template.display()),
            "--set",
            r#"model.chat_template_kwargs={"enable_thinking": false}"#,
        ],
        true,
    );
    let (_, info) = s.get("/tokenizer_info");
    let info: Value = serde_json::from_str(&info).expect("json");
    assert_eq!(
        info["chat_template"].as_str(),
        Some(
            std::fs::read_to_string(&template)
                .expect("template")
                .as_str()
        )
    );
    let user = json!({"role": "user", "content": "Q"});
    let begun = json!({"role": "assistant", "content": "The answer is "});
    let text = |messages: Value, extra: Value| -> (String, usize) {
        let mut body = json!({"messages": messages});
        body.as_object_mut()
            .expect("object")
            .extend(extra.as_object().expect("object").clone());
        let (st, r) = s.post("/tokenize", body);
        assert_eq!(st, 200, "{r}");
        let (st, d) = s.post("/detokenize", json!({"tokens": r["tokens"]}));
        assert_eq!(st, 200, "{d}");
        (
            d["prompt"].as_str().expect("text").to_string(),
            r["count"].as_u64().expect("count") as usize,
        )
    };
    // (As /detokenize writes them: without the special tokens.)
    let opened = "user\nQ\nassistant\n";
    let cases = [
        // The server's variable, then the request's over it.
        (
            json!([user]),
            json!({}),
            format!("{opened}<think>\n\n</think>\n\n"),
        ),
        (
            json!([user]),
            json!({"chat_template_kwargs": {"enable_thinking": true}}),
            opened.to_string(),
        ),
        // A request's other variable leaves the server's in place.
        (
            json!([user]),
            json!({"chat_template_kwargs": {"unrelated": 1}}),
            format!("{opened}<think>\n\n</think>\n\n"),
        ),
        (
            json!([user]),
            json!({"add_generation_prompt": false}),
            "user\nQ\n".to_string(),
        ),
        // The final message left open, its trailing space kept as Qwen3's
        // template keeps it (which writes the thought of an answer after
        // the last question, even an empty one).
        (
            json!([user, begun]),
            json!({"continue_final_message": true}),
            format!("{opened}<think>\n\n</think>\n\nThe answer is "),
        ),
    ];
    for (messages, extra, want) in cases {
        let (got, count) = text(messages.clone(), extra.clone());
        assert_eq!(got, want, "{extra}");
        // The chat endpoint renders the same prompt.
        let mut body = json!({"messages": messages, "max_tokens": 1, "temperature": 0});
        body.as_object_mut()
            .expect("object")
            .extend(extra.as_object().expect("object").clone());
        let (st, r) = s.post("/v1/chat/completions", body);
        assert_eq!(st, 200, "{r}");
        assert_eq!(r["usage"]["prompt_tokens"], count, "{extra}");
    }
    for (extra, param) in [
        (
            json!({"continue_final_message": true, "add_generation_prompt": true}),
            "continue_final_message",
        ),
        (json!({"chat_template_kwargs": [1]}), "chat_template_kwargs"),
        (
            json!({"add_generation_prompt": "no"}),
            "add_generation_prompt",
        ),
        (
            json!({"chat_template_kwargs": {"messages": []}}),
            "chat_template_kwargs",
        ),
    ] {
        for path in ["/tokenize", "/v1/chat/completions"] {
            let mut body = json!({"messages": [user, begun], "max_tokens": 1});
            body.as_object_mut()
                .expect("object")
                .extend(extra.as_object().expect("object").clone());
            let (st, r) = s.post(path, body);
            assert_error(st, &r, 400, Some(param), "invalid_value");
        }
    }
    // A template per request is refused, and the fields go with `messages`.
    let (st, r) = s.post(
        "/v1/chat/completions",
        json!({"messages": [user], "chat_template": "{{ 1 }}", "max_tokens": 1}),
    );
    assert_error(st, &r, 400, Some("chat_template"), "invalid_value");
    let (st, r) = s.post(
        "/tokenize",
        json!({"prompt": "Q", "add_generation_prompt": false}),
    );
    assert_error(st, &r, 400, Some("add_generation_prompt"), "invalid_value");
    // A final message with no text cannot be continued.
    let empty = json!({"role": "assistant", "content": " "});
    let (st, r) = s.post(
        "/v1/chat/completions",
        json!({"messages": [user, empty], "continue_final_message": true, "max_tokens": 1}),
    );
    assert_error(st, &r, 400, Some("continue_final_message"), "invalid_value");
    thoughts_are_answered_apart(&s);
}

/// A streamed chat answer's `(reasoning_content, content, finish_reason)`:
/// its deltas concatenated.
fn streamed_thought(text: &str) -> (String, String, String) {
    let (mut thought, mut content, mut reason) = (String::new(), String::new(), String::new());
    for e in sse_events(text).iter().filter(|e| *e != "[DONE]") {
        let v: Value = serde_json::from_str(e).expect("a JSON chunk");
        let choice = &v["choices"][0];
        if let Some(r) = choice["finish_reason"].as_str() {
            reason = r.to_string();
        }
        thought.push_str(choice["delta"]["reasoning_content"].as_str().unwrap_or(""));
        content.push_str(choice["delta"]["content"].as_str().unwrap_or(""));
    }
    (thought, content, reason)
}

/// Against a server whose chat template (Qwen3's) implies thoughts: a
/// `<think>` thought at the start of an answer is `reasoning_content`, the
/// rest `content` (tool calls read from it), whole and streamed alike; a
/// prompt that ends in `<think>` starts the answer in the thought; a guide
/// holds only the answer after it; `include_reasoning: false` leaves it
/// out; a thought sent back reaches the template.
fn thoughts_are_answered_apart(s: &Server) {
    let user = json!({"role": "user", "content": "Q"});
    let ask = |extra: Value| {
        let mut body = json!({"messages": [user], "temperature": 0, "max_tokens": 60,
            "chat_template_kwargs": {"enable_thinking": true}});
        body.as_object_mut()
            .expect("object")
            .extend(extra.as_object().expect("object").clone());
        let (st, r) = s.post("/v1/chat/completions", body.clone());
        assert_eq!(st, 200, "{r}");
        body["stream"] = json!(true);
        let (st, _, streamed) = s.post_raw("/v1/chat/completions", &body.to_string());
        assert_eq!(st, 200, "{streamed}");
        (r["choices"][0].clone(), streamed)
    };
    // The reference model thinks only where a guide makes it.
    let thinking = json!({"guided_regex": "<think>\n[a-z]{2,9}( [a-z]{2,9}){1,3}\n</think>\n\n[A-Z][a-z]{2,9}( [a-z]{2,9}){0,2}[.]"});
    let (choice, streamed) = ask(thinking.clone());
    let message = &choice["message"];
    let thought = message["reasoning_content"].as_str().expect("a thought");
    let content = message["content"].as_str().expect("an answer");
    assert!(
        !thought.starts_with('\n') && !thought.ends_with('\n') && thought.contains(' '),
        "{message}"
    );
    assert!(
        content.starts_with(|c: char| c.is_ascii_uppercase()) && content.ends_with('.'),
        "{message}"
    );
    assert_eq!(choice["finish_reason"], "stop");
    assert_eq!(
        streamed_thought(&streamed),
        (thought.to_string(), content.to_string(), "stop".to_string())
    );
    // Left out when not wanted, the answer the same.
    let mut without = thinking.clone();
    without["include_reasoning"] = json!(false);
    let (choice, streamed) = ask(without);
    assert!(
        choice["message"].get("reasoning_content").is_none(),
        "{choice}"
    );
    assert_eq!(choice["message"]["content"], content);
    assert_eq!(
        streamed_thought(&streamed),
        (String::new(), content.to_string(), "stop".to_string())
    );
    // A thought, then a call.
    let calling = json!({
        "tools": weather_tools(),
        "guided_regex": "<think>\n[a-z]{2,9}\n</think>\n\n<tool_call>\n[{]\"name\": \"get_time\", \"arguments\": [{]\"zone\": \"[A-Z][a-z]{2,9}\"[}][}]\n</tool_call>",
    });
    let (choice, streamed) = ask(calling);
    let message = &choice["message"];
    assert!(
        message["reasoning_content"]
            .as_str()
            .is_some_and(|t| !t.is_empty()),
        "{message}"
    );
    assert_eq!(message["content"], Value::Null, "{message}");
    assert_eq!(choice["finish_reason"], "tool_calls");
    let calls = checked_calls(&json!({"choices": [choice]}));
    assert_eq!(calls.len(), 1);
    assert_eq!(streamed_calls(&streamed), (calls, "tool_calls".to_string()));
    assert_eq!(
        streamed_thought(&streamed).0,
        message["reasoning_content"].as_str().unwrap_or_default()
    );
    // An answer without a thought is content, as without the reading.
    let (choice, _) = ask(json!({"guided_regex": "[A-Z][a-z]{2,9}[.]"}));
    assert!(
        choice["message"].get("reasoning_content").is_none(),
        "{choice}"
    );
    assert!(choice["message"]["content"]
        .as_str()
        .is_some_and(|c| c.ends_with('.')));
    // A prompt that opened the thought: the answer starts in it (the
    // reference model closes it at once, and writes on); so does a final
    // message continued with its thought open, however long.
    let none_if_empty = |t: &str| match t {
        "" => Value::Null,
        t => json!(t),
    };
    let opened_body = |prefix: &str| {
        json!({"messages": [user, {"role": "assistant", "content": prefix}],
            "continue_final_message": true, "add_generation_prompt": false,
            "temperature": 0, "max_tokens": 16})
    };
    for prefix in [
        "<think>",
        "<think>\nThe user asks Q, which is short. Let me",
    ] {
        let mut body = opened_body(prefix);
        let (st, tokens) = s.post("/tokenize", body.clone());
        assert_eq!(st, 200, "{tokens}");
        let (st, raw) = s.post(
            "/v1/completions",
            json!({"prompt": tokens["tokens"], "temperature": 0, "max_tokens": 16}),
        );
        assert_eq!(st, 200, "{raw}");
        let raw = raw["choices"][0]["text"].as_str().expect("text");
        let (want_thought, want_content) = match raw.find("</think>") {
            Some(at) => (raw[..at].trim(), raw[at + "</think>".len()..].trim_start()),
            None => (raw.trim(), ""),
        };
        let (st, r) = s.post("/v1/chat/completions", body.clone());
        assert_eq!(st, 200, "{r}");
        let message = &r["choices"][0]["message"];
        assert_eq!(
            message
                .get("reasoning_content")
                .cloned()
                .unwrap_or(Value::Null),
            none_if_empty(want_thought),
            "{prefix:?}: {raw:?} -> {message}"
        );
        assert_eq!(
            message["content"],
            none_if_empty(want_content),
            "{prefix:?}: {raw:?} -> {message}"
        );
        body["stream"] = json!(true);
        let (st, _, streamed) = s.post_raw("/v1/chat/completions", &body.to_string());
        assert_eq!(st, 200, "{streamed}");
        let (thought, content, _) = streamed_thought(&streamed);
        assert_eq!(
            (thought.as_str(), content.as_str()),
            (want_thought, want_content),
            "{prefix:?}"
        );
    }
    let mut body = opened_body("<think>");
    // A guide holds only the answer after the thought: the model closes
    // the opened thought as it likes, then answers as the guide says.
    body["stream"] = json!(false);
    body["guided_regex"] = json!("[A-Z][a-z]{2,9}[.]");
    body["max_tokens"] = json!(40);
    let (st, r) = s.post("/v1/chat/completions", body.clone());
    assert_eq!(st, 200, "{r}");
    let choice = &r["choices"][0];
    let content = choice["message"]["content"].as_str().unwrap_or_default();
    assert!(
        content.len() > 3 && content.ends_with('.') && !content.contains(' '),
        "{choice}"
    );
    assert_eq!(choice["finish_reason"], "stop", "{choice}");
    body["stream"] = json!(true);
    let (st, _, streamed) = s.post_raw("/v1/chat/completions", &body.to_string());
    assert_eq!(st, 200, "{streamed}");
    assert_eq!(streamed_thought(&streamed).1, content);
    // A thought sent back reaches the template (Qwen3's writes it in the
    // last answer); it goes with assistant messages only.
    let answered = json!({"role": "assistant", "content": "A", "reasoning_content": "r"});
    let (st, r) = s.post(
        "/tokenize",
        json!({"messages": [user, answered], "add_generation_prompt": false}),
    );
    assert_eq!(st, 200, "{r}");
    let (_, d) = s.post("/detokenize", json!({"tokens": r["tokens"]}));
    assert_eq!(
        d["prompt"],
        "user\nQ\nassistant\n<think>\nr\n</think>\n\nA\n"
    );
    let wrong = json!({"role": "user", "content": "Q", "reasoning_content": "r"});
    let (st, r) = s.post(
        "/v1/chat/completions",
        json!({"messages": [wrong], "max_tokens": 1}),
    );
    assert_error(st, &r, 400, Some("messages"), "invalid_value");
}

#[test]
fn the_official_openai_python_client_works() {
    let python = support_lines("python-env.sh")
        .pop()
        .expect("python-env.sh prints the venv's python");
    let s = Server::start(&[], true);
    let (_, models) = s.get("/v1/models");
    let models: Value = serde_json::from_str(&models).expect("json");
    let model = models["data"][0]["id"].as_str().expect("id").to_string();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/openai_client.py");
    let out = Command::new(python)
        .arg(script)
        .args(["--base-url", &format!("{}/v1", s.base), "--model", &model])
        .output()
        .expect("run the openai client");
    println!("{}", String::from_utf8_lossy(&out.stdout));
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the openai client's checks failed");
}

#[test]
fn prometheus_scrapes_metrics_and_promtool_accepts_them() {
    let paths = support_lines("install-prometheus.sh");
    let [prometheus, promtool] = &paths[..] else {
        panic!("install-prometheus.sh printed {paths:?}, not two paths");
    };
    let s = Server::start(&NO_PROBES, true);
    for i in 0..3 {
        let (st, r) = s.post(
            "/v1/completions",
            json!({"prompt": format!("Count {i}"), "max_tokens": 3}),
        );
        assert_eq!(st, 200, "{r}");
    }
    let (_, text) = s.get("/metrics");
    let mut check = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    check
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write metrics");
    let out = check.wait_with_output().expect("promtool result");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port");
    let cfg = dir.path().join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
             scrape_configs:\n  - job_name: parallm\n    scrape_interval: 1s\n    scrape_timeout: 1s\n    \
             static_configs: [{{targets: ['127.0.0.1:{}']}}]\n",
            s.port()
        ),
    )
    .expect("write prometheus.yml");
    let mut prom = Command::new(prometheus)
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--log.level=warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start prometheus");
    let query = "parallm_http_requests_total{route=\"/v1/completions\",status=\"200\"}";
    let a = agent();
    let t = Instant::now();
    let value = loop {
        let r = a
            .get(&format!("http://127.0.0.1:{port}/api/v1/query"))
            .query("query", query)
            .call();
        let v = r.ok().and_then(|mut r| {
            let body: Value = serde_json::from_str(&r.body_mut().read_to_string().ok()?).ok()?;
            body["data"]["result"][0]["value"][1]
                .as_str()?
                .parse::<f64>()
                .ok()
        });
        if let Some(v) = v {
            break v;
        }
        if t.elapsed() > Duration::from_secs(60) {
            let targets = a
                .get(&format!("http://127.0.0.1:{port}/api/v1/targets"))
                .call()
                .ok()
                .and_then(|mut r| r.body_mut().read_to_string().ok());
            let _ = prom.kill();
            panic!("prometheus returned no value for {query}; targets: {targets:?}");
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let _ = prom.kill();
    let _ = prom.wait();
    assert_eq!(
        value, 3.0,
        "prometheus saw {value} completions, the test made 3"
    );
}

#[test]
fn bench_serve_multi_turn_resends_the_history_and_finds_it_cached() {
    let s = Server::start(&[], true);
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("report.json");
    let out = Command::new(env!("CARGO_BIN_EXE_parallm"))
        .args(["bench", "serve", "--url", &s.base, "--multi-turn", "3"])
        .args(["--num-prompts", "2", "--max-concurrency", "2"])
        .args([
            "--prompt-tokens",
            "12",
            "--output-tokens",
            "8",
            "--no-progress",
        ])
        .arg("--result-json")
        .arg(&json)
        .output()
        .expect("run bench serve");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("Multi-turn conversations:"), "{stdout}");
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("report")).expect("JSON");
    assert_eq!(report["completed"], 6, "{report}");
    let reqs = report["requests"].as_array().expect("requests");
    for conv in reqs.chunks(3) {
        let prompt = |t: usize| {
            conv[t]["usage_prompt_tokens"]
                .as_u64()
                .expect("prompt tokens")
        };
        let cached = |t: usize| {
            conv[t]["usage_cached_tokens"]
                .as_u64()
                .expect("cached tokens")
        };
        // Each turn resends the one before, answer included: longer prompts,
        // and the earlier turns' full blocks come from the prefix cache.
        assert!(
            prompt(1) > prompt(0) + 8 && prompt(2) > prompt(1) + 8,
            "{conv:?}"
        );
        assert_eq!(cached(0), 0, "{conv:?}");
        assert!(
            cached(2) >= 16 && cached(2) >= prompt(1) / 16 * 16 - 16,
            "{conv:?}"
        );
    }
    assert!(report["total_cached_tokens"].as_u64().expect("total") > 0);
}

#[test]
fn echo_returns_every_prompt_tokens_logprob_and_tokenizer_info_describes_the_vocabulary() {
    let s = Server::start(&[], true);
    let (st, info) = s.get("/tokenizer_info");
    assert_eq!(st, 200, "{info}");
    let info: Value = serde_json::from_str(&info).expect("json");
    let eos = info["eos_token"].as_str().expect("eos_token");
    assert!(!eos.is_empty(), "{info}");
    assert!(info["chat_template"]
        .as_str()
        .is_some_and(|t| !t.is_empty()));
    assert_eq!(info["model_max_length"], 8192);
    // A special token's text tokenizes to that one token, without additions.
    let (st, t) = s.post(
        "/tokenize",
        json!({"prompt": eos, "add_special_tokens": false}),
    );
    assert_eq!(st, 200, "{t}");
    assert_eq!(t["count"], 1, "{t}");

    let prompts = json!([[504, 3575, 282, 4649, 314], [504, 3575]]);
    let body = json!({"prompt": prompts, "echo": true, "max_tokens": 0, "logprobs": 2});
    let (st, r) = s.post("/v1/completions", body);
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["usage"]["completion_tokens"], 0, "{r}");
    assert_eq!(r["usage"]["prompt_tokens"], 7, "{r}");
    for (i, n) in [(0, 5), (1, 2)] {
        let c = &r["choices"][i];
        assert_eq!(c["finish_reason"], "length");
        let lp = &c["logprobs"];
        let logprobs = lp["token_logprobs"].as_array().expect("token_logprobs");
        assert_eq!(logprobs.len(), n, "{c}");
        assert!(
            logprobs[0].is_null() && lp["top_logprobs"][0].is_null(),
            "{c}"
        );
        for k in 1..n {
            let v = logprobs[k].as_f64().expect("a log-probability");
            assert!(v < 0.0, "{c}");
            let top = lp["top_logprobs"][k].as_object().expect("alternatives");
            assert_eq!(top.len(), 2, "{c}");
            let best = top
                .values()
                .filter_map(Value::as_f64)
                .fold(f64::MIN, f64::max);
            assert!(v <= best + 1e-6, "{c}");
        }
        assert_eq!(
            c["text"],
            lp["tokens"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_str().unwrap())
                .collect::<String>()
        );
    }
    // Both prompts start alike: the shared token's score is the same.
    assert_eq!(
        r["choices"][0]["logprobs"]["token_logprobs"][1],
        r["choices"][1]["logprobs"]["token_logprobs"][1]
    );
    // With a completion, the generated token follows the prompt's.
    let body =
        json!({"prompt": "The capital of France is", "echo": true, "max_tokens": 1, "logprobs": 1});
    let (st, r) = s.post("/v1/completions", body);
    assert_eq!(st, 200, "{r}");
    let c = &r["choices"][0];
    assert!(
        c["text"]
            .as_str()
            .unwrap()
            .starts_with("The capital of France is"),
        "{c}"
    );
    assert_eq!(
        c["logprobs"]["token_logprobs"].as_array().unwrap().len(),
        6,
        "{c}"
    );
}

#[test]
fn lm_evaluation_harness_scores_a_local_task_as_the_engine_does() {
    let python = support_lines("lm-eval-env.sh")
        .pop()
        .expect("lm-eval-env.sh prints the venv's python");
    let s = Server::start(&[], true);
    let (_, models) = s.get("/v1/models");
    let models: Value = serde_json::from_str(&models).expect("json");
    let model = models["data"][0]["id"].as_str().expect("id").to_string();
    let task = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/lm_eval");
    let out_dir = tempfile::tempdir().expect("temp dir");
    let out = Command::new(&python)
        .args(["-m", "lm_eval", "--model", "local-completions", "--model_args"])
        .arg(format!(
            "base_url={}/v1/completions,model={model},tokenizer_backend=remote,num_concurrent=1,max_retries=1",
            s.base
        ))
        .args(["--batch_size", "8", "--tasks", "parallm_mc", "--include_path"])
        .arg(&task)
        .arg("--output_path")
        .arg(out_dir.path())
        .arg("--log_samples")
        .current_dir(&task)
        // The task reads its JSONL beside it; nothing comes from a hub.
        .env("HF_DATASETS_OFFLINE", "1")
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", out_dir.path().join("hf"))
        .output()
        .expect("run lm_eval");
    println!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(
        out.status.success(),
        "lm_eval failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let files: Vec<_> = walk(out_dir.path());
    let read = |prefix: &str| {
        let f = files
            .iter()
            .find(|f| f.file_name().unwrap().to_string_lossy().starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix}* in {files:?}"));
        std::fs::read_to_string(f).expect("read")
    };
    let results: Value = serde_json::from_str(&read("results_")).expect("results json");
    let harness_acc = results["results"]["parallm_mc"]["acc,none"]
        .as_f64()
        .expect("acc");
    let samples: Vec<Value> = read("samples_parallm_mc")
        .lines()
        .map(|l| serde_json::from_str(l).expect("sample"))
        .collect();

    // The same log-likelihoods straight from the engine: context and
    // continuation tokenized as the harness does (the continuation is what
    // the whole adds to the context's tokens), scored from the
    // continuation's first token.
    let engine = parallm::Engine::builder()
        .model_path(common::model_path())
        .build()
        .expect("engine");
    let data = std::fs::read_to_string(task.join("parallm_mc.jsonl")).expect("data");
    let docs: Vec<Value> = data
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut correct = 0;
    for (i, doc) in docs.iter().enumerate() {
        let question = doc["question"].as_str().unwrap();
        let tokens = |t: String| {
            engine
                .tokenize_with(&parallm::Prompt::Text(t), false)
                .expect("tokenize")
        };
        let context = tokens(question.to_string());
        let lls: Vec<f64> = doc["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                let whole = tokens(format!("{question} {}", c.as_str().unwrap()));
                let req = parallm::Request::score_tokens(
                    whole,
                    framework::scoring::PromptScoring {
                        first: context.len(),
                        top: 0,
                        rows: false,
                    },
                );
                engine
                    .generate(req)
                    .expect("submit")
                    .collect_blocking()
                    .into_iter()
                    .filter_map(|e| match e {
                        parallm::Event::PromptScores(s) => Some(s),
                        _ => None,
                    })
                    .flatten()
                    .map(|s| s.logprob as f64)
                    .sum()
            })
            .collect();
        let best = (0..lls.len())
            .max_by(|&a, &b| lls[a].total_cmp(&lls[b]))
            .unwrap();
        correct += usize::from(best as u64 == doc["answer"].as_u64().unwrap());
        // The harness's own log-likelihoods for this document.
        let sample = samples
            .iter()
            .find(|s| s["doc_id"] == i)
            .unwrap_or_else(|| panic!("no sample for doc {i}"));
        for (k, ll) in lls.iter().enumerate() {
            let theirs: f64 = sample["filtered_resps"][k][0]
                .as_str()
                .and_then(|v| v.parse().ok())
                .or_else(|| sample["filtered_resps"][k][0].as_f64())
                .unwrap_or_else(|| panic!("doc {i} choice {k}: {sample}"));
            assert!(
                (theirs - ll).abs() < 1e-3,
                "doc {i} choice {k}: harness {theirs}, engine {ll}"
            );
        }
    }
    let direct = correct as f64 / docs.len() as f64;
    println!("lm-evaluation-harness acc {harness_acc}, from the engine's log-likelihoods {direct}");
    assert_eq!(harness_acc, direct);
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// A server holding the reference model for generation and the random BERT
/// twice for embeddings: its GGUF (`bert`) and, on two tensor-parallel
/// nodes, its Hugging Face directory (`bert-hf`, Matryoshka-truncatable).
fn embedding_server(dir: &tempfile::TempDir) -> Server {
    let models = common::bert_models_dir();
    let config = dir.path().join("parallm.toml");
    std::fs::write(
        &config,
        format!(
            "[[models]]\nname = \"bert\"\npath = \"{}\"\nmax_batch_tokens = 256\n\n[[models]]\nname = \"bert-hf\"\npath = \"{}\"\ntp = 2\nmatryoshka = true\n\n[[models]]\nname = \"qwen2-last\"\npath = \"{}\"\n",
            models.join("bert-f32.gguf").display(),
            models.join("bert-f32").display(),
            common::hf_models_dir().join("qwen2-bf16").display()
        ),
    )
    .expect("write config");
    Server::start(&["--config", config.to_str().expect("utf-8")], true)
}

fn golden_case(i: usize) -> (String, Vec<u32>, Vec<f64>) {
    let c = &common::embed_golden()["cases"][i];
    (
        c["text"].as_str().expect("text").to_string(),
        common::ids(&c["ids"]),
        c["mean_normalized"]
            .as_array()
            .expect("vector")
            .iter()
            .map(|x| x.as_f64().expect("f64"))
            .collect(),
    )
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("embedding")
        .iter()
        .map(|x| x.as_f64().expect("float") as f32)
        .collect()
}

#[test]
fn embeddings_match_transformers_in_every_input_form_and_bad_input_is_refused() {
    use base64::Engine as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let s = embedding_server(&dir);
    let (_, models) = s.get("/v1/models");
    let models: Value = serde_json::from_str(&models).expect("json");
    let ids: Vec<&str> = models["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids.len(), 4, "{models}");
    assert_eq!(models["data"][1]["dimensions"], 64, "{models}");
    let generation = ids[0].to_string();

    let (t0, ids0, g0) = golden_case(0);
    let (t1, _, g1) = golden_case(2);
    for model in ["bert", "bert-hf"] {
        // A string, strings, token ids, lists of token ids.
        for input in [json!(t0), json!([t0, t1]), json!(ids0), json!([ids0])] {
            let (status, r) = s.post("/v1/embeddings", json!({"model": model, "input": input}));
            assert_eq!(status, 200, "{r}");
            assert_eq!(r["object"], "list");
            assert_eq!(r["model"], model);
            assert!(
                r["usage"]["prompt_tokens"]
                    .as_u64()
                    .is_some_and(|n| n >= 12),
                "{r}"
            );
            let v = floats(&r["data"][0]["embedding"]);
            assert!(1.0 - common::cosine(&v, &g0) < 1e-4, "{model} {input}");
            if r["data"].as_array().expect("data").len() == 2 {
                assert_eq!(r["data"][1]["index"], 1);
                assert!(1.0 - common::cosine(&floats(&r["data"][1]["embedding"]), &g1) < 1e-4);
            }
        }
        // base64: the same floats' little-endian bytes.
        let (_, f) = s.post("/v1/embeddings", json!({"model": model, "input": t0}));
        let (status, b) = s.post(
            "/v1/embeddings",
            json!({"model": model, "input": t0, "encoding_format": "base64"}),
        );
        assert_eq!(status, 200, "{b}");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b["data"][0]["embedding"].as_str().expect("base64 string"))
            .expect("base64");
        let decoded: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(decoded, floats(&f["data"][0]["embedding"]));
    }
    // A decoder model, pooled by its last token.
    let dec = &common::embed_golden()["decoders"]["qwen2-bf16"]["cases"][0];
    let (status, r) = s.post(
        "/v1/embeddings",
        json!({"model": "qwen2-last", "input": dec["text"]}),
    );
    assert_eq!(status, 200, "{r}");
    let want: Vec<f64> = dec["last"]
        .as_array()
        .expect("last")
        .iter()
        .map(|x| x.as_f64().expect("f64"))
        .collect();
    assert!(
        1.0 - common::cosine(&floats(&r["data"][0]["embedding"]), &want) < 1e-4,
        "{r}"
    );
    // Matryoshka truncation: the first 16, renormalized.
    let (status, r) = s.post(
        "/v1/embeddings",
        json!({"model": "bert-hf", "input": t0, "dimensions": 16}),
    );
    assert_eq!(status, 200, "{r}");
    let v = floats(&r["data"][0]["embedding"]);
    assert_eq!(v.len(), 16);
    assert!((v.iter().map(|x| x * x).sum::<f32>().sqrt() - 1.0).abs() < 1e-5);

    // Bad input: a 400 naming the field (404 for a model that does not exist).
    for (body, status, param) in [
        (json!({"model": "bert", "input": ""}), 400, "input"),
        (json!({"model": "bert", "input": []}), 400, "input"),
        (json!({"model": "bert", "input": ["a", ""]}), 400, "input"),
        (
            json!({"model": "bert", "input": [[2, 999999, 3]]}),
            400,
            "input",
        ),
        (
            json!({"model": "bert", "input": vec!["word"; 80].join(" ")}),
            400,
            "input",
        ),
        (json!({"model": generation, "input": "hello"}), 400, "model"),
        (json!({"input": "hello"}), 400, "model"),
        (
            json!({"model": "bert", "input": "hello", "dimensions": 16}),
            400,
            "dimensions",
        ),
        (
            json!({"model": "bert-hf", "input": "hello", "dimensions": 65}),
            400,
            "dimensions",
        ),
        (
            json!({"model": "bert", "input": "hello", "encoding_format": "hex"}),
            400,
            "encoding_format",
        ),
        (json!({"model": "bert", "input": 7}), 400, "input"),
        (json!({"model": "nope", "input": "hello"}), 404, "model"),
    ] {
        let (got, r) = s.post("/v1/embeddings", body.clone());
        assert_eq!(got, status, "{body}: {r}");
        assert_eq!(r["error"]["param"], param, "{body}: {r}");
        assert!(
            r["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{r}"
        );
    }
    let (status, r) = s.post(
        "/v1/chat/completions",
        json!({"model": "bert", "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(
        (status, r["error"]["param"].clone()),
        (400, json!("model")),
        "{r}"
    );

    // And it keeps serving both kinds.
    let (status, r) = s.post("/v1/embeddings", json!({"model": "bert", "input": t0}));
    assert_eq!(status, 200, "{r}");
    let (status, r) = s.post(
        "/v1/completions",
        json!({"prompt": "Hello", "max_tokens": 2}),
    );
    assert_eq!(status, 200, "{r}");
    assert!(s.metric("parallm_embedding_sequences_total") >= 15.0);

    // 256 concurrent requests all complete, each with its own text's vector.
    let cases: Vec<_> = (0..6).map(golden_case).collect();
    let results: Vec<(u16, Value)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..256)
            .map(|i| {
                let (s, text) = (&s, cases[i % 6].0.clone());
                let model = ["bert", "bert-hf"][i % 2];
                scope
                    .spawn(move || s.post("/v1/embeddings", json!({"model": model, "input": text})))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    for (i, (status, r)) in results.iter().enumerate() {
        assert_eq!(*status, 200, "request {i}: {r}");
        let c = common::cosine(&floats(&r["data"][0]["embedding"]), &cases[i % 6].2);
        assert!(1.0 - c < 1e-4, "request {i}: cosine {c}");
    }
    // Each model's metrics are its own series.
    for model in ["bert", "bert-hf"] {
        let seqs = s.metric(&format!(
            "parallm_embedding_sequences_total{{model=\"{model}\"}}"
        ));
        assert!(seqs >= 128.0, "{model}: {seqs}");
        let steps = format!("parallm_embedding_step_duration_seconds_count{{model=\"{model}\",");
        assert!(s.metric(&steps) > 0.0, "{model}");
    }
}

#[test]
fn the_official_openai_python_client_embeds() {
    let python = support_lines("python-env.sh")
        .pop()
        .expect("python-env.sh prints the venv's python");
    let dir = tempfile::tempdir().expect("tempdir");
    let s = embedding_server(&dir);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/openai_client.py");
    let mut args = vec![
        "--base-url".to_string(),
        format!("{}/v1", s.base),
        "--model".into(),
        "x".into(),
        "--embed-model".into(),
        "bert".into(),
    ];
    for skip in [
        "completion",
        "chat",
        "stream",
        "models",
        "bad_request",
        "structured",
        "tools",
    ] {
        args.extend(["--skip".to_string(), skip.to_string()]);
    }
    let out = Command::new(python)
        .arg(script)
        .args(&args)
        .output()
        .expect("run the openai client");
    println!("{}", String::from_utf8_lossy(&out.stdout));
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "the openai client's embeddings check failed"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"embeddings\": {\"ok\": true"));
}

#[test]
fn model_tool_format_overrides_the_templates_format_and_mistral_templates_get_their_call_ids() {
    // The reference model's template implies Hermes; the configuration
    // says Mistral, so the forced call is written in Mistral's syntax and
    // must be read back in it to come out as a call.
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("tools.toml");
    std::fs::write(&config, "[model]\ntool_format = \"mistral\"\n").expect("write");
    let s = Server::start(&["--config", config.to_str().expect("utf-8")], true);
    let body = json!({
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "tools": weather_tools(),
        "tool_choice": "required",
        "max_tokens": 96,
        "temperature": 0,
        "logprobs": true,
    });
    let (status, r) = s.post("/v1/chat/completions", body);
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["choices"][0]["finish_reason"], "tool_calls", "{r}");
    assert!(!checked_calls(&r).is_empty(), "{r}");
    let written: String = r["choices"][0]["logprobs"]["content"]
        .as_array()
        .expect("logprobs")
        .iter()
        .filter_map(|t| t["token"].as_str())
        .collect();
    assert!(written.starts_with("[TOOL_CALLS]"), "{written}");
    drop(s);

    // Mistral's own template (Nemo's) takes only nine-character call ids:
    // a conversation sent back with the server's OpenAI-style ids renders
    // with each id's last nine letters and digits, a call and its result
    // still paired.
    let template =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/chat/mistral-nemo-instruct.jinja");
    let s = Server::start(
        &[
            "--set",
            &format!("model.chat_template_file={}", template.display()),
        ],
        true,
    );
    let id = "call_0123456789abcdefghijklmn";
    let messages = json!([
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": id, "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"celsius\"}"}}]},
        {"role": "tool", "tool_call_id": id, "content": "sunny, 21 C"},
    ]);
    let (st, r) = s.post(
        "/tokenize",
        json!({"messages": messages, "tools": weather_tools()}),
    );
    assert_eq!(st, 200, "{r}");
    let (_, d) = s.post("/detokenize", json!({"tokens": r["tokens"]}));
    let prompt = d["prompt"].as_str().expect("text");
    assert_eq!(prompt.matches("\"fghijklmn\"").count(), 2, "{prompt}");
    assert!(!prompt.contains(id), "{prompt}");
    let (st, r) = s.post(
        "/v1/chat/completions",
        json!({"messages": messages, "tools": weather_tools(), "max_tokens": 4}),
    );
    assert_eq!(st, 200, "{r}");
}

#[test]
fn a_draft_model_speculates_per_request_and_changes_no_text() {
    // The model as its own draft (`--draft-model`, the same vocabulary by
    // construction): a request that asks for draft speculation gets the
    // text of one that does not, and the drafts show in the metrics.
    let model = common::model_path();
    let s = Server::start(
        &["--draft-model", model.to_str().expect("utf-8 path")],
        true,
    );
    let copy = "Repeat: one two three four five six.\nRepeated:";
    let texts = greedy_texts(
        &s,
        copy,
        16,
        [
            json!(null),
            json!({"method": "draft", "num_speculative_tokens": 3}),
        ],
    );
    assert_eq!(texts[0], texts[1]);
    let (status, metrics) = s.get("/metrics");
    assert_eq!(status, 200);
    let drafted = metrics
        .lines()
        .find(|l| l.starts_with("parallm_spec_drafted_tokens_total"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(drafted > 0.0, "{metrics}");
}

#[test]
fn a_seeded_chaos_run_leaves_no_block_in_use_and_names_every_refusal() {
    // `benches/chaos_serve.py` against two replicas with a KV pool of 32 MiB
    // (45 blocks of 16 positions each, so prefix blocks are evicted and
    // requests preempted all the time) and a draft model: streamed or not,
    // greedy or sampled, `n` of 2-3, n-gram and draft speculation, chat,
    // stop strings, logprobs, JSON output, beam search, prompts too long for
    // the pool, a quarter dropped mid-flight. The script fails if any
    // request ends other than 200, a dropped connection, or a 400 naming its
    // field; if an answer lacks a choice, keeps its stop string, has
    // logprobs that do not spell it or guided output that is not JSON; if a
    // KV block is in use or a request runs or waits once idle; or if a fixed
    // greedy prompt's text changes or one of four copies of it hangs.
    let model = common::model_path();
    let s = Server::start(
        &[
            "--dp",
            "2",
            "--draft-model",
            model.to_str().expect("utf-8 path"),
            "--set",
            "scheduler.kv_memory_mib=32",
        ],
        true,
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/chaos_serve.py");
    let port = s.port().to_string();
    let out = Command::new("python3")
        .arg(script)
        .args(["--port", &port, "--draft", "--mixed"])
        .args(["--requests", "120", "--concurrency", "24", "--seed", "3"])
        .output()
        .expect("run python3 benches/chaos_serve.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the chaos run's checks failed");
    // The run did what it is for: requests finished, others were refused
    // or dropped, prefix blocks were evicted and drafts were verified.
    for want in ["200: ", "400: ", "aborted: ", "every check held"] {
        assert!(stdout.contains(want), "no `{want}` line: {stdout}");
    }
    assert!(s.metric("parallm_prefix_cache_evictions_total") > 0.0);
    assert!(s.metric("parallm_spec_drafted_tokens_total") > 0.0);
}

/// The greedy completions of `prompt` (`n` tokens) under each `speculative`
/// setting.
fn greedy_texts(s: &Server, prompt: &str, n: usize, specs: [Value; 2]) -> Vec<Value> {
    specs
        .into_iter()
        .map(|spec| {
            let (status, r) = s.post(
                "/v1/completions",
                json!({"prompt": prompt, "max_tokens": n, "temperature": 0, "speculative": spec}),
            );
            assert_eq!(status, 200, "{r}");
            r["choices"][0]["text"].clone()
        })
        .collect()
}

#[test]
fn request_metrics_count_a_request_once_whatever_its_n_and_leave_probes_out() {
    let s = Server::start(&["--set", "server.health_probe_interval_secs=1"], true);
    // Counters are there from the start, at 0.
    let (_, text) = s.get("/metrics");
    for line in [
        "parallm_preemptions_total 0",
        "parallm_prefix_cache_evictions_total 0",
        "parallm_spec_drafted_tokens_total 0",
        "parallm_request_failure_total{reason=\"overloaded\"} 0",
        "parallm_request_success_total{finish_reason=\"length\"} 0",
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
    }
    // Probes go through the engine every second, but no request-level
    // metric counts them, nor the routing counter.
    std::thread::sleep(Duration::from_millis(2500));
    for name in [
        "parallm_requests_routed_total",
        "parallm_request_success_total",
        "parallm_prompt_tokens_total",
        "parallm_generation_tokens_total",
        "parallm_time_to_first_token_seconds_count",
        "parallm_request_latency_seconds_count",
        "parallm_request_queue_time_seconds_count",
    ] {
        assert_eq!(s.metric(name), 0.0, "{name} counted a probe");
    }
    // One request of three choices is one request, with its prompt once.
    let (status, r) = s.post(
        "/v1/completions",
        json!({"prompt": "The capital of France is", "max_tokens": 4, "n": 3,
               "temperature": 1.0, "seed": 1, "ignore_eos": true}),
    );
    assert_eq!(status, 200, "{r}");
    let usage = &r["usage"];
    assert_eq!(usage["completion_tokens"], 12, "{r}");
    let count = |v: &Value| v.as_f64().expect("a count");
    assert_eq!(s.metric("parallm_request_success_total"), 1.0);
    assert_eq!(
        s.metric("parallm_prompt_tokens_total"),
        count(&usage["prompt_tokens"])
    );
    assert_eq!(
        s.metric("parallm_generation_tokens_total"),
        count(&usage["completion_tokens"])
    );
    for name in [
        "parallm_time_to_first_token_seconds_count",
        "parallm_request_latency_seconds_count",
        "parallm_request_queue_time_seconds_count",
    ] {
        assert_eq!(s.metric(name), 1.0, "{name}");
    }
    // A choice ended by the model's stop token: the token is not output,
    // and neither usage nor the counter counts it.
    let before = s.metric("parallm_generation_tokens_total");
    let (status, r) = s.post(
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "Say hello."}],
               "max_tokens": 200, "temperature": 0}),
    );
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["choices"][0]["finish_reason"], "stop", "{r}");
    assert_eq!(
        s.metric("parallm_generation_tokens_total") - before,
        count(&r["usage"]["completion_tokens"])
    );
}

#[test]
fn a_request_whose_further_choice_is_refused_counts_as_refused_not_cancelled() {
    let s = Server::start(
        &[
            "--set",
            "scheduler.queue_capacity=2",
            "--set",
            "scheduler.max_running=1",
            // No probe waits in the queue to be taken for the request.
            "--set",
            "server.health_probe_interval_secs=3600",
            "--set",
            "server.health_max_age_secs=3600",
        ],
        true,
    );
    // One request runs and one waits: the queue has one place left, for
    // the first choice of two.
    let running = request_on_thread(&s, 300);
    s.wait_metric("parallm_requests_running", |v| v >= 1.0, "one runs");
    let waiting = request_on_thread(&s, 2);
    s.wait_metric(
        "parallm_requests_waiting{stage=\"queue\"}",
        |v| v >= 1.0,
        "one waits",
    );
    let (st, r) = s.post(
        "/v1/completions",
        json!({"prompt": "x", "n": 2, "max_tokens": 2}),
    );
    assert_error(st, &r, 429, None, "rate_limit_exceeded");
    // Its first choice, admitted then withdrawn, is not a cancellation.
    let failures = |reason: &str| {
        s.metric(&format!(
            "parallm_request_failure_total{{reason=\"{reason}\"}}"
        ))
    };
    s.wait_metric(
        "parallm_request_failure_total{reason=\"overloaded\"}",
        |v| v == 1.0,
        "the request counted as refused",
    );
    assert_eq!(failures("cancelled"), 0.0);
    for t in [running, waiting] {
        let (status, body) = t.join().expect("client");
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(failures("overloaded"), 1.0);
    assert_eq!(failures("cancelled"), 0.0);
    assert_eq!(s.metric("parallm_request_success_total"), 2.0);
}

#[test]
fn tokenize_counts_a_tool_conversation_as_the_chat_endpoint_does() {
    let s = Server::start(&[], true);
    let messages = json!([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1",
            "type": "function", "function": {"name": "get_weather",
            "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}
    ]);
    let (status, chat) = s.post(
        "/v1/chat/completions",
        json!({"messages": messages, "tools": weather_tools(), "max_tokens": 1}),
    );
    assert_eq!(status, 200, "{chat}");
    let (status, t) = s.post(
        "/tokenize",
        json!({"messages": messages, "tools": weather_tools()}),
    );
    assert_eq!(status, 200, "{t}");
    assert_eq!(t["count"], chat["usage"]["prompt_tokens"], "{t}");
    // Without the tools, the history's calls and results still count.
    let (status, bare) = s.post("/tokenize", json!({"messages": messages}));
    assert_eq!(status, 200, "{bare}");
    assert!(bare["count"].as_u64() < t["count"].as_u64(), "{bare} {t}");
    // With `tool_choice: none` the chat shows no tools, and /tokenize
    // counts as it does.
    let (status, chat) = s.post(
        "/v1/chat/completions",
        json!({"messages": messages, "tools": weather_tools(), "tool_choice": "none",
               "max_tokens": 1}),
    );
    assert_eq!(status, 200, "{chat}");
    let (status, none) = s.post(
        "/tokenize",
        json!({"messages": messages, "tools": weather_tools(), "tool_choice": "none"}),
    );
    assert_eq!(status, 200, "{none}");
    assert_eq!(none["count"], chat["usage"]["prompt_tokens"], "{none}");
    assert_eq!(none["count"], bare["count"], "{none}");
    let (status, r) = s.post(
        "/tokenize",
        json!({"prompt": "x", "tools": weather_tools()}),
    );
    assert_error(status, &r, 400, Some("tools"), "invalid_value");
}

#[test]
fn health_probes_every_replica_and_names_one_that_fails() {
    // Replica 1's node fails at every step; replica 0 is sound. A router
    // that prefers the idle replica 0 would never show it to a probe.
    let s = Server::start(
        &[
            "--dp",
            "2",
            "--set",
            "faults.node=0",
            "--set",
            "faults.replica=1",
            "--set",
            "faults.times=0",
            "--set",
            "server.health_probe_interval_secs=1",
            "--set",
            "server.health_max_age_secs=2",
        ],
        false,
    );
    let t = Instant::now();
    let body = loop {
        let (status, body) = s.get("/health");
        // Its probe failed (not merely not finished yet).
        if status == 503 && body.contains("replica 1") && !body.contains("none has finished") {
            break body;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "{status} {body}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!body.contains("replica 0"), "{body}");
    // Every request goes to replica 0: the router avoids a replica whose
    // last step failed while another's did not.
    for _ in 0..6 {
        let (st, r) = s.post("/v1/completions", json!({"prompt": "Hi", "max_tokens": 2}));
        assert_eq!(st, 200, "{r}");
    }
    assert_eq!(
        s.metric("parallm_requests_routed_total{replica=\"1\"}"),
        0.0
    );
}
