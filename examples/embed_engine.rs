//! Embedding the LLM engine in a program.
//!
//! Builds an [`Engine`] with [`Engine::builder`], submits 100 requests at once,
//! and prints one line per request as it finishes — in completion order, not
//! submission order — then a summary (tokens, wall time, tokens per second)
//! before shutting the engine down.
//!
//! * By default the engine runs the reference model (SmolLM2-135M-Instruct,
//!   fetched into `~/.cache/parallm` on first use) on chat prompts "Tell me
//!   about the number {i}."; even requests decode greedily, odd ones sample at
//!   temperature 0.8 with seed `i`, so every run prints the same texts.
//! * With `--synthetic` it runs the synthetic "tiny" model (random weights, no
//!   tokenizer): prompts are token ids and lines show token ids, not text.
//!   This needs no download and takes a second.
//!
//! Each [`EventStream`](parallm::EventStream) is drained on its own thread
//! (`collect_blocking`), and the threads report their request's terminal event
//! on one channel, so the main thread sees requests in the order they end.
//! Async programs can instead `await` the streams (`EventStream::next`, or the
//! `futures::Stream` impl) — the engine does not care which.
//!
//! Run: `cargo run --release --example embed_engine [-- --synthetic]`

use std::process::exit;
use std::sync::mpsc::channel;
use std::time::Instant;

use parallm::framework::chat::ChatMessage;
use parallm::framework::SamplingParams;
use parallm::{Engine, Event, Prompt, Request};

/// Requests submitted at once.
const REQUESTS: usize = 100;
/// Tokens generated per request at most.
const MAX_TOKENS: usize = 16;

/// Request `i`: a chat prompt (or token ids on the synthetic model).
fn request(i: usize, synthetic: bool) -> Request {
    let prompt = if synthetic {
        let len = 4 + i % 8;
        Prompt::Tokens((0..len).map(|k| ((i * 7 + k * 13) % 256) as u32).collect())
    } else {
        Prompt::Chat(vec![ChatMessage::new(
            "user",
            format!("Tell me about the number {i}."),
        )])
    };
    let params = if i.is_multiple_of(2) {
        SamplingParams::greedy(MAX_TOKENS)
    } else {
        SamplingParams {
            temperature: 0.8,
            top_p: 0.95,
            seed: Some(i as u64),
            max_tokens: MAX_TOKENS,
            ..SamplingParams::default()
        }
    };
    Request::new(prompt, params)
}

fn fail(what: &str, e: impl std::fmt::Display) -> ! {
    eprintln!("error: {what}: {e}");
    exit(1);
}

fn main() {
    let synthetic = match std::env::args().nth(1).as_deref() {
        None => false,
        Some("--synthetic") => true,
        Some(other) => {
            eprintln!("error: unknown argument {other:?}\nusage: embed_engine [--synthetic]");
            exit(2);
        }
    };
    let builder = if synthetic {
        Engine::builder().synthetic("tiny", 0)
    } else {
        let path = parallm::load::resolve_model_path(None, true)
            .unwrap_or_else(|e| fail("cannot fetch the reference model", e));
        Engine::builder().model_path(path)
    };
    // Let every request run at once (the default is 64 per replica).
    let engine = builder
        .max_running(REQUESTS)
        .build()
        .unwrap_or_else(|e| fail("cannot start the engine", e));
    println!(
        "engine: {} layers, vocab {}; {REQUESTS} requests of up to {MAX_TOKENS} tokens",
        engine.model_config().n_layers,
        engine.model_config().vocab
    );

    let t0 = Instant::now();
    let (tx, rx) = channel();
    for i in 0..REQUESTS {
        let stream = engine
            .generate(request(i, synthetic))
            .unwrap_or_else(|e| fail(&format!("request {i} was refused"), e));
        let tx = tx.clone();
        std::thread::spawn(move || {
            // The terminal event is the last one.
            let end = stream.collect_blocking().pop();
            let _ = tx.send((i, end, t0.elapsed()));
        });
    }
    drop(tx);

    let (mut done, mut prompt_tokens, mut completion_tokens) = (0, 0, 0);
    for (i, end, at) in rx {
        let ms = at.as_secs_f64() * 1e3;
        match end {
            Some(Event::Finished {
                reason,
                usage,
                tokens,
                text,
                ..
            }) => {
                done += 1;
                prompt_tokens += usage.prompt_tokens;
                completion_tokens += usage.completion_tokens;
                let shown = if synthetic {
                    format!("{tokens:?}")
                } else {
                    format!("{text:?}")
                };
                println!(
                    "done #{i:<2} {ms:7.1} ms  {:<6} {:>3} prompt + {:>2} completion tokens  {shown}",
                    reason.as_str(),
                    usage.prompt_tokens,
                    usage.completion_tokens
                );
            }
            Some(Event::Failed { error }) => println!("failed #{i}: {error}"),
            Some(Event::Refused { field, reason }) => println!("refused #{i}: `{field}` {reason}"),
            Some(Event::Cancelled) => println!("cancelled #{i}"),
            Some(Event::Token { .. } | Event::PromptScores(_)) | None => {
                println!("failed #{i}: the stream ended early")
            }
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    let steps = engine.stats().scheduler.steps;
    println!(
        "{done}/{REQUESTS} finished: {prompt_tokens} prompt + {completion_tokens} completion tokens \
         in {wall:.2} s ({:.1} completion tok/s, {steps} steps)",
        completion_tokens as f64 / wall
    );
    engine.shutdown();
    if done != REQUESTS {
        exit(1);
    }
}
