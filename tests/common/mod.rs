//! Shared fixtures: the reference model (fetched through the same code path as
//! the binary, cached in $PARALLM_HOME) and the golden outputs.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use parallm::framework::collective::{Collective, SingleCollective, ThreadCollective};
use parallm::framework::{
    BatchItem, GgufFile, LlamaShard, LogitsWanted, ShardSpec, Tokenizer, WeightFormat,
};
use parallm::{Engine, Event, Request};

/// The golden cases' prompts, as token ids.
pub fn golden_prompts() -> Vec<Vec<u32>> {
    golden()["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| ids(&c["prompt_tokens"]))
        .collect()
}

/// The reference model's path, fetched on first use.
pub fn model_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| match parallm::fetch::reference_model(false) {
        Ok(p) => p,
        Err(e) => panic!("cannot fetch the reference model: {e}"),
    })
    .clone()
}

/// A golden file of this repository (`tests/golden/NAME`).
pub fn repo_golden(name: &str) -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    serde_json::from_slice(&std::fs::read(&path).expect("golden file")).expect("golden JSON")
}

/// The GPL-3 text Debian ships (package base-files), checked to be the one
/// the golden file `golden` (`tests/golden/NAME`) was made from.
pub fn gpl3_text(golden: &str) -> &'static str {
    const TEXT: &str = "/usr/share/common-licenses/GPL-3";
    let bytes = std::fs::read(TEXT).unwrap_or_else(|e| panic!("{TEXT}: {e} (package base-files)"));
    let sha = format!("{:x}", <sha2::Sha256 as sha2::Digest>::digest(&bytes));
    assert_eq!(
        Some(sha.as_str()),
        repo_golden(golden)["text_sha256"].as_str(),
        "{TEXT} is not the text tests/golden/{golden} was made from"
    );
    TEXT
}

/// Tensor `name` of `file` as f32, whatever its stored type.
pub fn tensor_values(file: &GgufFile, name: &str) -> Vec<f32> {
    let (_, dims) = file.tensor_info(name).expect("tensor exists");
    file.tensor(name, &dims)
        .expect("tensor reads")
        .dequantize(&candle_core::Device::Cpu)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .expect("tensor dequantizes")
}

/// `parallm perplexity` of the model file `model` on the GPL-3 text, over
/// its first `chunks` windows of `ctx` tokens.
pub fn perplexity(model: &str, ctx: usize, chunks: usize) -> f64 {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_parallm"))
        .args([
            "perplexity",
            "--model",
            model,
            "-f",
            "/usr/share/common-licenses/GPL-3",
        ])
        .args([
            "--ctx",
            &ctx.to_string(),
            "--chunks",
            &chunks.to_string(),
            "--json",
            "-",
        ])
        .output()
        .expect("binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "perplexity of {model}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json = &stdout[stdout.find('{').expect("JSON on stdout")..];
    let report: serde_json::Value = serde_json::from_str(json).expect("report JSON");
    report["ppl"].as_f64().expect("a perplexity")
}

/// The open reference model file.
pub fn gguf() -> &'static GgufFile {
    static FILE: OnceLock<GgufFile> = OnceLock::new();
    FILE.get_or_init(|| GgufFile::open(model_path()).expect("reference model opens"))
}

/// The reference tokenizer.
pub fn tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| Tokenizer::from_gguf(gguf()).expect("tokenizer builds"))
}

/// The whole reference model in `format`, loaded once per test binary and format.
pub fn model(format: WeightFormat) -> &'static LlamaShard {
    static MODELS: OnceLock<std::sync::Mutex<Vec<(WeightFormat, &'static LlamaShard)>>> =
        OnceLock::new();
    let cell = MODELS.get_or_init(Default::default);
    let mut models = cell.lock().unwrap();
    if let Some((_, m)) = models.iter().find(|(f, _)| *f == format) {
        return m;
    }
    let m: &'static LlamaShard = Box::leak(Box::new(
        LlamaShard::load(gguf(), ShardSpec::SINGLE, format).expect("model loads"),
    ));
    models.push((format, m));
    m
}

/// The golden file: `$PARALLM_GOLDEN`, else `../shared/golden/smollm2-135m-q4_1.json`.
pub fn golden() -> serde_json::Value {
    let path = std::env::var_os("PARALLM_GOLDEN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../shared/golden/smollm2-135m-q4_1.json")
        });
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("golden file {} is needed by this test: {e}", path.display()));
    serde_json::from_str(&text).expect("golden file is JSON")
}

/// A JSON array of integers as token ids.
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("integer") as u32)
        .collect()
}

/// Indices of the `k` largest values, largest first.
pub fn top_k(row: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// Largest |a − b| relative to the largest |b|.
pub fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// The terminal event's tokens, checking there is exactly one terminal event.
pub fn finished(events: &[Event]) -> Vec<u32> {
    let terminal = events.iter().filter(|e| e.is_terminal()).count();
    assert_eq!(terminal, 1, "exactly one terminal event: {events:?}");
    match events.last() {
        Some(Event::Finished { tokens, .. }) => tokens.clone(),
        other => panic!("expected a finished request, got {other:?}"),
    }
}

/// Every prompt submitted at once for `n` greedy tokens; each one's tokens.
pub fn run(engine: &Engine, prompts: &[Vec<u32>], n: usize) -> Vec<Vec<u32>> {
    let reqs: Vec<Request> = prompts
        .iter()
        .map(|p| Request::greedy_tokens(p.clone(), n))
        .collect();
    run_requests(engine, &reqs)
}

/// Every request submitted at once; each one's tokens.
pub fn run_requests(engine: &Engine, reqs: &[Request]) -> Vec<Vec<u32>> {
    let streams: Vec<_> = reqs
        .iter()
        .map(|r| engine.generate(r.clone()).expect("admitted"))
        .collect();
    streams
        .into_iter()
        .map(|s| finished(&s.collect_blocking()))
        .collect()
}

/// The scheduler's figures once the engine is idle (or after 30 s).
pub fn wait_idle(engine: &Engine) -> parallm::actors::SchedulerStats {
    let t0 = std::time::Instant::now();
    loop {
        let s = engine.stats().scheduler;
        if s.idle || t0.elapsed() > std::time::Duration::from_secs(30) {
            return s;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// 64 prompts of mixed lengths (tens to about 170 tokens) for the
/// concurrency tests.
pub fn sixty_four_prompts() -> Vec<Vec<u32>> {
    let tok = tokenizer();
    let base =
        "Parallel inference splits a model across devices and serves many requests at once. ";
    (0..64)
        .map(|i| {
            let text = format!("Request {i}: {}Then {i} more", base.repeat(i % 9));
            tok.encode(&text).expect("tokenizes")
        })
        .collect()
}

/// `n` prompts in three families, each a shared prefix (2, 4 and 8 or more
/// KV blocks) followed by a question of its own: prompt `i` is family
/// `i % 3`'s.
pub fn shared_prefix_texts(n: usize) -> Vec<String> {
    let families = [
        "You are a helpful assistant. ".repeat(2),
        "Parallel inference splits a model across devices and serves many requests at once. "
            .repeat(4),
        "The quick brown fox jumps over the lazy dog while the scheduler batches every step. "
            .repeat(8),
    ];
    (0..n)
        .map(|i| format!("{}Question {i}: why?", families[i % 3]))
        .collect()
}

/// Every position's logits of `prompt`, then `n` greedy tokens, on one shard
/// of a tensor-parallel group (`coll`).
pub fn prefill_and_greedy(
    m: &LlamaShard,
    prompt: &[u32],
    n: usize,
    coll: &dyn Collective,
) -> (Vec<Vec<f32>>, Vec<u32>) {
    let mut cache = m.new_cache();
    let logits = m
        .forward(
            &mut [BatchItem {
                tokens: prompt,
                cache: &mut cache,
                logits: LogitsWanted::All,
            }],
            coll,
        )
        .expect("prefill");
    let rows: Vec<Vec<f32>> = (0..prompt.len()).map(|r| logits.row(r).to_vec()).collect();
    let mut next = top_k(&rows[prompt.len() - 1], 1)[0] as u32;
    let mut greedy = vec![next];
    while greedy.len() < n {
        let l = m
            .forward(
                &mut [BatchItem {
                    tokens: &[next],
                    cache: &mut cache,
                    logits: LogitsWanted::Last,
                }],
                coll,
            )
            .expect("decode");
        next = top_k(l.last(0).expect("a row"), 1)[0] as u32;
        greedy.push(next);
    }
    (rows, greedy)
}

/// [`prefill_and_greedy`] on every shard of a tensor-parallel group (one
/// thread per rank when there are several), each rank's result in order.
pub fn on_group(shards: &[LlamaShard], prompt: &[u32], n: usize) -> Vec<(Vec<Vec<f32>>, Vec<u32>)> {
    if shards.len() == 1 {
        return vec![prefill_and_greedy(&shards[0], prompt, n, &SingleCollective)];
    }
    let colls = ThreadCollective::group(shards.len());
    std::thread::scope(|s| {
        let joins: Vec<_> = shards
            .iter()
            .zip(&colls)
            .map(|(m, c)| s.spawn(move || prefill_and_greedy(m, prompt, n, c)))
            .collect();
        joins.into_iter().map(|j| j.join().expect("rank")).collect()
    })
}

/// Runs `tests/support/SCRIPT REFERENCE_MODEL OUT_DIR` with the tests'
/// Python environment (`python-env.sh`: numpy and the `gguf` package),
/// which writes the tiny models a test compares.
pub fn write_models(script: &str, out_dir: &std::path::Path) {
    use std::process::{Command, Stdio};
    let support = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support");
    let env = Command::new("bash")
        .arg(support.join("python-env.sh"))
        .stderr(Stdio::inherit())
        .output()
        .expect("run python-env.sh");
    assert!(env.status.success(), "python-env.sh failed");
    let python = String::from_utf8_lossy(&env.stdout)
        .lines()
        .last()
        .expect("python-env.sh prints the venv's python")
        .trim()
        .to_string();
    let status = Command::new(python)
        .arg(support.join(script))
        .arg(model_path())
        .arg(out_dir)
        .stdout(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("run {script}: {e}"));
    assert!(status.success(), "{script} failed");
}

/// How many of a golden case's greedy tokens must agree: those before the
/// first step whose reference top-two logit gap (`greedy_gaps`) is under
/// `near_tie`, where either token may fairly win.
pub fn greedy_before_tie(case: &serde_json::Value, near_tie: f32) -> usize {
    let gaps = case["greedy_gaps"].as_array().expect("greedy_gaps");
    gaps.iter()
        .position(|g| (g.as_f64().expect("gap") as f32) < near_tie)
        .unwrap_or(gaps.len())
}

/// Checks the last prompt position's logits `last` against a golden case's
/// `top10` (token, logit) pairs within `tolerance`, naming the reference
/// (`by`) and the case (`what`) on failure; returns the largest difference.
pub fn check_top10(
    last: &[f32],
    case: &serde_json::Value,
    tolerance: f32,
    by: &str,
    what: &str,
) -> f32 {
    let mut worst = 0f32;
    for pair in case["top10"].as_array().expect("top10") {
        let (tok, want) = (
            pair[0].as_u64().expect("id") as usize,
            pair[1].as_f64().expect("logit") as f32,
        );
        let d = (last[tok] - want).abs();
        worst = worst.max(d);
        assert!(
            d <= tolerance,
            "{what}: token {tok}: {} vs {by} {want}",
            last[tok]
        );
    }
    worst
}

/// Runs the `parallm` binary with `args`.
pub fn cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_parallm"))
        .args(args)
        .output()
        .expect("binary runs")
}

/// Runs the `parallm` binary with `args`, which must succeed; its stdout
/// then stderr.
pub fn cli_ok(args: &[&str]) -> String {
    let out = cli(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{args:?}: {stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned() + &stderr
}

/// `tests/golden/hf.json`: the tiny Hugging Face directories' files and
/// transformers' outputs on them (`tests/support/hf_golden.py`).
pub fn hf_golden() -> &'static serde_json::Value {
    static GOLDEN: OnceLock<serde_json::Value> = OnceLock::new();
    GOLDEN.get_or_init(|| repo_golden("hf.json"))
}

/// The tiny directories' names (`llama-f16`, `qwen2-bf16`, …).
pub fn hf_names() -> Vec<String> {
    hf_golden()["models"]
        .as_object()
        .expect("models")
        .keys()
        .cloned()
        .collect()
}

/// Whether `dir` holds exactly the files of golden model `name`.
fn hf_matches_golden(dir: &std::path::Path, name: &str) -> bool {
    use sha2::{Digest, Sha256};
    let files = hf_golden()["models"][name]["files"]
        .as_object()
        .expect("files");
    files.iter().all(|(file, sha)| {
        std::fs::read(dir.join(file))
            .map(|bytes| format!("{:x}", Sha256::digest(&bytes)) == sha.as_str().unwrap_or(""))
            .unwrap_or(false)
    })
}

/// The directory of the tiny models, written once by
/// `tests/support/hf_models.py` and checked against the golden hashes.
pub fn hf_models_dir() -> &'static std::path::Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = parallm::fetch::parallm_home().join("models/hf");
        if hf_names()
            .iter()
            .all(|n| hf_matches_golden(&dir.join(n), n))
        {
            return dir;
        }
        write_models("hf_models.py", &dir);
        for n in hf_names() {
            assert!(
                hf_matches_golden(&dir.join(&n), &n),
                "{} is not what transformers' outputs came from (another numpy or gguf version?)",
                dir.join(&n).display()
            );
        }
        dir
    })
}

/// tests/golden/embeddings.json: transformers' embeddings of the random BERT.
pub fn embed_golden() -> &'static serde_json::Value {
    static GOLDEN: OnceLock<serde_json::Value> = OnceLock::new();
    GOLDEN.get_or_init(|| repo_golden("embeddings.json"))
}

/// The directory holding the random BERT (`bert-f32/` and `bert-f32.gguf`),
/// written once by `tests/support/bert_models.py` and checked against the
/// golden hashes.
pub fn bert_models_dir() -> &'static std::path::Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        use sha2::{Digest, Sha256};
        let dir = parallm::fetch::parallm_home().join("models/bert");
        let golden = embed_golden();
        let matches = || {
            let check = |base: PathBuf, files: &serde_json::Value| {
                files.as_object().expect("files").iter().all(|(file, sha)| {
                    std::fs::read(base.join(file))
                        .map(|b| format!("{:x}", Sha256::digest(&b)) == sha.as_str().unwrap_or(""))
                        .unwrap_or(false)
                })
            };
            check(dir.join("bert-f32"), &golden["files"]) && check(dir.clone(), &golden["gguf"])
        };
        if !matches() {
            write_models("bert_models.py", &dir);
            assert!(
                matches(),
                "{} is not what transformers' outputs came from (another numpy or gguf version?)",
                dir.display()
            );
        }
        dir
    })
}

/// Cosine similarity of two vectors (in f64).
pub fn cosine(a: &[f32], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y).sum();
    let na: f64 = a.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// Stops a child process: SIGTERM (a server drains, nginx's master stops
/// its workers, mpirun passes it to its ranks), then SIGKILL if it is still
/// there after `grace`.
pub fn stop(child: &mut std::process::Child, grace: std::time::Duration) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: kill(2) on our own child, not yet reaped (it is waited for
        // below), so the pid names no other process.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    let t = std::time::Instant::now();
    while matches!(child.try_wait(), Ok(None)) && t.elapsed() < grace {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}
