//! Fuzzers on stable Rust, run by `cargo test` for a bounded time per target.
//!
//! Each target takes bytes: the GGUF reader with the config, tokenizer and
//! chat-template checks behind it; the reference tokenizer on arbitrary text;
//! the reference chat template on arbitrary messages (built from the bytes
//! with `arbitrary`); and request JSON through parsing and validation into a
//! `ValidGeneration` (raw JSON bytes, or JSON values built with `arbitrary`).
//!
//! The engine is a mutation fuzzer, not a coverage-guided one: each execution
//! takes a seed from `fuzz/corpus/<target>/` and stacks up to eight mutations
//! on it (bit flips, interesting integers, byte runs inserted, deleted,
//! duplicated, spliced from another seed, truncation). It is deterministic
//! for a given `PARALLM_FUZZ_SEED`. The inputs in `fuzz/regressions/<target>/`
//! (crashes found before) run first, every time.
//!
//! A panic, or an error that is not an error of the target's own type, fails
//! the test and writes the input to `target/fuzz-crashes/`. An abort (an
//! allocation failure, say) cannot be caught; a SIGABRT handler writes the
//! input each target was running to `target/fuzz-crashes/<target>.abort`
//! before the process dies.
//!
//! - CI: `cargo test --release --workspace` runs each target for
//!   `PARALLM_FUZZ_SECS` (default 15) seconds.
//! - A long run: `PARALLM_FUZZ_SECS=600 PARALLM_FUZZ_SEED=$RANDOM cargo test
//!   --release --test fuzz -- --nocapture --test-threads 2` prints each
//!   target's executions (docs/fuzzing.md).

mod common;
#[path = "support/gguf.rs"]
mod gguf;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, AtomicPtr, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use arbitrary::{Arbitrary, Unstructured};
use framework::chat::{ChatMessage, ChatTemplate};
use framework::{GgufFile, ModelConfig, Tokenizer};
use parallm::config::LimitsSection;
use parallm::serve::api::{parse_body, ChatRequest, CompletionRequest};
use serde_json::{json, Value};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn crash_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join("fuzz-crashes");
    std::fs::create_dir_all(&dir).expect("create target/fuzz-crashes");
    dir
}

/// xorshift64*: small, fast, deterministic.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const INTERESTING: [u64; 14] = [
    0,
    1,
    2,
    7,
    31,
    32,
    255,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    1 << 24,
    1 << 40,
    i64::MAX as u64,
    u64::MAX,
];

/// One to eight stacked mutations of `input`, `other` a second seed to splice from.
fn mutate(rng: &mut Rng, input: &mut Vec<u8>, other: &[u8]) {
    for _ in 0..1 + rng.below(8) {
        let len = input.len();
        match rng.below(9) {
            0 if len > 0 => {
                let i = rng.below(len);
                input[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                input[i] = rng.next() as u8;
            }
            2 if len > 0 => {
                // An interesting integer, 1, 4 or 8 bytes wide, little-endian.
                let v = INTERESTING[rng.below(INTERESTING.len())];
                let width = [1, 4, 8][rng.below(3)];
                let i = rng.below(len);
                let bytes = v.to_le_bytes();
                for (k, b) in bytes.iter().take(width).enumerate() {
                    if let Some(x) = input.get_mut(i + k) {
                        *x = *b;
                    }
                }
            }
            3 => {
                let at = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let fill: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                input.splice(at..at, fill);
            }
            4 if len > 1 => {
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(64));
                input.drain(at..at + n);
            }
            5 if len > 1 => {
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(64));
                let copy = input[at..at + n].to_vec();
                let to = rng.below(len + 1);
                input.splice(to..to, copy);
            }
            6 if !other.is_empty() => {
                let at = rng.below(other.len());
                let n = 1 + rng.below((other.len() - at).min(256));
                let to = rng.below(len + 1);
                input.splice(to..to, other[at..at + n].iter().copied());
            }
            7 if len > 0 => input.truncate(rng.below(len)),
            _ => {
                let at = rng.below(len + 1);
                input.insert(at, rng.next() as u8);
            }
        }
    }
}

/// The input each running target is on, for the SIGABRT handler: a pointer,
/// a length and a file descriptor per target.
struct Slot {
    ptr: AtomicPtr<u8>,
    len: AtomicUsize,
    fd: AtomicI32,
}

const TARGETS: usize = 4;
static SLOTS: [Slot; TARGETS] = [const {
    Slot {
        ptr: AtomicPtr::new(std::ptr::null_mut()),
        len: AtomicUsize::new(0),
        fd: AtomicI32::new(-1),
    }
}; TARGETS];

extern "C" fn on_abort(_: libc::c_int) {
    const SAY: &[u8] =
        b"fuzz: the process aborts; the inputs being run are in target/fuzz-crashes/<target>.abort\n";
    // SAFETY: write(2) to stderr of a static buffer is async-signal-safe.
    unsafe {
        libc::write(2, SAY.as_ptr() as *const libc::c_void, SAY.len());
    }
    for slot in &SLOTS {
        let fd = slot.fd.load(Ordering::SeqCst);
        let ptr = slot.ptr.load(Ordering::SeqCst);
        let len = slot.len.load(Ordering::SeqCst);
        if fd >= 0 && !ptr.is_null() {
            // SAFETY: `ptr`/`len` describe the input buffer the target's loop
            // owns and does not free or move while it is published (the
            // slot is cleared first); write(2) and ftruncate(2) are
            // async-signal-safe, and `fd` is an open file of ours.
            unsafe {
                libc::ftruncate(fd, 0);
                libc::pwrite(fd, ptr as *const libc::c_void, len, 0);
            }
        }
    }
}

thread_local! {
    /// Where the last panic on this thread happened (the quiet hook's record).
    static LAST_PANIC: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
    /// Whether this thread is inside a target.
    static IN_TARGET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn install_abort_handler() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        // Panics the targets catch themselves (candle's header reader) would
        // print thousands of lines; the hook only records where the last one
        // happened, for the report of a finding.
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if IN_TARGET.get() {
                LAST_PANIC.with(|p| *p.borrow_mut() = info.to_string());
            } else {
                default(info);
            }
        }));
        let handler: extern "C" fn(libc::c_int) = on_abort;
        // SAFETY: installs a handler that only reads atomics and makes
        // async-signal-safe calls; after it returns, abort(3) restores the
        // default action and the process ends as it would have.
        unsafe {
            libc::signal(libc::SIGABRT, handler as libc::sighandler_t);
        }
    });
}

/// What a target says of an input: accepted, or refused with an error of
/// its own kind (any other outcome is a finding).
type Outcome = Result<(), String>;

/// Runs `target` over the regressions, then mutated corpus inputs for the
/// time budget; panics on the first finding.
fn fuzz(name: &str, slot: usize, target: impl Fn(&[u8]) -> Outcome + std::panic::RefUnwindSafe) {
    install_abort_handler();
    let secs: u64 = std::env::var("PARALLM_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    let seed: u64 = std::env::var("PARALLM_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let read_dir = |dir: PathBuf| -> Vec<Vec<u8>> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        files.sort();
        files.iter().filter_map(|p| std::fs::read(p).ok()).collect()
    };
    let corpus = read_dir(fuzz_dir().join("corpus").join(name));
    assert!(!corpus.is_empty(), "fuzz/corpus/{name} has no seed");
    let regressions = read_dir(fuzz_dir().join("regressions").join(name));

    let abort_file = crash_dir().join(format!("{name}.abort"));
    let file = std::fs::File::create(&abort_file).expect("create the abort file");
    use std::os::fd::IntoRawFd;
    let fd = file.into_raw_fd();
    SLOTS[slot].fd.store(fd, Ordering::SeqCst);

    // Quiet panics: a finding is reported once, below.
    let run = |input: &Vec<u8>| -> Result<(), String> {
        SLOTS[slot]
            .ptr
            .store(input.as_ptr() as *mut u8, Ordering::SeqCst);
        SLOTS[slot].len.store(input.len(), Ordering::SeqCst);
        IN_TARGET.set(true);
        let result = std::panic::catch_unwind(|| target(input));
        IN_TARGET.set(false);
        SLOTS[slot]
            .ptr
            .store(std::ptr::null_mut(), Ordering::SeqCst);
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(format!(
                "panicked: {}",
                LAST_PANIC.with(|p| p.borrow().clone())
            )),
        }
    };
    let report = |input: &[u8], why: &str| -> ! {
        let path = crash_dir().join(format!("{name}-{:016x}", fnv(input)));
        let _ = std::fs::write(&path, input);
        panic!(
            "fuzz target {name}: {why}\n  input written to {} ({} bytes); add it to fuzz/regressions/{name}/",
            path.display(),
            input.len()
        );
    };
    for input in &regressions {
        match run(input) {
            Ok(()) => {}
            Err(why) if why.starts_with("refused: ") => {}
            Err(why) => report(input, &why),
        }
    }
    let mut rng = Rng(seed ^ fnv(name.as_bytes()) | 1);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut execs = 0u64;
    let mut accepted = 0u64;
    let mut input = Vec::new();
    while Instant::now() < deadline {
        for _ in 0..64 {
            let base = &corpus[rng.below(corpus.len())];
            let other = &corpus[rng.below(corpus.len())];
            input.clear();
            input.extend_from_slice(base);
            mutate(&mut rng, &mut input, other);
            match run(&input) {
                Ok(()) => accepted += 1,
                Err(why) if why.starts_with("refused: ") => {}
                Err(why) => report(&input, &why),
            }
            execs += 1;
        }
    }
    SLOTS[slot].fd.store(-1, Ordering::SeqCst);
    // SAFETY: `fd` came from `into_raw_fd` above and is closed once, after
    // the slot no longer names it.
    unsafe {
        libc::close(fd);
    }
    let _ = std::fs::remove_file(&abort_file);
    println!(
        "fuzz {name}: {execs} executions in {secs}s ({:.0}/s), {accepted} accepted, {} seeds, {} regressions, seed {seed}",
        execs as f64 / secs.max(1) as f64,
        corpus.len(),
        regressions.len()
    );
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// A refusal with an error: fine, the target's contract is to refuse.
fn refused(e: impl std::fmt::Display) -> String {
    format!("refused: {e}")
}

/// GGUF bytes through the reader, the tensor table, the config, the
/// tokenizer, the chat template and every tensor's data.
fn gguf_target(data: &[u8]) -> Outcome {
    let file = GgufFile::from_bytes("fuzz.gguf", data.to_vec()).map_err(refused)?;
    let config = ModelConfig::from_gguf(&file).map_err(refused);
    let tokenizer = Tokenizer::from_gguf(&file).map_err(refused)?;
    if let Some(src) = tokenizer.chat_template() {
        if let Ok(t) = ChatTemplate::new(src, "<s>", "</s>") {
            let _ = t.render(&[ChatMessage::new("user", "hi")], true);
        }
    }
    let ids = tokenizer.encode("Hello, world 123").map_err(refused)?;
    let _ = tokenizer.decode(&ids);
    if let Ok(c) = config {
        // Whatever opened must be readable within what the table promised.
        for name in ["token_embd.weight", "output_norm.weight"] {
            if let Ok((_, dims)) = file.tensor_info(name) {
                file.tensor(name, &dims)
                    .map_err(|e| format!("a tensor the table accepted cannot be read: {e}"))?;
            }
        }
        assert!(c.head_dim > 0);
    }
    Ok(())
}

#[test]
fn fuzz_gguf_reader() {
    fuzz("gguf", 0, gguf_target);
}

#[test]
fn the_sentencepiece_seed_loads_and_round_trips() {
    // The seed the GGUF target mutates for the SentencePiece path must
    // itself load, or its mutations would only test refusals.
    let bytes = std::fs::read(fuzz_dir().join("corpus/gguf/tiny-spm.gguf")).expect("seed");
    assert_eq!(gguf_target(&bytes), Ok(()));
    let file = GgufFile::from_bytes("tiny-spm.gguf", bytes).expect("opens");
    let tok = Tokenizer::from_gguf(&file).expect("a SentencePiece tokenizer");
    for text in ["Hello world", "Héllo, wörld 123 👋", "\u{0}\t\n"] {
        let ids = tok.encode(text).expect("encodes");
        // Byte fallback covers every byte; the added space prefix is
        // dropped again on decoding.
        assert_eq!(tok.decode(&ids), text, "{ids:?}");
    }
    // BOS, then the pieces merged up to the two words.
    let ids = tok.encode("Hello world").expect("encodes");
    assert_eq!(ids.len(), 3, "{ids:?}");
}

/// Arbitrary text through the reference tokenizer: encoding never fails,
/// and decoding gives the text back when it holds no special-token text.
fn tokenizer_target(data: &[u8]) -> Outcome {
    let text = String::from_utf8_lossy(data);
    let tok = common::tokenizer();
    let ids = tok
        .encode(&text)
        .map_err(|e| format!("encoding failed: {e}"))?;
    let vocab = tok.vocab_size();
    if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
        return Err(format!("token {bad} is outside the vocabulary"));
    }
    // The reference vocabulary has no token for some bytes (six control
    // bytes, and lead bytes such as 0xf2 of rarely used planes); byte-level
    // BPE drops them, as HF tokenizers does with the same vocabulary.
    static DROPPED: OnceLock<[bool; 256]> = OnceLock::new();
    let dropped = DROPPED.get_or_init(|| {
        let mut dropped = [true; 256];
        for id in 0..vocab as u32 {
            if let [b] = tok.token_bytes(id) {
                dropped[*b as usize] = false;
            }
        }
        dropped
    });
    let kept: Vec<u8> = text.bytes().filter(|&b| !dropped[b as usize]).collect();
    let expected = String::from_utf8_lossy(&kept);
    let back = tok.decode(&ids);
    if !text.contains('<') && back != expected {
        return Err(format!("decode(encode(text)) differs: {back:?}"));
    }
    let _ = tok.encode_within(&text, 64);
    Ok(())
}

#[test]
fn fuzz_tokenizer() {
    fuzz("tokenizer", 1, tokenizer_target);
}

/// A conversation built from the bytes.
#[derive(Debug, Arbitrary)]
struct Conversation {
    messages: Vec<(u8, String)>,
    add_generation_prompt: bool,
}

/// Arbitrary messages through the reference model's chat template (and a
/// template that refuses some): rendering succeeds or is a template error.
fn chat_target(data: &[u8]) -> Outcome {
    static TEMPLATES: OnceLock<Vec<ChatTemplate>> = OnceLock::new();
    let templates = TEMPLATES.get_or_init(|| {
        let tok = common::tokenizer();
        let reference = tok.chat_template().expect("the reference model has a template");
        let strict = "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('roles must alternate') }}{% endif %}<{{ m['role'] }}>{{ m['content'] | trim }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}";
        vec![
            ChatTemplate::new(reference, "", "<|im_end|>").expect("reference template"),
            ChatTemplate::new(strict, "<s>", "</s>").expect("strict template"),
        ]
    });
    let mut u = Unstructured::new(data);
    let conv = Conversation::arbitrary(&mut u).map_err(refused)?;
    if conv.messages.is_empty() {
        return Err(refused("no message"));
    }
    let roles = ["system", "user", "assistant", "tool", ""];
    let messages: Vec<ChatMessage> = conv
        .messages
        .into_iter()
        .map(|(r, c)| ChatMessage::new(roles[r as usize % roles.len()], c))
        .collect();
    for t in templates {
        match t.render(&messages, conv.add_generation_prompt) {
            Ok(_) => {}
            Err(framework::Error::Template(_) | framework::Error::InvalidRequest { .. }) => {}
            Err(e) => return Err(format!("not a template or request error: {e}")),
        }
    }
    Ok(())
}

#[test]
fn fuzz_chat_template() {
    fuzz("chat", 2, chat_target);
}

/// A JSON value built from the bytes, with keys drawn mostly from the
/// request fields so that validation is reached.
fn json_value(u: &mut Unstructured, depth: usize) -> arbitrary::Result<Value> {
    const KEYS: [&str; 30] = [
        "model",
        "prompt",
        "messages",
        "role",
        "content",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "n",
        "stop",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "stream",
        "stream_options",
        "include_usage",
        "ignore_eos",
        "beam_width",
        "length_penalty",
        "logit_bias",
        "best_of",
        "logprobs",
        "top_logprobs",
        "echo",
        "response_format",
        "type",
    ];
    let kind = if depth > 3 {
        u.int_in_range(0..=5)?
    } else {
        u.int_in_range(0..=7)?
    };
    Ok(match kind {
        0 => Value::Null,
        1 => json!(bool::arbitrary(u)?),
        2 => json!(i64::arbitrary(u)?),
        3 => json!(u64::arbitrary(u)? % 10_000),
        4 => serde_json::Number::from_f64(f64::arbitrary(u)?).map_or(Value::Null, Value::Number),
        5 => json!(String::arbitrary(u)?),
        6 => {
            let n = u.int_in_range(0..=6)?;
            Value::Array(
                (0..n)
                    .map(|_| json_value(u, depth + 1))
                    .collect::<Result<_, _>>()?,
            )
        }
        _ => {
            let n = u.int_in_range(0..=8)?;
            let mut map = serde_json::Map::new();
            for _ in 0..n {
                let key = if u.ratio(7, 8)? {
                    KEYS[u.choose_index(KEYS.len())?].to_string()
                } else {
                    String::arbitrary(u)?
                };
                map.insert(key, json_value(u, depth + 1)?);
            }
            Value::Object(map)
        }
    })
}

/// Request JSON through parsing and validation into a `ValidGeneration`,
/// for completions and chat: raw bytes (first byte even) or a JSON value
/// built from the bytes. Refusals must be 4xx errors.
fn request_target(data: &[u8]) -> Outcome {
    let body = match data.split_first() {
        Some((b, rest)) if b % 2 == 1 => {
            let mut u = Unstructured::new(rest);
            serde_json::to_vec(&json_value(&mut u, 0).map_err(refused)?)
                .map_err(|e| format!("cannot serialize: {e}"))?
        }
        Some((_, rest)) => rest.to_vec(),
        None => Vec::new(),
    };
    let limits = LimitsSection::default();
    let check = |r: Result<
        parallm::serve::api::ValidGeneration,
        parallm::serve::error::ApiError,
    >| {
        match r {
            Ok(v) => {
                if v.requests.is_empty() || v.requests.len() > limits.max_n * 64 {
                    return Err(format!("{} requests validated", v.requests.len()));
                }
                for r in &v.requests {
                    r.params
                        .validate()
                        .map_err(|e| format!("validated parameters are invalid: {e}"))?;
                }
                Ok(())
            }
            Err(e) => {
                use actix_web::ResponseError;
                let status = e.status_code().as_u16();
                if (400..500).contains(&status) {
                    Err(refused(e))
                } else {
                    Err(format!("status {status} for a bad request: {e}"))
                }
            }
        }
    };
    let completion = parse_body::<CompletionRequest>(&body)
        .and_then(|r| r.validate(&limits, &Default::default()));
    let chat = parse_body::<ChatRequest>(&body).and_then(|r| {
        r.validate(
            &limits,
            &Default::default(),
            framework::tools::ToolFormat::Hermes,
        )
    });
    match (check(completion), check(chat)) {
        (Err(e), _) | (_, Err(e)) if !e.starts_with("refused: ") => Err(e),
        (Err(e), Err(_)) => Err(e),
        _ => Ok(()),
    }
}

#[test]
fn fuzz_request_validation() {
    fuzz("request", 3, request_target);
}

/// Rewrites the hand-made seeds of `fuzz/corpus` (run once after changing
/// them; the files are committed): `cargo test --release --test fuzz --
/// --ignored write_seed_corpus`.
#[test]
#[ignore = "rewrites the committed seed corpus; run by hand"]
fn write_seed_corpus() {
    use gguf::{Meta, Tensor};
    let dir = |t: &str| {
        let d = fuzz_dir().join("corpus").join(t);
        std::fs::create_dir_all(&d).expect("corpus dir");
        d
    };
    let put = |t: &str, name: &str, bytes: &[u8]| {
        std::fs::write(dir(t).join(name), bytes).expect("write seed");
    };
    // GGUF: the reference model's head, and tiny models made here.
    let reference = std::fs::read(common::model_path()).expect("reference model");
    put("gguf", "reference-head-4k.gguf", &reference[..4096]);
    put("gguf", "reference-head-64k.gguf", &reference[..65536]);
    let tokens: Vec<String> = ["<s>", "</s>", "a", "b", "ab", "Ġ", "Ġa", "H", "e", "l", "o"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let vocab = tokens.len() as u32;
    let meta = |extra: Vec<(&'static str, Meta)>| {
        let mut m = vec![
            ("general.architecture", Meta::Str("llama".into())),
            ("general.alignment", Meta::U32(32)),
            ("llama.block_count", Meta::U32(1)),
            ("llama.embedding_length", Meta::U32(8)),
            ("llama.feed_forward_length", Meta::U32(16)),
            ("llama.attention.head_count", Meta::U32(2)),
            ("llama.attention.head_count_kv", Meta::U32(1)),
            ("llama.context_length", Meta::U32(64)),
            ("llama.vocab_size", Meta::U32(vocab)),
            ("llama.rope.freq_base", Meta::F32(10000.0)),
            ("llama.attention.layer_norm_rms_epsilon", Meta::F32(1e-5)),
            ("tokenizer.ggml.model", Meta::Str("gpt2".into())),
            ("tokenizer.ggml.pre", Meta::Str("smollm".into())),
            ("tokenizer.ggml.tokens", Meta::Strs(tokens.clone())),
            (
                "tokenizer.ggml.merges",
                Meta::Strs(vec!["a b".into(), "Ġ a".into()]),
            ),
            (
                "tokenizer.ggml.token_type",
                Meta::I32s(vec![3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1]),
            ),
            ("tokenizer.ggml.bos_token_id", Meta::U32(0)),
            ("tokenizer.ggml.eos_token_id", Meta::U32(1)),
            (
                "tokenizer.chat_template",
                Meta::Str(
                    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}".into(),
                ),
            ),
        ];
        m.extend(extra);
        m
    };
    let table = vec![
        Tensor::new("token_embd.weight", &[8, vocab as u64], 0, 0),
        Tensor::new("output_norm.weight", &[8], 0, 352),
        Tensor::new("blk.0.attn_q.weight", &[32, 8], 2, 384),
    ];
    put(
        "gguf",
        "tiny-llama.gguf",
        &gguf::gguf(&meta(vec![]), &table, 544),
    );
    put(
        "gguf",
        "tiny-llama-no-template.gguf",
        &gguf::gguf(
            &meta(vec![("tokenizer.ggml.add_bos_token", Meta::Bool(true))]),
            &table[..2],
            384,
        ),
    );
    put(
        "gguf",
        "no-tensors.gguf",
        &gguf::gguf(&meta(vec![]), &[], 0),
    );
    // A SentencePiece vocabulary (`tokenizer.ggml.model = llama`): scores,
    // the ▁ space marker, byte-fallback tokens for all 256 bytes, and a
    // space prefix to add.
    let mut pieces: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    pieces.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
    pieces.extend(
        [
            "▁", "▁H", "▁He", "▁w", "e", "l", "o", "r", "d", "ll", "llo", "▁Hello", "or", "ld",
            "▁wor", "▁world",
        ]
        .map(String::from),
    );
    let n = pieces.len();
    let spm_meta: Vec<(&'static str, Meta)> = meta(vec![])
        .into_iter()
        .filter(|(k, _)| !k.starts_with("tokenizer.ggml.") && *k != "llama.vocab_size")
        .chain([
            ("llama.vocab_size", Meta::U32(n as u32)),
            ("tokenizer.ggml.model", Meta::Str("llama".into())),
            ("tokenizer.ggml.tokens", Meta::Strs(pieces)),
            (
                "tokenizer.ggml.scores",
                Meta::F32s((0..n).map(|i| -(i as f32) / 8.0).collect()),
            ),
            (
                "tokenizer.ggml.token_type",
                Meta::I32s(
                    (0..n)
                        .map(|i| match i {
                            0 => 2,
                            1 | 2 => 3,
                            3..=258 => 6,
                            _ => 1,
                        })
                        .collect(),
                ),
            ),
            ("tokenizer.ggml.bos_token_id", Meta::U32(1)),
            ("tokenizer.ggml.eos_token_id", Meta::U32(2)),
            ("tokenizer.ggml.unknown_token_id", Meta::U32(0)),
            ("tokenizer.ggml.add_space_prefix", Meta::Bool(true)),
        ])
        .collect();
    put(
        "gguf",
        "tiny-spm.gguf",
        &gguf::gguf(
            &spm_meta,
            &[Tensor::new("token_embd.weight", &[8, n as u64], 0, 0)],
            8 * 4 * n,
        ),
    );
    // Text for the tokenizer.
    for (name, text) in [
        (
            "english.txt",
            "The capital of France is Paris. It has 2,102,650 people.",
        ),
        (
            "mixed.txt",
            "Grüße, 世界! Привет 👋🏽 \t\n  tabs\tand   spaces 1234567890 <|im_start|>user",
        ),
        ("code.txt", "fn main() {\n    println!(\"{}\", 1 + 2);\n}\n"),
        ("control.txt", "\u{0}\u{1}\u{7f}\r\n\u{feff}\u{200b}"),
    ] {
        put("tokenizer", name, text.as_bytes());
    }
    // Bytes for arbitrary conversations.
    for (i, n) in [16usize, 64, 256, 1024].iter().enumerate() {
        let bytes: Vec<u8> = (0..*n).map(|k| (k * 31 + i * 7) as u8).collect();
        put("chat", &format!("bytes-{n}.bin"), &bytes);
    }
    // Requests: raw JSON (first byte even) and structured (odd).
    let raw = |v: Value| [vec![0u8], v.to_string().into_bytes()].concat();
    for (name, v) in [
        (
            "completion.json",
            json!({"prompt": "Hello", "max_tokens": 8, "temperature": 0.7, "top_p": 0.9, "n": 2, "stop": ["\n"], "seed": 3, "logprobs": 2, "logit_bias": {"42": -100}}),
        ),
        (
            "chat.json",
            json!({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}], "max_completion_tokens": 4, "logprobs": true, "top_logprobs": 2, "stream": true, "stream_options": {"include_usage": true}}),
        ),
        (
            "beam.json",
            json!({"prompt": [[1, 2, 3], [4, 5]], "beam_width": 4, "n": 2, "length_penalty": 1.2}),
        ),
        (
            "edge.json",
            json!({"prompt": "", "max_tokens": 0, "top_k": -1, "best_of": 1, "response_format": {"type": "text"}}),
        ),
    ] {
        put("request", name, &raw(v));
    }
    put(
        "request",
        "structured.bin",
        &(0..200u8)
            .map(|b| b.wrapping_mul(37) | 1)
            .collect::<Vec<_>>(),
    );

    // Regressions: what the fuzzers found, kept as inputs that run first.
    let regression = |t: &str, name: &str, bytes: &[u8]| {
        let d = fuzz_dir().join("regressions").join(t);
        std::fs::create_dir_all(&d).expect("regressions dir");
        std::fs::write(d.join(name), bytes).expect("write regression");
    };
    // candle's header reader divides by general.alignment: 0 panicked.
    regression(
        "gguf",
        "alignment-zero.gguf",
        &gguf::gguf(
            &meta(vec![("general.alignment", Meta::U32(0))]),
            &table,
            544,
        ),
    );
    // Bytes without a token in the reference vocabulary are dropped, not
    // an error: a control byte, and the lead byte of U+9F3FD.
    regression(
        "tokenizer",
        "control-byte.txt",
        b"println!(\x04{}\"f 1 + 2);\n",
    );
    regression(
        "tokenizer",
        "plane-9.txt",
        b"has \xf2\x9f\x8f\xbd \xff\xff\t\n",
    );
}
